#include <algorithm>
#include <cstdio>
#include <cstring>

#include "file_io.h"
#include "format.h"
#include "numeric.h"

namespace mp {

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

std::vector<float> TensorView::to_f32() const {
  const int64_t n = numel();
  std::vector<float> out(static_cast<size_t>(n));
  switch (dtype) {
    case DType::F32:
      std::memcpy(out.data(), data, n * 4);
      break;
    case DType::F16: {
      const auto* p = static_cast<const uint16_t*>(data);
      for (int64_t i = 0; i < n; ++i) out[i] = f16_to_f32(p[i]);
      break;
    }
    case DType::BF16: {
      const auto* p = static_cast<const uint16_t*>(data);
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_f32(p[i]);
      break;
    }
    case DType::Q8_0: {
      const auto* p = static_cast<const uint8_t*>(data);
      for (int64_t b = 0; b < n / kQ8Block; ++b)
        dequantize_q8_0_block(p + b * kQ8BlockBytes, out.data() + b * kQ8Block);
      break;
    }
  }
  return out;
}

Model::~Model() = default;

namespace {
// Hashes what tells two models apart without reading all of a large file: the config, every
// tensor's name and shape, and 4 KiB from the start, middle and end of every tensor's bytes.
std::string identity_of(const Model& m) {
  std::string text = m.config().summary();
  std::vector<uint8_t> samples;
  for (const TensorView& t : m.tensors()) {
    text += "|" + t.name + shape_str(t.shape);
    const size_t size = t.nbytes();
    const size_t take = std::min<size_t>(size, 4096);
    const auto* p = static_cast<const uint8_t*>(t.data);
    for (size_t at : {size_t(0), (size - take) / 2, size - take})
      samples.insert(samples.end(), p + at, p + at + take);
  }
  samples.insert(samples.end(), text.begin(), text.end());
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(hash_bytes(samples)));
  return hex;
}
}  // namespace

std::shared_ptr<Model> Model::load(const std::string& path) {
  std::shared_ptr<Model> m(new Model());
  m->path_ = path;
  m->mapping_ = std::make_unique<MappedFile>(path, "model '" + path + "'", 24, "GGUF");
  const uint8_t* base = m->mapping_->data();
  gguf::File f;
  try {
    f = gguf::parse(base, m->mapping_->size());
    m->config_ = config_from_gguf(f);
    m->tokenizer_ = std::make_unique<Tokenizer>(f.get_string(kTokenizerKey), m->config_);
    if (f.find(kChatTemplateKey)) m->chat_template_ = f.get_string(kChatTemplateKey);
    m->sampling_ = sampling_from_gguf(f);
  } catch (const Error& e) {
    throw Error("model '" + path + "': " + e.what());
  }
  for (const auto& t : f.tensors)
    m->tensors_.push_back(TensorView{t.name, t.dtype, t.shape, base + t.offset});
  for (const auto& spec : expected_tensors(m->config_)) m->tensor(spec.name, spec.shape);
  m->identity_ = identity_of(*m);
  return m;
}

const TensorView& Model::tensor(const std::string& name, const std::vector<int64_t>& shape) const {
  for (const auto& t : tensors_) {
    if (t.name != name) continue;
    if (t.shape != shape)
      throw Error("model '" + path_ + "': tensor '" + name + "' has shape " + shape_str(t.shape) +
                  ", expected " + shape_str(shape));
    return t;
  }
  throw Error("model '" + path_ + "': tensor '" + name + "' (shape " + shape_str(shape) +
              ") is missing");
}

}  // namespace mp
