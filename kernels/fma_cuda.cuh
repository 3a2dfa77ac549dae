// CUDA twins of the FMA functions of engine/src/fma_cpu.h: the summaries of the groups completed
// in a chunk, the accumulator update, and the attention of a batch of chunks over their slots'
// hierarchical caches. One launch serves every sequence of a batch, prefill and decode alike.
#pragma once

#include <cstdint>
#include <vector>

#include "../engine/src/backend_cuda.h"
#include "ops_cuda.cuh"

namespace mp::cpu {
struct Downsampler;
}

namespace mp::cuda {

// The slot pool: every slot's fixed-size state, in device memory allocated once. The fine keys
// and values are kept in bf16 (as llama.cpp keeps f16 and vLLM the model's dtype): a decode step
// at batch 256 is bound by reading them (docs/PERF.md, session 28), and a sequence's state takes
// half the memory. Summaries and accumulators stay fp32: sums built over thousands of tokens.
struct CacheView {
  __nv_bfloat16 *fine_k, *fine_v;  // [slots][cap][kv][d]; position j at j % cap (FMA) or j (exact)
  float *sum_k, *sum_v;    // [slots][L][3][kv][p*d]; group g at g % 3
  float *acc_k, *acc_v;    // [slots][L][kv][p*d]
  int64_t cap;
  bool ring;  // FMA: the fine window is a ring of 2m
};

struct ChunkDesc {
  int row0;  // first row of the chunk in the batch's q/k/v
  int T;
  int64_t pos0;
  int slot;
  int new_base;  // first entry of this chunk in the per-(chunk, level) NewGroups table
};

struct NewGroups {  // the groups of one level completed inside one chunk
  int offset;       // in the new-summary pool, in groups
  int count;
  int64_t first;  // group id of the first
};

struct AttnItem {  // up to 64 queries of one fine block of one chunk
  int chunk;
  int64_t q_begin, q_end;
};

struct SumItem {  // one level's group of one chunk: completed (summary) or being filled (acc)
  int chunk;
  int level;  // 0: every level (the one-pass kernel's token ranges)
  int64_t group;  // -1: padding of a decode step
  // Completed groups are summed in slices of tokens [t_from, t_to), one thread block each, so
  // that the few long groups of the top levels spread over the GPU.
  int64_t t_from, t_to;
};

constexpr int kOnePassLevels = 16;  // the most levels the one-pass kernel serves

struct Downsamplers {      // one layer, device copies of cpu::Downsampler (index level-1)
  const float* const* wk;  // [L] -> [w][p*d][in]
  const float* const* bk;  // [L] -> [p*d]
  const float* const* wv;
  const float* const* bv;
  // The one-pass kernel's taps (one_pass_taps) per level; null for avgpool. Held by value: the
  // kernel reads them from its parameters instead of keeping a pointer per level in registers.
  const __nv_bfloat16* tk[kOnePassLevels] = {};
  const __nv_bfloat16* tv[kOnePassLevels] = {};
};

constexpr int kMaxLevels = 32;

struct FmaShape {
  int heads, kv, d, m, p, L;  // p: fma_rank, the stride of the summary arrays
  bool fma, scale_attn, avgpool;
  int in;                    // 1 groupedconv, d conv, 0 avgpool (values; keys too unless paired)
  bool paired_keys = false;  // rotary key summaries: cpu::Downsampler's paired layout, no bias
  int rank[kMaxLevels] = {};  // p_l (index level-1): the first p_l of each group's p are used
};
// The shape of a model's FMA; throws Error beyond kMaxLevels levels.
FmaShape make_shape(const Config& c);

struct BatchPlan;
// True where one_pass_summaries serves the shape: groupedconv (rotary keys too) or avgpool, at
// most 16 KV heads, ranks of at most 8, m a power of two >= 16, head_dim a multiple of 16, at
// most 16 levels. conv and other shapes take the per-level kernels.
bool one_pass(const FmaShape& s);
// A level's taps for the one-pass kernel from cpu::Downsampler's [w][p_l*d][in] (in 1, or 2 for
// rotary keys): bf16 [in][d][p_l][w], each 16 tokens' order permuted so that an mma B fragment's
// four values of a lane (tokens 2t, 2t+1, 2t+8, 2t+9) are one 8-byte load. Empty for avgpool.
std::vector<__nv_bfloat16> one_pass_taps(const cpu::Downsampler& ds, int head_dim);

// The summaries of a plan: every group completed in a chunk -> new_k/new_v pool
// [groups][kv][p*d] (zeroed first where blocks add into it: per level, or one pass with a chunk
// split over ranges; else one block writes each entry whole), and the accumulators of the groups
// being filled after it. p.one_pass: one kernel reads each key and value once for every level
// (bf16 products on tensor cores, fp32 sums); else per-level kernels in fp32 (the reference).
// done/filling: device copies of p.done/p.filling. Nothing to do for p.append plans.
void summaries(const FmaShape& s, const CacheView& c, const Downsamplers& w, const BatchPlan& p,
               const ChunkDesc* chunks, const NewGroups* table, const SumItem* done,
               const SumItem* filling, const float* k, const float* v, float* new_k,
               float* new_v, cudaStream_t st);
// The per-level kernels accumulate a chunk's tokens of a group being filled in slices of
// kAccumulateSlice tokens.
constexpr int kAccumulateSlice = 128;
// out[row][head][d] for every query of every chunk. single_queries: every item holds one query
// (a decode step), which a kernel that splits the keys over threads serves better: in exact
// attention (s.fma false) the keys of each (sequence, KV head) split over several blocks that
// share them among the KV head's query heads, then a combine (flash-decoding; `scratch` holds
// decode_scratch_floats() floats of partial results); with FMA one block per (sequence, head)
// and split of its keys (decode_splits: the split's last block merges them), or, in steps of
// many sequences, per (sequence, 2 or 4 heads of a KV head) that share its loads. Otherwise
// tiles of head_dim 64 run on tensor cores (bf16 products, fp32 softmax and accumulation), other
// head dims on the fp32 tile kernel. fast false: the reference kernels
// instead (the fp32 tile for tiles, one block per (sequence, head) for exact decode), which the
// fast ones are tested against. out_bf16 (or null): the output goes there rounded to bf16
// instead of to `out` (then unused), as the o-projection's input: no conversion kernel a layer.
// overlap: FMA's decode kernel is launched to start while the stream's previous kernel finishes
// (overlap.cuh); the other kernels launch as usual.
void attention(const FmaShape& s, const CacheView& c, const ChunkDesc* chunks,
               const NewGroups* table, const AttnItem* items, int n_items, bool single_queries,
               const float* q, const float* k, const float* v, const float* new_k,
               const float* new_v, float* out, __nv_bfloat16* out_bf16, float* scratch,
               cudaStream_t st, bool fast = true, bool overlap = false);
// The blocks each (sequence, head) of a decode step of n_items sequences splits its keys over.
// Exact attention: each (sequence, KV head), enough for ~16 blocks per SM of the current device,
// at most one per block tile of the cache's c.cap keys. FMA: 1, or in steps of few sequences
// (kDecodeFewBlocks (sequence, head) blocks or fewer) up to one per 512 keys (kDecodeSplitKeys)
// of the 2m-key fine window, as many as the GPU's SMs hold at one each. Fixed for a bucket (a captured graph's
// grid); the keys per split follow each sequence's key list.
int decode_splits(const FmaShape& s, int64_t cap, int n_items);
// The scratch floats attention() needs for such a step: first kDecodeTickets counters (unsigned)
// that must be 0 when the scratch is first given (each step leaves them at 0), then the splits'
// partial results.
constexpr int kDecodeTickets = 128;
size_t decode_scratch_floats(const FmaShape& s, int64_t cap, int n_items);

// Appending a chunk to the cache: copies of chunk keys/values into the fine window and of new
// summaries into the summary ring, as offsets (elements) from the arrays `which` names (the
// fine window's rounded to bf16).
struct CommitItem {
  int64_t src_off, dst_off;
  int n;
  int which;  // 0: k -> fine_k, 1: v -> fine_v, 2: new_k -> sum_k, 3: new_v -> sum_v
};
void commit(const CommitItem* items, int n_items, const float* k, const float* v,
            const float* new_k, const float* new_v, const CacheView& c, cudaStream_t st);

// A decode step's whole cache update, one kernel after its attention (p.append): each sequence's
// key and value join the fine window, every level adds them to its group's accumulator, and a
// token that completes a group writes the group's summaries straight into the ring (the entry
// it replaces, three groups back, may be what this step's attention read). The same sums as
// summaries + commit (the per-level kernels), without their pool, its clearing and the copies.
// chunks: the plan's (padding entries have T 0).
void append_tokens(const FmaShape& s, const CacheView& c, const Downsamplers& w,
                   const ChunkDesc* chunks, int n_chunks, const float* k, const float* v,
                   cudaStream_t st);

// Everything one forward call needs, worked out on the host: the chunks, the summary, attention
// and commit work items, and the rows whose logits are wanted.
struct BatchPlan {
  int T = 0;
  std::vector<int> tokens, rows;
  std::vector<int64_t> pos;
  std::vector<ChunkDesc> chunks;
  std::vector<NewGroups> table;
  // done: per-level slices of completed groups, or (one_pass) the chunks' token ranges, aligned
  // to multiples of range_tokens; filling: per chunk and level, the group being filled after it.
  std::vector<SumItem> done, filling;
  bool one_pass = false;
  bool split_chunks = false;  // one_pass: some chunk spans more than one range
  int64_t range_tokens = 0;
  std::vector<AttnItem> attn;
  std::vector<CommitItem> commits;
  int new_groups = 0;
  int longest_chunk = 0;  // tokens
  // A decode step (one token per sequence, last-row logits): rows and item lists are padded to
  // decode_bucket(batch) with no-op entries, so every step of a bucket launches the same grids.
  bool padded = false;
  // A decode step whose cache update is append_tokens (done, filling and commits empty).
  bool append = false;
  int rows_wanted = 0;  // rows of `rows` the caller asked for (the rest is padding)
};
// The batch size a decode step of `batch` sequences is padded to.
size_t decode_bucket(size_t batch);
// Fills `p` for `chunks`; slot_pos: each slot's position before the call; cap: the fine window's
// slots per sequence. p's vectors keep their memory from step to step: once they have grown to
// the largest batch, a step allocates nothing (allocating and freeing some 300 KB a step at
// batch 256 cost page faults and, with a thread per GPU, cross-thread TLB flushes).
void make_plan(const Config& c, int64_t cap, std::span<const SeqChunk> chunks,
               const std::vector<int64_t>& slot_pos, BatchPlan& p,
               SummaryKernels kernels = SummaryKernels::Auto);

}  // namespace mp::cuda
