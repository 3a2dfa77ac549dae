#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cstdlib>

#include "../engine/src/fma_cpu.h"
#include "block_reduce.cuh"
#include "fma_cuda.cuh"
#include "overlap.cuh"

namespace mp::cuda {
namespace {

constexpr int kThreads = 64;         // one thread per query of a fine-block tile
constexpr int kTile = 32;            // keys staged in shared memory at a time
// Warps sharing one decode query's keys: 8, or 32 when the step has too few (sequence, head)
// blocks to fill the GPU (kDecodeFewBlocks or fewer), whose latency is then the step's.
constexpr int kDecodeWarps = 8, kDecodeWarpsFew = 32, kDecodeFewBlocks = 128;
constexpr int kMaxDecodeSplits = 8;  // the key ranges of one few-sequence block (decode_splits)
// The fewest keys a split takes: m = 256's 512 fine keys in one block decode faster at batches
// 1-8 than in 4 blocks of 128 (docs/PERF.md, session 23), the merge's second phase costing more
// than the shorter key loop gives.
constexpr int kDecodeSplitKeys = 512;
static_assert(kDecodeTickets >= kDecodeFewBlocks);  // a ticket per split (sequence, head)
constexpr int kDecodeUnroll = 4;  // loads a decode lane has in flight: bf16 rows (fp32: half)

// A summary thread's outputs: channel ch of kSumHeads KV heads from h0 and kSumRanks summaries
// from r0, so that each key value it loads serves several ranks and each weight several heads.
// The kernels are instantiated for tiles of 2, 4 and 8 heads and ranks (launch: the smallest
// that covers the model's, or 8).
struct SumTile {
  int ch, h0, r0;
};
template <int kSumHeads, int kSumRanks>
__host__ __device__ int sum_tiles(const FmaShape& s) {
  return s.d * ((s.kv + kSumHeads - 1) / kSumHeads) * ((s.p + kSumRanks - 1) / kSumRanks);
}
template <int kSumHeads, int kSumRanks>
__device__ SumTile sum_tile(const FmaShape& s, int idx) {
  const int head_groups = (s.kv + kSumHeads - 1) / kSumHeads, rest = idx / s.d;
  return {idx % s.d, (rest % head_groups) * kSumHeads, (rest / head_groups) * kSumRanks};
}

// acc += the contributions of the chunk's tokens [from, to) to group g's outputs of the tile:
// summary r0 + rr of channel ch for KV head h0 + hh is acc[hh][rr].
// pl: the level's rank (W is [w][pl*d][in]); paired: rotary key summaries, each output reading
// channel ch and its RoPE partner.
template <int kSumHeads, int kSumRanks>
__device__ void group_sums(const FmaShape& s, const ChunkDesc& c, const float* W, int pl,
                           bool paired, int w, int64_t g, int64_t from, int64_t to,
                           const SumTile& tl, const float* x, float (&acc)[kSumHeads][kSumRanks]) {
  const int pd = pl * s.d;
  auto row = [&](int64_t t) { return x + (int64_t(c.row0) + (t - c.pos0)) * s.kv * s.d; };
  if (paired) {
    const int partner = tl.ch < s.d / 2 ? tl.ch + s.d / 2 : tl.ch - s.d / 2;
    for (int64_t t = from; t < to; ++t) {
      const float* xr = row(t);
      float xv[kSumHeads], xp[kSumHeads];
#pragma unroll
      for (int hh = 0; hh < kSumHeads; ++hh) {
        const bool ok = tl.h0 + hh < s.kv;
        xv[hh] = ok ? xr[(tl.h0 + hh) * s.d + tl.ch] : 0.0f;
        xp[hh] = ok ? xr[(tl.h0 + hh) * s.d + partner] : 0.0f;
      }
      const float* wr = W + (int64_t(t - g * w) * pd + tl.ch) * 2;
#pragma unroll
      for (int rr = 0; rr < kSumRanks; ++rr) {
        const int r = tl.r0 + rr;
        if (r >= pl) break;
        const float w_own = wr[int64_t(r) * s.d * 2], w_partner = wr[int64_t(r) * s.d * 2 + 1];
#pragma unroll
        for (int hh = 0; hh < kSumHeads; ++hh) acc[hh][rr] += w_own * xv[hh] + w_partner * xp[hh];
      }
    }
    return;
  }
  // acc += weight(rank) * x[head] for input channel i of token t (tg: its index in the group).
  auto add = [&](const float* row, int tg, int i) {
    float xv[kSumHeads];
#pragma unroll
    for (int hh = 0; hh < kSumHeads; ++hh)
      xv[hh] = tl.h0 + hh < s.kv ? row[(tl.h0 + hh) * s.d + i] : 0.0f;
    const float* wr = W ? W + (int64_t(tg) * pd + tl.ch) * s.in + (s.in > 1 ? i : 0) : nullptr;
#pragma unroll
    for (int rr = 0; rr < kSumRanks; ++rr) {
      const int r = tl.r0 + rr;
      if (r >= pl) break;
      const float wt =
          s.avgpool ? (tg / (w / pl) == r ? 1.0f / (w / pl) : 0.0f) : wr[int64_t(r) * s.d * s.in];
#pragma unroll
      for (int hh = 0; hh < kSumHeads; ++hh) acc[hh][rr] += wt * xv[hh];
    }
  };
  if (s.in > 1) {  // conv: every input channel
    for (int64_t t = from; t < to; ++t)
      for (int i = 0; i < s.d; ++i) add(row(t), int(t - g * w), i);
  } else {  // groupedconv, avgpool: channel ch only
    for (int64_t t = from; t < to; ++t) add(row(t), int(t - g * w), tl.ch);
  }
}

// Every summary tile of the block: acc starts at init(at, o) for each of its outputs (at: the
// output's index h * p * d + o in a [kv][p * d] block, o its channel-rank index), takes the tokens
// [from, to) of group g of a level of rank pl, and goes to store(at, acc).
template <int kSumHeads, int kSumRanks, class Init, class Store>
__device__ void for_each_sum_tile(const FmaShape& s, const ChunkDesc& c, const float* W, int pl,
                                  bool paired, int w, int64_t g, int64_t from, int64_t to,
                                  const float* x, Init init, Store store) {
  const int pd = s.p * s.d;
  for (int idx = threadIdx.x; idx < sum_tiles<kSumHeads, kSumRanks>(s); idx += blockDim.x) {
    const SumTile tl = sum_tile<kSumHeads, kSumRanks>(s, idx);
    auto valid = [&](int hh, int rr) { return tl.h0 + hh < s.kv && tl.r0 + rr < pl; };
    auto at = [&](int hh, int rr) { return (tl.h0 + hh) * pd + (tl.r0 + rr) * s.d + tl.ch; };
    float acc[kSumHeads][kSumRanks];
#pragma unroll
    for (int hh = 0; hh < kSumHeads; ++hh)
#pragma unroll
      for (int rr = 0; rr < kSumRanks; ++rr)
        acc[hh][rr] = valid(hh, rr) ? init(at(hh, rr), (tl.r0 + rr) * s.d + tl.ch) : 0.0f;
    group_sums<kSumHeads, kSumRanks>(s, c, W, pl, paired, w, g, from, to, tl, x, acc);
#pragma unroll
    for (int hh = 0; hh < kSumHeads; ++hh)
#pragma unroll
      for (int rr = 0; rr < kSumRanks; ++rr)
        if (valid(hh, rr)) store(at(hh, rr), acc[hh][rr]);
  }
}

template <int kSumHeads, int kSumRanks>
__global__ void summarize_kernel(FmaShape s, Downsamplers dw, const ChunkDesc* chunks,
                                 const NewGroups* table, const SumItem* items, const float* k,
                                 const float* v, float* new_k, float* new_v) {
  const SumItem it = items[blockIdx.x];
  if (it.group < 0) return;  // padding of a decode step
  const bool values = blockIdx.z == 1;
  const ChunkDesc c = chunks[it.chunk];
  const int l = it.level, w = s.m << (l - 1), pd = s.p * s.d;
  const NewGroups ng = table[c.new_base + l - 1];
  const float* W = s.avgpool ? nullptr : (values ? dw.wv : dw.wk)[l - 1];
  const bool paired = s.paired_keys && !values;
  const float* bias = s.avgpool || paired ? nullptr : (values ? dw.bv : dw.bk)[l - 1];
  float* dst = (values ? new_v : new_k) + (int64_t(ng.offset) + it.group - ng.first) * s.kv * pd;
  // The group's first slice also brings the bias (start_groups_kernel put what the accumulator
  // held of the tokens before the chunk into the pool).
  const bool first = it.t_from == max(it.group * w, c.pos0);
  for_each_sum_tile<kSumHeads, kSumRanks>(
      s, c, W, s.rank[l - 1], paired, w, it.group, it.t_from, it.t_to, values ? v : k,
      [&](int, int o) { return first && bias ? bias[o] : 0.0f; },
      [&](int at, float a) { atomicAdd(dst + at, a); });
}

// Before summary kernels that add into shared places from several blocks, per (chunk, level)
// (items: the groups being filled): a group completed in the chunk that began before it gets what
// its accumulator holds (the tokens before the chunk) as its pool entry's start, and the
// accumulator of a group being filled that begins in the chunk starts from zero (its ring entry
// held an older group); one that began before keeps what it holds.
__global__ void start_groups_kernel(FmaShape s, CacheView cv, const ChunkDesc* chunks,
                                    const NewGroups* table, const SumItem* items, float* new_k,
                                    float* new_v) {
  const SumItem it = items[blockIdx.x];
  if (it.group < 0) return;  // padding of a decode step
  const ChunkDesc c = chunks[it.chunk];
  const int l = it.level, pd = s.p * s.d;
  const int64_t w = int64_t(s.m) << (l - 1);
  const bool values = blockIdx.z == 1;
  float* acc = (values ? cv.acc_v : cv.acc_k) + (int64_t(c.slot) * s.L + l - 1) * s.kv * pd;
  const NewGroups ng = table[c.new_base + l - 1];
  float* first = ng.count > 0 && ng.first * w < c.pos0
                     ? (values ? new_v : new_k) + int64_t(ng.offset) * s.kv * pd
                     : nullptr;
  const bool clear = it.group * w >= c.pos0;
  for (int i = threadIdx.x; i < s.kv * pd; i += blockDim.x) {
    if (first && (i % pd) / s.d < s.rank[l - 1]) first[i] = acc[i];
    if (clear) acc[i] = 0.0f;
  }
}

// Adds slice blockIdx.y (kAccumulateSlice tokens) of the chunk's tokens in a group being filled
// to its accumulator: the slices of a long chunk's top-level groups spread over the GPU instead
// of one block reading thousands of tokens one after another.
template <int kSumHeads, int kSumRanks>
__global__ void accumulate_kernel(FmaShape s, CacheView cv, Downsamplers dw,
                                  const ChunkDesc* chunks, const SumItem* items, const float* k,
                                  const float* v) {
  const SumItem it = items[blockIdx.x];
  if (it.group < 0) return;  // padding of a decode step
  const bool values = blockIdx.z == 1;
  const ChunkDesc c = chunks[it.chunk];
  const int l = it.level, w = s.m << (l - 1), pd = s.p * s.d;
  const int64_t from = max(it.group * w, c.pos0) + int64_t(blockIdx.y) * kAccumulateSlice;
  const int64_t to = min(from + kAccumulateSlice, c.pos0 + c.T);
  if (from >= to) return;
  const float* W = s.avgpool ? nullptr : (values ? dw.wv : dw.wk)[l - 1];
  const bool paired = s.paired_keys && !values;
  float* acc0 = (values ? cv.acc_v : cv.acc_k) + (int64_t(c.slot) * s.L + l - 1) * s.kv * pd;
  for_each_sum_tile<kSumHeads, kSumRanks>(
      s, c, W, s.rank[l - 1], paired, w, it.group, from, to, values ? v : k,
      [&](int, int) { return 0.0f; }, [&](int at, float a) { atomicAdd(acc0 + at, a); });
}

// append_tokens: blockIdx.x a chunk (one token), blockIdx.z keys or values; block y 0 also copies
// the token into the fine window, block y the level y + 1's update. The per-level path's sums in
// the same order (group_sums from the bias or zero, then added to what the accumulator held, or
// to zero where the group starts), so that both leave the same bits.
template <int kSumHeads, int kSumRanks>
__global__ void append_tokens_kernel(FmaShape s, CacheView cv, Downsamplers dw,
                                     const ChunkDesc* chunks, const float* k, const float* v) {
  const ChunkDesc c = chunks[blockIdx.x];
  if (c.T == 0) return;  // padding of a decode step
  const bool values = blockIdx.z == 1;
  const float* x = values ? v : k;
  const int64_t pos = c.pos0, kvd = int64_t(s.kv) * s.d;
  if (blockIdx.y == 0) {
    const float* src = x + int64_t(c.row0) * kvd;
    __nv_bfloat16* dst = (values ? cv.fine_v : cv.fine_k) +
                         (int64_t(c.slot) * cv.cap + (cv.ring ? pos % cv.cap : pos)) * kvd;
    for (int e = threadIdx.x; e < kvd; e += blockDim.x) dst[e] = __float2bfloat16(src[e]);
  }
  if (!s.fma) return;
  const int l = blockIdx.y + 1, w = s.m << (l - 1), pd = s.p * s.d, pl = s.rank[l - 1];
  const int64_t g = pos / w, slot_level = int64_t(c.slot) * s.L + l - 1;
  const bool starts = pos % w == 0, completes = pos % w == w - 1;
  const bool paired = s.paired_keys && !values;
  const float* W = s.avgpool ? nullptr : (values ? dw.wv : dw.wk)[l - 1];
  const float* bias =
      completes && !s.avgpool && !paired ? (values ? dw.bv : dw.bk)[l - 1] : nullptr;
  float* acc = (values ? cv.acc_v : cv.acc_k) + slot_level * s.kv * pd;
  float* ring = (values ? cv.sum_v : cv.sum_k) + (slot_level * 3 + g % 3) * s.kv * pd;
  for_each_sum_tile<kSumHeads, kSumRanks>(
      s, c, W, pl, paired, w, g, pos, pos + 1, x,
      [&](int, int o) { return bias ? bias[o] : 0.0f; },
      [&](int at, float a) {
        const float sum = (starts ? 0.0f : acc[at]) + a;
        if (completes) ring[at] = sum;
        acc[at] = completes ? 0.0f : sum;
      });
  // Ranks past the level's (not in the tiles): zeros in a new ring entry, and the accumulator
  // cleared where a group starts or ends, as the per-level path leaves them.
  if (pl == s.p || !(starts || completes)) return;
  for (int i = threadIdx.x; i < s.kv * pd; i += blockDim.x) {
    if ((i % pd) / s.d < pl) continue;
    if (completes) ring[i] = 0.0f;
    acc[i] = 0.0f;
  }
}

// The arrays a key (or its value: same layout, twin array) can live in.
enum KeyArray { kChunkRows, kFineWindow, kNewSummaries, kSummaryRing };

// A key's or value's row: fp32 (the chunk's rows, summaries) or bf16 (the cache's fine window),
// the bf16 kind marked by the address's low bit (rows are at least 8-byte aligned) so that a
// staged key list stays one word a key.
struct Row {
  uintptr_t bits;  // no initializer: Row lives in __shared__ arrays
  __device__ static Row of(const float* p) { return {reinterpret_cast<uintptr_t>(p)}; }
  __device__ static Row of(const __nv_bfloat16* p) { return {reinterpret_cast<uintptr_t>(p) | 1}; }
  __device__ bool bf16() const { return bits & 1; }
  __device__ explicit operator bool() const { return bits != 0; }
  __device__ const float* f32() const { return reinterpret_cast<const float*>(bits); }
  __device__ const __nv_bfloat16* b16() const {
    return reinterpret_cast<const __nv_bfloat16*>(bits & ~uintptr_t(1));
  }
  __device__ float at(int ch) const { return bf16() ? __bfloat162float(b16()[ch]) : f32()[ch]; }
};

struct KvArrays {
  const float* k[4];  // by KeyArray (the fine window's entry unused: it is bf16)
  const float* v[4];
  const __nv_bfloat16 *fine_k, *fine_v;
  // Selected, not indexed: an array indexed at run time lives in local memory, and every key
  // row's load then waited for a local load of its base (ncu, session 13).
  __device__ static const float* pick(const float* const (&a)[4], int which) {
    return which == 0 ? a[0] : which == 2 ? a[2] : a[3];
  }
  __device__ Row row(const float* const (&a)[4], const __nv_bfloat16* fine, int which,
                     int64_t off) const {
    return which == kFineWindow ? Row::of(fine + off) : Row::of(pick(a, which) + off);
  }
};
__device__ KvArrays kv_arrays(const CacheView& cv, const float* k, const float* v,
                              const float* new_k, const float* new_v) {
  return {{k, nullptr, new_k, cv.sum_k}, {v, nullptr, new_v, cv.sum_v}, cv.fine_k, cv.fine_v};
}

struct KeyLoc {
  int64_t off;  // in elements, in arrays k[which] and v[which]
  int which;
  float bonus;  // score offset: log(w/p) for a summary with scale_attn
  int64_t pos;  // the key's position; -1: a summary, visible to every query of the tile
};
// The key's and its value's rows.
__device__ Row key_row(const KvArrays& a, const KeyLoc& l) {
  return a.row(a.k, a.fine_k, l.which, l.off);
}
__device__ Row value_row(const KvArrays& a, const KeyLoc& l) {
  return a.row(a.v, a.fine_v, l.which, l.off);
}

// The coarse part of a query tile's key list, worked out once per tile (by one thread, into
// shared memory) so that resolving a key costs no 64-bit division: per level, the index of its
// first summary among the coarse keys, its first visible group and the score bonus.
struct LevelTable {
  int first[kMaxLevels + 1];  // first[L]: the number of coarse keys
  int64_t g0[kMaxLevels];
  int g0_mod3[kMaxLevels];
  float bonus[kMaxLevels];
};
__device__ void make_level_table(const FmaShape& s, int64_t q_begin, LevelTable& t) {
  const int L = s.fma ? s.L : 0;
  // Level l's groups are w = m << l wide: q / 2w = (q / m) >> (l + 1), and q % 2w >= w where bit
  // l of q / m is set; one 64-bit division for all levels (one a level, and two remainders, kept
  // a decode block's other warps waiting ~1 us at batch 1).
  const int64_t qm = q_begin / s.m;
  int n = 0;
  for (int l = 0; l < L; ++l) {
    const int64_t B = qm >> (l + 1);
    t.first[l] = n;
    t.g0[l] = 2 * B - 2;
    t.g0_mod3[l] = B >= 1 ? int((2 * B - 2) % 3) : 0;
    t.bonus[l] = s.scale_attn ? logf(float(int64_t(s.m) << l) / s.rank[l]) : 0.0f;
    if (B >= 1) n += (1 + int((qm >> l) & 1)) * s.rank[l];
  }
  t.first[L] = n;
}

// The size of a query tile's key list: n_fine fine keys from `lo`, then n_coarse summaries;
// lo_slot: lo's row in the fine window (lo % cap in a ring).
struct KeyList {
  int64_t lo, lo_slot, n_fine, n_coarse;
};
__device__ KeyList key_list(const FmaShape& s, const CacheView& cv, int64_t q_begin,
                            int64_t q_end, const LevelTable& t) {
  const int64_t b = q_begin / s.m;
  const int64_t lo = s.fma ? max(int64_t(0), (b - 1) * s.m) : 0;
  return {lo, cv.ring ? lo % cv.cap : lo, q_end - lo, t.first[s.fma ? s.L : 0]};
}

// The key list's first keys that are in the cache's fine window (bf16): the fine keys before the
// chunk; its own follow in its rows (fp32), then the summaries.
__device__ int64_t window_keys(const KeyList& kl, const ChunkDesc& c) {
  return min(kl.n_fine, max(int64_t(0), c.pos0 - kl.lo));
}

// Where key `kk` of a query tile's key list lives: fine keys first, then p summaries per visible
// group, level by level.
__device__ KeyLoc key_loc(const FmaShape& s, const CacheView& cv, const ChunkDesc& c,
                          const NewGroups* table, const LevelTable& t, const KeyList& kl,
                          int64_t kk, int kvh) {
  if (kk < kl.n_fine) {
    const int64_t j = kl.lo + kk;
    if (j >= c.pos0)
      return {(int64_t(c.row0) + (j - c.pos0)) * s.kv * s.d + int64_t(kvh) * s.d, kChunkRows, 0.0f,
              j};
    // The window's keys lie within cap of lo (one remainder a tile, not one a key).
    int64_t slot = kl.lo_slot + kk;
    if (cv.ring && slot >= cv.cap) slot -= cv.cap;
    return {((int64_t(c.slot) * cv.cap + slot) * s.kv + kvh) * s.d, kFineWindow, 0.0f, j};
  }
  int ci = static_cast<int>(kk - kl.n_fine), l = 0;
  while (ci >= t.first[l + 1]) ++l;
  ci -= t.first[l];
  const int gi = ci / s.rank[l], r = ci % s.rank[l], pd = s.p * s.d;
  const int64_t g = t.g0[l] + gi;
  const NewGroups ng = table[c.new_base + l];
  if (g >= ng.first)
    return {((int64_t(ng.offset) + g - ng.first) * s.kv + kvh) * pd + r * s.d, kNewSummaries,
            t.bonus[l], -1};
  return {(((int64_t(c.slot) * s.L + l) * 3 + (t.g0_mod3[l] + gi) % 3) * s.kv + kvh) * pd + r * s.d,
          kSummaryRing, t.bonus[l], -1};
}

// One value of an attention output: rounded to bf16 into out_bf16 (the o-projection's input)
// when it is given, else into out.
__device__ void store_output(float* out, __nv_bfloat16* out_bf16, int64_t at, float x) {
  if (out_bf16)
    out_bf16[at] = __float2bfloat16(x);
  else
    out[at] = x;
}

template <int D>
__global__ void __launch_bounds__(kThreads)
    attention_kernel(FmaShape s, CacheView cv, const ChunkDesc* chunks, const NewGroups* table,
                     const AttnItem* items, const float* q, const float* k, const float* v,
                     const float* new_k, const float* new_v, float* out,
                     __nv_bfloat16* out_bf16) {
  __shared__ float sk[kTile][D], sv[kTile][D], sbonus[kTile];
  __shared__ int64_t spos[kTile];
  __shared__ Row sksrc[kTile], svsrc[kTile];
  const AttnItem it = items[blockIdx.x];
  if (it.q_begin >= it.q_end) return;  // padding of a decode step
  const ChunkDesc c = chunks[it.chunk];
  const int h = blockIdx.y, kvh = h / (s.heads / s.kv);
  const int64_t i = it.q_begin + threadIdx.x;
  const bool active = i < it.q_end;
  const float scale = rsqrtf(float(D));
  float qr[D], acc[D];
  const float* qrow = q + ((int64_t(c.row0) + (i - c.pos0)) * s.heads + h) * D;
#pragma unroll
  for (int e = 0; e < D; ++e) {
    qr[e] = active ? qrow[e] * scale : 0.0f;
    acc[e] = 0.0f;
  }
  __shared__ LevelTable lt;
  if (threadIdx.x == 0) make_level_table(s, it.q_begin, lt);
  __syncthreads();
  const KeyList kl = key_list(s, cv, it.q_begin, it.q_end, lt);
  const int64_t n_fine = kl.n_fine, n_coarse = kl.n_coarse;
  const KvArrays arr = kv_arrays(cv, k, v, new_k, new_v);
  float mx = -INFINITY, denom = 0.0f;
  for (int64_t t0 = 0; t0 < n_fine + n_coarse; t0 += kTile) {
    const int n = static_cast<int>(min(int64_t(kTile), n_fine + n_coarse - t0));
    // Resolve each key's address once, then copy the tile coalesced: consecutive threads take
    // consecutive channels (a thread per key row was 32-way strided and bank-conflicted).
    for (int e = threadIdx.x; e < n; e += blockDim.x) {
      const KeyLoc kloc = key_loc(s, cv, c, table, lt, kl, t0 + e, kvh);
      sksrc[e] = key_row(arr, kloc);
      svsrc[e] = value_row(arr, kloc);
      sbonus[e] = kloc.bonus;
      spos[e] = kloc.pos;
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < n * D; idx += blockDim.x) {
      const int e = idx / D, ch = idx % D;
      sk[e][ch] = sksrc[e].at(ch);
      sv[e][ch] = svsrc[e].at(ch);
    }
    __syncthreads();
    if (active) {
      for (int e = 0; e < n; ++e) {
        if (spos[e] > i) continue;  // causal within the fine window
        float sc = 0;
#pragma unroll
        for (int ch = 0; ch < D; ++ch) sc += qr[ch] * sk[e][ch];
        sc += sbonus[e];
        const float nm = fmaxf(mx, sc);
        const float corr = __expf(mx - nm), pe = __expf(sc - nm);
        denom = denom * corr + pe;
#pragma unroll
        for (int ch = 0; ch < D; ++ch) acc[ch] = acc[ch] * corr + pe * sv[e][ch];
        mx = nm;
      }
    }
    __syncthreads();
  }
  if (!active) return;
  const int64_t at = ((int64_t(c.row0) + (i - c.pos0)) * s.heads + h) * D;
  const float inv = 1.0f / denom;
#pragma unroll
  for (int ch = 0; ch < D; ++ch) store_output(out, out_bf16, at + ch, acc[ch] * inv);
}

// The prefill tile on tensor cores (head_dim 64): the 64 queries of a tile share their key list,
// so S = Q K^T and O = P V are bf16 mma.sync products with fp32 accumulation, FlashAttention
// style: 4 warps of 16 queries, 64 keys a step, online softmax in registers. The next step's key
// and value rows are copied into shared memory with cp.async while this step's products run (the
// loads were waited on between every step's products: ncu, session 13), then converted to bf16.
namespace tc {
constexpr int kWarps = 4, kKeys = 64, kD = 64, kStride = kD + 8;  // padding: no bank conflicts
constexpr int kPieces = kKeys * kD / 4 / (kWarps * 32);           // 16-byte pieces a thread copies

struct Shared {
  // The next step's rows as read, copied by cp.async: fp32 rows fill a piece's 16 bytes, bf16
  // rows (the fine window) its first 8.
  float k32[kKeys][kD], v32[kKeys][kD];
  __nv_bfloat16 k[kKeys][kStride], v[kKeys][kStride];  // this step's, converted
  Row ksrc[kKeys], vsrc[kKeys];                        // the next step's K and V rows
  // [step parity]: this step's while the next one's are resolved. pos: the key's position less
  // the tile's first query's (32-bit compares), -1 for a summary (visible to every query).
  float bonus[2][kKeys];
  int pos[2][kKeys];
  LevelTable lt;
};

__device__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 b = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&b);
}
__device__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// Four 8x8 bf16 matrices; lane l gives the address of row l % 8 of matrix l / 8.
__device__ void ldmatrix_x4(uint32_t (&r)[4], const __nv_bfloat16* row, bool trans) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  if (trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
// 16 bytes from global to shared memory, through no registers; zeros where `fill` is false
// (src is then not read, but must be a valid address).
__device__ void cp_async16(float* dst, const float* src, bool fill) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                   static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
               "l"(src), "r"(fill ? 16 : 0)
               : "memory");
}
// 8 bytes alike (a bf16 row's 4 channels).
__device__ void cp_async8(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(
                   static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
               "l"(src)
               : "memory");
}
__device__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
}  // namespace tc

__global__ void __launch_bounds__(tc::kWarps * 32, 4)
    attention_tc_kernel(FmaShape s, CacheView cv, const ChunkDesc* chunks, const NewGroups* table,
                        const AttnItem* items, const float* q, const float* k, const float* v,
                        const float* new_k, const float* new_v, float* out,
                        __nv_bfloat16* out_bf16) {
  using namespace tc;
  extern __shared__ __align__(16) unsigned char tc_shared[];
  Shared& sh = *reinterpret_cast<Shared*>(tc_shared);
  const AttnItem it = items[blockIdx.x];
  if (it.q_begin >= it.q_end) return;
  const ChunkDesc c = chunks[it.chunk];
  const int h = blockIdx.y, kvh = h / (s.heads / s.kv);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  constexpr float kLog2e = 1.4426950408889634f;
  // This thread's two query rows (g and g + 8 of the warp's 16; qi: from the tile's first query)
  // and their Q fragments, scaled so that scores come out in log2 units.
  int qi[2];
  uint32_t qa[4][4];
#pragma unroll
  for (int r = 0; r < 2; ++r) qi[r] = warp * 16 + g + 8 * r;
  const float qscale = rsqrtf(float(kD)) * kLog2e;
#pragma unroll
  for (int ks = 0; ks < 4; ++ks)
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float2 x = make_float2(0.0f, 0.0f);
        if (it.q_begin + qi[r] < it.q_end)
          x = *reinterpret_cast<const float2*>(
              q + ((int64_t(c.row0) + (it.q_begin + qi[r] - c.pos0)) * s.heads + h) * kD + ks * 16 +
              half * 8 + 2 * t);
        qa[ks][r + 2 * half] = pack_bf16(x.x * qscale, x.y * qscale);
      }
  float o[8][4] = {}, mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.0f, 0.0f};
  if (threadIdx.x == 0) make_level_table(s, it.q_begin, sh.lt);
  __syncthreads();
  const KeyList kl = key_list(s, cv, it.q_begin, it.q_end, sh.lt);
  const int64_t n_keys = kl.n_fine + kl.n_coarse, n_win = window_keys(kl, c);
  const KvArrays arr = kv_arrays(cv, k, v, new_k, new_v);
  // The rows and metadata of the step from t0 (into metadata buffer b), a thread per key.
  auto resolve = [&](int64_t t0, int b) {
    if (threadIdx.x >= kKeys) return;
    const int e = threadIdx.x;
    if (t0 + e < n_keys) {
      const KeyLoc kloc = key_loc(s, cv, c, table, sh.lt, kl, t0 + e, kvh);
      sh.ksrc[e] = key_row(arr, kloc);
      sh.vsrc[e] = value_row(arr, kloc);
      sh.bonus[b][e] = kloc.bonus * kLog2e;
      sh.pos[b][e] = kloc.pos < it.q_begin ? -1 : static_cast<int>(kloc.pos - it.q_begin);
    } else {
      sh.ksrc[e] = sh.vsrc[e] = Row{0};
      sh.bonus[b][e] = 0.0f;
      sh.pos[b][e] = kKeys;  // after every query
    }
  };
  // Each thread copies, and later converts, the same pieces: piece i is channels 4 c4.. of key e.
  auto piece = [](int i, int& e, int& c4) {
    const int idx = threadIdx.x + i * kWarps * 32;
    e = idx / (kD / 4), c4 = idx % (kD / 4);
  };
  auto fetch = [&] {
#pragma unroll 4  // 4 at a time, here and in the conversion: all 8 at once spill registers
    for (int i = 0; i < kPieces; ++i) {
      int e, c4;
      piece(i, e, c4);
      const Row kr = sh.ksrc[e], vr = sh.vsrc[e];
      if (kr.bf16()) {
        cp_async8(&sh.k32[e][4 * c4], kr.b16() + 4 * c4);
        cp_async8(&sh.v32[e][4 * c4], vr.b16() + 4 * c4);
        continue;
      }
      const bool key = bool(kr);  // else zeros, from q: any valid address
      cp_async16(&sh.k32[e][4 * c4], key ? kr.f32() + 4 * c4 : q, key);
      cp_async16(&sh.v32[e][4 * c4], key ? vr.f32() + 4 * c4 : q, key);
    }
  };
  resolve(0, 0);
  __syncthreads();
  fetch();
  for (int64_t t0 = 0; t0 < n_keys; t0 += kKeys) {
    const int b = int(t0 / kKeys) & 1;
    const bool more = t0 + kKeys < n_keys;
    cp_async_wait_all();  // this thread's pieces of the step
    __syncthreads();      // the last step's products are done with the bf16 tiles and metadata
#pragma unroll 4
    for (int i = 0; i < kPieces; ++i) {
      int e, c4;
      piece(i, e, c4);
      uint2 *kd = reinterpret_cast<uint2*>(&sh.k[e][4 * c4]),
            *vd = reinterpret_cast<uint2*>(&sh.v[e][4 * c4]);
      if (t0 + e < n_win) {  // the fine window's, already bf16: the piece's first 8 bytes
        *kd = *reinterpret_cast<const uint2*>(&sh.k32[e][4 * c4]);
        *vd = *reinterpret_cast<const uint2*>(&sh.v32[e][4 * c4]);
        continue;
      }
      const float4 kx = *reinterpret_cast<const float4*>(&sh.k32[e][4 * c4]),
                   vx = *reinterpret_cast<const float4*>(&sh.v32[e][4 * c4]);
      *kd = make_uint2(pack_bf16(kx.x, kx.y), pack_bf16(kx.z, kx.w));
      *vd = make_uint2(pack_bf16(vx.x, vx.y), pack_bf16(vx.z, vx.w));
    }
    if (more) resolve(t0 + kKeys, b ^ 1);
    __syncthreads();  // bf16 tiles written, fp32 rows free, the next step's rows resolved
    if (more) fetch();
    // Keys from n16 on are past the list's end (zeros, masked): their products are skipped, which
    // saves most of the last step (a 1M tile's ~206 keys are 3 steps and 14 keys).
    const int n16 = static_cast<int>(min(int64_t(kKeys), n_keys - t0 + 15)) & ~15;
    // S = Q K^T: n-tile j holds keys 8j..8j+7.
    float sc[8][4] = {};
#pragma unroll
    for (int ks = 0; ks < 4; ++ks)
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        if (16 * np >= n16) continue;
        uint32_t b4[4];
        const int key = 16 * np + (lane & 7) + 8 * (lane >> 4),
                  ch = 16 * ks + 8 * ((lane >> 3) & 1);
        ldmatrix_x4(b4, &sh.k[key][ch], false);
        mma(sc[2 * np], qa[ks], b4[0], b4[1]);
        mma(sc[2 * np + 1], qa[ks], b4[2], b4[3]);
      }
    // Bonus, causal mask, online softmax (each row's 4 threads share its statistics).
    float scale[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = mrow[r];
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = 8 * j + 2 * t + e;
          float& x = sc[j][2 * r + e];
          x = sh.pos[b][key] > qi[r] ? -INFINITY : x + sh.bonus[b][key];
          mx = fmaxf(mx, x);
        }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float base = mx == -INFINITY ? 0.0f : mx;
      scale[r] = exp2f(mrow[r] - base);
      mrow[r] = mx;
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = sc[j][2 * r + e];
          x = exp2f(x - base);
          sum += x;
        }
      lrow[r] = lrow[r] * scale[r] + sum;
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      o[j][0] *= scale[0];
      o[j][1] *= scale[0];
      o[j][2] *= scale[1];
      o[j][3] *= scale[1];
    }
// O += P V: P's accumulator layout is the A fragment of the next product.
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      if (16 * kk >= n16) continue;
      const uint32_t pa[4] = {pack_bf16(sc[2 * kk][0], sc[2 * kk][1]),
                              pack_bf16(sc[2 * kk][2], sc[2 * kk][3]),
                              pack_bf16(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                              pack_bf16(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t b4[4];
        const int key = 16 * kk + (lane & 7) + 8 * ((lane >> 3) & 1),
                  ch = 16 * np + 8 * (lane >> 4);
        ldmatrix_x4(b4, &sh.v[key][ch], true);
        mma(o[2 * np], pa, b4[0], b4[1]);
        mma(o[2 * np + 1], pa, b4[2], b4[3]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = lrow[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (it.q_begin + qi[r] >= it.q_end) continue;
    const int64_t at = ((int64_t(c.row0) + (it.q_begin + qi[r] - c.pos0)) * s.heads + h) * kD;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float2 x = make_float2(o[j][2 * r] / l, o[j][2 * r + 1] / l);
      if (out_bf16)
        *reinterpret_cast<__nv_bfloat162*>(out_bf16 + at + 8 * j + 2 * t) =
            __float22bfloat162_rn(x);
      else
        *reinterpret_cast<float2*>(out + at + 8 * j + 2 * t) = x;
    }
  }
}

// Four channels of a row, widened to fp32: 8 bytes of bf16 (the fine window) or 16 of fp32.
__device__ float4 widen(uint2 r) {
  const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&r.x)),
               hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&r.y));
  return make_float4(lo.x, lo.y, hi.x, hi.y);
}

// One warp tile of a decode query's online softmax (flash-decoding's inner loop), shared by the
// FMA and exact decode kernels: LK lanes a key (4 channels each), 32 / LK keys a load, R loads a
// lane. kr, vr: this lane's channels of its R keys and values (zeros where !valid); bonus: their
// score offsets. mx ends equal in every lane (the warp tile's maximum is taken over the warp);
// den and acc hold this lane's keys' share, summed over the warp's keys by tile_sums at the end.
// nh: the heads of H that exist.
template <int H, int R, int LK>
__device__ void softmax_tile(const float (&qr)[H][4], const float4 (&kr)[R],
                             const float4 (&vr)[R], const float (&bonus)[R], const bool (&valid)[R],
                             int nh, float (&mx)[H], float (&den)[H], float (&acc)[H][4]) {
  float sc[H][R];
#pragma unroll
  for (int hh = 0; hh < H; ++hh)
#pragma unroll
    for (int r = 0; r < R; ++r)
      sc[hh][r] = qr[hh][0] * kr[r].x + qr[hh][1] * kr[r].y + qr[hh][2] * kr[r].z +
                  qr[hh][3] * kr[r].w;
#pragma unroll
  for (int o = LK / 2; o > 0; o >>= 1)  // a key's lanes: the whole dot product
#pragma unroll
    for (int hh = 0; hh < H; ++hh)
#pragma unroll
      for (int r = 0; r < R; ++r) sc[hh][r] += __shfl_xor_sync(0xffffffffu, sc[hh][r], o);
#pragma unroll
  for (int hh = 0; hh < H; ++hh) {
    if (hh >= nh) break;
    float tm = -INFINITY;  // the warp tile's maximum (its first key always exists)
#pragma unroll
    for (int r = 0; r < R; ++r)
      if (valid[r]) tm = fmaxf(tm, sc[hh][r] + bonus[r]);
#pragma unroll
    for (int o = LK; o < 32; o <<= 1) tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, o));
    const float nm = fmaxf(mx[hh], tm), corr = __expf(mx[hh] - nm);
    den[hh] *= corr;
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[hh][e] *= corr;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float p = valid[r] ? __expf(sc[hh][r] + bonus[r] - nm) : 0.0f;
      den[hh] += p;
      acc[hh][0] += p * vr[r].x, acc[hh][1] += p * vr[r].y, acc[hh][2] += p * vr[r].z,
          acc[hh][3] += p * vr[r].w;
    }
    mx[hh] = nm;
  }
}
// The warp's sums after its tiles: lanes of the same channels hold different keys' shares.
template <int H, int LK>
__device__ void tile_sums(float (&den)[H], float (&acc)[H][4]) {
#pragma unroll
  for (int o = LK; o < 32; o <<= 1)
#pragma unroll
    for (int hh = 0; hh < H; ++hh) {
      den[hh] += __shfl_xor_sync(0xffffffffu, den[hh], o);
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[hh][e] += __shfl_xor_sync(0xffffffffu, acc[hh][e], o);
    }
}
// Four channels of query row p (16-byte aligned), scaled.
__device__ void load_query(const float* p, float scale, float (&qr)[4]) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  qr[0] = t.x * scale, qr[1] = t.y * scale, qr[2] = t.z * scale, qr[3] = t.w * scale;
}

// A decode query's keys split over blocks (flash-decoding): split z (blockIdx.z) of query-head
// slot qh (item * heads + head) writes its D unnormalised outputs to partials[(qh * splits + z) * D
// + e] and, after the outputs of all gridDim.x items, its maximum and sum.
__device__ inline void write_split(float* partials, int heads, int64_t qh, int splits, int e,
                                   int D, float x, float m, float total) {
  const int64_t part = qh * splits + blockIdx.z;
  partials[part * D + e] = x;
  if (e == 0) {
    float* ml = partials + int64_t(gridDim.x) * heads * splits * D;
    ml[2 * part] = m, ml[2 * part + 1] = total;
  }
}
// Output e of slot qh from its first `used` splits (read past L1: other SMs wrote them; a split
// without keys has maximum -inf and adds nothing).
__device__ inline float merged_splits(const float* partials, int heads, int64_t qh, int splits,
                                      int used, int e, int D) {
  const float* ml = partials + int64_t(gridDim.x) * heads * splits * D;
  const int64_t part0 = qh * splits;
  float m = -INFINITY;
  for (int z = 0; z < used; ++z) m = fmaxf(m, __ldcg(&ml[2 * (part0 + z)]));
  float total = 0.0f, x = 0.0f;
  for (int z = 0; z < used; ++z) {
    const float mz = __ldcg(&ml[2 * (part0 + z)]), f = mz == -INFINITY ? 0.0f : __expf(mz - m);
    total += __ldcg(&ml[2 * (part0 + z) + 1]) * f;
    x += __ldcg(&partials[(part0 + z) * D + e]) * f;
  }
  return x / total;
}

// Decode: one query per (sequence, G heads of one KV head) block of W warps. The places of the
// key list's keys are worked out first, a key a thread, into shared memory (each warp resolving
// its own keys had all 32 lanes repeat the same 64-bit arithmetic, ~1,100 instructions a warp at
// batch 1), from the plan alone: before the wait for the kernel before (the q/k/v projection;
// overlap.cuh). Then each warp takes every W-th tile of keys, D / 4 lanes a key (4 channels a
// lane, so a load instruction reads 32 / (D / 4) keys), each key and value loaded once for the G
// heads, and keeps an online softmax per head over its keys (softmax_tile); the block merges the
// warps'. The fine window's keys (bf16, first in the list) and the rest (this step's own key and
// the summaries, fp32) go in loops of their own, so that each loop's loads are straight-line and
// a bf16 load carries 4 channels (8 bytes): with a warp a key and 2 channels a lane, bf16 rows
// halved the bytes of each load and ran 1.3x slower than fp32 ones (docs/PERF.md, session 27).
// Key lists longer than the block's threads go in stages.
// kSplits (steps of few sequences with long fine windows: decode_splits > 1): the key list is
// cut into `splits` ranges, one a block (blockIdx.z), each writing its unnormalised output,
// maximum and sum to `partials` as exact_decode_kernel does; the last block of a (sequence,
// heads) to finish (tickets) merges them. A template parameter, so that unsplit steps run the
// kernel without the split's arithmetic. Blocks of many sequences (W = kDecodeWarps) serving 1
// or 2 heads are held to 64 registers, 4 blocks a SM (77 without: 3), as the loads in flight are
// what the kernel's speed follows; 4 heads would spill (~200 bytes) there.
template <int D, int W, int G, bool kSplits>
__global__ void __launch_bounds__(W * 32, W == kDecodeWarps && G <= 2 ? 4 : 1)
    decode_attention_kernel(FmaShape s, CacheView cv, const ChunkDesc* chunks,
                            const NewGroups* table, const AttnItem* items, const float* q,
                            const float* k, const float* v, const float* new_k, const float* new_v,
                            int splits, unsigned* tickets, float* partials, float* out,
                            __nv_bfloat16* out_bf16) {
  static_assert(D % 4 == 0 && D <= 128);
  // Lanes a key, keys a load; loads a lane a tile: bf16 rows (8 bytes) and fp32 rows (16).
  constexpr int LK = D / 4, KP = 32 / LK, RB = kDecodeUnroll, RF = kDecodeUnroll / 2,
                kStage = W * 32;
  __shared__ float part[W][G][D];
  __shared__ float wmax[W][G], wsum[W][G];
  __shared__ LevelTable lt;
  __shared__ Row skey[kStage], sval[kStage];  // a stage's keys: their key and value rows
  __shared__ float sbonus[kStage];
  // Block-uniform, in shared memory: a later stage reads them again rather than registers hold
  // them through the loop (79 registers instead of 64 at d 64, G 2: 3 blocks a SM instead of 4).
  __shared__ ChunkDesc c;
  __shared__ KeyList kl;
  const AttnItem it = items[blockIdx.x];
  const int64_t i = it.q_begin;
  const bool real = i < it.q_end;  // false: padding of a decode step
  if (threadIdx.x == 0 && real) {
    make_level_table(s, i, lt);
    c = chunks[it.chunk];
    kl = key_list(s, cv, i, i + 1, lt);
  }
  __syncthreads();
  const int h0 = blockIdx.y * G, kvh = h0 / (s.heads / s.kv), lane = threadIdx.x & 31,
            warp = threadIdx.x >> 5, kq = lane / LK, ch = (lane % LK) * 4;
  const int64_t n = real ? kl.n_fine + kl.n_coarse : 0;
  // The list's first n_win keys are the window's, bf16 (the rest: this step's own key, in the
  // chunk's rows, then the summaries).
  const int64_t n_win = real ? window_keys(kl, c) : 0;
  int64_t kb = 0, len = n;  // this block's keys
  if constexpr (kSplits) {
    const int64_t per = (n + splits - 1) / splits;
    kb = min(n, blockIdx.z * per), len = min(n, kb + per) - kb;
  }
  auto stage = [&](int64_t s0) {  // keys kb + [s0, s0 + kStage): key kb + s0 + t by thread t
    const int64_t kk = kb + s0 + threadIdx.x;
    if (kk >= kb + len) return;
    const KeyLoc kloc = key_loc(s, cv, c, table, lt, kl, kk, kvh);
    const KvArrays arr = kv_arrays(cv, k, v, new_k, new_v);
    skey[threadIdx.x] = key_row(arr, kloc);
    sval[threadIdx.x] = value_row(arr, kloc);
    sbonus[threadIdx.x] = kloc.bonus;
  };
  stage(0);
  wait_for_previous();
  let_next_start();
  if (!real) return;
  const int64_t row = int64_t(c.row0) + (i - c.pos0);
  const float scale = rsqrtf(float(D));
  float qr[G][4], acc[G][4] = {}, mx[G], den[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    load_query(q + (row * s.heads + h0 + g) * D + ch, scale, qr[g]);
    mx[g] = -INFINITY, den[g] = 0.0f;
  }
  __syncthreads();  // the first stage is written
  for (int64_t s0 = 0; s0 < len; s0 += kStage) {
    if (s0 > 0) {
      __syncthreads();  // the last stage's keys are read
      stage(s0);
      __syncthreads();
    }
    const int ns = int(min(len - s0, int64_t(kStage)));
    const int nw = int(min(int64_t(ns), max(int64_t(0), n_win - kb - s0)));  // bf16 rows
    for (int t0 = warp * KP * RB; t0 < nw; t0 += W * KP * RB) {
      uint2 kw[RB], vw[RB];  // all loads first, widened only at their products
      bool valid[RB];
#pragma unroll
      for (int r = 0; r < RB; ++r) {
        const int t = t0 + r * KP + kq;
        valid[r] = t < nw;
        kw[r] = vw[r] = make_uint2(0, 0);
        if (!valid[r]) continue;
        kw[r] = __ldg(reinterpret_cast<const uint2*>(skey[t].b16() + ch));
        vw[r] = __ldg(reinterpret_cast<const uint2*>(sval[t].b16() + ch));
      }
      float4 kr[RB], vr[RB];
      float bonus[RB] = {};  // fine keys: none
#pragma unroll
      for (int r = 0; r < RB; ++r) kr[r] = widen(kw[r]), vr[r] = widen(vw[r]);
      softmax_tile<G, RB, LK>(qr, kr, vr, bonus, valid, G, mx, den, acc);
    }
    for (int t0 = nw + warp * KP * RF; t0 < ns; t0 += W * KP * RF) {
      float4 kr[RF], vr[RF];
      float bonus[RF];
      bool valid[RF];
#pragma unroll
      for (int r = 0; r < RF; ++r) {
        const int t = t0 + r * KP + kq;
        valid[r] = t < ns;
        kr[r] = vr[r] = make_float4(0, 0, 0, 0);
        bonus[r] = 0.0f;
        if (!valid[r]) continue;
        kr[r] = __ldg(reinterpret_cast<const float4*>(skey[t].f32() + ch));
        vr[r] = __ldg(reinterpret_cast<const float4*>(sval[t].f32() + ch));
        bonus[r] = sbonus[t];
      }
      softmax_tile<G, RF, LK>(qr, kr, vr, bonus, valid, G, mx, den, acc);
    }
  }
  tile_sums<G, LK>(den, acc);
  // Merge: each warp's share rescaled to the block's maximum, per head.
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (lane == 0) wmax[warp][g] = mx[g], wsum[warp][g] = den[g];
    if (kq == 0)
#pragma unroll
      for (int e = 0; e < 4; ++e) part[warp][g][ch + e] = acc[g][e];
  }
  __syncthreads();
  // P threads (lanes of one warp) an output channel, each over every P-th warp's share, then
  // shuffles: at batch 1 (32 warps, one head) 64 threads each looped over all 32 warps.
  constexpr int P = W * 32 >= 32 * G * D ? 32 : W * 32 > G * D ? W * 32 / (G * D) : 1;
  static_assert((P & (P - 1)) == 0);
  const int sub = threadIdx.x % P;
  for (int e0 = 0; e0 < G * D; e0 += W * 32 / P) {
    const int e = e0 + threadIdx.x / P, g = e < G * D ? e / D : 0, ch = e % D;
    float m = -INFINITY;
    for (int w = sub; w < W; w += P) m = fmaxf(m, wmax[w][g]);
#pragma unroll
    for (int o = P / 2; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float total = 0, x = 0;
    for (int w = sub; w < W; w += P) {
      const float f = wmax[w][g] == -INFINITY ? 0.0f : __expf(wmax[w][g] - m);
      total += wsum[w][g] * f;
      x += part[w][g][ch] * f;
    }
#pragma unroll
    for (int o = P / 2; o > 0; o >>= 1) {
      total += __shfl_xor_sync(0xffffffffu, total, o);
      x += __shfl_xor_sync(0xffffffffu, x, o);
    }
    if (e >= G * D || sub != 0) continue;
    if constexpr (!kSplits)
      store_output(out, out_bf16, (row * s.heads + h0 + g) * D + ch, x / total);
    else
      write_split(partials, s.heads, int64_t(blockIdx.x) * s.heads + h0 + g, splits, ch, D, x, m,
                  total);
  }
  if constexpr (kSplits) {
    if (!last_block_to_arrive(&tickets[blockIdx.x * gridDim.y + blockIdx.y], splits)) return;
    for (int e = threadIdx.x; e < G * D; e += W * 32) {
      const int64_t qh = int64_t(blockIdx.x) * s.heads + h0 + e / D;
      store_output(out, out_bf16, (row * s.heads + h0 + e / D) * D + e % D,
                   merged_splits(partials, s.heads, qh, splits, splits, e % D, D));
    }
  }
}

// Heads a decode block of many serves: the largest of 4, 2, 1 that divides a KV head's query
// heads (each key and value loaded once for them).
int decode_heads_per_block(const FmaShape& s) {
  const int r = s.heads / s.kv;
  return r % 4 == 0 ? 4 : r % 2 == 0 ? 2 : 1;
}

// Exact-attention decode (s.fma false), flash-decoding: a query's keys are the whole fine cache,
// up to max_context of them, so one block per (sequence, head) leaves the GPU waiting on memory.
// Here the keys are split over `splits` blocks per (sequence, KV head), each block serving up to
// heads(s) query heads of its KV head (GQA: each key and value is loaded once for all of them).
// A key row is D / 4 lanes of 16-byte loads; each lane has kKeysPerLane keys' K and V loads in
// flight before it uses them, and keeps an online softmax per head, rescaled once per warp tile.
// Each block merges its warps and writes its split's unnormalised output with its maximum and
// denominator; exact_combine_kernel merges the splits (one split: the block writes the output).
namespace xd {
constexpr int kWarps = 4;
constexpr int kKeysPerLane = 4;
constexpr int kMaxHeads = 4;
constexpr int kBlocksPerSm = 16;  // the grid's target: several waves of short blocks
// Keys a block takes per round (all its warps); a split is a multiple of it.
__host__ __device__ constexpr int block_tile(int d) { return kWarps * kKeysPerLane * 32 / (d / 4); }
// Query heads a block serves: a KV head's group rounded up to 1, 2 or 4 (a block of 4 computing
// a group of 2 spent half its dot products and shuffles on heads that do not exist).
inline int heads(const FmaShape& s) {
  const int group = s.heads / s.kv;
  return group >= 3 ? kMaxHeads : group;
}
inline int head_blocks(const FmaShape& s) { return (s.heads / s.kv + heads(s) - 1) / heads(s); }
// Keys per split for a query with n keys (all splits but the last are full).
__device__ inline int64_t split_keys(int64_t n, int splits, int d) {
  const int64_t t = block_tile(d), per = (n + splits - 1) / splits;
  return (per + t - 1) / t * t;
}
}  // namespace xd

template <int D, int H>
__global__ void __launch_bounds__(xd::kWarps * 32)
    exact_decode_kernel(FmaShape s, CacheView cv, const ChunkDesc* chunks, const AttnItem* items,
                        const float* q, const float* k, const float* v, int splits,
                        float* partials, float* out, __nv_bfloat16* out_bf16) {
  static_assert(D % 4 == 0 && D <= 128);
  constexpr int LK = D / 4, KP = 32 / LK, R = xd::kKeysPerLane,
                WT = KP * R;  // lanes a key, keys a load instruction, keys a warp tile
  __shared__ float wm[xd::kWarps][H], wl[xd::kWarps][H], wo[xd::kWarps][H][D];
  const AttnItem it = items[blockIdx.x];
  if (it.q_begin >= it.q_end) return;  // padding of a decode step
  const ChunkDesc c = chunks[it.chunk];
  const int group = s.heads / s.kv, hb = (group + H - 1) / H;
  const int kvh = blockIdx.y / hb, h0 = kvh * group + (blockIdx.y % hb) * H;
  const int nh = min(H, (kvh + 1) * group - h0);
  const int64_t i = it.q_begin, n = i + 1, len = xd::split_keys(n, splits, D);
  const int64_t k_begin = blockIdx.z * len, k_end = min(n, k_begin + len);
  if (k_begin >= k_end) return;  // past the keys: the combine reads only splits with keys
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, kl = lane / LK, ch = (lane % LK) * 4;
  const int64_t row = int64_t(c.row0) + (i - c.pos0), kvd = int64_t(s.kv) * D;
  const float scale = rsqrtf(float(D));
  float qr[H][4], acc[H][4] = {}, mx[H], den[H];
#pragma unroll
  for (int hh = 0; hh < H; ++hh) {
    if (hh < nh)
      load_query(q + (row * s.heads + h0 + hh) * D + ch, scale, qr[hh]);
    else
      qr[hh][0] = qr[hh][1] = qr[hh][2] = qr[hh][3] = 0.0f;
    mx[hh] = -INFINITY, den[hh] = 0.0f;
  }
  // Key j < i is in the cache (bf16); key i, this step's own, still in the chunk's rows (fp32).
  const int64_t cache0 = (int64_t(c.slot) * cv.cap * s.kv + kvh) * D + ch;
  const __nv_bfloat16 *fk = cv.fine_k + cache0, *fv = cv.fine_v + cache0;
  const float *ck = k + (row * s.kv + kvh) * D + ch, *cvv = v + (row * s.kv + kvh) * D + ch;
  for (int64_t t0 = k_begin + warp * WT; t0 < k_end; t0 += int64_t(WT) * xd::kWarps) {
    float4 kr[R], vr[R];
    const float bonus[R] = {};
    bool valid[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t j = t0 + r * KP + kl;
      valid[r] = j < k_end;
      kr[r] = vr[r] = make_float4(0, 0, 0, 0);
      if (!valid[r]) continue;
      if (j < i) {
        kr[r] = widen(__ldg(reinterpret_cast<const uint2*>(fk + j * kvd)));
        vr[r] = widen(__ldg(reinterpret_cast<const uint2*>(fv + j * kvd)));
      } else {
        kr[r] = __ldg(reinterpret_cast<const float4*>(ck));
        vr[r] = __ldg(reinterpret_cast<const float4*>(cvv));
      }
    }
    softmax_tile<H, R, LK>(qr, kr, vr, bonus, valid, nh, mx, den, acc);
  }
  tile_sums<H, LK>(den, acc);
  if (kl == 0)
#pragma unroll
    for (int hh = 0; hh < H; ++hh) {
      if (lane == 0) wm[warp][hh] = mx[hh], wl[warp][hh] = den[hh];
#pragma unroll
      for (int e = 0; e < 4; ++e) wo[warp][hh][ch + e] = acc[hh][e];
    }
  __syncthreads();
  for (int t = threadIdx.x; t < nh * D; t += blockDim.x) {
    const int hh = t / D, e = t % D;
    float m = wm[0][hh];
    for (int w = 1; w < xd::kWarps; ++w) m = fmaxf(m, wm[w][hh]);
    float total = 0.0f, x = 0.0f;
    for (int w = 0; w < xd::kWarps; ++w) {
      const float f = wm[w][hh] == -INFINITY ? 0.0f : __expf(wm[w][hh] - m);
      total += wl[w][hh] * f;
      x += wo[w][hh][e] * f;
    }
    const int64_t at = (row * s.heads + h0 + hh) * D + e;
    if (splits == 1) {
      store_output(out, out_bf16, at, x / total);
      continue;
    }
    write_split(partials, s.heads, int64_t(blockIdx.x) * s.heads + h0 + hh, splits, e, D, x, m,
                total);
  }
}

// The splits of exact_decode_kernel merged: one block per (item, head), a thread per channel.
template <int D>
__global__ void exact_combine_kernel(FmaShape s, const ChunkDesc* chunks, const AttnItem* items,
                                     int splits, const float* partials, float* out,
                                     __nv_bfloat16* out_bf16) {
  const AttnItem it = items[blockIdx.x];
  if (it.q_begin >= it.q_end) return;
  const ChunkDesc c = chunks[it.chunk];
  const int h = blockIdx.y, e = threadIdx.x;
  const int64_t n = it.q_begin + 1, len = xd::split_keys(n, splits, D);
  const int used = int((n + len - 1) / len);  // splits that have keys
  const int64_t at = ((int64_t(c.row0) + (it.q_begin - c.pos0)) * s.heads + h) * D + e;
  store_output(out, out_bf16, at,
               merged_splits(partials, s.heads, int64_t(blockIdx.x) * s.heads + h, splits, used, e,
                             D));
}

// Summaries in one pass (one_pass()): a block reads a token range of a chunk once, for 16
// channels (8 and their RoPE partners, d/2 further) of every KV head, keys or values, and adds
// each token into the group of every level that holds it. Levels' taps applied to 16 tokens
// are an mma per channel: [16 heads x 16 tokens] x [16 tokens x 8 columns], the columns the
// ranks of two levels (ranks <= 4) or of one, bf16 with fp32 accumulators in registers, written
// out when a level's group ends. Each level is summed from the tokens themselves: groupedconv's
// learned taps differ from level to level, so a level's group is not a function of the two
// summaries below it (avgpool's is, their mean, but costs no less read here). Tiles of 32 tokens
// are staged in shared memory as bf16, the next tile's loads in flight during the products.
namespace op {
constexpr int kWarps = 16;     // one staged channel each
constexpr int kChannels = 16;  // staged per block: 8 channels and their partners
constexpr int kHeads = 16;     // the mma's rows
constexpr int kSpan = 32, kRow = kSpan + 8;  // padding: conflict-free fragment loads and stores
constexpr int kLoads = kSpan * kHeads * kChannels / 4 / (kWarps * 32);  // float4s a thread stages
}  // namespace op

// The B fragment of a level's taps at in-group offset `off` (a multiple of 16): rank r's taps on
// this lane's tokens (2t, 2t+1 and 2t+8, 2t+9 of the 16), zero past the level's rank pl.
__device__ void tap_fragment(const FmaShape& s, const __nv_bfloat16* taps, int tap, int pl, int w,
                             int ch, int off, int r, int t, uint32_t& b0, uint32_t& b1) {
  b0 = b1 = 0;
  if (r >= pl) return;
  if (!taps) {  // avgpool: rank r is the mean of tokens [r * w/pl, (r+1) * w/pl)
    const int span = w / pl;
    const float inv = 1.0f / float(span);
    auto tapv = [&](int o) { return o / span == r ? inv : 0.0f; };
    const int o = off + 2 * t;
    b0 = tc::pack_bf16(tapv(o), tapv(o + 1));
    b1 = tc::pack_bf16(tapv(o + 8), tapv(o + 9));
    return;
  }
  const uint2 x = *reinterpret_cast<const uint2*>(
      taps + ((int64_t(tap) * s.d + ch) * pl + r) * w + off + 4 * t);
  b0 = x.x, b1 = x.y;
}

// kRanks: the mma's 8 columns are the ranks of 2 levels (kRanks 4) or of 1 (kRanks 8), so that
// a fragment holds kFrags * 8 / kRanks levels.
template <int kRanks, int kFrags>
__global__ void __launch_bounds__(op::kWarps * 32, 1)
    one_pass_kernel(FmaShape s, CacheView cv, Downsamplers dw, const ChunkDesc* chunks,
                    const NewGroups* table, const SumItem* ranges, bool split, const float* k,
                    const float* v, float* new_k, float* new_v) {
  using namespace op;
  constexpr int kPer = 8 / kRanks;  // levels per fragment
  __shared__ __align__(16) __nv_bfloat16 sx[2][kChannels][kHeads][kRow];
  // The blocks of one range (its strips, keys and values) are neighbours: they read the same
  // rows at about the same time.
  const int per_range = s.d / kChannels * 2;
  const SumItem it = ranges[blockIdx.x / per_range];
  if (it.group < 0) return;  // padding of a decode step
  const int strip = (blockIdx.x % per_range) / 2;
  const bool values = blockIdx.x % 2 == 1;
  const bool paired = s.paired_keys && !values;
  const ChunkDesc c = chunks[it.chunk];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  // Accumulator element e of this lane: head g + 8 (e / 2), rank r0 + e % 2 of the fragment's
  // level `sub`; its B column g: rank col_rank of level col_sub.
  const int sub = kPer == 2 ? t >> 1 : 0, r0 = kPer == 2 ? 2 * (t & 1) : 2 * t;
  const int col_sub = kPer == 2 ? g >> 2 : 0, col_rank = kPer == 2 ? g & 3 : g;
  // Staged channel i: strip * 8 + i for i < 8, else its partner d/2 further.
  auto channel = [&](int i) { return (i < 8 ? 0 : s.d / 2 - 8) + strip * 8 + i; };
  const int ch = channel(warp);
  const float* x = values ? v : k;
  const int64_t from = it.t_from, to = it.t_to, end = c.pos0 + c.T;
  const int log_m = __ffs(s.m) - 1, pd = s.p * s.d;

  // Thread's float4 `i` of a tile: lanes over 8 heads x 4 tokens (conflict-free bf16 stores).
  float4 pre[kLoads];
  auto slot = [&](int i, int& h, int& tok, int& c4) {
    const int q = i * kWarps * 32 + threadIdx.x, rest = q >> 5;
    h = (rest & 1) * 8 + (q & 7), tok = ((rest >> 1) & 7) * 4 + ((q >> 3) & 3), c4 = rest >> 4;
  };
  auto load = [&](int64_t tile) {
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      int h, tok, c4;
      slot(i, h, tok, c4);
      const int64_t pos = tile + tok;
      pre[i] = make_float4(0, 0, 0, 0);
      if (h < s.kv && pos >= from && pos < to)
        pre[i] = *reinterpret_cast<const float4*>(
            x + (int64_t(c.row0) + (pos - c.pos0)) * s.kv * s.d + h * s.d + channel(c4 * 4));
    }
  };
  auto store = [&](int buf) {
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      int h, tok, c4;
      slot(i, h, tok, c4);
      sx[buf][c4 * 4 + 0][h][tok] = __float2bfloat16(pre[i].x);
      sx[buf][c4 * 4 + 1][h][tok] = __float2bfloat16(pre[i].y);
      sx[buf][c4 * 4 + 2][h][tok] = __float2bfloat16(pre[i].z);
      sx[buf][c4 * 4 + 3][h][tok] = __float2bfloat16(pre[i].w);
    }
  };

  // Levels [0, n) end the groups holding token `pos`. The lanes stage their sums as
  // [level][head][rank][16 channels] in `out` (a tile buffer not being read; rows padded and
  // levels a float apart so that the fragments' stores do not conflict), then threads own runs
  // of channels: the pool (groups completed in the chunk) or the accumulators (being filled) get
  // whole 32-byte sectors, not one value a sector. A block that holds all of the group's tokens
  // of the chunk writes it; else the blocks add into it (start_groups_kernel started it).
  constexpr int kOutRow = kChannels + 1, kOutLevel = kHeads * kRanks * kOutRow + 1;
  constexpr int kOutLevels = int(sizeof(sx[0]) / sizeof(float)) / kOutLevel;
  auto flush = [&](int n, int64_t pos, float* out, float(&acc)[kFrags][4]) {
    for (int l0 = 0; l0 < n; l0 += kOutLevels) {
      const int staged = min(n - l0, kOutLevels);
#pragma unroll
      for (int j = 0; j < kFrags; ++j) {
        const int li = j * kPer + sub - l0;
        if (li < 0 || li >= staged) continue;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          out[li * kOutLevel + ((g + 8 * (e >> 1)) * kRanks + r0 + (e & 1)) * kOutRow + warp] =
              acc[j][e];
          acc[j][e] = 0.0f;
        }
      }
      __syncthreads();
#pragma unroll 1
      for (int i = 0; i < staged; ++i) {
        const int l = l0 + i, w = s.m << l, pl = s.rank[l];
        const int64_t grp = pos >> (log_m + l), gs = grp << (log_m + l);
        const int64_t lo = max(gs, c.pos0), hi = min(gs + w, end);
        const bool completed = gs + w <= end, owner = lo >= from, before = gs < c.pos0;
        const bool plain = owner && hi <= to && !(split && before);
        float* accum = (values ? cv.acc_v : cv.acc_k) + (int64_t(c.slot) * s.L + l) * s.kv * pd;
        float* dst = accum;
        if (completed) {
          const NewGroups ng = table[c.new_base + l];
          dst = (values ? new_v : new_k) + (int64_t(ng.offset) + grp - ng.first) * s.kv * pd;
        }
        const float* bias =
            completed && owner && !s.avgpool && !paired ? (values ? dw.bv : dw.bk)[l] : nullptr;
        for (int q = threadIdx.x; q < s.kv * kRanks * kChannels; q += kWarps * 32) {
          const int ci = q % kChannels, r = q / kChannels % kRanks, h = q / (kChannels * kRanks);
          if (r >= s.p || (r >= pl && !plain)) continue;
          const int at = h * pd + r * s.d + channel(ci);
          // Unsplit, the tokens before the chunk are still in the accumulator (read before this
          // thread overwrites it with a later group's sums). Ranks past the level's are zeros.
          const float val = r >= pl ? 0.0f
                                    : out[i * kOutLevel + (h * kRanks + r) * kOutRow + ci] +
                                          (bias ? bias[r * s.d + channel(ci)] : 0.0f) +
                                          (!split && before ? accum[at] : 0.0f);
          if (plain)
            dst[at] = val;
          else
            atomicAdd(dst + at, val);
        }
      }
      __syncthreads();  // `out` is staged into or loaded next
    }
  };

  float acc[kFrags][4];
#pragma unroll
  for (int j = 0; j < kFrags; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;
  const int64_t first_step = from & ~int64_t(15);
  int64_t tile = from & ~int64_t(kSpan - 1);
  load(tile);
  store(0);
  __syncthreads();
  for (int buf = 0; tile < to; tile += kSpan, buf ^= 1) {
    if (tile + kSpan < to) load(tile + kSpan);
#pragma unroll 1
    for (int kk = 0; kk < kSpan / 16; ++kk) {
      const int64_t k0 = tile + kk * 16;
      if (k0 < first_step || k0 >= to) continue;
      // Levels [0, ends) have a group ending at k0 - 1: those whose w divides k0.
      const int ends = k0 > first_step && (k0 & (s.m - 1)) == 0
                           ? min(s.L, __ffsll(static_cast<long long>(k0)) - log_m)
                           : 0;
      if (ends > 0) flush(ends, k0 - 1, reinterpret_cast<float*>(sx[buf ^ 1]), acc);
      uint32_t a[4], ap[4];
      auto fragment = [&](int i, uint32_t(&f)[4]) {
        const __nv_bfloat16* row_g = &sx[buf][i][g][kk * 16 + 2 * t];
        const __nv_bfloat16* row_g8 = &sx[buf][i][g + 8][kk * 16 + 2 * t];
        f[0] = *reinterpret_cast<const uint32_t*>(row_g);
        f[1] = *reinterpret_cast<const uint32_t*>(row_g8);
        f[2] = *reinterpret_cast<const uint32_t*>(row_g + 8);
        f[3] = *reinterpret_cast<const uint32_t*>(row_g8 + 8);
      };
      fragment(warp, a);
      if (paired) fragment(warp ^ 8, ap);  // the channel's RoPE partner
      // The taps of kGroup fragments are loaded before their products: each load is an L2
      // round trip, and loaded one before each product they were waited on one after another.
      constexpr int kGroup = kFrags < 4 ? kFrags : 4;
#pragma unroll
      for (int j0 = 0; j0 < kFrags; j0 += kGroup) {
        if (j0 * kPer >= s.L) break;
        uint32_t b[kGroup][2], bp[kGroup][2];
#pragma unroll
        for (int i = 0; i < kGroup; ++i) {
          const int l = (j0 + i) * kPer + col_sub, w = s.m << l, off = int(k0 & (w - 1));
          b[i][0] = b[i][1] = bp[i][0] = bp[i][1] = 0;
          if (l >= s.L) continue;
          const __nv_bfloat16* taps = s.avgpool ? nullptr : values ? dw.tv[l] : dw.tk[l];
          tap_fragment(s, taps, 0, s.rank[l], w, ch, off, col_rank, t, b[i][0], b[i][1]);
          if (paired)
            tap_fragment(s, dw.tk[l], 1, s.rank[l], w, ch, off, col_rank, t, bp[i][0], bp[i][1]);
        }
#pragma unroll
        for (int i = 0; i < kGroup; ++i) {
          if ((j0 + i) * kPer >= s.L) break;
          tc::mma(acc[j0 + i], a, b[i][0], b[i][1]);
          if (paired) tc::mma(acc[j0 + i], ap, bp[i][0], bp[i][1]);
        }
      }
    }
    if (tile + kSpan < to) store(buf ^ 1);
    __syncthreads();
  }
  flush(s.L, to - 1, reinterpret_cast<float*>(sx[0]), acc);
  // The group being filled that begins where the chunk ends starts from zero (after the flush
  // read it: its last barrier).
  if (to != end) return;
  for (int l = 0; l < s.L; ++l) {
    if (end & ((int64_t(s.m) << l) - 1)) continue;
    float* accum = (values ? cv.acc_v : cv.acc_k) + (int64_t(c.slot) * s.L + l) * s.kv * pd;
    for (int q = threadIdx.x; q < s.kv * s.p * kChannels; q += kWarps * 32)
      accum[q / kChannels * s.d + channel(q % kChannels)] = 0.0f;
  }
}

__global__ void commit_kernel(const CommitItem* items, const float* k, const float* v,
                              const float* new_k, const float* new_v, CacheView cv) {
  const CommitItem it = items[blockIdx.x];
  if (it.which < 2) {  // into the fine window, rounded to bf16
    const float* src = (it.which == 0 ? k : v) + it.src_off;
    __nv_bfloat16* dst = (it.which == 0 ? cv.fine_k : cv.fine_v) + it.dst_off;
    for (int e = threadIdx.x; e < it.n; e += blockDim.x) dst[e] = __float2bfloat16(src[e]);
    return;
  }
  const float* src = (it.which == 2 ? new_k : new_v) + it.src_off;
  float* dst = (it.which == 2 ? cv.sum_k : cv.sum_v) + it.dst_off;
  for (int e = threadIdx.x; e < it.n; e += blockDim.x) dst[e] = src[e];
}

}  // namespace

// Calls f.template operator()<heads, ranks>() with the summary tile that fits the shape.
template <class F>
void with_sum_tile(const FmaShape& s, F&& f) {
  auto ranks = [&]<int H>() {
    if (s.p <= 2)
      f.template operator()<H, 2>();
    else if (s.p <= 4)
      f.template operator()<H, 4>();
    else
      f.template operator()<H, 8>();
  };
  if (s.kv <= 2)
    ranks.template operator()<2>();
  else if (s.kv <= 4)
    ranks.template operator()<4>();
  else
    ranks.template operator()<8>();
}

void summaries(const FmaShape& s, const CacheView& c, const Downsamplers& w, const BatchPlan& p,
               const ChunkDesc* chunks, const NewGroups* table, const SumItem* done,
               const SumItem* filling, const float* k, const float* v, float* new_k,
               float* new_v, cudaStream_t st) {
  const int n_done = static_cast<int>(p.done.size()), n_filling = static_cast<int>(p.filling.size());
  // One block per token range holds every output of its groups: it reads and writes the
  // accumulators itself unless a chunk is split over several ranges.
  if (n_filling > 0 && (!p.one_pass || p.split_chunks)) {
    start_groups_kernel<<<dim3(n_filling, 1, 2), 128, 0, st>>>(s, c, chunks, table, filling,
                                                                 new_k, new_v);
    check_launch("start_groups");
  }
  if (p.one_pass) {
    if (n_done == 0) return;
    const unsigned blocks = static_cast<unsigned>(n_done) * (s.d / op::kChannels) * 2;
    auto launch = [&]<int R, int F>() {
      one_pass_kernel<R, F><<<blocks, op::kWarps * 32, 0, st>>>(s, c, w, chunks, table, done,
                                                               p.split_chunks, k, v, new_k, new_v);
    };
    if (s.p <= 4 && s.L <= 8)
      launch.template operator()<4, 4>();
    else if (s.p <= 4)
      launch.template operator()<4, 8>();
    else if (s.L <= 8)
      launch.template operator()<8, 8>();
    else
      launch.template operator()<8, 16>();
    check_launch("one_pass_summaries");
    return;
  }
  if (n_done > 0) {
    with_sum_tile(s, [&]<int H, int R>() {
      summarize_kernel<H, R>
          <<<dim3(n_done, 1, 2), 128, 0, st>>>(s, w, chunks, table, done, k, v, new_k, new_v);
    });
    check_launch("summarize");
  }
  if (n_filling == 0) return;
  // A group being filled holds at most w - 1 of the chunk's tokens (the top level's w is largest).
  const int64_t longest = std::min<int64_t>(p.longest_chunk, int64_t(s.m) << (s.L - 1));
  const auto slices =
      static_cast<unsigned>(std::max<int64_t>(1, (longest + kAccumulateSlice - 1) / kAccumulateSlice));
  with_sum_tile(s, [&]<int H, int R>() {
    accumulate_kernel<H, R>
        <<<dim3(n_filling, slices, 2), 128, 0, st>>>(s, c, w, chunks, filling, k, v);
  });
  check_launch("accumulate");
}

void append_tokens(const FmaShape& s, const CacheView& c, const Downsamplers& w,
                   const ChunkDesc* chunks, int n_chunks, const float* k, const float* v,
                   cudaStream_t st) {
  if (n_chunks == 0) return;
  const dim3 grid(n_chunks, s.fma ? s.L : 1, 2);
  with_sum_tile(s, [&]<int H, int R>() {
    // A thread a tile (64 for the default model's 2 KV heads), at most 128.
    const int threads = std::min(128, (sum_tiles<H, R>(s) + 31) / 32 * 32);
    append_tokens_kernel<H, R><<<grid, threads, 0, st>>>(s, c, w, chunks, k, v);
  });
  check_launch("append_tokens");
}

bool one_pass(const FmaShape& s) {
  return s.fma && s.in <= 1 && s.kv <= op::kHeads && s.p <= 8 && s.m >= 16 &&
         (s.m & (s.m - 1)) == 0 && s.d % op::kChannels == 0 && s.L >= 1 && s.L <= kOnePassLevels;
}

std::vector<__nv_bfloat16> one_pass_taps(const cpu::Downsampler& ds, int d) {
  if (ds.weight.empty()) return {};
  const int w = ds.group, p = ds.rank, in = ds.in;
  std::vector<__nv_bfloat16> out(ds.weight.size());
  for (int tap = 0; tap < in; ++tap)
    for (int ch = 0; ch < d; ++ch)
      for (int r = 0; r < p; ++r)
        for (int t = 0; t < w; ++t) {
          // Lane q of a fragment reads tokens 2q, 2q+1 (b0) and 2q+8, 2q+9 (b1) at 4q..4q+3.
          const int j = t % 16, q = (j % 8) / 2;
          const int at = t - j + 4 * q + (j >= 8 ? 2 : 0) + j % 2;
          out[((size_t(tap) * d + ch) * p + r) * w + at] =
              __float2bfloat16(ds.weight[(size_t(t) * p * d + r * d + ch) * in + tap]);
        }
  return out;
}

FmaShape make_shape(const Config& c) {
  if (c.n_levels() > kMaxLevels) throw Error("CUDA backend: more than 32 FMA levels are not supported");
  FmaShape s{c.n_heads,
             c.n_kv_heads,
             c.head_dim,
             c.fma_block_size,
             c.fma_rank,
             c.n_levels(),
             c.fma_enabled,
             c.fma_scale_attn,
             c.fma_downsampling == Downsampling::AvgPool,
             c.fma_downsampling == Downsampling::Conv          ? c.head_dim
             : c.fma_downsampling == Downsampling::GroupedConv ? 1
                                                               : 0,
             cpu::paired_keys(c)};
  for (int l = 1; l <= c.n_levels(); ++l) s.rank[l - 1] = c.rank(l);
  return s;
}

namespace {
// The current device's SMs, asked once a device (decode_splits runs in every decode step's
// staging on the host).
int sm_count() {
  static std::array<std::atomic<int>, 64> known{};
  int device = 0, sms = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  if (device < int(known.size()) && (sms = known[device].load(std::memory_order_relaxed)) > 0)
    return sms;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "SM count");
  if (device < int(known.size())) known[device].store(sms, std::memory_order_relaxed);
  return sms;
}
}  // namespace

int decode_splits(const FmaShape& s, int64_t cap, int n_items) {
  const int64_t sms = sm_count();
  if (s.fma) {
    // MULTIPOLE_CUDA_NO_FMA_SPLITS=1: FMA decode keys never split (a same-call A/B of the split).
    static const bool no_fma_splits = std::getenv("MULTIPOLE_CUDA_NO_FMA_SPLITS") != nullptr;
    if (no_fma_splits) return 1;
    // The blocks of few sequences (32 warps, one head) split a window of 2m fine keys into
    // ranges of kDecodeSplitKeys or more, over as many blocks as the GPU holds at one a SM.
    const int64_t blocks = int64_t(std::max(n_items, 1)) * s.heads;
    if (blocks > kDecodeFewBlocks) return 1;
    const int64_t by_keys = 2 * int64_t(s.m) / kDecodeSplitKeys;
    return static_cast<int>(
        std::clamp<int64_t>(std::min(by_keys, sms / blocks), 1, kMaxDecodeSplits));
  }
  const int64_t blocks = int64_t(std::max(n_items, 1)) * s.kv * xd::head_blocks(s);
  const int64_t tile = xd::block_tile(s.d), want = (sms * xd::kBlocksPerSm + blocks - 1) / blocks;
  return static_cast<int>(std::clamp<int64_t>(want, 1, (cap + tile - 1) / tile));
}

size_t decode_scratch_floats(const FmaShape& s, int64_t cap, int n_items) {
  return kDecodeTickets + size_t(n_items) * s.heads * decode_splits(s, cap, n_items) * (s.d + 2);
}

void attention(const FmaShape& s, const CacheView& c, const ChunkDesc* chunks,
               const NewGroups* table, const AttnItem* items, int n_items, bool single_queries,
               const float* q, const float* k, const float* v, const float* new_k,
               const float* new_v, float* out, __nv_bfloat16* out_bf16, float* scratch,
               cudaStream_t st, bool fast, bool overlap) {
  if (n_items == 0) return;
  if (s.L > kMaxLevels) throw Error("CUDA backend: more than 32 FMA levels are not supported");
  const dim3 grid(n_items, s.heads);
  const bool few = int64_t(n_items) * s.heads <= kDecodeFewBlocks;
  const int splits = single_queries && (s.fma || fast) ? decode_splits(s, c.cap, n_items) : 1;
  if (splits > 1 && !scratch)
    throw Error("attention: this decode step needs scratch of decode_scratch_floats() floats");
  unsigned* const tickets = reinterpret_cast<unsigned*>(scratch);
  float* const partials = scratch ? scratch + kDecodeTickets : nullptr;
  if (single_queries && !s.fma && fast) {
    const dim3 xgrid(n_items, s.kv * xd::head_blocks(s), splits);
    auto launch = [&]<int D>() {
      auto decode = [&]<int H>() {
        exact_decode_kernel<D, H><<<xgrid, xd::kWarps * 32, 0, st>>>(
            s, c, chunks, items, q, k, v, splits, partials, out, out_bf16);
      };
      switch (xd::heads(s)) {
        case 1: decode.template operator()<1>(); break;
        case 2: decode.template operator()<2>(); break;
        default: decode.template operator()<xd::kMaxHeads>();
      }
      check_launch("exact_decode");
      if (splits == 1) return;
      exact_combine_kernel<D>
          <<<grid, D, 0, st>>>(s, chunks, items, splits, partials, out, out_bf16);
      check_launch("exact_combine");
    };
    switch (s.d) {
      case 8: return launch.template operator()<8>();
      case 16: return launch.template operator()<16>();
      case 32: return launch.template operator()<32>();
      case 64: return launch.template operator()<64>();
      case 128: return launch.template operator()<128>();
      default:
        throw Error("CUDA backend: head_dim " + std::to_string(s.d) + " is not supported");
    }
  }
  if (!single_queries && s.d == tc::kD && fast) {
    // 52.6 KB a block: 4 blocks a SM (the registers' limit) still fit the H100/H200's 228 KB.
    static std::atomic<uint64_t> sized{0};
    allow_shared_memory(reinterpret_cast<const void*>(attention_tc_kernel), sizeof(tc::Shared),
                        sized, "attention: shared memory");
    attention_tc_kernel<<<grid, tc::kWarps * 32, sizeof(tc::Shared), st>>>(
        s, c, chunks, table, items, q, k, v, new_k, new_v, out, out_bf16);
    check_launch("attention");
    return;
  }
  // Decode: blocks of W warps serving G heads of a KV head each (few sequences: 32 warps, a
  // head a block; many: 8 warps, every head of a KV head that G takes).
  auto decode = [&]<int D, int W, int G, bool Split = false>() {
    // (decode_splits is 1 unless the step is `few`, and Split only where it is more.)
    launch("attention", overlap, decode_attention_kernel<D, W, G, Split>,
           dim3(n_items, s.heads / G, splits), W * 32, 0, st, s, c, chunks, table, items, q, k, v,
           new_k, new_v, splits, tickets, partials, out, out_bf16);
  };
  const int G = few ? 1 : decode_heads_per_block(s);
#define MP_ATTN(D)                                                                               \
  case D:                                                                                        \
    if (single_queries && few && splits > 1)                                                     \
      decode.template operator()<D, kDecodeWarpsFew, 1, true>();                                 \
    else if (single_queries && few)                                                              \
      decode.template operator()<D, kDecodeWarpsFew, 1>();                                       \
    else if (single_queries && G == 4)                                                           \
      decode.template operator()<D, kDecodeWarps, 4>();                                          \
    else if (single_queries && G == 2)                                                           \
      decode.template operator()<D, kDecodeWarps, 2>();                                          \
    else if (single_queries)                                                                     \
      decode.template operator()<D, kDecodeWarps, 1>();                                          \
    else                                                                                         \
      attention_kernel<D>                                                                        \
          <<<grid, kThreads, 0, st>>>(s, c, chunks, table, items, q, k, v, new_k, new_v, out,    \
                                      out_bf16);                                                 \
    break;
  switch (s.d) {
    MP_ATTN(8)
    MP_ATTN(16)
    MP_ATTN(32)
    MP_ATTN(64)
    MP_ATTN(128)
    default:
      throw Error("CUDA backend: head_dim " + std::to_string(s.d) + " is not supported");
  }
#undef MP_ATTN
  check_launch("attention");
}

void commit(const CommitItem* items, int n_items, const float* k, const float* v,
            const float* new_k, const float* new_v, const CacheView& c, cudaStream_t st) {
  if (n_items == 0) return;
  commit_kernel<<<n_items, 128, 0, st>>>(items, k, v, new_k, new_v, c);
  check_launch("commit");
}

}  // namespace mp::cuda

namespace mp::cuda {

size_t decode_bucket(size_t batch) {
  if (batch <= 8) return batch;
  const size_t step = batch <= 64 ? 8 : 32;
  return (batch + step - 1) / step * step;
}

void make_plan(const Config& c, int64_t cap, std::span<const SeqChunk> chunks,
               const std::vector<int64_t>& slot_pos, BatchPlan& p, SummaryKernels kernels) {
  p.T = p.new_groups = p.longest_chunk = p.rows_wanted = 0;
  p.padded = p.split_chunks = false;
  const bool decode = std::all_of(chunks.begin(), chunks.end(),
                                  [](const SeqChunk& ch) { return ch.tokens.size() == 1; });
  p.one_pass = c.fma_enabled && one_pass(make_shape(c)) &&
               (kernels == SummaryKernels::OnePass || (kernels == SummaryKernels::Auto && !decode));
  p.append = decode && kernels == SummaryKernels::Auto;
  // One-pass ranges: about 64 of them in all (8 blocks each: strips of 16 channels, keys and
  // values) fill the GPU; longer ranges write fewer partial sums of the long groups.
  size_t total = 0;
  for (const SeqChunk& ch : chunks) total += ch.tokens.size();
  p.range_tokens = std::clamp<int64_t>(std::bit_ceil(uint64_t(total / 64 + 1)), 64, 4096);
  for (auto* v : {&p.tokens, &p.rows}) v->clear();
  p.pos.clear();
  p.chunks.clear();
  p.table.clear();
  p.done.clear();
  p.filling.clear();
  p.attn.clear();
  p.commits.clear();
  const int L = c.n_levels(), m = c.fma_block_size;
  const int64_t kvd = int64_t{c.n_kv_heads} * c.head_dim;
  const int64_t group_block = kvd * c.fma_rank;  // one group's summaries, all KV heads
  // A block's tokens of a completed group: short slices keep the top levels' long groups from
  // serialising a step (2048 tokens in one block took 1.5 ms a layer), but every slice adds its
  // group_block sums atomically, so the slice grows with them: 256 tokens for the default model's
  // 256 outputs, 2048 for 4096 (16 KV heads at rank 4).
  const int64_t slice = std::clamp<int64_t>(std::bit_ceil(uint64_t(group_block)), 256, 2048);
  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    const SeqChunk& ch = chunks[ci];
    const int T = static_cast<int>(ch.tokens.size());
    const int64_t pos0 = slot_pos[ch.slot];
    p.chunks.push_back({p.T, T, pos0, ch.slot, static_cast<int>(p.table.size())});
    p.longest_chunk = std::max(p.longest_chunk, T);
    for (int t = 0; t < T; ++t) {
      p.tokens.push_back(ch.tokens[t]);
      p.pos.push_back(pos0 + t);
    }
    for (int t = ch.all_logits ? 0 : T - 1; t < T; ++t) p.rows.push_back(p.T + t);
    if (p.one_pass) {
      const int64_t R = p.range_tokens;
      for (int64_t t = pos0; t < pos0 + T; t = (t / R + 1) * R) {
        p.done.push_back({int(ci), 0, 0, t, std::min((t / R + 1) * R, pos0 + T)});
        p.split_chunks |= t != pos0;
      }
    }
    for (int l = 1; l <= L; ++l) {
      const int64_t w = c.group_size(l), first = pos0 / w, end = (pos0 + T) / w;
      p.table.push_back({p.new_groups, static_cast<int>(end - first), first});
      p.new_groups += static_cast<int>(end - first);
      if (p.append) continue;
      for (int64_t g = first; g < end && !p.one_pass; ++g)
        for (int64_t t = std::max(g * w, pos0); t < (g + 1) * w; t += slice)
          p.done.push_back({int(ci), l, g, t, std::min(t + slice, (g + 1) * w)});
      p.filling.push_back({int(ci), l, end, 0, 0});
      // The last 3 completed groups enter the ring.
      const int offset = p.table.back().offset;
      for (int64_t g = std::max(first, end - 3); g < end; ++g)
        for (int which : {2, 3})
          p.commits.push_back({(offset + g - first) * group_block,
                               ((int64_t(ch.slot) * L + l - 1) * 3 + g % 3) * group_block,
                               static_cast<int>(group_block), which});
    }
    // Query tiles: at most 64 queries, never across a fine block (all share one key set).
    for (int64_t i = pos0; i < pos0 + T;) {
      int64_t stop = std::min(pos0 + T, i + 64);
      if (c.fma_enabled) stop = std::min(stop, (i / m + 1) * m);
      p.attn.push_back({int(ci), i, stop});
      i = stop;
    }
    // The fine window keeps the chunk's last `cap` tokens.
    for (int64_t j = std::max(pos0, pos0 + T - cap); j < pos0 + T && !p.append; ++j)
      for (int which : {0, 1})
        p.commits.push_back({(p.T + j - pos0) * kvd,
                             (int64_t(ch.slot) * cap + (c.fma_enabled ? j % cap : j)) * kvd,
                             static_cast<int>(kvd), which});
    p.T += T;
  }
  // Summary work in token order, whatever the level: blocks running together then read the same
  // keys and values, which stay in L2 (level-major order read them once per level from DRAM).
  // (chunk, t_from, level) is unique, so std::sort (no buffer, unlike stable_sort) is stable here.
  std::sort(p.done.begin(), p.done.end(), [](const SumItem& a, const SumItem& b) {
    return std::tie(a.chunk, a.t_from, a.level) < std::tie(b.chunk, b.t_from, b.level);
  });
  p.rows_wanted = static_cast<int>(p.rows.size());
  if (decode) {
    // Padded to a bucket of batch sizes with no-op rows and items, so that one captured graph
    // serves every batch size of its bucket; at most one group per level and sequence completes.
    const size_t B = chunks.size(), Bb = decode_bucket(B);
    for (size_t t = B; t < Bb; ++t) p.rows.push_back(static_cast<int>(t));
    p.tokens.resize(Bb, 0);
    p.pos.resize(Bb, 0);
    p.T = static_cast<int>(Bb);
    p.attn.resize(Bb, AttnItem{0, 0, 0});
    // T 0: append_tokens skips them, nothing else reads them; they keep the inputs' offsets.
    p.chunks.resize(Bb, ChunkDesc{});
    p.table.resize(Bb * L, NewGroups{});
    p.done.resize(p.append ? 0 : p.one_pass ? Bb : Bb * L, SumItem{0, 1, -1, 0, 0});
    p.filling.resize(p.append ? 0 : Bb * L, SumItem{0, 1, -1, 0, 0});
    p.commits.resize(p.append ? 0 : Bb * (2 + 2 * L), CommitItem{0, 0, 0, 0});
    p.padded = true;
  }
}

}  // namespace mp::cuda
