// Replicas: one backend per device behind the Backend interface, so one scheduler serves every
// GPU of a host. The scheduler steps each device from its own thread (a batch of one device's
// slots runs on the calling thread, at the same time as other devices' batches); a batch spread
// over several devices is split by device, the parts run at once (one thread per device), and
// the results come back in the caller's order.
#include "backend_replicas.h"

#include <chrono>
#include <mutex>
#include <type_traits>

#include "backend_cpu.h"
#include "device_threads.h"

namespace mp {
namespace {

class ReplicaBackend final : public Backend {
 public:
  ReplicaBackend(std::vector<std::unique_ptr<Backend>> parts, std::vector<std::string> devices,
                 std::chrono::microseconds spin)
      : parts_(std::move(parts)),
        devices_(std::move(devices)),
        device_mu_(std::make_unique<std::mutex[]>(parts_.size())),
        local_(parts_.size()),
        in_flight_(parts_.size()),
        threads_(parts_.size(), spin) {
    if (parts_.size() < 2 || parts_.size() != devices_.size())
      throw Error("replicas: two devices or more, one name each");
    per_ = parts_[0]->n_slots();
    for (auto& p : parts_) {
      if (p->n_slots() != per_) throw Error("replicas: every device needs the same slot count");
      while (p->alloc_slot() >= 0) {
      }
    }
    in_use_.assign(size_t(per_) * parts_.size(), false);
    every_slot_.assign(in_use_.size(), true);
    stats_.resize(parts_.size());
    for (size_t d = 0; d < parts_.size(); ++d) {
      stats_[d].device = devices_[d];
      stats_[d].slots = per_;
    }
  }

  std::string name() const override {
    std::string on;
    for (const auto& d : devices_) on += (on.empty() ? "" : ", ") + d;
    return std::to_string(parts_.size()) + " replicas of " + parts_[0]->name() + " (" + on + ")";
  }
  const Config& config() const override { return parts_[0]->config(); }
  int n_slots() const override { return static_cast<int>(in_use_.size()); }
  int n_devices() const override { return static_cast<int>(parts_.size()); }
  int slot_device(int s) const override { return check(s) % n_devices(); }

  // The free slot of the device running the fewest sequences (ties: the lower device). Touches
  // no device (slots are reset when freed), so it never waits for a device's step.
  int alloc_slot() override {
    const int N = n_devices();
    std::lock_guard<std::mutex> lock(mu_);
    int best = -1;
    for (int d = 0; d < N; ++d)
      if (stats_[d].slots_in_use < per_ &&
          (best < 0 || stats_[d].slots_in_use < stats_[best].slots_in_use))
        best = d;
    if (best < 0) return -1;
    for (int local = 0; local < per_; ++local) {
      const int s = local * N + best;
      if (in_use_[s]) continue;
      in_use_[s] = true;
      ++stats_[best].slots_in_use;
      return s;
    }
    return -1;  // unreachable: the count said one is free
  }
  void free_slot(int s) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!in_use_.at(check(s))) return;
    }
    reset_slot(s);  // fresh for whoever allocates it next
    std::lock_guard<std::mutex> lock(mu_);
    in_use_[s] = false;
    --stats_[device(s)].slots_in_use;
  }
  void reset_slot(int s) override {
    std::lock_guard<std::mutex> lock(device_mu_[device(s)]);
    part(s).reset_slot(local(s));
  }
  // Across devices the state travels through the host (about 1 MiB with FMA), one device at a
  // time: the copy waits at most for each device's running step.
  void copy_slot(int src, int dst) override {
    check(src);
    check(dst);
    if (device(src) == device(dst)) {
      std::lock_guard<std::mutex> lock(device_mu_[device(src)]);
      part(src).copy_slot(local(src), local(dst));
    } else {
      load_slot(dst, save_slot(src));
    }
  }
  // A slot's position and size are read without the device's lock: only its owner changes them.
  int64_t slot_pos(int s) const override { return part(s).slot_pos(local(s)); }
  size_t slot_bytes(int s) const override { return part(s).slot_bytes(local(s)); }
  std::vector<uint8_t> save_slot(int s) const override {
    std::lock_guard<std::mutex> lock(device_mu_[device(s)]);
    return part(s).save_slot(local(s));
  }
  void load_slot(int s, std::span<const uint8_t> bytes) override {
    std::lock_guard<std::mutex> lock(device_mu_[device(s)]);
    part(s).load_slot(local(s), bytes);
  }
  // New requests spread over the devices, so their prompts do too: each reads its own share.
  int prefill_tokens_per_step() const override {
    return parts_[0]->prefill_tokens_per_step() * n_devices();
  }

  std::vector<float> forward(std::span<const SeqChunk> chunks) override {
    check_batch(chunks);
    if (const int d = one_device(chunks); d >= 0)
      return on_device(d, chunks,
                       [&](std::span<const SeqChunk> own) { return parts_[d]->forward(own); });
    const size_t V = config().vocab_size;
    std::vector<size_t> row0(chunks.size() + 1, 0);  // first logits row of each chunk
    for (size_t i = 0; i < chunks.size(); ++i)
      row0[i + 1] = row0[i] + (chunks[i].all_logits ? chunks[i].tokens.size() : 1);
    std::vector<float> logits(row0.back() * V);
    std::lock_guard<std::mutex> lock(split_mu_);
    split(chunks);
    run([&](size_t d) {
      const std::vector<float> part_logits = parts_[d]->forward(split_[d].chunks);
      size_t row = 0;
      for (size_t i : split_[d].index) {
        const size_t n = row0[i + 1] - row0[i];
        std::copy_n(part_logits.begin() + row * V, n * V, logits.begin() + row0[i] * V);
        row += n;
      }
    });
    return logits;
  }

  std::vector<SampledToken> forward_sample(std::span<const SeqChunk> chunks,
                                           std::span<const SampleSpec> specs) override {
    check_sample_call(chunks, specs);
    check_batch(chunks);
    if (const int d = one_device(chunks); d >= 0)
      return on_device(d, chunks, [&](std::span<const SeqChunk> own) {
        return parts_[d]->forward_sample(own, specs);
      });
    std::lock_guard<std::mutex> lock(split_mu_);
    split(chunks);
    for (auto& part : split_) {
      part.specs.clear();
      for (size_t i : part.index) part.specs.push_back(specs[i]);
    }
    std::vector<SampledToken> out(chunks.size());
    run([&](size_t d) {
      std::vector<SampledToken> got = parts_[d]->forward_sample(split_[d].chunks, split_[d].specs);
      for (size_t j = 0; j < got.size(); ++j) out[split_[d].index[j]] = std::move(got[j]);
    });
    return out;
  }

  bool samples_asynchronously() const override { return parts_[0]->samples_asynchronously(); }
  // A one-device batch (each device's step loop) keeps its device's lock from start to finish;
  // a batch over several devices runs whole in start (the default).
  void start_sample(std::span<const SeqChunk> chunks, std::span<const SampleSpec> specs) override {
    check_sample_call(chunks, specs);
    check_batch(chunks);
    const int d = one_device(chunks);
    if (d < 0) return Backend::start_sample(chunks, specs);
    Started& st = in_flight_[d];
    std::unique_lock<std::mutex> lock(device_mu_[d]);
    st.t0 = std::chrono::steady_clock::now();
    parts_[d]->start_sample(localize(d, chunks), specs);
    st.lock = std::move(lock);
  }
  std::vector<SampledToken> finish_sample(std::span<const SeqChunk> chunks,
                                          std::span<const SampleSpec> specs) override {
    const int d = one_device(chunks);
    if (d < 0) return Backend::finish_sample(chunks, specs);
    Started& st = in_flight_[d];
    const std::unique_lock<std::mutex> lock = std::move(st.lock);
    std::vector<SampledToken> out = parts_[d]->finish_sample(local_[d], specs);
    count(d, local_[d], st.t0);
    return out;
  }

  std::vector<DeviceStats> device_stats() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }

 private:
  struct Part {                    // one device's share of a batch
    std::vector<SeqChunk> chunks;  // with the device's own slot numbers
    std::vector<SampleSpec> specs;
    std::vector<size_t> index;  // the caller's chunk index of each
  };

  int check(int s) const {
    if (s < 0 || s >= n_slots()) throw Error("slot " + std::to_string(s) + " does not exist");
    return s;
  }
  int device(int s) const { return slot_device(s); }
  int local(int s) const { return check(s) / n_devices(); }
  Backend& part(int s) const { return *parts_[device(s)]; }

  // A bad batch is refused before any device runs. Only the slots' use is read under the lock:
  // the loops check the rest (repeats, empty chunks, token ids) at the same time.
  void check_batch(std::span<const SeqChunk> chunks) const {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (const SeqChunk& c : chunks)
        if (c.slot < 0 || c.slot >= n_slots() || !in_use_[c.slot])
          throw Error("forward: slot " + std::to_string(c.slot) + " is not allocated");
    }
    check_chunks(config(), chunks, n_slots(), every_slot_);
  }
  // The device of every chunk, or -1 when they lie on several (or there are none).
  int one_device(std::span<const SeqChunk> chunks) const {
    if (chunks.empty()) return -1;
    const int d = device(chunks[0].slot);
    for (const SeqChunk& c : chunks)
      if (device(c.slot) != d) return -1;
    return d;
  }
  // Runs fn over the chunks in device d's slot numbers, on the calling thread, and counts the work.
  template <class Fn>
  std::invoke_result_t<const Fn&, std::span<const SeqChunk>> on_device(
      int d, std::span<const SeqChunk> chunks, const Fn& fn) {
    std::lock_guard<std::mutex> lock(device_mu_[d]);
    const auto t0 = std::chrono::steady_clock::now();
    auto out = fn(localize(d, chunks));
    count(d, local_[d], t0);
    return out;
  }
  // The chunks in device d's slot numbers (under its lock), kept in local_[d].
  std::span<const SeqChunk> localize(int d, std::span<const SeqChunk> chunks) {
    std::vector<SeqChunk>& own = local_[d];  // kept: no allocation per step
    own.assign(chunks.begin(), chunks.end());
    for (SeqChunk& c : own) c.slot = local(c.slot);
    return own;
  }
  void count(size_t d, std::span<const SeqChunk> chunks, std::chrono::steady_clock::time_point t0) {
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    uint64_t tokens = 0;
    for (const SeqChunk& c : chunks) tokens += c.tokens.size();
    std::lock_guard<std::mutex> lock(mu_);
    stats_[d].tokens += tokens;
    stats_[d].busy_seconds += s;
    ++stats_[d].steps;
  }

  void split(std::span<const SeqChunk> chunks) {
    split_.resize(parts_.size());
    for (auto& p : split_) {
      p.chunks.clear();
      p.index.clear();
    }
    for (size_t i = 0; i < chunks.size(); ++i) {
      Part& p = split_[device(chunks[i].slot)];
      p.chunks.push_back(chunks[i]);
      p.chunks.back().slot = local(chunks[i].slot);
      p.index.push_back(i);
    }
  }

  // Runs fn(d) for every device with chunks in split_, at once (each under its device's lock).
  void run(const std::function<void(size_t)>& fn) {
    std::vector<bool> want(parts_.size());
    for (size_t d = 0; d < parts_.size(); ++d) want[d] = !split_[d].chunks.empty();
    threads_.run(want, [&](size_t d) {
      std::lock_guard<std::mutex> lock(device_mu_[d]);
      const auto t0 = std::chrono::steady_clock::now();
      fn(d);
      count(d, split_[d].chunks, t0);
    });
  }

  std::vector<std::unique_ptr<Backend>> parts_;
  std::vector<std::string> devices_;
  int per_ = 0;  // slots per device
  // Held by whatever runs on a device (a step, a state copy): a device's own step loop finds it
  // free unless another device's loop is copying a state from or to it.
  mutable std::unique_ptr<std::mutex[]> device_mu_;
  std::vector<std::vector<SeqChunk>> local_;  // a one-device batch, by device (under its lock)
  struct Started {  // a one-device batch between start_sample and finish_sample
    std::unique_lock<std::mutex> lock;
    std::chrono::steady_clock::time_point t0;
  };
  std::vector<Started> in_flight_;  // by device
  mutable std::mutex mu_;                     // the slots' use and the stats
  std::vector<bool> in_use_;                  // by global slot
  std::vector<bool> every_slot_;              // all true: check_chunks past the use check
  std::vector<DeviceStats> stats_;
  std::mutex split_mu_;      // one batch over several devices at a time
  std::vector<Part> split_;  // that batch, by device (kept: no allocation per step)
  DeviceThreads threads_;    // last: its threads stop before the parts go
};

}  // namespace

std::unique_ptr<Backend> make_replica_backend(std::vector<std::unique_ptr<Backend>> parts,
                                              std::vector<std::string> devices,
                                              std::chrono::microseconds spin) {
  return std::make_unique<ReplicaBackend>(std::move(parts), std::move(devices), spin);
}

}  // namespace mp
