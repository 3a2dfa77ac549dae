// GPU benchmarks of the CUDA backend: the FMA attention kernels alone (prefill and decode step)
// and the default model end to end, with the engine's exact-attention mode as the baseline in
// the same run. Prints markdown tables. usage: bench_cuda MODEL.gguf [--quick]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>

#include <cuda_profiler_api.h>

#include "attention_rig.h"
#include "backend_cpu.h"
#include "backend_cuda.h"
#include "fma_cpu.h"
#include "fma_cuda.cuh"
#include "sampling_cuda.cuh"
#include "format.h"

using namespace mp;
using mp::testing::attention_config;
using mp::testing::AttentionRig;

namespace {

constexpr double kCopyBandwidth =
    2.96e12;  // bytes/s, H100 device copy measured here (docs/PERF.md)
constexpr double kH200Bandwidth = 4.8e12;  // bytes/s, the H200's HBM3e (datasheet)

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

void bench_prefill_attention(bool quick) {
  std::printf(
      "\n## FMA prefill attention (batch 1, 16 heads, d 64, m 64, p 4; q/k/v/o fp32 in "
      "memory)\n\n");
  std::printf(
      "summaries: one pass (bf16 products on tensor cores), against the per-level kernels "
      "(fp32, the reference) in the same run\n\n");
  std::printf(
      "| n | L | attention ms (tensor cores) | attention ms (fp32 tile) | summaries ms (one pass) "
      "| summaries ms (per level) | one pass speedup | **attention + summaries ms** | GB/s (q,k,v,o "
      "f32, attention) | floor ms f32 | floor ms bf16 |\n"
      "|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (int64_t n : {4096, 16384, 65536, 262144, 1048576}) {
    if (quick && n > 65536) break;
    AttentionRig rig(attention_config(n), 1, static_cast<int>(n), 0);
    rig.summaries();
    const double tc_ms = time_ms([&] { rig.attend(true); }, 5);
    const double tile_ms = time_ms([&] { rig.attend(false); }, 3);
    const double sum_ms = time_ms([&] { rig.summaries(); }, 5);
    rig.plan_summaries(cuda::SummaryKernels::PerLevel);
    const double ref_ms = time_ms([&] { rig.summaries(); }, 3);
    const double bytes = 4.0 * n * 16 * 64 * 4;
    std::printf("| %lld | %d | %.3f | %.3f | %.3f | %.3f | %.1fx | %.3f | %.0f | %.3f | %.3f |\n",
                (long long)n, attention_config(n).n_levels(), tc_ms, tile_ms, sum_ms, ref_ms,
                ref_ms / sum_ms, tc_ms + sum_ms, bytes / tc_ms / 1e6, bytes / kCopyBandwidth * 1e3,
                bytes / 2 / kCopyBandwidth * 1e3);
    std::fflush(stdout);
  }
}

// The 1M-token prefill's summaries (one pass) and attention (tensor cores), each launched once and
// nothing timed: what a profiler looks at without timing every size of the table above
// (ncu -o FILE -k regex:'one_pass|attention' bench_cuda MODEL --profile-1m).
void profile_prefill_1m() {
  AttentionRig rig(attention_config(1 << 20), 1, 1 << 20, 0);
  rig.summaries();
  rig.attend(true);
  cuda::check(cudaDeviceSynchronize(), "profile run");
  std::printf("ran the one-pass summaries and the tensor-core attention at n = 1M, once each\n");
}

void bench_decode_attention() {
  std::printf("\n## FMA decode attention step (one new token per sequence; n = 1M, L = 13)\n\n");
  std::printf(
      "one layer's attention and cache update, in the same run: summaries by the per-level "
      "kernels (the reference) or the one-pass kernel, then attention and commit; or attention "
      "and append_tokens (what decode steps run)\n\n");
  std::printf(
      "| context | batch | per level ms | one pass ms | **append_tokens ms** | per level / "
      "append_tokens |\n|---|---|---|---|---|---|\n");
  const Config c = attention_config(1 << 20);
  for (int64_t ctx : {1024, 4096, 65536, 1 << 20})
    for (int batch : {1, 16, 256}) {
      AttentionRig rig(c, batch, 1, ctx, cuda::SummaryKernels::PerLevel);
      const double per_level = time_ms([&] { rig.run(); }, 20);
      rig.plan_summaries(cuda::SummaryKernels::OnePass);
      const double one_pass = time_ms([&] { rig.run(); }, 20);
      rig.plan_summaries(cuda::SummaryKernels::Auto);
      const double append = time_ms([&] { rig.run(); }, 20);
      std::printf("| %lld | %d | %.4f | %.4f | %.4f | %.2fx |\n", (long long)ctx, batch, per_level,
                  one_pass, append, per_level / append);
      std::fflush(stdout);
    }
}

// Exact attention's decode step at kernel level (the default model's attention: 6 heads on 2 KV
// heads, d 64): the reference kernel (a block per (sequence, head)) against the split kernel
// (flash-decoding), and the split kernel's floor: reading every cached key and value once.
void bench_exact_decode_attention() {
  std::printf(
      "\n## Exact-attention decode step (one layer, 6 heads on 2 KV heads, d 64, fp32 KV cache)"
      "\n\n| context | batch | splits | reference ms | **split ms** | reference / split | split "
      "GB/s | floor ms at 4.8 TB/s |\n|---|---|---|---|---|---|---|---|\n");
  for (int64_t ctx : {1024, 4096, 16384})
    for (int batch : {1, 16, 256}) {
      if (ctx * batch > 4096 * 256) continue;  // the random cache is filled on the host
      Config c = attention_config(4096, 2);  // (the trained length plays no part)
      c.fma_enabled = false;
      c.n_heads = 6, c.hidden_size = 6 * 64;
      AttentionRig rig(c, batch, 1, ctx - 1);
      const double ref = time_ms([&] { rig.attend(false); }, 20);
      const double split = time_ms([&] { rig.attend(true); }, 20);
      const double bytes = 2.0 * batch * ctx * c.n_kv_heads * c.head_dim * 4;
      std::printf("| %lld | %d | %d | %.4f | %.4f | %.2fx | %.0f | %.4f |\n", (long long)ctx, batch,
                  cuda::decode_splits(rig.shape, rig.cv.cap, batch), ref, split, ref / split,
                  bytes / split / 1e6, bytes / kH200Bandwidth * 1e3);
      std::fflush(stdout);
    }
}

// A copy of the model file with FMA switched off: the same weights in exact attention.
std::string write_exact_copy(const std::string& path) {
  auto m = Model::load(path);
  Config c = m->config();
  c.fma_enabled = false;
  auto kv = config_to_gguf(c);
  kv[kTokenizerKey] = gguf::Value::bytes(m->tokenizer().model_bytes());
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

// Token ids of a random prompt (past the first three, the special ones).
std::vector<int> random_ids(const Config& c, size_t n, std::mt19937& rng) {
  std::vector<int> v(n);
  for (auto& x : v) x = 3 + int(rng() % (c.vocab_size - 3));
  return v;
}

constexpr int64_t kPromptChunk = 65536;  // prompts are read in chunks of this many tokens

// Tokens of context before the decode steps (`--context N`, default 1,000). An FMA step at
// position i >= m reads m + i mod m fine keys (blocks b-1 and b), 1.5m on average over a long
// generation: for m = 1,024, --context 4608 puts the 200 steps at 1,536-1,736 of them, while
// 4096 or 8192 (block starts) put them at 1,024-1,224, as ~1,000 does.
int decode_context = 1000;

// `batch` sequences at decode_context tokens of context, ready for decode steps sampled on the GPU.
struct DecodeSteps {
  std::unique_ptr<Backend> b;
  std::vector<int> slots, next;
  std::vector<SeqChunk> step;
  std::vector<SampleSpec> specs;

  DecodeSteps(std::shared_ptr<const Model> model, int batch, const SamplingParams& sp,
              cuda::SummaryKernels kernels, cuda::Launches launches)
      : b(make_cuda_backend(model, batch, std::max(2048, decode_context + 1024), 0, kernels,
                            cuda::Q8Products::Auto, launches)),
        next(batch, 5),
        specs(batch) {
    const Config& c = model->config();
    std::mt19937 rng(2);
    std::vector<std::vector<int>> prompts;
    std::vector<SeqChunk> pre;
    for (int i = 0; i < batch; ++i) {
      slots.push_back(b->alloc_slot());
      prompts.push_back(random_ids(c, decode_context, rng));
    }
    for (int i = 0; i < batch; ++i) pre.push_back({slots[i], prompts[i], false});
    // Prefilled in calls of at most kPromptChunk tokens (as many whole prompts as fit).
    const size_t per_call = std::max<size_t>(1, kPromptChunk / decode_context);
    for (size_t i = 0; i < pre.size(); i += per_call)
      b->forward(std::span<const SeqChunk>(pre).subspan(i, std::min(per_call, pre.size() - i)));
    for (int i = 0; i < batch; ++i) {
      step.push_back({slots[i], std::span<const int>(&next[i], 1), false});
      specs[i] = {&sp, {}, 0.5, 0};
    }
    run();  // captures the step's graph
  }
  void run() {
    const auto sampled = b->forward_sample(step, specs);
    for (size_t i = 0; i < next.size(); ++i) next[i] = sampled[i].token;
  }
};

// Decode steps of each batch size; returns their tokens/s. kernels: the backend's summaries
// (PerLevel: the reference), launches: the decode step's (Serial: the reference).
std::vector<double> bench_decode(std::shared_ptr<const Model> model, const std::vector<int>& batches,
                                 const SamplingParams& sp, const char* mode,
                                 cuda::SummaryKernels kernels = cuda::SummaryKernels::Auto,
                                 cuda::Launches launches = cuda::Launches::Overlapped) {
  std::vector<double> rates;
  const Config& c = model->config();
  std::printf(
      "\n| decode batch | context | tokens/s (aggregate) | ms per step |\n|---|---|---|---|\n");
  for (int batch : batches) {
    DecodeSteps d(model, batch, sp, kernels, launches);
    const int steps = 200;
    const auto t0 = std::chrono::steady_clock::now();
    for (int s = 0; s < steps; ++s) d.run();
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    rates.push_back(batch * steps / sec);
    std::printf("| %d | ~%d | %.0f | %.3f |\n", batch, decode_context, rates.back(),
                sec / steps * 1e3);
    std::fflush(stdout);
    if (batch == 1) {
      const double kv_exact = 2.0 * c.n_layers * c.n_kv_heads * c.head_dim * 2 * (1 << 20);
      std::printf(
          "\nstate per sequence: %.1f KiB (%s), exact attention's bf16 KV cache at 1M "
          "tokens: %.1f MiB\n\n",
          d.b->slot_bytes(d.slots[0]) / 1024.0, mode, kv_exact / 1048576.0);
    }
  }
  return rates;
}

// The API's default sampling (temperature 0.8 alone): what --decode and --profile-decode time.
SamplingParams api_sampling() {
  SamplingParams p;
  p.temperature = 0.8f, p.top_k = 0, p.top_p = 1.0f, p.min_p = 0.0f;
  return p;
}

// The sampling kernel alone on random logits (vocabulary 16,384, the default model's), for the
// samplers users ask for, against greedy (one pass over the row: the floor) in the same run.
void bench_sampling() {
  std::printf(
      "\n## Sampling kernel (vocabulary 16,384; random logits, N(0, s^2); us a call)\n\n"
      "| sampler | s | 1 row | 256 rows | 1 row / greedy |\n|---|---|---|---|---|\n");
  const int V = 16384, R = 256;
  struct Case {
    const char* name;
    SamplingParams p;
  };
  std::vector<Case> cases(5);
  cases[0].name = "greedy", cases[0].p.temperature = 0;
  cases[1].name = "temperature 0.8 (the API's default)";
  cases[1].p = api_sampling();
  cases[2].name = "top-k 40";
  cases[2].p = cases[1].p, cases[2].p.top_k = 40;
  cases[3].name = "top-p 0.95";
  cases[3].p = cases[1].p, cases[3].p.top_p = 0.95f;
  cases[4].name = "top-k 40, top-p 0.95, min-p 0.05 (the CLI's default)";
  cuda::DeviceArray<float> logits(size_t(R) * V), lps(R);
  cuda::DeviceArray<int> tokens(R);
  cuda::DeviceArray<cuda::SampleRow> rows(R);
  cuda::DeviceArray<int2> pens(1);
  cuda::Sampler sampler;
  std::mt19937 rng(3);
  for (float scale : {2.5f, 5.0f}) {
    std::normal_distribution<float> normal(0.0f, scale);
    std::vector<float> host(size_t(R) * V);
    for (auto& x : host) x = normal(rng);
    logits.upload(host, nullptr);
    double greedy1 = 0;
    for (const Case& c : cases) {
      std::vector<cuda::SampleRow> hr;
      std::uniform_real_distribution<double> unif(0, 1);
      for (int r = 0; r < R; ++r) hr.push_back({r, c.p, 0, 0, unif(rng)});
      rows.upload(hr, nullptr);
      double us[2];
      for (int k = 0; k < 2; ++k) {
        const std::span<const cuda::SampleRow> some(hr.data(), k == 0 ? 1 : R);
        auto call = [&] {
          sampler.sample(logits.get(), V, some, rows.get(), pens.get(), tokens.get(), lps.get(),
                         nullptr);
        };
        us[k] = 1e3 * time_ms(call, 50);
      }
      if (c.p.temperature == 0) greedy1 = us[0];
      std::printf("| %s | %.1f | %.1f | %.1f | %.1fx |\n", c.name, scale, us[0], us[1],
                  us[0] / greedy1);
      std::fflush(stdout);
    }
  }
}

// One decode step of `batch` sequences between cudaProfilerStart and Stop (for ncu
// --profile-from-start off), after warm-up steps.
void profile_decode(std::shared_ptr<const Model> model, int batch) {
  const SamplingParams sp = api_sampling();
  DecodeSteps d(std::move(model), batch, sp, cuda::SummaryKernels::Auto,
                cuda::Launches::Overlapped);
  for (int s = 0; s < 5; ++s) d.run();
  cuda::check(cudaProfilerStart(), "cudaProfilerStart");
  d.run();
  cuda::check(cudaProfilerStop(), "cudaProfilerStop");
  std::printf("ran one decode step of batch %d under the profiler\n", batch);
}

// Decode tokens/s of the model and of its exact-attention copy at the same batches and context,
// and their ratio, in one table.
void print_exact_against_fma(const std::vector<int>& batches, const std::vector<double>& fma,
                             const std::vector<double>& exact) {
  std::printf(
      "\n## Decode, FMA against exact attention (same weights, context ~1,000-1,050)\n\n"
      "| decode batch | FMA tokens/s | exact tokens/s | exact / FMA |\n|---|---|---|---|\n");
  for (size_t i = 0; i < batches.size(); ++i)
    std::printf("| %d | %.0f | %.0f | %.3f |\n", batches[i], fma[i], exact[i], exact[i] / fma[i]);
}

// The last chunk of a 1M-token prompt between cudaProfilerStart and Stop (ncu
// --profile-from-start off: each kernel of one long-prompt chunk, at the deepest position).
void profile_prompt(const std::string& path) {
  auto model = Model::load(path);
  auto b = make_backend(model, {.kind = "cuda", .n_slots = 1, .max_context = 20000});
  std::mt19937 rng(1);
  const auto ids = random_ids(model->config(), size_t(1) << 20, rng);
  const int slot = b->alloc_slot();
  for (int64_t i = 0; i < int64_t(ids.size()); i += kPromptChunk) {
    const SeqChunk ch{slot, std::span<const int>(ids).subspan(i, kPromptChunk), false};
    const bool last = i + kPromptChunk == int64_t(ids.size());
    if (last) cuda::check(cudaProfilerStart(), "cudaProfilerStart");
    b->forward({&ch, 1});
    if (last) cuda::check(cudaProfilerStop(), "cudaProfilerStop");
  }
  std::printf("ran the last %lld-token chunk of a 1M-token prompt under the profiler\n",
              (long long)kPromptChunk);
}

// Prefill and decode tables of the model; returns the decode tokens/s at kEndToEndBatches.
const std::vector<int> kEndToEndBatches = {1, 16, 64, 256};
// The prefill table: prompts of 1K to 1M tokens (16K in exact attention, 64K quick) read in
// chunks of 64K; returns the model.
std::shared_ptr<Model> bench_prompts(const std::string& path, bool exact, bool quick) {
  auto model = Model::load(path);
  const Config& c = model->config();
  const char* mode = exact ? "exact attention" : "FMA";
  std::printf("\n## End to end, default model, %s (%s)\n\n", mode, c.summary().c_str());
  std::printf("| prompt tokens | prefill s | prefill tokens/s |\n|---|---|---|\n");
  std::mt19937 rng(1);
  const int64_t max_prompt = exact ? 16384 : (quick ? 65536 : (1 << 20));
  {
    auto b = make_backend(model, {.kind = "cuda", .n_slots = 1, .max_context = 20000});
    for (int64_t n : {1024, 16384, 131072, 1 << 20}) {
      if (n > max_prompt) break;
      const auto ids = random_ids(c, n, rng);
      const int slot = b->alloc_slot();
      const auto t0 = std::chrono::steady_clock::now();
      for (int64_t i = 0; i < n; i += kPromptChunk) {
        SeqChunk ch{slot,
                    std::span<const int>(ids).subspan(i, std::min<int64_t>(kPromptChunk, n - i)),
                    false};
        b->forward({&ch, 1});
      }
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("| %lld | %.3f | %.0f |\n", (long long)n, s, n / s);
      std::fflush(stdout);
      b->free_slot(slot);
    }
  }
  return model;
}

std::vector<double> bench_end_to_end(const std::string& path, bool exact, bool quick) {
  const auto model = bench_prompts(path, exact, quick);
  const char* mode = exact ? "exact attention" : "FMA";
  // The CLI's default sampling (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05), on the GPU.
  return bench_decode(model, kEndToEndBatches, SamplingParams{}, mode);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr,
                 "usage: bench_cuda MODEL.gguf [--quick | --prefill-kernels | --decode-kernels |\n"
                 "                              --prompts | --profile-1m | --profile-decode B |\n"
                 "                              --profile-prompt |\n"
                 "                              --sampling |\n"
                 "                              --decode B,B,... | --decode-cli B,B,...\n"
                 "                              [--baseline BASE.gguf | --context N] |\n"
                 "                              --exact B,B,...]\n"
                 "  --prefill-kernels, --decode-kernels: only the attention kernels' tables\n"
                 "  --prompts: only the model's prefill table (prompts of 1K to 1M tokens)\n"
                 "  --profile-1m: the 1M-token prefill's summaries and attention launched once\n"
                 "                each, untimed (for ncu)\n"
                 "  --sampling: the sampling kernel alone, for several samplers\n"
                 "  --profile-decode: one decode step of batch B between cudaProfilerStart and\n"
                 "                    Stop (ncu --profile-from-start off)\n"
                 "  --profile-prompt: the last 64K-token chunk of a 1M-token prompt between\n"
                 "                    cudaProfilerStart and Stop (ncu --profile-from-start off)\n"
                 "  --exact: decode steps at those batch sizes on MODEL and on its exact-attention\n"
                 "           copy (same weights, same sampling as --decode), and their ratio\n"
                 "  --decode: only decode steps at those batch sizes, sampled as the server's API\n"
                 "            defaults with temperature 0.8 (top-k, top-p, min-p off), with the\n"
                 "            step's kernels launched one after another (the reference) and\n"
                 "            overlapped (the default)\n"
                 "  --decode-cli: as --decode, sampled as the CLI's defaults (top-k 40, top-p\n"
                 "                0.95, min-p 0.05: the sampling of the full run's decode table)\n"
                 "  --baseline: the same steps on another file (e.g. MODEL's bf16 source of a\n"
                 "              q8_0 MODEL) first, and the ratio\n"
                 "  --context N: decode (and --exact, --profile-decode) after N tokens of\n"
                 "               context (default 1000; at most 65536)\n");
    return 2;
  }
  const bool quick = argc > 2 && std::strcmp(argv[2], "--quick") == 0;
  const bool kernels_only = argc > 2 && std::strcmp(argv[2], "--prefill-kernels") == 0;
  const bool decode_kernels = argc > 2 && std::strcmp(argv[2], "--decode-kernels") == 0;
  const bool prompts_only = argc > 2 && std::strcmp(argv[2], "--prompts") == 0;
  try {
    if (!cuda_available()) throw Error("no CUDA device");
    cudaDeviceProp prop;
    cudaGetDeviceProperties(&prop, 0);
    std::printf("# Multipole CUDA benchmarks on %s\n", prop.name);
    if (argc > 5 && std::strcmp(argv[4], "--context") == 0) {
      decode_context = std::atoi(argv[5]);
      if (decode_context < 1 || decode_context > kPromptChunk)
        throw Error("--context: 1 to 65536 tokens");
    }
    const bool exact_decode = argc > 3 && std::strcmp(argv[2], "--exact") == 0;
    const bool cli_decode = argc > 3 && std::strcmp(argv[2], "--decode-cli") == 0;
    if (argc > 3 && (std::strcmp(argv[2], "--decode") == 0 || exact_decode || cli_decode)) {
      std::vector<int> batches;
      for (const char* p = argv[3]; *p;) {
        char* end;
        batches.push_back(static_cast<int>(std::strtol(p, &end, 10)));
        p = *end == ',' ? end + 1 : end;
        if (batches.back() <= 0) throw Error("--decode: batch sizes must be positive");
      }
      const SamplingParams sampling = cli_decode ? SamplingParams{} : api_sampling();
      if (exact_decode) {
        std::printf("\n## FMA\n");
        const auto fma = bench_decode(Model::load(argv[1]), batches, sampling, "FMA");
        std::printf("\n## Exact attention\n");
        const auto exact = bench_decode(Model::load(write_exact_copy(argv[1])), batches, sampling,
                                        "exact attention");
        print_exact_against_fma(batches, fma, exact);
        return 0;
      }
      if (argc > 5 && std::strcmp(argv[4], "--baseline") == 0) {
        std::printf("\n## Baseline %s\n", argv[5]);
        const auto base = bench_decode(Model::load(argv[5]), batches, sampling, "FMA");
        std::printf("\n## %s\n", argv[1]);
        const auto got = bench_decode(Model::load(argv[1]), batches, sampling, "FMA");
        std::printf("\n| decode batch | %s tokens/s | %s tokens/s | ratio |\n|---|---|---|---|\n",
                    argv[5], argv[1]);
        for (size_t i = 0; i < batches.size(); ++i)
          std::printf("| %d | %.0f | %.0f | %.2fx |\n", batches[i], base[i], got[i],
                      got[i] / base[i]);
        return 0;
      }
      // The baseline in the same run: the step's kernels launched one after another.
      auto model = Model::load(argv[1]);
      std::printf("\n## Serial launches (the reference)\n");
      const auto base = bench_decode(model, batches, sampling, "FMA", cuda::SummaryKernels::Auto,
                                     cuda::Launches::Serial);
      std::printf("\n## Overlapped launches (the default)\n");
      const auto got = bench_decode(model, batches, sampling, "FMA");
      std::printf(
          "\n| decode batch | serial tokens/s | overlapped tokens/s | ratio |\n"
          "|---|---|---|---|\n");
      for (size_t i = 0; i < batches.size(); ++i)
        std::printf("| %d | %.0f | %.0f | %.3fx |\n", batches[i], base[i], got[i],
                    got[i] / base[i]);
      return 0;
    }
    if (prompts_only) {
      bench_prompts(argv[1], false, false);
      return 0;
    }
    if (argc > 2 && std::strcmp(argv[2], "--profile-1m") == 0) {
      profile_prefill_1m();
      return 0;
    }
    if (argc > 2 && std::strcmp(argv[2], "--profile-prompt") == 0) {
      profile_prompt(argv[1]);
      return 0;
    }
    if (argc > 2 && std::strcmp(argv[2], "--sampling") == 0) {
      bench_sampling();
      return 0;
    }
    if (argc > 3 && std::strcmp(argv[2], "--profile-decode") == 0) {
      profile_decode(Model::load(argv[1]), std::max(1, std::atoi(argv[3])));
      return 0;
    }
    if (!decode_kernels) bench_prefill_attention(quick);
    if (kernels_only) return 0;
    bench_decode_attention();
    bench_exact_decode_attention();
    if (decode_kernels) return 0;
    const auto fma = bench_end_to_end(argv[1], false, quick);
    const auto exact = bench_end_to_end(write_exact_copy(argv[1]), true, quick);
    print_exact_against_fma(kEndToEndBatches, fma, exact);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
