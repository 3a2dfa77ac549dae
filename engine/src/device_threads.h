// One long-lived host thread per device, running a step's per-device work at once (replicas and
// tensor-parallel shards).
#pragma once

#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace mp {

// One long-lived thread per device: a device's calls always come from the same thread, and a
// step costs a wake-up per device, not a thread start.
class DeviceThreads {
 public:
  explicit DeviceThreads(size_t n) : jobs_(n) {
    for (size_t i = 0; i < n; ++i) threads_.emplace_back([this, i] { loop(i); });
  }
  ~DeviceThreads() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }
  // Runs fn(i) on thread i for every i with want[i], all at once; returns when all are done and
  // rethrows the first failure (by device order).
  void run(const std::vector<bool>& want, const std::function<void(size_t)>& fn) {
    std::unique_lock<std::mutex> lock(mu_);
    for (size_t i = 0; i < jobs_.size(); ++i)
      if (want[i]) {
        jobs_[i] = {[&fn, i] { fn(i); }, nullptr, true};
        ++pending_;
      }
    wake_.notify_all();
    done_.wait(lock, [this] { return pending_ == 0; });
    for (auto& j : jobs_)
      if (j.error) std::rethrow_exception(std::exchange(j.error, nullptr));
  }

 private:
  struct Job {
    std::function<void()> fn;
    std::exception_ptr error;
    bool ready = false;
  };
  void loop(size_t i) {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      wake_.wait(lock, [&] { return stop_ || jobs_[i].ready; });
      if (stop_) return;
      std::function<void()> fn = std::move(jobs_[i].fn);
      lock.unlock();
      std::exception_ptr error;
      try {
        fn();
      } catch (...) {
        error = std::current_exception();
      }
      lock.lock();
      jobs_[i].ready = false;
      jobs_[i].error = error;
      if (--pending_ == 0) done_.notify_one();
    }
  }
  std::mutex mu_;
  std::condition_variable wake_, done_;
  std::vector<Job> jobs_;
  int pending_ = 0;
  bool stop_ = false;
  std::vector<std::thread> threads_;  // last: started after, joined before the state above
};

}  // namespace mp
