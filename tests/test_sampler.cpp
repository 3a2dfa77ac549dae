#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <set>

#include "multipole/multipole.h"

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
  std::vector<int> hist = {0};
  p.repetition_penalty = 1.1f;  // 2.0 / 1.1 = 1.82 < 1.9
  EXPECT_EQ(Sampler(p).sample(l, hist), 1);
  p.repetition_penalty = 1.0f;
  p.presence_penalty = 0.05f;  // 1.95 > 1.9
  EXPECT_EQ(Sampler(p).sample(l, hist), 0);
  p.frequency_penalty = 0.06f;  // 2.0 - 2 * 0.06 = 1.88 < 1.9
  std::vector<int> hist2 = {0, 0};
  p.presence_penalty = 0;
  EXPECT_EQ(Sampler(p).sample(l, hist2), 1);
  p.penalty_last_n = 1;  // only the last id counts
  std::vector<int> hist3 = {0, 0, 2};
  EXPECT_EQ(Sampler(p).sample(l, hist3), 0);
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

}  // namespace
