#include <atomic>
#include <cub/block/block_scan.cuh>

#include "../engine/src/sampling.h"
#include "block_reduce.cuh"
#include "sampling_cuda.cuh"

namespace mp::cuda {
namespace {

constexpr int kThreads = 1024, kPerThread = kMaxSampleCandidates / kThreads;
// Candidates a row without top-k takes first (top-p and min-p usually keep far fewer): sorting
// all kMaxSampleCandidates cost a batch-1 step 178 us on the H200.
constexpr int kFirstCandidates = 256;
static_assert(kFirstCandidates <= kMaxSampleCandidates);
using Key = unsigned long long;  // ordered value << 32 | ~id: descending order = the host's order

__device__ uint32_t ordered(float x) {  // monotone map of floats to unsigned integers
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : u | 0x80000000u;
}
__device__ float unordered(uint32_t u) {
  return __uint_as_float((u & 0x80000000u) ? u & 0x7fffffffu : ~u);
}
__device__ Key make_key(float v, int id) { return Key(ordered(v)) << 32 | (0xffffffffu - id); }
__device__ float key_value(Key k) { return unordered(uint32_t(k >> 32)); }
__device__ int key_id(Key k) { return int(0xffffffffu - uint32_t(k)); }

// Logit `i` after the penalties (pens: this row's pairs, sorted by id).
__device__ float penalized_logit(const float* row, int i, const SampleRow& r, const int2* pens) {
  int lo = 0, hi = r.pen_count;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (pens[mid].x < i)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo < r.pen_count && pens[lo].x == i ? penalized(row[i], r.params, pens[lo].y) : row[i];
}

// Fills keys[0, want) with the row's `want` largest keys: a radix select of the threshold key
// (8 bits a pass; the lanes of a warp in lane 0's bin add once: a row's logits share a few high
// bins, whose atomics would otherwise serialise), then everything above it and the lowest ids
// equal to it. Every warp runs the loops' same trips (the ids past vocab idle).
__device__ void select_top(const float* row, int vocab, const SampleRow& r, const int2* pens,
                           int want, Key* keys) {
  __shared__ int hist[256], pick[2], above, warp_ties[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint32_t prefix = 0, mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    for (int i0 = 0; i0 < vocab; i0 += blockDim.x) {
      const int i = i0 + threadIdx.x;
      const uint32_t u = i < vocab ? ordered(penalized_logit(row, i, r, pens)) : 0;
      const bool counted = i < vocab && (u & mask) == prefix;
      const int bin = counted ? int((u >> shift) & 255) : 256;
      const int first_bin = __shfl_sync(0xffffffffu, bin, 0);
      const unsigned peers = __ballot_sync(0xffffffffu, bin == first_bin);
      if (counted && bin != first_bin)
        atomicAdd(&hist[bin], 1);
      else if (counted && lane == 0)
        atomicAdd(&hist[bin], __popc(peers));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int acc = 0, d = 255;
      while (acc + hist[d] < want) acc += hist[d--];
      pick[0] = d;
      pick[1] = want - acc;
    }
    __syncthreads();
    prefix |= uint32_t(pick[0]) << shift;
    mask |= 0xffu << shift;
    want = pick[1];
    __syncthreads();
  }
  if (threadIdx.x == 0) above = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = penalized_logit(row, i, r, pens);
    if (ordered(v) > prefix) keys[atomicAdd(&above, 1)] = make_key(v, i);
  }
  __syncthreads();
  // The `want` ties at the threshold with the lowest ids: a block's ids at a time, each tie's
  // place from the warps' counts before it.
  const int base = above;
  for (int i0 = 0, taken = 0; i0 < vocab && taken < want; i0 += blockDim.x) {
    const int i = i0 + threadIdx.x;
    const float v = i < vocab ? penalized_logit(row, i, r, pens) : 0.0f;
    const bool tie = i < vocab && ordered(v) == prefix;
    const unsigned ballot = __ballot_sync(0xffffffffu, tie);
    if (lane == 0) warp_ties[warp] = __popc(ballot);
    __syncthreads();
    int at = taken + __popc(ballot & ((1u << lane) - 1));
    for (int w = 0; w < int(blockDim.x >> 5); ++w) {
      at += w < warp ? warp_ties[w] : 0;
      taken += warp_ties[w];
    }
    if (tie && at < want) keys[base + at] = make_key(v, i);
    __syncthreads();  // warp_ties is rewritten
  }
  __syncthreads();
}

__device__ void sort_descending(Key* keys, int n) {  // bitonic; n a power of two
  for (int k = 2; k <= n; k <<= 1)
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const int o = i ^ j;
        if (o > i) {
          const Key a = keys[i], b = keys[o];
          if ((i & k) == 0 ? a < b : a > b) {
            keys[i] = b;
            keys[o] = a;
          }
        }
      }
      __syncthreads();
    }
}

using Scan = cub::BlockScan<double, kThreads>;

// The log-sum-exp of a raw logits row, over the block: the log-probabilities' normaliser.
__device__ float row_logsumexp(const float* row, int vocab) {
  float mx = -INFINITY;
  for (int i = threadIdx.x; i < vocab; i += kThreads) mx = fmaxf(mx, row[i]);
  mx = block_reduce(mx, Max{}, -INFINITY);
  float se = 0;
  for (int i = threadIdx.x; i < vocab; i += kThreads) se += __expf(row[i] - mx);
  return mx + logf(block_reduce(se, Sum{}, 0.0f));
}

// keeps_whole_vocabulary: the host keeps every token in id order (sampler.cpp), so the draw is a
// scan over the vocabulary, thread t owning ids [t * per, (t + 1) * per); no sort. The same
// arithmetic as the host's, in double: each id's probability is computed once and kept in
// registers (vocabularies up to kThreads * kHeld ids; larger ones compute it again in each pass):
// the exponentials and divisions, four times over, were most of a batch-1 step's sampling.
constexpr int kHeld = 8;
__device__ int sample_in_id_order(const float* row, int vocab, const SampleRow& r, const int2* pens,
                                  typename Scan::TempStorage& scan, double u) {
  const int per = (vocab + kThreads - 1) / kThreads, i0 = threadIdx.x * per;
  const int i1 = min(vocab, i0 + per);
  float mx = -INFINITY;
  for (int i = i0; i < i1; ++i) mx = fmaxf(mx, penalized_logit(row, i, r, pens));
  const double top = block_reduce(mx, Max{}, -INFINITY), T = r.params.temperature;
  auto weight = [&](int i) { return exp((double(penalized_logit(row, i, r, pens)) - top) / T); };
  const bool held = per <= kHeld;
  double w[kHeld];  // weights, then probabilities, when held
  // f(i, x) for each of this thread's ids i, x its held value (or 0 when not held).
  auto each = [&](auto&& f) {
    if (held) {
#pragma unroll
      for (int j = 0; j < kHeld; ++j)
        if (i0 + j < i1) f(i0 + j, w[j]);
    } else {
      double none = 0;
      for (int i = i0; i < i1; ++i) f(i, none);
    }
  };
  double z = 0;
  each([&](int i, double& x) { z += x = weight(i); });
  const double Z = block_reduce(z, Sum{}, 0.0);
  double s = 0;  // the host renormalises once more and rounds each probability to float
  each([&](int i, double& x) { s += x = (held ? x : weight(i)) / Z; });
  const double S = block_reduce(s, Sum{}, 0.0);
  auto prob = [&](int i, double x) { return double(float((held ? x : weight(i) / Z) / S)); };
  double mine = 0, before;
  each([&](int i, double& x) { mine += x = prob(i, x); });
  Scan(scan).ExclusiveSum(mine, before);
  int first = vocab - 1;
  bool found = false;
  each([&](int i, double& x) {
    if (found) return;
    before += held ? x : prob(i, x);
    if (u < before) first = i, found = true;
  });
  return -block_reduce(-first, Max{}, -(vocab - 1));
}

// At most one block a SM (as its 64 registers a thread imply): without saying so, ptxas held it
// to 32 registers and spilled the candidates' arrays.
__global__ void __launch_bounds__(kThreads, 1)
    sample_kernel(const float* logits, int vocab, const SampleRow* rows, const int2* all_pens,
                  int* tokens, float* logprobs) {
  extern __shared__ Key keys[];  // kMaxSampleCandidates
  __shared__ typename Scan::TempStorage scan;
  const SampleRow r = rows[blockIdx.x];
  const SamplingParams& p = r.params;
  const float* row = logits + int64_t(r.row) * vocab;
  const int2* pens = all_pens + r.pen_begin;
  const int tid = threadIdx.x;

  const float lse = row_logsumexp(row, vocab);  // for the token's log-probability
  auto finish = [&](int token) {
    if (tid == 0) {
      tokens[blockIdx.x] = token;
      logprobs[blockIdx.x] = token >= 0 ? row[token] - lse : 0.0f;
    }
  };

  if (p.temperature <= 0) {  // greedy: the largest key is the host's first after its stable sort
    Key best = 0;
    for (int i = tid; i < vocab; i += kThreads) {
      const Key k = make_key(penalized_logit(row, i, r, pens), i);
      best = k > best ? k : best;
    }
    return finish(key_id(block_reduce(best, Max{}, Key(0))));
  }
  if (keeps_whole_vocabulary(p, vocab))
    return finish(sample_in_id_order(row, vocab, r, pens, scan, r.uniform));
  const bool top_k_on = p.top_k > 0 && p.top_k < vocab;
  if (top_k_on && p.top_k > kMaxSampleCandidates) return finish(-1);
  // The candidates: the top-k, or first the kFirstCandidates largest, and all kMaxSampleCandidates
  // only when top-p and min-p keep every one of those (the same choice either way: the kept
  // list is a prefix of the sorted candidates).
  for (int want = top_k_on ? p.top_k : kFirstCandidates;;
       want = kMaxSampleCandidates) {
    const int n = min(want, vocab);
    if (n == vocab) {
      for (int i = tid; i < vocab; i += kThreads)
        keys[i] = make_key(penalized_logit(row, i, r, pens), i);
    } else {
      select_top(row, vocab, r, pens, n, keys);
    }
    int n2 = 1;
    while (n2 < n) n2 <<= 1;
    for (int i = n + tid; i < n2; i += kThreads) keys[i] = 0;
    __syncthreads();
    sort_descending(keys, n2);

    // Probabilities over the candidates, in double as on the host, normalised over the top-k
    // set (top-k on) or the whole vocabulary (the tail beyond the candidates counted too).
    // Thread t holds candidates [t * kPerThread, (t + 1) * kPerThread).
    const double T = p.temperature, top = key_value(keys[0]);
    double e[kPerThread], local = 0;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int i = tid * kPerThread + j;
      e[j] = i < n ? exp((double(key_value(keys[i])) - top) / T) : 0.0;
      local += e[j];
    }
    double Z = block_reduce(local, Sum{}, 0.0);
    const bool tail = n < vocab && !top_k_on;
    if (tail) {
      double rest = 0;
      for (int i = tid; i < vocab; i += kThreads) {
        const double v = penalized_logit(row, i, r, pens);
        if (make_key(float(v), i) < keys[n - 1]) rest += exp((v - top) / T);
      }
      Z += block_reduce(rest, Sum{}, 0.0);
    }
    double prob[kPerThread], before[kPerThread];
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) prob[j] = e[j] / Z;
    __syncthreads();  // scan's storage may still be read by a previous try
    Scan(scan).ExclusiveSum(prob, before);
    // top-p: candidate i stays while the mass before it is below top_p; min-p: while its
    // probability is at least min_p times the best one's.
    const double floor = p.min_p * (1.0 / Z);
    int keep = 0;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int i = tid * kPerThread + j;
      keep += i < n && (p.top_p >= 1.0f || before[j] < p.top_p) &&
              (p.min_p <= 0 || i == 0 || prob[j] >= floor);
    }
    const int K = max(1, block_reduce(keep, Sum{}, 0));
    if (tail && K == n) {  // the list may go on past the candidates
      if (n < kMaxSampleCandidates) continue;
      return finish(-1);
    }
    double kept = 0;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) kept += tid * kPerThread + j < K ? prob[j] : 0.0;
    const double S = block_reduce(kept, Sum{}, 0.0);
    double q[kPerThread], cum[kPerThread];
#pragma unroll
    for (int j = 0; j < kPerThread; ++j)
      q[j] = tid * kPerThread + j < K ? double(float(prob[j] / S)) : 0.0;
    __syncthreads();  // scan's storage is reused
    Scan(scan).InclusiveSum(q, cum);
    int first = K - 1;
#pragma unroll
    for (int j = kPerThread - 1; j >= 0; --j) {
      const int i = tid * kPerThread + j;
      if (i < K && r.uniform < cum[j]) first = min(first, i);
    }
    first = block_reduce(-first, Max{}, -(K - 1));
    return finish(key_id(keys[-first]));
  }
}

// One block per row: the log-sum-exp, then the n largest keys (value, then lower id first: the
// host's order), one pass over the row each.
__global__ void __launch_bounds__(kThreads)
    top_logprobs_kernel(const float* logits, int vocab, const int* rows, int n, int* ids,
                        float* lps) {
  const float* row = logits + int64_t(rows[blockIdx.x]) * vocab;
  const int tid = threadIdx.x;
  const float lse = row_logsumexp(row, vocab);
  Key below = ~Key(0);
  for (int j = 0; j < n; ++j) {
    Key best = 0;
    for (int i = tid; i < vocab; i += kThreads) {
      const Key k = make_key(row[i], i);
      if (k < below && k > best) best = k;
    }
    below = block_reduce(best, Max{}, Key(0));
    if (tid == 0) {
      ids[blockIdx.x * n + j] = key_id(below);
      lps[blockIdx.x * n + j] = key_value(below) - lse;
    }
  }
}

}  // namespace

void sample(const float* logits, int vocab, const SampleRow* rows, int n_rows, const int2* pens,
            int* tokens, float* logprobs, cudaStream_t st) {
  if (n_rows == 0) return;
  constexpr size_t smem = kMaxSampleCandidates * sizeof(Key);
  static std::atomic<uint64_t> sized{0};
  allow_shared_memory(reinterpret_cast<const void*>(sample_kernel), smem, sized,
                      "sample: shared memory");
  sample_kernel<<<n_rows, kThreads, smem, st>>>(logits, vocab, rows, pens, tokens, logprobs);
  check_launch("sample");
}

void top_logprobs(const float* logits, int vocab, const int* rows, int n_rows, int n, int* ids,
                  float* lps, cudaStream_t st) {
  if (n_rows == 0 || n == 0) return;
  top_logprobs_kernel<<<n_rows, kThreads, 0, st>>>(logits, vocab, rows, n, ids, lps);
  check_launch("top_logprobs");
}

}  // namespace mp::cuda
