#include <algorithm>

#include "fma_cuda.cuh"

namespace mp::cuda {
namespace {

constexpr int kThreads = 64;         // one thread per query of a fine-block tile
constexpr int kTile = 32;            // keys staged in shared memory at a time
constexpr int kDecodeThreads = 128;  // threads sharing one decode query's keys

__device__ const float* chunk_row(const FmaShape& s, const ChunkDesc& c, const float* x, int64_t t,
                                  int kvh) {
  return x + (int64_t(c.row0) + (t - c.pos0)) * s.kv * s.d + int64_t(kvh) * s.d;
}

constexpr int kMaxKv = 16;  // KV heads a summary thread carries at once

// acc[h] += the contributions of the chunk's tokens [from, to) to group g's output o, for every
// KV head h: each weight is loaded once and used for all heads (the weights of the top levels,
// w x p x d floats, are far larger than the caches, and reading them once per head was the
// dominant cost of prefill).
__device__ void group_sums(const FmaShape& s, const ChunkDesc& c, const float* W, int w, int64_t g,
                           int64_t from, int64_t to, int o, const float* x, float* acc) {
  const int pd = s.p * s.d, ch = o % s.d;
  for (int64_t t = from; t < to; ++t) {
    const int tg = static_cast<int>(t - g * w);
    const float* row = x + (int64_t(c.row0) + (t - c.pos0)) * s.kv * s.d;  // all heads of token t
    if (s.avgpool) {
      const int span = w / s.p;
      if (o / s.d != tg / span) continue;
#pragma unroll
      for (int h = 0; h < kMaxKv; ++h)
        if (h < s.kv) acc[h] += row[h * s.d + ch] / span;
    } else if (s.in == 1) {
      const float wt = W[int64_t(tg) * pd + o];
#pragma unroll
      for (int h = 0; h < kMaxKv; ++h)
        if (h < s.kv) acc[h] += wt * row[h * s.d + ch];
    } else {
      const float* wr = W + (int64_t(tg) * pd + o) * s.in;
      for (int i = 0; i < s.in; ++i) {
        const float wt = wr[i];
#pragma unroll
        for (int h = 0; h < kMaxKv; ++h)
          if (h < s.kv) acc[h] += wt * row[h * s.d + i];
      }
    }
  }
}

__global__ void summarize_kernel(FmaShape s, CacheView cv, Downsamplers dw, const ChunkDesc* chunks,
                                 const NewGroups* table, const SumItem* items, const float* k,
                                 const float* v, float* new_k, float* new_v) {
  const SumItem it = items[blockIdx.x];
  if (it.group < 0) return;  // padding of a decode step
  const bool values = blockIdx.z == 1;
  const ChunkDesc c = chunks[it.chunk];
  const int l = it.level, w = s.m << (l - 1), pd = s.p * s.d;
  const NewGroups ng = table[c.new_base + l - 1];
  const float* W = s.avgpool ? nullptr : (values ? dw.wv : dw.wk)[l - 1];
  const float* bias = s.avgpool ? nullptr : (values ? dw.bv : dw.bk)[l - 1];
  const float* acc0 = (values ? cv.acc_v : cv.acc_k) + (int64_t(c.slot) * s.L + l - 1) * s.kv * pd;
  float* dst = (values ? new_v : new_k) + (int64_t(ng.offset) + it.group - ng.first) * s.kv * pd;
  const int64_t start = it.group * w;
  // The group's first slice also brings the bias and what the accumulator holds of the tokens
  // before the chunk.
  const bool first = it.t_from == max(start, c.pos0);
  for (int o = threadIdx.x; o < pd; o += blockDim.x) {
    float acc[kMaxKv];
#pragma unroll
    for (int h = 0; h < kMaxKv; ++h)
      acc[h] = h < s.kv && first
                   ? (start < c.pos0 ? acc0[h * pd + o] : 0.0f) + (bias ? bias[o] : 0.0f)
                   : 0.0f;
    group_sums(s, c, W, w, it.group, it.t_from, it.t_to, o, values ? v : k, acc);
#pragma unroll
    for (int h = 0; h < kMaxKv; ++h)
      if (h < s.kv) atomicAdd(dst + h * pd + o, acc[h]);
  }
}

__global__ void accumulate_kernel(FmaShape s, CacheView cv, Downsamplers dw,
                                  const ChunkDesc* chunks, const SumItem* items, const float* k,
                                  const float* v) {
  const SumItem it = items[blockIdx.x];
  const bool values = blockIdx.z == 1;
  const ChunkDesc c = chunks[it.chunk];
  const int l = it.level, w = s.m << (l - 1), pd = s.p * s.d;
  const float* W = s.avgpool ? nullptr : (values ? dw.wv : dw.wk)[l - 1];
  float* acc0 = (values ? cv.acc_v : cv.acc_k) + (int64_t(c.slot) * s.L + l - 1) * s.kv * pd;
  const int64_t start = it.group * w, end = c.pos0 + c.T;
  for (int o = threadIdx.x; o < pd; o += blockDim.x) {
    float acc[kMaxKv];
#pragma unroll
    for (int h = 0; h < kMaxKv; ++h) acc[h] = h < s.kv && start < c.pos0 ? acc0[h * pd + o] : 0.0f;
    group_sums(s, c, W, w, it.group, max(start, c.pos0), end, o, values ? v : k, acc);
#pragma unroll
    for (int h = 0; h < kMaxKv; ++h)
      if (h < s.kv) acc0[h * pd + o] = acc[h];
  }
}

// Where key `kk` of a query tile's key list lives: fine keys first, then p summaries per visible
// group, level by level. Sets the score bonus and the key's position (-1: visible to every query).
__device__ const float* key_source(const FmaShape& s, const CacheView& cv, const ChunkDesc& c,
                                   const NewGroups* table, int64_t q_begin, int64_t lo,
                                   int64_t n_fine, int64_t kk, int kvh, bool values, const float* k,
                                   const float* v, const float* new_k, const float* new_v,
                                   float* bonus, int64_t* key_pos) {
  if (kk < n_fine) {
    const int64_t j = lo + kk;
    *bonus = 0.0f;
    *key_pos = j;
    if (j >= c.pos0) return chunk_row(s, c, values ? v : k, j, kvh);
    const int64_t slot = cv.ring ? j % cv.cap : j;
    return (values ? cv.fine_v : cv.fine_k) +
           ((int64_t(c.slot) * cv.cap + slot) * s.kv + kvh) * s.d;
  }
  int64_t ci = kk - n_fine;
  *key_pos = -1;
  for (int l = 1; l <= s.L; ++l) {
    const int64_t w = int64_t(s.m) << (l - 1), B = q_begin / (2 * w);
    const int n_groups = B >= 1 ? 1 + int((q_begin % (2 * w)) / w) : 0;
    if (ci >= int64_t(n_groups) * s.p) {
      ci -= int64_t(n_groups) * s.p;
      continue;
    }
    const int64_t g = 2 * B - 2 + ci / s.p;
    const int r = static_cast<int>(ci % s.p);
    *bonus = s.scale_attn ? logf(float(w) / s.p) : 0.0f;
    const int pd = s.p * s.d;
    const NewGroups ng = table[c.new_base + l - 1];
    if (g >= ng.first)
      return (values ? new_v : new_k) + ((int64_t(ng.offset) + g - ng.first) * s.kv + kvh) * pd +
             r * s.d;
    return (values ? cv.sum_v : cv.sum_k) +
           (((int64_t(c.slot) * s.L + l - 1) * 3 + g % 3) * s.kv + kvh) * pd + r * s.d;
  }
  return nullptr;  // unreachable: kk < n_fine + n_coarse
}

template <int D>
__global__ void __launch_bounds__(kThreads)
    attention_kernel(FmaShape s, CacheView cv, const ChunkDesc* chunks, const NewGroups* table,
                     const AttnItem* items, const float* q, const float* k, const float* v,
                     const float* new_k, const float* new_v, float* out) {
  __shared__ float sk[kTile][D], sv[kTile][D], sbonus[kTile];
  __shared__ int64_t spos[kTile];
  __shared__ const float* sksrc[kTile];
  __shared__ const float* svsrc[kTile];
  const AttnItem it = items[blockIdx.x];
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
  const int64_t b = it.q_begin / s.m;
  const int64_t lo = s.fma ? max(int64_t(0), (b - 1) * s.m) : 0;
  const int64_t n_fine = it.q_end - lo;
  int64_t n_coarse = 0;
  for (int l = 1; l <= s.L; ++l) {
    const int64_t w = int64_t(s.m) << (l - 1), B = it.q_begin / (2 * w);
    if (B >= 1) n_coarse += int64_t(1 + (it.q_begin % (2 * w)) / w) * s.p;
  }
  float mx = -INFINITY, denom = 0.0f;
  for (int64_t t0 = 0; t0 < n_fine + n_coarse; t0 += kTile) {
    const int n = static_cast<int>(min(int64_t(kTile), n_fine + n_coarse - t0));
    // Resolve each key's address once, then copy the tile coalesced: consecutive threads take
    // consecutive channels (a thread per key row was 32-way strided and bank-conflicted).
    for (int e = threadIdx.x; e < n; e += blockDim.x) {
      float bonus;
      int64_t pos;
      sksrc[e] = key_source(s, cv, c, table, it.q_begin, lo, n_fine, t0 + e, kvh, false, k, v,
                            new_k, new_v, &bonus, &pos);
      svsrc[e] = key_source(s, cv, c, table, it.q_begin, lo, n_fine, t0 + e, kvh, true, k, v, new_k,
                            new_v, &bonus, &pos);
      sbonus[e] = bonus;
      spos[e] = pos;
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < n * D; idx += blockDim.x) {
      const int e = idx / D, ch = idx % D;
      sk[e][ch] = sksrc[e][ch];
      sv[e][ch] = svsrc[e][ch];
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
  float* o = out + ((int64_t(c.row0) + (i - c.pos0)) * s.heads + h) * D;
  const float inv = 1.0f / denom;
#pragma unroll
  for (int ch = 0; ch < D; ++ch) o[ch] = acc[ch] * inv;
}

// Decode: one query per (sequence, head). The tile kernel would leave 63 of its 64 threads idle
// and walk all keys on one thread; here the block's threads split the keys, each keeps an online
// softmax over its share, and the block merges them.
template <int D>
__global__ void __launch_bounds__(kDecodeThreads)
    decode_attention_kernel(FmaShape s, CacheView cv, const ChunkDesc* chunks,
                            const NewGroups* table, const AttnItem* items, const float* q,
                            const float* k, const float* v, const float* new_k, const float* new_v,
                            float* out) {
  __shared__ float part[kDecodeThreads / 32][D];
  __shared__ float wmax[kDecodeThreads / 32], wsum[kDecodeThreads / 32];
  const AttnItem it = items[blockIdx.x];
  const ChunkDesc c = chunks[it.chunk];
  const int h = blockIdx.y, kvh = h / (s.heads / s.kv), lane = threadIdx.x & 31,
            warp = threadIdx.x >> 5;
  const int64_t i = it.q_begin;
  const float* qrow = q + ((int64_t(c.row0) + (i - c.pos0)) * s.heads + h) * D;
  const float scale = rsqrtf(float(D));
  float qr[D], acc[D];
#pragma unroll
  for (int e = 0; e < D; ++e) {
    qr[e] = qrow[e] * scale;
    acc[e] = 0.0f;
  }
  const int64_t b = i / s.m;
  const int64_t lo = s.fma ? max(int64_t(0), (b - 1) * s.m) : 0;
  const int64_t n_fine = i + 1 - lo;
  int64_t n_coarse = 0;
  for (int l = 1; l <= s.L; ++l) {
    const int64_t w = int64_t(s.m) << (l - 1), B = i / (2 * w);
    if (B >= 1) n_coarse += int64_t(1 + (i % (2 * w)) / w) * s.p;
  }
  float mx = -INFINITY, denom = 0.0f;
  for (int64_t kk = threadIdx.x; kk < n_fine + n_coarse; kk += blockDim.x) {
    float bonus;
    int64_t pos;
    const float* ks = key_source(s, cv, c, table, i, lo, n_fine, kk, kvh, false, k, v, new_k, new_v,
                                 &bonus, &pos);
    const float* vs =
        key_source(s, cv, c, table, i, lo, n_fine, kk, kvh, true, k, v, new_k, new_v, &bonus, &pos);
    float sc = bonus;
#pragma unroll
    for (int ch = 0; ch < D; ++ch) sc += qr[ch] * ks[ch];
    const float nm = fmaxf(mx, sc);
    const float corr = __expf(mx - nm), pe = __expf(sc - nm);
    denom = denom * corr + pe;
#pragma unroll
    for (int ch = 0; ch < D; ++ch) acc[ch] = acc[ch] * corr + pe * vs[ch];
    mx = nm;
  }
  // Merge: the block's maximum, each thread's share rescaled to it, then summed.
  float m = mx;
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (lane == 0) wmax[warp] = m;
  __syncthreads();
  m = wmax[0];
  for (int w = 1; w < kDecodeThreads / 32; ++w) m = fmaxf(m, wmax[w]);
  const float f = mx == -INFINITY ? 0.0f : __expf(mx - m);
  float l = denom * f;
  for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
  if (lane == 0) wsum[warp] = l;
#pragma unroll
  for (int ch = 0; ch < D; ++ch) {
    float x = acc[ch] * f;
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    if (lane == 0) part[warp][ch] = x;
  }
  __syncthreads();
  if (threadIdx.x < D) {
    float total = 0, x = 0;
    for (int w = 0; w < kDecodeThreads / 32; ++w) {
      total += wsum[w];
      x += part[w][threadIdx.x];
    }
    out[((int64_t(c.row0) + (i - c.pos0)) * s.heads + h) * D + threadIdx.x] = x / total;
  }
}

__global__ void commit_kernel(const CommitItem* items, const float* k, const float* v,
                              const float* new_k, const float* new_v, CacheView cv) {
  const CommitItem it = items[blockIdx.x];
  const float* src = (it.which == 0   ? k
                      : it.which == 1 ? v
                      : it.which == 2 ? new_k
                                      : new_v) +
                     it.src_off;
  float* dst = (it.which == 0   ? cv.fine_k
                : it.which == 1 ? cv.fine_v
                : it.which == 2 ? cv.sum_k
                                : cv.sum_v) +
               it.dst_off;
  for (int e = threadIdx.x; e < it.n; e += blockDim.x) dst[e] = src[e];
}

}  // namespace

void summarize(const FmaShape& s, const CacheView& c, const Downsamplers& w,
               const ChunkDesc* chunks, const NewGroups* table, const SumItem* items, int n_items,
               const float* k, const float* v, float* new_k, float* new_v, cudaStream_t st) {
  if (n_items == 0) return;
  if (s.kv > kMaxKv) throw Error("CUDA backend: more than 16 KV heads are not supported");
  summarize_kernel<<<dim3(n_items, 1, 2), 128, 0, st>>>(s, c, w, chunks, table, items, k, v, new_k,
                                                        new_v);
  check_launch("summarize");
}

void accumulate(const FmaShape& s, const CacheView& c, const Downsamplers& w,
                const ChunkDesc* chunks, const SumItem* items, int n_items, const float* k,
                const float* v, cudaStream_t st) {
  if (n_items == 0) return;
  accumulate_kernel<<<dim3(n_items, 1, 2), 128, 0, st>>>(s, c, w, chunks, items, k, v);
  check_launch("accumulate");
}

void attention(const FmaShape& s, const CacheView& c, const ChunkDesc* chunks,
               const NewGroups* table, const AttnItem* items, int n_items, bool single_queries,
               const float* q, const float* k, const float* v, const float* new_k,
               const float* new_v, float* out, cudaStream_t st) {
  if (n_items == 0) return;
  const dim3 grid(n_items, s.heads);
#define MP_ATTN(D)                                                                               \
  case D:                                                                                        \
    if (single_queries)                                                                          \
      decode_attention_kernel<D><<<grid, kDecodeThreads, 0, st>>>(s, c, chunks, table, items, q, \
                                                                  k, v, new_k, new_v, out);      \
    else                                                                                         \
      attention_kernel<D>                                                                        \
          <<<grid, kThreads, 0, st>>>(s, c, chunks, table, items, q, k, v, new_k, new_v, out);   \
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

BatchPlan make_plan(const Config& c, int64_t cap, std::span<const SeqChunk> chunks,
                    const std::vector<int64_t>& slot_pos) {
  BatchPlan p;
  const int L = c.n_levels(), m = c.fma_block_size;
  const int64_t kvd = int64_t{c.n_kv_heads} * c.head_dim;
  const int64_t group_block = kvd * c.fma_rank;  // one group's summaries, all KV heads
  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    const SeqChunk& ch = chunks[ci];
    const int T = static_cast<int>(ch.tokens.size());
    const int64_t pos0 = slot_pos[ch.slot];
    p.chunks.push_back({p.T, T, pos0, ch.slot, static_cast<int>(p.table.size())});
    for (int t = 0; t < T; ++t) {
      p.tokens.push_back(ch.tokens[t]);
      p.pos.push_back(pos0 + t);
    }
    for (int t = ch.all_logits ? 0 : T - 1; t < T; ++t) p.rows.push_back(p.T + t);
    for (int l = 1; l <= L; ++l) {
      const int64_t w = c.group_size(l), first = pos0 / w, end = (pos0 + T) / w;
      p.table.push_back({p.new_groups, static_cast<int>(end - first), first});
      constexpr int64_t kSlice = 2048;
      for (int64_t g = first; g < end; ++g)
        for (int64_t t = std::max(g * w, pos0); t < (g + 1) * w; t += kSlice)
          p.done.push_back({int(ci), l, g, t, std::min(t + kSlice, (g + 1) * w)});
      p.filling.push_back({int(ci), l, end, 0, 0});
      // The last 3 completed groups enter the ring.
      for (int64_t g = std::max(first, end - 3); g < end; ++g)
        for (int which : {2, 3})
          p.commits.push_back({(p.new_groups + g - first) * group_block,
                               ((int64_t(ch.slot) * L + l - 1) * 3 + g % 3) * group_block,
                               static_cast<int>(group_block), which});
      p.new_groups += static_cast<int>(end - first);
    }
    // Query tiles: at most 64 queries, never across a fine block (all share one key set).
    for (int64_t i = pos0; i < pos0 + T;) {
      int64_t stop = std::min(pos0 + T, i + 64);
      if (c.fma_enabled) stop = std::min(stop, (i / m + 1) * m);
      p.attn.push_back({int(ci), i, stop});
      i = stop;
    }
    // The fine window keeps the chunk's last `cap` tokens.
    for (int64_t j = std::max(pos0, pos0 + T - cap); j < pos0 + T; ++j)
      for (int which : {0, 1})
        p.commits.push_back({(p.T + j - pos0) * kvd,
                             (int64_t(ch.slot) * cap + (c.fma_enabled ? j % cap : j)) * kvd,
                             static_cast<int>(kvd), which});
    p.T += T;
  }
  const bool decode = std::all_of(chunks.begin(), chunks.end(),
                                  [](const SeqChunk& ch) { return ch.tokens.size() == 1; });
  if (decode) {  // at most one group per level and sequence completes in a step
    const size_t B = chunks.size();
    p.done.resize(B * L, SumItem{0, 1, -1, 0, 0});
    p.commits.resize(B * (2 + 2 * L), CommitItem{0, 0, 0, 0});
    p.padded = true;
  }
  return p;
}

}  // namespace mp::cuda
