// One layer's FMA attention on the GPU at kernel level (summaries, accumulators, attention) for
// a batch of chunks over random caches and weights: shared by the GPU tests and bench_cuda.
#pragma once

#include <algorithm>
#include <vector>

#include "fma_cpu.h"
#include "fma_cuda.cuh"
#include "random_cuda.h"

namespace mp::testing {

// The attention benchmark's shape (16 heads, d 64, m 64, p 4) at trained length n.
inline Config attention_config(int64_t n, int kv_heads = 16) {
  Config c;
  c.vocab_size = 8;
  c.hidden_size = 16 * 64;
  c.n_layers = 1;
  c.n_heads = 16;
  c.n_kv_heads = kv_heads;
  c.head_dim = 64;
  c.intermediate_size = 8;
  c.n_ctx_train = n;
  c.fma_block_size = 64;
  c.fma_rank = 4;
  c.bos_token_id = c.eos_token_id = 0;
  c.validate();
  return c;
}

class AttentionRig {
 public:
  Config c;
  int batch;
  cuda::FmaShape shape{};
  cuda::CacheView cv{};
  cuda::Downsamplers ds{};
  cuda::BatchPlan plan;
  cuda::ChunkDesc* chunks;
  cuda::NewGroups* table;
  cuda::SumItem *done, *filling;
  cuda::AttnItem* attn;
  cuda::CommitItem* commits;
  float *q, *k, *v, *out, *new_k, *new_v;
  float* scratch = nullptr;  // decode steps: the splits' tickets and partial results

  // `batch` chunks of `tokens_each` tokens, chunk b at position pos0 + b * pos_step of its own
  // slot b, their summaries by `kernels`. Exact attention (cfg.fma_enabled off): the fine cache
  // holds every position up to the last chunk's end.
  AttentionRig(const Config& cfg, int batch, int tokens_each, int64_t pos0,
               cuda::SummaryKernels kernels = cuda::SummaryKernels::Auto, int64_t pos_step = 0)
      : c(cfg), batch(batch), tokens_each_(tokens_each), pos0_(pos0), pos_step_(pos_step) {
    const int L = c.n_levels(), d = c.head_dim, kv = c.n_kv_heads;
    const size_t pd = size_t(c.fma_rank) * d;
    shape = cuda::make_shape(c);
    const int64_t cap = c.fma_enabled ? 2 * c.fma_block_size
                                      : pos0 + (batch - 1) * pos_step + tokens_each;
    cv.cap = cap;  // fine_floats() below reads it
    cv = {alloc<__nv_bfloat16>(fine_floats()),
          alloc<__nv_bfloat16>(fine_floats()),
          alloc<float>(ring_floats()),
          alloc<float>(ring_floats()),
          alloc<float>(accumulator_floats()),
          alloc<float>(accumulator_floats()),
          cap,
          c.fma_enabled};
    std::vector<const float*> ptrs(4 * L);
    const size_t in = c.fma_downsampling == Downsampling::Conv ? d : 1;  // inputs an output reads
    for (int l = 1; l <= L; ++l)
      for (int which = 0; which < 2; ++which) {
        const uint32_t seed = 100 + 4 * l + 2 * which;
        const std::vector<float> w = normal_host(pd * c.group_size(l) * in, seed, 0.05f),
                                 b = normal_host(pd, seed + 1, 0.05f);
        const cpu::Downsampler dsm = cpu::make_downsampler(c, l, which == 0, w, b);
        ptrs[(2 * which) * L + l - 1] = copy(dsm.weight);
        ptrs[(2 * which + 1) * L + l - 1] = copy(dsm.bias);
        if (l <= cuda::kOnePassLevels)
          (which == 0 ? ds.tk : ds.tv)[l - 1] = copy(cuda::one_pass_taps(dsm, d));
      }
    const float* const* table_ptrs = copy(ptrs);
    ds.wk = table_ptrs, ds.bk = table_ptrs + L, ds.wv = table_ptrs + 2 * L,
    ds.bv = table_ptrs + 3 * L;
    plan_summaries(kernels);
    const size_t T = plan.T;
    q = random(T * c.n_heads * d, 8);
    k = random(T * kv * d, 9);
    v = random(T * kv * d, 10);
    out = alloc<float>(T * c.n_heads * d);
    new_k = alloc<float>(pool_floats());
    new_v = alloc<float>(pool_floats());
    if (plan.padded) {
      scratch = alloc<float>(cuda::decode_scratch_floats(shape, cap, int(plan.attn.size())));
      cuda::check(cudaMemset(scratch, 0, cuda::kDecodeTickets * sizeof(unsigned)), "tickets");
    }
  }
  ~AttentionRig() {
    for (void* p : owned_) cudaFree(p);
  }
  AttentionRig(const AttentionRig&) = delete;
  AttentionRig& operator=(const AttentionRig&) = delete;

  // Plans the chunks for `kernels` and gives the caches their first random values back (the
  // summaries and the cache updates change them), so that the kernels compare on the same inputs.
  void plan_summaries(cuda::SummaryKernels kernels) {
    std::vector<int> ids(tokens_each_, 0);
    std::vector<SeqChunk> sc;
    std::vector<int64_t> pos;
    for (int b = 0; b < batch; ++b) {
      sc.push_back({b, ids, false});
      pos.push_back(pos0_ + b * pos_step_);
    }
    cuda::make_plan(c, cv.cap, sc, pos, plan, kernels);
    chunks = copy(plan.chunks);
    table = copy(plan.table);
    done = copy(plan.done);
    filling = copy(plan.filling);
    attn = copy(plan.attn);
    commits = copy(plan.commits);
    fill_random(cv.fine_k, fine_floats(), 1);
    fill_random(cv.fine_v, fine_floats(), 2);
    fill_random(cv.sum_k, ring_floats(), 3);
    fill_random(cv.sum_v, ring_floats(), 4);
    fill_random(cv.acc_k, accumulator_floats(), 5);
    fill_random(cv.acc_v, accumulator_floats(), 6);
  }

  // The new summaries' pool cleared as the backend clears it, where blocks add into it; else
  // (its entries all the plan's new groups) filled with NaNs (0xff bytes), which show any entry
  // the kernels leave unwritten.
  void summaries() const {
    const int fill = plan.one_pass && !plan.split_chunks && plan.new_groups > 0 ? 0xff : 0;
    cuda::check(cudaMemsetAsync(new_k, fill, pool_floats() * 4), "memset");
    cuda::check(cudaMemsetAsync(new_v, fill, pool_floats() * 4), "memset");
    cuda::summaries(shape, cv, ds, plan, chunks, table, done, filling, k, v, new_k, new_v,
                    nullptr);
  }
  // The new summaries' pool (keys, values) and the accumulators (keys, values) after summaries().
  std::vector<std::vector<float>> summary_state() const {
    const size_t acc = accumulator_floats();
    std::vector<std::vector<float>> out;
    for (auto [p, n] : std::initializer_list<std::pair<const float*, size_t>>{
             {new_k, pool_floats()}, {new_v, pool_floats()}, {cv.acc_k, acc}, {cv.acc_v, acc}}) {
      out.emplace_back(n);
      cuda::check(cudaMemcpy(out.back().data(), p, n * 4, cudaMemcpyDeviceToHost), "download");
    }
    return out;
  }
  // out_bf16: a decode step's output rounded to bf16 there instead of `out`; fast false: the
  // reference kernels.
  void attend(bool fast = true, __nv_bfloat16* out_bf16 = nullptr) const {
    cuda::attention(shape, cv, chunks, table, attn, int(plan.attn.size()), plan.padded, q, k, v,
                    new_k, new_v, out, out_bf16, scratch, nullptr, fast);
  }
  // One layer's attention step as the backend runs it: summaries, attention and commit, or (a
  // decode step's plan.append) attention and append_tokens.
  void run() const {
    if (plan.append) {
      attend();
      cuda::append_tokens(shape, cv, ds, chunks, int(plan.chunks.size()), k, v, nullptr);
      return;
    }
    summaries();
    attend();
    cuda::commit(commits, int(plan.commits.size()), k, v, new_k, new_v, cv, nullptr);
  }
  // The caches after run(): fine keys and values (widened from bf16), summary rings,
  // accumulators.
  std::vector<std::vector<float>> cache_state() const {
    std::vector<std::vector<float>> out;
    for (const __nv_bfloat16* p : {cv.fine_k, cv.fine_v}) {
      std::vector<__nv_bfloat16> h(fine_floats());
      cuda::check(cudaMemcpy(h.data(), p, h.size() * 2, cudaMemcpyDeviceToHost), "download");
      out.emplace_back(h.size());
      for (size_t i = 0; i < h.size(); ++i) out.back()[i] = __bfloat162float(h[i]);
    }
    for (auto [p, n] : std::initializer_list<std::pair<const float*, size_t>>{
             {cv.sum_k, ring_floats()},
             {cv.sum_v, ring_floats()},
             {cv.acc_k, accumulator_floats()},
             {cv.acc_v, accumulator_floats()}}) {
      out.emplace_back(n);
      cuda::check(cudaMemcpy(out.back().data(), p, n * 4, cudaMemcpyDeviceToHost), "download");
    }
    return out;
  }
  std::vector<float> output() const {
    std::vector<float> h(size_t(plan.T) * c.n_heads * c.head_dim);
    cuda::check(cudaMemcpy(h.data(), out, h.size() * 4, cudaMemcpyDeviceToHost), "output");
    return h;
  }

 private:
  std::vector<void*> owned_;
  int tokens_each_;
  int64_t pos0_, pos_step_;

  size_t accumulator_floats() const {
    return size_t(batch) * c.n_levels() * c.n_kv_heads * c.fma_rank * c.head_dim;
  }
  size_t ring_floats() const { return 3 * accumulator_floats(); }
  size_t fine_floats() const { return size_t(batch) * cv.cap * c.n_kv_heads * c.head_dim; }

  size_t pool_floats() const {
    return size_t(std::max(1, plan.new_groups)) * c.n_kv_heads * c.fma_rank * c.head_dim;
  }
  template <class T>
  T* alloc(size_t n) {
    T* p = nullptr;
    cuda::check(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)), "cudaMalloc");
    owned_.push_back(p);
    return p;
  }
  template <class T>
  T* copy(const std::vector<T>& h) {
    T* p = alloc<T>(h.size());
    cuda::check(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), "copy");
    return p;
  }
  template <class T>
  void fill_random(T* p, size_t n, uint32_t seed) {
    fill_normal_device(p, n, seed);
    cuda::check(cudaDeviceSynchronize(), "fill");
  }
  // Host values from the device's generator (at n = 1M the weights are ~270M values).
  std::vector<float> normal_host(size_t n, uint32_t seed, float stddev) {
    float* p = nullptr;
    cuda::check(cudaMalloc(&p, std::max<size_t>(n, 1) * 4), "cudaMalloc");
    fill_normal_device(p, n, seed, stddev);
    std::vector<float> h(n);
    const cudaError_t e = cudaMemcpy(h.data(), p, n * 4, cudaMemcpyDeviceToHost);
    cudaFree(p);
    cuda::check(e, "copy");
    return h;
  }
  float* random(size_t n, uint32_t seed) {
    float* p = alloc<float>(n);
    fill_random(p, n, seed);
    return p;
  }
};

}  // namespace mp::testing
