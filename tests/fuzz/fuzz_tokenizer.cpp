// The tokenizer on arbitrary input. First byte even: the rest are 16-bit token ids (any value,
// negative and past the vocabulary included), decoded whole, piece by piece and through a
// TextStream with a stop string; odd: the rest is arbitrary bytes, encoded and decoded again.
#include <cstring>

#include "fuzz_support.h"

MULTIPOLE_FUZZ_TARGET(fuzz_tokenizer) {
  using namespace mp;
  if (size == 0) return 0;
  const Tokenizer& tok = fuzz::fixture_tokenizer();
  if (data[0] % 2 == 0) {
    // data[1]: length of a stop string taken from the end of the input.
    const size_t stop_len = size > 1 ? std::min<size_t>(data[1] % 8, size - 2) : 0;
    const uint8_t* ids_at = data + std::min<size_t>(size, 2);
    const size_t ids_bytes = size - std::min<size_t>(size, 2) - stop_len;
    std::vector<int> ids(ids_bytes / 2);
    for (size_t i = 0; i < ids.size(); ++i) {
      int16_t v;
      std::memcpy(&v, ids_at + 2 * i, 2);
      ids[i] = v;
    }
    const std::string whole = tok.decode(ids);
    for (int id : ids) (void)tok.piece(id);
    std::vector<std::string> stop;
    if (stop_len) stop.emplace_back(reinterpret_cast<const char*>(data + size - stop_len), stop_len);
    TextStream ts(tok, stop);
    std::string streamed;
    for (int id : ids) streamed += ts.push(id);
    streamed += ts.flush();
    if (!ts.stopped()) fuzz::check(streamed == whole, "a stream without stop is the decode");
    else fuzz::check(whole.compare(0, streamed.size(), streamed) == 0,
                     "a stopped stream is a prefix of the decode");
  } else {
    const std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);
    const std::vector<int> ids = tok.encode(text, true);
    for (int id : ids) fuzz::check(id >= 0 && id < tok.vocab_size(), "ids in the vocabulary");
    (void)tok.decode(ids);
  }
  return 0;
}
