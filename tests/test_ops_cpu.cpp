// The CPU backend's matrix products (oneDNN's sgemm, the hand-written matrix-vector kernels of
// every instruction set this CPU has; fp32, bf16 and Q8_0 weights) against the plain dot-product
// loop, on random inputs.
#include <gtest/gtest.h>
#include <omp.h>

#include <random>

#include "model_fixture.h"
#include "numeric.h"
#include "ops_cpu.h"

namespace {

using namespace mp;
using mp::testing::rel_err;

std::vector<float> random_floats(size_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

// Restores the instruction set and thread count a test changes.
class CpuOps : public ::testing::Test {
 protected:
  void TearDown() override {
    cpu::set_isa(isa_);
    cpu::set_products(products_);
    omp_set_num_threads(threads_);
  }
  std::vector<cpu::Isa> isas() const {
    std::vector<cpu::Isa> all;
    for (cpu::Isa i : {cpu::Isa::Scalar, cpu::Isa::Avx2, cpu::Isa::Avx512})
      if (i <= cpu::detected_isa()) all.push_back(i);
    return all;
  }
  cpu::Isa isa_ = cpu::active_isa();
  // matmul of random rows (each count of `rows`) by w on every path (oneDNN and the kernels,
  // every instruction set, 1 and 2 threads) against the dot-product loop over wf, w's values in
  // fp32: 1e-5 relative (norm-wise).
  void expect_every_path_equals_loop(const cpu::Matrix& w, const std::vector<float>& wf,
                                     std::initializer_list<int> rows, std::mt19937& rng,
                                     const std::string& what) {
    std::vector<float> wide(wf.size());
    for (int T : rows) {
      const std::vector<float> x = random_floats(size_t(T) * w.K, rng);
      std::vector<float> want(size_t(T) * w.N);
      cpu::matmul_reference(x.data(), T, w.K, wf.data(), w.N, want.data());
      for (auto products : {cpu::Products::OneDnn, cpu::Products::Kernels})
        for (cpu::Isa isa : isas())
          for (int threads : {1, 2}) {
            cpu::set_products(products);  // oneDNN must load where the tests run
            cpu::set_isa(isa);
            omp_set_num_threads(threads);
            std::vector<float> got(want.size(), NAN);
            cpu::matmul(x.data(), T, w, got.data(), wide);
            EXPECT_LT(rel_err(got, want), 1e-5)
                << "K " << w.K << " N " << w.N << " " << what << " T " << T << " "
                << cpu::isa_name(isa) << " threads " << threads
                << (products == cpu::Products::OneDnn ? " oneDNN" : " kernels");
          }
    }
  }
  cpu::Products products_ = cpu::active_products();
  int threads_ = omp_get_max_threads();
};

// fp32 sums in another order: 1e-5 relative (norm-wise) for fp32 and bf16 weights alike, as
// bf16 weights are widened exactly and every product is formed in fp32.
TEST_F(CpuOps, MatmulEqualsTheDotProductLoop) {
  std::mt19937 rng(5);
  const int shapes[][2] = {{37, 29}, {100, 130}, {384, 17}, {1024, 384}};  // K, N
  for (auto [K, N] : shapes)
    for (bool bf16 : {false, true}) {
      cpu::Matrix w;
      w.N = N;
      w.K = K;
      std::vector<float> wf = random_floats(size_t(N) * K, rng);
      if (bf16) {
        for (float& x : wf) w.bf16.push_back(f32_to_bf16(x));
        for (size_t i = 0; i < wf.size(); ++i) wf[i] = bf16_to_f32(w.bf16[i]);
      } else {
        w.f32 = wf;
      }
      expect_every_path_equals_loop(w, wf, {1, 2, 5, 7, 8, 9, 513}, rng, bf16 ? "bf16" : "f32");
    }
}

// A [N][K] matrix of random bf16 weights; wf: its values in fp32.
cpu::Matrix bf16_matrix(int N, int K, std::mt19937& rng, std::vector<float>& wf) {
  cpu::Matrix w;
  w.N = N;
  w.K = K;
  wf = random_floats(size_t(N) * K, rng);
  for (float& x : wf) {
    w.bf16.push_back(f32_to_bf16(x));
    x = bf16_to_f32(w.bf16.back());
  }
  return w;
}

// The bf16 products (AMX or AVX512-BF16 through oneDNN; x split into two bf16 parts): within
// the fp32 paths' 1e-5 relative (norm-wise) of the fp32 loop, as x is kept to 2^-17 and the
// sums are fp32 (measured: 2.0-2.3e-6), and 50 times closer to it than x rounded once to bf16
// (1.5e-3). Awkward shapes: T not a multiple of the 16 rows the path rounds up to, K and N not
// multiples of 16. With Activations::Bf16 (rounded once; T = 16 and 512: the product written in
// place) the loop over the rounded activations.
TEST_F(CpuOps, Bf16ProductsEqualTheDotProductLoop) {
  if (!cpu::bf16_products_available())
    GTEST_SKIP() << "this CPU (or its oneDNN) has no bf16 units (AMX, AVX512-BF16): "
                 << cpu::kernels_summary(0, cpu::Activations::SplitBf16);
  std::mt19937 rng(17);
  const int shapes[][2] = {{37, 29}, {100, 130}, {1024, 384}, {384, 2049}};  // K, N
  for (auto [K, N] : shapes) {
    std::vector<float> wf;
    const cpu::Matrix rows = bf16_matrix(N, K, rng, wf);
    const cpu::Matrix packed = [&] {  // the weights in oneDNN's layout, as the backend keeps them
      cpu::Matrix m = rows;
      cpu::pack_for_bf16_products(m);
      return m;
    }();
    ASSERT_TRUE(packed.packed) << "K " << K << " N " << N;
    for (int T : {9, 16, 17, 512, 513}) {
      const std::vector<float> x = random_floats(size_t(T) * K, rng);
      std::vector<float> want(size_t(T) * N), rounded_x(x.size()), once(want.size());
      cpu::matmul_reference(x.data(), T, K, wf.data(), N, want.data());
      for (size_t i = 0; i < x.size(); ++i) rounded_x[i] = bf16_to_f32(f32_to_bf16(x[i]));
      cpu::matmul_reference(rounded_x.data(), T, K, wf.data(), N, once.data());
      for (int threads : {1, 2})
        for (const cpu::Matrix* w : {&rows, &packed}) {
          omp_set_num_threads(threads);
          const std::string what = std::string(w->packed ? "packed" : "rows") + " K " +
                                   std::to_string(K) + " N " + std::to_string(N) + " T " +
                                   std::to_string(T);
          std::vector<float> got(want.size(), NAN);
          cpu::matmul(x.data(), T, *w, got.data(), {}, cpu::Activations::SplitBf16);
          EXPECT_LT(rel_err(got, want), 1e-5) << what;
          EXPECT_LT(rel_err(got, want), 0.02 * rel_err(once, want)) << what;
          // Rounded once (llama.cpp's way): the fp32 loop over the rounded activations, 1e-5.
          std::fill(got.begin(), got.end(), NAN);
          cpu::matmul(x.data(), T, *w, got.data(), {}, cpu::Activations::Bf16);
          EXPECT_LT(rel_err(got, once), 1e-5) << "rounded once: " << what;
        }
    }
  }
}

// Where the bf16 units are not used (here: AVX2 forced, as on a CPU without AVX-512, or the
// kernels' path without oneDNN), asking for bf16 products gives the fp32 path's results (1e-5).
TEST_F(CpuOps, Bf16ProductsFallBackToFp32) {
  std::mt19937 rng(19);
  const int K = 100, N = 130, T = 513;
  std::vector<float> wf;
  const cpu::Matrix w = bf16_matrix(N, K, rng, wf);
  const std::vector<float> x = random_floats(size_t(T) * K, rng);
  std::vector<float> want(size_t(T) * N), wide(wf.size());
  cpu::matmul_reference(x.data(), T, K, wf.data(), N, want.data());
  for (auto products : {cpu::Products::OneDnn, cpu::Products::Kernels}) {
    cpu::set_products(products);
    cpu::set_isa(std::min(cpu::Isa::Avx2, cpu::detected_isa()));
    EXPECT_FALSE(cpu::bf16_products_available());
    EXPECT_EQ(cpu::kernels_summary(2, cpu::Activations::SplitBf16).find("bf16"), std::string::npos)
        << cpu::kernels_summary(2, cpu::Activations::SplitBf16);
    std::vector<float> got(want.size(), NAN);
    cpu::matmul(x.data(), T, w, got.data(), wide, cpu::Activations::SplitBf16);
    EXPECT_LT(rel_err(got, want), 1e-5);
  }
}

// Each output on its own too: no row or column may hide behind the norm of the others.
TEST_F(CpuOps, MatrixVectorKernelsAgreeElementwise) {
  std::mt19937 rng(9);
  const int K = 389, N = 23;                     // K leaves a tail for every vector width
  const double tol = 1e-5 * std::sqrt(K / 3.0);  // 1e-5 of an output's typical size
  cpu::Matrix w;
  w.N = N;
  w.K = K;
  w.f32 = random_floats(size_t(N) * K, rng);
  for (int T = 1; T <= cpu::kGemvRows; ++T) {
    const std::vector<float> x = random_floats(size_t(T) * K, rng);
    std::vector<float> want(size_t(T) * N);
    cpu::matmul_reference(x.data(), T, K, w.f32.data(), N, want.data());
    for (cpu::Isa isa : isas()) {
      cpu::set_isa(isa);
      std::vector<float> got(want.size(), NAN);
      cpu::matmul(x.data(), T, w, got.data(), {});
      for (size_t i = 0; i < got.size(); ++i)
        ASSERT_NEAR(got[i], want[i], tol) << cpu::isa_name(isa) << " T " << T << " i " << i;
    }
  }
}

// Attention's loops on rows `stride` apart, against plain double sums: 1e-5 of the result's size.
TEST_F(CpuOps, AttentionLoopsEqualPlainSums) {
  std::mt19937 rng(13);
  for (int d : {64, 37, 8})
    for (int n : {1, 5, 16, 33, 130}) {  // 16, 33: whole batches of keys and a rest
      const int64_t stride = 3 * d + 1;
      const std::vector<float> q = random_floats(d, rng), p = random_floats(n, rng),
                               rows = random_floats(size_t(n) * stride, rng),
                               out0 = random_floats(d, rng);
      std::vector<double> want_s(n), want_o(out0.begin(), out0.end());
      for (int j = 0; j < n; ++j)
        for (int c = 0; c < d; ++c) {
          want_s[j] += 0.125 * double(q[c]) * rows[j * stride + c];
          want_o[c] += double(p[j]) * rows[j * stride + c];
        }
      for (cpu::Isa isa : isas()) {
        cpu::set_isa(isa);
        std::vector<float> s(n, NAN), o = out0;
        cpu::scaled_dots(q.data(), rows.data(), stride, n, d, 0.125f, s.data());
        cpu::add_weighted_rows(p.data(), rows.data(), stride, n, d, o.data());
        for (int j = 0; j < n; ++j)
          ASSERT_NEAR(s[j], want_s[j], 0.125 * 1e-5 * std::sqrt(d / 3.0))
              << cpu::isa_name(isa) << " d " << d;
        for (int c = 0; c < d; ++c)
          ASSERT_NEAR(o[c], want_o[c], 1e-5 * std::sqrt(n / 3.0) + 1e-6)
              << cpu::isa_name(isa) << " n " << n;
      }
    }
}

// Prefill's loops over several queries at once against the one-query loops above, query by
// query: the weighted sums to the bit (each output summed over the rows in the same order), the
// dots to 1e-6 relative (another reduction of the same partial sums). Query counts below, at and
// past the 4 that the row kernels take at a time.
TEST_F(CpuOps, AttentionRowLoopsEqualTheOneQueryLoops) {
  std::mt19937 rng(19);
  for (int d : {64, 37, 8})
    for (int nq : {1, 3, 4, 5, 9})
      for (int n : {5, 33, 130}) {
        const int64_t stride = 2 * d + 3, q_stride = d + 1, p_stride = n + 2, out_stride = d + 5;
        const std::vector<float> q = random_floats(size_t(nq) * q_stride, rng),
                                 p = random_floats(size_t(nq) * p_stride, rng),
                                 rows = random_floats(size_t(n) * stride, rng),
                                 out0 = random_floats(size_t(nq) * out_stride, rng);
        for (cpu::Isa isa : isas()) {
          cpu::set_isa(isa);
          std::vector<float> s(size_t(nq) * p_stride, NAN), o = out0;
          cpu::scaled_dots_rows(q.data(), q_stride, nq, rows.data(), stride, n, d, 0.125f,
                                s.data(), p_stride);
          cpu::add_weighted_rows_rows(p.data(), p_stride, nq, rows.data(), stride, n, d, o.data(),
                                      out_stride);
          for (int a = 0; a < nq; ++a) {
            std::vector<float> s1(n, NAN), o1(out0.begin() + a * out_stride,
                                              out0.begin() + a * out_stride + d);
            cpu::scaled_dots(q.data() + a * q_stride, rows.data(), stride, n, d, 0.125f, s1.data());
            cpu::add_weighted_rows(p.data() + a * p_stride, rows.data(), stride, n, d, o1.data());
            for (int j = 0; j < n; ++j)
              ASSERT_NEAR(s[a * p_stride + j], s1[j], 1e-6 * (std::abs(s1[j]) + 1e-3))
                  << cpu::isa_name(isa) << " d " << d << " nq " << nq << " n " << n;
            for (int c = 0; c < d; ++c)
              ASSERT_EQ(o[a * out_stride + c], o1[c])
                  << cpu::isa_name(isa) << " d " << d << " nq " << nq << " n " << n;
          }
        }
      }
}

// The vector exp and what uses it (SwiGLU, the attention's softmax) against std::exp in double
// precision, every instruction set: 2 ulp is 2.4e-7 relative; 1e-6 stated.
TEST_F(CpuOps, VectorExpSwigluAndSoftmaxEqualTheScalarFormulas) {
  std::mt19937 rng(17);
  std::vector<float> x(4099);  // not a multiple of any vector width
  std::uniform_real_distribution<float> wide(-87.0f, 88.0f);
  for (auto& v : x) v = wide(rng);
  x[0] = -87.0f, x[1] = 88.0f, x[2] = 0.0f, x[3] = -1e-8f, x[4] = 1e-8f;
  const std::vector<float> g0 = [&] {
    std::vector<float> g = random_floats(x.size(), rng);
    for (auto& v : g) v *= 12.0f;
    g[5] = -100.0f;  // exp(100): clamped to exp(88), silu still 0
    g[6] = 100.0f;
    return g;
  }();
  const std::vector<float> u = random_floats(x.size(), rng);
  for (cpu::Isa isa : isas()) {
    cpu::set_isa(isa);
    std::vector<float> y(x.size(), NAN);
    cpu::vector_exp(x.data(), int64_t(x.size()), y.data());
    for (size_t i = 0; i < x.size(); ++i)
      ASSERT_NEAR(y[i] / std::exp(double(x[i])), 1.0, 1e-6) << cpu::isa_name(isa) << " x " << x[i];
    for (int threads : {1, 2}) {
      omp_set_num_threads(threads);
      // T rows of [gate | up], F each (300 x 1000: the rows in parallel).
      for (auto [T, F] : {std::pair{1, 3}, {1, int(x.size())}, {5, 37}, {300, 1000}}) {
        const int64_t n = int64_t(T) * F;
        std::vector<float> gu(2 * n), want(n), y(n, NAN);
        for (int64_t i = 0; i < n; ++i) {
          const float g = g0[i % g0.size()], up = u[(i * 7) % u.size()];
          gu[(i / F) * 2 * F + i % F] = g;
          gu[(i / F) * 2 * F + F + i % F] = up;
          want[i] = float(double(g) / (1.0 + std::exp(-double(g))) * up);
        }
        cpu::swiglu(gu.data(), T, F, y.data());
        for (int64_t i = 0; i < n; ++i)
          ASSERT_NEAR(y[i], want[i], 1e-6 * std::abs(want[i]) + 1e-35)  // exp(88): 1e-37, not 0
              << cpu::isa_name(isa) << " T " << T << " F " << F << " at " << i;
      }
    }
    for (int n : {1, 7, 16, 37, 232}) {
      std::vector<float> s = random_floats(n, rng);
      for (auto& v : s) v *= 20.0f;
      std::vector<double> want(n);
      double mx = -INFINITY, total = 0;
      for (float v : s) mx = std::max(mx, double(v));
      for (int j = 0; j < n; ++j) total += (want[j] = std::exp(double(s[j]) - mx));
      cpu::softmax(s.data(), n);
      for (int j = 0; j < n; ++j)
        ASSERT_NEAR(s[j], want[j] / total, 2e-6 * want[j] / total + 1e-12)  // float sums
            << cpu::isa_name(isa) << " n " << n;
    }
  }
}

// A [N][K] Q8_0 matrix of random weights, through to_matrix as the backend builds it; `bytes`:
// the GGUF blocks.
cpu::Matrix q8_matrix(int N, int K, std::mt19937& rng, std::vector<uint8_t>& bytes) {
  const std::vector<float> w = random_floats(size_t(N) * K, rng);
  bytes.resize(w.size() / kQ8Block * kQ8BlockBytes);
  for (size_t b = 0; b < w.size() / kQ8Block; ++b)
    quantize_q8_0_block(w.data() + b * kQ8Block, bytes.data() + b * kQ8BlockBytes);
  const TensorView t{"w", DType::Q8_0, {N, K}, bytes.data()};
  return cpu::to_matrix({&t});
}

// Q8_0 weights: the dequantized matrix's product to fp32 rounding (1e-5, as bf16's): the
// kernels sum a block's int8 x activation products and scale the sum, the reference multiplies
// the scaled weights. Every row count of the matrix-vector kernels (each has its own blocking).
TEST_F(CpuOps, Q8MatmulEqualsTheDequantizedProduct) {
  std::mt19937 rng(7);
  const int shapes[][2] = {{32, 5}, {96, 37}, {512, 70}};  // K, N
  for (auto [K, N] : shapes) {
    std::vector<uint8_t> bytes;
    const cpu::Matrix w = q8_matrix(N, K, rng, bytes);
    ASSERT_TRUE(w.is_q8());
    const std::vector<float> wf =
        TensorView{"w", DType::Q8_0, {N, K}, bytes.data()}.to_f32();  // the reference's weights
    expect_every_path_equals_loop(w, wf, {1, 2, 3, 4, 5, 6, 7, 8, 9, 40}, rng, "q8_0");
  }
}

TEST_F(CpuOps, Q8RowsSubMatricesAndStacksKeepTheWeights) {
  std::mt19937 rng(8);
  std::vector<uint8_t> a_bytes, b_bytes;
  const cpu::Matrix a = q8_matrix(6, 128, rng, a_bytes), b = q8_matrix(3, 128, rng, b_bytes);
  const std::vector<float> af = TensorView{"a", DType::Q8_0, {6, 128}, a_bytes.data()}.to_f32();
  const std::vector<float> bf = TensorView{"b", DType::Q8_0, {3, 128}, b_bytes.data()}.to_f32();
  std::vector<float> row(128);
  const cpu::Matrix ab = cpu::stack_rows({&a, &b});
  ASSERT_TRUE(ab.is_q8());
  ASSERT_EQ(ab.N, 9);
  for (int n = 0; n < 9; ++n) {
    ab.row(n, row.data());
    const float* want = n < 6 ? af.data() + n * 128 : bf.data() + (n - 6) * 128;
    for (int k = 0; k < 128; ++k) ASSERT_EQ(row[k], want[k]) << n << "," << k;
  }
  const cpu::Matrix part = cpu::sub_matrix(a, 2, 3, 64, 32);  // a shard's rows and columns
  ASSERT_TRUE(part.is_q8());
  for (int n = 0; n < 3; ++n) {
    part.row(n, row.data());
    for (int k = 0; k < 32; ++k) ASSERT_EQ(row[k], af[(2 + n) * 128 + 64 + k]);
  }
  try {
    cpu::sub_matrix(a, 0, 6, 16, 64);
    FAIL() << "a split inside a block was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("whole blocks of 32"), std::string::npos) << e.what();
  }
}

TEST_F(CpuOps, RefusesAnInstructionSetTheCpuLacksOrDoesNotKnow) {
  EXPECT_THROW(cpu::parse_isa("avx9000"), Error);
  EXPECT_EQ(cpu::parse_isa("avx2"), cpu::Isa::Avx2);
  if (cpu::detected_isa() != cpu::Isa::Avx512) {
    EXPECT_THROW(cpu::set_isa(cpu::Isa::Avx512), Error);
  }
}

TEST_F(CpuOps, WideningBufferTooSmallIsAnError) {
  cpu::Matrix w;
  w.N = 4;
  w.K = 4;
  w.bf16.assign(16, f32_to_bf16(0.5f));
  std::vector<float> x(4 * 16, 1.0f), y(16 * 4), wide(15);
  EXPECT_THROW(cpu::matmul(x.data(), 16, w, y.data(), wide), Error);
}

}  // namespace
