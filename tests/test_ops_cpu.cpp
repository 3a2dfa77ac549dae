// The CPU backend's matrix products (oneDNN's sgemm, the hand-written matrix-vector kernels of
// every instruction set this CPU has) against the plain dot-product loop, on random inputs.
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
    omp_set_num_threads(threads_);
  }
  std::vector<cpu::Isa> isas() const {
    std::vector<cpu::Isa> all;
    for (cpu::Isa i : {cpu::Isa::Scalar, cpu::Isa::Avx2, cpu::Isa::Avx512})
      if (i <= cpu::detected_isa()) all.push_back(i);
    return all;
  }
  cpu::Isa isa_ = cpu::active_isa();
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
      std::vector<float> wide(wf.size());
      for (int T : {1, 2, 5, 7, 8, 9, 513}) {
        const std::vector<float> x = random_floats(size_t(T) * K, rng);
        std::vector<float> want(size_t(T) * N);
        cpu::matmul_reference(x.data(), T, K, wf.data(), N, want.data());
        for (cpu::Isa isa : isas())
          for (int threads : {1, 2}) {
            cpu::set_isa(isa);
            omp_set_num_threads(threads);
            std::vector<float> got(want.size(), NAN);
            cpu::matmul(x.data(), T, w, got.data(), wide);
            EXPECT_LT(rel_err(got, want), 1e-5)
                << "K " << K << " N " << N << " T " << T << (bf16 ? " bf16 " : " f32 ")
                << cpu::isa_name(isa) << " threads " << threads;
          }
      }
    }
}

// Each output on its own too: no row or column may hide behind the norm of the others.
TEST_F(CpuOps, MatrixVectorKernelsAgreeElementwise) {
  std::mt19937 rng(9);
  const int K = 389, N = 23;  // K leaves a tail for every vector width
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
