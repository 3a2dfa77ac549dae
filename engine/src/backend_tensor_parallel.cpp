// Tensor parallelism, Megatron style: N shards each hold a share of the attention heads (their
// KV heads' caches and summaries included) and of the FFN columns, run every step at once on
// their own threads and sum their partial outputs twice per layer through a Communicator. The
// state of a slot is the shards' caches put back together, so it is the plain backend's format.
#include "backend_tensor_parallel.h"

#include <type_traits>

#include "backend_cpu.h"
#include "backend_cuda.h"
#include "communicator.h"
#include "device_threads.h"
#include "fma_cpu.h"

namespace mp {
namespace {

// The KV-head dimension of a cache array laid out [outer][n_kv][inner]: shard `rank` of `size`
// holds heads [rank * n, (rank + 1) * n) of the whole.
void put_shard(const std::vector<float>& part, int n, size_t inner, int rank, int size,
               std::vector<float>& whole) {
  if (part.empty()) return;  // an array exact attention does not use
  const size_t outer = part.size() / (size_t(n) * inner);
  whole.resize(outer * size * n * inner);
  for (size_t o = 0; o < outer; ++o)
    std::copy_n(part.begin() + o * n * inner, n * inner,
                whole.begin() + (o * size + rank) * n * inner);
}
void take_shard(const std::vector<float>& whole, int n, size_t inner, int rank, int size,
                std::vector<float>& part) {
  if (whole.empty()) return part.clear();
  const size_t outer = whole.size() / (size_t(size) * n * inner);
  part.resize(outer * n * inner);
  for (size_t o = 0; o < outer; ++o)
    std::copy_n(whole.begin() + (o * size + rank) * n * inner, n * inner,
                part.begin() + o * n * inner);
}

class TensorParallelBackend final : public Backend {
 public:
  TensorParallelBackend(std::shared_ptr<const Model> model,
                        std::vector<std::unique_ptr<Communicator>> comms,
                        std::vector<std::unique_ptr<Backend>> shards, std::chrono::microseconds spin)
      : model_(std::move(model)),
        shard_(shard_config(model_->config(), int(shards.size()))),
        comms_(std::move(comms)),
        shards_(std::move(shards)),
        in_use_(shards_.at(0)->n_slots(), false),
        threads_(shards_.size(), spin) {}

  std::string name() const override {
    return "tensor parallel x" + std::to_string(shards_.size()) + " of " + shards_[0]->name();
  }
  const Config& config() const override { return model_->config(); }
  int n_slots() const override { return shards_[0]->n_slots(); }
  int alloc_slot() override {
    const int s = shards_[0]->alloc_slot();
    if (s < 0) return s;
    for (size_t r = 1; r < shards_.size(); ++r)
      if (shards_[r]->alloc_slot() != s) throw Error("tensor parallel: shards' slots differ");
    in_use_[s] = true;
    return s;
  }
  void free_slot(int s) override {
    for (auto& b : shards_) b->free_slot(s);
    in_use_[s] = false;
  }
  void reset_slot(int s) override {
    for (auto& b : shards_) b->reset_slot(s);
  }
  void copy_slot(int src, int dst) override {
    for (auto& b : shards_) b->copy_slot(src, dst);
  }
  int64_t slot_pos(int s) const override { return shards_[0]->slot_pos(s); }
  size_t slot_bytes(int s) const override {
    size_t n = 0;
    for (const auto& b : shards_) n += b->slot_bytes(s);
    return n;
  }
  int prefill_tokens_per_step() const override { return shards_[0]->prefill_tokens_per_step(); }

  std::vector<uint8_t> save_slot(int s) const override {
    const Config& c = config();
    cpu::SeqCache whole = cpu::make_seq_cache(c), part;
    for (size_t r = 0; r < shards_.size(); ++r) {
      cpu::deserialize(shard_, shards_[r]->save_slot(s), part, cpu::FineOrder::File);
      whole.pos = part.pos;
      for (int li = 0; li < c.n_layers; ++li) {
        each_array(whole.layers[li], part.layers[li],
                   [&](std::vector<float>& w, std::vector<float>& p, size_t inner) {
                     put_shard(p, shard_.n_kv_heads, inner, int(r), size(), w);
                   });
        whole.layers[li].sum_group = part.layers[li].sum_group;
      }
    }
    return cpu::serialize(c, whole, cpu::FineOrder::File);
  }

  void load_slot(int s, std::span<const uint8_t> bytes) override {
    const Config& c = config();
    cpu::SeqCache whole;
    cpu::deserialize(c, bytes, whole, cpu::FineOrder::File);
    std::vector<std::vector<uint8_t>> parts;
    for (int r = 0; r < size(); ++r) {
      cpu::SeqCache part = cpu::make_seq_cache(shard_);
      part.pos = whole.pos;
      for (int li = 0; li < c.n_layers; ++li) {
        each_array(whole.layers[li], part.layers[li],
                   [&](std::vector<float>& w, std::vector<float>& p, size_t inner) {
                     take_shard(w, shard_.n_kv_heads, inner, r, size(), p);
                   });
        part.layers[li].sum_group = whole.layers[li].sum_group;
      }
      parts.push_back(cpu::serialize(shard_, part, cpu::FineOrder::File));
    }
    for (int r = 0; r < size(); ++r) shards_[r]->load_slot(s, parts[r]);
  }

  // Every shard runs the whole batch on its share and computes the same logits (and samples);
  // rank 0's are returned.
  std::vector<float> forward(std::span<const SeqChunk> chunks) override {
    return on_every_shard(chunks, [&](Backend& b) { return b.forward(chunks); });
  }
  std::vector<SampledToken> forward_sample(std::span<const SeqChunk> chunks,
                                           std::span<const SampleSpec> specs) override {
    check_sample_call(chunks, specs);
    return on_every_shard(chunks, [&](Backend& b) { return b.forward_sample(chunks, specs); });
  }

 private:
  int size() const { return static_cast<int>(shards_.size()); }
  // A bad batch is refused before any shard starts: none waits at an all-reduce for one that
  // threw.
  template <class Call>
  std::invoke_result_t<Call&, Backend&> on_every_shard(std::span<const SeqChunk> chunks,
                                                       Call call) {
    check_chunks(config(), chunks, n_slots(), in_use_);
    std::invoke_result_t<Call&, Backend&> rank0;
    threads_.run(std::vector<bool>(shards_.size(), true), [&](size_t r) {
      auto got = call(*shards_[r]);
      if (r == 0) rank0 = std::move(got);
    });
    return rank0;
  }
  // The cache arrays with a KV-head dimension, with their inner sizes.
  template <class Fn>
  void each_array(cpu::LayerCache& whole, cpu::LayerCache& part, Fn fn) const {
    const size_t d = shard_.head_dim, pd = size_t(shard_.fma_rank) * d;
    fn(whole.fine_k, part.fine_k, d);  // [pos][n_kv][d]: the states' FineOrder::File
    fn(whole.fine_v, part.fine_v, d);
    fn(whole.sum_k, part.sum_k, pd);
    fn(whole.sum_v, part.sum_v, pd);
    fn(whole.acc_k, part.acc_k, pd);
    fn(whole.acc_v, part.acc_v, pd);
  }

  std::shared_ptr<const Model> model_;
  Config shard_;
  std::vector<std::unique_ptr<Communicator>> comms_;
  std::vector<std::unique_ptr<Backend>> shards_;
  std::vector<bool> in_use_;
  DeviceThreads threads_;  // last: its threads stop before the shards go
};

}  // namespace

std::unique_ptr<Backend> make_tensor_parallel_backend(std::shared_ptr<const Model> model,
                                                      const BackendOptions& opts) {
  const int n = opts.tensor_parallel;
  if (n <= 0) throw Error("tensor_parallel must be 0 (off) or positive");
  shard_config(model->config(), n);  // throws naming what does not divide
  if (!opts.devices.empty() && int(opts.devices.size()) != n)
    throw Error("tensor parallel " + std::to_string(n) + ": give " + std::to_string(n) +
                " devices, one per shard, or none (devices 0 to " + std::to_string(n - 1) + ")");
  std::vector<int> devices = opts.devices;
  for (int r = int(devices.size()); r < n; ++r) devices.push_back(r);
  const bool gpu = opts.kind != "cpu" && cuda_device_count() > 0;
  if (opts.kind == "cuda" && !gpu)
    throw Error(
        "backend 'cuda' asked for, but this build has no CUDA backend or no GPU is present");
  std::vector<std::unique_ptr<Communicator>> comms;
  std::vector<std::unique_ptr<Backend>> shards;
  if (!gpu) {
    comms = make_thread_communicators(n);
    for (auto& c : comms) shards.push_back(
          make_cpu_shard(model, opts.n_slots, opts.n_threads, CpuProducts::of(opts), *c));
  } else {
#if defined(MULTIPOLE_HAVE_CUDA) && defined(MULTIPOLE_HAVE_NCCL)
    for (int d : devices)
      if (d >= cuda_device_count())
        throw Error("tensor parallel: CUDA device " + std::to_string(d) + " does not exist (" +
                    std::to_string(cuda_device_count()) + " present)");
    comms = make_nccl_communicators(devices);
    const int64_t ctx = opts.max_context > 0 ? opts.max_context : model->config().n_ctx_train;
    for (int r = 0; r < n; ++r)
      shards.push_back(make_cuda_shard(model, opts.n_slots, ctx, devices[r], *comms[r]));
#else
    throw Error(
        "tensor parallelism on GPUs needs NCCL, and this build has none (configure with "
        "-DNCCL_ROOT=... pointing at nccl.h and libnccl); --backend cpu runs it on the CPU");
#endif
  }
  return std::make_unique<TensorParallelBackend>(
      std::move(model), std::move(comms), std::move(shards),
      gpu ? DeviceThreads::kGpuSpin : std::chrono::microseconds{});
}

}  // namespace mp
