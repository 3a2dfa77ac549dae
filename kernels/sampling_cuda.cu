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

// Rows spread over blocks: greedy ones, and those that keep every token in id order (the host's
// order, sampler.cpp): no sort, the draw a scan over the vocabulary.
__host__ __device__ bool spreads(const SamplingParams& p, int vocab) {
  return p.temperature <= 0 || keeps_whole_vocabulary(p, vocab);
}

constexpr int kSpreadThreads = 256, kSpreadTile = 4 * kSpreadThreads;
constexpr int kMaxSpreadBlocks = 1024;  // a row's blocks

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
  // f(i, raw logit i) for this block's ids, each thread every kSpreadThreads-th, the loads of
  // kBatch of them issued before their use (one load after another, each waiting on the last,
  // was most of a batch of 256's sampling).
  constexpr int kBatch = 8;
  const int begin = blockIdx.x * per_block, end = min(vocab, begin + per_block);
  auto each = [&](auto&& f) {
    for (int i0 = begin + tid; i0 < end; i0 += kBatch * kSpreadThreads) {
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
  };

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

  __shared__ bool last;
  if (tid == 0) {
    row_parts[blockIdx.x] = part;
    __threadfence();  // the part is visible before the ticket counts it
    last = atomicAdd(&tickets[blockIdx.y], 1u) == unsigned(blocks - 1);
    if (last) tickets[blockIdx.y] = 0;  // every block of the row has counted
  }
  __syncthreads();
  if (!last) return;
  __threadfence();

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

  if (spreads(p, vocab)) return;  // sample_spread_kernel's

  const float lse = row_logsumexp(row, vocab);  // for the token's log-probability
  auto finish = [&](int token) {
    if (tid == 0) {
      tokens[blockIdx.x] = token;
      logprobs[blockIdx.x] = token >= 0 ? row[token] - lse : 0.0f;
    }
  };

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

void Sampler::sample(const float* logits, int vocab, std::span<const SampleRow> rows,
                     const SampleRow* rows_on_device, const int2* pens, int* tokens,
                     float* logprobs, cudaStream_t st) {
  const int n_rows = int(rows.size());
  const int spread = int(std::count_if(rows.begin(), rows.end(), [&](const SampleRow& r) {
    return spreads(r.params, vocab);
  }));
  if (spread > 0) {
    if (n_rows > 65535)  // the grid's y
      throw Error("sample: " + std::to_string(n_rows) + " rows in one call (at most 65,535)");
    // As many blocks as the GPU holds at once (at least kSpreadIds ids each): 16 a row of
    // 16,384 ids at batch 1, 2 at batch 256.
    if (resident_ == 0) {
      int device = 0, sms = 0, per_sm = 0;
      check(cudaGetDevice(&device), "cudaGetDevice");
      check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "SM count");
      check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, sample_spread_kernel,
                                                          kSpreadThreads, 0),
            "sample: occupancy");
      resident_ = std::max(1, sms * per_sm);
    }
    const int most = std::min((vocab + kSpreadIds - 1) / kSpreadIds, kMaxSpreadBlocks);
    const int want = std::clamp(resident_ / n_rows, 1, most);
    const int per_block =
        ((vocab + want - 1) / want + kSpreadThreads - 1) / kSpreadThreads * kSpreadThreads;
    const int blocks = (vocab + per_block - 1) / per_block;  // none empty
    if (tickets_.resize(n_rows))  // the tickets start at 0
      check(cudaMemsetAsync(tickets_.get(), 0, tickets_.size() * sizeof(unsigned), st),
            "sample: tickets");
    parts_.resize(size_t(n_rows) * blocks * sizeof(SpreadPart));
    sample_spread_kernel<<<dim3(blocks, n_rows), kSpreadThreads, 0, st>>>(
        logits, vocab, per_block, rows_on_device, pens,
        reinterpret_cast<SpreadPart*>(parts_.get()), tickets_.get(), tokens, logprobs);
    check_launch("sample_spread");
  }
  if (spread == n_rows) return;
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
