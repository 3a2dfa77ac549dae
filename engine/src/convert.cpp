// Hugging Face folder (config.json, safetensors, tokenizer.model) -> GGUF.
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "file_io.h"
#include "format.h"
#include "numeric.h"

namespace mp {
namespace {

namespace fs = std::filesystem;

std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  if (!f) throw Error("cannot read '" + p.string() + "'");
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

// One mmap-ed safetensors file and the tensors its header lists.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const fs::path& path)
      : path_(path.string()), map_(path_, "'" + path_ + "'", 8, "safetensors") {
    const uint8_t* base = map_.data();
    const size_t size = map_.size();
    uint64_t hlen;
    std::memcpy(&hlen, base, 8);
    if (hlen > size - 8)
      throw Error("'" + path_ + "': header length " + std::to_string(hlen) +
                  " runs past the end of the file (truncated?)");
    nlohmann::json h;
    try {
      h = nlohmann::json::parse(base + 8, base + 8 + hlen);
    } catch (const std::exception& e) {
      throw Error("'" + path_ + "': bad safetensors header: " + e.what());
    }
    const uint8_t* data = base + 8 + hlen;
    const size_t data_size = size - 8 - hlen;
    for (auto& [name, info] : h.items()) {
      if (name == "__metadata__") continue;
      TensorView t;
      t.name = name;
      try {
        const std::string dt = info.at("dtype").get<std::string>();
        if (dt == "F32")
          t.dtype = DType::F32;
        else if (dt == "F16")
          t.dtype = DType::F16;
        else if (dt == "BF16")
          t.dtype = DType::BF16;
        else
          throw Error("'" + path_ + "': tensor '" + name + "' has unsupported dtype " + dt);
        t.shape = info.at("shape").get<std::vector<int64_t>>();
        const auto off = info.at("data_offsets").get<std::vector<uint64_t>>();
        if (off.size() != 2 || off[0] > off[1] || off[1] > data_size)
          throw Error("'" + path_ + "': tensor '" + name +
                      "' data_offsets lie outside the file (truncated?)");
        // More elements than the file has bytes cannot be right; checked dim by dim, before the
        // product could overflow.
        uint64_t numel = 1;
        for (auto d : t.shape) {
          if (d < 0) throw Error("'" + path_ + "': tensor '" + name + "' has a negative dim");
          if (d > 0 && numel > data_size / uint64_t(d))
            throw Error("'" + path_ + "': tensor '" + name + "' has more elements than the " +
                        "file has bytes");
          numel *= uint64_t(d);
        }
        if (off[1] - off[0] != t.nbytes())
          throw Error("'" + path_ + "': tensor '" + name + "' holds " +
                      std::to_string(off[1] - off[0]) + " bytes, its shape needs " +
                      std::to_string(t.nbytes()));
        t.data = data + off[0];
      } catch (const nlohmann::json::exception& e) {
        throw Error("'" + path_ + "': bad header entry for '" + name + "': " + e.what());
      }
      tensors_.emplace(name, std::move(t));
    }
  }
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }

 private:
  std::string path_;
  MappedFile map_;  // a member: unmapped also when the constructor throws
  std::map<std::string, TensorView> tensors_;
};

void append_converted(const TensorView& src, DType dst, std::vector<uint8_t>& out) {
  const std::vector<float> f = src.to_f32();
  const size_t at = out.size();
  out.resize(at + dtype_bytes(dst, int64_t(f.size())));
  uint8_t* p = out.data() + at;
  switch (dst) {
    case DType::Q8_0:  // rows are whole blocks (storage_dtype): blocks never straddle rows
      for (size_t b = 0; b < f.size() / kQ8Block; ++b)
        quantize_q8_0_block(f.data() + b * kQ8Block, p + b * kQ8BlockBytes);
      break;
    case DType::F32:
      std::memcpy(p, f.data(), f.size() * 4);
      break;
    case DType::F16:
      for (size_t i = 0; i < f.size(); ++i) {
        const uint16_t h = f32_to_f16(f[i]);
        std::memcpy(p + 2 * i, &h, 2);
      }
      break;
    case DType::BF16:
      for (size_t i = 0; i < f.size(); ++i) {
        const uint16_t h = f32_to_bf16(f[i]);
        std::memcpy(p + 2 * i, &h, 2);
      }
      break;
  }
}

// The folder's chat template: chat_template.jinja (transformers >= 4.43 writes it) or
// tokenizer_config.json's "chat_template" (a string, or a list of {name, template} of which
// "default" is taken). Empty when there is none.
std::string hf_chat_template(const fs::path& dir) {
  if (fs::exists(dir / "chat_template.jinja")) return read_file(dir / "chat_template.jinja");
  if (!fs::exists(dir / "tokenizer_config.json")) return "";
  nlohmann::json tc;
  try {
    tc = nlohmann::json::parse(read_file(dir / "tokenizer_config.json"));
  } catch (const std::exception& e) {
    throw Error(std::string("tokenizer_config.json: ") + e.what());
  }
  if (!tc.is_object() || !tc.contains("chat_template") || tc["chat_template"].is_null()) return "";
  const auto& t = tc["chat_template"];
  if (t.is_string()) return t.get<std::string>();
  if (t.is_array())
    for (const auto& named : t)
      if (named.is_object() && named.value("name", "") == "default" && named.contains("template") &&
          named["template"].is_string())
        return named["template"].get<std::string>();
  throw Error(
      "tokenizer_config.json: 'chat_template' is neither a string nor a list holding a "
      "template named 'default'");
}

// The folder's generation_config.json sampling fields (temperature, top_k, top_p, min_p,
// repetition_penalty), as llama.cpp's converter takes them; the others (do_sample, max_length,
// ...) are not sampling defaults the engine has. Nothing when there is no such file.
SamplingRecommendation hf_sampling(const fs::path& dir) {
  SamplingRecommendation s;
  if (!fs::exists(dir / "generation_config.json")) return s;
  nlohmann::json g;
  try {
    g = nlohmann::json::parse(read_file(dir / "generation_config.json"));
  } catch (const std::exception& e) {
    throw Error(std::string("generation_config.json: ") + e.what());
  }
  if (!g.is_object()) throw Error("generation_config.json is not an object");
  auto field = [&g](const char* key) -> std::optional<double> {
    if (!g.contains(key) || g[key].is_null()) return std::nullopt;
    if (!g[key].is_number())
      throw Error(std::string("generation_config.json: '") + key + "' is not a number");
    return g[key].get<double>();
  };
  if (auto v = field("temperature")) s.temperature = static_cast<float>(*v);
  if (auto v = field("top_k")) s.top_k = static_cast<int>(*v);
  if (auto v = field("top_p")) s.top_p = static_cast<float>(*v);
  if (auto v = field("min_p")) s.min_p = static_cast<float>(*v);
  if (auto v = field("repetition_penalty")) s.repetition_penalty = static_cast<float>(*v);
  return s;
}

// The recommendation a converted file carries: the source's with the options' fields replacing
// it, checked as the loader will check it.
SamplingRecommendation converted_sampling(SamplingRecommendation source,
                                          const ConvertOptions& opts) {
  source.merge(opts.sampling);
  try {
    source.over(SamplingParams{}).validate();
  } catch (const Error& e) {
    throw Error("recommended sampling (" + source.describe() + "): " + e.what());
  }
  return source;
}

// How a tensor of this shape is stored when the matrices are asked for as `matrices`: norms and
// biases f32; with Q8_0, as llama.cpp's Q8_0 files, every tensor of 2 or more dimensions whose
// rows are whole blocks (ConvertOptions), others bf16.
DType storage_dtype(const std::vector<int64_t>& shape, DType matrices) {
  if (shape.size() == 1) return DType::F32;
  if (matrices != DType::Q8_0) return matrices;
  return shape.back() % kQ8Block == 0 ? DType::Q8_0 : DType::BF16;
}

}  // namespace

void convert_hf_to_gguf(const std::string& hf_dir, const std::string& out_path,
                        const ConvertOptions& opts) {
  const fs::path dir(hf_dir);
  if (!fs::is_directory(dir)) throw Error("'" + hf_dir + "' is not a directory");
  if (fs::exists(out_path) && !opts.overwrite)
    throw Error("'" + out_path + "' exists; pass --force to overwrite it");
  if (!fs::exists(dir / "config.json")) throw Error("'" + hf_dir + "' has no config.json");
  const Config source = config_from_hf_json(read_file(dir / "config.json"));
  const Config cfg = opts.fma ? with_fma(source, *opts.fma) : source;
  if (!fs::exists(dir / "tokenizer.model"))
    throw Error("'" + hf_dir + "' has no tokenizer.model: only SentencePiece tokenizers are " +
                "supported" +
                (fs::exists(dir / "tokenizer.json")
                     ? " (tokenizer.json alone, a Hugging Face tokenizers file, is not)"
                     : ""));
  const std::string spm = read_file(dir / "tokenizer.model");
  Tokenizer check_tokenizer(spm, cfg);  // refuses a tokenizer that does not load or fit
  const std::string chat_template = hf_chat_template(dir);
  const SamplingRecommendation sampling = converted_sampling(hf_sampling(dir), opts);

  std::vector<std::unique_ptr<SafetensorsFile>> shards;
  if (fs::exists(dir / "model.safetensors.index.json")) {
    nlohmann::json idx;
    try {
      idx = nlohmann::json::parse(read_file(dir / "model.safetensors.index.json"));
    } catch (const std::exception& e) {
      throw Error(std::string("model.safetensors.index.json: ") + e.what());
    }
    std::set<std::string> files;
    if (!idx.contains("weight_map") || !idx["weight_map"].is_object())
      throw Error("model.safetensors.index.json has no weight_map");
    for (auto& [k, v] : idx["weight_map"].items()) files.insert(v.get<std::string>());
    for (const auto& f : files) {
      if (f.find('/') != std::string::npos || f.find("..") != std::string::npos)
        throw Error("model.safetensors.index.json names an unsafe shard path '" + f + "'");
      shards.push_back(std::make_unique<SafetensorsFile>(dir / f));
    }
  } else {
    shards.push_back(std::make_unique<SafetensorsFile>(dir / "model.safetensors"));
  }
  std::map<std::string, const TensorView*> by_name;
  for (const auto& s : shards)
    for (const auto& [name, t] : s->tensors()) by_name[name] = &t;

  // Check everything before writing anything.
  const auto specs = expected_tensors(cfg);
  std::set<std::string> wanted;
  for (const auto& spec : specs) wanted.insert(spec.hf_name);
  for (const auto& [name, t] : by_name) {
    if (wanted.count(name)) continue;
    // Buffers some Llama checkpoints carry, recomputed by the engine: harmless.
    if (name.ends_with(".rotary_emb.inv_freq")) continue;
    if (name == "lm_head.weight" && cfg.tie_word_embeddings) continue;  // a copy of the embedding
    if (name.ends_with(".bias"))
      throw Error("checkpoint: tensor '" + name + "' is a bias; " +
                  (cfg.fma_rotary_summaries && name.find(".fma.k_down.") != std::string::npos
                       ? "rotary key summaries (fma_rotary_summaries) have none"
                       : "biases are not supported"));
    throw Error("checkpoint: tensor '" + name + "' is not part of a " +
                (source.fma_enabled ? "FMA" : "Llama") + " model with this config.json" +
                (opts.fma && name.find(".fma.") != std::string::npos
                     ? " (--fma adds summary weights to a checkpoint that has none)"
                     : ""));
  }
  // With --fma the summary weights are new: they compute average pooling.
  std::map<std::string, int> synthesized;  // GGUF name -> level
  if (opts.fma && cfg.fma_downsampling == Downsampling::GroupedConv)
    for (int i = 0; i < cfg.n_layers; ++i)
      for (int l = 1; l <= cfg.n_levels(); ++l)
        for (char which : {'k', 'v'}) {
          synthesized[tensor_names::fma_down(i, which, l, false)] = l;
          synthesized[tensor_names::fma_down(i, which, l, true)] = l;
        }
  std::vector<gguf::TensorOut> outs;
  for (const auto& spec : specs) {
    if (auto s = synthesized.find(spec.name); s != synthesized.end()) {
      const bool bias = spec.shape.size() == 1;
      const DType dt = storage_dtype(spec.shape, opts.dtype);
      outs.push_back({spec.name, spec.shape, dt,
                      [&cfg, bias, level = s->second, spec, dt](std::vector<uint8_t>& out) {
                        const std::vector<float> v = bias ? std::vector<float>(spec.shape[0], 0.0f)
                                                          : avgpool_as_groupedconv(cfg, level);
                        append_converted({spec.name, DType::F32, spec.shape, v.data()}, dt, out);
                      }});
      continue;
    }
    auto it = by_name.find(spec.hf_name);
    if (it == by_name.end())
      throw Error("checkpoint: tensor '" + spec.hf_name + "' (shape " + shape_str(spec.shape) +
                  ") is missing");
    const TensorView* src = it->second;
    if (src->shape != spec.shape)
      throw Error("checkpoint: tensor '" + spec.hf_name + "' has shape " + shape_str(src->shape) +
                  ", the config needs " + shape_str(spec.shape));
    // Norm weights and biases are tiny and precision-sensitive: they stay f32.
    const DType dt = storage_dtype(spec.shape, opts.dtype);
    outs.push_back({spec.name, spec.shape, dt,
                    [src, dt](std::vector<uint8_t>& out) { append_converted(*src, dt, out); }});
  }
  auto kv = config_to_gguf(cfg);
  kv["general.name"] = gguf::Value::str(dir.filename().string());
  kv["general.file_type"] = gguf::Value::str(std::string(to_string(opts.dtype)));
  kv[kTokenizerKey] = gguf::Value::bytes(spm);
  if (!chat_template.empty()) kv[kChatTemplateKey] = gguf::Value::str(chat_template);
  sampling_to_gguf(sampling, kv);

  gguf::write(out_path, kv, outs, opts.progress);
}

void convert_gguf(const std::string& in_path, const std::string& out_path,
                  const ConvertOptions& opts) {
  if (opts.fma) throw Error("--fma converts Hugging Face folders, not GGUF files");
  if (fs::exists(out_path) && !opts.overwrite)
    throw Error("'" + out_path + "' exists; pass --force to overwrite it");
  const std::shared_ptr<Model> m = Model::load(in_path);
  std::vector<gguf::TensorOut> outs;
  for (const auto& spec : expected_tensors(m->config())) {
    const TensorView* src = &m->tensor(spec.name, spec.shape);
    const DType dt = storage_dtype(spec.shape, opts.dtype);
    outs.push_back({spec.name, spec.shape, dt,
                    [src, dt](std::vector<uint8_t>& out) { append_converted(*src, dt, out); }});
  }
  auto kv = config_to_gguf(m->config());
  kv["general.name"] = gguf::Value::str(fs::path(in_path).stem().string());
  kv["general.file_type"] = gguf::Value::str(std::string(to_string(opts.dtype)));
  kv[kTokenizerKey] = gguf::Value::bytes(m->tokenizer().model_bytes());
  if (!m->chat_template().empty()) kv[kChatTemplateKey] = gguf::Value::str(m->chat_template());
  sampling_to_gguf(converted_sampling(m->recommended_sampling(), opts), kv);
  gguf::write(out_path, kv, outs, opts.progress);
}

}  // namespace mp
