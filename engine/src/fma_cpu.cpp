#include "fma_cpu.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstring>

#include "numeric.h"
#include "ops_cpu.h"

namespace mp::cpu {

Downsampler make_downsampler(const Config& c, int level, bool keys, std::span<const float> weight,
                             std::span<const float> bias) {
  const int p = c.rank(level), d = c.head_dim, w = c.group_size(level);
  Downsampler ds;
  ds.group = w;
  ds.rank = p;
  if (c.fma_downsampling == Downsampling::AvgPool) return ds;
  if (keys && paired_keys(c)) {
    ds.in = 2;
    ds.paired = true;
    ds.weight.resize(size_t(w) * p * d * 2);
    for (int j = 0; j < d / 2; ++j)
      for (int r = 0; r < p; ++r) {
        const float* re = weight.data() + (size_t(j) * p + r) * 2 * w;
        const float* im = re + w;
        for (int t = 0; t < w; ++t) {
          float* lo = ds.weight.data() + (size_t(t) * p * d + r * d + j) * 2;  // channel j
          float* hi = lo + size_t(d / 2) * 2;                                  // channel j + d/2
          lo[0] = re[t];
          lo[1] = -im[t];
          hi[0] = re[t];
          hi[1] = im[t];
        }
      }
    return ds;
  }
  ds.in = c.fma_downsampling == Downsampling::Conv ? d : 1;
  ds.weight.resize(size_t(w) * p * d * ds.in);
  ds.bias.resize(size_t(p) * d);
  for (int ch = 0; ch < d; ++ch)
    for (int r = 0; r < p; ++r) {
      const int oc = ch * p + r;  // the conv's output channel
      ds.bias[r * d + ch] = bias[oc];
      for (int i = 0; i < ds.in; ++i)
        for (int t = 0; t < w; ++t)
          ds.weight[(size_t(t) * p * d + r * d + ch) * ds.in + i] =
              weight[(size_t(oc) * ds.in + i) * w + t];
    }
  return ds;
}

LayerDownsamplers make_layer_downsamplers(const Config& c, const Model& m, int layer) {
  LayerDownsamplers out;
  const bool weighted = c.fma_downsampling != Downsampling::AvgPool;
  for (int l = 1; l <= c.n_levels(); ++l)
    for (char which : {'k', 'v'}) {
      std::vector<float> w, b;
      if (weighted) {
        const bool paired = which == 'k' && paired_keys(c);
        const int64_t d = c.head_dim, p = c.rank(l);
        const int64_t in = paired ? 2 : c.fma_downsampling == Downsampling::Conv ? d : 1;
        w = m.tensor(tensor_names::fma_down(layer, which, l, false),
                     {paired ? d / 2 * p : d * p, in, c.group_size(l)})
                .to_f32();
        if (!paired) b = m.tensor(tensor_names::fma_down(layer, which, l, true), {d * p}).to_f32();
      }
      (which == 'k' ? out.k : out.v).push_back(make_downsampler(c, l, which == 'k', w, b));
    }
  return out;
}

void add_to_summary(const Config& c, const Downsampler& ds, int t_in_group, const float* x,
                    float* acc) {
  const int p = ds.rank, d = c.head_dim;
  if (c.fma_downsampling == Downsampling::AvgPool) {
    const int span = ds.group / p;
    const int r = t_in_group / span;
    const float inv = 1.0f / static_cast<float>(span);
    for (int ch = 0; ch < d; ++ch) acc[r * d + ch] += x[ch] * inv;
    return;
  }
  const float* w = ds.weight.data() + size_t(t_in_group) * p * d * ds.in;
  if (ds.paired) {
    for (int r = 0; r < p; ++r)
      for (int ch = 0; ch < d; ++ch) {
        const float* tap = w + size_t(r * d + ch) * 2;
        acc[r * d + ch] += tap[0] * x[ch] + tap[1] * x[rope_partner(ch, d)];
      }
  } else if (ds.in == 1) {
    for (int r = 0; r < p; ++r)
      for (int ch = 0; ch < d; ++ch) acc[r * d + ch] += w[r * d + ch] * x[ch];
  } else {
    for (int o = 0; o < p * d; ++o) acc[o] += dot(w + size_t(o) * d, x, d);
  }
}

void finish_summary(const Config& c, const Downsampler& ds, const float* acc, float* summary) {
  const int pd = ds.rank * c.head_dim;
  for (int o = 0; o < pd; ++o) summary[o] = acc[o] + (ds.bias.empty() ? 0.0f : ds.bias[o]);
}

int64_t fine_capacity(const Config& c) { return c.fma_enabled ? 2 * int64_t{c.fma_block_size} : 0; }

namespace {
// A KV head's slots in fine_k (fine_v): 2m with FMA; in exact mode as many as grown so far.
size_t fine_slots(const Config& c, std::span<const float> fine) {
  return fine.size() / (size_t(c.n_kv_heads) * c.head_dim);
}

// A LayerCache's fine_k or fine_v at position pos from the cache's order to the file's (and back,
// with as many slots as positions in exact mode): a copy.
std::vector<float> fine_in_file_order(const Config& c, std::span<const float> fine, int64_t pos) {
  const size_t d = c.head_dim, nkv = c.n_kv_heads, slots = fine_slots(c, fine);
  const size_t rows = c.fma_enabled ? size_t(fine_capacity(c)) : size_t(pos);
  if (rows > slots) throw Error("FMA cache: fewer fine slots than positions");
  std::vector<float> out(rows * nkv * d);
  for (size_t h = 0; h < nkv; ++h)
    for (size_t j = 0; j < rows; ++j)
      std::copy_n(fine.data() + (h * slots + j) * d, d, out.data() + (j * nkv + h) * d);
  return out;
}

std::vector<float> fine_in_cache_order(const Config& c, std::span<const float> fine, int64_t pos) {
  const size_t d = c.head_dim, nkv = c.n_kv_heads;
  const size_t rows = c.fma_enabled ? size_t(fine_capacity(c)) : size_t(pos);
  if (fine.size() != rows * nkv * d) throw Error("FMA cache: a fine block of the wrong size");
  std::vector<float> out(fine.size());
  for (size_t j = 0; j < rows; ++j)
    for (size_t h = 0; h < nkv; ++h)
      std::copy_n(fine.data() + (j * nkv + h) * d, d, out.data() + (h * rows + j) * d);
  return out;
}
}  // namespace

SeqCache make_seq_cache(const Config& c) {
  SeqCache s;
  s.layers.resize(c.n_layers);
  const size_t kvd = size_t(c.n_kv_heads) * c.head_dim;
  const size_t L = c.n_levels(), pd = size_t(c.fma_rank) * c.head_dim;
  for (auto& l : s.layers) {
    l.fine_k.resize(fine_capacity(c) * kvd);
    l.fine_v.resize(fine_capacity(c) * kvd);
    l.sum_k.resize(L * 3 * c.n_kv_heads * pd);
    l.sum_v.resize(l.sum_k.size());
    l.sum_group.assign(L * 3, -1);
    l.acc_k.resize(L * c.n_kv_heads * pd);
    l.acc_v.resize(l.acc_k.size());
  }
  return s;
}

void reset_seq_cache(const Config& c, SeqCache& s) {
  s.pos = 0;
  for (auto& l : s.layers) {
    // Unused places are zeroed too: equal histories give equal bytes (state files, snapshots).
    if (!c.fma_enabled) {
      l.fine_k.clear();
      l.fine_v.clear();
    }
    for (auto* v : {&l.fine_k, &l.fine_v, &l.sum_k, &l.sum_v}) std::fill(v->begin(), v->end(), 0.0f);
    std::fill(l.sum_group.begin(), l.sum_group.end(), -1);
    std::fill(l.acc_k.begin(), l.acc_k.end(), 0.0f);
    std::fill(l.acc_v.begin(), l.acc_v.end(), 0.0f);
  }
}

size_t seq_cache_bytes(const Config& c, const SeqCache& s) {
  const size_t fine = c.fma_enabled ? size_t(fine_capacity(c)) : size_t(s.pos);
  size_t n = 0;
  for (const auto& l : s.layers)
    n += 4 * (2 * fine * c.n_kv_heads * c.head_dim + l.sum_k.size() + l.sum_v.size() +
              l.acc_k.size() + l.acc_v.size()) +
         8 * l.sum_group.size();
  return n;
}

}  // namespace mp::cpu

namespace mp {
size_t cpu_state_bytes(const Config& c, int64_t tokens) {
  // make_seq_cache's layout, per layer: fine keys and values (2m, or every token in exact mode),
  // 3 finished groups and an accumulator per level for keys and values, fp32; the ring's group
  // ids, int64.
  const size_t kvd = size_t(c.n_kv_heads) * c.head_dim, L = c.n_levels();
  const size_t pd = size_t(c.fma_rank) * c.head_dim;
  const size_t fine = c.fma_enabled ? size_t(cpu::fine_capacity(c)) : size_t(tokens);
  const size_t floats = 2 * fine * kvd + 2 * L * 3 * c.n_kv_heads * pd + 2 * L * c.n_kv_heads * pd;
  return size_t(c.n_layers) * (4 * floats + 8 * 3 * L);
}

uint64_t hash_bytes(std::span<const uint8_t> bytes) {
  // 64-bit words through a multiply-rotate mix (murmur style), the length folded in at the end.
  constexpr uint64_t k1 = 0x87c37b91114253d5ull, k2 = 0x4cf5ad432745937full;
  uint64_t h = 0x9e3779b97f4a7c15ull;
  size_t i = 0;
  for (; i + 8 <= bytes.size(); i += 8) {
    uint64_t w;
    std::memcpy(&w, bytes.data() + i, 8);
    h = std::rotl(h ^ (w * k1), 31) * k2;
  }
  uint64_t tail = 0;
  if (i < bytes.size()) std::memcpy(&tail, bytes.data() + i, bytes.size() - i);
  h = std::rotl(h ^ (tail * k1), 31) * k2 ^ bytes.size();
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  return h;
}

}  // namespace mp

namespace mp::cpu {
namespace {
constexpr uint32_t kStateMagic = 0x5453504d;  // "MPST"
// Version 1: no checksum (still read). Version 2: the same bytes followed by hash_bytes() of
// everything before it.
constexpr uint32_t kStateVersion = 2;
constexpr int64_t kMaxStatePos = int64_t{1} << 53;  // beyond any real sequence; keeps pos + T exact

std::vector<int64_t> fingerprint(const Config& c) {
  return {c.n_layers,       c.n_kv_heads, c.head_dim,  c.fma_enabled,
          c.fma_block_size, c.fma_rank,   c.n_levels()};
}
constexpr size_t kHeadValues = 3 + 7;  // magic, version, pos, fingerprint

template <class T>
void put_vec(std::vector<uint8_t>& out, const std::vector<T>& v) {
  const uint64_t n = v.size();
  const auto* p = reinterpret_cast<const uint8_t*>(&n);
  out.insert(out.end(), p, p + 8);
  const auto* d = reinterpret_cast<const uint8_t*>(v.data());
  out.insert(out.end(), d, d + n * sizeof(T));
}

class Reader {
 public:
  explicit Reader(std::span<const uint8_t> b) : b_(b) {}
  void raw(void* dst, size_t n) {
    if (n > b_.size() - pos_)
      throw Error("sequence state: truncated at byte " + std::to_string(pos_) + " of " +
                  std::to_string(b_.size()));
    if (n) std::memcpy(dst, b_.data() + pos_, n);  // an empty block's data() may be null
    pos_ += n;
  }
  template <class T>
  void vec(std::vector<T>& v, size_t expected) {
    uint64_t n;
    raw(&n, 8);
    if (n != expected)
      throw Error("sequence state: a block holds " + std::to_string(n) + " values, expected " +
                  std::to_string(expected) + " (state of another model, or corrupt)");
    v.resize(n);
    raw(v.data(), n * sizeof(T));
  }

 private:
  std::span<const uint8_t> b_;
  size_t pos_ = 0;
};

// The groups a level's summary ring holds at position `pos`: the last (up to) 3 complete ones,
// group g at g mod 3; -1 where none.
std::array<int64_t, 3> ring_groups(int64_t pos, int w) {
  std::array<int64_t, 3> r = {-1, -1, -1};
  const int64_t done = pos / w;
  for (int64_t g = std::max<int64_t>(0, done - 3); g < done; ++g) r[g % 3] = g;
  return r;
}
}  // namespace


std::vector<uint8_t> serialize(const Config& c, const SeqCache& s, FineOrder order) {
  std::vector<uint8_t> out;
  std::vector<int64_t> head = {kStateMagic, kStateVersion, s.pos};
  const auto fp = fingerprint(c);
  head.insert(head.end(), fp.begin(), fp.end());
  put_vec(out, head);
  for (const auto& l : s.layers) {
    if (order == FineOrder::File) {
      put_vec(out, l.fine_k);
      put_vec(out, l.fine_v);
    } else {
      put_vec(out, fine_in_file_order(c, l.fine_k, s.pos));
      put_vec(out, fine_in_file_order(c, l.fine_v, s.pos));
    }
    put_vec(out, l.sum_k);
    put_vec(out, l.sum_v);
    put_vec(out, l.sum_group);
    put_vec(out, l.acc_k);
    put_vec(out, l.acc_v);
  }
  const uint64_t sum = hash_bytes(out);
  const auto* p = reinterpret_cast<const uint8_t*>(&sum);
  out.insert(out.end(), p, p + 8);
  return out;
}

void deserialize(const Config& c, std::span<const uint8_t> bytes, SeqCache& s, FineOrder order) {
  Reader r(bytes);
  uint64_t n_head;
  r.raw(&n_head, 8);
  std::vector<int64_t> head(kHeadValues);
  if (n_head == kHeadValues) r.raw(head.data(), 8 * kHeadValues);
  if (n_head != kHeadValues || head[0] != kStateMagic)
    throw Error("sequence state: bad magic (not a state file)");
  if (head[1] != 1 && head[1] != kStateVersion)
    throw Error("sequence state: version " + std::to_string(head[1]) +
                " is not supported (this build reads 1 and 2)");
  const auto fp = fingerprint(c);
  if (!std::equal(fp.begin(), fp.end(), head.begin() + 3))
    throw Error("sequence state: saved for a model of another shape");
  SeqCache fresh = make_seq_cache(c);
  fresh.pos = head[2];
  if (fresh.pos < 0 || fresh.pos > kMaxStatePos ||
      (!c.fma_enabled && uint64_t(fresh.pos) > bytes.size()))
    throw Error("sequence state: implausible position " + std::to_string(fresh.pos) +
                " (corrupt)");
  // Every block's length follows from the config and the position: check the size first, so that
  // a truncated file says so.
  const size_t kvd = size_t(c.n_kv_heads) * c.head_dim;
  const size_t fine = c.fma_enabled ? fine_capacity(c) * kvd : size_t(fresh.pos) * kvd;
  const LayerCache& l0 = fresh.layers[0];
  const size_t per_layer = 7 * 8 + 4 * (2 * fine + l0.sum_k.size() + l0.sum_v.size() +
                                        l0.acc_k.size() + l0.acc_v.size()) +
                           8 * l0.sum_group.size();
  const size_t checksum_bytes = head[1] >= 2 ? 8 : 0;
  const size_t want = 8 + 8 * kHeadValues + c.n_layers * per_layer + checksum_bytes;
  if (bytes.size() != want)
    throw Error("sequence state: " + std::to_string(bytes.size()) + " bytes, a state of this model at position " +
                std::to_string(fresh.pos) + " has " + std::to_string(want) +
                (bytes.size() < want ? " (truncated)" : " (trailing bytes)"));
  if (checksum_bytes) {
    uint64_t stored;
    std::memcpy(&stored, bytes.data() + want - 8, 8);
    if (stored != hash_bytes(bytes.first(want - 8)))
      throw Error("sequence state: checksum mismatch (the bytes are corrupt)");
  }
  for (auto& l : fresh.layers) {
    r.vec(l.fine_k, fine);
    r.vec(l.fine_v, fine);
    if (order == FineOrder::Cache) {
      l.fine_k = fine_in_cache_order(c, l.fine_k, fresh.pos);
      l.fine_v = fine_in_cache_order(c, l.fine_v, fresh.pos);
    }
    r.vec(l.sum_k, l.sum_k.size());
    r.vec(l.sum_v, l.sum_v.size());
    r.vec(l.sum_group, l.sum_group.size());
    r.vec(l.acc_k, l.acc_k.size());
    r.vec(l.acc_v, l.acc_v.size());
    for (int lv = 1; lv <= c.n_levels(); ++lv)
      if (!std::equal(l.sum_group.begin() + (lv - 1) * 3, l.sum_group.begin() + lv * 3,
                      ring_groups(fresh.pos, c.group_size(lv)).begin()))
        throw Error("sequence state: the summaries of level " + std::to_string(lv) +
                    " do not match position " + std::to_string(fresh.pos) + " (corrupt)");
  }
  s = std::move(fresh);
}

ChunkAttention::ChunkAttention(const Config& c, const LayerDownsamplers& ds, LayerCache& cache,
                               int64_t pos0, int T, const float* q, const float* k, const float* v)
    : c_(c), cache_(cache), pos0_(pos0), T_(T), q_(q), k_(k), v_(v) {
  const int L = c.n_levels(), nkv = c.n_kv_heads, d = c.head_dim;
  const size_t pd = size_t(c.fma_rank) * d;
  first_new_.resize(L);
  new_k_.resize(L);
  new_v_.resize(L);
  for (int l = 1; l <= L; ++l) {
    const int w = c.group_size(l);
    first_new_[l - 1] = pos0 / w;
    const size_t n_new = size_t((pos0 + T) / w - pos0 / w);  // groups completed in the chunk
    new_k_[l - 1].resize(n_new * nkv * pd);
    new_v_[l - 1].resize(n_new * nkv * pd);
  }
  // Each level's, KV head's keys' and values' summaries are independent of the others'.
  parallel_for(int64_t{L} * nkv * 2, T >= 64, [&](int64_t unit) {
    const int l = int(unit / (2 * nkv)) + 1, h = int(unit / 2 % nkv), values = int(unit % 2);
    const Downsampler& dl = (values ? ds.v : ds.k)[l - 1];
    float* acc = (values ? cache.acc_v : cache.acc_k).data() + (size_t(l - 1) * nkv + h) * pd;
    const float* x = values ? v : k;
    const int w = c.group_size(l);
    for (int64_t t = pos0; t < pos0 + T; ++t) {
      const int tg = static_cast<int>(t % w);
      add_to_summary(c, dl, tg, x + size_t(t - pos0) * nkv * d + size_t(h) * d, acc);
      if (tg != w - 1) continue;
      // Group t / w is complete: its summaries join the chunk's list, the accumulator restarts.
      float* out = (values ? new_v_ : new_k_)[l - 1].data() +
                   (size_t(t / w - first_new_[l - 1]) * nkv + h) * pd;
      finish_summary(c, dl, acc, out);
      std::fill(acc, acc + pd, 0.0f);
    }
  });
}

const float* ChunkAttention::summary(int level, int64_t group, bool values, int kv_head) const {
  const size_t pd = size_t(c_.fma_rank) * c_.head_dim;
  const int nkv = c_.n_kv_heads;
  const int64_t first = first_new_[level - 1];
  if (group >= first) {
    const auto& list = values ? new_v_[level - 1] : new_k_[level - 1];
    return list.data() + (size_t(group - first) * nkv + kv_head) * pd;
  }
  const size_t slot = size_t(level - 1) * 3 + size_t(group % 3);
  if (cache_.sum_group[slot] != group) throw Error("FMA cache: summary of a group is missing");
  const auto& ring = values ? cache_.sum_v : cache_.sum_k;
  return ring.data() + (slot * nkv + kv_head) * pd;
}

const float* ChunkAttention::fine(int64_t j, bool values, int kv_head) const {
  const size_t d = c_.head_dim, kvd = size_t(c_.n_kv_heads) * d;
  if (j >= pos0_) return (values ? v_ : k_) + size_t(j - pos0_) * kvd + kv_head * d;
  const int64_t cap = fine_capacity(c_);
  const auto& all = values ? cache_.fine_v : cache_.fine_k;
  return all.data() + (kv_head * fine_slots(c_, all) + size_t(cap ? j % cap : j)) * d;
}

size_t ChunkAttention::visible_groups(int64_t i, std::vector<Group>& groups) const {
  groups.clear();
  size_t n_scores = 0;
  for (int l = 1; l <= c_.n_levels(); ++l) {
    const int64_t w = c_.group_size(l), B = i / (2 * w);
    if (B < 1) continue;
    const int p = c_.rank(l);
    for (int64_t g = 2 * B - 2; g <= 2 * B - 2 + (i % (2 * w)) / w; ++g) {
      groups.push_back({l, p, g, n_scores});
      n_scores += p;
    }
  }
  return n_scores;
}

// The fine keys (values) lo..i lie in contiguous runs: the chunk's own, and the cache's until its
// ring wraps.
template <class F>
void ChunkAttention::fine_runs(int64_t lo, int64_t i, int kvh, bool values, F&& f) const {
  const int64_t cap = fine_capacity(c_), kvd = int64_t{c_.n_kv_heads} * c_.head_dim;
  for (int64_t j = lo; j <= i;) {
    int64_t end = i + 1;
    if (j < pos0_) end = std::min(pos0_, cap ? (j / cap + 1) * cap : pos0_);
    const int64_t stride = j < pos0_ ? c_.head_dim : kvd;  // the cache's or the chunk's rows
    f(j - lo, fine(j, values, kvh), stride, static_cast<int>(end - j));
    j = end;
  }
}

void ChunkAttention::attend(int t, int head, float* out, std::vector<float>& scratch) const {
  const int d = c_.head_dim, m = c_.fma_block_size;
  const int kvh = head / (c_.n_heads / c_.n_kv_heads);
  const int64_t i = pos0_ + t;
  const float* q = q_ + size_t(t) * c_.n_heads * d + size_t(head) * d;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int64_t lo = c_.fma_enabled ? std::max<int64_t>(0, (i / m - 1) * m) : 0;

  // Scores in one list: fine keys first, then p_l summaries per visible group of level l.
  thread_local std::vector<Group> groups;
  const size_t n_fine = size_t(i - lo + 1);
  const size_t n_scores = n_fine + visible_groups(i, groups);
  scratch.resize(n_scores);
  float* s = scratch.data();
  fine_runs(lo, i, kvh, false, [&](int64_t at, const float* k, int64_t stride, int n) {
    scaled_dots(q, k, stride, n, d, scale, s + at);
  });
  for (const Group& gr : groups) {
    float* sg = s + n_fine + gr.at;
    scaled_dots(q, summary(gr.level, gr.g, false, kvh), d, gr.rank, d, scale, sg);
    if (c_.fma_scale_attn) {
      const float bonus = std::log(static_cast<float>(c_.group_size(gr.level)) / gr.rank);
      for (int r = 0; r < gr.rank; ++r) sg[r] += bonus;
    }
  }
  softmax(s, static_cast<int>(n_scores));
  std::fill(out, out + d, 0.0f);
  fine_runs(lo, i, kvh, true, [&](int64_t at, const float* v, int64_t stride, int n) {
    add_weighted_rows(s + at, v, stride, n, d, out);
  });
  for (const Group& gr : groups)
    add_weighted_rows(s + n_fine + gr.at, summary(gr.level, gr.g, true, kvh), d, gr.rank, d, out);
}

void ChunkAttention::attend_block(int t0, int nq, int head, float* out, int64_t out_stride,
                                  std::vector<float>& scratch) const {
  const int d = c_.head_dim, m = c_.fma_block_size;
  const int kvh = head / (c_.n_heads / c_.n_kv_heads);
  const int64_t i0 = pos0_ + t0, i1 = i0 + nq - 1;
  if (nq < 1 || t0 < 0 || t0 + nq > T_ || (c_.fma_enabled && i0 / m != i1 / m))
    throw Error("attend_block: tokens " + std::to_string(t0) + ".." + std::to_string(t0 + nq - 1) +
                " are not in one block of the chunk");
  const int64_t q_stride = int64_t{c_.n_heads} * d;
  const float* q = q_ + size_t(t0) * q_stride + size_t(head) * d;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int64_t lo = c_.fma_enabled ? std::max<int64_t>(0, (i0 / m - 1) * m) : 0;

  // Query a sees fine keys lo..i0+a and then the same summaries: its scores are the first
  // n_fine(a) of the block's fine scores (row a of `s`, width `n_max`), followed by its summaries'
  // (written over the later keys' scores, which it does not see); `p` holds its fine weights,
  // zero past n_fine(a), for the weighted sum over all of the block's fine values.
  thread_local std::vector<Group> groups;
  const int64_t n_max = i1 - lo + 1;
  const int64_t n_coarse = int64_t(visible_groups(i0, groups));
  const int64_t width = n_max + n_coarse;
  scratch.resize(size_t(nq) * (width + n_max));
  float* s = scratch.data();
  float* p = s + size_t(nq) * width;
  fine_runs(lo, i1, kvh, false, [&](int64_t at, const float* k, int64_t stride, int n) {
    scaled_dots_rows(q, q_stride, nq, k, stride, n, d, scale, s + at, width);
  });
  for (int a = 0; a < nq; ++a) {
    const int64_t n_fine = i0 + a - lo + 1;
    float* sa = s + a * width;
    for (const Group& gr : groups) {
      float* sg = sa + n_fine + gr.at;
      scaled_dots(q + a * q_stride, summary(gr.level, gr.g, false, kvh), d, gr.rank, d, scale, sg);
      if (c_.fma_scale_attn) {
        const float bonus = std::log(static_cast<float>(c_.group_size(gr.level)) / gr.rank);
        for (int r = 0; r < gr.rank; ++r) sg[r] += bonus;
      }
    }
    softmax(sa, static_cast<int>(n_fine + n_coarse));
    std::copy_n(sa, n_fine, p + a * n_max);
    std::fill(p + a * n_max + n_fine, p + (a + 1) * n_max, 0.0f);
    std::fill(out + a * out_stride, out + a * out_stride + d, 0.0f);
  }
  fine_runs(lo, i1, kvh, true, [&](int64_t at, const float* v, int64_t stride, int n) {
    add_weighted_rows_rows(p + at, n_max, nq, v, stride, n, d, out, out_stride);
  });
  for (int a = 0; a < nq; ++a) {
    const float* sa = s + a * width + (i0 + a - lo + 1);
    for (const Group& gr : groups)
      add_weighted_rows(sa + gr.at, summary(gr.level, gr.g, true, kvh), d, gr.rank, d,
                        out + a * out_stride);
  }
}

void ChunkAttention::commit() {
  const size_t d = c_.head_dim, kvd = size_t(c_.n_kv_heads) * d;
  const int64_t cap = fine_capacity(c_);
  if (cap == 0) {  // exact mode: room for the chunk, the slots at least doubled when they grow
    const size_t have = fine_slots(c_, cache_.fine_k), need = size_t(pos0_ + T_);
    if (need > have) {
      const size_t grown = std::max(need, 2 * have);
      for (auto* all : {&cache_.fine_k, &cache_.fine_v}) {
        std::vector<float> more(grown * kvd);
        for (int h = 0; h < c_.n_kv_heads; ++h)
          std::copy_n(all->data() + h * have * d, size_t(pos0_) * d, more.data() + h * grown * d);
        *all = std::move(more);
      }
    }
  }
  // With FMA only the last 2m tokens can still be seen.
  const size_t slots = fine_slots(c_, cache_.fine_k);
  for (int64_t j = cap ? std::max<int64_t>(pos0_, pos0_ + T_ - cap) : pos0_; j < pos0_ + T_; ++j)
    for (int h = 0; h < c_.n_kv_heads; ++h) {
      const size_t src = size_t(j - pos0_) * kvd + h * d;
      const size_t dst = (h * slots + size_t(cap ? j % cap : j)) * d;
      std::copy_n(k_ + src, d, cache_.fine_k.data() + dst);
      std::copy_n(v_ + src, d, cache_.fine_v.data() + dst);
    }
  const int nkv = c_.n_kv_heads;
  const size_t block = size_t(nkv) * c_.fma_rank * c_.head_dim;
  for (int l = 1; l <= c_.n_levels(); ++l) {
    const int64_t n_new = static_cast<int64_t>(new_k_[l - 1].size() / block);
    for (int64_t k = std::max<int64_t>(0, n_new - 3); k < n_new; ++k) {
      const int64_t g = first_new_[l - 1] + k;
      const size_t slot = size_t(l - 1) * 3 + size_t(g % 3);
      cache_.sum_group[slot] = g;
      std::copy_n(new_k_[l - 1].data() + k * block, block, cache_.sum_k.data() + slot * block);
      std::copy_n(new_v_[l - 1].data() + k * block, block, cache_.sum_v.data() + slot * block);
    }
  }
}

}  // namespace mp::cpu
