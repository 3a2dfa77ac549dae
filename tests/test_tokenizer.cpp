#include <gtest/gtest.h>

#include <fstream>
#include <iterator>

#include "checkpoint.h"

namespace {

using namespace mp;

std::string fixture_bytes() {
  std::ifstream f(mp::testing::fixture_tokenizer_path(), std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

TEST(Tokenizer, RoundTripsTextIncludingBytesOutsideTheVocabulary) {
  Tokenizer tok(fixture_bytes(), mp::testing::small_config());
  EXPECT_EQ(tok.vocab_size(), 400);
  for (std::string text : {"The GNU General Public License is a free, copyleft license.",
                           "Zürich → 東京 🙂 tabs\tand  spaces", "x"}) {
    const auto ids = tok.encode(text, false);
    EXPECT_FALSE(ids.empty());
    EXPECT_EQ(tok.decode(ids), text);
    const auto with_bos = tok.encode(text, true);
    EXPECT_EQ(with_bos.front(), 1);
    EXPECT_EQ(tok.decode(with_bos), text);
  }
}

// model_bytes() gives a model that loads into a tokenizer encoding exactly as the original.
TEST(Tokenizer, ModelBytesReloadIntoTheSameTokenizer) {
  const Tokenizer a(fixture_bytes(), mp::testing::small_config());
  const Tokenizer b(a.model_bytes(), mp::testing::small_config());
  const std::string text = "Zürich → 東京: the GNU General Public License\n\tis free.";
  EXPECT_EQ(a.encode(text, true), b.encode(text, true));
  EXPECT_EQ(b.vocab_size(), a.vocab_size());
}

TEST(Tokenizer, RefusesGarbage) {
  EXPECT_THROW(Tokenizer("not a model", mp::testing::small_config()), Error);
}

TEST(TextStream, EmitsWholeCharactersAndStopsAtStopStrings) {
  Tokenizer tok(fixture_bytes(), mp::testing::small_config());
  const std::string text = "free 東京 software. END of it";
  const auto ids = tok.encode(text, false);
  {
    TextStream s(tok, {});
    std::string out;
    for (int id : ids) {
      const std::string piece = s.push(id);
      // Every piece is valid UTF-8 on its own.
      for (size_t i = 0; i < piece.size();) {
        const unsigned char c = piece[i];
        const size_t len = c < 0x80 ? 1 : c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
        ASSERT_LE(i + len, piece.size()) << "split character in '" << piece << "'";
        i += len;
      }
      out += piece;
    }
    out += s.flush();
    EXPECT_EQ(out, text);
  }
  {
    TextStream s(tok, {"END", "never"});
    std::string out;
    for (int id : ids) {
      out += s.push(id);
      if (s.stopped()) break;
    }
    EXPECT_TRUE(s.stopped());
    EXPECT_EQ(out, "free 東京 software. ");
  }
}

}  // namespace
