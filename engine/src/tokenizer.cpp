#include <sentencepiece_processor.h>

#include <algorithm>

#include "multipole/multipole.h"

namespace mp {

struct Tokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
};

namespace {
const std::string kSpaceSymbol = "\xE2\x96\x81";  // U+2581, SentencePiece's space
const std::string kReplacement = "\xEF\xBF\xBD";  // U+FFFD

std::string replace_space_symbols(std::string_view s) {
  std::string out;
  for (size_t p = 0; p < s.size();) {
    const size_t q = std::min(s.find(kSpaceSymbol, p), s.size());
    out.append(s.substr(p, q - p));
    if (q < s.size()) out += ' ';
    p = q + kSpaceSymbol.size();
  }
  return out;
}
}  // namespace

Tokenizer::Tokenizer(std::string_view spm_model_bytes, const Config& c)
    : impl_(std::make_unique<Impl>()),
      bos_(c.bos_token_id),
      eos_(c.eos_token_id),
      add_bos_(c.add_bos) {
  auto& sp = impl_->sp;
  const auto st = sp.LoadFromSerializedProto(spm_model_bytes);
  if (!st.ok()) throw Error("tokenizer: cannot load the SentencePiece model: " + st.ToString());
  if (sp.GetPieceSize() > c.vocab_size)
    throw Error("tokenizer: " + std::to_string(sp.GetPieceSize()) +
                " pieces but the model's vocab_size is " + std::to_string(c.vocab_size));
  // Each piece as decode() renders it (checked against decode() by the tests).
  surfaces_.resize(sp.GetPieceSize());
  for (int id = 0; id < sp.GetPieceSize(); ++id) {
    Surface& s = surfaces_[id];
    const std::string piece = sp.IdToPiece(id);
    if (id == bos_ || id == eos_) {
      s.kind = Surface::Hidden;
    } else if (sp.IsControl(id)) {
      s.kind = Surface::Control;
    } else if (sp.IsByte(id)) {
      s.kind = Surface::Byte;
      s.text.assign(1, static_cast<char>(std::stoi(piece.substr(3, 2), nullptr, 16)));  // <0xAB>
    } else if (sp.IsUnknown(id)) {
      s.kind = Surface::Text;
      s.text = decode(std::span<const int>(&id, 1));  // the model's unknown surface, " ⁇ "
    } else {
      s.kind = Surface::Text;
      s.leading_space = piece.starts_with(kSpaceSymbol);
      s.text = replace_space_symbols(piece);
    }
  }
  // Whether the first piece loses its leading space (models with a dummy prefix): ask decode().
  for (int id = 0; id < sp.GetPieceSize(); ++id)
    if (surfaces_[id].leading_space && surfaces_[id].kind == Surface::Text) {
      strips_leading_space_ = !decode(std::span<const int>(&id, 1)).starts_with(' ');
      break;
    }
}

Tokenizer::~Tokenizer() = default;

const Tokenizer::Surface& Tokenizer::surface(int id) const {
  static const Surface hidden;
  return id >= 0 && id < static_cast<int>(surfaces_.size()) ? surfaces_[id] : hidden;
}

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

// --- TextStream ---------------------------------------------------------------------------------

namespace {
bool is_trail(unsigned char b) { return (b & 0xC0) == 0x80; }

// Length of the UTF-8 character starting with lead byte b as SentencePiece reads it (0: b
// cannot start one).
size_t utf8_length(unsigned char b) {
  if (b < 0x80) return 1;
  if ((b & 0xE0) == 0xC0) return 2;
  if ((b & 0xF0) == 0xE0) return 3;
  if ((b & 0xF8) == 0xF0) return 4;
  return 0;
}

// SentencePiece's test of a complete character: no overlong form, no surrogate, <= U+10FFFF.
bool valid_character(std::string_view c) {
  uint32_t cp = static_cast<unsigned char>(c[0]) & (0x7F >> c.size());
  for (size_t i = 1; i < c.size(); ++i) cp = (cp << 6) | (static_cast<unsigned char>(c[i]) & 0x3F);
  static constexpr uint32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
  return cp >= kMin[c.size()] && (cp < 0xD800 || (cp >= 0xE000 && cp <= 0x10FFFF));
}
}  // namespace

TextStream::TextStream(const Tokenizer& tok, std::vector<std::string> stop)
    : tok_(tok), stop_(std::move(stop)) {
  std::erase_if(stop_, [](const std::string& s) { return s.empty(); });
}

// Resolves the pending bytes of a run of byte pieces as SentencePiece does (one U+FFFD per byte
// that starts no valid character), keeping back a character that later bytes may complete.
std::string TextStream::take_bytes(bool run_ended) {
  std::string out;
  size_t i = 0;
  while (i < pending_.size()) {
    const size_t len = utf8_length(pending_[i]);
    size_t have = 1;
    while (have < len && i + have < pending_.size() && is_trail(pending_[i + have])) ++have;
    if (len > 0 && have == len && valid_character(std::string_view(pending_).substr(i, len))) {
      out.append(pending_, i, len);
      i += len;
    } else if (len > 0 && have < len && i + have == pending_.size() && !run_ended) {
      break;  // a character that the next byte may complete
    } else {
      out += kReplacement;
      ++i;
    }
  }
  work_ += pending_.size();
  pending_.erase(0, i);
  return out;
}

std::string TextStream::emit(std::string_view text) {
  held_ += text;
  work_ += held_.size() * std::max<size_t>(1, stop_.size());
  size_t stop_at = std::string::npos;
  for (const auto& s : stop_) stop_at = std::min(stop_at, held_.find(s));
  if (stop_at != std::string::npos) {
    stopped_ = true;
    return held_.substr(0, stop_at);
  }
  // Hold back the longest tail that could be the start of a stop string.
  size_t keep = 0;
  for (const auto& s : stop_)
    for (size_t k = std::min(s.size() - 1, held_.size()); k > keep; --k)
      if (held_.compare(held_.size() - k, k, s, 0, k) == 0) {
        keep = k;
        break;
      }
  std::string out = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return out;
}

std::string TextStream::push(int id) {
  if (stopped_) return "";
  const Tokenizer::Surface& s = tok_.surface(id);
  switch (s.kind) {
    case Tokenizer::Surface::Hidden:
      return "";
    case Tokenizer::Surface::Control:
      return emit(take_bytes(true));
    case Tokenizer::Surface::Byte:
      at_start_ = false;
      pending_ += s.text;
      return emit(take_bytes(false));
    case Tokenizer::Surface::Text: {
      std::string text = take_bytes(true);
      const bool strip = at_start_ && s.leading_space && tok_.strips_leading_space();
      text.append(s.text, strip ? 1 : 0);
      at_start_ = false;
      return emit(text);
    }
  }
  return "";
}

std::string TextStream::flush() {
  if (stopped_) return "";
  std::string out = emit(take_bytes(true));
  if (!stopped_) out += held_;
  held_.clear();
  return out;
}

}  // namespace mp
