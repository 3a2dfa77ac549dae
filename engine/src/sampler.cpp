#include <algorithm>
#include <bit>
#include <climits>
#include <cmath>
#include <map>

#include "sampling.h"

namespace mp {

void SamplingParams::validate() const {
  auto need = [](bool ok, const char* what) {
    if (!ok) throw Error(std::string("sampling: ") + what);
  };
  need(std::isfinite(temperature) && temperature >= 0, "temperature must be >= 0");
  need(std::isfinite(top_p) && top_p > 0 && top_p <= 1, "top_p must be in (0, 1]");
  need(std::isfinite(min_p) && min_p >= 0 && min_p <= 1, "min_p must be in [0, 1]");
  need(std::isfinite(repetition_penalty) && repetition_penalty > 0,
       "repetition_penalty must be > 0");
  need(std::isfinite(presence_penalty) && std::abs(presence_penalty) <= 2,
       "presence_penalty must be in [-2, 2]");
  need(std::isfinite(frequency_penalty) && std::abs(frequency_penalty) <= 2,
       "frequency_penalty must be in [-2, 2]");
  need(penalty_last_n >= -1, "penalty_last_n must be >= -1");
}

Sampler::Sampler(const SamplingParams& p) : p_(p) {
  p.validate();
  rng_state_ = p.seed ^ 0x9E3779B97F4A7C15ull;
}

double Sampler::draw() {  // splitmix64
  uint64_t z = (rng_state_ += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * 0x1.0p-53;
}

std::vector<float> log_softmax(std::span<const float> logits) {
  double mx = -INFINITY;
  for (float x : logits) mx = std::max(mx, double(x));
  double sum = 0;
  for (float x : logits) sum += std::exp(double(x) - mx);
  const double lse = mx + std::log(sum);
  std::vector<float> out(logits.size());
  for (size_t i = 0; i < logits.size(); ++i) out[i] = static_cast<float>(double(logits[i]) - lse);
  return out;
}

bool penalties_on(const SamplingParams& p) {
  return p.repetition_penalty != 1.0f || p.presence_penalty != 0 || p.frequency_penalty != 0;
}

std::vector<std::pair<int, int>> penalty_counts(const SamplingParams& p,
                                                std::span<const int> history, int vocab) {
  if (!penalties_on(p)) return {};
  const size_t from = p.penalty_last_n < 0 || size_t(p.penalty_last_n) >= history.size()
                          ? 0
                          : history.size() - p.penalty_last_n;
  std::map<int, int> count;  // ordered: the same list on every platform
  for (size_t i = from; i < history.size(); ++i)
    if (history[i] >= 0 && history[i] < vocab) ++count[history[i]];
  return {count.begin(), count.end()};
}

PenaltyCounts::PenaltyCounts(const SamplingParams& p, int vocab)
    : active_(penalties_on(p) && p.penalty_last_n != 0), window_(p.penalty_last_n), vocab_(vocab) {}

void PenaltyCounts::add(int id, int delta) {
  if (id < 0 || id >= vocab_) return;
  auto it = std::lower_bound(counts_.begin(), counts_.end(), std::pair<int, int>(id, INT_MIN));
  work_ += 1 + std::bit_width(counts_.size());
  if (it != counts_.end() && it->first == id) {
    if ((it->second += delta) > 0) return;
    work_ += counts_.end() - it;
    counts_.erase(it);
  } else {
    work_ += counts_.end() - it;
    counts_.insert(it, {id, delta});
  }
}

void PenaltyCounts::push(int id) {
  if (!active_) return;
  add(id, 1);
  if (window_ < 0) return;
  if (ring_.size() < size_t(window_)) {
    ring_.push_back(id);
    return;
  }
  add(ring_[ring_head_], -1);  // the oldest token leaves the window
  ring_[ring_head_] = id;
  ring_head_ = (ring_head_ + 1) % ring_.size();
}

std::vector<std::pair<int, float>> top_logprobs(std::span<const float> lp, int n) {
  std::vector<int> idx(lp.size());
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int>(i);
  n = std::min<int>(n, static_cast<int>(idx.size()));
  std::partial_sort(idx.begin(), idx.begin() + n, idx.end(),
                    [&](int a, int b) { return lp[a] > lp[b] || (lp[a] == lp[b] && a < b); });
  std::vector<std::pair<int, float>> out;
  for (int i = 0; i < n; ++i) out.emplace_back(idx[i], lp[idx[i]]);
  return out;
}

namespace {
// The candidates (id, penalised logit) ordered as the filters need them, likeliest first (ties:
// lower id first); greedy: the first of them only; top-k: the first k only. by_full_sort: the
// whole list by a stable sort (the reference of the tests); else top-k and greedy by partial
// selection, O(n + k log k) instead of O(n log n) (8,192 ids, k = 40: a quarter of a generated
// token on the CPU went to the full sort).
std::vector<std::pair<int, double>> ordered_candidates(const SamplingParams& p,
                                                       std::span<const float> logits,
                                                       PenaltyList penalties, bool by_full_sort) {
  const int n = static_cast<int>(logits.size());
  std::vector<std::pair<int, double>> c(n);
  for (int i = 0; i < n; ++i) c[i] = {i, logits[i]};
  for (const auto& [id, k] : penalties)
    if (id >= 0 && id < n) c[id].second = penalized(c[id].second, p, k);
  const bool top_k = p.top_k > 0 && p.top_k < n;
  if (by_full_sort || !(p.temperature <= 0 || top_k)) {
    if (p.temperature <= 0 || !keeps_whole_vocabulary(p, n))
      std::stable_sort(c.begin(), c.end(), [](auto& a, auto& b) { return a.second > b.second; });
    if (p.temperature <= 0) c.resize(1);
    if (top_k) c.resize(p.top_k);
    return c;
  }
  // The stable sort's order as a strict total order: ids start in increasing order.
  auto before = [](auto& a, auto& b) {
    return a.second > b.second || (a.second == b.second && a.first < b.first);
  };
  if (p.temperature <= 0) return {*std::min_element(c.begin(), c.end(), before)};
  std::nth_element(c.begin(), c.begin() + (p.top_k - 1), c.end(), before);
  c.resize(p.top_k);
  std::sort(c.begin(), c.end(), before);
  return c;
}

std::vector<std::pair<int, float>> filtered_candidates(const SamplingParams& p,
                                                       std::span<const float> logits,
                                                       PenaltyList penalties, bool by_full_sort) {
  auto c = ordered_candidates(p, logits, penalties, by_full_sort);
  if (p.temperature <= 0) return {{c[0].first, 1.0f}};
  const double mx = std::max_element(c.begin(), c.end(), [](auto& a, auto& b) {
                      return a.second < b.second;
                    })->second;
  double sum = 0;
  for (auto& [id, l] : c) sum += (l = std::exp((l - mx) / p.temperature));
  for (auto& e : c) e.second /= sum;
  if (p.top_p < 1.0f) {  // smallest prefix whose mass reaches top_p
    double cum = 0;
    size_t keep = 0;
    while (keep < c.size() && cum < p.top_p) cum += c[keep++].second;
    c.resize(std::max<size_t>(keep, 1));
  }
  if (p.min_p > 0) {
    const double floor = p.min_p * c[0].second;
    size_t keep = 1;
    while (keep < c.size() && c[keep].second >= floor) ++keep;
    c.resize(keep);
  }
  sum = 0;
  for (auto& e : c) sum += e.second;
  std::vector<std::pair<int, float>> out;
  out.reserve(c.size());
  for (auto& [id, pr] : c) out.emplace_back(id, static_cast<float>(pr / sum));
  return out;
}
}  // namespace

std::vector<std::pair<int, float>> sample_candidates(const SamplingParams& p,
                                                     std::span<const float> logits,
                                                     PenaltyList penalties) {
  return filtered_candidates(p, logits, penalties, false);
}

std::vector<std::pair<int, float>> sample_candidates_by_full_sort(const SamplingParams& p,
                                                                  std::span<const float> logits,
                                                                  PenaltyList penalties) {
  return filtered_candidates(p, logits, penalties, true);
}

int pick_candidate(std::span<const std::pair<int, float>> candidates, double u) {
  double cum = 0;
  for (const auto& [id, pr] : candidates) {
    cum += pr;
    if (u < cum) return id;
  }
  return candidates.back().first;
}

}  // namespace mp
