#include "checkpoint.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "../../engine/src/numeric.h"

namespace mp::testing {
namespace fs = std::filesystem;

std::string fixture_tokenizer_path() { return test_data_dir() + "/tiny-spm.model"; }

std::string test_data_dir() {
  // Overridable where the tests run from another checkout (the GPU machine).
  const char* env = std::getenv("MULTIPOLE_TEST_DATA");
  return env ? env : MULTIPOLE_TEST_DATA;
}

Config small_config() {
  Config c;
  c.vocab_size = 400;
  c.hidden_size = 32;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 8;
  c.intermediate_size = 48;
  c.rms_norm_eps = 1e-5f;
  c.rope_theta = 10000.0f;
  c.n_ctx_train = 64;
  c.fma_block_size = 8;
  c.fma_rank = 2;
  return c;
}

std::string config_json(const Config& c, const std::string& architecture) {
  const bool fma = architecture == "FmaForCausalLM";
  if (!fma && c.fma_enabled) throw Error(architecture + " checkpoints have no FMA");
  nlohmann::json j = {
      {"architectures", {architecture}},
      {"model_type", fma ? "fma" : architecture == "MistralForCausalLM" ? "mistral" : "llama"},
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.hidden_size},
      {"num_hidden_layers", c.n_layers},
      {"num_attention_heads", c.n_heads},
      {"num_key_value_heads", c.n_kv_heads},
      {"head_dim", c.head_dim},
      {"intermediate_size", c.intermediate_size},
      {"rms_norm_eps", c.rms_norm_eps},
      {"rope_theta", c.rope_theta},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"max_position_embeddings", c.n_ctx_train},
      {"fma_enabled", c.fma_enabled},
      {"fma_block_size", c.fma_block_size},
      {"fma_rank", c.fma_rank},
      {"fma_ranks", c.fma_level_ranks.empty() ? nlohmann::json() : nlohmann::json(c.fma_level_ranks)},
      {"fma_downsampling", std::string(to_string(c.fma_downsampling))},
      {"fma_scale_attn", c.fma_scale_attn},
      {"fma_rotary_summaries", c.fma_rotary_summaries},
      {"bos_token_id", c.bos_token_id},
      {"eos_token_id", c.eos_token_id},
      {"rope_scaling", c.rope_linear_factor == 1.0f
                           ? nlohmann::json()
                           : nlohmann::json{{"type", "linear"}, {"factor", c.rope_linear_factor}}},
  };
  if (!fma) {  // what transformers writes for these models, FMA keys aside
    for (const char* k : {"fma_enabled", "fma_block_size", "fma_rank", "fma_downsampling",
                          "fma_scale_attn", "fma_rotary_summaries", "fma_ranks"})
      j.erase(k);
    j["hidden_act"] = "silu";
    j["attention_bias"] = false;
    j["torch_dtype"] = "float32";
    if (architecture == "MistralForCausalLM") j["sliding_window"] = nullptr;
  }
  return j.dump(2);
}

namespace {
struct Blob {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> values;
};

void write_safetensors(const fs::path& path, const std::vector<const Blob*>& blobs, DType dt) {
  nlohmann::json h = nlohmann::json::object();
  h["__metadata__"] = {{"format", "pt"}};
  uint64_t off = 0;
  for (const Blob* b : blobs) {
    const uint64_t n = dtype_bytes(dt, int64_t(b->values.size()));
    h[b->name] = {{"dtype", dt == DType::F32   ? "F32"
                            : dt == DType::F16 ? "F16"
                                               : "BF16"},
                  {"shape", b->shape},
                  {"data_offsets", {off, off + n}}};
    off += n;
  }
  std::string header = h.dump();
  while (header.size() % 8) header += ' ';
  std::ofstream f(path, std::ios::binary);
  const uint64_t hlen = header.size();
  f.write(reinterpret_cast<const char*>(&hlen), 8);
  f.write(header.data(), header.size());
  for (const Blob* b : blobs)
    for (float x : b->values) {
      if (dt == DType::F32) {
        f.write(reinterpret_cast<const char*>(&x), 4);
      } else {
        const uint16_t v = dt == DType::F16 ? f32_to_f16(x) : f32_to_bf16(x);
        f.write(reinterpret_cast<const char*>(&v), 2);
      }
    }
}
}  // namespace

void write_random_checkpoint(const std::string& dir, const Config& c, const CheckpointOptions& o) {
  fs::create_directories(dir);
  std::mt19937_64 rng(o.seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<Blob> blobs;
  for (const auto& spec : expected_tensors(c)) {
    Blob b{spec.hf_name, spec.shape, {}};
    int64_t n = 1;
    for (auto d : spec.shape) n *= d;
    b.values.resize(n);
    const bool norm = spec.hf_name.find("norm") != std::string::npos;
    const bool bias = spec.hf_name.ends_with(".bias");
    // Fan-in scaling keeps activations of order one through the layers.
    const int64_t fan_in = spec.shape.size() == 3   ? spec.shape[1] * spec.shape[2]
                           : spec.shape.size() == 2 ? spec.shape[1]
                                                    : 1;
    const float scale = spec.hf_name.find("embed") != std::string::npos ? 1.0f
                        : norm                                          ? 0.2f
                        : bias                                          ? 0.1f
                               : 1.0f / std::sqrt(static_cast<float>(fan_in));
    for (auto& x : b.values) x = (norm ? 1.0f : 0.0f) + scale * normal(rng);
    blobs.push_back(std::move(b));
  }
  for (const auto& name : o.extra_tensors) {
    Blob b{name, {c.hidden_size}, std::vector<float>(c.hidden_size)};
    for (auto& x : b.values) x = normal(rng);
    blobs.push_back(std::move(b));
  }
  if (o.shards <= 1) {
    std::vector<const Blob*> all;
    for (const auto& b : blobs) all.push_back(&b);
    write_safetensors(fs::path(dir) / "model.safetensors", all, o.dtype);
  } else {
    nlohmann::json index = {{"metadata", nlohmann::json::object()},
                            {"weight_map", nlohmann::json::object()}};
    for (int s = 0; s < o.shards; ++s) {
      char name[64];
      std::snprintf(name, sizeof name, "model-%05d-of-%05d.safetensors", s + 1, o.shards);
      std::vector<const Blob*> part;
      for (size_t i = s; i < blobs.size(); i += o.shards) {
        part.push_back(&blobs[i]);
        index["weight_map"][blobs[i].name] = name;
      }
      write_safetensors(fs::path(dir) / name, part, o.dtype);
    }
    std::ofstream(fs::path(dir) / "model.safetensors.index.json") << index.dump(2);
  }
  std::ofstream(fs::path(dir) / "config.json") << config_json(c, o.architecture);
  fs::copy_file(fixture_tokenizer_path(), fs::path(dir) / "tokenizer.model",
                fs::copy_options::overwrite_existing);
}

}  // namespace mp::testing
