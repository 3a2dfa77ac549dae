// The long-range evaluations (engine/common/evals.h): the inputs they build, their scoring
// against a model whose answers are known (an induction oracle), and their forked runs against
// whole sequences scored from scratch on a real model.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>
#include <numeric>
#include <random>
#include <sstream>

#include "common/evals.h"
#include "model_fixture.h"

namespace {

using namespace mp;
using namespace mp::evals;
using mp::testing::random_tokens;
using mp::testing::VariantModel;

std::unique_ptr<Tokenizer> fixture_tokenizer(const Config& c) {
  std::ifstream in(mp::testing::fixture_tokenizer_path(), std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return std::make_unique<Tokenizer>(ss.str(), c);
}

// A model that copies: after a token it predicts what followed the most recent earlier
// occurrence of the longest suffix (up to kMatch tokens) of the sequence so far, with logit kHit
// against 0 for every other token; with no earlier occurrence every token scores 0.
class InductionOracle : public Backend {
 public:
  static constexpr int kMatch = 4;
  static constexpr float kHit = 8;
  explicit InductionOracle(Config c) : c_(std::move(c)), seqs_(3), used_(3) {}
  std::string name() const override { return "induction oracle"; }
  const Config& config() const override { return c_; }
  int n_slots() const override { return 3; }
  int alloc_slot() override {
    for (int i = 0; i < 3; ++i)
      if (!used_[i]) {
        used_[i] = true;
        seqs_[i].clear();
        return i;
      }
    return -1;
  }
  void free_slot(int s) override { used_.at(s) = false; }
  void reset_slot(int s) override { seqs_.at(s).clear(); }
  void copy_slot(int src, int dst) override { seqs_.at(dst) = seqs_.at(src); }
  int64_t slot_pos(int s) const override { return int64_t(seqs_.at(s).size()); }
  std::vector<uint8_t> save_slot(int) const override { throw Error("not kept"); }
  void load_slot(int, std::span<const uint8_t>) override { throw Error("not kept"); }
  size_t slot_bytes(int) const override { return 0; }
  int prefill_tokens_per_step() const override { return 64; }
  std::vector<float> forward(std::span<const SeqChunk> chunks) override {
    std::vector<float> out;
    for (const auto& ch : chunks) {
      auto& seq = seqs_.at(ch.slot);
      for (size_t i = 0; i < ch.tokens.size(); ++i) {
        seq.push_back(ch.tokens[i]);
        if (!ch.all_logits && i + 1 < ch.tokens.size()) continue;
        std::vector<float> row(size_t(c_.vocab_size), 0.0f);
        if (const int next = predict(seq); next >= 0) row[size_t(next)] = kHit;
        out.insert(out.end(), row.begin(), row.end());
      }
    }
    return out;
  }
  // NLL of a predicted token, of any token when the oracle predicts none.
  double hit_nll() const { return std::log(std::exp(double(kHit)) + c_.vocab_size - 1) - kHit; }
  double blind_nll() const { return std::log(double(c_.vocab_size)); }

 private:
  static int predict(const std::vector<int>& seq) {
    const size_t n = seq.size();
    for (size_t k = std::min<size_t>(kMatch, n - 1); k >= 1; --k)
      for (size_t end = n - 1; end-- >= k;)  // an earlier occurrence ending at `end`
        if (std::equal(seq.end() - k, seq.end(), seq.begin() + (end + 1 - k)))
          return seq[end + 1];
    return -1;
  }
  Config c_;
  std::vector<std::vector<int>> seqs_;
  std::vector<bool> used_;
};

double mean_of(std::span<const double> v) {
  return std::accumulate(v.begin(), v.end(), 0.0) / double(v.size());
}

TEST(Evals, StreamHoldsDocumentsBetweenBosAndEosAndWraps) {
  const Config c = mp::testing::small_config();
  const auto tok = fixture_tokenizer(c);
  const Stream s = read_stream(*tok, "first document\fsecond one\f \n \f");
  ASSERT_EQ(s.docs.size(), 2u);
  std::vector<int> want{tok->bos()};
  for (const char* d : {"first document", "second one"}) {
    const auto ids = tok->encode(d, false);
    if (want.size() > 1) want.push_back(tok->bos());
    want.insert(want.end(), ids.begin(), ids.end());
    want.push_back(tok->eos());
  }
  EXPECT_EQ(s.tokens, want);
  EXPECT_EQ(s.docs[1].first, s.docs[0].second);
  EXPECT_EQ(s.docs[1].first + s.docs[1].second, s.tokens.size());
  const auto wrapped = s.slice(-2, 4);  // the last two tokens, then the first two
  EXPECT_EQ(wrapped, (std::vector<int>{want[want.size() - 2], want.back(), want[0], want[1]}));
  EXPECT_THROW(read_stream(*tok, "\f\n\f"), Error);
}

TEST(Evals, PasskeyPromptBuriesTheKeyAtItsDepth) {
  const Config c = mp::testing::small_config();
  const auto tok = fixture_tokenizer(c);
  const size_t filler =
      tok->encode("x The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.", false).size() -
      tok->encode("x", false).size();
  const auto count = [](const std::string& text, const std::string& part) {
    size_t n = 0;
    for (size_t at = text.find(part); at != std::string::npos; at = text.find(part, at + 1)) ++n;
    return n;
  };
  for (double depth : {0.0, 0.5, 1.0}) {
    const auto p = passkey_prompt(*tok, 2000, depth, "40213");
    SCOPED_TRACE(depth);
    EXPECT_EQ(p.prompt[0], tok->bos());
    EXPECT_NEAR(double(p.prompt.size()), 2000 - double(filler) / 2, double(filler) / 2 + 4);
    EXPECT_EQ(p.shared, p.needle);
    EXPECT_EQ(first_digits(tok->decode(p.answer)), "40213");
    const std::string text = tok->decode(p.prompt);
    EXPECT_TRUE(text.ends_with(". What is the pass key? The pass key is"));
    EXPECT_EQ(count(text, "40213"), 2u);
    EXPECT_NE(text.find("The pass key is 40213. Remember it. 40213 is the pass key."), std::string::npos);
    // The needle starts right after `depth` of the fillers.
    const std::string head = tok->decode(std::span<const int>(p.prompt).first(p.needle));
    const std::string rest = tok->decode(std::span<const int>(p.prompt).subspan(p.needle));
    EXPECT_EQ(rest.find("The pass key is 40213"), rest.find_first_not_of(' '));
    const double before = double(count(head, "back again.")), all = before + double(count(rest, "back again."));
    EXPECT_GE(all, 10);
    EXPECT_EQ(before, std::round(depth * all));
    // Another key shares everything up to the needle.
    const auto q = passkey_prompt(*tok, 2000, depth, "99999");
    EXPECT_EQ(q.shared, p.shared);
    EXPECT_TRUE(std::equal(p.prompt.begin(), p.prompt.begin() + std::ptrdiff_t(p.shared), q.prompt.begin()));
  }
  EXPECT_THROW(passkey_prompt(*tok, 40, 0.5, "12345"), Error);
  EXPECT_THROW(passkey_prompt(*tok, 2000, 1.5, "12345"), Error);
  EXPECT_EQ(first_digits(" 123 45"), "123");
  EXPECT_EQ(first_digits("none"), "");
  EXPECT_EQ(passkey_key(7, 3).size(), 5u);
  EXPECT_NE(passkey_key(7, 3), passkey_key(7, 4));
}

// With every token distinct the oracle recalls the passage on its second copy, and only there;
// it finds every key.
TEST(Evals, OracleScoresItsKnownAnswers) {
  Config c = mp::testing::small_config();
  c.vocab_size = 5000;
  InductionOracle oracle(c);
  Stream s;
  s.tokens.resize(4997);
  std::iota(s.tokens.begin(), s.tokens.end(), 3);
  std::shuffle(s.tokens.begin(), s.tokens.end(), std::mt19937(5));
  s.docs = {{0, 1200}, {1200, 3797}};
  CopyOptions co{.passage = 16, .gaps = {8, 40, 300}, .passages = 3};
  const CopyResult r = copy_eval(oracle, s, co, 7);
  ASSERT_EQ(r.cases.size(), 3u);
  for (const auto& cs : r.cases) {
    const bool in_doc = std::any_of(s.docs.begin(), s.docs.end(), [&](auto d) {
      return cs.passage > d.first && cs.passage + 16 < d.first + d.second;
    });
    EXPECT_TRUE(in_doc) << cs.passage;
    EXPECT_EQ(cs.filler, (cs.passage + s.tokens.size() / 2) % s.tokens.size());
  }
  for (size_t k = 0; k < r.cases.size(); ++k) {
    EXPECT_NEAR(r.first_nll[k], oracle.blind_nll(), 1e-9);
    for (size_t g = 0; g < co.gaps.size(); ++g) {
      EXPECT_NEAR(r.second_nll[g][k], oracle.hit_nll(), 1e-9);
      EXPECT_NEAR(r.control_nll[g][k], oracle.blind_nll(), 1e-9);
    }
  }
  EXPECT_THROW(copy_eval(oracle, s, {.passage = 16, .gaps = {40, 8}, .passages = 1}, 7), Error);
  EXPECT_THROW(copy_eval(oracle, s, {.passage = 16, .gaps = {3000}, .passages = 1}, 7), Error);

  Config small = mp::testing::small_config();
  InductionOracle reader(small);
  const auto tok = fixture_tokenizer(small);
  PasskeyOptions po{.contexts = {300, 700}, .depths = {0, 0.5, 1}, .trials = 3, .seed = 9};
  const auto cells = passkey_eval(reader, *tok, po, 64);
  ASSERT_EQ(cells.size(), 6u);
  for (const auto& cell : cells) {
    EXPECT_EQ(cell.correct, 3);
    const double n = double(passkey_prompt(*tok, cell.context, cell.depth, passkey_key(9, 0)).answer.size());
    EXPECT_NEAR(cell.mean_logprob, -n * reader.hit_nll(), 1e-6);
    EXPECT_LE(cell.tokens, cell.context);
  }
  EXPECT_GT(cells[0].distance, cells[2].distance);  // depth 0 lies furthest back
}

// The forked, chunked runs give what each whole sequence gives when scored from scratch.
TEST(Evals, ForkedRunsEqualWholeSequencesFromScratch) {
  const VariantModel vm;  // small_config(): n = 64, the contexts reach past it
  const Config& c = vm.config;
  auto b = make_backend(vm.model, {.kind = "cpu", .n_slots = 3, .n_threads = 1});
  auto ref = make_backend(vm.model, {.kind = "cpu", .n_slots = 1, .n_threads = 1});
  Stream s;
  s.tokens = random_tokens(900, c.vocab_size, 3);
  s.docs = {{0, 100}, {100, 300}, {400, 60}, {460, 440}};
  const int chunk = 13;

  const PositionOptions po{.contexts = {0, 5, 70, 150}, .span = 20, .spans = 2};
  const PositionResult pr = position_eval(*b, s, po, chunk);
  EXPECT_EQ(pr.span_starts, (std::vector<size_t>{900 - 1 - 20, 400 - 1 - 20}));
  for (size_t ci = 0; ci < po.contexts.size(); ++ci)
    for (size_t k = 0; k < pr.span_starts.size(); ++k) {
      const int64_t ctx = po.contexts[ci];
      const auto seq = s.slice(int64_t(pr.span_starts[k]) - ctx, size_t(ctx + po.span));
      const auto nll = token_nlls(*ref, seq, 512);
      EXPECT_NEAR(pr.nll[ci][k], mean_of(std::span<const double>(nll).last(po.span - 1)), 1e-5);
    }

  const CopyOptions co{.passage = 12, .gaps = {4, 30, 90}, .passages = 2};
  const CopyResult cr = copy_eval(*b, s, co, chunk);
  for (size_t k = 0; k < cr.cases.size(); ++k) {
    const auto& cs = cr.cases[k];
    for (size_t g = 0; g < co.gaps.size(); ++g) {
      const auto with = copy_sequence(s, cs, 12, co.gaps[g], c.bos_token_id, true);
      const auto without = copy_sequence(s, cs, 12, co.gaps[g], c.bos_token_id, false);
      ASSERT_EQ(with.size(), size_t(1 + 24 + co.gaps[g]));
      EXPECT_TRUE(std::equal(with.begin() + 1, with.begin() + 13, with.end() - 12));
      EXPECT_EQ(s.slice(int64_t(cs.filler), 1)[0], with[13]);
      const auto nw = token_nlls(*ref, with, 512), nc = token_nlls(*ref, without, 512);
      EXPECT_NEAR(cr.second_nll[g][k], mean_of(std::span<const double>(nw).last(11)), 1e-5);
      EXPECT_NEAR(cr.control_nll[g][k], mean_of(std::span<const double>(nc).last(11)), 1e-5);
      EXPECT_NEAR(cr.first_nll[k], mean_of(std::span<const double>(nw).subspan(1, 11)), 1e-5);
    }
  }

  const PasskeyOptions ko{.contexts = {300, 420}, .depths = {0, 1}, .trials = 2, .seed = 4};
  const auto cells = passkey_eval(*b, vm.model->tokenizer(), ko, chunk);
  for (const auto& cell : cells) {
    double logprob = 0;
    int correct = 0;
    for (int t = 0; t < 2; ++t) {
      const std::string key = passkey_key(4, t);
      const auto p = passkey_prompt(vm.model->tokenizer(), cell.context, cell.depth, key);
      auto seq = p.prompt;
      seq.insert(seq.end(), p.answer.begin(), p.answer.end());
      const auto nll = token_nlls(*ref, seq, 512);
      for (double x : std::span<const double>(nll).last(p.answer.size())) logprob -= x;
      // Greedy decoding token by token from a fresh slot.
      const int slot = ref->alloc_slot();
      std::vector<float> last;
      append(*ref, slot, p.prompt, 512, false, &last);
      std::vector<int> gen;
      for (size_t g = 0; g < p.answer.size() + 2; ++g) {
        gen.push_back(int(std::max_element(last.begin(), last.end()) - last.begin()));
        append(*ref, slot, std::span<const int>(gen).last(1), 512, false, &last);
      }
      ref->free_slot(slot);
      correct += first_digits(vm.model->tokenizer().decode(gen)) == key;
    }
    EXPECT_NEAR(cell.mean_logprob, logprob / 2, 1e-4);
    EXPECT_EQ(cell.correct, correct);
  }
}

}  // namespace
