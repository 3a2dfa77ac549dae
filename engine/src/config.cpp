#include <algorithm>
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "format.h"
#include "numeric.h"

namespace mp {

std::string_view to_string(Downsampling d) {
  switch (d) {
    case Downsampling::GroupedConv:
      return "groupedconv";
    case Downsampling::Conv:
      return "conv";
    case Downsampling::AvgPool:
      return "avgpool";
  }
  return "?";
}

Downsampling parse_downsampling(std::string_view s) {
  if (s == "groupedconv") return Downsampling::GroupedConv;
  if (s == "conv") return Downsampling::Conv;
  if (s == "avgpool") return Downsampling::AvgPool;
  throw Error("unknown FMA downsampling '" + std::string(s) +
              "' (expected groupedconv, conv or avgpool)");
}

std::string_view to_string(DType t) {
  switch (t) {
    case DType::F32:
      return "f32";
    case DType::F16:
      return "f16";
    case DType::BF16:
      return "bf16";
    case DType::Q8_0:
      return "q8_0";
  }
  return "?";
}

DType parse_dtype(std::string_view s) {
  if (s == "f32") return DType::F32;
  if (s == "f16") return DType::F16;
  if (s == "bf16") return DType::BF16;
  if (s == "q8_0") return DType::Q8_0;
  throw Error("unknown dtype '" + std::string(s) + "' (expected f32, f16, bf16 or q8_0)");
}

size_t dtype_bytes(DType t, int64_t numel) {
  if (t != DType::Q8_0) return size_t(numel) * (t == DType::F32 ? 4 : 2);
  if (numel % kQ8Block != 0)
    throw Error("q8_0: " + std::to_string(numel) + " elements are not whole blocks of " +
                std::to_string(kQ8Block));
  return size_t(numel / kQ8Block) * kQ8BlockBytes;
}

int Config::n_levels() const {
  if (!fma_enabled) return 0;
  return static_cast<int>(
             std::lround(std::log2(static_cast<double>(n_ctx_train) / fma_block_size))) -
         1;
}

int Config::group_size(int level) const { return fma_block_size << (level - 1); }

int Config::rank(int level) const {
  return fma_level_ranks.empty() ? fma_rank : fma_level_ranks[level - 1];
}

void Config::validate() const {
  auto need = [](bool ok, const std::string& what) {
    if (!ok) throw Error("invalid model config: " + what);
  };
  need(vocab_size > 0, "vocab_size must be positive");
  need(hidden_size > 0, "hidden_size must be positive");
  // As llama.cpp (LLAMA_MAX_LAYERS): a bound that keeps a corrupt count from naming millions of
  // tensors before the file is found not to hold them.
  need(n_layers > 0 && n_layers <= kMaxLayers,
       "num_hidden_layers must be in 1.." + std::to_string(kMaxLayers));
  need(n_heads > 0, "num_attention_heads must be positive");
  need(n_kv_heads > 0 && n_heads % n_kv_heads == 0,
       "num_key_value_heads must divide num_attention_heads");
  need(head_dim > 0 && head_dim % 2 == 0, "head_dim must be positive and even");
  need(intermediate_size > 0, "intermediate_size must be positive");
  need(rms_norm_eps > 0, "rms_norm_eps must be positive");
  need(rope_theta > 0, "rope_theta must be positive");
  need(rope_linear_factor > 0, "rope_scaling.factor must be positive");
  need(n_ctx_train > 0, "max_position_embeddings must be positive");
  need(bos_token_id >= 0 && bos_token_id < vocab_size, "bos_token_id out of range");
  need(eos_token_id >= 0 && eos_token_id < vocab_size, "eos_token_id out of range");
  if (!fma_enabled) return;
  need(fma_block_size > 0, "fma_block_size must be positive");
  need(fma_rank > 0, "fma_rank must be positive");
  need(n_ctx_train % fma_block_size == 0,
       "max_position_embeddings must be a multiple of fma_block_size");
  const int64_t ratio = n_ctx_train / fma_block_size;
  need(ratio >= 4 && (ratio & (ratio - 1)) == 0,
       "max_position_embeddings / fma_block_size must be a power of two >= 4");
  // The coarsest group, m * 2^(L-1) = n / 4, is an int (group_size()).
  need(n_ctx_train / 4 <= std::numeric_limits<int>::max(),
       "max_position_embeddings / 4 (the coarsest group) must fit in an int");
  if (!fma_level_ranks.empty()) {
    need(static_cast<int>(fma_level_ranks.size()) == n_levels(),
         "fma_ranks must give one rank per coarse level (" + std::to_string(n_levels()) + ")");
    need(std::all_of(fma_level_ranks.begin(), fma_level_ranks.end(), [](int r) { return r > 0; }),
         "fma_ranks must be positive");
    need(*std::max_element(fma_level_ranks.begin(), fma_level_ranks.end()) == fma_rank,
         "fma_rank must be the largest of fma_ranks");
  }
  if (fma_downsampling == Downsampling::AvgPool)
    for (int l = 1; l <= n_levels(); ++l)
      need(group_size(l) % rank(l) == 0,
           "avgpool needs each level's rank (fma_rank or fma_ranks) to divide its group size");
  need(!fma_rotary_summaries || fma_downsampling != Downsampling::Conv,
       "fma_rotary_summaries needs groupedconv or avgpool (conv mixes channels that RoPE rotates "
       "at different frequencies)");
}

namespace {
std::string ranks_str(const Config& c) {
  if (c.fma_level_ranks.empty()) return std::to_string(c.fma_rank);
  std::ostringstream o;  // a stream: GCC 12 warns falsely (-Wrestrict) on chained string +
  for (size_t l = 0; l < c.fma_level_ranks.size(); ++l) o << (l ? "," : "") << c.fma_level_ranks[l];
  return o.str();
}
}  // namespace

std::string Config::summary() const {
  std::ostringstream o;
  o << "vocab " << vocab_size << ", hidden " << hidden_size << ", layers " << n_layers << ", heads "
    << n_heads << "/" << n_kv_heads << " x " << head_dim << ", ffn " << intermediate_size << ", n "
    << n_ctx_train;
  if (rope_linear_factor != 1.0f) o << ", rope linear x" << rope_linear_factor;
  if (fma_enabled)
    o << ", FMA m=" << fma_block_size << " p=" << ranks_str(*this) << " L=" << n_levels() << " "
      << to_string(fma_downsampling) << (fma_rotary_summaries ? " rotary" : "")
      << (fma_scale_attn ? " scaled" : "");
  else
    o << ", exact attention";
  return o.str();
}

namespace {
// The architectures config_from_hf_json reads: ours (with fma_* keys) and the Llama family.
constexpr std::string_view kArchitectures[] = {"FmaForCausalLM", "LlamaForCausalLM",
                                               "MistralForCausalLM"};

// Refuses, naming the field, what a Llama-family config may ask for that the engine does not
// compute (everything else of such configs is either read or does not change the function).
void refuse_unsupported(const nlohmann::json& j) {
  auto is_true = [&](const char* k) {
    return j.contains(k) && j[k].is_boolean() && j[k].get<bool>();
  };
  if (j.contains("architectures") && j["architectures"].is_array()) {
    for (const auto& a : j["architectures"]) {
      const std::string name = a.is_string() ? a.get<std::string>() : a.dump();
      if (std::find(std::begin(kArchitectures), std::end(kArchitectures), name) ==
          std::end(kArchitectures))
        throw Error("config.json: architectures '" + name +
                    "' is not supported (expected LlamaForCausalLM, MistralForCausalLM or "
                    "FmaForCausalLM)");
    }
  }
  if (j.contains("model_type") && j["model_type"] != "llama" && j["model_type"] != "mistral" &&
      j["model_type"] != "fma")
    throw Error("config.json: model_type " + j["model_type"].dump() +
                " is not supported (expected llama, mistral or fma)");
  if (j.contains("hidden_act") && j["hidden_act"] != "silu")
    throw Error("config.json: hidden_act " + j["hidden_act"].dump() +
                " is not supported (only silu: the SwiGLU MLP)");
  if (is_true("attention_bias"))
    throw Error(
        "config.json: attention_bias is true; biases on the attention projections are not "
        "supported");
  if (is_true("mlp_bias"))
    throw Error("config.json: mlp_bias is true; biases on the MLP projections are not supported");
  if (j.contains("sliding_window") && !j["sliding_window"].is_null()) {
    const auto& w = j["sliding_window"];
    const auto n = j.value("max_position_embeddings", nlohmann::json());
    if (!w.is_number_integer() || !n.is_number_integer() || w.get<int64_t>() < n.get<int64_t>())
      throw Error("config.json: sliding_window " + w.dump() +
                  " is not supported (attention over a sliding window; only full attention, "
                  "sliding_window null or at least max_position_embeddings)");
  }
  for (const char* k : {"bos_token_id", "eos_token_id"})
    if (j.contains(k) && j[k].is_array())
      throw Error(std::string("config.json: ") + k + " is a list; one id is supported");
}

// The RoPE settings: rope_scaling (null, {"type" or "rope_type": "default"}, or linear with its
// factor) beside rope_theta, or transformers 5's rope_parameters holding both.
const char* rope_key(const nlohmann::json& j) {
  return j.contains("rope_parameters") ? "rope_parameters" : "rope_scaling";
}

float rope_linear_factor(const nlohmann::json& j) {
  const std::string key = rope_key(j);
  if (!j.contains(key) || j[key].is_null()) return 1.0f;
  const auto& r = j[key];
  if (!r.is_object()) throw Error("config.json: " + key + " must be an object or null");
  const auto type = r.contains("rope_type") ? r["rope_type"] : r.value("type", nlohmann::json());
  if (type == "default" || (type.is_null() && key == "rope_parameters")) return 1.0f;
  if (type != "linear")
    throw Error("config.json: " + key + " type " + type.dump() + " is not supported (only linear)");
  if (!r.contains("factor") || !r["factor"].is_number() || r["factor"].get<double>() <= 0)
    throw Error("config.json: " + key + ".factor must be a positive number");
  return r["factor"].get<float>();
}
}  // namespace

Config config_from_hf_json(const std::string& text) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const std::exception& e) {
    throw Error(std::string("config.json is not valid JSON: ") + e.what());
  }
  if (!j.is_object()) throw Error("config.json must hold a JSON object");
  refuse_unsupported(j);
  auto get = [&](const char* key, auto fallback, bool required) {
    using T = decltype(fallback);
    if (!j.contains(key) || j[key].is_null()) {
      if (required) throw Error(std::string("config.json: missing key '") + key + "'");
      return fallback;
    }
    try {
      return j[key].get<T>();
    } catch (const std::exception&) {
      throw Error(std::string("config.json: key '") + key + "' has the wrong type");
    }
  };
  Config c;
  c.vocab_size = get("vocab_size", 0, true);
  c.hidden_size = get("hidden_size", 0, true);
  c.n_layers = get("num_hidden_layers", 0, true);
  c.n_heads = get("num_attention_heads", 0, true);
  c.n_kv_heads = get("num_key_value_heads", c.n_heads, false);
  c.head_dim = get("head_dim", c.n_heads > 0 ? c.hidden_size / c.n_heads : 0, false);
  c.intermediate_size = get("intermediate_size", 0, true);
  c.rms_norm_eps = get("rms_norm_eps", 1e-5f, false);
  c.rope_theta = get("rope_theta", 10000.0f, false);
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object() &&
      j["rope_parameters"].contains("rope_theta")) {
    if (!j["rope_parameters"]["rope_theta"].is_number())
      throw Error("config.json: rope_parameters.rope_theta must be a number");
    c.rope_theta = j["rope_parameters"]["rope_theta"].get<float>();
  }
  c.rope_linear_factor = rope_linear_factor(j);
  c.tie_word_embeddings = get("tie_word_embeddings", false, false);
  c.n_ctx_train = get("max_position_embeddings", int64_t{0}, true);
  // A Llama-family config has no fma_* keys: exact attention, as in its source framework.
  c.fma_enabled = get("fma_enabled", j.contains("fma_block_size"), false);
  c.fma_block_size = get("fma_block_size", 0, c.fma_enabled);
  c.fma_level_ranks = get("fma_ranks", std::vector<int>{}, false);
  c.fma_rank = c.fma_level_ranks.empty()
                   ? get("fma_rank", 0, c.fma_enabled)
                   : *std::max_element(c.fma_level_ranks.begin(), c.fma_level_ranks.end());
  c.fma_downsampling =
      parse_downsampling(get("fma_downsampling", std::string("groupedconv"), false));
  c.fma_scale_attn = get("fma_scale_attn", true, false);
  c.fma_rotary_summaries = get("fma_rotary_summaries", false, false);
  c.bos_token_id = get("bos_token_id", 1, false);
  c.eos_token_id = get("eos_token_id", 2, false);
  c.add_bos = get("add_bos_token", true, false);
  c.validate();
  return c;
}

Config with_fma(const Config& c, const FmaConversion& f) {
  if (c.fma_enabled) throw Error("--fma: the checkpoint already has FMA (fma_block_size is set)");
  if (f.downsampling == Downsampling::Conv)
    throw Error("--fma: conv is not supported (avgpool or groupedconv)");
  Config out = c;
  out.fma_enabled = true;
  out.fma_downsampling = f.downsampling;
  out.fma_block_size = f.block_size;
  out.fma_rank = f.rank;
  if (f.trained_length > 0) out.n_ctx_train = f.trained_length;
  try {
    out.validate();
    if (f.block_size % f.rank != 0)
      throw Error("the summaries start as average pooling: fma_rank must divide fma_block_size");
  } catch (const Error& e) {
    throw Error(std::string("--fma: ") + e.what() + " (--block-size " +
                std::to_string(f.block_size) + ", --rank " + std::to_string(f.rank) +
                ", --trained-length " + std::to_string(out.n_ctx_train) + ")");
  }
  return out;
}

std::vector<float> avgpool_as_groupedconv(const Config& c, int level) {
  const int p = c.rank(level), d = c.head_dim, w = c.group_size(level), span = w / p;
  std::vector<float> weight(size_t(p) * d * w, 0.0f);  // [c*p + r][0][t]
  for (int ch = 0; ch < d; ++ch)
    for (int r = 0; r < p; ++r)
      for (int t = r * span; t < (r + 1) * span; ++t)
        weight[(size_t(ch) * p + r) * w + t] = 1.0f / static_cast<float>(span);
  return weight;
}

std::map<std::string, gguf::Value> config_to_gguf(const Config& c) {
  using gguf::Value;
  const std::string a = kArchitecture;
  std::map<std::string, Value> kv = {
      {"general.architecture", Value::str(a)},
      {a + ".vocab_size", Value::u32(c.vocab_size)},
      {a + ".embedding_length", Value::u32(c.hidden_size)},
      {a + ".block_count", Value::u32(c.n_layers)},
      {a + ".attention.head_count", Value::u32(c.n_heads)},
      {a + ".attention.head_count_kv", Value::u32(c.n_kv_heads)},
      {a + ".attention.key_length", Value::u32(c.head_dim)},
      {a + ".feed_forward_length", Value::u32(c.intermediate_size)},
      {a + ".attention.layer_norm_rms_epsilon", Value::f32(c.rms_norm_eps)},
      {a + ".rope.freq_base", Value::f32(c.rope_theta)},
      {a + ".rope.scaling.type", Value::str(c.rope_linear_factor != 1.0f ? "linear" : "none")},
      {a + ".rope.scaling.factor", Value::f32(c.rope_linear_factor)},
      {a + ".tie_word_embeddings", Value::boolean(c.tie_word_embeddings)},
      {a + ".context_length", Value::u32(static_cast<uint32_t>(c.n_ctx_train))},
      {a + ".enabled", Value::boolean(c.fma_enabled)},
      {a + ".block_size", Value::u32(c.fma_block_size)},
      {a + ".rank", Value::u32(c.fma_rank)},
      {a + ".downsampling", Value::str(std::string(to_string(c.fma_downsampling)))},
      {a + ".scale_attn", Value::boolean(c.fma_scale_attn)},
      {a + ".rotary_summaries", Value::boolean(c.fma_rotary_summaries)},
      {"tokenizer.ggml.bos_token_id", Value::u32(c.bos_token_id)},
      {"tokenizer.ggml.eos_token_id", Value::u32(c.eos_token_id)},
      {"tokenizer.ggml.add_bos_token", Value::boolean(c.add_bos)},
  };
  if (!c.fma_level_ranks.empty()) {
    Value ranks;
    ranks.type = gguf::ValueType::ARRAY;
    ranks.elem = gguf::ValueType::U32;
    for (int r : c.fma_level_ranks) ranks.arr.push_back(Value::u32(r));
    kv[a + ".ranks"] = ranks;
  }
  return kv;
}

Config config_from_gguf(const gguf::File& f) {
  const std::string arch = f.get_string("general.architecture");
  if (arch != kArchitecture)
    throw Error("model file: general.architecture is '" + arch + "', expected 'fma'");
  const std::string a = arch;
  auto u = [&](const std::string& k) { return static_cast<int>(f.get_uint(a + k)); };
  Config c;
  c.vocab_size = u(".vocab_size");
  c.hidden_size = u(".embedding_length");
  c.n_layers = u(".block_count");
  c.n_heads = u(".attention.head_count");
  c.n_kv_heads = u(".attention.head_count_kv");
  c.head_dim = u(".attention.key_length");
  c.intermediate_size = u(".feed_forward_length");
  c.rms_norm_eps = static_cast<float>(f.get_float(a + ".attention.layer_norm_rms_epsilon"));
  c.rope_theta = static_cast<float>(f.get_float(a + ".rope.freq_base"));
  // Files written before rope scaling have neither key: no scaling.
  if (f.find(a + ".rope.scaling.type")) {
    const std::string type = f.get_string(a + ".rope.scaling.type");
    if (type == "linear")
      c.rope_linear_factor = static_cast<float>(f.get_float(a + ".rope.scaling.factor"));
    else if (type != "none")
      throw Error("model file: rope scaling '" + type + "' is not supported (only linear)");
  }
  c.tie_word_embeddings = f.get_bool(a + ".tie_word_embeddings");
  c.n_ctx_train = static_cast<int64_t>(f.get_uint(a + ".context_length"));
  c.fma_enabled = f.get_bool(a + ".enabled");
  c.fma_block_size = u(".block_size");
  c.fma_rank = u(".rank");
  // Files written before per-level ranks have no such key: fma.rank at every level.
  if (const gguf::Value* ranks = f.find(a + ".ranks")) {
    if (ranks->type != gguf::ValueType::ARRAY || ranks->elem != gguf::ValueType::U32)
      throw Error("model file: " + a + ".ranks must be an array of u32");
    for (const auto& r : ranks->arr) c.fma_level_ranks.push_back(static_cast<int>(r.u));
  }
  c.fma_downsampling = parse_downsampling(f.get_string(a + ".downsampling"));
  c.fma_scale_attn = f.get_bool(a + ".scale_attn");
  // Files written before rotary summaries have no such key: off.
  if (f.find(a + ".rotary_summaries")) c.fma_rotary_summaries = f.get_bool(a + ".rotary_summaries");
  c.bos_token_id = static_cast<int>(f.get_uint("tokenizer.ggml.bos_token_id"));
  c.eos_token_id = static_cast<int>(f.get_uint("tokenizer.ggml.eos_token_id"));
  c.add_bos = f.get_bool("tokenizer.ggml.add_bos_token");
  c.validate();
  return c;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string o = "[";
  for (size_t i = 0; i < shape.size(); ++i) o += (i ? ", " : "") + std::to_string(shape[i]);
  return o + "]";
}

namespace {
constexpr const char* kSamplingPrefix = "general.sampling.";

// A general.sampling.* value as a double: any GGUF number (llama.cpp writes f32 and i32).
std::optional<double> sampling_number(const gguf::File& f, const std::string& name) {
  const std::string key = kSamplingPrefix + name;
  const gguf::Value* v = f.find(key);
  if (!v) return std::nullopt;
  using gguf::ValueType;
  switch (v->type) {
    case ValueType::U8:
    case ValueType::U16:
    case ValueType::U32:
    case ValueType::U64:
      return static_cast<double>(v->u);
    case ValueType::I8:
    case ValueType::I16:
    case ValueType::I32:
    case ValueType::I64:
      return static_cast<double>(v->i);
    case ValueType::F32:
    case ValueType::F64:
      return v->f;
    default:
      throw Error("model file: metadata key '" + key + "' is not a number");
  }
}

std::optional<int> sampling_integer(const gguf::File& f, const std::string& name) {
  const auto v = sampling_number(f, name);
  if (!v) return std::nullopt;
  if (*v != std::floor(*v) || std::abs(*v) > 1e9)
    throw Error("model file: metadata key '" + std::string(kSamplingPrefix) + name +
                "' is not an integer");
  return static_cast<int>(*v);
}

std::optional<float> sampling_real(const gguf::File& f, const std::string& name) {
  const auto v = sampling_number(f, name);
  return v ? std::optional<float>(static_cast<float>(*v)) : std::nullopt;
}
}  // namespace

SamplingRecommendation sampling_from_gguf(const gguf::File& f) {
  SamplingRecommendation s;
  s.temperature = sampling_real(f, "temp");
  s.top_k = sampling_integer(f, "top_k");
  s.top_p = sampling_real(f, "top_p");
  s.min_p = sampling_real(f, "min_p");
  s.repetition_penalty = sampling_real(f, "penalty_repeat");
  s.penalty_last_n = sampling_integer(f, "penalty_last_n");
  try {
    s.over(SamplingParams{}).validate();
  } catch (const Error& e) {
    throw Error("model file: general.sampling.* (" + s.describe() + "): " + e.what());
  }
  return s;
}

void sampling_to_gguf(const SamplingRecommendation& s, std::map<std::string, gguf::Value>& kv) {
  const std::string p = kSamplingPrefix;
  if (s.temperature) kv[p + "temp"] = gguf::Value::f32(*s.temperature);
  if (s.top_k) kv[p + "top_k"] = gguf::Value::i32(*s.top_k);
  if (s.top_p) kv[p + "top_p"] = gguf::Value::f32(*s.top_p);
  if (s.min_p) kv[p + "min_p"] = gguf::Value::f32(*s.min_p);
  if (s.repetition_penalty) kv[p + "penalty_repeat"] = gguf::Value::f32(*s.repetition_penalty);
  if (s.penalty_last_n) kv[p + "penalty_last_n"] = gguf::Value::i32(*s.penalty_last_n);
}

namespace tensor_names {
std::string token_embd() { return "token_embd.weight"; }
std::string output_norm() { return "output_norm.weight"; }
std::string output() { return "output.weight"; }
std::string layer(int layer, std::string_view what) {
  return "blk." + std::to_string(layer) + "." + std::string(what) + ".weight";
}
std::string fma_down(int layer, char kv, int level, bool bias) {
  return "blk." + std::to_string(layer) + ".fma_" + kv + "_down." + std::to_string(level - 1) +
         (bias ? ".bias" : ".weight");
}
}  // namespace tensor_names

std::vector<TensorSpec> expected_tensors(const Config& c) {
  namespace tn = tensor_names;
  const int64_t H = c.hidden_size, V = c.vocab_size, F = c.intermediate_size, d = c.head_dim;
  const int64_t q = int64_t{c.n_heads} * d, kv = int64_t{c.n_kv_heads} * d;
  std::vector<TensorSpec> out;
  out.push_back({tn::token_embd(), "model.embed_tokens.weight", {V, H}});
  for (int i = 0; i < c.n_layers; ++i) {
    const std::string hf = "model.layers." + std::to_string(i) + ".";
    out.push_back({tn::layer(i, "attn_norm"), hf + "input_layernorm.weight", {H}});
    out.push_back({tn::layer(i, "attn_q"), hf + "self_attn.q_proj.weight", {q, H}});
    out.push_back({tn::layer(i, "attn_k"), hf + "self_attn.k_proj.weight", {kv, H}});
    out.push_back({tn::layer(i, "attn_v"), hf + "self_attn.v_proj.weight", {kv, H}});
    out.push_back({tn::layer(i, "attn_output"), hf + "self_attn.o_proj.weight", {H, q}});
    if (c.fma_enabled && c.fma_downsampling != Downsampling::AvgPool) {
      const int64_t in = c.fma_downsampling == Downsampling::Conv ? d : 1;
      for (int l = 1; l <= c.n_levels(); ++l) {
        for (char which : {'k', 'v'}) {
          const std::string base = hf + "self_attn.fma." + which + "_down." + std::to_string(l - 1);
          const int64_t p = c.rank(l);
          if (which == 'k' && c.fma_rotary_summaries) {  // [pair*p + r][re, im][t], no bias
            out.push_back({tn::fma_down(i, which, l, false),
                           base + ".weight",
                           {d / 2 * p, 2, c.group_size(l)}});
            continue;
          }
          out.push_back(
              {tn::fma_down(i, which, l, false), base + ".weight", {d * p, in, c.group_size(l)}});
          out.push_back({tn::fma_down(i, which, l, true), base + ".bias", {d * p}});
        }
      }
    }
    out.push_back({tn::layer(i, "ffn_norm"), hf + "post_attention_layernorm.weight", {H}});
    out.push_back({tn::layer(i, "ffn_gate"), hf + "mlp.gate_proj.weight", {F, H}});
    out.push_back({tn::layer(i, "ffn_up"), hf + "mlp.up_proj.weight", {F, H}});
    out.push_back({tn::layer(i, "ffn_down"), hf + "mlp.down_proj.weight", {H, F}});
  }
  out.push_back({tn::output_norm(), "model.norm.weight", {H}});
  if (!c.tie_word_embeddings) out.push_back({tn::output(), "lm_head.weight", {V, H}});
  return out;
}

}  // namespace mp
