// Conversion and the GGUF reader: round trip, and refusal of bad files with a clear message.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "gguf.h"
#include "model_fixture.h"
#include "numeric.h"

namespace {

using namespace mp;
using mp::testing::TempDir;
using mp::testing::VariantModel;
namespace fs = std::filesystem;

std::string read_all(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}
void write_all(const std::string& p, const std::string& s) {
  std::ofstream(p, std::ios::binary) << s;
}

// The checkpoint's tensors, read back with a minimal safetensors parser written here.
std::map<std::string, std::vector<float>> read_safetensors(const std::string& path) {
  const std::string raw = read_all(path);
  uint64_t hlen;
  std::memcpy(&hlen, raw.data(), 8);
  auto h = nlohmann::json::parse(raw.substr(8, hlen));
  std::map<std::string, std::vector<float>> out;
  for (auto& [name, info] : h.items()) {
    if (name == "__metadata__") continue;
    const auto off = info["data_offsets"].get<std::vector<size_t>>();
    std::vector<float> v((off[1] - off[0]) / 4);
    std::memcpy(v.data(), raw.data() + 8 + hlen + off[0], off[1] - off[0]);
    out[name] = v;
  }
  return out;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

class RoundTrip : public ::testing::TestWithParam<DType> {};

TEST_P(RoundTrip, EveryTensorSurvivesConversion) {
  const VariantModel vm({.ds = Downsampling::Conv, .dtype = GetParam()});
  const Config& c = vm.config;
  const auto src = read_safetensors(vm.dir / "hf/model.safetensors");
  const auto specs = expected_tensors(c);
  ASSERT_EQ(vm.model->tensors().size(), specs.size());
  for (const auto& spec : specs) {
    const auto got = vm.model->tensor(spec.name, spec.shape).to_f32();
    const auto& want = src.at(spec.hf_name);
    ASSERT_EQ(got.size(), want.size()) << spec.name;
    const bool exact = GetParam() == DType::F32 || spec.shape.size() == 1;
    for (size_t i = 0; i < got.size(); ++i) {
      const float expect = exact                       ? want[i]
                           : GetParam() == DType::BF16 ? bf16_to_f32(f32_to_bf16(want[i]))
                                                       : f16_to_f32(f32_to_f16(want[i]));
      ASSERT_EQ(got[i], expect) << spec.name << "[" << i << "]";
    }
  }
  EXPECT_EQ(vm.model->config().fma_downsampling, Downsampling::Conv);
  EXPECT_EQ(vm.model->config().n_levels(), 2);
  EXPECT_EQ(vm.model->tokenizer().vocab_size(), 400);
}

INSTANTIATE_TEST_SUITE_P(DTypes, RoundTrip, ::testing::Values(DType::F32, DType::F16, DType::BF16),
                         [](const auto& info) { return std::string(to_string(info.param)); });

TEST(Convert, ShardedCheckpointGivesTheSameFile) {
  TempDir dir;
  const Config c = mp::testing::small_config();
  mp::testing::CheckpointOptions o;
  o.seed = 9;
  mp::testing::write_random_checkpoint(dir / "one", c, o);
  o.shards = 3;
  mp::testing::write_random_checkpoint(dir / "three", c, o);
  ConvertOptions co;
  convert_hf_to_gguf(dir / "one", dir / "a.gguf", co);
  convert_hf_to_gguf(dir / "three", dir / "b.gguf", co);
  // Only general.name (the folder name) differs.
  auto a = Model::load(dir / "a.gguf"), b = Model::load(dir / "b.gguf");
  for (const auto& spec : expected_tensors(c))
    EXPECT_EQ(a->tensor(spec.name, spec.shape).to_f32(), b->tensor(spec.name, spec.shape).to_f32());
}

// The lines of /proc/self/maps that map `path`.
int mappings_of(const fs::path& path) {
  std::ifstream maps("/proc/self/maps");
  int n = 0;
  for (std::string line; std::getline(maps, line);)
    n += line.find(path.string()) != std::string::npos;
  return n;
}

TEST(Convert, RefusesBadCheckpointsNamingTheProblem) {
  TempDir dir;
  const Config c = mp::testing::small_config();
  mp::testing::write_random_checkpoint(dir / "hf", c, {});
  ConvertOptions co;
  convert_hf_to_gguf(dir / "hf", dir / "m.gguf", co);
  EXPECT_NE(error_of([&] { convert_hf_to_gguf(dir / "hf", dir / "m.gguf", co); }).find("--force"),
            std::string::npos);

  // A config that disagrees with the tensors.
  Config wrong = c;
  wrong.intermediate_size = 50;
  write_all(dir / "hf/config.json", mp::testing::config_json(wrong));
  co.overwrite = true;
  const std::string e1 = error_of([&] { convert_hf_to_gguf(dir / "hf", dir / "m2.gguf", co); });
  EXPECT_NE(e1.find("model.layers.0.mlp.gate_proj.weight"), std::string::npos) << e1;
  EXPECT_NE(e1.find("[50, 32]"), std::string::npos) << e1;
  EXPECT_FALSE(fs::exists(dir / "m2.gguf"));

  // A config that asks for a tensor the checkpoint lacks.
  Config untied = c;
  untied.tie_word_embeddings = false;
  Config tied = c;
  tied.tie_word_embeddings = true;
  mp::testing::write_random_checkpoint(dir / "tied", tied, {});
  write_all(dir / "tied/config.json", mp::testing::config_json(untied));
  const std::string e2 = error_of([&] { convert_hf_to_gguf(dir / "tied", dir / "m3.gguf", co); });
  EXPECT_NE(e2.find("lm_head.weight"), std::string::npos) << e2;
  EXPECT_NE(e2.find("missing"), std::string::npos) << e2;

  // Truncated safetensors.
  write_all(dir / "hf/config.json", mp::testing::config_json(c));
  const std::string st = read_all(dir / "hf/model.safetensors");
  write_all(dir / "hf/model.safetensors", st.substr(0, st.size() - 100));
  const std::string e3 = error_of([&] { convert_hf_to_gguf(dir / "hf", dir / "m4.gguf", co); });
  EXPECT_NE(e3.find("truncated"), std::string::npos) << e3;
  // The reader threw after mapping the file: the mapping is gone with it (it was leaked, and a
  // long fuzz run of the converter ran out of mappings).
  EXPECT_EQ(mappings_of(dir / "hf/model.safetensors"), 0);

  // A shape whose element count overflows (2^64, claimed in 0 bytes) is refused before its
  // product is formed.
  const std::string header =
      R"({"model.embed_tokens.weight":{"dtype":"F32","shape":[4294967296,4294967296],)"
      R"("data_offsets":[0,0]}})";
  std::string huge(8, '\0');
  const uint64_t hlen = header.size();
  std::memcpy(huge.data(), &hlen, 8);
  write_all(dir / "hf/model.safetensors", huge + header + std::string(16, '\0'));
  const std::string e4 = error_of([&] { convert_hf_to_gguf(dir / "hf", dir / "m6.gguf", co); });
  EXPECT_NE(e4.find("more elements than the file has bytes"), std::string::npos) << e4;

  // Bad JSON.
  write_all(dir / "hf/config.json", "{\"vocab_size\": 400,");
  EXPECT_NE(
      error_of([&] { convert_hf_to_gguf(dir / "hf", dir / "m5.gguf", co); }).find("config.json"),
      std::string::npos);
}

TEST(Convert, RotarySummariesAreRecordedAndOldFilesKeepPerChannelSummaries) {
  const VariantModel vm({.rotary = true});
  const Config& c = vm.config;
  EXPECT_TRUE(vm.model->config().fma_rotary_summaries);
  // Key summaries: one complex weight per RoPE pair and tap, no bias; values as before.
  const int64_t d = c.head_dim, p = c.fma_rank, w = c.group_size(1);
  EXPECT_NO_THROW(vm.model->tensor(tensor_names::fma_down(0, 'k', 1, false), {d / 2 * p, 2, w}));
  EXPECT_NO_THROW(vm.model->tensor(tensor_names::fma_down(0, 'v', 1, false), {d * p, 1, w}));
  EXPECT_NO_THROW(vm.model->tensor(tensor_names::fma_down(0, 'v', 1, true), {d * p}));
  EXPECT_NE(error_of([&] { vm.model->tensor(tensor_names::fma_down(0, 'k', 1, true), {d * p}); }),
            "(no error)");

  // A per-channel checkpoint whose config.json asks for rotary summaries: the key weight's shape
  // is named.
  Config per_channel = mp::testing::small_config();
  mp::testing::write_random_checkpoint(vm.dir / "pc", per_channel, {});
  write_all(vm.dir / "pc/config.json", mp::testing::config_json(c));
  const std::string e =
      error_of([&] { convert_hf_to_gguf(vm.dir / "pc", vm.dir / "pc.gguf", {}); });
  EXPECT_NE(e.find("fma.k_down.0"), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(vm.dir / "pc.gguf"));

  // A file written before the option (the fuzz seed) has no fma.rotary_summaries key: off.
  auto old = Model::load(mp::testing::test_data_dir() + "/../fuzz/corpus/gguf/fma.gguf");
  EXPECT_TRUE(old->config().fma_enabled);
  EXPECT_FALSE(old->config().fma_rotary_summaries);
}

// general.sampling.*: from generation_config.json, kept by a GGUF-to-GGUF conversion, replaced
// field by field by ConvertOptions::sampling; refused with the key named when out of range.
TEST(Convert, RecommendedSamplingIsTakenKeptReplacedAndChecked) {
  TempDir dir;
  mp::testing::write_random_checkpoint(dir / "hf", mp::testing::small_config(), {});
  ConvertOptions co;
  convert_hf_to_gguf(dir / "hf", dir / "plain.gguf", co);
  EXPECT_EQ(Model::load(dir / "plain.gguf")->recommended_sampling().describe(), "none");

  write_all(dir / "hf/generation_config.json",
            R"({"temperature": 0.7, "top_k": 20, "top_p": 0.9, "repetition_penalty": 1.05,
                "do_sample": true, "max_length": 4096})");
  convert_hf_to_gguf(dir / "hf", dir / "a.gguf", co);
  const SamplingRecommendation a = Model::load(dir / "a.gguf")->recommended_sampling();
  EXPECT_EQ(a.temperature, 0.7f);
  EXPECT_EQ(a.top_k, 20);
  EXPECT_EQ(a.top_p, 0.9f);
  EXPECT_EQ(a.repetition_penalty, 1.05f);
  EXPECT_FALSE(a.min_p.has_value());
  EXPECT_FALSE(a.penalty_last_n.has_value());
  const SamplingParams p = a.over(SamplingParams{});
  EXPECT_EQ(p.temperature, 0.7f);
  EXPECT_EQ(p.min_p, SamplingParams{}.min_p);  // not recommended: the default stays

  co.sampling.top_k = 0;
  co.sampling.penalty_last_n = -1;
  convert_gguf(dir / "a.gguf", dir / "b.gguf", co);
  const SamplingRecommendation b = Model::load(dir / "b.gguf")->recommended_sampling();
  EXPECT_EQ(b.top_k, 0);
  EXPECT_EQ(b.penalty_last_n, -1);
  EXPECT_EQ(b.temperature, 0.7f);  // kept from the source
  EXPECT_EQ(b.describe(),
            "temp 0.7, top_k 0, top_p 0.9, penalty_repeat 1.05, penalty_last_n -1");

  // Out of range, from the folder or the options: nothing is written.
  write_all(dir / "hf/generation_config.json", R"({"top_p": 1.5})");
  std::string e = error_of([&] { convert_hf_to_gguf(dir / "hf", dir / "c.gguf", {}); });
  EXPECT_NE(e.find("top_p"), std::string::npos) << e;
  write_all(dir / "hf/generation_config.json", R"({"temperature": "hot"})");
  e = error_of([&] { convert_hf_to_gguf(dir / "hf", dir / "c.gguf", {}); });
  EXPECT_NE(e.find("generation_config.json: 'temperature'"), std::string::npos) << e;
  ConvertOptions bad;
  bad.sampling.repetition_penalty = 0;
  e = error_of([&] { convert_gguf(dir / "a.gguf", dir / "c.gguf", bad); });
  EXPECT_NE(e.find("repetition_penalty must be > 0"), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(dir / "c.gguf"));

  // A file whose general.sampling.top_p is 2 (its f32 patched): refused at load, key named.
  std::string raw = read_all(dir / "b.gguf");
  const std::string key = "general.sampling.top_p";
  const size_t at = raw.find(key);
  ASSERT_NE(at, std::string::npos);
  uint32_t type;
  std::memcpy(&type, raw.data() + at + key.size(), 4);
  ASSERT_EQ(type, 6u);  // F32
  const float two = 2;
  std::memcpy(raw.data() + at + key.size() + 4, &two, 4);
  write_all(dir / "bad.gguf", raw);
  e = error_of([&] { Model::load(dir / "bad.gguf"); });
  EXPECT_NE(e.find("general.sampling"), std::string::npos) << e;
  EXPECT_NE(e.find("top_p must be in (0, 1]"), std::string::npos) << e;
}

TEST(Convert, PerLevelRanksAreRecordedAndCheckedNamingTheField) {
  const VariantModel vm({.ranks = {1, 4}});  // L = 2
  const Config& c = vm.config;
  EXPECT_EQ(vm.model->config().fma_level_ranks, (std::vector<int>{1, 4}));
  EXPECT_EQ(vm.model->config().rank(1), 1);
  EXPECT_EQ(vm.model->config().rank(2), 4);
  const int64_t d = c.head_dim;
  EXPECT_NO_THROW(vm.model->tensor(tensor_names::fma_down(1, 'v', 1, false), {d * 1, 1, 8}));
  EXPECT_NO_THROW(vm.model->tensor(tensor_names::fma_down(1, 'k', 2, true), {d * 4}));
  // Without the key (every file before it): fma_rank at every level.
  EXPECT_EQ(Model::load(mp::testing::test_data_dir() + "/../fuzz/corpus/gguf/fma.gguf")
                ->config()
                .fma_level_ranks.size(),
            0u);

  auto refused = [&](std::vector<int> ranks, int rank) {
    Config bad = c;
    bad.fma_level_ranks = std::move(ranks);
    bad.fma_rank = rank;
    return error_of([&] { bad.validate(); });
  };
  EXPECT_NE(refused({1, 4, 4}, 4).find("fma_ranks must give one rank per coarse level (2)"),
            std::string::npos);
  EXPECT_NE(refused({1, 2}, 4).find("fma_rank must be the largest of fma_ranks"),
            std::string::npos);
  EXPECT_NE(refused({0, 4}, 4).find("fma_ranks must be positive"), std::string::npos);
  // config.json: fma_rank follows from fma_ranks; a wrong count is named.
  write_all(vm.dir / "hf/config.json", nlohmann::json::parse(mp::testing::config_json(c)).dump());
  EXPECT_EQ(config_from_hf_json(read_all(vm.dir / "hf/config.json")).fma_rank, 4);
  auto j = nlohmann::json::parse(mp::testing::config_json(c));
  j["fma_ranks"] = {2, 2, 2};
  EXPECT_NE(error_of([&] { config_from_hf_json(j.dump()); }).find("fma_ranks"), std::string::npos);
}

TEST(GgufReader, RefusesTruncatedFilesAtEveryCut) {
  TempDir dir;
  mp::testing::random_model(dir, mp::testing::small_config());
  const std::string good = read_all(dir / "model.gguf");
  for (size_t cut : {size_t(0), size_t(3), size_t(20), size_t(100), size_t(1000), good.size() / 2,
                     good.size() - 1}) {
    write_all(dir / "cut.gguf", good.substr(0, cut));
    const std::string e = error_of([&] { Model::load(dir / "cut.gguf"); });
    EXPECT_TRUE(e.find("truncated") != std::string::npos ||
                e.find("too short") != std::string::npos)
        << "cut at " << cut << ": " << e;
  }
}

TEST(GgufReader, RefusesCorruptHeaders) {
  TempDir dir;
  mp::testing::random_model(dir, mp::testing::small_config());
  const std::string good = read_all(dir / "model.gguf");
  auto with = [&](size_t at, const std::string& bytes) {
    std::string s = good;
    s.replace(at, bytes.size(), bytes);
    write_all(dir / "bad.gguf", s);
    return error_of([&] { Model::load(dir / "bad.gguf"); });
  };
  EXPECT_NE(with(0, "GGML").find("bad magic"), std::string::npos);
  EXPECT_NE(with(4, std::string("\x02\0\0\0", 4)).find("version 2"), std::string::npos);
  EXPECT_NE(with(8, std::string("\xff\xff\xff\xff\xff\xff\0\0", 8)).find("implausible"),
            std::string::npos);
  // A first key whose length runs past the end of the file.
  EXPECT_NE(with(24, std::string("\xff\xff\xff\xff\0\0\0\0", 8)).find("past the end"),
            std::string::npos);
  // Flip every byte of the header in turn: always an Error or a valid load, never a crash.
  const size_t header = 4096;
  for (size_t i = 0; i < std::min(header, good.size()); i += 7) {
    std::string s = good;
    s[i] = static_cast<char>(s[i] ^ 0x5a);
    write_all(dir / "flip.gguf", s);
    try {
      Model::load(dir / "flip.gguf");
    } catch (const Error&) {
    }
  }
}

// A tensor offset so large that data_offset + offset wraps around to the file's first bytes (the
// fuzzer's finding: with general.alignment 2^31 the data section starts past the end, and an
// offset of 2^64 - 2^31 pointed the tensor at the header) is refused, not read.
TEST(GgufReader, RefusesTensorOffsetsThatWrapAround) {
  std::string b = "GGUF";
  auto put = [&](auto v) { b.append(reinterpret_cast<const char*>(&v), sizeof v); };
  auto str = [&](const std::string& x) { put(uint64_t(x.size())), b += x; };
  put(uint32_t{3}), put(uint64_t{1}), put(uint64_t{1});  // version, tensors, metadata keys
  str("general.alignment"), put(uint32_t{4}), put(uint32_t{1u << 31});  // a u32 value
  str("t"), put(uint32_t{1}), put(uint64_t{1}), put(uint32_t{0});      // one F32 element
  put(uint64_t(0) - (uint64_t{1} << 31));                                // its offset
  b.resize(b.size() + 64, '\0');
  const std::string e = error_of(
      [&] { gguf::parse(reinterpret_cast<const uint8_t*>(b.data()), b.size()); });
  EXPECT_NE(e.find("runs past the end"), std::string::npos) << e;
}

// A corrupt layer count is refused before a name is made for each of its layers' tensors (the
// fuzzer's finding: 2^20 layers took gigabytes), and so are group sizes past an int.
TEST(GgufReader, RefusesImplausibleLayerCountsAndContextLengths) {
  TempDir dir;
  const Config c = mp::testing::small_config();
  mp::testing::random_model(dir, c);
  std::string s = read_all(dir / "model.gguf");
  const std::string key = ".block_count";
  const size_t at = s.find(key);
  ASSERT_NE(at, std::string::npos);
  const uint32_t layers = 1u << 20;  // after the key: its type (u32), then its value
  std::memcpy(&s[at + key.size() + 4], &layers, sizeof layers);
  write_all(dir / "layers.gguf", s);
  const std::string e = error_of([&] { Model::load(dir / "layers.gguf"); });
  EXPECT_NE(e.find("num_hidden_layers must be in 1..512"), std::string::npos) << e;

  Config most = c;
  most.n_layers = Config::kMaxLayers;
  EXPECT_NO_THROW(most.validate());
  Config longest = c;
  longest.n_ctx_train = int64_t{c.fma_block_size} << 40;
  EXPECT_NE(error_of([&] { longest.validate(); }).find("coarsest group"), std::string::npos);
  longest.n_ctx_train = int64_t{1} << 32;  // n / 4 = 2^30
  longest.fma_block_size = 1 << 20;
  EXPECT_NO_THROW(longest.validate());
}

TEST(GgufReader, MismatchedTensorShapeIsNamed) {
  const VariantModel vm;
  const std::string e = error_of([&] { vm.model->tensor("blk.0.attn_q.weight", {7, 7}); });
  EXPECT_NE(e.find("blk.0.attn_q.weight"), std::string::npos) << e;
  EXPECT_NE(e.find("[32, 32]"), std::string::npos) << e;
  EXPECT_NE(e.find("[7, 7]"), std::string::npos) << e;
}

}  // namespace
