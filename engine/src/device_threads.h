// One long-lived host thread per device, running a step's per-device work at once (replicas and
// tensor-parallel shards).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <thread>
#include <utility>
#include <vector>

namespace mp {

// One long-lived thread per device: a device's calls always come from the same thread, and a
// step costs a wake-up per device, not a thread start. With `spin` > 0 the threads (and the
// caller waiting for them) poll that long before sleeping: a futex wake-up costs tens of
// microseconds, a large share of a GPU decode step of 0.3-1 ms, paid twice per step (start, end).
class DeviceThreads {
 public:
  // What GPU backends poll: about a decode step, so that the threads stay awake between the steps
  // of a busy server and sleep when it is idle. CPU backends use 0: their steps need the cores.
  static constexpr std::chrono::microseconds kGpuSpin{2000};

  explicit DeviceThreads(size_t n, std::chrono::microseconds spin = {}) : spin_(spin), jobs_(n) {
    for (size_t i = 0; i < n; ++i) threads_.emplace_back([this, i] { loop(i); });
  }
  ~DeviceThreads() {
    stop_.store(true);
    for (auto& j : jobs_) {
      j.round.fetch_add(1, std::memory_order_release);
      j.round.notify_one();
    }
    for (auto& t : threads_) t.join();
  }
  // Runs fn(i) on thread i for every i with want[i], all at once; returns when all are done and
  // rethrows the first failure (by device order).
  void run(const std::vector<bool>& want, const std::function<void(size_t)>& fn) {
    fn_ = &fn;
    int n = 0;
    for (size_t i = 0; i < jobs_.size(); ++i) n += want[i];
    pending_.store(n, std::memory_order_relaxed);
    for (size_t i = 0; i < jobs_.size(); ++i)
      if (want[i]) {
        jobs_[i].round.fetch_add(1, std::memory_order_release);
        jobs_[i].round.notify_one();
      }
    for (int left; (left = pending_.load(std::memory_order_acquire)) != 0;)
      wait_for_change(pending_, left);
    for (auto& j : jobs_)
      if (j.error) std::rethrow_exception(std::exchange(j.error, nullptr));
  }

 private:
  struct alignas(64) Job {  // one cache line each: the threads poll their own
    std::atomic<uint32_t> round{0};  // bumped to start a job (or to stop)
    std::exception_ptr error;
  };
  // Returns once `a` no longer holds `old`: polls for spin_, then sleeps on it.
  template <class T>
  void wait_for_change(const std::atomic<T>& a, T old) const {
    if (spin_.count() > 0) {
      const auto until = std::chrono::steady_clock::now() + spin_;
      while (a.load(std::memory_order_acquire) == old)
        if (std::chrono::steady_clock::now() > until) break;
    }
    while (a.load(std::memory_order_acquire) == old) a.wait(old, std::memory_order_acquire);
  }
  void loop(size_t i) {
    Job& job = jobs_[i];
    for (uint32_t seen = 0;;) {
      wait_for_change(job.round, seen);
      seen = job.round.load(std::memory_order_acquire);
      if (stop_.load()) return;
      try {
        (*fn_)(i);
      } catch (...) {
        job.error = std::current_exception();
      }
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) pending_.notify_one();
    }
  }
  const std::chrono::microseconds spin_;
  const std::function<void(size_t)>* fn_ = nullptr;  // the running step's work
  std::vector<Job> jobs_;
  std::atomic<int> pending_{0};  // jobs of the running step not yet done
  std::atomic<bool> stop_{false};
  std::vector<std::thread> threads_;  // last: started after, joined before the state above
};

}  // namespace mp
