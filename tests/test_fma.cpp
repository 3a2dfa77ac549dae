// FMA attention (the CPU reference kernel, over the hierarchical cache) against a brute-force
// implementation of DESIGN.md section 1 written here: per query, the explicit key list.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <complex>
#include <cstring>
#include <iterator>
#include <random>
#include <sstream>

#include "fma_cpu.h"
#include "ops_cpu.h"

namespace {

using mp::Config;
using mp::Downsampling;

Config attn_config(int n, int m, int p, Downsampling ds, bool scale, int heads, int kv_heads, int d,
                   bool rotary = false, std::vector<int> ranks = {}) {
  Config c;
  c.vocab_size = 8;
  c.hidden_size = heads * d;
  c.n_layers = 1;
  c.n_heads = heads;
  c.n_kv_heads = kv_heads;
  c.head_dim = d;
  c.intermediate_size = 8;
  c.n_ctx_train = n;
  c.fma_block_size = m;
  c.fma_rank = p;
  c.fma_downsampling = ds;
  c.fma_scale_attn = scale;
  c.fma_rotary_summaries = rotary;
  if (!ranks.empty()) c.fma_rank = *std::max_element(ranks.begin(), ranks.end());
  c.fma_level_ranks = std::move(ranks);
  c.bos_token_id = c.eos_token_id = 0;
  c.validate();
  return c;
}

struct RandomLayer {
  // Per level, HF layout [p*d][in][w]; rotary keys: [d/2*p][2][w] and no bias.
  std::vector<std::vector<float>> wk, bk, wv, bv;
  mp::cpu::LayerDownsamplers ds;
};

RandomLayer random_layer(const Config& c, std::mt19937& rng) {
  std::normal_distribution<float> nd(0, 1);
  RandomLayer r;
  const int in = c.fma_downsampling == Downsampling::Conv ? c.head_dim : 1;
  for (int l = 1; l <= c.n_levels(); ++l) {
    const int w = c.group_size(l);
    auto fill = [&](size_t n, float s) {
      std::vector<float> v(n);
      for (auto& x : v) x = s * nd(rng);
      return v;
    };
    const size_t pd = size_t(c.rank(l)) * c.head_dim;
    r.wk.push_back(fill(pd * in * w, 1.0f / std::sqrt(float(in * w))));  // rotary: as many
    r.bk.push_back(mp::cpu::paired_keys(c) ? std::vector<float>{} : fill(pd, 0.1f));
    r.wv.push_back(fill(pd * in * w, 1.0f / std::sqrt(float(in * w))));
    r.bv.push_back(fill(pd, 0.1f));
    r.ds.k.push_back(mp::cpu::make_downsampler(c, l, true, r.wk.back(), r.bk.back()));
    r.ds.v.push_back(mp::cpu::make_downsampler(c, l, false, r.wv.back(), r.bv.back()));
  }
  return r;
}

// Summary r of group g of one head, straight from DESIGN.md's formulas and docs/MODEL.md's for
// rotary key summaries (pair j as the complex number x_j + i x_{j+d/2}, times a + ib per tap).
// x: [T][kv][d].
std::vector<double> brute_summary(const Config& c, bool keys, const std::vector<float>& W,
                                  const std::vector<float>& b, const std::vector<float>& x,
                                  int level, int64_t g, int kvh) {
  const int d = c.head_dim, p = c.rank(level), w = c.group_size(level), nkv = c.n_kv_heads;
  std::vector<double> s(size_t(p) * d);
  auto at = [&](int t, int ch) { return double(x[(size_t(g * w + t) * nkv + kvh) * d + ch]); };
  if (keys && c.fma_rotary_summaries && c.fma_downsampling == Downsampling::GroupedConv) {
    for (int r = 0; r < p; ++r)
      for (int j = 0; j < d / 2; ++j) {
        std::complex<double> acc = 0;
        for (int t = 0; t < w; ++t) {
          const std::complex<double> u(W[((size_t(j) * p + r) * 2) * w + t],
                                       W[((size_t(j) * p + r) * 2 + 1) * w + t]);
          acc += u * std::complex<double>(at(t, j), at(t, j + d / 2));
        }
        s[size_t(r) * d + j] = acc.real();
        s[size_t(r) * d + j + d / 2] = acc.imag();
      }
    return s;
  }
  for (int r = 0; r < p; ++r)
    for (int ch = 0; ch < d; ++ch) {
      double acc = 0;
      if (c.fma_downsampling == Downsampling::AvgPool) {
        const int span = w / p;
        for (int t = r * span; t < (r + 1) * span; ++t)
          acc += x[(size_t(g * w + t) * nkv + kvh) * d + ch];
        acc /= span;
      } else {
        const int oc = ch * p + r;
        acc = b[oc];
        const int in = c.fma_downsampling == Downsampling::Conv ? d : 1;
        for (int ci = 0; ci < in; ++ci)
          for (int t = 0; t < w; ++t) {
            const int src = in == 1 ? ch : ci;
            acc += double(W[(size_t(oc) * in + ci) * w + t]) *
                   x[(size_t(g * w + t) * nkv + kvh) * d + src];
          }
      }
      s[size_t(r) * d + ch] = acc;
    }
  return s;
}

// out[i][h] by brute force: every query's key list from the rules of section 1.
std::vector<double> brute_fma(const Config& c, const RandomLayer& rl, const std::vector<float>& q,
                              const std::vector<float>& k, const std::vector<float>& v, int T) {
  const int d = c.head_dim, H = c.n_heads, nkv = c.n_kv_heads, m = c.fma_block_size;
  std::vector<double> out(size_t(T) * H * d);
  for (int i = 0; i < T; ++i)
    for (int h = 0; h < H; ++h) {
      const int kvh = h / (H / nkv);
      std::vector<std::vector<double>> keys, vals;
      std::vector<double> bonus;
      const int lo = c.fma_enabled ? std::max(0, (i / m - 1) * m) : 0;
      for (int j = lo; j <= i; ++j) {
        keys.emplace_back(&k[(size_t(j) * nkv + kvh) * d], &k[(size_t(j) * nkv + kvh) * d] + d);
        vals.emplace_back(&v[(size_t(j) * nkv + kvh) * d], &v[(size_t(j) * nkv + kvh) * d] + d);
        bonus.push_back(0);
      }
      for (int l = 1; l <= c.n_levels(); ++l) {
        const int w = c.group_size(l), p = c.rank(l), B = i / (2 * w), half = (i % (2 * w)) / w;
        std::vector<int> groups;
        if (B >= 1) groups.push_back(2 * B - 2);
        if (B >= 1 && half == 1) groups.push_back(2 * B - 1);
        for (int g : groups) {
          EXPECT_LE((g + 1) * w, i);
          auto ks =
              brute_summary(c, true, rl.wk.empty() ? std::vector<float>{} : rl.wk[l - 1],
                            rl.bk.empty() ? std::vector<float>{} : rl.bk[l - 1], k, l, g, kvh);
          auto vs =
              brute_summary(c, false, rl.wv.empty() ? std::vector<float>{} : rl.wv[l - 1],
                            rl.bv.empty() ? std::vector<float>{} : rl.bv[l - 1], v, l, g, kvh);
          for (int r = 0; r < p; ++r) {
            keys.emplace_back(ks.begin() + r * d, ks.begin() + (r + 1) * d);
            vals.emplace_back(vs.begin() + r * d, vs.begin() + (r + 1) * d);
            bonus.push_back(c.fma_scale_attn ? std::log(double(w) / p) : 0.0);
          }
        }
      }
      std::vector<double> s(keys.size());
      double mx = -1e300;
      for (size_t j = 0; j < keys.size(); ++j) {
        double dp = 0;
        for (int ch = 0; ch < d; ++ch) dp += q[(size_t(i) * H + h) * d + ch] * keys[j][ch];
        s[j] = dp / std::sqrt(double(d)) + bonus[j];
        mx = std::max(mx, s[j]);
      }
      double tot = 0;
      for (auto& x : s) tot += (x = std::exp(x - mx));
      for (size_t j = 0; j < keys.size(); ++j)
        for (int ch = 0; ch < d; ++ch)
          out[(size_t(i) * H + h) * d + ch] += s[j] / tot * vals[j][ch];
    }
  return out;
}

// Runs the cache-based kernel over T tokens in chunks of `chunk`: attend() token by token, or
// with `blocks` attend_block() over each chunk's runs of tokens within one FMA block (up to 7).
std::vector<float> cached_fma(const Config& c, const RandomLayer& rl, const std::vector<float>& q,
                              std::vector<float> k, std::vector<float> v, int T, int chunk,
                              bool blocks = false) {
  const int d = c.head_dim, H = c.n_heads, nkv = c.n_kv_heads, m = c.fma_block_size;
  auto seq = mp::cpu::make_seq_cache(c);
  std::vector<float> out(size_t(T) * H * d, NAN), scratch;
  for (int t0 = 0; t0 < T; t0 += chunk) {
    const int n = std::min(chunk, T - t0);
    mp::cpu::ChunkAttention ca(c, rl.ds, seq.layers[0], t0, n, &q[size_t(t0) * H * d],
                               &k[size_t(t0) * nkv * d], &v[size_t(t0) * nkv * d]);
    for (int t = 0; t < n;) {
      const int nq = blocks ? std::min({7, n - t, m - (t0 + t) % m}) : 1;
      for (int h = 0; h < H; ++h) {
        float* o = &out[(size_t(t0 + t) * H + h) * d];
        if (blocks)
          ca.attend_block(t, nq, h, o, int64_t{H} * d, scratch);
        else
          ca.attend(t, h, o, scratch);
      }
      t += nq;
    }
    ca.commit();
  }
  return out;
}

double rel_err(const std::vector<float>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / den);
}

struct Case {
  int n, m, p;
  Downsampling ds;
  bool scale;
  int heads, kv;
  bool rotary = false;
  std::vector<int> ranks = {};  // per level; empty: p everywhere
};

class FmaVsBruteForce : public ::testing::TestWithParam<Case> {};

TEST_P(FmaVsBruteForce, MatchesOnRandomInputsPastTrainedLength) {
  const Case cs = GetParam();
  const Config c =
      attn_config(cs.n, cs.m, cs.p, cs.ds, cs.scale, cs.heads, cs.kv, 8, cs.rotary, cs.ranks);
  std::mt19937 rng(cs.n * 131 + cs.m * 7 + cs.p + int(cs.ds));
  std::normal_distribution<float> nd(0, 1);
  const RandomLayer rl = random_layer(c, rng);
  const int T = 2 * cs.n + cs.m + 3;  // past the trained length, ending mid-block
  std::vector<float> q(size_t(T) * c.n_heads * 8), k(size_t(T) * c.n_kv_heads * 8), v(k.size());
  for (auto* vec : {&q, &k, &v})
    for (auto& x : *vec) x = nd(rng);
  const auto ref = brute_fma(c, rl, q, k, v, T);
  for (int chunk : {1, 3, cs.m, 7 * cs.m, T})
    for (bool blocks : {false, true}) {
      const auto got = cached_fma(c, rl, q, k, v, T, chunk, blocks);
      EXPECT_LT(rel_err(got, ref), 1e-5) << "chunk " << chunk << (blocks ? " in blocks" : "");
    }
}

// attend_block (several queries at once) against attend (one by one), output by output, on head
// sizes that fill the vectors, leave a tail (even: RoPE's), or fit in less than one; every
// instruction set.
TEST(Fma, BlockAttentionEqualsTokenByToken) {
  for (int d : {64, 38, 8}) {
    const Config c = attn_config(128, 16, 2, Downsampling::GroupedConv, true, 6, 2, d);
    std::mt19937 rng(d);
    std::normal_distribution<float> nd(0, 1);
    const RandomLayer rl = random_layer(c, rng);
    const int T = 3 * 128 + 21, H = c.n_heads;
    std::vector<float> q(size_t(T) * H * d), k(size_t(T) * c.n_kv_heads * d), v(k.size());
    for (auto* vec : {&q, &k, &v})
      for (auto& x : *vec) x = nd(rng);
    for (mp::cpu::Isa isa : {mp::cpu::Isa::Scalar, mp::cpu::Isa::Avx2, mp::cpu::Isa::Avx512}) {
      if (isa > mp::cpu::detected_isa()) continue;
      const mp::cpu::Isa before = mp::cpu::active_isa();
      mp::cpu::set_isa(isa);
      for (int chunk : {T, 40}) {
        const auto want = cached_fma(c, rl, q, k, v, T, chunk);
        const auto got = cached_fma(c, rl, q, k, v, T, chunk, true);
        for (size_t i = 0; i < got.size(); ++i)
          ASSERT_NEAR(got[i], want[i], 1e-5 * (1 + std::abs(want[i])))
              << mp::cpu::isa_name(isa) << " d " << d << " chunk " << chunk << " at " << i;
      }
      mp::cpu::set_isa(before);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, FmaVsBruteForce,
    ::testing::Values(Case{32, 8, 2, Downsampling::GroupedConv, true, 2, 1},
                      Case{64, 8, 2, Downsampling::GroupedConv, false, 4, 2},
                      Case{64, 4, 4, Downsampling::Conv, true, 2, 2},
                      Case{128, 8, 4, Downsampling::AvgPool, true, 2, 1},
                      Case{128, 16, 2, Downsampling::Conv, false, 3, 3},
                      Case{256, 8, 1, Downsampling::AvgPool, false, 2, 2},
                      Case{256, 16, 4, Downsampling::GroupedConv, true, 4, 1},
                      Case{64, 8, 2, Downsampling::GroupedConv, true, 4, 2, true},
                      Case{128, 8, 4, Downsampling::AvgPool, true, 2, 1, true},
                      Case{128, 8, 4, Downsampling::GroupedConv, true, 4, 2, false, {2, 2, 4}},
                      Case{128, 8, 4, Downsampling::GroupedConv, false, 2, 1, true, {1, 4, 3}},
                      Case{128, 8, 4, Downsampling::AvgPool, true, 2, 2, false, {2, 4, 4}},
                      Case{64, 4, 4, Downsampling::Conv, true, 2, 2, false, {4, 1, 2}}),
    [](const auto& info) {
      // A stream: GCC 12 warns falsely (-Wrestrict) on chained string +.
      const Case& c = info.param;
      std::ostringstream name;
      name << "n" << c.n << "_m" << c.m << "_p" << c.p << "_" << mp::to_string(c.ds)
           << (c.scale ? "_scaled" : "") << "_h" << c.heads << "kv" << c.kv
           << (c.rotary ? "_rotary" : "");
      for (int r : c.ranks) name << "_" << r;
      return name.str();
    });

TEST(Fma, EqualsExactCausalAttentionUpTo2m) {
  for (auto ds : {Downsampling::GroupedConv, Downsampling::Conv, Downsampling::AvgPool}) {
    Config c = attn_config(64, 8, 2, ds, true, 2, 1, 8);
    Config exact = c;
    exact.fma_enabled = false;
    std::mt19937 rng(5 + int(ds));
    std::normal_distribution<float> nd(0, 1);
    const RandomLayer rl = random_layer(c, rng);
    const int T = 2 * c.fma_block_size;
    std::vector<float> q(size_t(T) * 2 * 8), k(size_t(T) * 8), v(k.size());
    for (auto* vec : {&q, &k, &v})
      for (auto& x : *vec) x = nd(rng);
    const auto fma = cached_fma(c, rl, q, k, v, T, 5);
    const auto ex = cached_fma(exact, RandomLayer{}, q, k, v, T, T);
    const auto ref = brute_fma(exact, RandomLayer{}, q, k, v, T);
    EXPECT_LT(rel_err(fma, ref), 1e-6);
    EXPECT_LT(rel_err(ex, ref), 1e-6);
    // One token later the far field starts to differ from exact attention.
    std::vector<float> q2(size_t(T + 8) * 2 * 8), k2(size_t(T + 8) * 8), v2(k2.size());
    for (auto* vec : {&q2, &k2, &v2})
      for (auto& x : *vec) x = nd(rng);
    const auto f2 = cached_fma(c, rl, q2, k2, v2, T + 8, 4);
    const auto e2 = brute_fma(exact, RandomLayer{}, q2, k2, v2, T + 8);
    EXPECT_GT(rel_err(f2, e2), 1e-3);
  }
}

// The state's bytes and each token's work: the scores one attend() computes (its fine keys and
// the summaries it sees, the size of the scores it leaves in `scratch`) stay under 2m + 3 p L at
// every position, 500 tokens being ~8x the trained length: a token's cost does not grow with the
// text before it.
TEST(Fma, CacheSizeAndKeysPerTokenStayFixedPastTrainedLength) {
  const Config c = attn_config(64, 8, 2, Downsampling::GroupedConv, true, 2, 1, 8);
  auto seq = mp::cpu::make_seq_cache(c);
  const size_t before = mp::cpu::seq_cache_bytes(c, seq);
  // (2m + 4pL) * d keys and as many values, per KV head.
  const size_t expected_floats = size_t(2 * 8 + 4 * 2 * c.n_levels()) * 8 * 2 * c.n_kv_heads;
  EXPECT_EQ(before, expected_floats * 4 + 8 * 3 * c.n_levels());
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0, 1);
  const RandomLayer rl = random_layer(c, rng);
  std::vector<float> q(2 * 8), k(8), v(8), out(8), scratch;
  for (int t = 0; t < 500; ++t) {
    for (auto* vec : {&q, &k, &v})
      for (auto& x : *vec) x = nd(rng);
    mp::cpu::ChunkAttention ca(c, rl.ds, seq.layers[0], t, 1, q.data(), k.data(), v.data());
    ca.attend(0, 1, out.data(), scratch);
    ca.commit();
    for (float x : out) ASSERT_TRUE(std::isfinite(x));
    ASSERT_LE(scratch.size(), size_t(2 * 8 + 3 * 2 * c.n_levels())) << "token " << t;
    if (t >= 2 * 8) {  // past the first block: at least m + 1 fine keys
      ASSERT_GT(scratch.size(), size_t(8)) << "token " << t;
    }
  }
  EXPECT_EQ(mp::cpu::seq_cache_bytes(c, seq), before);
}

// The cache keeps a KV head's fine keys together ([n_kv][slots][d]) but a state file holds them
// as before, [pos][n_kv][d] (the ring's 2m slots with FMA; files of earlier builds load, the CUDA
// backend's arrays are in this order): the file's first fine block read against the keys given,
// and the file read back, with FMA and in exact mode (whose slots grow).
TEST(Fma, StateFileKeepsFineKeysPositionMajor) {
  for (const bool fma : {true, false}) {
    Config c = attn_config(64, 8, 2, Downsampling::GroupedConv, true, 4, 2, 8);
    c.fma_enabled = fma;
    const int d = c.head_dim, nkv = c.n_kv_heads, T = 37;
    const int rows = fma ? 2 * c.fma_block_size : T;
    std::mt19937 rng(11);
    std::normal_distribution<float> nd(0, 1);
    const RandomLayer rl = random_layer(c, rng);
    std::vector<float> q(size_t(T) * c.n_heads * d), k(size_t(T) * nkv * d), v(k.size());
    for (auto* vec : {&q, &k, &v})
      for (auto& x : *vec) x = nd(rng);
    auto seq = mp::cpu::make_seq_cache(c);
    for (int t0 = 0; t0 < T; t0 += 5) {  // chunks of 5: the ring wraps inside one
      const int n = std::min(5, T - t0);
      mp::cpu::ChunkAttention(c, rl.ds, seq.layers[0], t0, n, &q[size_t(t0) * c.n_heads * d],
                              &k[size_t(t0) * nkv * d], &v[size_t(t0) * nkv * d])
          .commit();
    }
    seq.pos = T;
    const std::vector<uint8_t> bytes = mp::cpu::serialize(c, seq);
    uint64_t n_head, n_fine;
    std::memcpy(&n_head, bytes.data(), 8);
    const size_t at = 8 + 8 * n_head;
    std::memcpy(&n_fine, bytes.data() + at, 8);
    ASSERT_EQ(n_fine, size_t(rows) * nkv * d) << "fma " << fma;
    std::vector<float> file(n_fine);
    std::memcpy(file.data(), bytes.data() + at + 8, 4 * n_fine);
    for (int j = std::max(0, T - rows); j < T; ++j)
      for (int h = 0; h < nkv; ++h)
        for (int e = 0; e < d; ++e)
          ASSERT_EQ(file[(size_t(j % rows) * nkv + h) * d + e], k[(size_t(j) * nkv + h) * d + e])
              << "fma " << fma << " position " << j << " KV head " << h;
    mp::cpu::SeqCache back;
    mp::cpu::deserialize(c, bytes, back);
    EXPECT_EQ(mp::cpu::serialize(c, back), bytes) << "fma " << fma;
    if (fma) {  // the same slots: the same arrays
      EXPECT_EQ(back.layers[0].fine_k, seq.layers[0].fine_k);
      EXPECT_EQ(back.layers[0].fine_v, seq.layers[0].fine_v);
    }
    EXPECT_EQ(mp::cpu::seq_cache_bytes(c, back), mp::cpu::seq_cache_bytes(c, seq));
  }
}

// Rotary key summaries make a summary's score, hence every attention output, depend on relative
// positions only. Two ways to shift a sequence by k test it:
// - RopeShift: its RoPE positions start at k instead of 0, its places in the hierarchy stay (any
//   k). Exact attention is invariant too.
// - SequenceShift: k other tokens come first, so RoPE and the hierarchy move together, as in the
//   engine. The hierarchy repeats with period n/2 (= 2 w_L, which every level's 2 w_l divides):
//   with k a multiple of it every token keeps its place in every block and group, and a query at
//   i >= n/2 sees only tokens from (i / (n/2) - 1) n/2 on (level L's earliest group), none before
//   the sequence; so its outputs from i = n/2 on must not change. k = m moves the groups: they do.
// Per-channel groupedconv and conv summaries are invariant under neither: their outputs move with
// k (asserted, so that the tests can fail).
struct ShiftCase {
  const char* name;
  Downsampling ds;
  bool fma, rotary, invariant;
  std::vector<int> ranks = {};
};

const std::vector<ShiftCase> kShiftCases = {
    {"groupedconv_rotary", Downsampling::GroupedConv, true, true, true},
    {"avgpool_rotary", Downsampling::AvgPool, true, true, true},
    {"avgpool", Downsampling::AvgPool, true, false, true},
    {"exact", Downsampling::GroupedConv, false, false, true},
    {"groupedconv_per_channel", Downsampling::GroupedConv, true, false, false},
    {"conv", Downsampling::Conv, true, false, false},
    {"groupedconv_rotary_ranks_2_4", Downsampling::GroupedConv, true, true, true, {2, 4}},
    {"groupedconv_per_channel_ranks_2_4", Downsampling::GroupedConv, true, false, false, {2, 4}}};

// One layer (n = 64, m = 8, p = 2, d = 16, GQA 4/2) and T = 197 tokens (past n) of random q, k, v
// (before RoPE).
struct ShiftRig {
  explicit ShiftRig(const ShiftCase& cs)
      : c(attn_config(64, 8, 2, cs.ds, true, 4, 2, 16, cs.rotary, cs.ranks)) {
    c.fma_enabled = cs.fma;
    std::mt19937 rng(11 + int(cs.ds) + 3 * cs.rotary);
    rl = cs.fma ? random_layer(c, rng) : RandomLayer{};
    q = random_rows(T, c.n_heads, rng);
    k = random_rows(T, c.n_kv_heads, rng);
    v = random_rows(T, c.n_kv_heads, rng);
  }
  std::vector<float> random_rows(int rows, int heads, std::mt19937& rng) const {
    std::normal_distribution<float> nd(0, 1);
    std::vector<float> x(size_t(rows) * heads * c.head_dim);
    for (auto& e : x) e = nd(rng);
    return x;
  }
  // Outputs of tokens whose RoPE positions are start, start + 1, ... and whose places in the
  // hierarchy are 0, 1, ..., in chunks of `chunk`.
  std::vector<float> outputs(std::vector<float> qr, std::vector<float> kr,
                             const std::vector<float>& vr, int64_t start, int chunk) const {
    const int rows = int(vr.size() / (size_t(c.n_kv_heads) * c.head_dim));
    mp::cpu::rope(qr.data(), rows, c.n_heads, c.head_dim, start, c.rope_theta, 1.0f);
    mp::cpu::rope(kr.data(), rows, c.n_kv_heads, c.head_dim, start, c.rope_theta, 1.0f);
    return cached_fma(c, rl, qr, kr, vr, rows, chunk);
  }
  Config c;
  RandomLayer rl;
  static constexpr int T = 3 * 64 + 5;
  std::vector<float> q, k, v;
};

class RopeShift : public ::testing::TestWithParam<ShiftCase> {};

TEST_P(RopeShift, OutputsDependOnRelativePositionsOnly) {
  const ShiftCase cs = GetParam();
  const ShiftRig r(cs);
  const auto base = r.outputs(r.q, r.k, r.v, 0, r.T);
  const std::vector<double> ref(base.begin(), base.end());
  double worst = 0;
  for (int64_t start : {int64_t{1}, int64_t{37}, int64_t{4099}, int64_t{1000003}})
    for (int chunk : {r.T, 5}) {
      const double err = rel_err(r.outputs(r.q, r.k, r.v, start, chunk), ref);
      worst = std::max(worst, err);
      if (cs.invariant) {
        EXPECT_LT(err, 1e-5) << "start " << start << ", chunk " << chunk;
      }
    }
  if (!cs.invariant) {
    EXPECT_GT(worst, 1e-2);
  }
  std::printf("%s: largest relative change of the outputs over the shifts: %.2e\n", cs.name, worst);
}

INSTANTIATE_TEST_SUITE_P(Kinds, RopeShift, ::testing::ValuesIn(kShiftCases),
                         [](const auto& info) { return std::string(info.param.name); });

class SequenceShift : public ::testing::TestWithParam<ShiftCase> {};

TEST_P(SequenceShift, OutputsFromHalfTheTrainedLengthOnDoNotChange) {
  const ShiftCase cs = GetParam();
  const ShiftRig r(cs);
  const int half = int(r.c.n_ctx_train / 2), H = r.c.n_heads, d = r.c.head_dim;
  const size_t row = size_t(H) * d;
  const auto base = r.outputs(r.q, r.k, r.v, 0, r.T);
  const std::vector<double> ref(base.begin() + half * row, base.end());
  // The outputs of the sequence's tokens from i = n/2 on, after `shift` random tokens.
  auto shifted = [&](int shift, int chunk) {
    std::mt19937 rng(static_cast<uint32_t>(shift));
    auto with_prefix = [&](const std::vector<float>& x, int heads) {
      std::vector<float> all = r.random_rows(shift, heads, rng);
      all.insert(all.end(), x.begin(), x.end());
      return all;
    };
    const auto qs = with_prefix(r.q, H), ks = with_prefix(r.k, r.c.n_kv_heads),
               vs = with_prefix(r.v, r.c.n_kv_heads);
    const auto out = r.outputs(qs, ks, vs, 0, chunk);
    return std::vector<float>(out.begin() + (shift + half) * row, out.end());
  };
  double worst = 0;
  for (int shift : {half, 3 * half, 32 * half})
    for (int chunk : {shift + r.T, 5}) {
      const double err = rel_err(shifted(shift, chunk), ref);
      worst = std::max(worst, err);
      if (cs.invariant) {
        EXPECT_LT(err, 1e-5) << "shift " << shift << ", chunk " << chunk;
      }
    }
  if (!cs.invariant) {
    EXPECT_GT(worst, 1e-2);
  }
  const double moved = rel_err(shifted(r.c.fma_block_size, 5), ref);
  EXPECT_GT(moved, 1e-2);
  std::printf("%s: largest relative change over shifts by multiples of n/2: %.2e; by m: %.2e\n",
              cs.name, worst, moved);
}

std::vector<ShiftCase> fma_shift_cases() {
  std::vector<ShiftCase> fma;
  std::copy_if(kShiftCases.begin(), kShiftCases.end(), std::back_inserter(fma),
               [](const ShiftCase& cs) { return cs.fma; });
  return fma;
}

INSTANTIATE_TEST_SUITE_P(Kinds, SequenceShift, ::testing::ValuesIn(fma_shift_cases()),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(Fma, RotarySummariesNeedGroupedconvOrAvgpool) {
  try {
    attn_config(64, 8, 2, Downsampling::Conv, true, 2, 1, 8, true);
    FAIL() << "conv with rotary summaries was accepted";
  } catch (const mp::Error& e) {
    EXPECT_NE(std::string(e.what()).find("fma_rotary_summaries needs groupedconv or avgpool"),
              std::string::npos)
        << e.what();
  }
}

}  // namespace
