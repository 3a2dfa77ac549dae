// Llama-family checkpoints: their config.json, what is refused and why, linear RoPE scaling, the
// conversion to exact attention and to FMA (avgpool, groupedconv starting as avgpool), and the
// per-sequence state size. The independent end-to-end checks are the crosscheck_llama.* tests.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "fma_cpu.h"
#include "format.h"
#include "model_fixture.h"
#include "ops_cpu.h"

namespace {

using namespace mp;
using namespace mp::testing;

// Llama-2-7b's config.json as Hugging Face publishes it.
nlohmann::json llama2_7b() {
  return nlohmann::json::parse(R"({
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": null, "tie_word_embeddings": false,
    "torch_dtype": "float16", "transformers_version": "4.31.0.dev0", "use_cache": true,
    "vocab_size": 32000})");
}

// Mistral-7B-v0.1's differences, with the sliding window of v0.2 (none).
nlohmann::json mistral_7b() {
  auto j = llama2_7b();
  j.merge_patch(nlohmann::json::parse(R"({
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "intermediate_size": 14336,
    "max_position_embeddings": 32768, "num_key_value_heads": 8, "rope_theta": 1000000.0,
    "rope_scaling": null, "pretraining_tp": null})"));  // null: the key goes
  j["sliding_window"] = nullptr;
  return j;
}

TEST(LlamaConfig, ReadsLlamaAndMistralFieldsAsExactAttention) {
  const Config l = config_from_hf_json(llama2_7b().dump());
  EXPECT_FALSE(l.fma_enabled);
  EXPECT_EQ(l.n_levels(), 0);
  EXPECT_EQ(l.head_dim, 128);
  EXPECT_EQ(l.n_kv_heads, 32);
  EXPECT_EQ(l.n_ctx_train, 4096);
  EXPECT_FALSE(l.tie_word_embeddings);
  EXPECT_EQ(l.rope_theta, 10000.0f);
  EXPECT_EQ(l.rope_linear_factor, 1.0f);
  const Config m = config_from_hf_json(mistral_7b().dump());
  EXPECT_EQ(m.n_kv_heads, 8);
  EXPECT_EQ(m.rope_theta, 1e6f);
  EXPECT_EQ(m.intermediate_size, 14336);
  auto j = llama2_7b();
  for (const char* key : {"type", "rope_type"}) {  // both spellings transformers has used
    j["rope_scaling"] = {{key, "linear"}, {"factor", 4.0}};
    EXPECT_EQ(config_from_hf_json(j.dump()).rope_linear_factor, 4.0f) << key;
  }
  j["rope_scaling"] = {{"rope_type", "default"}};
  EXPECT_EQ(config_from_hf_json(j.dump()).rope_linear_factor, 1.0f);
  j.erase("rope_scaling");  // transformers 5: one object for both
  j["rope_parameters"] = {{"rope_type", "linear"}, {"factor", 8.0}, {"rope_theta", 5e5}};
  const Config t5 = config_from_hf_json(j.dump());
  EXPECT_EQ(t5.rope_linear_factor, 8.0f);
  EXPECT_EQ(t5.rope_theta, 5e5f);
  j["rope_parameters"] = {{"rope_type", "yarn"}, {"factor", 8.0}};
  EXPECT_THROW(config_from_hf_json(j.dump()), Error);
  auto w = mistral_7b();
  w["sliding_window"] = 32768;  // a window as long as the context is full attention
  EXPECT_FALSE(config_from_hf_json(w.dump()).fma_enabled);
}

TEST(LlamaConfig, RefusesWhatTheEngineDoesNotComputeNamingTheField) {
  struct Case {
    const char* field;
    nlohmann::json value;
  };
  const Case cases[] = {
      {"architectures", {"Qwen2ForCausalLM"}},
      {"model_type", "qwen2"},
      {"rope_scaling", {{"type", "dynamic"}, {"factor", 2.0}}},
      {"rope_scaling", {{"rope_type", "yarn"}, {"factor", 4.0}}},
      {"rope_scaling", {{"type", "linear"}, {"factor", 0.0}}},
      {"sliding_window", 4096},
      {"attention_bias", true},
      {"mlp_bias", true},
      {"hidden_act", "gelu"},
      {"eos_token_id", {2, 32000}},
  };
  for (const auto& c : cases) {
    auto j = mistral_7b();
    j[c.field] = c.value;
    try {
      config_from_hf_json(j.dump());
      ADD_FAILURE() << c.field << " " << c.value.dump() << " was accepted";
    } catch (const Error& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find(c.field), std::string::npos) << what;
    }
  }
}

TEST(LlamaConfig, WithFmaChecksItsOptions) {
  const Config l = config_from_hf_json(llama2_7b().dump());
  const Config f = with_fma(l, {Downsampling::GroupedConv, 64, 4, 0});
  EXPECT_TRUE(f.fma_enabled);
  EXPECT_EQ(f.n_levels(), 5);  // n = 4096, m = 64
  EXPECT_EQ(with_fma(l, {Downsampling::AvgPool, 64, 4, 1 << 20}).n_levels(), 13);
  for (const FmaConversion& bad :
       {FmaConversion{Downsampling::AvgPool, 64, 3, 0}, FmaConversion{Downsampling::AvgPool, 48, 4, 0},
        FmaConversion{Downsampling::AvgPool, 64, 4, 192}, FmaConversion{Downsampling::Conv, 64, 4, 0}})
    EXPECT_THROW(with_fma(l, bad), Error);
  EXPECT_THROW(with_fma(f, {}), Error);  // already FMA
}

TEST(LlamaConfig, GgufFilesWithoutRopeScalingKeysLoadUnscaledAndScaledOnesRoundTrip) {
  Config c = mp::testing::small_config();
  c.rope_linear_factor = 2.5f;
  TempDir dir;
  auto read_back = [&](const std::map<std::string, gguf::Value>& kv) {
    gguf::write(dir / "c.gguf", kv, {});
    std::ifstream f(dir / "c.gguf", std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(f)), {});
    return config_from_gguf(gguf::parse(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()));
  };
  auto kv = config_to_gguf(c);
  EXPECT_EQ(read_back(kv).rope_linear_factor, 2.5f);
  kv.erase("fma.rope.scaling.type");  // a file written before rope scaling existed
  kv.erase("fma.rope.scaling.factor");
  EXPECT_EQ(read_back(kv).rope_linear_factor, 1.0f);
  kv["fma.rope.scaling.type"] = gguf::Value::str("yarn");
  EXPECT_THROW(read_back(kv), Error);
}

TEST(LlamaRope, LinearScalingDividesThePosition) {
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  std::vector<float> x(5 * 3 * 16);
  for (auto& v : x) v = nd(rng);
  auto scaled = x, plain = x;
  cpu::rope(scaled.data(), 5, 3, 16, 40, 10000.0f, 4.0f);  // positions 40..44 -> 10..11
  for (int t = 0; t < 5; ++t)  // (40 + t) / 4 for each row on its own
    cpu::rope(plain.data() + t * 3 * 16, 1, 3, 16, 1, 10000.0f, 4.0f / (40.0f + t));
  EXPECT_LT(rel_err(scaled, plain), 1e-5);
  auto whole = x;
  cpu::rope(whole.data(), 1, 3, 16, 10, 10000.0f, 1.0f);
  auto quarter = x;
  cpu::rope(quarter.data(), 1, 3, 16, 40, 10000.0f, 4.0f);
  EXPECT_EQ(whole, quarter);
  EXPECT_GT(rel_err(quarter, x), 0.1);
}

// The same random weights as a Llama folder and as one of ours.
std::shared_ptr<Model> convert(const TempDir& dir, const std::string& name, const Config& c,
                               const std::string& arch, std::optional<FmaConversion> fma = {},
                               std::vector<std::string> extra = {}) {
  mp::testing::CheckpointOptions o;
  o.seed = 11;
  o.architecture = arch;
  o.extra_tensors = std::move(extra);
  mp::testing::write_random_checkpoint(dir / name, c, o);
  ConvertOptions co;
  co.dtype = DType::F32;
  co.fma = fma;
  convert_hf_to_gguf(dir / name, dir / (name + ".gguf"), co);
  return Model::load(dir / (name + ".gguf"));
}

Config small_llama() {
  Config c = mp::testing::small_config();
  c.fma_enabled = false;
  c.rope_linear_factor = 2.0f;
  return c;
}

TEST(LlamaConvert, ExactLlamaAndMistralEqualOurExactModelOfTheSameWeights) {
  TempDir dir;
  const Config c = small_llama();
  auto ours = convert(dir, "ours", c, "FmaForCausalLM");
  const auto tokens = random_tokens(3 * 64 + 5, c.vocab_size, 4);
  auto ref_b = make_backend(ours, {.kind = "cpu", .n_slots = 1, .n_threads = 2});
  const auto ref = logits_in_chunks(*ref_b, tokens, 37);
  for (const char* arch : {"LlamaForCausalLM", "MistralForCausalLM"}) {
    auto m = convert(dir, arch, c, arch, {}, {"model.layers.0.self_attn.rotary_emb.inv_freq"});
    EXPECT_FALSE(m->config().fma_enabled);
    EXPECT_EQ(m->config().rope_linear_factor, 2.0f);
    auto b = make_backend(m, {.kind = "cpu", .n_slots = 1, .n_threads = 2});
    EXPECT_EQ(logits_in_chunks(*b, tokens, 37), ref) << arch;
  }
}

TEST(LlamaConvert, FmaAvgpoolEqualsOurAvgpoolModelAndGroupedconvStartsAsAvgpool) {
  TempDir dir;
  const Config c = small_llama();
  Config fma = c;
  fma.fma_enabled = true;
  fma.fma_downsampling = Downsampling::AvgPool;
  auto ours = convert(dir, "ours", fma, "FmaForCausalLM");
  const auto tokens = random_tokens(3 * 64 + 5, c.vocab_size, 5);
  auto ref_b = make_backend(ours, {.kind = "cpu", .n_slots = 1, .n_threads = 2});
  const auto ref = logits_in_chunks(*ref_b, tokens, 200);
  auto exact = convert(dir, "exact", c, "LlamaForCausalLM");
  auto exact_b = make_backend(exact, {.kind = "cpu", .n_slots = 1, .n_threads = 2});
  EXPECT_GT(rel_err(logits_in_chunks(*exact_b, tokens, 200), ref), 1e-3);  // FMA changes them
  for (Downsampling ds : {Downsampling::AvgPool, Downsampling::GroupedConv}) {
    auto m = convert(dir, std::string(to_string(ds)), c, "LlamaForCausalLM",
                     FmaConversion{ds, fma.fma_block_size, fma.fma_rank, fma.n_ctx_train});
    EXPECT_EQ(m->config().fma_downsampling, ds);
    EXPECT_EQ(m->config().n_levels(), 2);
    auto b = make_backend(m, {.kind = "cpu", .n_slots = 1, .n_threads = 2});
    for (int chunk : {200, 7, 1})
      EXPECT_LT(rel_err(logits_in_chunks(*b, tokens, chunk), ref), 1e-5) << to_string(ds) << chunk;
  }
}

TEST(LlamaConvert, AvgpoolAsGroupedconvAveragesEachRanksSpan) {
  Config c = mp::testing::small_config();  // m = 8, p = 2, d = 8
  const auto w = avgpool_as_groupedconv(c, 2);  // w = 16: spans of 8
  ASSERT_EQ(w.size(), size_t(2 * 8 * 16));
  for (int ch = 0; ch < 8; ++ch)
    for (int r = 0; r < 2; ++r)
      for (int t = 0; t < 16; ++t)
        EXPECT_EQ(w[(ch * 2 + r) * 16 + t], t / 8 == r ? 0.125f : 0.0f);
}

TEST(LlamaConvert, RefusesBiasesStrayTensorsOtherTokenizersAndFmaTwice) {
  TempDir dir;
  const Config c = small_llama();
  auto message = [&](auto&& f) {
    try {
      f();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("(accepted)");
  };
  const auto bias = message([&] {
    convert(dir, "bias", c, "LlamaForCausalLM", {}, {"model.layers.1.self_attn.o_proj.bias"});
  });
  EXPECT_NE(bias.find("'model.layers.1.self_attn.o_proj.bias' is a bias"), std::string::npos)
      << bias;
  const auto stray = message(
      [&] { convert(dir, "stray", c, "LlamaForCausalLM", {}, {"model.layers.0.extra.weight"}); });
  EXPECT_NE(stray.find("'model.layers.0.extra.weight'"), std::string::npos) << stray;
  // A folder with tokenizer.json only (a tokenizers-library tokenizer).
  mp::testing::CheckpointOptions o;
  o.architecture = "LlamaForCausalLM";
  mp::testing::write_random_checkpoint(dir / "tok", c, o);
  std::filesystem::rename(dir / "tok/tokenizer.model", dir / "tok/tokenizer.json");
  const auto tok = message([&] { convert_hf_to_gguf(dir / "tok", dir / "tok.gguf", {}); });
  EXPECT_NE(tok.find("tokenizer.json"), std::string::npos) << tok;
  EXPECT_NE(tok.find("SentencePiece"), std::string::npos) << tok;
  EXPECT_FALSE(std::filesystem::exists(dir / "tok.gguf"));
  const auto twice = message([&] {
    convert(dir, "twice", mp::testing::small_config(), "FmaForCausalLM", FmaConversion{});
  });
  EXPECT_NE(twice.find("--fma"), std::string::npos) << twice;
  const auto bad = message([&] {
    convert(dir, "bad", c, "LlamaForCausalLM", FmaConversion{Downsampling::AvgPool, 48, 4, 0});
  });
  EXPECT_NE(bad.find("--block-size 48"), std::string::npos) << bad;
}

TEST(LlamaState, SlotBytesFollowTheCacheLayoutExactAndFma) {
  TempDir dir;
  const Config c = small_llama();
  auto exact = convert(dir, "exact", c, "LlamaForCausalLM");
  auto fma = convert(dir, "fma", c, "LlamaForCausalLM", FmaConversion{Downsampling::AvgPool, 8, 2, 64});
  for (const auto& m : {exact, fma}) {
    auto b = make_backend(m, {.kind = "cpu", .n_slots = 1, .n_threads = 2});
    const int s = b->alloc_slot();
    const auto tokens = random_tokens(150, c.vocab_size, 6);
    for (int n : {50, 100}) {
      SeqChunk ch{s, std::span<const int>(tokens).subspan(n == 50 ? 0 : 50, 50), false};
      b->forward({&ch, 1});
      EXPECT_EQ(b->slot_bytes(s), cpu_state_bytes(m->config(), n));
    }
  }
  // TinyLlama-1.1B's FMA cache as make_seq_cache lays it out.
  auto j = llama2_7b();
  j.merge_patch(nlohmann::json::parse(R"({"hidden_size": 2048, "intermediate_size": 5632,
    "max_position_embeddings": 2048, "num_hidden_layers": 22, "num_key_value_heads": 4})"));
  const Config tiny = config_from_hf_json(j.dump());
  const Config f = with_fma(tiny, {Downsampling::AvgPool, 64, 4, 0});
  EXPECT_EQ(cpu::seq_cache_bytes(f, cpu::make_seq_cache(f)), cpu_state_bytes(f, 1 << 20));
  EXPECT_EQ(cpu_state_bytes(tiny, 4096), size_t(22) * 2 * 4096 * 4 * 64 * 4);
}

}  // namespace
