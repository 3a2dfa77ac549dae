#include <algorithm>
#include <atomic>
#include <string>
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

// Logit `i`, whose raw value is `raw`, after the penalties (pens: this row's pairs, sorted by id).
__device__ float penalize(float raw, int i, const SampleRow& r, const int2* pens) {
  int lo = 0, hi = r.pen_count;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (pens[mid].x < i)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo < r.pen_count && pens[lo].x == i ? penalized(raw, r.params, pens[lo].y) : raw;
}
__device__ float penalized_logit(const float* row, int i, const SampleRow& r, const int2* pens) {
  return penalize(row[i], i, r, pens);
}

// Fills keys[0, want) with the `want` largest keys of ids [begin, end) (want <= end - begin),
// value(i) being id i's (penalised) logit: a radix select of the threshold key (8 bits a pass;
// the lanes of a warp in one bin add once: a row's logits share a few high bins, whose atomics
// would otherwise serialise), then everything above it and the lowest ids equal to it.
// Every warp runs the loops' same trips (the ids past end idle).
template <class Value>
__device__ void select_top(Value value, int begin, int end, int want, Key* keys) {
  __shared__ int hist[256], pick[2], above, warp_ties[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint32_t prefix = 0, mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    for (int i0 = begin; i0 < end; i0 += blockDim.x) {
      const int i = i0 + threadIdx.x;
      const uint32_t u = i < end ? ordered(value(i)) : 0;
      const bool counted = i < end && (u & mask) == prefix;
      const int bin = counted ? int((u >> shift) & 255) : 256;
      const unsigned peers = __match_any_sync(0xffffffffu, bin);
      if (counted && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
    }
    __syncthreads();
    // The threshold bin: the first from the top where the count from the top reaches want. Lane
    // l of warp 0 holds bins 255 - 8l down to 248 - 8l and a scan over the lanes finds the one
    // holding it (one thread walking down the bins took up to 256 steps of a shared-memory load
    // each, in each of the four passes).
    if (threadIdx.x < 32) {
      int cnt[8], sum = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) sum += cnt[j] = hist[255 - 8 * lane - j];
      int through = sum;  // bins from the top through this lane's
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int x = __shfl_up_sync(0xffffffffu, through, o);
        if (lane >= o) through += x;
      }
      int acc = through - sum, d = -1;
      if (acc < want && want <= through) {
#pragma unroll
        for (int j = 0; j < 8; ++j)
          if (d < 0) {
            if (acc + cnt[j] >= want)
              d = j;
            else
              acc += cnt[j];
          }
        pick[0] = 255 - 8 * lane - d;
        pick[1] = want - acc;
      }
    }
    __syncthreads();
    prefix |= uint32_t(pick[0]) << shift;
    mask |= 0xffu << shift;
    want = pick[1];
    __syncthreads();
  }
  if (threadIdx.x == 0) above = 0;
  __syncthreads();
  for (int i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float v = value(i);
    if (ordered(v) > prefix) keys[atomicAdd(&above, 1)] = make_key(v, i);
  }
  __syncthreads();
  // The `want` ties at the threshold with the lowest ids: a block's ids at a time, each tie's
  // place from the warps' counts before it.
  const int base = above;
  for (int i0 = begin, taken = 0; i0 < end && taken < want; i0 += blockDim.x) {
    const int i = i0 + threadIdx.x;
    const float v = i < end ? value(i) : 0.0f;
    const bool tie = i < end && ordered(v) == prefix;
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

// The host's draw among n candidates sorted in descending order, keys[0, n), with Threads
// threads each holding PerThread of them (thread t: [t * PerThread, (t + 1) * PerThread)):
// probabilities in double as on the host, normalised over the candidates plus `rest`, the weight
// exp((l - top) / T) of the row's tokens past them (0 with top-k, whose set is the whole list);
// top-p keeps candidate i while the mass before it is below top_p, min-p while its probability is
// at least min_p times the best one's; the kept ones renormalised, rounded to float as the host
// does, and the first whose cumulative probability passes u is the index returned. -1 when
// `tail` (candidates beyond these exist) and all n are kept: the list may go on past them.
template <int Threads, int PerThread>
__device__ int draw_sorted(const Key* keys, int n, const SamplingParams& p, double u, bool tail,
                           double rest) {
  using Scan = cub::BlockScan<double, Threads>;
  __shared__ typename Scan::TempStorage scan;
  const int tid = threadIdx.x;
  const double T = p.temperature, top = key_value(keys[0]);
  double e[PerThread], local = 0;
#pragma unroll
  for (int j = 0; j < PerThread; ++j) {
    const int i = tid * PerThread + j;
    e[j] = i < n ? exp((double(key_value(keys[i])) - top) / T) : 0.0;
    local += e[j];
  }
  const double Z = block_reduce(local, Sum{}, 0.0) + rest;
  double prob[PerThread], before[PerThread];
#pragma unroll
  for (int j = 0; j < PerThread; ++j) prob[j] = e[j] / Z;
  __syncthreads();  // scan's storage may still be read by a previous call
  Scan(scan).ExclusiveSum(prob, before);
  const double floor = p.min_p * (1.0 / Z);
  int keep = 0;
#pragma unroll
  for (int j = 0; j < PerThread; ++j) {
    const int i = tid * PerThread + j;
    keep += i < n && (p.top_p >= 1.0f || before[j] < p.top_p) &&
            (p.min_p <= 0 || i == 0 || prob[j] >= floor);
  }
  const int K = max(1, block_reduce(keep, Sum{}, 0));
  if (tail && K == n) return -1;
  double kept = 0;
#pragma unroll
  for (int j = 0; j < PerThread; ++j) kept += tid * PerThread + j < K ? prob[j] : 0.0;
  const double S = block_reduce(kept, Sum{}, 0.0);
  double q[PerThread], cum[PerThread];
#pragma unroll
  for (int j = 0; j < PerThread; ++j)
    q[j] = tid * PerThread + j < K ? double(float(prob[j] / S)) : 0.0;
  __syncthreads();  // scan's storage is reused
  Scan(scan).InclusiveSum(q, cum);
  int first = K - 1;
#pragma unroll
  for (int j = PerThread - 1; j >= 0; --j) {
    const int i = tid * PerThread + j;
    if (i < K && u < cum[j]) first = min(first, i);
  }
  return -block_reduce(-first, Max{}, -(K - 1));
}

// Log-sum-exps as (max, sum of exp(x - max)) combined (the empty one: (-inf, 0)).
struct LogSumExp {
  __device__ float2 operator()(float2 a, float2 b) const {
    const float m = fmaxf(a.x, b.x);
    if (m == -INFINITY) return a;
    return make_float2(m, a.y * __expf(a.x - m) + b.y * __expf(b.x - m));
  }
};

// The log-sum-exp of a row's raw logits, over the block: the log-probabilities' normaliser.
__device__ float row_logsumexp(const float* row, int vocab) {
  float mx = -INFINITY;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) mx = fmaxf(mx, row[i]);
  mx = block_reduce(mx, Max{}, -INFINITY);
  float se = 0;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) se += __expf(row[i] - mx);
  return mx + logf(block_reduce(se, Sum{}, 0.0f));
}

// Rows spread over blocks: greedy ones, and those that keep every token in id order (the host's
// order, sampler.cpp): no sort, the draw a scan over the vocabulary.
__host__ __device__ bool spreads(const SamplingParams& p, int vocab) {
  return p.temperature <= 0 || keeps_whole_vocabulary(p, vocab);
}

constexpr int kSpreadThreads = 256, kSpreadTile = 4 * kSpreadThreads;
constexpr int kMaxSpreadBlocks = 1024;  // a row's blocks
// Top-k rows spread over blocks (sample_top_k_spread_kernel) up to this k, a block staging at
// most kTopKIds logits, their blocks' lists merged in kSpreadCandidates keys of shared memory
// (so k * ceil(vocab / kTopKIds) <= kSpreadCandidates: any k up to 256 at 16K ids, up to 64 at
// 128K; larger ones take sample_kernel's one block a row).
constexpr int kSpreadTopK = kSpreadThreads, kSpreadCandidates = 2048, kTopKIds = 4096;
__host__ __device__ inline int top_k_least_blocks(int vocab) {
  return (vocab + kTopKIds - 1) / kTopKIds;
}
__host__ __device__ bool spreads_top_k(const SamplingParams& p, int vocab) {
  return !spreads(p, vocab) && p.top_k > 0 && p.top_k < vocab && p.top_k <= kSpreadTopK &&
         top_k_least_blocks(vocab) * p.top_k <= kSpreadCandidates;
}

// f(i, raw logit i) for ids [begin, end) of a row, each thread of a kSpreadThreads block every
// kSpreadThreads-th, the loads of kBatch of them issued before their use (one load after
// another, each waiting on the last, was most of a batch of 256's sampling).
template <class F>
__device__ void each_logit(const float* row, int begin, int end, F&& f) {
  constexpr int kBatch = 8;
  for (int i0 = begin + threadIdx.x; i0 < end; i0 += kBatch * kSpreadThreads) {
    float x[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int i = i0 + j * kSpreadThreads;
      x[j] = i < end ? row[i] : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j)
      if (i0 + j * kSpreadThreads < end) f(i0 + j * kSpreadThreads, x[j]);
  }
}

struct SpreadPart {  // one block's share of a row
  double weight;     // sum of exp((l - max) / T) over its penalised logits l (temperature)
  Key best;          // its largest key: its maximum, and greedy's choice
  float raw_max, raw_sum;  // its raw logits' log-sum-exp: raw_max + log(raw_sum)
};

// Block (b, r) takes ids [b C, (b + 1) C) of row r (C = `per_block`): its largest key, the sum of
// its weights relative to its maximum and its part of the log-sum-exp. The row's last block to
// finish (tickets[r] counts them; that block sets it back to 0) combines the parts: greedy takes
// the largest key; otherwise, as the host, p_i = float(w_i / Z / S) with w_i = exp((l_i - max) /
// T), Z their sum and S the sum of w_i / Z, and the token is the first whose cumulative p passes
// u: the block whose share of the mass holds u is found from the parts, and only its ids are
// scanned. The weights are computed in float (the host's are double: in double, the exponentials
// and divisions cost a batch of 256 rows 60 us), their sums and the cumulative sums in double, so
// the probabilities are the host's within ~1e-7 and the draw is the host's unless u lies that
// close to a boundary (the tests allow 1e-5).
__global__ void __launch_bounds__(kSpreadThreads)
    sample_spread_kernel(const float* logits, int vocab, int per_block, const SampleRow* rows,
                         const int2* all_pens, SpreadPart* parts, unsigned* tickets, int* tokens,
                         float* logprobs) {
  const int blocks = gridDim.x, tid = threadIdx.x;
  const SampleRow r = rows[blockIdx.y];
  if (!spreads(r.params, vocab)) return;  // sample_kernel's
  const float* row = logits + int64_t(r.row) * vocab;
  const int2* pens = all_pens + r.pen_begin;
  const bool greedy = r.params.temperature <= 0;
  const float T = r.params.temperature;
  SpreadPart* row_parts = parts + int64_t(blockIdx.y) * blocks;
  auto weight = [&](float logit, float top) { return expf((logit - top) / T); };
  const int begin = blockIdx.x * per_block, end = min(vocab, begin + per_block);
  auto each = [&](auto&& f) { each_logit(row, begin, end, f); };

  SpreadPart part;
  part.best = 0, part.raw_max = -INFINITY;
  each([&](int i, float raw) {
    part.best = max(part.best, make_key(penalize(raw, i, r, pens), i));
    part.raw_max = fmaxf(part.raw_max, raw);
  });
  block_reduce_two(part.best, Max{}, Key(0), part.raw_max, Max{}, -INFINITY);
  const float mx = key_value(part.best);
  float weight_sum = 0;
  part.raw_sum = 0;
  each([&](int i, float raw) {
    if (!greedy) weight_sum += weight(penalize(raw, i, r, pens), mx);
    part.raw_sum += __expf(raw - part.raw_max);
  });
  part.weight = weight_sum;
  block_reduce_two(part.weight, Sum{}, 0.0, part.raw_sum, Sum{}, 0.0f);

  if (tid == 0) row_parts[blockIdx.x] = part;
  if (!last_block_to_arrive(&tickets[blockIdx.y], blocks)) return;

  // The last block: the parts (read past L1: other SMs wrote them).
  Key best = 0;
  float raw_top = -INFINITY;
  for (int b = tid; b < blocks; b += kSpreadThreads)
    best = max(best, __ldcg(&row_parts[b].best)),
    raw_top = fmaxf(raw_top, __ldcg(&row_parts[b].raw_max));
  block_reduce_two(best, Max{}, Key(0), raw_top, Max{}, -INFINITY);
  const float top = key_value(best);
  __shared__ double mass[kMaxSpreadBlocks];  // block b's share of Z, then of 1
  double z = 0;
  float se = 0;
  for (int b = tid; b < blocks; b += kSpreadThreads) {
    se += __ldcg(&row_parts[b].raw_sum) * __expf(__ldcg(&row_parts[b].raw_max) - raw_top);
    if (!greedy)
      z += mass[b] = __ldcg(&row_parts[b].weight) *
                     exp((double(key_value(__ldcg(&row_parts[b].best))) - top) / double(T));
  }
  block_reduce_two(z, Sum{}, 0.0, se, Sum{}, 0.0f);
  const float lse = raw_top + logf(se);
  auto finish = [&](int token) {
    if (tid == 0) {
      tokens[blockIdx.y] = token;
      logprobs[blockIdx.y] = row[token] - lse;
    }
  };
  if (greedy) return finish(key_id(best));

  const double Z = z, u = r.uniform;
  double s = 0;
  for (int b = tid; b < blocks; b += kSpreadThreads) s += mass[b] /= Z;
  const double S = block_reduce(s, Sum{}, 0.0);
  // The first block whose mass passes u, then its ids a tile at a time (and the next block's,
  // should rounding leave u past its last id): each tile loaded with coalesced loads, then
  // scanned with each thread holding consecutive ids (a thread's run of ids, loaded one after
  // another, was most of a batch of 256's sampling).
  __shared__ int first_block;
  __shared__ double before_block;
  if (tid == 0) {
    double cum = 0;
    int b = 0;
    while (b < blocks - 1 && u >= cum + mass[b] / S) cum += mass[b++] / S;
    first_block = b, before_block = cum;
  }
  __syncthreads();
  constexpr int kHeld = kSpreadTile / kSpreadThreads;
  using BlockScan = cub::BlockScan<double, kSpreadThreads>;
  __shared__ typename BlockScan::TempStorage scan;
  __shared__ double tile[kSpreadTile];
  const double inv = 1.0 / (Z * S);
  double before = before_block;
  for (int t0 = first_block * per_block; t0 < vocab; t0 += kSpreadTile) {
    float raw[kHeld];
#pragma unroll
    for (int j = 0; j < kHeld; ++j) {
      const int i = t0 + j * kSpreadThreads + tid;
      raw[j] = i < vocab ? row[i] : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kHeld; ++j) {
      const int i = t0 + j * kSpreadThreads + tid;
      tile[j * kSpreadThreads + tid] =
          i < vocab ? double(float(weight(penalize(raw[j], i, r, pens), top) * inv)) : 0.0;
    }
    __syncthreads();
    double cum[kHeld], total;
#pragma unroll
    for (int j = 0; j < kHeld; ++j) cum[j] = tile[tid * kHeld + j];
    BlockScan(scan).InclusiveSum(cum, cum, total);
    int first = vocab;
#pragma unroll
    for (int j = kHeld - 1; j >= 0; --j)
      if (t0 + tid * kHeld + j < vocab && u < before + cum[j]) first = t0 + tid * kHeld + j;
    first = -block_reduce(-first, Max{}, -vocab);
    if (first < vocab) return finish(first);
    before += total;  // (block_reduce synchronised: the tile and scan may be rewritten)
  }
  finish(vocab - 1);
}

// Rows with top-k (k <= kSpreadTopK, temperature > 0) spread over blocks as the whole-vocabulary
// rows are (one block a row took 62-70 us for top-k 40 at batch 1): block (b, r) takes ids [b C,
// (b + 1) C) of row r (C = `per_block` <= kTopKIds), stages their penalised logits in shared
// memory (the radix select's passes each read the row again otherwise, one load waiting on the
// last), writes its min(k, C) largest keys, sorted, to its k_stride slots of `cands` (0 past them)
// and its part of the raw log-sum-exp; the row's last block merges the blocks' lists two at a
// time (the row's k largest keys are among them: keys are unique) and draws among the first k as
// sample_kernel does. blocks * k_stride <= kSpreadCandidates. (With the row read again in each
// radix pass and all the lists sorted together in the last block, top-k 40 took 41 us a call at
// batch 1; 25 us so: bench_cuda --sampling, docs/PERF.md session 22.)
__global__ void __launch_bounds__(kSpreadThreads)
    sample_top_k_spread_kernel(const float* logits, int vocab, int per_block, int k_stride,
                               const SampleRow* rows, const int2* all_pens, Key* cands,
                               float2* lse_parts, unsigned* tickets, int* tokens,
                               float* logprobs) {
  const int blocks = gridDim.x, tid = threadIdx.x;
  const SampleRow r = rows[blockIdx.y];
  if (!spreads_top_k(r.params, vocab)) return;  // another kernel's
  const float* row = logits + int64_t(r.row) * vocab;
  const int2* pens = all_pens + r.pen_begin;
  const int k = r.params.top_k, begin = blockIdx.x * per_block,
            end = min(vocab, begin + per_block), mine = min(k, end - begin);
  Key* row_cands = cands + int64_t(blockIdx.y) * blocks * k_stride;
  float2* row_lse = lse_parts + int64_t(blockIdx.y) * blocks;
  __shared__ Key keys[kSpreadCandidates];
  // The block's penalised logits; later the merge's second buffer.
  __shared__ __align__(16) float staged[kTopKIds];
  static_assert(kTopKIds * sizeof(float) >= kSpreadCandidates * sizeof(Key));
  Key* const spare = reinterpret_cast<Key*>(staged);
  float2 lse = make_float2(-INFINITY, 0.0f);
  each_logit(row, begin, end, [&](int i, float raw) {
    staged[i - begin] = penalize(raw, i, r, pens);
    lse = LogSumExp{}(lse, make_float2(raw, 1.0f));
  });
  __syncthreads();
  select_top([&](int i) { return staged[i - begin]; }, begin, end, mine, keys);
  for (int j = tid; j < mine; j += kSpreadThreads) {  // sorted: a key's place is its rank
    const Key x = keys[j];
    int rank = 0;
    for (int i = 0; i < mine; ++i) rank += keys[i] > x;
    spare[rank] = x;
  }
  __syncthreads();
  for (int j = tid; j < k; j += kSpreadThreads)
    row_cands[blockIdx.x * k_stride + j] = j < mine ? spare[j] : 0;
  lse = block_reduce(lse, LogSumExp{}, make_float2(-INFINITY, 0.0f));
  if (tid == 0) row_lse[blockIdx.x] = lse;
  if (!last_block_to_arrive(&tickets[blockIdx.y], blocks)) return;

  // The last block: the lists (read past L1: other SMs wrote them); keys of 0 are the empty
  // slots, below every token's.
  for (int j = tid; j < blocks * k; j += kSpreadThreads)
    keys[j] = __ldcg(&row_cands[(j / k) * k_stride + j % k]);
  lse = make_float2(-INFINITY, 0.0f);
  for (int b = tid; b < blocks; b += kSpreadThreads) lse = LogSumExp{}(lse, __ldcg(&row_lse[b]));
  lse = block_reduce(lse, LogSumExp{}, make_float2(-INFINITY, 0.0f));  // (synchronises)
  // Lists merged in pairs, each keeping its first k: a key's place is its place in its own list
  // plus the keys above it in the other (a binary search); keys are unique, and the first list's
  // empty slots fill the places past the two lists' tokens' keys (the second's would write the
  // same zeros again). An odd list out is copied.
  Key *src = keys, *dst = spare;
  for (int lists = blocks; lists > 1; lists = (lists + 1) / 2) {
    for (int j = tid; j < lists * k; j += kSpreadThreads) {
      const int list = j / k, other = list ^ 1;
      const Key x = src[j];
      int place = j % k;
      if (other < lists) {
        int lo = 0, hi = k;  // the other list's first key not above x
        while (lo < hi) {
          const int mid = (lo + hi) / 2;
          if (src[other * k + mid] > x)
            lo = mid + 1;
          else
            hi = mid;
        }
        place += lo;
      }
      if (place < k && (x != 0 || list % 2 == 0)) dst[(list / 2) * k + place] = x;
    }
    __syncthreads();
    Key* const merged = dst;
    dst = src, src = merged;
  }
  const int at = draw_sorted<kSpreadThreads, kSpreadTopK / kSpreadThreads>(src, k, r.params,
                                                                            r.uniform, false, 0.0);
  if (tid == 0) {
    const int token = key_id(src[at]);
    tokens[blockIdx.y] = token;
    logprobs[blockIdx.y] = row[token] - (lse.x + logf(lse.y));
  }
}

// At most one block a SM (as its 64 registers a thread imply): without saying so, ptxas held it
// to 32 registers and spilled the candidates' arrays.
__global__ void __launch_bounds__(kThreads, 1)
    sample_kernel(const float* logits, int vocab, const SampleRow* rows, const int2* all_pens,
                  int* tokens, float* logprobs) {
  extern __shared__ Key keys[];  // kMaxSampleCandidates
  const SampleRow r = rows[blockIdx.x];
  const SamplingParams& p = r.params;
  const float* row = logits + int64_t(r.row) * vocab;
  const int2* pens = all_pens + r.pen_begin;
  const int tid = threadIdx.x;

  if (spreads(p, vocab) || spreads_top_k(p, vocab)) return;  // the spread kernels'

  const float lse = row_logsumexp(row, vocab);  // for the token's log-probability
  auto finish = [&](int token) {
    if (tid == 0) {
      tokens[blockIdx.x] = token;
      logprobs[blockIdx.x] = token >= 0 ? row[token] - lse : 0.0f;
    }
  };

  const bool top_k_on = p.top_k > 0 && p.top_k < vocab;
  if (top_k_on && p.top_k > kMaxSampleCandidates) return finish(-1);
  // The candidates: the top-k, or first the kFirstCandidates largest, then 8 times as many up to
  // kMaxSampleCandidates while top-p and min-p keep every one of those (the same choice either
  // way: the kept list is a prefix of the sorted candidates). Top-p on flat logits went from 256
  // straight to 8,192, whose sort in one block took 233 us a row.
  for (int want = top_k_on ? p.top_k : kFirstCandidates;;
       want = min(8 * want, kMaxSampleCandidates)) {
    const int n = min(want, vocab);
    if (n == vocab) {
      for (int i = tid; i < vocab; i += kThreads)
        keys[i] = make_key(penalized_logit(row, i, r, pens), i);
    } else {
      select_top([&](int i) { return penalized_logit(row, i, r, pens); }, 0, vocab, n, keys);
    }
    int n2 = 1;
    while (n2 < n) n2 <<= 1;
    for (int i = n + tid; i < n2; i += kThreads) keys[i] = 0;
    __syncthreads();
    sort_descending(keys, n2);

    // Normalised over the top-k set (top-k on) or the whole vocabulary: the tail beyond the
    // candidates counted too.
    const bool tail = n < vocab && !top_k_on;
    double rest = 0;
    if (tail) {
      const double T = p.temperature, top = key_value(keys[0]);
      for (int i = tid; i < vocab; i += kThreads) {
        const double v = penalized_logit(row, i, r, pens);
        if (make_key(float(v), i) < keys[n - 1]) rest += exp((v - top) / T);
      }
      rest = block_reduce(rest, Sum{}, 0.0);
    }
    const int at = draw_sorted<kThreads, kPerThread>(keys, n, p, r.uniform, tail, rest);
    if (at >= 0) return finish(key_id(keys[at]));
    if (n < kMaxSampleCandidates) continue;  // the list may go on past the candidates
    return finish(-1);
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

// Blocks a row of `vocab` ids when `n_rows` rows share `resident` blocks, none empty, at least
// `least` (<= most) and at most `most` (at least kSpreadIds ids each): C ids each, a multiple of
// kSpreadThreads.
struct Spread {
  int blocks, per_block;
};
Spread spread_over(int vocab, int n_rows, int resident, int most, int least = 1) {
  most = std::min({most, (vocab + kSpreadIds - 1) / kSpreadIds, kMaxSpreadBlocks});
  const int want = std::clamp(resident / n_rows, least, std::max(most, least));
  const int per_block =
      ((vocab + want - 1) / want + kSpreadThreads - 1) / kSpreadThreads * kSpreadThreads;
  return {(vocab + per_block - 1) / per_block, per_block};
}
size_t aligned(size_t bytes) { return (bytes + 15) / 16 * 16; }
}  // namespace

void Sampler::sample(const float* logits, int vocab, std::span<const SampleRow> rows,
                     const SampleRow* rows_on_device, const int2* pens, int* tokens,
                     float* logprobs, cudaStream_t st) {
  const int n_rows = int(rows.size());
  int spread = 0, top_k_rows = 0, k_stride = 0;
  for (const SampleRow& r : rows) {
    spread += spreads(r.params, vocab);
    if (spreads_top_k(r.params, vocab)) ++top_k_rows, k_stride = std::max(k_stride, r.params.top_k);
  }
  if (spread + top_k_rows > 0) {
    if (n_rows > 65535)  // the grid's y
      throw Error("sample: " + std::to_string(n_rows) + " rows in one call (at most 65,535)");
    // As many blocks as the GPU holds at once (at least kSpreadIds ids each): 16 a row of
    // 16,384 ids at batch 1, 2 at batch 256.
    if (resident_ == 0) {
      int device = 0, sms = 0, per_sm = 0, per_sm_top_k = 0;
      check(cudaGetDevice(&device), "cudaGetDevice");
      check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "SM count");
      check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, sample_spread_kernel,
                                                          kSpreadThreads, 0),
            "sample: occupancy");
      check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                &per_sm_top_k, sample_top_k_spread_kernel, kSpreadThreads, 0),
            "sample: occupancy");
      resident_ = std::max(1, sms * per_sm);
      resident_top_k_ = std::max(1, sms * per_sm_top_k);
    }
    if (tickets_.resize(n_rows))  // the tickets start at 0
      check(cudaMemsetAsync(tickets_.get(), 0, tickets_.size() * sizeof(unsigned), st),
            "sample: tickets");
    // parts_: the whole-vocabulary rows' parts, then the top-k rows' lists and log-sum-exps.
    const Spread whole = spread_over(vocab, n_rows, resident_, kMaxSpreadBlocks);
    // (spreads_top_k: least * k_stride <= kSpreadCandidates, so that C <= kTopKIds.)
    const Spread top_k = spread_over(vocab, n_rows, resident_top_k_,
                                     kSpreadCandidates / std::max(k_stride, 1),
                                     top_k_least_blocks(vocab));
    const size_t whole_bytes = spread ? aligned(size_t(n_rows) * whole.blocks * sizeof(SpreadPart))
                                      : 0,
                 cand_bytes = aligned(size_t(n_rows) * top_k.blocks * k_stride * sizeof(Key));
    parts_.resize(whole_bytes +
                  (top_k_rows ? cand_bytes + size_t(n_rows) * top_k.blocks * sizeof(float2) : 0));
    if (spread) {
      sample_spread_kernel<<<dim3(whole.blocks, n_rows), kSpreadThreads, 0, st>>>(
          logits, vocab, whole.per_block, rows_on_device, pens,
          reinterpret_cast<SpreadPart*>(parts_.get()), tickets_.get(), tokens, logprobs);
      check_launch("sample_spread");
    }
    if (top_k_rows) {
      uint8_t* at = parts_.get() + whole_bytes;
      sample_top_k_spread_kernel<<<dim3(top_k.blocks, n_rows), kSpreadThreads, 0, st>>>(
          logits, vocab, top_k.per_block, k_stride, rows_on_device, pens,
          reinterpret_cast<Key*>(at), reinterpret_cast<float2*>(at + cand_bytes), tickets_.get(),
          tokens, logprobs);
      check_launch("sample_top_k_spread");
    }
  }
  if (spread + top_k_rows == n_rows) return;
  constexpr size_t smem = kMaxSampleCandidates * sizeof(Key);
  static std::atomic<uint64_t> sized{0};
  allow_shared_memory(reinterpret_cast<const void*>(sample_kernel), smem, sized,
                      "sample: shared memory");
  sample_kernel<<<n_rows, kThreads, smem, st>>>(logits, vocab, rows_on_device, pens, tokens,
                                                logprobs);
  check_launch("sample");
}

void top_logprobs(const float* logits, int vocab, const int* rows, int n_rows, int n, int* ids,
                  float* lps, cudaStream_t st) {
  if (n_rows == 0 || n == 0) return;
  top_logprobs_kernel<<<n_rows, kThreads, 0, st>>>(logits, vocab, rows, n, ids, lps);
  check_launch("top_logprobs");
}

}  // namespace mp::cuda
