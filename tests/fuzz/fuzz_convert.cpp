// The converter's readers (config.json, the safetensors header and tensors, the shard index):
// any folder either converts into a GGUF that loads, or fails with mp::Error and writes nothing.
// Input: [u32 n][config.json: n bytes][u32 k][model.safetensors.index.json: k bytes, none if 0]
// [model.safetensors: the rest]; tokenizer.model is the fixture.
#include <cstring>

#include "fuzz_support.h"

namespace {
bool take(const uint8_t*& p, size_t& left, std::string& out) {
  uint32_t n;
  if (left < 4) return false;
  std::memcpy(&n, p, 4);
  p += 4;
  left -= 4;
  if (n > left) return false;
  out.assign(reinterpret_cast<const char*>(p), n);
  p += n;
  left -= n;
  return true;
}
}  // namespace

MULTIPOLE_FUZZ_TARGET(fuzz_convert) {
  using namespace mp;
  namespace fs = std::filesystem;
  std::string config, index;
  if (!take(data, size, config) || !take(data, size, index)) return 0;
  static const std::string tokenizer = fuzz::read_bytes(testing::fixture_tokenizer_path());
  const fs::path dir = fuzz::scratch_dir() / "convert";
  fs::remove_all(dir);
  fs::create_directories(dir);
  fuzz::write_scratch("convert/config.json", config.data(), config.size());
  fuzz::write_scratch("convert/tokenizer.model", tokenizer.data(), tokenizer.size());
  fuzz::write_scratch("convert/model.safetensors", data, size);
  if (!index.empty())
    fuzz::write_scratch("convert/model.safetensors.index.json", index.data(), index.size());
  const fs::path out = fuzz::scratch_dir() / "converted.gguf";
  ConvertOptions o;
  o.overwrite = true;
  o.dtype = DType::F16;
  fs::remove(out);
  try {
    convert_hf_to_gguf(dir.string(), out.string(), o);
  } catch (const Error&) {
    fuzz::check(!fs::exists(out), "a failed conversion writes no model");
    for (const auto& e : fs::directory_iterator(fuzz::scratch_dir()))
      fuzz::check(e.path().filename().string().find(".tmp") == std::string::npos,
                  "a failed conversion leaves no temporary file");
    return 0;
  }
  const auto m = Model::load(out.string());  // throws (a crash here) if the writer was wrong
  fuzz::check(m->config().summary() == config_from_hf_json(config).summary(),
              "the model file holds the checkpoint's config");
  return 0;
}
