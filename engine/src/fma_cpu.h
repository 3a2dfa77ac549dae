// The CPU reference of causal Fast Multipole Attention over the per-sequence hierarchical cache
// (DESIGN.md sections 1 and 2). The CUDA kernels are checked against these functions.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "multipole/multipole.h"

namespace mp::cpu {

// The map that turns a group of w keys (or values) of one head into p summaries, transposed for
// streaming: weight[t][r*d + c][in] is the tap of token t of the group on summary r, channel c,
// from input channel `in` (in = 1 for groupedconv, d for conv; empty for avgpool). Rotary key
// summaries (paired): in = 2, the taps on channel c itself and on its RoPE partner
// (c + d/2) mod d, i.e. the complex weight a + ib of pair j as (a, -b) for c = j, (a, b) for
// c = j + d/2.
struct Downsampler {
  int group = 0;              // w
  int rank = 0;               // p_l: summaries per group (the cache keeps fma_rank's room)
  int in = 0;                 // 1 (groupedconv), 2 (paired) or d (conv); 0 for avgpool
  bool paired = false;        // rotary key summaries
  std::vector<float> weight;  // [w][p*d][in]
  std::vector<float> bias;    // [p*d], summary-major (r*d + c); empty: none
};
struct LayerDownsamplers {
  std::vector<Downsampler> k, v;  // index level-1
};
// The channel RoPE rotates channel c with (rotate-half convention).
inline int rope_partner(int c, int d) { return c < d / 2 ? c + d / 2 : c - d / 2; }
// True where the key summaries of this config are rotary (paired) ones.
inline bool paired_keys(const Config& c) {
  return c.fma_rotary_summaries && c.fma_downsampling == Downsampling::GroupedConv;
}
// From a GGUF/HF weight [p*d][in][w] (output channel c*p + r) and bias [p*d]; for rotary key
// summaries the weight [d/2*p][2][w] (output pair j*p + r: real, imaginary part) and no bias.
Downsampler make_downsampler(const Config& c, int level, bool keys, std::span<const float> weight,
                             std::span<const float> bias);
LayerDownsamplers make_layer_downsamplers(const Config& c, const Model& m, int layer);

// acc (p_l*d, summary-major) += the contribution of token `t_in_group` with vector x (d).
void add_to_summary(const Config& c, const Downsampler& ds, int t_in_group, const float* x,
                    float* acc);
// summary = acc + bias, p_l*d values.
void finish_summary(const Config& c, const Downsampler& ds, const float* acc, float* summary);

// The hierarchical cache of one layer of one sequence, all KV heads (DESIGN.md section 2).
struct LayerCache {
  // Fine keys/values, [n_kv][slots][d]: a KV head's keys one contiguous run, which the attention
  // streams (2.5x faster than rows of all heads at m = 1,024: docs/PERF.md, session 24). With
  // FMA a ring of 2m slots (position j in slot j mod 2m); in exact mode position j in slot j, the
  // slots grown by doubling. State files and the CUDA backend's arrays hold [pos][n_kv][d] (the
  // ring's 2m slots with FMA): FineOrder::File.
  std::vector<float> fine_k, fine_v;
  // Finished summaries of the last 3 groups per level: [L][3][n_kv][p][d], position g mod 3
  // (p = fma_rank; level l fills the first p_l of each group's p).
  std::vector<float> sum_k, sum_v;
  std::vector<int64_t> sum_group;  // [L][3]: which group a ring entry holds, -1 for none
  // Running accumulators of the group being filled: [L][n_kv][p*d].
  std::vector<float> acc_k, acc_v;
};

struct SeqCache {
  int64_t pos = 0;
  std::vector<LayerCache> layers;
};

SeqCache make_seq_cache(const Config& c);
void reset_seq_cache(const Config& c, SeqCache& s);
int64_t fine_capacity(const Config& c);  // 2m with FMA; 0 (grows) in exact mode
// The bytes of the state's contents (exact mode: its positions, not the slots grown ahead).
size_t seq_cache_bytes(const Config& c, const SeqCache& s);
// The order of a SeqCache's fine_k and fine_v: the CPU cache's ([n_kv][slots][d]), or the state
// file's ([pos][n_kv][d], with as many slots as positions in exact mode), which the CUDA backend's
// arrays and the tensor-parallel split by KV head use as they are.
enum class FineOrder { Cache, File };
// The state's bytes (format: README.md, "The model file"), ending in their checksum.
std::vector<uint8_t> serialize(const Config& c, const SeqCache& s,
                               FineOrder order = FineOrder::Cache);
// Throws Error on a truncated, corrupt or foreign state; reads version 1 (no checksum) too.
void deserialize(const Config& c, std::span<const uint8_t> bytes, SeqCache& s,
                 FineOrder order = FineOrder::Cache);

// The attention of one chunk of T new tokens of one sequence for one layer. The constructor
// computes the summaries of the groups completed inside the chunk; attend() is thread-safe and
// computes one (token, head) output; commit() appends the chunk to the cache.
// q: [T][n_heads*d], k and v: [T][n_kv*d], already rotated.
class ChunkAttention {
 public:
  ChunkAttention(const Config& c, const LayerDownsamplers& ds, LayerCache& cache, int64_t pos0,
                 int T, const float* q, const float* k, const float* v);
  void attend(int t, int head, float* out, std::vector<float>& scratch) const;
  // attend() for the nq tokens t0.. of one head at once, output a at out + a*out_stride. They
  // must lie in one block of fma_block_size positions (any run in exact mode): they then see the
  // same summaries and fine keys from the same first one, so that each key and value is loaded
  // once for several of them (prefill's path; attend() is its reference).
  void attend_block(int t0, int nq, int head, float* out, int64_t out_stride,
                    std::vector<float>& scratch) const;
  void commit();

 private:
  struct Group {  // a summarised group that position i sees
    int level, rank;
    int64_t g;
    size_t at;  // its first score, after the fine keys'
  };
  // The groups position i sees; returns their number of scores.
  size_t visible_groups(int64_t i, std::vector<Group>& groups) const;
  // f(first key's index from lo, its row, the stride of its rows, run length) for each run of
  // the fine keys (values) lo..i of KV head kvh that lie at one stride: the chunk's own, the
  // ring's until it wraps.
  template <class F>
  void fine_runs(int64_t lo, int64_t i, int kvh, bool values, F&& f) const;

  const float* summary(int level, int64_t group, bool values, int kv_head) const;
  const float* fine(int64_t j, bool values, int kv_head) const;

  const Config& c_;
  LayerCache& cache_;
  int64_t pos0_;
  int T_;
  const float *q_, *k_, *v_;
  // Summaries of groups completed inside the chunk, per level: first group id and the data
  // [n_new][n_kv][p][d].
  std::vector<int64_t> first_new_;
  std::vector<std::vector<float>> new_k_, new_v_;
};

}  // namespace mp::cpu
