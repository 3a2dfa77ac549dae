// The CUDA backend against the CPU backend (the reference) on fresh random inputs. bf16 weights
// and GEMM inputs on the GPU: logits agree to about 1e-2 relative. Skipped without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <future>
#include <map>
#include <random>
#include <set>
#include <tuple>

#include "attention_rig.h"
#include "backend_cuda.h"
#include "backend_replicas.h"
#include "device_array.cuh"
#include "device_threads.h"
#include "model_fixture.h"
#include "numeric.h"
#include "ops_cpu.h"
#include "ops_cuda.cuh"
#include "sampling.h"
#include "sampling_cuda.cuh"

namespace {

using namespace mp;
using mp::testing::greedy_shortfalls;
using mp::testing::logits_in_chunks;
using mp::testing::ModelVariant;
using mp::testing::random_tokens;
using mp::testing::rel_err;
using mp::testing::TempDir;
using mp::testing::VariantModel;

class Cuda : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  }
};

std::vector<float> randn(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

// cuda::DeviceArray with the tests' shorthands: its pointer p, made from a host vector, and
// get(n), the first n elements back in a vector (each transfer synchronised).
template <class T>
struct Dev : cuda::DeviceArray<T> {
  T* const p;
  explicit Dev(size_t n) : cuda::DeviceArray<T>(n), p(cuda::DeviceArray<T>::get()) {}
  Dev(const std::vector<T>& h) : Dev(h.size()) {
    this->upload(h, nullptr);
    cuda::check(cudaStreamSynchronize(nullptr), "up");
  }
  std::vector<T> get(size_t n) {
    const T* h = this->download(n, nullptr);
    cuda::check(cudaStreamSynchronize(nullptr), "down");
    return std::vector<T>(h, h + n);
  }
};

// The rig's generator (tests/support/random_cuda.cu): normal, a function of (seed, index) alone.
TEST_F(Cuda, DeviceNormalsAreStandardNormalAndSeeded) {
  const size_t n = 1 << 22;
  Dev<float> a(n), b(n);
  mp::testing::fill_normal_device(a.p, n, 3, 2.0f);
  mp::testing::fill_normal_device(b.p, n, 3, 2.0f);
  const std::vector<float> x = a.get(n), again = b.get(n);
  EXPECT_EQ(x, again);
  double mean = 0, var = 0, within = 0;
  for (float v : x) mean += v;
  mean /= n;
  for (float v : x) {
    var += (v - mean) * (v - mean);
    within += std::fabs(v - mean) < 2.0;  // one deviation: 68.27 %
  }
  var /= n;
  EXPECT_NEAR(mean, 0.0, 0.005);  // sigma of the mean: 2 / 2048 ~ 0.001
  EXPECT_NEAR(var, 4.0, 0.02);    // sigma of the variance: 4 * sqrt(2 / n) ~ 0.003
  EXPECT_NEAR(within / n, 0.6827, 0.002);
  mp::testing::fill_normal_device(b.p, n, 4, 2.0f);
  const std::vector<float> other = b.get(n);
  size_t same = 0;
  for (size_t i = 0; i < n; ++i) same += other[i] == x[i];
  EXPECT_LT(same, 16u);
  double lag = 0;  // neighbours independent: lag-1 correlation ~ 0 (sigma 1 / 2048)
  for (size_t i = 1; i < n; ++i) lag += (x[i] - mean) * (x[i - 1] - mean);
  EXPECT_NEAR(lag / (n - 1) / var, 0.0, 0.003);
}

std::vector<float> from_bf16(const std::vector<__nv_bfloat16>& v) {
  std::vector<float> f;
  for (auto x : v) f.push_back(__bfloat162float(x));
  return f;
}

// Rows of a multiple of 4 floats (vector loads) and not; a row count not a multiple of a block's.
TEST_F(Cuda, RmsNormSplitRopeSwigluMatchTheCpuTwins) {
  const int T = 37, heads = 6, d = 64;
  for (const int n : {384, 390, 4096}) {
    const auto x = randn(size_t(T) * n, 1), w = randn(n, 2);
    std::vector<float> ref(x.size());
    cpu::rmsnorm(x.data(), w.data(), T, n, 1e-5f, ref.data());
    Dev<float> dx(x), dw(w);
    Dev<__nv_bfloat16> dy(x.size());
    cuda::rmsnorm(dx.p, dw.p, T, n, 1e-5f, dy.p, nullptr);
    EXPECT_LT(rel_err(from_bf16(dy.get(x.size())), ref), 1e-2) << n;
    EXPECT_EQ(dx.get(x.size()), x) << n;  // not written without the residual
    // Fused with the residual add: x + h is stored exactly (fp32) and normalised.
    const auto h = randn(x.size(), 5);
    std::vector<float> sum(x.size());
    for (size_t i = 0; i < x.size(); ++i) sum[i] = x[i] + h[i];
    cpu::rmsnorm(sum.data(), w.data(), T, n, 1e-5f, ref.data());
    Dev<float> dh(h);
    cuda::add_rmsnorm(dx.p, dh.p, dw.p, T, n, 1e-5f, dy.p, nullptr);
    EXPECT_EQ(dx.get(x.size()), sum) << n;
    EXPECT_LT(rel_err(from_bf16(dy.get(x.size())), ref), 1e-2) << n;
  }

  const int kv = 2, width = (heads + 2 * kv) * d;
  const auto qkv = randn(size_t(T) * width, 3);
  std::vector<int64_t> pos(T);
  for (int t = 0; t < T; ++t) pos[t] = 1000000 + 977 * t;  // large positions: angles in double
  Dev<float> dqkv(qkv), dq(size_t(T) * heads * d), dk(size_t(T) * kv * d), dv(size_t(T) * kv * d);
  Dev<int64_t> dpos(pos);
  Dev<float2> angles(size_t(T) * d / 2);
  // Plain RoPE, and a Llama-family model's linear scaling with another base.
  for (const auto& [theta, factor] : {std::pair{10000.0f, 1.0f}, std::pair{1e6f, 4.0f}}) {
    cuda::rope_angles(dpos.p, T, d, theta, factor, angles.p, nullptr);
    cuda::split_qkv_rope(dqkv.p, angles.p, T, heads, kv, d, dq.p, dk.p, dv.p, nullptr);
    std::vector<float> want_q, want_k, want_v;
    for (int t = 0; t < T; ++t) {
      const float* row = qkv.data() + size_t(t) * width;
      want_q.insert(want_q.end(), row, row + heads * d);
      want_k.insert(want_k.end(), row + heads * d, row + (heads + kv) * d);
      want_v.insert(want_v.end(), row + (heads + kv) * d, row + width);
      cpu::rope(want_q.data() + size_t(t) * heads * d, 1, heads, d, pos[t], theta, factor);
      cpu::rope(want_k.data() + size_t(t) * kv * d, 1, kv, d, pos[t], theta, factor);
    }
    EXPECT_LT(rel_err(dq.get(want_q.size()), want_q), 1e-5) << factor;
    EXPECT_LT(rel_err(dk.get(want_k.size()), want_k), 1e-5) << factor;
    EXPECT_EQ(dv.get(want_v.size()), want_v);
  }

  for (const int F : {500, 501}) {
    const auto gu = randn(size_t(T) * 2 * F, 4);
    std::vector<float> g(size_t(T) * F);
    cpu::swiglu(gu.data(), T, F, g.data());
    Dev<float> dgu(gu);
    Dev<__nv_bfloat16> ds(size_t(T) * F);
    cuda::swiglu(dgu.p, T, F, ds.p, nullptr);
    EXPECT_LT(rel_err(from_bf16(ds.get(size_t(T) * F)), g), 1e-2) << F;
  }
}

// Q8_0 weights: the decode GEMV (every row count it takes), the dequantization for cuBLAS and the
// embedding lookup against the CPU backend's Q8_0 products and rows. The GPU's inputs are bf16:
// the CPU gets the same bf16 values, so both form the same fp32 products (1e-5).
// T rows of K random bf16 GEMV inputs, on the GPU, and the CPU product of the same values with
// w (the expected output).
struct GemvRows {
  Dev<__nv_bfloat16> x;
  std::vector<float> want;
};
GemvRows gemv_rows(int T, int K, const cpu::Matrix& w, int N, uint32_t seed) {
  std::vector<__nv_bfloat16> xb;
  std::vector<float> x;
  for (float v : randn(size_t(T) * K, seed)) {
    xb.push_back(__float2bfloat16(v));
    x.push_back(__bfloat162float(xb.back()));
  }
  std::vector<float> want(size_t(T) * N);
  cpu::matmul(x.data(), T, w, want.data(), {});
  return {Dev<__nv_bfloat16>(xb), std::move(want)};
}

// The bf16 GEMV (decode's products) against the CPU's product of the same bf16 values, and
// against cuBLAS's GEMM: every row count it takes, K not a whole number of a warp's 512 weights,
// N below and above kWideGemvOutputs (4 outputs a warp; N not a multiple of 4).
void check_bf16_gemv(int N) {
  SCOPED_TRACE("N " + std::to_string(N));
  const int K = 400;
  std::vector<__nv_bfloat16> wb;
  for (float v : randn(size_t(N) * K, 41, 0.05f)) wb.push_back(__float2bfloat16(v));
  const TensorView t{"w", DType::BF16, {N, K}, wb.data()};
  const cpu::Matrix w = cpu::to_matrix({&t});
  Dev<__nv_bfloat16> dw(wb);
  cublasHandle_t blas;
  ASSERT_EQ(cublasCreate(&blas), CUBLAS_STATUS_SUCCESS);
  for (int T = 1; T <= cuda::kGemvRows; ++T) {
    const auto [dx, want] = gemv_rows(T, K, w, N, 50 + T);
    Dev<float> dy(want.size()), dg(want.size());
    cuda::gemv_bf16(dx.p, T, K, dw.p, N, dy.p, nullptr);
    cuda::gemm(blas, dx.p, T, K, dw.p, N, dg.p);
    const auto got = dy.get(want.size());
    EXPECT_LT(rel_err(got, want), 1e-5) << "T " << T;
    EXPECT_LT(rel_err(got, dg.get(want.size())), 1e-5) << "T " << T;
  }
  cublasDestroy(blas);
  EXPECT_THROW(cuda::gemv_bf16(nullptr, 1, K + 8, dw.p, N, nullptr, nullptr), Error);
  EXPECT_THROW(cuda::gemv_bf16(nullptr, cuda::kGemvRows + 1, K, dw.p, N, nullptr, nullptr), Error);
}
TEST_F(Cuda, Bf16GemvMatchesTheCpuAndCublas) {
  for (int N : {389, cuda::kWideGemvOutputs + 5}) check_bf16_gemv(N);
}

// N below and above kWideGemvOutputs; K whole blocks, not a whole number of a warp's 512 weights.
void check_q8_gemv_dequantize_and_embed(int N) {
  SCOPED_TRACE("N " + std::to_string(N));
  const int K = 800;
  const std::vector<float> wf = randn(size_t(N) * K, 21, 0.05f);
  std::vector<uint8_t> bytes(size_t(N) * K / kQ8Block * kQ8BlockBytes);
  for (size_t b = 0; b < wf.size() / kQ8Block; ++b)
    quantize_q8_0_block(wf.data() + b * kQ8Block, bytes.data() + b * kQ8BlockBytes);
  const TensorView t{"w", DType::Q8_0, {N, K}, bytes.data()};
  const cpu::Matrix w = cpu::to_matrix({&t});
  ASSERT_TRUE(w.is_q8());
  std::vector<__half> scale;
  for (float d : w.q8_scale) scale.push_back(__float2half(d));  // fp16 values: exact
  Dev<int8_t> dq(w.q8);
  Dev<__half> ds(scale);
  const cuda::Q8Weights dw{dq.p, ds.p};
  for (int T = 1; T <= cuda::kGemvRows; ++T) {
    const auto [dx, want] = gemv_rows(T, K, w, N, 30 + T);
    Dev<float> dy(want.size());
    cuda::gemv_q8(dx.p, T, K, dw, N, dy.p, nullptr);
    EXPECT_LT(rel_err(dy.get(want.size()), want), 1e-5) << "T " << T;
  }
  EXPECT_THROW(cuda::gemv_q8(nullptr, cuda::kGemvRows + 1, K, dw, N, nullptr, nullptr), Error);

  Dev<__nv_bfloat16> dwide(wf.size());
  cuda::dequantize_q8(dw, int64_t(wf.size()), dwide.p, nullptr);
  const auto wide = from_bf16(dwide.get(wf.size()));
  std::vector<float> row(K);
  for (int n = 0; n < N; ++n) {
    w.row(n, row.data());
    for (int k = 0; k < K; ++k)
      ASSERT_EQ(wide[size_t(n) * K + k], bf16_to_f32(f32_to_bf16(row[k]))) << n << "," << k;
  }

  const std::vector<int> tokens = {5, 0, 388, 5, 17};
  Dev<int> dtok(tokens);
  Dev<float> dx(tokens.size() * K);
  cuda::embed_q8(dw, dtok.p, int(tokens.size()), K, dx.p, nullptr);
  const auto x = dx.get(tokens.size() * K);
  for (size_t i = 0; i < tokens.size(); ++i) {
    w.row(tokens[i], row.data());
    for (int k = 0; k < K; ++k) ASSERT_EQ(x[i * K + k], row[k]) << i << "," << k;
  }
}
TEST_F(Cuda, Q8GemvDequantizeAndEmbedMatchTheCpuTwins) {
  for (int N : {389, cuda::kWideGemvOutputs + 5}) check_q8_gemv_dequantize_and_embed(N);
}

// A decode step's GEMV with add_rmsnorm in its prologue and/or SwiGLU in its epilogue against
// the kernels they replace: add_rmsnorm, the GEMV, swiglu. Both round the same normalised values
// to bf16; their RMS sums run in different orders, so a last-bit difference can move one input's
// rounding: 1e-3 relative for fp32 outputs, bf16's 1e-2 for SwiGLU's. The residual sum is exact,
// and written by the fused kernel to its own buffer only.
void check_gemv_with_norm_and_swiglu(int N) {
  SCOPED_TRACE("N " + std::to_string(N));
  const int K = 384;
  const float eps = 1e-5f;
  std::vector<__nv_bfloat16> wb;
  for (float v : randn(size_t(N) * K, 61, 0.05f)) wb.push_back(__float2bfloat16(v));
  Dev<__nv_bfloat16> dw(wb);
  const auto norm = randn(K, 62, 0.5f);
  Dev<float> dnorm(norm);
  for (int T = 1; T <= cuda::kGemvRows; ++T)
    for (int input : {0, 1, 2})  // bf16 rows, normalised x, normalised x + add
      for (bool swiglu : {false, true}) {
        if ((input > 0 && !cuda::gemv_fits(T, K, true)) || (input == 0 && !swiglu)) continue;
        const auto x = randn(size_t(T) * K, 63 + T), add = randn(size_t(T) * K, 64 + T);
        Dev<float> dx(x), dadd(add), dsum(size_t(T) * K), dref_x(x), dy(size_t(T) * N);
        Dev<__nv_bfloat16> dhb(size_t(T) * K), dout(size_t(T) * N / 2), dref(size_t(T) * N / 2);
        const float* a = input == 2 ? dadd.p : nullptr;
        // The reference: the separate kernels.
        Dev<float> dref_y(size_t(T) * N);
        if (a)
          cuda::add_rmsnorm(dref_x.p, a, dnorm.p, T, K, eps, dhb.p, nullptr);
        else
          cuda::rmsnorm(dref_x.p, dnorm.p, T, K, eps, dhb.p, nullptr);
        cuda::gemv_bf16(dhb.p, T, K, dw.p, N, dref_y.p, nullptr);
        const cuda::GemvInput in = input == 0 ? cuda::GemvInput(dhb.p)
                                              : cuda::GemvInput(dx.p, a, dnorm.p, eps, dsum.p);
        const cuda::GemvOutput out =
            swiglu ? cuda::GemvOutput::silu_gated(dout.p) : cuda::GemvOutput(dy.p);
        cuda::gemv_bf16(in, T, K, dw.p, N, out, nullptr);
        const std::string at = "T " + std::to_string(T) + " input " + std::to_string(input) +
                               (swiglu ? " swiglu" : "");
        if (swiglu) {
          cuda::swiglu(dref_y.p, T, N / 2, dref.p, nullptr);
          EXPECT_LT(rel_err(from_bf16(dout.get(size_t(T) * N / 2)),
                            from_bf16(dref.get(size_t(T) * N / 2))),
                    1e-2)
              << at;
        } else {
          EXPECT_LT(rel_err(dy.get(size_t(T) * N), dref_y.get(size_t(T) * N)), 1e-3) << at;
        }
        EXPECT_EQ(dx.get(x.size()), x) << at;  // the input residual is left as it was
        if (a) {
          EXPECT_EQ(dsum.get(x.size()), dref_x.get(x.size())) << at;
        }
      }
  // Rows that do not fit in shared memory, or too many of them, are refused, not truncated.
  const int T = cuda::kNormedGemvRows, wide = int(48 * 1024 / cuda::kNormedGemvBytes) / T + 16;
  EXPECT_FALSE(cuda::gemv_fits(T, wide, true));
  EXPECT_TRUE(cuda::gemv_fits(T, wide, false));
  EXPECT_FALSE(cuda::gemv_fits(T + 1, K, true));
  EXPECT_THROW(cuda::gemv_bf16({dnorm.p, nullptr, dnorm.p, eps, nullptr}, T, wide, dw.p, N,
                               cuda::GemvOutput(nullptr), nullptr),
               Error);
}

// N even (gate and up halves); the wider N a head's (kWideGemvOutputs or more).
TEST_F(Cuda, GemvWithNormAndSwigluIsTheKernelsItReplaces) {
  for (int N : {2 * 389, cuda::kWideGemvOutputs + 6}) check_gemv_with_norm_and_swiglu(N);
}

// A GEMV's blocks read all of its input while others store outputs: an output over the input
// (the backend's FFN once wrote its gated rows over the normed rows it read, a race that gave
// decode steps of 2-8 rows wrong logits now and then) is refused; one beside it is not.
TEST_F(Cuda, GemvRefusesAnOutputOverItsInput) {
  const int T = 2, K = 32, N = 64;
  const size_t outs = size_t(T) * N / 2;
  std::vector<__nv_bfloat16> wb, xb;
  for (float v : randn(size_t(N) * K, 80, 0.05f)) wb.push_back(__float2bfloat16(v));
  for (float v : randn(size_t(T) * K, 81)) xb.push_back(__float2bfloat16(v));
  Dev<__nv_bfloat16> w(wb), x(xb), apart(outs), buf(outs + xb.size());
  using cuda::GemvOutput;
  EXPECT_THROW(cuda::gemv_bf16(buf.p, T, K, w.p, N, GemvOutput::silu_gated(buf.p), nullptr), Error);
  EXPECT_THROW(cuda::gemv_bf16(buf.p + K, T, K, w.p, N, GemvOutput::silu_gated(buf.p), nullptr),
               Error);
  // The input right after the output: allowed, and the bits of separate buffers.
  cuda::check(cudaMemcpy(buf.p + outs, x.p, xb.size() * 2, cudaMemcpyDeviceToDevice), "copy");
  cuda::gemv_bf16(buf.p + outs, T, K, w.p, N, GemvOutput::silu_gated(buf.p), nullptr);
  cuda::gemv_bf16(x.p, T, K, w.p, N, GemvOutput::silu_gated(apart.p), nullptr);
  const auto got = buf.get(outs), want = apart.get(outs);
  EXPECT_EQ(std::memcmp(got.data(), want.data(), outs * 2), 0);
}

// The q/k/v GEMV that splits and rotates its own output against the GEMV then split_qkv_rope:
// GQA, head dims 16 and 64, positions past 1M, linear RoPE scaling; the same sums (1e-6).
TEST_F(Cuda, GemvWithRopeIsTheGemvThenSplitQkvRope) {
  const int K = 160;
  for (int d : {16, 64})
    for (int T = 1; T <= cuda::kGemvRows; ++T) {
      const int nh = 4, nkv = 2, N = (nh + 2 * nkv) * d;
      std::vector<__nv_bfloat16> wb, xb;
      for (float v : randn(size_t(N) * K, 70 + d, 0.05f)) wb.push_back(__float2bfloat16(v));
      for (float v : randn(size_t(T) * K, 71 + T)) xb.push_back(__float2bfloat16(v));
      std::vector<int64_t> pos;
      for (int t = 0; t < T; ++t) pos.push_back(int64_t(t) * 524309 + 17 * t + 3);
      Dev<__nv_bfloat16> dw(wb), dx(xb);
      Dev<int64_t> dpos(pos);
      Dev<float> dqkv(size_t(T) * N), q(size_t(T) * nh * d), k(size_t(T) * nkv * d),
          v(size_t(T) * nkv * d), rq(size_t(T) * nh * d), rk(size_t(T) * nkv * d),
          rv(size_t(T) * nkv * d);
      const float theta = 10000.0f, factor = d == 64 ? 4.0f : 1.0f;
      cuda::gemv_bf16(dx.p, T, K, dw.p, N,
                      cuda::GemvOutput::split_rope({q.p, k.p, v.p, dpos.p, nh, nkv, d, theta, factor}),
                      nullptr);
      cuda::gemv_bf16(dx.p, T, K, dw.p, N, dqkv.p, nullptr);
      Dev<float2> angles(size_t(T) * d / 2);
      cuda::rope_angles(dpos.p, T, d, theta, factor, angles.p, nullptr);
      cuda::split_qkv_rope(dqkv.p, angles.p, T, nh, nkv, d, rq.p, rk.p, rv.p, nullptr);
      const std::string at = "d " + std::to_string(d) + " T " + std::to_string(T);
      EXPECT_LT(rel_err(q.get(size_t(T) * nh * d), rq.get(size_t(T) * nh * d)), 1e-6) << at;
      EXPECT_LT(rel_err(k.get(size_t(T) * nkv * d), rk.get(size_t(T) * nkv * d)), 1e-6) << at;
      EXPECT_EQ(v.get(size_t(T) * nkv * d), rv.get(size_t(T) * nkv * d)) << at;
    }
  Dev<float> y(64);
  EXPECT_THROW(cuda::gemv_bf16(static_cast<const __nv_bfloat16*>(nullptr), 1, K, nullptr, 100,
                               cuda::GemvOutput::split_rope({y.p, y.p, y.p, nullptr, 4, 2, 16,
                                                             10000.0f, 1.0f}),
                               nullptr),
               Error);  // N is not (4 + 2 x 2) x 16
}

// The GPU tests' model variants: head_dim 16 unless named (64: prefill tiles run on tensor
// cores), hidden 64, bf16 weights.
std::vector<ModelVariant> on_gpu(std::vector<ModelVariant> variants) {
  for (auto& v : variants) {
    if (v.head_dim == 0) v.head_dim = 16;
    v.hidden = 64;
    v.dtype = DType::BF16;
  }
  return variants;
}

class CudaModel : public Cuda, public ::testing::WithParamInterface<ModelVariant> {};

TEST_P(CudaModel, LogitsMatchCpuInEveryChunkingPastTrainedLength) {
  const VariantModel vm(GetParam(), 7);
  const Config& c = vm.config;
  auto cpu_b = make_backend(vm.model, {.kind = "cpu", .n_slots = 1, .n_threads = 2});
  auto gpu = make_backend(vm.model, {.kind = "cuda", .n_slots = 2, .max_context = 1024});
  ASSERT_EQ(gpu->name(), "cuda");
  const auto tokens = random_tokens(3 * 64 + 11, c.vocab_size, 3);
  const auto ref = logits_in_chunks(*cpu_b, tokens, 1000);
  for (int chunk : {1000, 1, 3, 8, 56})
    EXPECT_LT(rel_err(logits_in_chunks(*gpu, tokens, chunk), ref), 2e-2) << chunk;
  // Decode: the GPU against itself, one prefill vs token by token. Token by token reads each
  // earlier key from the cache's bf16 fine window where the one prefill reads the chunk's fp32
  // rows (3.1e-3 to 3.8e-3 at head_dim 16, session 28; 2e-3 while the window was fp32); with
  // head_dim 64 the prefill's attention products are bf16 on tensor cores too, with m 16 its
  // summaries'.
  const auto g1 = logits_in_chunks(*gpu, tokens, 1000), g2 = logits_in_chunks(*gpu, tokens, 1);
  EXPECT_LT(rel_err(g2, g1), c.head_dim == 64 || c.fma_block_size == 16 ? 2e-2 : 1e-2);
}

INSTANTIATE_TEST_SUITE_P(
    Models, CudaModel,
    ::testing::ValuesIn(on_gpu({
        {.name = "groupedconv"},
        {.name = "conv", .ds = Downsampling::Conv, .kv_heads = 1},
        {.name = "avgpool", .ds = Downsampling::AvgPool, .kv_heads = 4},
        {.name = "exact", .fma = false},
        {.name = "groupedconv_d64", .head_dim = 64},
        {.name = "exact_d64", .fma = false, .head_dim = 64},
        {.name = "avgpool_rope_linear", .ds = Downsampling::AvgPool, .rope_linear_factor = 4.0f},
        {.name = "exact_rope_linear",
         .fma = false,
         .kv_heads = 1,
         .head_dim = 64,
         .rope_linear_factor = 2.0f},
        {.name = "exact_gqa3_d128", .fma = false, .kv_heads = 2, .heads = 6, .head_dim = 128},
        {.name = "groupedconv_rotary", .rotary = true},
        {.name = "groupedconv_rotary_d64_kv1", .kv_heads = 1, .rotary = true, .head_dim = 64},
        {.name = "groupedconv_ranks_1_4", .ranks = {1, 4}},
        {.name = "avgpool_ranks_4_2_d64",
         .ds = Downsampling::AvgPool,
         .ranks = {4, 2},
         .head_dim = 64},
        {.name = "groupedconv_rotary_ranks_3_2_kv1",
         .kv_heads = 1,
         .rotary = true,
         .ranks = {3, 2}},
        // m 16: summaries in one pass (3 levels at n 256; 203 tokens cross n/2)
        {.name = "one_pass_groupedconv", .block = 16, .n = 256},
        {.name = "one_pass_avgpool_d64",
         .ds = Downsampling::AvgPool,
         .kv_heads = 4,
         .head_dim = 64,
         .block = 16,
         .n = 256},
        {.name = "one_pass_rotary_ranks_kv1",
         .kv_heads = 1,
         .rotary = true,
         .ranks = {2, 1, 2},
         .block = 16,
         .n = 256},
        {.name = "one_pass_groupedconv_d64_past_n", .head_dim = 64, .block = 16, .n = 64},
    })),
    [](const auto& info) { return std::string(info.param.name); });

// The whole-sequence shift of docs/MODEL.md on the GPU (tests/test_model.cpp's
// ModelSequenceShift): the sequence after k = n/2, 3n/2, 64 n other tokens, in prefill chunks and
// token by token, gives the same logits from n_layers n/2 on with rotary or avgpool summaries (the
// GPU against itself, to bf16 rounding: the cache's fine window is bf16, and differently rotated
// keys round differently; tests/test_model.cpp holds the CPU to fp32), not with per-channel
// groupedconv ones.
class CudaSequenceShift : public Cuda, public ::testing::WithParamInterface<ModelVariant> {};

TEST_P(CudaSequenceShift, LogitsBeyondTheLayersReachDoNotChange) {
  const ModelVariant& v = GetParam();
  const VariantModel vm(v, 7);
  const Config& c = vm.config;
  auto gpu = make_backend(vm.model, {.kind = "cuda", .n_slots = 1, .max_context = 1024});
  ASSERT_EQ(gpu->name(), "cuda");
  const int half = static_cast<int>(c.n_ctx_train) / 2;
  const double worst = mp::testing::largest_change_under_shifts(
      *gpu, random_tokens(6 * half + 5, c.vocab_size, 3), c.n_layers * half, c.vocab_size,
      {half, 3 * half, 128 * half}, {56, 1});
  if (v.rotary || v.ds == Downsampling::AvgPool) {
    EXPECT_LT(worst, 2e-2);
  } else {
    EXPECT_GT(worst, 1e-1);
  }
  std::printf("%s: largest relative change of the logits over the shifts: %.2e\n", v.name, worst);
}

INSTANTIATE_TEST_SUITE_P(
    Models, CudaSequenceShift,
    ::testing::ValuesIn(on_gpu({
        {.name = "groupedconv_rotary", .rotary = true},
        {.name = "groupedconv_rotary_d64_kv1", .kv_heads = 1, .rotary = true, .head_dim = 64},
        {.name = "avgpool", .ds = Downsampling::AvgPool},
        {.name = "groupedconv_per_channel"},
    })),
    [](const auto& info) { return std::string(info.param.name); });

TEST_F(Cuda, BatchOfSequencesMatchesSeparateRunsAndStatesMoveBetweenBackends) {
  const VariantModel vm({.dtype = DType::BF16}, 9);
  const Config& c = vm.config;
  auto gpu = make_backend(vm.model, {.kind = "cuda", .n_slots = 4});
  auto cpu_b = make_backend(vm.model, {.kind = "cpu", .n_slots = 2, .n_threads = 2});
  const auto a = random_tokens(150, c.vocab_size, 1), b = random_tokens(20, c.vocab_size, 2);
  const auto ra = logits_in_chunks(*gpu, a, 150), rb = logits_in_chunks(*gpu, b, 20);
  const int s1 = gpu->alloc_slot(), s2 = gpu->alloc_slot();
  SeqChunk cs[2] = {{s1, a, true}, {s2, b, true}};
  const auto both = gpu->forward(cs);
  std::vector<float> want = ra;
  want.insert(want.end(), rb.begin(), rb.end());
  EXPECT_LT(rel_err(both, want), 1e-5);
  // A CPU state continues on the GPU as on the CPU.
  const int cs1 = cpu_b->alloc_slot();
  SeqChunk pre{cs1, std::span<const int>(a).first(100), false};
  cpu_b->forward({&pre, 1});
  const auto state = cpu_b->save_slot(cs1);
  SeqChunk rest{cs1, std::span<const int>(a).subspan(100), true};
  const auto cpu_rest = cpu_b->forward({&rest, 1});
  const int g = gpu->alloc_slot();
  gpu->load_slot(g, state);
  SeqChunk grest{g, std::span<const int>(a).subspan(100), true};
  EXPECT_LT(rel_err(gpu->forward({&grest, 1}), cpu_rest), 2e-2);
  // And back: the GPU state, loaded on the CPU, continues like the GPU.
  const auto gstate = gpu->save_slot(g);
  const int cs2 = cpu_b->alloc_slot();
  cpu_b->load_slot(cs2, gstate);
  EXPECT_EQ(cpu_b->slot_pos(cs2), 150);
  // A GPU state (its fine window widened from bf16) loads back into the GPU bit for bit.
  const int g2 = gpu->alloc_slot();
  gpu->load_slot(g2, gstate);
  EXPECT_EQ(gpu->save_slot(g2), gstate);
  // The device keeps the fine window in bf16: its state is 2 bytes a fine value, 4 a summary's.
  const size_t kvd = size_t(c.n_kv_heads) * c.head_dim, pd = size_t(c.fma_rank) * c.head_dim;
  EXPECT_EQ(gpu->slot_bytes(g2), c.n_layers * 2 *
                                     (2 * c.fma_block_size * kvd * 2 +
                                      c.n_levels() * 4 * c.n_kv_heads * pd * 4));
}

// The logits of 40 decode steps of sequences at different positions, batched (replayed as a CUDA
// graph after the first step), after prompts of lens[i] tokens (random_tokens(.., seed + i)):
// prefilled together, or (token_by_token) fed one token a step, each sequence alone.
std::vector<float> batched_decode(Backend& b, const std::vector<int>& lens, uint64_t seed,
                                  bool token_by_token = false) {
  const int n = static_cast<int>(lens.size()), V = b.config().vocab_size;
  std::vector<std::vector<int>> prompts;
  for (int i = 0; i < n; ++i) prompts.push_back(random_tokens(lens[i], V, seed + i));
  std::vector<SeqChunk> pre;
  for (int i = 0; i < n; ++i) pre.push_back({b.alloc_slot(), prompts[i], false});
  if (!token_by_token) {
    b.forward(pre);
  } else {
    for (const SeqChunk& p : pre)
      for (size_t t = 0; t < p.tokens.size(); ++t) {
        const SeqChunk one{p.slot, p.tokens.subspan(t, 1), false};
        b.forward({&one, 1});
      }
  }
  std::vector<int> next(n);
  for (int i = 0; i < n; ++i) next[i] = 7 + i;
  std::vector<float> out;
  for (int step = 0; step < 40; ++step) {  // crosses block and group boundaries
    std::vector<SeqChunk> batch;
    for (int i = 0; i < n; ++i)
      batch.push_back({pre[i].slot, std::span<const int>(&next[i], 1), false});
    const auto l = b.forward(batch);
    out.insert(out.end(), l.begin(), l.end());
    for (int i = 0; i < n; ++i) next[i] = 3 + (step * 7 + i * 13) % (V - 3);
  }
  return out;
}

// Batched decode steps against the CPU backend doing the same steps.
TEST_F(Cuda, BatchedDecodeStepsMatchCpu) {
  const VariantModel vm({.dtype = DType::BF16}, 11);
  auto gpu = make_backend(vm.model, {.kind = "cuda", .n_slots = 3});
  auto cpu_b = make_backend(vm.model, {.kind = "cpu", .n_slots = 3, .n_threads = 2});
  const std::vector<int> lens = {5, 70, 130};
  EXPECT_LT(rel_err(batched_decode(*gpu, lens, 20), batched_decode(*cpu_b, lens, 20)), 2e-2);
}

// Random mixed steps (tests/support: prompt chunks of 1-100 tokens beside single tokens and decode
// steps of changing batch sizes, slots freed and reused) against the CPU backend, row by row, each
// schedule three times on the GPU (a step that depends on timing or on memory a kernel did not
// write shows as a run that differs).
TEST_F(Cuda, MixedStepsMatchCpuRowByRow) {
  const VariantModel vm({.dtype = DType::BF16}, 14);
  const size_t V = vm.config.vocab_size;
  auto gpu = make_backend(vm.model, {.kind = "cuda", .n_slots = 6});
  auto cpu_b = make_backend(vm.model, {.kind = "cpu", .n_slots = 6, .n_threads = 2});
  for (uint64_t seed : {1, 2, 3, 4}) {
    const auto want = mp::testing::mixed_schedule_logits(*cpu_b, seed, 6, 60);
    for (int run = 0; run < 3; ++run) {
      const auto got = mp::testing::mixed_schedule_logits(*gpu, seed, 6, 60);
      ASSERT_EQ(got.size(), want.size());
      for (size_t r = 0; r < want.size() / V; ++r) {
        const std::vector<float> g(got.begin() + r * V, got.begin() + (r + 1) * V),
            w(want.begin() + r * V, want.begin() + (r + 1) * V);
        ASSERT_LT(rel_err(g, w), 2e-2) << "seed " << seed << " run " << run << " row " << r;
      }
    }
  }
}

// Exact attention's decode steps (keys split over blocks) for a batch of sequences at contexts
// from 2 to 1,040 tokens (a bucket of 16 rows: 7 padding items), the default model's GQA (6
// heads on 2 KV heads) at head_dim 64, against the CPU backend doing the same steps.
TEST_F(Cuda, ExactBatchedDecodeStepsMatchCpu) {
  const VariantModel vm(
      {.fma = false, .kv_heads = 2, .heads = 6, .head_dim = 64, .hidden = 64, .dtype = DType::BF16},
      13);
  auto gpu = make_backend(vm.model, {.kind = "cuda", .n_slots = 9, .max_context = 1100});
  auto cpu_b = make_backend(vm.model, {.kind = "cpu", .n_slots = 9, .n_threads = 2});
  const std::vector<int> lens = {1, 7, 64, 1000, 2, 33, 500, 129, 9};
  EXPECT_LT(rel_err(batched_decode(*gpu, lens, 40), batched_decode(*cpu_b, lens, 40)), 2e-2);
}

// Decode steps with the cache update in one kernel after the attention (append_tokens, the
// default) against the same model on the per-level summary kernels and the commit (the
// reference) and against the CPU, for every variant: sequences fed one token a step from
// position 0 (each a decode step), then batched at different positions so that rows complete
// groups at different steps, across many group boundaries of every level and (n 64) past the
// trained length. The same sums as the reference: logits to 1e-6 (equal bits expected).
TEST_P(CudaModel, DecodeStepsMatchThePerLevelKernelsAndCpu) {
  const VariantModel vm(GetParam(), 7);
  auto fused = make_cuda_backend(vm.model, 3, 1024, 0);
  auto ref = make_cuda_backend(vm.model, 3, 1024, 0, cuda::SummaryKernels::PerLevel);
  auto cpu_b = make_backend(vm.model, {.kind = "cpu", .n_slots = 3, .n_threads = 2});
  const std::vector<int> lens = {5, 70, 133};
  const auto got = batched_decode(*fused, lens, 30, true);
  EXPECT_LT(rel_err(got, batched_decode(*ref, lens, 30, true)), 1e-6);
  EXPECT_LT(rel_err(got, batched_decode(*cpu_b, lens, 30, true)), 2e-2);
}

// Decode steps whose kernels overlap along their chain (kernels/overlap.cuh, the default)
// against the same steps launched one after another: the same kernels and sums, so the same
// logits to the bit, for every variant at 1 row (the norms fused into the GEMVs), 3 and 8 (the
// norms apart), sequences at different positions crossing group boundaries.
std::vector<float> decode_with(const std::shared_ptr<const Model>& model, int rows,
                               cuda::Launches launches) {
  auto b = make_cuda_backend(model, rows, 1024, 0, cuda::SummaryKernels::Auto,
                             cuda::Q8Products::Auto, launches);
  std::vector<int> lens;
  for (int i = 0; i < rows; ++i) lens.push_back(3 + 37 * i % int(model->config().n_ctx_train));
  return batched_decode(*b, lens, 40);
}

void expect_overlapped_launches_are_the_serial_ones(const std::shared_ptr<const Model>& model) {
  for (int rows : {1, 3, 8}) {
    const auto serial = decode_with(model, rows, cuda::Launches::Serial);
    const auto overlapped = decode_with(model, rows, cuda::Launches::Overlapped);
    ASSERT_EQ(serial.size(), overlapped.size());
    EXPECT_EQ(std::memcmp(serial.data(), overlapped.data(), serial.size() * sizeof(float)), 0)
        << rows << " rows: relative error " << rel_err(overlapped, serial);
  }
}

TEST_P(CudaModel, OverlappedDecodeLaunchesAreTheSerialOnes) {
  const VariantModel vm(GetParam(), 17);
  expect_overlapped_launches_are_the_serial_ones(vm.model);
}

// A Q8_0 model (matrices, embedding and summary convolutions quantized, ffn_down's rows of 40
// bf16) on the GPU against the CPU backend: prefill (dequantized to bf16 for cuBLAS: once at load,
// or for each product), decode of one sequence (the GEMV kernel) and of 12 (a bucket of 16 rows:
// cuBLAS again).
TEST_F(Cuda, Q8ModelMatchesCpuInPrefillAndDecode) {
  Config c = mp::testing::small_config();
  c.hidden_size = 64;
  c.head_dim = 16;
  c.intermediate_size = 40;
  c.fma_block_size = 32;
  c.n_ctx_train = 256;
  TempDir dir;
  auto model = mp::testing::random_model(dir, c, DType::Q8_0, 23);
  ASSERT_EQ(model->tensor(tensor_names::layer(0, "attn_q"), {64, 64}).dtype, DType::Q8_0);
  ASSERT_EQ(model->tensor(tensor_names::fma_down(0, 'k', 1, false), {32, 1, 32}).dtype,
            DType::Q8_0);
  auto cpu_b = make_backend(model, {.kind = "cpu", .n_slots = 12, .n_threads = 2});
  const auto tokens = random_tokens(600, c.vocab_size, 4);  // past n = 256
  const auto ref = logits_in_chunks(*cpu_b, tokens, 1000);
  std::vector<int> lens;
  for (int i = 0; i < 12; ++i) lens.push_back(10 + 23 * i);
  const auto ref_decode = batched_decode(*cpu_b, lens, 40);
  std::vector<std::vector<float>> prefill;
  for (auto q8 : {cuda::Q8Products::Auto, cuda::Q8Products::EachProduct}) {
    SCOPED_TRACE(q8 == cuda::Q8Products::Auto ? "dequantized at load" : "for each product");
    auto gpu = make_cuda_backend(model, 12, c.n_ctx_train, 0, cuda::SummaryKernels::Auto, q8);
    for (int chunk : {1000, 1, 8, 56}) {
      auto logits = logits_in_chunks(*gpu, tokens, chunk);
      EXPECT_LT(rel_err(logits, ref), 2e-2) << chunk;
      if (chunk == 1000) prefill.push_back(std::move(logits));
    }
    EXPECT_LT(rel_err(batched_decode(*gpu, lens, 40), ref_decode), 2e-2);
  }
  EXPECT_LT(rel_err(prefill[0], prefill[1]), 1e-6);  // the same dequantization, once or each time
  expect_overlapped_launches_are_the_serial_ones(model);  // the Q8_0 GEMVs
}

// The host's choice for draw u, and whether u lies so close to a boundary of the cumulative
// probabilities that float rounding may move the choice to a neighbour.
std::pair<int, bool> host_pick(const std::vector<std::pair<int, float>>& cands, double u) {
  double cum = 0;
  bool near = false;
  for (const auto& [id, pr] : cands) {
    cum += pr;
    near |= std::abs(cum - u) < 1e-5;
  }
  return {pick_candidate(cands, u), near};
}

// Rows of random logits (rounded, so that ties occur) sampled on the GPU with many settings,
// against the host sampler on the same logits and draws: top-k 1, 40 and 256 are spread over
// blocks (sample_top_k_spread_kernel), 9000 and none take one block a row.
void check_sampling_kernel(int V) {
  struct Case {
    SamplingParams p;
    bool penalties;
  };
  std::vector<Case> cases;
  for (float temp : {0.0f, 0.7f, 1.3f})
    for (int top_k : {0, 1, 40, 256, 9000})
      for (float top_p : {1.0f, 0.9f, 0.5f})
        for (float min_p : {0.0f, 0.05f}) {
          SamplingParams p;
          p.temperature = temp, p.top_k = top_k, p.top_p = top_p, p.min_p = min_p;
          cases.push_back({p, false});
          p.repetition_penalty = 1.3f, p.presence_penalty = 0.4f, p.frequency_penalty = 0.2f;
          cases.push_back({p, true});
        }
  const int R = static_cast<int>(cases.size());
  std::vector<float> logits = randn(size_t(R) * V, 7, 2.5f);
  for (auto& x : logits) x = std::round(x * 10) / 10;
  std::mt19937 rng(5);
  std::vector<int> history;
  for (int i = 0; i < 200; ++i) history.push_back(int(rng() % 60));  // the likeliest ids repeat
  std::vector<cuda::SampleRow> rows;
  std::vector<int2> pens;
  std::uniform_real_distribution<double> unif(0, 1);
  for (int r = 0; r < R; ++r) {
    const auto counts = cases[r].penalties ? penalty_counts(cases[r].p, history, V)
                                           : std::vector<std::pair<int, int>>{};
    rows.push_back({r, cases[r].p, int(pens.size()), int(counts.size()), unif(rng)});
    for (auto [id, n] : counts) pens.push_back({id, n});
    // Make the repeated ids likely, so that the penalties decide.
    for (int id = 0; id < 60; ++id) logits[size_t(r) * V + id] += 4;
  }
  pens.push_back({0, 0});  // never empty
  Dev<float> d_logits(logits);
  Dev<cuda::SampleRow> d_rows(rows);
  Dev<int2> d_pens(pens);
  Dev<int> d_tok(R);
  Dev<float> d_lp(R);
  cuda::Sampler sampler;
  sampler.sample(d_logits.p, V, rows, d_rows.p, d_pens.p, d_tok.p, d_lp.p, nullptr);
  cuda::check(cudaDeviceSynchronize(), "sample");
  const auto tok = d_tok.get(R);
  const auto lp = d_lp.get(R);
  int exact = 0, near = 0, to_host = 0;
  for (int r = 0; r < R; ++r) {
    const std::span<const float> row(logits.data() + size_t(r) * V, V);
    const auto counts = cases[r].penalties ? penalty_counts(cases[r].p, history, V)
                                           : std::vector<std::pair<int, int>>{};
    const auto cands = sample_candidates(cases[r].p, row, counts);
    if (tok[r] < 0) {  // only where the list can exceed what the GPU keeps
      const int k = cases[r].p.top_k;
      EXPECT_GT(V, cuda::kMaxSampleCandidates) << "row " << r;
      EXPECT_FALSE(keeps_whole_vocabulary(cases[r].p, V))
          << "row " << r << ": with no filter the GPU samples in id order";
      if (k <= 0 || k >= V)
        EXPECT_GE(cands.size(), size_t(cuda::kMaxSampleCandidates)) << "row " << r;
      else
        EXPECT_GT(k, cuda::kMaxSampleCandidates) << "row " << r;
      ++to_host;
      continue;
    }
    const auto [want, is_near] = host_pick(cands, rows[r].uniform);
    if (is_near) {
      ++near;
      EXPECT_TRUE(
          std::any_of(cands.begin(), cands.end(), [&](auto& c) { return c.first == tok[r]; }));
    } else {
      EXPECT_EQ(tok[r], want) << "row " << r << " V " << V;
      exact += tok[r] == want;
    }
    EXPECT_NEAR(lp[r], log_softmax(row)[tok[r]], 1e-4) << "row " << r;
  }
  EXPECT_GT(exact, (R - to_host) * 9 / 10);
  EXPECT_LE(near, R / 20);
  // The sampler keeps its scratch from call to call (the tickets that find a spread row's last
  // block stay at 0 between calls): calls of other rows and row counts (so other blocks a row),
  // each row's token as in the first call, its log-probability to rounding.
  const std::pair<int, int> calls[] = {{R - R / 3, R / 3}, {0, 1}, {R / 2, 7}, {0, R / 2}, {0, R}};
  for (const auto& [first, n] : calls) {
    cuda::check(cudaMemset(d_tok.p, 0xff, R * sizeof(int)), "memset");
    sampler.sample(d_logits.p, V, std::span(rows).subspan(first, n), d_rows.p + first, d_pens.p,
                   d_tok.p, d_lp.p, nullptr);
    const std::vector<int> again = d_tok.get(n);
    const std::vector<float> again_lp = d_lp.get(n);
    for (int i = 0; i < n; ++i) {
      EXPECT_EQ(again[i], tok[first + i]) << "row " << first + i << " in a call of " << n;
      EXPECT_NEAR(again_lp[i], lp[first + i], 1e-5) << "row " << first + i;
    }
  }
  if (V > cuda::kMaxSampleCandidates) {
    EXPECT_GT(to_host, 0);  // top_k off with wide lists
  } else {
    EXPECT_EQ(to_host, 0);
  }
}

TEST_F(Cuda, SamplingKernelMatchesHostSampler) { check_sampling_kernel(8192); }

// Above kMaxSampleCandidates the kernel first selects the largest logits by radix select.
TEST_F(Cuda, SamplingKernelMatchesHostSamplerOnLargeVocabularies) { check_sampling_kernel(20000); }

// forward_sample: the token comes from the GPU; it is the host's choice on the same logits (those
// of a twin slot holding the same state, run through forward()), and the top-N log-probabilities
// are the host's top_logprobs of that row.
TEST_F(Cuda, ForwardSampleAgreesWithHostSamplingOfTheSameLogits) {
  const VariantModel vm({.dtype = DType::BF16}, 12);
  const Config& c = vm.config;
  auto gpu = make_backend(vm.model, {.kind = "cuda", .n_slots = 8});
  std::vector<std::vector<int>> prompts;
  std::vector<SeqChunk> chunks, twins;
  for (int i = 0; i < 4; ++i) {
    prompts.push_back(random_tokens(30 + 40 * i, c.vocab_size, 40 + i));
    chunks.push_back({gpu->alloc_slot(), prompts[i], false});
  }
  for (int i = 0; i < 4; ++i) twins.push_back({gpu->alloc_slot(), prompts[i], false});
  SamplingParams p;
  p.temperature = 1.0f, p.top_k = 0, p.top_p = 0.95f, p.min_p = 0.0f;
  p.repetition_penalty = 1.2f;
  std::vector<std::vector<std::pair<int, int>>> pens(4);
  std::vector<SampleSpec> specs;
  for (int i = 0; i < 4; ++i) {
    pens[i] = penalty_counts(p, prompts[i], c.vocab_size);
    specs.push_back({&p, pens[i], 0.1 + 0.25 * i, 1 + 3 * i});
  }
  const size_t V = c.vocab_size;
  for (int step = 0; step < 3; ++step) {
    for (int i = 0; i < 4; ++i) gpu->copy_slot(chunks[i].slot, twins[i].slot);
    const auto logits = gpu->forward(twins);
    const auto got = gpu->forward_sample(chunks, specs);
    ASSERT_EQ(got.size(), 4u);
    for (int i = 0; i < 4; ++i) {
      const std::span<const float> row(logits.data() + i * V, V);
      const auto [want, near] = host_pick(sample_candidates(p, row, pens[i]), specs[i].uniform);
      if (!near) {
        EXPECT_EQ(got[i].token, want) << "sequence " << i << " step " << step;
      }
      const auto lp = log_softmax(row);
      EXPECT_NEAR(got[i].logprob, lp[got[i].token], 1e-3);
      const auto top = top_logprobs(lp, specs[i].top_logprobs);
      ASSERT_EQ(got[i].top_logprobs.size(), top.size());
      for (size_t j = 0; j < top.size(); ++j) {
        EXPECT_NEAR(got[i].top_logprobs[j].second, top[j].second, 1e-3) << "rank " << j;
        // The same token, unless two are within the run-to-run noise of each other.
        if (got[i].top_logprobs[j].first != top[j].first) {
          EXPECT_NEAR(lp[got[i].top_logprobs[j].first], top[j].second, 1e-3);
        }
      }
      prompts[i].push_back(got[i].token);
      chunks[i].tokens = std::span<const int>(&prompts[i].back(), 1);  // decode steps next
      twins[i].tokens = chunks[i].tokens;
      pens[i] = penalty_counts(p, prompts[i], c.vocab_size);
      specs[i].penalties = pens[i];
    }
  }
}

// The tensor-core prefill tile (bf16 products) against the fp32 tile kernel on the same random
// caches and chunks. bf16 tolerance.
struct AttentionCase {
  int64_t n;
  int kv, batch, tokens;
  int64_t pos0;
};
void check_tensor_core_attention(const AttentionCase& k) {
  mp::testing::AttentionRig rig(mp::testing::attention_config(k.n, k.kv), k.batch, k.tokens,
                                k.pos0);
  rig.summaries();
  rig.attend(false);
  const auto want = rig.output();
  rig.attend(true);
  const auto got = rig.output();
  for (float x : got) ASSERT_TRUE(std::isfinite(x));
  EXPECT_LT(rel_err(got, want), 1e-2) << "n " << k.n << " pos0 " << k.pos0;
}

// Whole blocks, chunks starting mid-block over cached keys, GQA, batches, past the trained length.
TEST_F(Cuda, TensorCoreAttentionMatchesTheFp32Tile) {
  for (const AttentionCase& k :
       {AttentionCase{4096, 16, 1, 1024, 0}, AttentionCase{4096, 4, 2, 333, 100},
        AttentionCase{2048, 2, 3, 200, 5000}})
    check_tensor_core_attention(k);
}

// One long chunk: every level's summaries, some completed inside the chunk.
TEST_F(Cuda, TensorCoreAttentionMatchesTheFp32TileOnALongChunk) {
  check_tensor_core_attention({1 << 16, 16, 1, 70000, 0});
}

// The decode kernel (D / 4 lanes a key, 4 channels a lane) against the fp32 tile kernel on the
// same one-query items, fp32 tolerance: positions at and around block and group boundaries, GQA,
// head dims from 16 to 128, past the trained length; blocks of 32 warps (steps of few sequences)
// and of 8 (the last three cases: 256 items of a sequence and a head; a block serving 1, 2 and 4
// heads of a KV head). Steps of few sequences with long windows split each key list over
// blocks (decode_splits), the split's last block merging them: each such step runs twice (the
// tickets left at zero for the next).
TEST_F(Cuda, DecodeAttentionMatchesTheFp32Tile) {
  std::set<int> splits_seen;
  auto check = [&](const Config& c, int batch, int64_t pos0) {
    mp::testing::AttentionRig rig(c, batch, 1, pos0);
    ASSERT_TRUE(rig.plan.padded);
    ASSERT_EQ(rig.plan.T, batch);  // no padding rows: every output is compared
    rig.summaries();
    const int splits = cuda::decode_splits(rig.shape, rig.cv.cap, batch);
    splits_seen.insert(splits);
    auto attend = [&](bool single_queries) {
      cuda::check(cudaMemset(rig.out, 0xff, size_t(batch) * c.n_heads * c.head_dim * 4), "memset");
      cuda::attention(rig.shape, rig.cv, rig.chunks, rig.table, rig.attn,
                      int(rig.plan.attn.size()), single_queries, rig.q, rig.k, rig.v, rig.new_k,
                      rig.new_v, rig.out, nullptr, rig.scratch, nullptr, false);
      return rig.output();
    };
    const auto want = attend(false);
    for (int again = 0; again < (splits > 1 ? 2 : 1); ++again) {
      const auto got = attend(true);
      for (float x : got) ASSERT_TRUE(std::isfinite(x));
      EXPECT_LT(rel_err(got, want), 1e-5)
          << "d " << c.head_dim << " m " << c.fma_block_size << " n " << c.n_ctx_train << " pos0 "
          << pos0 << " splits " << splits << " run " << again;
    }
  };
  for (const int d : {16, 32, 64, 128})
    for (const AttentionCase& k :
         {AttentionCase{4096, 16, 8, 1, 1023}, AttentionCase{2048, 2, 5, 1, 4096},
          AttentionCase{1 << 16, 4, 3, 1, 70001}, AttentionCase{4096, 16, 16, 1, 2047},
          AttentionCase{4096, 8, 16, 1, 1023}, AttentionCase{2048, 2, 16, 1, 4095}}) {
      Config c = mp::testing::attention_config(k.n, k.kv);
      c.head_dim = d;
      c.hidden_size = c.n_heads * d;
      check(c, k.batch, k.pos0);
    }
  // Key lists longer than a block's threads, whose places are worked out in stages: m = 256 at
  // batch 16 (blocks of 8 warps, 256 keys a stage; 441 fine keys) and m = 1024 at batch 1 (32
  // warps, 1,024 a stage; 1,929 fine keys, split over blocks). m = 256 at batch 1 (512 keys: one
  // block). Split key lists: m = 1024 at batch 1 and 2 (4 splits), a list shorter than its splits
  // (2 keys: blocks without keys), one of a key a split, one cut mid-window, one past the
  // trained length.
  for (const auto& [m, n, batch, pos0] :
       {std::tuple{256, 4096, 16, 3000}, std::tuple{1024, 8192, 1, 5000},
        std::tuple{256, 4096, 1, 700}, std::tuple{1024, 4096, 1, 1}, std::tuple{1024, 4096, 1, 3},
        std::tuple{1024, 4096, 1, 1500}, std::tuple{1024, 4096, 2, 2047},
        std::tuple{1024, 4096, 1, 9000}}) {
    Config c = mp::testing::attention_config(n, 4);
    c.fma_block_size = m;
    c.validate();
    check(c, batch, pos0);
  }
  EXPECT_EQ(splits_seen.count(1), 1u);
  EXPECT_GT(*splits_seen.rbegin(), 2);  // on a GPU of at least 48 SMs (16 heads a sequence)
}

// Attention writing bf16 (the o-projection's input) writes exactly its fp32 output rounded: decode
// steps (batches at positions around block and group boundaries, GQA) and prefill chunks (the
// tensor-core tile and the fp32 tile, a chunk starting mid-block over cached keys).
TEST_F(Cuda, AttentionRoundsItsOwnOutputToBf16) {
  for (const AttentionCase& k :
       {AttentionCase{4096, 16, 5, 1, 1023}, AttentionCase{2048, 2, 12, 1, 4095},
        AttentionCase{4096, 4, 2, 333, 100}, AttentionCase{2048, 2, 3, 200, 5000}})
    for (bool fast : {true, false}) {
      mp::testing::AttentionRig rig(mp::testing::attention_config(k.n, k.kv), k.batch, k.tokens,
                                    k.pos0);
      ASSERT_EQ(rig.plan.padded, k.tokens == 1);
      rig.summaries();
      rig.attend(fast);
      const auto want = rig.output();
      Dev<__nv_bfloat16> got(want.size());
      rig.attend(fast, got.p);
      const auto rounded = from_bf16(got.get(want.size()));
      // The sequences' rows (a bucket's padding rows are not written).
      for (size_t i = 0; i < size_t(k.batch) * k.tokens * rig.c.n_heads * rig.c.head_dim; ++i) {
        ASSERT_TRUE(std::isfinite(want[i]));
        ASSERT_EQ(rounded[i], __bfloat162float(__float2bfloat16(want[i])))
            << i << " tokens " << k.tokens << " fast " << fast;
      }
    }
}

// Exact-attention decode (keys split over blocks, a KV head's query heads sharing its loads, then
// a combine) against the reference kernel (one block per (sequence, head)) on the same random
// caches, fp32 tolerance: batches of 1, 3 and 256, contexts 1, 7, 64, 1000, 4096 and past the
// trained length (2048), sequences of one batch at mixed positions, GQA groups of 1, 2, 3, 4, 8
// and 16 (blocks of 1, 2 and 4 heads; 8 and 16: 2 and 4 blocks per KV head), head dims 8-128;
// steps that split and one that does not (4,096 blocks already). The bf16 output is the fp32
// one rounded.
struct ExactCase {
  int batch;
  int64_t pos0, pos_step;  // sequence b's query at pos0 + b * pos_step: pos0 + 1 + b * pos_step keys
  int heads, kv, d;
};
TEST_F(Cuda, ExactDecodeAttentionMatchesTheReferenceKernel) {
  std::set<bool> split;  // which paths the cases took
  for (const ExactCase& e :
       {ExactCase{1, 0, 0, 16, 2, 64}, ExactCase{1, 6, 0, 6, 2, 64}, ExactCase{3, 63, 0, 16, 4, 64},
        ExactCase{3, 999, 0, 6, 2, 64}, ExactCase{1, 4095, 0, 16, 2, 128},
        ExactCase{3, 4095, 1, 6, 2, 64}, ExactCase{256, 999, 0, 6, 2, 64},
        ExactCase{256, 0, 7, 6, 2, 64}, ExactCase{256, 0, 2, 16, 16, 64},
        ExactCase{3, 10, 300, 16, 1, 16}, ExactCase{5, 1, 200, 4, 2, 32},
        ExactCase{3, 50, 3, 4, 4, 8}}) {
    Config c = mp::testing::attention_config(2048, e.kv);
    c.fma_enabled = false;
    c.n_heads = e.heads, c.head_dim = e.d, c.hidden_size = e.heads * e.d;
    mp::testing::AttentionRig rig(c, e.batch, 1, e.pos0, cuda::SummaryKernels::Auto, e.pos_step);
    ASSERT_TRUE(rig.plan.padded);
    ASSERT_EQ(rig.plan.T, e.batch);  // no padding rows: every output is compared
    const int splits = cuda::decode_splits(rig.shape, rig.cv.cap, e.batch);
    split.insert(splits > 1);
    const size_t n = size_t(e.batch) * e.heads * e.d;
    auto attend = [&](bool fast) {
      cuda::check(cudaMemset(rig.out, 0xff, n * 4), "memset");  // NaNs: every output written
      rig.attend(fast);
      return rig.output();
    };
    const auto want = attend(false), got = attend(true);
    const std::string what = "batch " + std::to_string(e.batch) + " pos0 " +
                             std::to_string(e.pos0) + " step " + std::to_string(e.pos_step) +
                             " heads " + std::to_string(e.heads) + "/" + std::to_string(e.kv) +
                             " d " + std::to_string(e.d) + " splits " + std::to_string(splits);
    EXPECT_LT(rel_err(got, want), 1e-5) << what;
    Dev<__nv_bfloat16> got16(n);
    rig.attend(true, got16.p);
    const auto rounded = from_bf16(got16.get(n));
    for (size_t i = 0; i < n; ++i)
      ASSERT_EQ(rounded[i], __bfloat162float(__float2bfloat16(got[i]))) << what << " at " << i;
  }
  EXPECT_EQ(split.size(), 2u) << "both the split and the single-block path";
}

// The host side of the CUDA backend's planning (runs without a GPU): decode steps pad to a
// bucket with no-op rows and items; summary work comes in token order and slices every completed
// group exactly once.
TEST(CudaPlan, DecodeStepsPadToBucketsAndSummarySlicesCoverEachGroupOnce) {
  for (auto [batch, bucket] : std::vector<std::pair<size_t, size_t>>{
           {1, 1}, {8, 8}, {9, 16}, {64, 64}, {65, 96}, {250, 256}})
    EXPECT_EQ(cuda::decode_bucket(batch), bucket) << batch;
  const Config c = mp::testing::attention_config(1 << 14, 4);
  const int L = c.n_levels();
  const int64_t cap = 2 * c.fma_block_size;
  std::vector<int> one = {5};
  std::vector<SeqChunk> step;
  std::vector<int64_t> pos(10);
  for (int i = 0; i < 10; ++i) {
    step.push_back({i, one, false});
    pos[i] = 1000 + 333 * i;
  }
  cuda::BatchPlan d;
  cuda::make_plan(c, cap, step, pos, d);
  EXPECT_FALSE(d.one_pass);
  EXPECT_TRUE(d.append);  // Auto: a decode step's cache update is append_tokens
  EXPECT_TRUE(d.padded);
  EXPECT_EQ(d.T, 16);
  EXPECT_EQ(d.rows_wanted, 10);
  ASSERT_EQ(d.rows.size(), 16u);
  for (int r = 0; r < 16; ++r) EXPECT_EQ(d.rows[r], r);  // every row in order: none gathered
  EXPECT_EQ(d.tokens.size(), 16u);
  ASSERT_EQ(d.chunks.size(), 16u);  // every array has the bucket's size: graphs' inputs stay put
  for (size_t i = 0; i < 16; ++i) EXPECT_EQ(d.chunks[i].T, i < 10 ? 1 : 0) << i;  // 0: padding
  EXPECT_EQ(d.table.size(), 16u * L);
  ASSERT_EQ(d.attn.size(), 16u);
  for (size_t i = 10; i < 16; ++i) EXPECT_GE(d.attn[i].q_begin, d.attn[i].q_end);
  EXPECT_TRUE(d.done.empty());
  EXPECT_TRUE(d.filling.empty());
  EXPECT_TRUE(d.commits.empty());
  // The reference: per-level summary items and commits, padded alike.
  cuda::make_plan(c, cap, step, pos, d, cuda::SummaryKernels::PerLevel);
  EXPECT_FALSE(d.append);
  EXPECT_TRUE(d.padded);
  EXPECT_EQ(d.table.size(), 16u * L);
  EXPECT_EQ(d.commits.size(), 16u * (2 + 2 * L));
  EXPECT_EQ(d.done.size(), 16u * L);
  EXPECT_EQ(d.filling.size(), 16u * L);
  for (size_t i = 10 * L; i < d.filling.size(); ++i) EXPECT_LT(d.filling[i].group, 0);

  const std::vector<int> prompt(5000, 7);
  const SeqChunk chunk{0, prompt, false};
  // The same plan object again, as the backend reuses it: nothing of the decode step remains.
  cuda::BatchPlan& p = d;
  cuda::make_plan(c, cap, {&chunk, 1}, {700}, p, cuda::SummaryKernels::PerLevel);
  EXPECT_FALSE(p.padded);
  EXPECT_FALSE(p.append);
  EXPECT_FALSE(p.one_pass);
  EXPECT_EQ(p.rows_wanted, 1);
  EXPECT_EQ(p.T, 5000);
  EXPECT_EQ(p.tokens.size(), 5000u);
  ASSERT_EQ(p.chunks.size(), 1u);
  EXPECT_EQ(p.attn.front().q_begin, 700);
  for (size_t i = 1; i < p.done.size(); ++i) EXPECT_LE(p.done[i - 1].t_from, p.done[i].t_from);
  // Per (level, group): the slices tile [max(group start, 700), group end) without overlap.
  std::map<std::pair<int, int64_t>, std::vector<std::pair<int64_t, int64_t>>> slices;
  for (const auto& it : p.done) slices[{it.level, it.group}].push_back({it.t_from, it.t_to});
  int groups = 0;
  for (int l = 1; l <= L; ++l)
    groups += int((700 + 5000) / c.group_size(l) - 700 / c.group_size(l));
  EXPECT_EQ(int(slices.size()), groups);
  for (auto& [key, ranges] : slices) {
    std::sort(ranges.begin(), ranges.end());
    const int64_t w = c.group_size(key.first);
    int64_t at = std::max<int64_t>(key.second * w, 700);
    for (auto [from, to] : ranges) {
      EXPECT_EQ(from, at);
      at = to;
    }
    EXPECT_EQ(at, (key.second + 1) * w);
  }

  // One pass: a decode step has one range per sequence, padded to the bucket, none split; a
  // prompt's ranges tile it, aligned to multiples of range_tokens.
  cuda::make_plan(c, cap, step, pos, p, cuda::SummaryKernels::OnePass);
  ASSERT_TRUE(p.one_pass);
  EXPECT_FALSE(p.append);
  EXPECT_FALSE(p.split_chunks);
  ASSERT_EQ(p.done.size(), 16u);
  for (size_t i = 0; i < 16; ++i) {
    EXPECT_EQ(p.done[i].group < 0, i >= 10) << i;
    if (i >= 10) continue;
    EXPECT_EQ(p.done[i].t_from, pos[i]);
    EXPECT_EQ(p.done[i].t_to, pos[i] + 1);
  }
  EXPECT_EQ(p.filling.size(), 16u * L);
  cuda::make_plan(c, cap, {&chunk, 1}, {700}, p);
  ASSERT_TRUE(p.one_pass);
  EXPECT_TRUE(p.split_chunks);
  const int64_t R = p.range_tokens;
  EXPECT_EQ(R, 128);  // 5000 tokens: bit_ceil(5000 / 64 + 1)
  int64_t at = 700;
  for (const auto& it : p.done) {
    EXPECT_EQ(it.t_from, at);
    EXPECT_EQ(it.t_to, std::min<int64_t>((at / R + 1) * R, 5700));
    at = it.t_to;
  }
  EXPECT_EQ(at, 5700);
  EXPECT_EQ(p.filling.size(), size_t(L));
}

// The one-pass summary kernel (bf16 products on tensor cores, fp32 sums) against the per-level
// kernels (fp32, checked against the CPU by the model tests) on the same random keys, values,
// weights and accumulators: each new group's summaries (all KV heads) and each accumulator after
// the chunks, 1e-2 relative (bf16); a block the reference leaves zero must be zero.
struct SummaryCase {
  int64_t n;
  int kv, batch, tokens;
  int64_t pos0;
};
void check_one_pass(const Config& c, const SummaryCase& k, const std::string& what) {
  mp::testing::AttentionRig rig(c, k.batch, k.tokens, k.pos0, cuda::SummaryKernels::PerLevel);
  ASSERT_FALSE(rig.plan.one_pass);
  rig.summaries();
  const auto want = rig.summary_state();
  rig.plan_summaries(cuda::SummaryKernels::OnePass);
  ASSERT_TRUE(rig.plan.one_pass) << what;
  rig.summaries();
  const auto got = rig.summary_state();
  const size_t block = size_t(c.n_kv_heads) * c.fma_rank * c.head_dim;
  const char* names[] = {"new keys", "new values", "key accumulators", "value accumulators"};
  for (int a = 0; a < 4; ++a) {
    ASSERT_EQ(got[a].size(), want[a].size());
    for (size_t b = 0; b < want[a].size() / block; ++b) {
      const std::vector<float> gb(got[a].begin() + b * block, got[a].begin() + (b + 1) * block),
          wb(want[a].begin() + b * block, want[a].begin() + (b + 1) * block);
      if (std::all_of(wb.begin(), wb.end(), [](float x) { return x == 0.0f; }))
        EXPECT_TRUE(std::all_of(gb.begin(), gb.end(), [](float x) { return x == 0.0f; }))
            << what << " " << names[a] << " block " << b;
      else
        EXPECT_LT(rel_err(gb, wb), 1e-2) << what << " " << names[a] << " block " << b;
    }
  }
}

// Chunks that split over several ranges (start_groups_kernel, atomic adds) or fit one (the block
// reads and writes the accumulators), starting mid-block, ending on a group boundary, GQA,
// batches, decode steps (a padded bucket), past the trained length and past 1M (every level's
// group completing at 2^21).
std::vector<SummaryCase> summary_cases() {
  return {{4096, 16, 1, 1024, 0},     {4096, 4, 2, 333, 100},    {2048, 2, 3, 200, 5000},
          {4096, 4, 2, 42, 150},      {4096, 16, 5, 1, 1023},    {4096, 2, 12, 1, 4095},
          {1 << 16, 16, 1, 70000, 0}, {1 << 20, 4, 2, 3000, (1 << 20) + 4093},
          {1 << 20, 16, 3, 1, (1 << 21) - 1}};
}

TEST_F(Cuda, OnePassSummariesMatchThePerLevelKernels) {
  for (const SummaryCase& k : summary_cases())
    check_one_pass(mp::testing::attention_config(k.n, k.kv), k,
                   "n " + std::to_string(k.n) + " kv " + std::to_string(k.kv) + " pos0 " +
                       std::to_string(k.pos0) + " tokens " + std::to_string(k.tokens));
}

// Summary shapes besides attention_config's groupedconv: avgpool, rotary key summaries,
// per-level ranks, rank 8 (one level a one-pass fragment), head_dim 16, m 16 (16-token groups at
// level 1), one KV head.
struct SummaryShape {
  const char* name;
  Downsampling ds;
  bool rotary;
  int rank, d, m, kv;
  std::vector<int> ranks;
};
std::vector<SummaryShape> summary_shapes() {
  return {{"avgpool", Downsampling::AvgPool, false, 4, 64, 64, 4, {}},
          {"rotary", Downsampling::GroupedConv, true, 4, 64, 64, 2, {}},
          {"ranks", Downsampling::GroupedConv, false, 4, 64, 64, 4, {1, 4, 2, 3, 4}},
          {"avgpool_ranks", Downsampling::AvgPool, false, 4, 64, 64, 4, {4, 2, 1, 4, 2}},
          {"rank8_d16", Downsampling::GroupedConv, false, 8, 16, 16, 16, {}},
          {"rotary_rank8_m16_kv1", Downsampling::GroupedConv, true, 8, 16, 16, 1, {}},
          {"avgpool_rank8_m16_d32", Downsampling::AvgPool, false, 8, 32, 16, 8, {}}};
}
// The shape at trained length n * m / 64 (5 levels for n 4096).
Config summary_shape_config(const SummaryShape& sh, int64_t n) {
  Config c = mp::testing::attention_config(n * sh.m / 64, sh.kv);
  c.fma_downsampling = sh.ds;
  c.fma_rotary_summaries = sh.rotary;
  c.fma_rank = sh.rank;
  c.fma_level_ranks = sh.ranks;
  c.head_dim = sh.d;
  c.hidden_size = c.n_heads * sh.d;
  c.fma_block_size = sh.m;
  c.validate();
  return c;
}

TEST_F(Cuda, OnePassSummariesMatchThePerLevelKernelsInEveryShape) {
  for (const SummaryShape& sh : summary_shapes())
    for (const SummaryCase& k : {SummaryCase{4096, sh.kv, 2, 333, 100},
                                 SummaryCase{4096, sh.kv, 1, 1500, 2000},
                                 SummaryCase{4096, sh.kv, 6, 1, 4095}})
      check_one_pass(summary_shape_config(sh, k.n), k,
                     std::string(sh.name) + " pos0 " + std::to_string(k.pos0));
}

// A decode step's cache update in one kernel after the attention (append_tokens) against the
// per-level kernels and the commit, on the same random caches, keys and values: the attention's
// output and every cache array (fine windows, summary rings, accumulators), each element to 1e-6
// (the same fp32 sums: equal bits expected). Row b of k.batch at k.pos0 + b * pos_step.
void check_append(const Config& c, const SummaryCase& k, int64_t pos_step,
                  const std::string& what) {
  mp::testing::AttentionRig rig(c, k.batch, 1, k.pos0, cuda::SummaryKernels::PerLevel, pos_step);
  ASSERT_FALSE(rig.plan.append);
  rig.run();
  // The sequences' attention rows (a bucket's padding rows are not written).
  const size_t rows = size_t(k.batch) * c.n_heads * c.head_dim;
  auto want = rig.cache_state();
  want.push_back(rig.output());
  want.back().resize(rows);
  rig.plan_summaries(cuda::SummaryKernels::Auto);
  ASSERT_TRUE(rig.plan.append) << what;
  rig.run();
  auto got = rig.cache_state();
  got.push_back(rig.output());
  got.back().resize(rows);
  const char* names[] = {"fine keys",        "fine values",        "key rings",       "value rings",
                         "key accumulators", "value accumulators", "attention output"};
  for (size_t a = 0; a < want.size(); ++a) {
    ASSERT_EQ(got[a].size(), want[a].size());
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < want[a].size(); ++i)
      if (!(std::fabs(got[a][i] - want[a][i]) <= 1e-6f * (1.0f + std::fabs(want[a][i]))) &&
          bad++ == 0)
        first = i;
    EXPECT_EQ(bad, 0u) << what << ", " << names[a] << ": first at " << first << ", "
                       << got[a][first] << " against " << want[a][first];
  }
}

// Rows at consecutive positions across block and group boundaries (each completes or starts a
// different set of levels, or none) and at spread ones, a fresh sequence (every level starting),
// GQA, past the trained length and past 1M (every level completing at 2^21, starting after it);
// then every summary shape, conv too.
TEST_F(Cuda, AppendTokensIsThePerLevelKernelsAndCommit) {
  for (auto [k, step] : std::vector<std::pair<SummaryCase, int64_t>>{
           {{4096, 16, 6, 1, 1020}, 1},
           {{2048, 2, 12, 1, 4090}, 1},
           {{1 << 20, 4, 3, 1, (1 << 21) - 2}, 1},
           {{1 << 16, 16, 5, 1, 70001}, 451},
           {{4096, 2, 9, 1, 63}, 64},
           {{4096, 4, 1, 1, 0}, 0}})
    check_append(mp::testing::attention_config(k.n, k.kv), k, step,
                 "n " + std::to_string(k.n) + " kv " + std::to_string(k.kv) + " pos0 " +
                     std::to_string(k.pos0) + " step " + std::to_string(step));
  auto shapes = summary_shapes();
  shapes.push_back({"conv_d16", Downsampling::Conv, false, 4, 16, 16, 2, {}});
  for (const SummaryShape& sh : shapes)
    for (auto [k, step] : std::vector<std::pair<SummaryCase, int64_t>>{
             {{4096, sh.kv, 6, 1, 1024 * sh.m / 64 - 3}, 1}, {{4096, sh.kv, 9, 1, sh.m - 1}, sh.m}})
      check_append(summary_shape_config(sh, k.n), k, step,
                   std::string(sh.name) + " pos0 " + std::to_string(k.pos0));
}


// Replicas over CUDA backends against one backend: on GPUs 0 and 1 when there are two, else two
// backends on GPU 0 (the wrapper's device threads and cross-backend copies run either way).
// Sub-batches may take other GEMM algorithms than the whole batch: logits agree to 1e-3.
// Two CUDA replicas of `slots` slots each: on GPUs 0 and 1, else both on GPU 0.
std::unique_ptr<Backend> two_replicas(std::shared_ptr<const Model> model, int slots) {
  if (cuda_device_count() >= 2)
    return make_backend(model, {.kind = "cuda", .n_slots = slots, .devices = {0, 1}});
  std::vector<std::unique_ptr<Backend>> parts;
  const int64_t ctx = model->config().n_ctx_train;
  for (int i = 0; i < 2; ++i) parts.push_back(make_cuda_backend(model, slots, ctx, 0));
  return make_replica_backend(std::move(parts), {"cuda:0", "cuda:0 (second)"},
                              DeviceThreads::kGpuSpin);
}

TEST_F(Cuda, ReplicasMatchOneBackendAndMoveStates) {
  const VariantModel vm({.dtype = DType::BF16}, 13);
  const Config& c = vm.config;
  std::unique_ptr<Backend> spread = two_replicas(vm.model, 2);
  auto one = make_backend(vm.model, {.kind = "cuda", .n_slots = 4});
  std::vector<int> slots;
  for (int i = 0; i < 4; ++i) {
    slots.push_back(one->alloc_slot());
    ASSERT_EQ(spread->alloc_slot(), slots.back());  // devices 0 1 0 1
  }
  std::vector<std::vector<int>> prompts;
  for (int i = 0; i < 4; ++i) prompts.push_back(random_tokens(5 + 60 * i, c.vocab_size, 50 + i));
  std::vector<SeqChunk> pre;
  for (int i = 3; i >= 0; --i) pre.push_back({slots[i], prompts[i], i % 2 == 0});
  EXPECT_LT(rel_err(spread->forward(pre), one->forward(pre)), 1e-3);
  // Slot 0's state to slot 1, which lives on the other device.
  spread->copy_slot(slots[0], slots[1]);
  one->copy_slot(slots[0], slots[1]);
  EXPECT_EQ(spread->slot_pos(slots[1]), 5);
  SamplingParams greedy;
  greedy.temperature = 0;
  std::vector<int> next = {7, 8, 9, 10};
  for (int step = 0; step < 4; ++step) {
    std::vector<SeqChunk> batch;
    std::vector<SampleSpec> specs;
    for (int i = 0; i < 4; ++i) {
      batch.push_back({slots[(i + step) % 4], std::span<const int>(&next[i], 1), false});
      specs.push_back({&greedy, {}, 0.5, 2});
    }
    const auto want = one->forward_sample(batch, specs);
    const auto got = spread->forward_sample(batch, specs);
    for (int i = 0; i < 4; ++i) {
      EXPECT_EQ(got[i].token, want[i].token) << "step " << step << " chunk " << i;
      EXPECT_NEAR(got[i].logprob, want[i].logprob, 1e-3);
      ASSERT_EQ(got[i].top_logprobs.size(), 2u);
    }
    for (int i = 0; i < 4; ++i) next[i] = want[i].token;
  }
  for (int s : slots) EXPECT_EQ(spread->slot_pos(s), one->slot_pos(s));
  const auto stats = spread->device_stats();
  ASSERT_EQ(stats.size(), 2u);
  EXPECT_EQ(stats[0].tokens, 5u + 125u + 8u);  // prompts 0 and 2, four steps of slots 0 and 2
  EXPECT_EQ(stats[1].tokens, 65u + 185u + 8u);
}

// The scheduler over CUDA replicas steps each device from its own thread at the same time (on
// GPUs 0 and 1, else two backends on GPU 0). Greedy completions, checked token by token against
// one backend reading the same text: every generated token is the likeliest there, up to the bf16
// tolerance (the devices' batches differ from one backend's, so exact ties may break otherwise).
TEST_F(Cuda, ReplicaStepLoopsGenerateWhatOneBackendPredicts) {
  const VariantModel vm({.dtype = DType::BF16}, 14);
  const Config& c = vm.config;
  std::unique_ptr<Backend> spread = two_replicas(vm.model, 4);
  const int n = 8, max_tokens = 24;
  std::vector<std::vector<int>> prompts(n), got(n);
  {
    Scheduler sched(*spread, vm.model->tokenizer(), {.max_prefill_per_step = 128});
    std::vector<std::future<std::vector<int>>> done;
    for (int r = 0; r < n; ++r) {
      prompts[r] = random_tokens(3 + 41 * r, c.vocab_size, 60 + r);
      auto tokens = std::make_shared<std::vector<int>>();
      auto p = std::make_shared<std::promise<std::vector<int>>>();
      done.push_back(p->get_future());
      CompletionRequest req;
      req.prompt = prompts[r];
      req.max_tokens = max_tokens;
      req.ignore_eos = true;
      req.sampling.temperature = 0;
      req.on_event = [tokens, p](const CompletionEvent& e) {
        if (e.token >= 0) tokens->push_back(e.token);
        if (e.done) p->set_value(*tokens);
        return true;
      };
      sched.submit(std::move(req));
    }
    for (int r = 0; r < n; ++r) got[r] = done[r].get();
  }
  const auto stats = spread->device_stats();
  ASSERT_EQ(stats.size(), 2u);
  EXPECT_GE(stats[0].steps, size_t(max_tokens));  // both loops stepped
  EXPECT_GE(stats[1].steps, size_t(max_tokens));
  auto one = make_backend(vm.model, {.kind = "cuda", .n_slots = 1});
  for (int r = 0; r < n; ++r) {
    ASSERT_EQ(got[r].size(), size_t(max_tokens)) << r;
    const std::vector<float> below = greedy_shortfalls(*one, prompts[r], got[r]);
    if (*std::max_element(below.begin(), below.end()) <= 1e-2f) continue;
    // Which side is wrong (the flaky failure of docs/PERF.md): the same text read again by a
    // fresh GPU backend and by the CPU.
    auto again = make_backend(vm.model, {.kind = "cuda", .n_slots = 1});
    auto cpu_b = make_backend(vm.model, {.kind = "cpu", .n_slots = 1, .n_threads = 2});
    const auto below_again = greedy_shortfalls(*again, prompts[r], got[r]);
    const auto below_cpu = greedy_shortfalls(*cpu_b, prompts[r], got[r]);
    for (int t = 0; t < max_tokens; ++t)
      EXPECT_LE(below[t], 1e-2f) << "request " << r << " (prompt " << prompts[r].size()
                                 << ") token " << t << "; a fresh GPU backend " << below_again[t]
                                 << ", the CPU " << below_cpu[t];
  }
}

#ifdef MULTIPOLE_HAVE_NCCL
// Tensor parallelism over NCCL: N = 1 against the plain backend (the same arithmetic: 1e-5), and
// N = 2 against N = 1 where there are two GPUs (bf16 tolerance, 1e-2), for every downsampling
// kind and exact attention; states cross between the split and the plain backend.
class CudaTensorParallel : public ::testing::TestWithParam<ModelVariant> {
 protected:
  void SetUp() override {
    if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  }
};

TEST_P(CudaTensorParallel, LogitsMatchOneGpu) {
  const VariantModel vm(GetParam(), 17);
  const Config& c = vm.config;
  auto plain = make_backend(vm.model, {.kind = "cuda", .n_slots = 2, .max_context = 1024});
  std::vector<std::pair<int, double>> runs = {{1, 1e-5}};
  if (cuda_device_count() >= 2) runs.push_back({2, 1e-2});
  const auto tokens = random_tokens(2 * int(c.n_ctx_train) + 9, c.vocab_size, 3);
  const auto want = logits_in_chunks(*plain, tokens, 37);
  for (const auto& [n, tol] : runs) {
    auto tp = make_backend(
        vm.model, {.kind = "cuda", .n_slots = 2, .max_context = 1024, .tensor_parallel = n});
    const double err = rel_err(logits_in_chunks(*tp, tokens, 37), want);
    EXPECT_LT(err, tol) << "tensor parallel " << n;
    std::printf("tensor parallel %d vs one GPU (%s): rel_err %.3g\n", n, GetParam().name, err);
    // A state made by the plain backend continues on the split one, and back.
    const int ps = plain->alloc_slot(), ts = tp->alloc_slot();
    SeqChunk pre{ps, std::span<const int>(tokens).first(50), false};
    plain->forward({&pre, 1});
    tp->load_slot(ts, plain->save_slot(ps));
    SamplingParams greedy;
    greedy.temperature = 0;
    int pnext = 5, tnext = 5;
    for (int step = 0; step < 4; ++step) {
      SeqChunk pc{ps, std::span<const int>(&pnext, 1), false};
      SeqChunk tc{ts, std::span<const int>(&tnext, 1), false};
      const SampleSpec spec{&greedy, {}, 0.5, 0};
      pnext = plain->forward_sample({&pc, 1}, {&spec, 1})[0].token;
      tnext = tp->forward_sample({&tc, 1}, {&spec, 1})[0].token;
      EXPECT_EQ(tnext, pnext) << "step " << step;
    }
    plain->load_slot(ps, tp->save_slot(ts));
    EXPECT_EQ(plain->slot_pos(ps), 54);
    plain->free_slot(ps);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Models, CudaTensorParallel,
    ::testing::Values(
        ModelVariant{.name = "groupedconv", .dtype = DType::BF16},
        ModelVariant{.name = "conv", .ds = Downsampling::Conv, .dtype = DType::BF16},
        ModelVariant{.name = "avgpool", .ds = Downsampling::AvgPool, .dtype = DType::BF16},
        ModelVariant{.name = "exact", .fma = false, .dtype = DType::BF16}),
    [](const auto& info) { return std::string(info.param.name); });
#endif

}  // namespace
