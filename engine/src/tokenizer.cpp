#include <sentencepiece_processor.h>

#include "multipole/multipole.h"

namespace mp {

struct Tokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
};

Tokenizer::Tokenizer(std::string_view spm_model_bytes, const Config& c)
    : impl_(std::make_unique<Impl>()),
      bos_(c.bos_token_id),
      eos_(c.eos_token_id),
      add_bos_(c.add_bos) {
  const auto st = impl_->sp.LoadFromSerializedProto(spm_model_bytes);
  if (!st.ok()) throw Error("tokenizer: cannot load the SentencePiece model: " + st.ToString());
  if (impl_->sp.GetPieceSize() > c.vocab_size)
    throw Error("tokenizer: " + std::to_string(impl_->sp.GetPieceSize()) +
                " pieces but the model's vocab_size is " + std::to_string(c.vocab_size));
}

Tokenizer::~Tokenizer() = default;

std::string Tokenizer::model_bytes() const { return impl_->sp.serialized_model_proto(); }

std::vector<int> Tokenizer::encode(std::string_view text, bool add_bos) const {
  std::vector<int> ids;
  const auto st = impl_->sp.Encode(text, &ids);
  if (!st.ok()) throw Error("tokenizer: encode failed: " + st.ToString());
  if (add_bos) ids.insert(ids.begin(), bos_);
  return ids;
}

std::string Tokenizer::decode(std::span<const int> ids) const {
  // Ids past the SentencePiece vocabulary (a model may pad its embedding) decode to nothing.
  std::vector<int> valid;
  valid.reserve(ids.size());
  for (int id : ids)
    if (id >= 0 && id < impl_->sp.GetPieceSize() && id != bos_ && id != eos_) valid.push_back(id);
  std::string out;
  const auto st = impl_->sp.Decode(valid, &out);
  if (!st.ok()) throw Error("tokenizer: decode failed: " + st.ToString());
  return out;
}

std::string Tokenizer::piece(int id) const {
  if (id < 0 || id >= impl_->sp.GetPieceSize()) return "";
  return impl_->sp.IdToPiece(id);
}

int Tokenizer::vocab_size() const { return impl_->sp.GetPieceSize(); }

namespace {
// Length of the longest prefix of s that ends on a UTF-8 character boundary and holds no
// trailing U+FFFD (which SentencePiece emits for a byte-fallback sequence not yet complete).
size_t stable_prefix(const std::string& s) {
  size_t n = s.size();
  static const std::string kReplacement = "\xEF\xBF\xBD";
  while (n >= 3 && s.compare(n - 3, 3, kReplacement) == 0) n -= 3;
  // Back off an incomplete trailing multi-byte sequence.
  size_t i = n;
  int cont = 0;
  while (i > 0 && (static_cast<unsigned char>(s[i - 1]) & 0xC0) == 0x80 && cont < 3) {
    --i;
    ++cont;
  }
  if (i > 0) {
    const unsigned char lead = static_cast<unsigned char>(s[i - 1]);
    const int len = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
    if (len > 1 && cont + 1 < len) return i - 1;
  }
  return n;
}
}  // namespace

TextStream::TextStream(const Tokenizer& tok, std::vector<std::string> stop)
    : tok_(tok), stop_(std::move(stop)) {
  std::erase_if(stop_, [](const std::string& s) { return s.empty(); });
}

std::string TextStream::push(int id) {
  if (stopped_) return "";
  ids_.push_back(id);
  const std::string full = tok_.decode(ids_);
  size_t safe = stable_prefix(full);
  // A stop string anywhere in the not yet emitted text ends the stream there.
  size_t stop_at = std::string::npos;
  for (const auto& s : stop_) {
    const size_t p = full.find(s, emitted_.size());
    if (p != std::string::npos && p < stop_at) stop_at = p;
  }
  if (stop_at != std::string::npos) {
    stopped_ = true;
    safe = std::max(stop_at, emitted_.size());
  } else {
    // Hold back a tail that could be the start of a stop string.
    for (const auto& s : stop_)
      for (size_t k = std::min(s.size() - 1, safe); k > 0; --k)
        if (full.compare(safe - k, k, s, 0, k) == 0) {
          safe -= k;
          break;
        }
  }
  if (safe <= emitted_.size()) return "";
  std::string piece = full.substr(emitted_.size(), safe - emitted_.size());
  emitted_ += piece;
  return piece;
}

std::string TextStream::flush() {
  if (stopped_) return "";
  const std::string full = tok_.decode(ids_);
  if (full.size() <= emitted_.size()) return "";
  std::string piece = full.substr(emitted_.size());
  emitted_ = full;
  return piece;
}

}  // namespace mp
