// GPU benchmarks of the CUDA backend: the FMA attention kernels alone (prefill and decode step)
// and the default model end to end, with the engine's exact-attention mode as the baseline in
// the same run. Prints markdown tables. usage: bench_cuda MODEL.gguf [--quick]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>

#include "backend_cpu.h"
#include "fma_cpu.h"
#include "fma_cuda.cuh"
#include "format.h"

using namespace mp;

namespace {

constexpr double kCopyBandwidth =
    2.96e12;  // bytes/s, H100 device copy measured here (docs/PERF.md)

template <class T>
T* dev_alloc(size_t n) {
  T* p = nullptr;
  cuda::check(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)), "cudaMalloc");
  return p;
}
template <class T>
T* dev_copy(const std::vector<T>& h) {
  T* p = dev_alloc<T>(h.size());
  cuda::check(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), "copy");
  return p;
}
float* dev_random(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0, 1);
  std::vector<float> h(n);
  for (auto& x : h) x = nd(rng);
  return dev_copy(h);
}

// Median time in ms of `f` (a sequence of launches on the default stream).
template <class F>
double time_ms(F&& f, int reps) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  f();
  cuda::check(cudaDeviceSynchronize(), "warm-up");
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    cudaEventRecord(a);
    f();
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms;
    cudaEventElapsedTime(&ms, a, b);
    t.push_back(ms);
  }
  cuda::check(cudaGetLastError(), "timed run");
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

Config attention_config(int64_t n) {
  Config c;
  c.vocab_size = 8;
  c.hidden_size = 16 * 64;
  c.n_layers = 1;
  c.n_heads = c.n_kv_heads = 16;
  c.head_dim = 64;
  c.intermediate_size = 8;
  c.n_ctx_train = n;
  c.fma_block_size = 64;
  c.fma_rank = 4;
  c.bos_token_id = c.eos_token_id = 0;
  c.validate();
  return c;
}

// One layer's FMA attention (summaries, accumulators, attention) for a batch, kernel level.
struct AttentionRig {
  Config c;
  cuda::FmaShape shape{};
  cuda::CacheView cv{};
  cuda::Downsamplers ds{};
  cuda::BatchPlan plan;
  cuda::ChunkDesc* chunks;
  cuda::NewGroups* table;
  cuda::SumItem *done, *filling;
  cuda::AttnItem* attn;
  float *q, *k, *v, *out, *new_k, *new_v;

  AttentionRig(const Config& cfg, int batch, int tokens_each, int64_t pos0) : c(cfg) {
    const int L = c.n_levels(), d = c.head_dim, kv = c.n_kv_heads;
    const size_t pd = size_t(c.fma_rank) * d;
    shape = {c.n_heads, kv, d, c.fma_block_size, c.fma_rank, L, true, true, false, 1};
    const int64_t cap = 2 * c.fma_block_size;
    cv = {dev_random(batch * cap * kv * d, 1),
          dev_random(batch * cap * kv * d, 2),
          dev_random(batch * L * 3 * kv * pd, 3),
          dev_random(batch * L * 3 * kv * pd, 4),
          dev_random(batch * L * kv * pd, 5),
          dev_random(batch * L * kv * pd, 6),
          cap,
          true};
    std::vector<const float*> ptrs(4 * L);
    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0, 0.05f);
    for (int l = 1; l <= L; ++l)
      for (int which = 0; which < 2; ++which) {
        std::vector<float> w(pd * c.group_size(l)), b(pd);
        for (auto& x : w) x = nd(rng);
        for (auto& x : b) x = nd(rng);
        const cpu::Downsampler dsm = cpu::make_downsampler(c, l, w, b);
        ptrs[(2 * which) * L + l - 1] = dev_copy(dsm.weight);
        ptrs[(2 * which + 1) * L + l - 1] = dev_copy(dsm.bias);
      }
    const float* const* table_ptrs = dev_copy(ptrs);
    ds = {table_ptrs, table_ptrs + L, table_ptrs + 2 * L, table_ptrs + 3 * L};
    std::vector<int> ids(tokens_each, 0);
    std::vector<SeqChunk> sc;
    for (int b = 0; b < batch; ++b) sc.push_back({b, ids, false});
    plan = cuda::make_plan(c, cap, sc, std::vector<int64_t>(batch, pos0));
    chunks = dev_copy(plan.chunks);
    table = dev_copy(plan.table);
    done = dev_copy(plan.done);
    filling = dev_copy(plan.filling);
    attn = dev_copy(plan.attn);
    const size_t T = plan.T;
    q = dev_random(T * c.n_heads * d, 8);
    k = dev_random(T * kv * d, 9);
    v = dev_random(T * kv * d, 10);
    out = dev_alloc<float>(T * c.n_heads * d);
    new_k = dev_alloc<float>(std::max(1, plan.new_groups) * kv * pd);
    new_v = dev_alloc<float>(std::max(1, plan.new_groups) * kv * pd);
  }
  void summaries() const {
    const size_t pool =
        size_t(std::max(1, plan.new_groups)) * c.n_kv_heads * c.fma_rank * c.head_dim;
    cuda::check(cudaMemsetAsync(new_k, 0, pool * 4), "memset");
    cuda::check(cudaMemsetAsync(new_v, 0, pool * 4), "memset");
    cuda::summarize(shape, cv, ds, chunks, table, done, int(plan.done.size()), k, v, new_k, new_v,
                    nullptr);
    cuda::accumulate(shape, cv, ds, chunks, filling, int(plan.filling.size()), k, v, nullptr);
  }
  void attend() const {
    cuda::attention(shape, cv, chunks, table, attn, int(plan.attn.size()), plan.padded, q, k, v,
                    new_k, new_v, out, nullptr);
  }
  void run() const {
    summaries();
    attend();
  }
  // Nothing is freed: the process ends after the tables.
};

void bench_prefill_attention(bool quick) {
  std::printf("\n## FMA prefill attention (batch 1, 16 heads, d 64, m 64, p 4, fp32 q/k/v/o)\n\n");
  std::printf(
      "| n | L | time ms | of which summaries ms | GB/s (q,k,v,o f32) | floor ms f32 | floor ms "
      "bf16 |\n|---|---|---|---|---|---|---|\n");
  for (int64_t n : {4096, 16384, 65536, 262144, 1048576}) {
    if (quick && n > 65536) break;
    AttentionRig rig(attention_config(n), 1, static_cast<int>(n), 0);
    const double ms = time_ms([&] { rig.run(); }, 5);
    const double sum_ms = time_ms([&] { rig.summaries(); }, 5);
    const double bytes = 4.0 * n * 16 * 64 * 4;
    std::printf("| %lld | %d | %.3f | %.3f | %.0f | %.3f | %.3f |\n", (long long)n,
                rig.c.n_levels(), ms, sum_ms, bytes / ms / 1e6, bytes / kCopyBandwidth * 1e3,
                bytes / 2 / kCopyBandwidth * 1e3);
    std::fflush(stdout);
  }
}

void bench_decode_attention() {
  std::printf("\n## FMA decode attention step (one new token per sequence; n = 1M, L = 13)\n\n");
  std::printf("| context | batch 1 ms | batch 16 ms | batch 256 ms |\n|---|---|---|---|\n");
  const Config c = attention_config(1 << 20);
  for (int64_t ctx : {1024, 4096, 65536, 1 << 20}) {
    std::printf("| %lld |", (long long)ctx);
    for (int batch : {1, 16, 256}) {
      AttentionRig rig(c, batch, 1, ctx);
      std::printf(" %.4f |", time_ms([&] { rig.run(); }, 20));
    }
    std::printf("\n");
    std::fflush(stdout);
  }
}

// A copy of the model file with FMA switched off: the same weights in exact attention.
std::string write_exact_copy(const std::string& path) {
  auto m = Model::load(path);
  Config c = m->config();
  c.fma_enabled = false;
  auto kv = config_to_gguf(c);
  kv[kTokenizerKey] = gguf::Value::bytes([&] {
    // Re-read the embedded tokenizer from the source file's metadata.
    std::FILE* f = std::fopen(path.c_str(), "rb");
    std::fseek(f, 0, SEEK_END);
    std::vector<uint8_t> all(std::ftell(f));
    std::fseek(f, 0, SEEK_SET);
    if (std::fread(all.data(), 1, all.size(), f) != all.size()) throw Error("read failed");
    std::fclose(f);
    return gguf::parse(all.data(), all.size()).get_string(kTokenizerKey);
  }());
  std::vector<gguf::TensorOut> outs;
  for (const auto& spec : expected_tensors(c)) {
    const TensorView* t = &m->tensor(spec.name, spec.shape);
    outs.push_back({spec.name, spec.shape, t->dtype, [t](std::vector<uint8_t>& o) {
                      const auto* p = static_cast<const uint8_t*>(t->data);
                      o.insert(o.end(), p, p + t->nbytes());
                    }});
  }
  const std::string out = "/tmp/multipole-exact.gguf";
  gguf::write(out, kv, outs);
  return out;
}

void bench_end_to_end(const std::string& path, bool exact, bool quick) {
  auto model = Model::load(path);
  const Config& c = model->config();
  const char* mode = exact ? "exact attention" : "FMA";
  std::printf("\n## End to end, default model, %s (%s)\n\n", mode, c.summary().c_str());
  std::printf("| prompt tokens | prefill s | prefill tokens/s |\n|---|---|---|\n");
  std::mt19937 rng(1);
  auto random_ids = [&](size_t n) {
    std::vector<int> v(n);
    for (auto& x : v) x = 3 + int(rng() % (c.vocab_size - 3));
    return v;
  };
  const int64_t max_prompt = exact ? 16384 : (quick ? 65536 : (1 << 20));
  {
    auto b = make_backend(model, {.kind = "cuda", .n_slots = 1, .max_context = 20000});
    for (int64_t n : {1024, 16384, 131072, 1 << 20}) {
      if (n > max_prompt) break;
      const auto ids = random_ids(n);
      const int slot = b->alloc_slot();
      const auto t0 = std::chrono::steady_clock::now();
      for (int64_t i = 0; i < n; i += 65536) {
        SeqChunk ch{slot, std::span<const int>(ids).subspan(i, std::min<int64_t>(65536, n - i)),
                    false};
        b->forward({&ch, 1});
      }
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("| %lld | %.3f | %.0f |\n", (long long)n, s, n / s);
      std::fflush(stdout);
      b->free_slot(slot);
    }
  }
  std::printf(
      "\n| decode batch | context | tokens/s (aggregate) | ms per step |\n|---|---|---|---|\n");
  for (int batch : {1, 16, 64, 256}) {
    auto b = make_backend(model, {.kind = "cuda", .n_slots = batch, .max_context = 2048});
    std::vector<int> slots;
    std::vector<std::vector<int>> prompts;
    for (int i = 0; i < batch; ++i) {
      slots.push_back(b->alloc_slot());
      prompts.push_back(random_ids(1000));
    }
    std::vector<SeqChunk> pre;
    for (int i = 0; i < batch; ++i) pre.push_back({slots[i], prompts[i], false});
    b->forward(pre);
    std::vector<int> next(batch, 5);
    std::vector<SeqChunk> step;
    for (int i = 0; i < batch; ++i)
      step.push_back({slots[i], std::span<const int>(&next[i], 1), false});
    b->forward(step);
    const int steps = 50;
    const auto t0 = std::chrono::steady_clock::now();
    for (int s = 0; s < steps; ++s) {
      const auto logits = b->forward(step);
      for (int i = 0; i < batch; ++i)  // greedy, on the host
        next[i] = int(std::max_element(logits.begin() + size_t(i) * c.vocab_size,
                                       logits.begin() + size_t(i + 1) * c.vocab_size) -
                      (logits.begin() + size_t(i) * c.vocab_size));
    }
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("| %d | ~1000 | %.0f | %.3f |\n", batch, batch * steps / sec, sec / steps * 1e3);
    std::fflush(stdout);
    if (batch == 1) {
      const double kv_exact = 2.0 * c.n_layers * c.n_kv_heads * c.head_dim * 2 * (1 << 20);
      std::printf(
          "\nstate per sequence: %.1f KiB (%s), exact attention's bf16 KV cache at 1M "
          "tokens: %.1f MiB\n\n",
          b->slot_bytes(slots[0]) / 1024.0, mode, kv_exact / 1048576.0);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: bench_cuda MODEL.gguf [--quick | --prefill-kernels]\n");
    return 2;
  }
  const bool quick = argc > 2 && std::strcmp(argv[2], "--quick") == 0;
  const bool kernels_only = argc > 2 && std::strcmp(argv[2], "--prefill-kernels") == 0;
  try {
    if (!cuda_available()) throw Error("no CUDA device");
    cudaDeviceProp prop;
    cudaGetDeviceProperties(&prop, 0);
    std::printf("# Multipole CUDA benchmarks on %s\n", prop.name);
    bench_prefill_attention(quick || kernels_only);
    if (kernels_only) return 0;
    bench_decode_attention();
    bench_end_to_end(argv[1], false, quick);
    bench_end_to_end(write_exact_copy(argv[1]), true, quick);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
