#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <set>

#include "backend_cpu.h"
#include "multipole/multipole.h"
#include "sampling.h"

namespace {

using namespace mp;

std::vector<float> logits_from_probs(const std::vector<double>& p) {
  std::vector<float> l;
  for (double x : p) l.push_back(static_cast<float>(std::log(x)));
  return l;
}

std::set<int> kept(const SamplingParams& sp, const std::vector<float>& logits) {
  std::set<int> ids;
  for (auto [id, pr] : Sampler(sp).candidates(logits, {})) ids.insert(id);
  return ids;
}

SamplingParams plain() {
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_k = 0;
  p.top_p = 1.0f;
  p.min_p = 0.0f;
  return p;
}

const std::vector<float> kLogits = logits_from_probs({0.05, 0.4, 0.1, 0.25, 0.15, 0.05});

TEST(Sampler, TopKKeepsTheKMostLikely) {
  auto p = plain();
  p.top_k = 3;
  EXPECT_EQ(kept(p, kLogits), (std::set<int>{1, 3, 4}));
}

TEST(Sampler, TopPKeepsTheSmallestPrefixReachingP) {
  auto p = plain();
  p.top_p = 0.65f;  // 0.4 + 0.25 = 0.65 reaches it
  EXPECT_EQ(kept(p, kLogits), (std::set<int>{1, 3}));
  p.top_p = 0.66f;
  EXPECT_EQ(kept(p, kLogits), (std::set<int>{1, 3, 4}));
}

TEST(Sampler, MinPDropsTokensBelowAFractionOfTheBest) {
  auto p = plain();
  p.min_p = 0.3f;  // floor 0.12
  EXPECT_EQ(kept(p, kLogits), (std::set<int>{1, 3, 4}));
  p.min_p = 0.24f;  // floor 0.096: 0.1 stays
  EXPECT_EQ(kept(p, kLogits), (std::set<int>{1, 2, 3, 4}));
}

TEST(Sampler, ProbabilitiesAreRenormalised) {
  auto p = plain();
  p.top_k = 2;
  const auto c = Sampler(p).candidates(kLogits, {});
  ASSERT_EQ(c.size(), 2u);
  EXPECT_NEAR(c[0].second, 0.4 / 0.65, 1e-6);
  EXPECT_NEAR(c[1].second, 0.25 / 0.65, 1e-6);
}

TEST(Sampler, WithoutFiltersEveryTokenStaysInIdOrder) {
  auto p = plain();
  p.temperature = 0.5f;  // probabilities proportional to p^2
  const auto c = Sampler(p).candidates(kLogits, {});
  double z = 0;
  for (float l : kLogits) z += std::exp(2.0 * l);
  ASSERT_EQ(c.size(), kLogits.size());
  for (size_t i = 0; i < c.size(); ++i) {
    EXPECT_EQ(c[i].first, int(i));
    EXPECT_NEAR(c[i].second, std::exp(2.0 * kLogits[i]) / z, 1e-6);
  }
  EXPECT_EQ(pick_candidate(c, 0.0), 0);
  EXPECT_EQ(pick_candidate(c, 0.999999), 5);
}

TEST(Sampler, GreedyTakesTheArgmax) {
  auto p = plain();
  p.temperature = 0;
  for (int i = 0; i < 10; ++i) EXPECT_EQ(Sampler(p).sample(kLogits, {}), 1);
}

TEST(Sampler, SameSeedSameDrawsAndFrequenciesFollowProbabilities) {
  std::mt19937 rng(1);
  std::vector<float> logits(50);
  for (auto& x : logits) x = std::normal_distribution<float>(0, 2)(rng);
  auto p = plain();
  p.seed = 42;
  Sampler a(p), b(p);
  std::vector<int> da, db;
  for (int i = 0; i < 200; ++i) {
    da.push_back(a.sample(logits, {}));
    db.push_back(b.sample(logits, {}));
  }
  EXPECT_EQ(da, db);
  p.seed = 43;
  Sampler c(p);
  std::vector<int> dc;
  for (int i = 0; i < 200; ++i) dc.push_back(c.sample(logits, {}));
  EXPECT_NE(da, dc);
  // Empirical frequency of the most likely token.
  const auto probs = log_softmax(logits);
  const int best = int(std::max_element(logits.begin(), logits.end()) - logits.begin());
  int hits = 0;
  const int n = 20000;
  for (int i = 0; i < n; ++i) hits += a.sample(logits, {}) == best;
  EXPECT_NEAR(double(hits) / n, std::exp(probs[best]), 0.015);
}

TEST(Sampler, PenaltiesLowerRepeatedTokens) {
  auto p = plain();
  p.temperature = 0;
  std::vector<float> l = {2.0f, 1.9f, 0.5f};
  auto sample = [&](const std::vector<int>& history) {
    return Sampler(p).sample(l, penalty_counts(p, history, 3));
  };
  std::vector<int> hist = {0};
  p.repetition_penalty = 1.1f;  // 2.0 / 1.1 = 1.82 < 1.9
  EXPECT_EQ(sample(hist), 1);
  p.repetition_penalty = 1.0f;
  p.presence_penalty = 0.05f;  // 1.95 > 1.9
  EXPECT_EQ(sample(hist), 0);
  p.frequency_penalty = 0.06f;  // 2.0 - 2 * 0.06 = 1.88 < 1.9
  std::vector<int> hist2 = {0, 0};
  p.presence_penalty = 0;
  EXPECT_EQ(sample(hist2), 1);
  p.penalty_last_n = 1;  // only the last id counts
  std::vector<int> hist3 = {0, 0, 2};
  EXPECT_EQ(sample(hist3), 0);
}

// PenaltyCounts, kept one token at a time, equals the counts recomputed over the whole history,
// for every window setting (ids outside the vocabulary take a place in the window, no count).
TEST(PenaltyCounts, EqualRecomputedCountsForEveryWindow) {
  std::mt19937 rng(3);
  const int V = 50;
  for (int window : {-1, 0, 1, 2, 7, 64, 5000}) {
    for (int which = 0; which < 3; ++which) {
      auto p = plain();
      p.penalty_last_n = window;
      (which == 0 ? p.repetition_penalty : which == 1 ? p.presence_penalty : p.frequency_penalty) =
          0.5f;
      PenaltyCounts counts(p, V);
      std::vector<int> history;
      for (int i = 0; i < 1500; ++i) {
        const int id = rng() % 20 == 0 ? V + int(rng() % 3) : int(rng() % (i < 700 ? 12 : V));
        history.push_back(id);
        counts.push(id);
        const auto expected = penalty_counts(p, history, V);
        const std::vector<std::pair<int, int>> got(counts.counts().begin(), counts.counts().end());
        ASSERT_EQ(got, expected)
            << "window " << window << " after " << i + 1 << " tokens";
      }
    }
  }
  PenaltyCounts off(plain(), V);  // no penalty on: nothing is kept
  for (int i = 0; i < 100; ++i) off.push(i % V);
  EXPECT_TRUE(off.counts().empty());
  EXPECT_EQ(off.work(), 0u);
}

// The work of a token is the same at token 100 and at token 20,000 (a periodic sequence, so both
// are the same token in the same window), for a bounded window and for the whole history.
TEST(PenaltyCounts, WorkPerTokenDoesNotGrowWithTheHistory) {
  for (int window : {-1, 64}) {
    auto p = plain();
    p.frequency_penalty = 0.3f;
    p.penalty_last_n = window;
    PenaltyCounts counts(p, 1000);
    std::vector<uint64_t> cost;
    for (int i = 0; i <= 20000; ++i) {
      const uint64_t before = counts.work();
      counts.push((i * 37) % 50);
      cost.push_back(counts.work() - before);
    }
    EXPECT_GT(cost[100], 0u);
    EXPECT_EQ(cost[100], cost[20000]) << "window " << window;  // 20000 = 100 (mod 50)
  }
}

// Greedy, top-k, and top-p and min-p without top-k, by partial selection (a heap of the k best;
// the value buckets holding the mass that top-p keeps) give the same candidates, probabilities
// bit for bit, and so the same tokens, as the stable sort of the whole vocabulary: random logits
// (some rounded to create ties, some -inf, some nearly flat so that top-p keeps most of the
// vocabulary), random penalties, every filter combination.
TEST(Sampler, PartialSelectionEqualsTheFullSort) {
  std::mt19937 rng(11);
  const int V = 8192;
  int compared = 0;
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<float> logits(V);
    std::normal_distribution<float> normal(0, trial % 11 == 4 ? 0.05f : 3.0f);
    for (auto& x : logits) x = normal(rng);
    if (trial % 3 == 1)  // many ties
      for (auto& x : logits) x = std::round(x * 2) / 2;
    if (trial % 5 == 2)
      for (int i = 0; i < V; i += 7) logits[i] = -INFINITY;
    SamplingParams p = plain();
    const int top_ks[] = {0, 1, 2, 40, 100, V - 1, V, V + 5};
    p.top_k = top_ks[trial % 8];
    p.temperature = trial % 4 == 0 ? 0.0f : std::uniform_real_distribution<float>(0.2f, 2)(rng);
    p.top_p = trial % 2 ? 1.0f : 0.9f;
    p.min_p = trial % 6 < 3 ? 0.0f : 0.05f;
    p.repetition_penalty = trial % 7 == 0 ? 1.3f : 1.0f;
    p.presence_penalty = trial % 9 == 0 ? 0.5f : 0.0f;
    std::vector<int> history;
    for (int i = 0; i < 64; ++i) history.push_back(int(rng() % 300));
    const auto pens = penalty_counts(p, history, V);
    const auto want = sample_candidates_by_full_sort(p, logits, pens);
    const auto got = sample_candidates(p, logits, pens);
    ASSERT_EQ(got, want) << "trial " << trial << ", top_k " << p.top_k;
    for (int u = 0; u < 20; ++u) {
      const double draw = std::uniform_real_distribution<double>(0, 1)(rng);
      ASSERT_EQ(pick_candidate(got, draw), pick_candidate(want, draw));
    }
    compared += int(got.size());
  }
  EXPECT_GT(compared, 1000);  // not only greedy single candidates
}

TEST(Sampler, RejectsBadParameters) {
  auto p = plain();
  p.top_p = 0;
  EXPECT_THROW(Sampler{p}, Error);
  p = plain();
  p.temperature = -1;
  EXPECT_THROW(Sampler{p}, Error);
  p = plain();
  p.temperature = NAN;
  EXPECT_THROW(Sampler{p}, Error);
}

// The sampled token's log-probability without top_logprobs (one log-sum-exp, no vector) is
// log_softmax's value bit for bit, as with top_logprobs, on fresh random rows.
TEST(Sampler, LogprobWithoutTheVectorIsLogSoftmaxs) {
  std::mt19937 rng(17);
  std::normal_distribution<float> normal(0, 4);
  SamplingParams p;
  p.top_k = 0;
  p.top_p = 1.0f;
  p.min_p = 0;
  for (int row = 0; row < 20; ++row) {
    std::vector<float> logits(1000 + row * 37);
    for (float& x : logits) x = normal(rng);
    const std::vector<float> lp = log_softmax(logits);
    for (int n : {0, 3}) {
      const SampleSpec spec{&p, {}, (row + 0.5) / 20, n};
      const SampledToken t = sample_on_host(spec, logits);
      EXPECT_EQ(t.logprob, lp[t.token]) << "row " << row << " top_logprobs " << n;
      EXPECT_EQ(t.top_logprobs.size(), size_t(n));
      if (n > 0) {
        EXPECT_EQ(t.top_logprobs[0].second, *std::max_element(lp.begin(), lp.end()));
      }
    }
  }
}

}  // namespace
