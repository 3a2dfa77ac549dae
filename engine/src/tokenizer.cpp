#include <sentencepiece_processor.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <thread>

#include "multipole/multipole.h"

namespace mp {


namespace {
const std::string kSpaceSymbol = "\xE2\x96\x81";  // U+2581, SentencePiece's space
// SentencePiece encodes about 0.5 MB of text a second (340k tokens of prose: 5.5 s on this
// project's CPU), far slower than a GPU reads the tokens: long texts are encoded in parts of
// about this many bytes, on several threads.
constexpr size_t kEncodePart = 32 << 10;
bool is_space(char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; }
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

struct Tokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
  // How a text may be cut before a single space between two words so that its parts encode to
  // its tokens (splitting()): not at all, keeping the space in the next part, or dropping it
  // there (tokenizers whose dummy prefix stands for it, e.g. Llama's).
  enum class Split { None, KeepSpace, DropSpace } split = Split::None;
  std::vector<int> encode(std::string_view text) const {
    std::vector<int> ids;
    const auto st = sp.Encode(text, &ids);
    if (!st.ok()) throw Error("tokenizer: encode failed: " + st.ToString());
    return ids;
  }
  // A cut is safe when no piece holds the space symbol past its first character unless it is
  // all spaces (no token straddles a word's start; runs of spaces are never cut), and a word
  // after the cut encodes alone as it does in the text, checked on a few pairs.
  Split splitting() const {
    for (int id = 0; id < sp.GetPieceSize(); ++id) {
      const std::string p = sp.IdToPiece(id);
      if (p.find(kSpaceSymbol, 1) == std::string::npos) continue;
      for (size_t i = 0; i < p.size(); i += kSpaceSymbol.size())
        if (p.compare(i, kSpaceSymbol.size(), kSpaceSymbol) != 0) return Split::None;
    }
    auto holds = [&](bool keep) {
      for (auto [a, b] : {std::pair{"the", "cat"}, {"1", "2"}, {"x.", "y"}, {"\xC3\xA9t\xC3\xA9", "\xE2\x82\xAC"}}) {
        std::vector<int> parts = encode(a), tail = encode(std::string(keep ? " " : "") + b);
        parts.insert(parts.end(), tail.begin(), tail.end());
        if (parts != encode(std::string(a) + " " + b)) return false;
      }
      return true;
    };
    return holds(false) ? Split::DropSpace : holds(true) ? Split::KeepSpace : Split::None;
  }
};

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
  impl_->split = impl_->splitting();
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

bool Tokenizer::encodes_in_parts() const { return impl_->split != Impl::Split::None; }

std::vector<int> Tokenizer::encode(std::string_view text, bool add_bos) const {
  // Parts end at a single space between two words, about kEncodePart bytes apart (whitespace
  // runs and line breaks stay whole); one part when the tokenizer cannot be cut.
  std::vector<std::string_view> parts;
  const bool drop = impl_->split == Impl::Split::DropSpace;
  for (size_t at = 0; at < text.size();) {
    size_t end = text.size();
    if (impl_->split != Impl::Split::None && text.size() - at > 2 * kEncodePart) {
      end = at + kEncodePart;
      while (end + 1 < text.size() &&
             !(text[end] == ' ' && !is_space(text[end - 1]) && !is_space(text[end + 1])))
        ++end;
      if (end + 1 >= text.size()) end = text.size();
    }
    parts.push_back(text.substr(at, end - at));
    at = end + (drop && end < text.size() ? 1 : 0);
  }
  std::vector<std::vector<int>> encoded(parts.size());
  const size_t threads = std::min<size_t>(parts.size(), std::max(1u, std::thread::hardware_concurrency()));
  std::vector<std::thread> pool;
  std::atomic<size_t> next{0};
  std::exception_ptr failed;
  std::mutex failed_mu;
  auto work = [&] {
    for (size_t i; (i = next++) < parts.size();) try {
        encoded[i] = impl_->encode(parts[i]);
      } catch (...) {
        std::lock_guard<std::mutex> lock(failed_mu);
        failed = std::current_exception();
      }
  };
  for (size_t t = 1; t < threads; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (failed) std::rethrow_exception(failed);
  std::vector<int> ids;
  if (add_bos) ids.push_back(bos_);
  for (const auto& part : encoded) ids.insert(ids.end(), part.begin(), part.end());
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
// that starts no valid character), keeping back a character that later bytes may complete;
// appends the resolved text to `to`.
void TextStream::take_bytes(bool run_ended, std::string& to) {
  if (pending_.empty()) return;
  size_t i = 0;
  while (i < pending_.size()) {
    const size_t len = utf8_length(pending_[i]);
    size_t have = 1;
    while (have < len && i + have < pending_.size() && is_trail(pending_[i + have])) ++have;
    if (len > 0 && have == len && valid_character(std::string_view(pending_).substr(i, len))) {
      to.append(pending_, i, len);
      i += len;
    } else if (len > 0 && have < len && i + have == pending_.size() && !run_ended) {
      break;  // a character that the next byte may complete
    } else {
      to += kReplacement;
      ++i;
    }
  }
  work_ += pending_.size();
  pending_.erase(0, i);
}

// Moves the safe part of held_ to `out`: all of it but a tail that may start a stop string, or
// what comes before a stop string (which stops the stream).
void TextStream::release(std::string& out) {
  work_ += held_.size() * stop_.size();
  size_t stop_at = std::string::npos;
  for (const auto& s : stop_) stop_at = std::min(stop_at, held_.find(s));
  if (stop_at != std::string::npos) {
    stopped_ = true;
    out.append(held_, 0, stop_at);
    held_.clear();
    return;
  }
  // Hold back the longest tail that could be the start of a stop string.
  size_t keep = 0;
  for (const auto& s : stop_)
    for (size_t k = std::min(s.size() - 1, held_.size()); k > keep; --k)
      if (held_.compare(held_.size() - k, k, s, 0, k) == 0) {
        keep = k;
        break;
      }
  out.append(held_, 0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
}

void TextStream::push(int id, std::string& out) {
  if (stopped_) return;
  const Tokenizer::Surface& s = tok_.surface(id);
  if (s.kind == Tokenizer::Surface::Hidden) return;
  // Without stop strings the text is safe as soon as it is resolved: straight into `out`.
  std::string& to = stop_.empty() ? out : held_;
  const size_t before = to.size();
  switch (s.kind) {
    case Tokenizer::Surface::Hidden:
      break;
    case Tokenizer::Surface::Control:
      take_bytes(true, to);
      break;
    case Tokenizer::Surface::Byte:
      at_start_ = false;
      pending_ += s.text;
      take_bytes(false, to);
      break;
    case Tokenizer::Surface::Text: {
      take_bytes(true, to);
      const bool strip = at_start_ && s.leading_space && tok_.strips_leading_space();
      to.append(s.text, strip ? 1 : 0);
      at_start_ = false;
      break;
    }
  }
  if (stop_.empty())
    work_ += to.size() - before;
  else
    release(out);
}

std::string TextStream::push(int id) {
  std::string out;
  push(id, out);
  return out;
}

std::string TextStream::flush() {
  if (stopped_) return "";
  std::string out;
  take_bytes(true, stop_.empty() ? out : held_);
  if (!stop_.empty()) release(out);
  if (!stopped_) out += held_;
  held_.clear();
  return out;
}

}  // namespace mp
