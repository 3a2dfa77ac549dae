// Q8_0 weights: the block format (llama.cpp's), the GGUF reader's checks, multipole-convert
// --dtype q8_0, and a Q8_0 model on the CPU backend against its reference (the weights
// dequantized to fp32, then the plain products) and its bf16 source, on fresh random inputs.
// The products themselves: tests/test_ops_cpu.cpp.
#include <gtest/gtest.h>

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
using namespace mp::testing;

// x quantized block by block, as the bytes of a GGUF Q8_0 tensor.
std::vector<uint8_t> quantize(const std::vector<float>& x) {
  std::vector<uint8_t> out(x.size() / kQ8Block * kQ8BlockBytes);
  for (size_t b = 0; b < x.size() / kQ8Block; ++b)
    quantize_q8_0_block(x.data() + b * kQ8Block, out.data() + b * kQ8BlockBytes);
  return out;
}

TEST(Q8Block, QuantizesAsLlamaCpp) {
  std::mt19937 rng(3);
  for (int trial = 0; trial < 200; ++trial) {
    std::normal_distribution<float> normal(0.0f, trial % 2 ? 0.02f : 3.0f);
    std::vector<float> x(kQ8Block);
    for (float& v : x) v = normal(rng);
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

// A random checkpoint converted to Q8_0 (returned) and to bf16 (dir / "bf16.gguf").
std::shared_ptr<Model> q8_and_bf16(const TempDir& dir, const Config& c, uint64_t seed) {
  auto q8 = random_model(dir, c, DType::Q8_0, seed);
  ConvertOptions co;
  co.dtype = DType::BF16;
  convert_hf_to_gguf(dir / "hf", dir / "bf16.gguf", co);
  return q8;
}

TEST(Q8Convert, MatricesBecomeQ8AndTheFileReadsBack) {
  TempDir dir;
  const Config c = q8_config();
  auto model = q8_and_bf16(dir, c, 3);
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
  ConvertOptions co;
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
  auto q8 = q8_and_bf16(dir, c, 5);
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
