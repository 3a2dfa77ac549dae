// Q8_0 weights: the block format (llama.cpp's), the GGUF reader's checks, multipole-convert
// --dtype q8_0, and the CPU backend's products over Q8_0 weights against their reference
// (dequantize to fp32, then the plain product), on fresh random inputs.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "model_fixture.h"
#include "numeric.h"
#include "ops_cpu.h"

namespace {

using namespace mp;
using mp::testing::logits_in_chunks;
using mp::testing::random_model;
using mp::testing::random_tokens;
using mp::testing::rel_err;
using mp::testing::TempDir;

std::vector<float> random_floats(size_t n, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

// x quantized block by block, as the bytes of a GGUF Q8_0 tensor.
std::vector<uint8_t> quantize(const std::vector<float>& x) {
  std::vector<uint8_t> out(x.size() / kQ8Block * kQ8BlockBytes);
  for (size_t b = 0; b < x.size() / kQ8Block; ++b)
    quantize_q8_0_block(x.data() + b * kQ8Block, out.data() + b * kQ8BlockBytes);
  return out;
}

// A [N][K] Q8_0 matrix of random weights, through to_matrix as the backend builds it.
cpu::Matrix q8_matrix(int N, int K, std::mt19937& rng, std::vector<uint8_t>& bytes) {
  bytes = quantize(random_floats(size_t(N) * K, rng));
  const TensorView t{"w", DType::Q8_0, {N, K}, bytes.data()};
  return cpu::to_matrix({&t});
}

TEST(Q8Block, QuantizesAsLlamaCpp) {
  std::mt19937 rng(3);
  for (int trial = 0; trial < 200; ++trial) {
    const std::vector<float> x = random_floats(kQ8Block, rng, trial % 2 ? 0.02f : 3.0f);
    uint8_t block[kQ8BlockBytes];
    quantize_q8_0_block(x.data(), block);
    float amax = 0;
    for (float v : x) amax = std::max(amax, std::fabs(v));
    const float d = amax / 127.0f;
    EXPECT_EQ(q8_0_scale(block), f16_to_f32(f32_to_f16(d)));  // the scale, rounded to fp16
    int extremes = 0;
    for (int j = 0; j < kQ8Block; ++j) {
      const int q = static_cast<int8_t>(block[2 + j]);
      // round(x / d) with the fp32 d (not the fp16 one): within half a step, halves away from 0.
      const float exact = x[j] * (1.0f / d);
      EXPECT_LE(std::fabs(exact - q), 0.5f) << j;
      if (std::fabs(exact - q) == 0.5f) {
        EXPECT_GT(std::fabs(q), std::fabs(exact)) << j;
      }
      extremes += std::abs(q) == 127;
    }
    EXPECT_GE(extremes, 1);  // the largest weight uses the whole range
    float y[kQ8Block];
    dequantize_q8_0_block(block, y);
    for (int j = 0; j < kQ8Block; ++j)
      EXPECT_NEAR(y[j], x[j], 0.5f * d + amax * 1e-3f) << j;  // half a step + fp16 scale
  }
  const std::vector<float> zeros(kQ8Block, 0.0f);
  uint8_t block[kQ8BlockBytes];
  quantize_q8_0_block(zeros.data(), block);
  for (uint8_t b : block) EXPECT_EQ(b, 0);  // d = 0, and no division by it
}

TEST(Q8Block, SizesAreWholeBlocks) {
  EXPECT_EQ(dtype_bytes(DType::Q8_0, 64), 68u);
  EXPECT_EQ(dtype_bytes(DType::BF16, 64), 128u);
  EXPECT_THROW(dtype_bytes(DType::Q8_0, 48), Error);
  EXPECT_EQ(parse_dtype("q8_0"), DType::Q8_0);
  EXPECT_EQ(to_string(DType::Q8_0), "q8_0");
}

// Q8_0 products: fp32 sums of the same fp32 products in another order (1e-5, as bf16's).
class Q8Ops : public ::testing::Test {
 protected:
  void TearDown() override {
    cpu::set_isa(isa_);
    cpu::set_products(products_);
    omp_set_num_threads(threads_);
  }
  cpu::Isa isa_ = cpu::active_isa();
  cpu::Products products_ = cpu::active_products();
  int threads_ = omp_get_max_threads();
};

TEST_F(Q8Ops, MatmulEqualsDequantizedProduct) {
  std::mt19937 rng(7);
  const int shapes[][2] = {{32, 5}, {96, 37}, {512, 130}};  // K, N
  for (auto [K, N] : shapes) {
    std::vector<uint8_t> bytes;
    const cpu::Matrix w = q8_matrix(N, K, rng, bytes);
    ASSERT_TRUE(w.is_q8());
    const std::vector<float> wf =
        TensorView{"w", DType::Q8_0, {N, K}, bytes.data()}.to_f32();  // the reference's weights
    std::vector<float> wide(wf.size());
    for (int T : {1, 2, 3, 5, 8, 9, 70}) {
      const std::vector<float> x = random_floats(size_t(T) * K, rng);
      std::vector<float> want(size_t(T) * N);
      cpu::matmul_reference(x.data(), T, K, wf.data(), N, want.data());
      for (auto products : {cpu::Products::OneDnn, cpu::Products::Kernels})
        for (cpu::Isa isa : {cpu::Isa::Scalar, cpu::Isa::Avx2, cpu::Isa::Avx512}) {
          if (isa > cpu::detected_isa()) continue;
          cpu::set_products(products);
          cpu::set_isa(isa);
          for (int threads : {1, 2}) {
            omp_set_num_threads(threads);
            std::vector<float> got(want.size(), NAN);
            cpu::matmul(x.data(), T, w, got.data(), wide);
            EXPECT_LT(rel_err(got, want), 1e-5)
                << "K " << K << " N " << N << " T " << T << " " << cpu::isa_name(isa)
                << " threads " << threads;
          }
        }
    }
  }
}

TEST_F(Q8Ops, RowsSubMatricesAndStacksKeepTheWeights) {
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

// A config whose matrices and summary convolutions (groups of 32 and 64) are all whole blocks,
// but for ffn_down's rows of 40 (bf16).
Config q8_config() {
  Config c = mp::testing::small_config();
  c.hidden_size = 64;
  c.head_dim = 16;  // 4 heads: q rows of 64, k and v of 32
  c.intermediate_size = 40;
  c.fma_block_size = 32;
  c.n_ctx_train = 256;
  return c;
}

TEST(Q8Convert, MatricesBecomeQ8AndTheFileReadsBack) {
  TempDir dir;
  const Config c = q8_config();
  auto model = random_model(dir, c, DType::Q8_0, 3);
  ConvertOptions co;
  co.dtype = DType::BF16;
  convert_hf_to_gguf(dir / "hf", dir / "bf16.gguf", co);
  auto bf16 = Model::load(dir / "bf16.gguf");
  EXPECT_LT(std::filesystem::file_size(dir / "model.gguf"),
            std::filesystem::file_size(dir / "bf16.gguf"));
  for (const auto& spec : expected_tensors(c)) {
    const TensorView& t = model->tensor(spec.name, spec.shape);
    const DType want = spec.shape.size() == 1        ? DType::F32
                       : spec.shape.back() % 32 == 0 ? DType::Q8_0
                                                     : DType::BF16;
    EXPECT_EQ(t.dtype, want) << spec.name;
    if (t.dtype != DType::Q8_0) continue;
    // The bytes are the source's weights quantized block by block (the bf16 file's values are
    // the same checkpoint's: within bf16 rounding, so the blocks agree within one step).
    const std::vector<float> got = t.to_f32(), src = bf16->tensor(spec.name, spec.shape).to_f32();
    for (size_t b = 0; b < got.size() / kQ8Block; ++b) {
      float amax = 0;
      for (int j = 0; j < kQ8Block; ++j) amax = std::max(amax, std::fabs(src[b * kQ8Block + j]));
      for (int j = 0; j < kQ8Block; ++j)
        ASSERT_NEAR(got[b * kQ8Block + j], src[b * kQ8Block + j], amax / 127 + amax * 1e-2f)
            << spec.name << " block " << b;
    }
  }
  EXPECT_EQ(model->tensor(tensor_names::layer(0, "ffn_down"), {c.hidden_size, 40}).dtype,
            DType::BF16);
  // A GGUF stored again as Q8_0 (multipole-convert IN.gguf): the bf16 file's weights quantized.
  co.dtype = DType::Q8_0;
  convert_gguf(dir / "bf16.gguf", dir / "again.gguf", co);
  auto again = Model::load(dir / "again.gguf");
  EXPECT_EQ(again->config().summary(), model->config().summary());
  EXPECT_EQ(again->tokenizer().model_bytes(), model->tokenizer().model_bytes());
  for (const auto& spec : expected_tensors(c)) {
    const TensorView& t = again->tensor(spec.name, spec.shape);
    ASSERT_EQ(t.dtype, model->tensor(spec.name, spec.shape).dtype) << spec.name;
    if (t.dtype != DType::Q8_0) continue;
    const std::vector<uint8_t> want = quantize(bf16->tensor(spec.name, spec.shape).to_f32());
    ASSERT_EQ(t.nbytes(), want.size());
    EXPECT_EQ(std::memcmp(t.data, want.data(), want.size()), 0) << spec.name;
  }
  EXPECT_THROW(convert_gguf(dir / "bf16.gguf", dir / "again.gguf", co), Error);  // no --force
}

// The GGUF reader refuses a Q8_0 tensor whose rows are not whole blocks, and a truncated one.
TEST(Q8Convert, ReaderRefusesBadQ8Tensors) {
  TempDir dir;
  random_model(dir, q8_config(), DType::Q8_0, 4);
  std::ifstream in(dir / "model.gguf", std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  // The first Q8_0 tensor's info: name, n_dims, dims (innermost first), type 8.
  const std::string name = tensor_names::token_embd();
  const size_t at = bytes.find(name);
  ASSERT_NE(at, std::string::npos);
  const size_t dims = at + name.size() + 4;
  uint32_t type;
  std::memcpy(&type, bytes.data() + dims + 16, 4);
  ASSERT_EQ(type, 8u);
  std::string bad = bytes;
  const uint64_t row = 48;  // not a multiple of 32
  std::memcpy(bad.data() + dims, &row, 8);
  std::ofstream(dir / "bad.gguf", std::ios::binary) << bad;
  try {
    Model::load(dir / "bad.gguf");
    FAIL() << "rows of 48 Q8_0 weights were accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'" + name + "' has rows of 48"), std::string::npos)
        << e.what();
  }
  std::ofstream(dir / "cut.gguf", std::ios::binary) << bytes.substr(0, bytes.size() - 40);
  try {
    Model::load(dir / "cut.gguf");
    FAIL() << "a truncated file was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("truncated"), std::string::npos) << e.what();
  }
}

// The whole model over Q8_0 weights: equal (fp32 rounding) to the same model with the weights
// dequantized to fp32 and multiplied by the plain loops; close to its bf16 source.
TEST(Q8Model, LogitsEqualTheDequantizedReferenceAndStayCloseToBf16) {
  TempDir dir;
  const Config c = q8_config();
  auto q8 = random_model(dir, c, DType::Q8_0, 5);
  ConvertOptions co;
  co.dtype = DType::BF16;
  convert_hf_to_gguf(dir / "hf", dir / "bf16.gguf", co);
  const auto tokens = random_tokens(300, c.vocab_size, 6);  // past n = 256
  auto fast = make_backend(q8, {.kind = "cpu", .n_slots = 1, .n_threads = 1});
  const auto prefill = logits_in_chunks(*fast, tokens, 50), decode = logits_in_chunks(*fast, tokens, 1);
  EXPECT_LT(rel_err(decode, prefill), 1e-5);
  const cpu::Products was = cpu::active_products();
  cpu::set_products(cpu::Products::Reference);  // matrices built now are dequantized to fp32
  auto ref = make_backend(q8, {.kind = "cpu", .n_slots = 1, .n_threads = 1});
  cpu::set_products(was);
  const auto want = logits_in_chunks(*ref, tokens, 50);
  EXPECT_LT(rel_err(prefill, want), 1e-5);
  EXPECT_LT(rel_err(decode, want), 1e-5);
  auto bf16 = make_backend(Model::load(dir / "bf16.gguf"), {.kind = "cpu", .n_slots = 1, .n_threads = 1});
  const double drift = rel_err(logits_in_chunks(*bf16, tokens, 50), prefill);
  // Q8_0's step is max|w|/127 per block: about 1 % of the logits' size on random weights.
  EXPECT_LT(drift, 3e-2);
  EXPECT_GT(drift, 1e-5);  // the weights did change
}

}  // namespace
