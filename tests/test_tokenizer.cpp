#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <iterator>
#include <random>

#include <sentencepiece_processor.h>

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

// A long text is encoded in parts cut at single spaces, where the tokenizer allows it: the ids
// are SentencePiece's for the whole text, for the test tokenizer, the shipped model's and a
// Llama one (both keep runs of spaces, and their dummy prefix stands for the cut space).
TEST(Tokenizer, LongTextsEncodeAsSentencePieceDoesTheWholeText) {
  const Config c = mp::testing::small_config();
  std::vector<std::unique_ptr<Tokenizer>> toks;
  toks.push_back(std::make_unique<Tokenizer>(fixture_bytes(), c));
  toks.push_back(std::make_unique<Tokenizer>(
      Model::load(std::string(MULTIPOLE_SOURCE_DIR) + "/models/default.gguf")->tokenizer().model_bytes(),
      [] { Config d = mp::testing::small_config(); d.vocab_size = 1 << 16; return d; }()));
  {
    std::ifstream f(std::string(MULTIPOLE_TEST_DATA) + "/golden-llama/tokenizer.model", std::ios::binary);
    Config d = c;
    d.vocab_size = 1 << 16;
    toks.push_back(std::make_unique<Tokenizer>(
        std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()), d));
  }
  EXPECT_TRUE(toks[1]->encodes_in_parts());
  EXPECT_TRUE(toks[2]->encodes_in_parts());
  const std::vector<std::string> words = {"the", "License,", "free", "  spaced", "\n", "\n\n",
                                          "\t", "Zürich", "東京", "🙂", "x.", "(GPL)", "42", " "};
  std::mt19937 rng(3);
  for (int round = 0; round < 4; ++round) {
    std::string text;
    while (text.size() < 120000) {  // cut in three or four parts
      text += words[rng() % words.size()];
      if (rng() % 3) text += ' ';
    }
    for (const auto& tok : toks) {
      sentencepiece::SentencePieceProcessor sp;
      ASSERT_TRUE(sp.LoadFromSerializedProto(tok->model_bytes()).ok());
      std::vector<int> whole;
      ASSERT_TRUE(sp.Encode(text, &whole).ok());
      whole.insert(whole.begin(), tok->bos());
      EXPECT_EQ(tok->encode(text, true), whole) << "round " << round;
    }
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

// The shipped model's tokenizer: no dummy prefix, 8,192 pieces (the fixture adds a dummy prefix).
std::unique_ptr<Tokenizer> default_model_tokenizer() {
  auto m = Model::load(mp::testing::test_data_dir() + "/../../models/default.gguf");
  return std::make_unique<Tokenizer>(m->tokenizer().model_bytes(), m->config());
}

// Random ids with many byte-fallback pieces (characters split across tokens, invalid UTF-8),
// control and hidden ids, and ids past the vocabulary.
std::vector<int> random_ids(const Tokenizer& tok, std::mt19937& rng, int n) {
  std::vector<int> bytes, byte_id(256, -1);
  for (int id = 0; id < tok.vocab_size(); ++id)
    if (tok.surface(id).kind == Tokenizer::Surface::Byte) {
      bytes.push_back(id);
      byte_id[static_cast<unsigned char>(tok.surface(id).text[0])] = id;
    }
  std::vector<int> ids;
  for (int i = 0; i < n; ++i) {
    const int r = rng() % 100;
    if (r < 35) {
      ids.push_back(bytes[rng() % bytes.size()]);
    } else if (r < 45) {  // a whole multi-byte character as byte pieces, often cut short
      const char* chars[] = {"\xC3\xA9", "\xE6\x9D\xB1", "\xF0\x9F\x99\x82", "\xE2\x86\x92"};
      const std::string c = chars[rng() % 4];
      const size_t len = rng() % 3 == 0 ? 1 + rng() % c.size() : c.size();
      for (size_t k = 0; k < len; ++k) ids.push_back(byte_id[static_cast<unsigned char>(c[k])]);
    } else if (r < 48) {
      ids.push_back(static_cast<int>(rng() % 4));  // unk, BOS, EOS, ...
    } else if (r < 49) {
      ids.push_back(tok.vocab_size() + static_cast<int>(rng() % 5));
    } else {
      ids.push_back(static_cast<int>(rng() % tok.vocab_size()));
    }
  }
  return ids;
}

// The reference: the whole text decoded again after every token, cut before the first stop
// string found in it.
std::string reference_stream(const Tokenizer& tok, const std::vector<int>& ids,
                             const std::vector<std::string>& stop) {
  for (size_t k = 1; k <= ids.size(); ++k) {
    const std::string text = tok.decode(std::span<const int>(ids).first(k));
    size_t at = std::string::npos;
    for (const auto& s : stop) at = std::min(at, text.find(s));
    if (at != std::string::npos) return text.substr(0, at);
  }
  return tok.decode(ids);
}

std::string stream_all(const Tokenizer& tok, const std::vector<int>& ids,
                       const std::vector<std::string>& stop) {
  TextStream s(tok, stop);
  std::string out;
  for (int id : ids) {
    out += s.push(id);
    if (s.stopped()) return out;
  }
  return out + s.flush();
}

TEST(TextStream, EqualsAFullDecodeOnRandomIdsForBothTokenizers) {
  const Tokenizer fixture(fixture_bytes(), mp::testing::small_config());
  const auto shipped = default_model_tokenizer();
  EXPECT_TRUE(fixture.strips_leading_space());
  EXPECT_FALSE(shipped->strips_leading_space());
  std::mt19937 rng(7);
  for (const Tokenizer* tok : std::vector<const Tokenizer*>{&fixture, shipped.get()}) {
    for (int trial = 0; trial < 2000; ++trial) {
      const auto ids = random_ids(*tok, rng, 1 + static_cast<int>(rng() % 40));
      ASSERT_EQ(stream_all(*tok, ids, {}), tok->decode(ids)) << "trial " << trial;
    }
  }
}

TEST(TextStream, StopStringsAcrossTokensAtTheStartAndAtTheEnd) {
  const Tokenizer fixture(fixture_bytes(), mp::testing::small_config());
  const auto shipped = default_model_tokenizer();
  std::mt19937 rng(11);
  int stopped = 0;
  for (const Tokenizer* tok : std::vector<const Tokenizer*>{&fixture, shipped.get()}) {
    for (int trial = 0; trial < 1500; ++trial) {
      const auto ids = random_ids(*tok, rng, 1 + static_cast<int>(rng() % 30));
      const std::string text = tok->decode(ids);
      // Stop strings cut from the text itself (so they occur, often spanning tokens), from its
      // very start or end, plus one that never occurs. Like any stop string sent as JSON they
      // are whole UTF-8 characters, and none holds U+FFFD, which stands for bytes that a later
      // token may still complete.
      std::vector<std::string> stop = {"\x01never\x02"};
      for (int k = 0; k < 2 && !text.empty(); ++k) {
        const size_t len = 1 + rng() % std::min<size_t>(6, text.size());
        const int where = static_cast<int>(rng() % 3);
        const size_t at = where == 0 ? 0 : where == 1 ? text.size() - len : rng() % (text.size() - len + 1);
        auto starts_character = [&](size_t i) {
          return i == text.size() || (static_cast<unsigned char>(text[i]) & 0xC0) != 0x80;
        };
        const std::string s = text.substr(at, len);
        if (starts_character(at) && starts_character(at + len) &&
            s.find("\xEF\xBF\xBD") == std::string::npos)
          stop.push_back(s);
      }
      const std::string expected = reference_stream(*tok, ids, stop);
      ASSERT_EQ(stream_all(*tok, ids, stop), expected)
          << "trial " << trial << ", stop strings " << ::testing::PrintToString(stop);
      stopped += expected.size() < text.size();
    }
  }
  EXPECT_GT(stopped, 1000);  // most cases really stop
}

// The work of one token is the same at token 100 and at token 20,000: a periodic id sequence
// (so both tokens are the same) costs the same bytes examined at both.
TEST(TextStream, WorkPerTokenDoesNotGrowWithTheText) {
  const auto tok = default_model_tokenizer();
  const std::vector<int> period = tok->encode("Zürich, \xE6\x9D\xB1 and the END of a line.\n", false);
  TextStream s(*tok, {"STOP", "never mind"});
  std::vector<uint64_t> cost;
  for (size_t i = 0; i < 20000 + period.size(); ++i) {
    const uint64_t before = s.work();
    s.push(period[i % period.size()]);
    cost.push_back(s.work() - before);
  }
  ASSERT_FALSE(s.stopped());
  const size_t late = 20000 - 20000 % period.size() + 100 % period.size();
  ASSERT_EQ(late % period.size(), 100 % period.size());
  EXPECT_GT(cost[100], 0u);
  EXPECT_EQ(cost[100], cost[late]);
  EXPECT_LE(*std::max_element(cost.begin(), cost.end()), 200u);
}

// fuzz_tokenizer's finding on the TextStream that decoded the whole text at every token
// (tests/fuzz/regressions/tokenizer): the U+FFFD shown for an unfinished byte sequence is not text
// yet, so a stop string must not match it; at the end it is final text, and a stop.
TEST(TextStream, StopStringsMatchFinishedTextOnly) {
  Tokenizer tok(fixture_bytes(), mp::testing::small_config());
  const std::string euro = "\xE2\x82\xAC", replacement = "\xEF\xBF\xBD";
  std::vector<int> bytes;  // the byte pieces <0xE2> <0x82> <0xAC>
  for (const char* piece : {"<0xE2>", "<0x82>", "<0xAC>"})
    for (int id = 0; id < tok.vocab_size(); ++id)
      if (tok.piece(id) == piece) bytes.push_back(id);
  ASSERT_EQ(bytes.size(), 3u);
  {
    TextStream s(tok, {replacement});
    std::string out;
    for (int id : bytes) out += s.push(id);
    out += s.flush();
    EXPECT_FALSE(s.stopped());
    EXPECT_EQ(out, euro);
  }
  {
    TextStream s(tok, {replacement});
    std::string out = s.push(tok.encode("a", false).back());
    out += s.push(bytes[0]);
    out += s.flush();  // the byte stays unfinished: its U+FFFD is final text, and a stop
    EXPECT_TRUE(s.stopped());
    EXPECT_EQ(out, tok.decode(tok.encode("a", false)));
  }
}

}  // namespace
