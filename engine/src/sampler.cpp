#include <algorithm>
#include <array>
#include <bit>
#include <climits>
#include <cmath>
#include <map>
#include <sstream>

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

SamplingParams SamplingRecommendation::over(SamplingParams base) const {
  base.temperature = temperature.value_or(base.temperature);
  base.top_k = top_k.value_or(base.top_k);
  base.top_p = top_p.value_or(base.top_p);
  base.min_p = min_p.value_or(base.min_p);
  base.repetition_penalty = repetition_penalty.value_or(base.repetition_penalty);
  base.penalty_last_n = penalty_last_n.value_or(base.penalty_last_n);
  return base;
}

void SamplingRecommendation::merge(const SamplingRecommendation& o) {
  if (o.temperature) temperature = o.temperature;
  if (o.top_k) top_k = o.top_k;
  if (o.top_p) top_p = o.top_p;
  if (o.min_p) min_p = o.min_p;
  if (o.repetition_penalty) repetition_penalty = o.repetition_penalty;
  if (o.penalty_last_n) penalty_last_n = o.penalty_last_n;
}

std::string SamplingRecommendation::describe() const {
  std::string s;
  auto add = [&s](const char* name, const auto& v) {
    if (!v) return;
    std::ostringstream o;
    o << (s.empty() ? "" : ", ") << name << " " << *v;
    s += o.str();
  };
  add("temp", temperature);
  add("top_k", top_k);
  add("top_p", top_p);
  add("min_p", min_p);
  add("penalty_repeat", repetition_penalty);
  add("penalty_last_n", penalty_last_n);
  return s.empty() ? "none" : s;
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

double log_sum_exp(std::span<const float> logits) {
  double mx = -INFINITY;
  for (float x : logits) mx = std::max(mx, double(x));
  double sum = 0;
  for (float x : logits) sum += std::exp(double(x) - mx);
  return mx + std::log(sum);
}

std::vector<float> log_softmax(std::span<const float> logits) {
  const double lse = log_sum_exp(logits);
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
using Candidates = std::vector<std::pair<int, double>>;  // (id, penalised logit), likeliest first

// The sampler's order as a strict total order (the stable sort's: ties, lower id first).
constexpr auto likelier = [](const std::pair<int, double>& a, const std::pair<int, double>& b) {
  return a.second > b.second || (a.second == b.second && a.first < b.first);
};

// The n likeliest ids of `l` (n <= l.size()), ordered: a heap of the n best so far, each id
// compared with its worst (O(V + n log n log(V/n)) on typical rows, against O(V log V) for the
// stable sort of the whole vocabulary it replaced: 8,192 ids, k = 40, a quarter of a generated
// token on the CPU went to that sort).
Candidates likeliest(std::span<const double> l, size_t n) {
  Candidates c;
  c.reserve(n);
  for (int i = 0; i < int(l.size()); ++i) {
    const std::pair<int, double> x{i, l[i]};
    if (c.size() < n) {
      c.push_back(x);
      std::push_heap(c.begin(), c.end(), likelier);  // front: the least likely kept
    } else if (likelier(x, c.front())) {
      std::pop_heap(c.begin(), c.end(), likelier);
      c.back() = x;
      std::push_heap(c.begin(), c.end(), likelier);
    }
  }
  std::sort_heap(c.begin(), c.end(), likelier);
  return c;
}

// The whole vocabulary by a stable sort: the tests' reference (sample_candidates_by_full_sort).
Candidates sorted_vocabulary(std::span<const double> l) {
  Candidates c(l.size());
  for (size_t i = 0; i < l.size(); ++i) c[i] = {int(i), l[i]};
  std::stable_sort(c.begin(), c.end(), [](auto& a, auto& b) { return a.second > b.second; });
  return c;
}

// Top-p (the smallest prefix of the ordered candidates whose probabilities reach top_p), then
// min-p (those at least min_p times the first's), on candidates holding probabilities: cuts `c`
// to what they keep and returns its mass, or -1 where `beyond` (ids past the candidates exist)
// and the kept prefix may go on past them.
double filter(Candidates& c, const SamplingParams& p, bool beyond) {
  size_t keep = c.size();
  if (p.top_p < 1.0f) {
    double cum = 0;
    keep = 0;
    while (keep < c.size() && cum < p.top_p) cum += c[keep++].second;
    if (beyond && keep == c.size() && cum < p.top_p) return -1;
    keep = std::max<size_t>(keep, 1);
  }
  if (p.min_p > 0) {
    const double floor = p.min_p * c[0].second;
    size_t kept = 1;
    while (kept < keep && c[kept].second >= floor) ++kept;
    if (beyond && kept == c.size() && p.top_p >= 1.0f) return -1;
    keep = kept;
  }
  c.resize(keep);
  double mass = 0;
  for (auto& e : c) mass += e.second;
  return mass;
}

// Without top-k, the likeliest ids that top-p and min-p may keep, ordered: those of the value
// buckets (a quarter of the temperature wide, from the largest value down) whose weights w (w_i =
// exp((l_i - max) / T), `sum` theirs) reach top_p of the mass and pass min-p, and one bucket
// more against rounding; the caller checks that the filters' prefix ends inside them.
Candidates likeliest_by_mass(std::span<const double> l, std::span<const double> w, double sum,
                             double mx, const SamplingParams& p) {
  constexpr int kBuckets = 256;
  const double T = p.temperature;
  auto bucket = [&](double x) {
    const double d = (mx - x) / T * 4;
    return d < kBuckets - 1 ? int(d) : kBuckets - 1;  // -inf logits in the last
  };
  std::array<double, kBuckets> mass{};
  for (size_t i = 0; i < l.size(); ++i) mass[bucket(l[i])] += w[i];
  int last = kBuckets - 1;
  if (p.top_p < 1.0f) {
    double cum = 0;
    for (int b = 0; b < kBuckets; ++b)
      if ((cum += mass[b]) >= p.top_p * sum) {
        last = b;
        break;
      }
  }
  if (p.min_p > 0) last = std::min(last, bucket(mx + T * std::log(double(p.min_p))));
  last = std::min(last + 1, kBuckets - 1);
  Candidates c;
  for (int i = 0; i < int(l.size()); ++i)
    if (bucket(l[i]) <= last) c.emplace_back(i, l[i]);
  std::sort(c.begin(), c.end(), likelier);
  return c;
}

// The candidates and their probabilities as the host samples: greedy, the whole vocabulary in id
// order (no filter), or the likeliest ids kept by top-k, then top-p (the smallest prefix whose
// mass reaches top_p), then min-p, renormalised. Without top-k the probabilities are normalised
// over the whole vocabulary (summed in id order), so that top-p and min-p need only the ids that
// likeliest_by_mass finds (the same prefix as the full sort's; the whole vocabulary sorted where
// the prefix does not end inside them). by_full_sort: the whole vocabulary sorted (the reference).
std::vector<std::pair<int, float>> filtered_candidates(const SamplingParams& p,
                                                       std::span<const float> logits,
                                                       PenaltyList penalties, bool by_full_sort) {
  const int n = static_cast<int>(logits.size());
  std::vector<double> l(logits.begin(), logits.end());
  for (const auto& [id, k] : penalties)
    if (id >= 0 && id < n) l[id] = penalized(l[id], p, k);
  const bool top_k = p.top_k > 0 && p.top_k < n;
  if (p.temperature <= 0)
    return {{(by_full_sort ? sorted_vocabulary(l) : likeliest(l, 1))[0].first, 1.0f}};
  const double T = p.temperature;
  auto normalised = [](const Candidates& c, double sum) {
    std::vector<std::pair<int, float>> out;
    out.reserve(c.size());
    for (auto& [id, pr] : c) out.emplace_back(id, static_cast<float>(pr / sum));
    return out;
  };
  if (top_k) {
    Candidates c = by_full_sort ? sorted_vocabulary(l) : likeliest(l, p.top_k);
    c.resize(p.top_k);
    const double mx = c[0].second;
    double sum = 0;
    for (auto& e : c) sum += (e.second = std::exp((e.second - mx) / T));
    for (auto& e : c) e.second /= sum;
    return normalised(c, filter(c, p, false));
  }
  const double mx = *std::max_element(l.begin(), l.end());
  std::vector<double> w(n);
  double sum = 0;
  for (int i = 0; i < n; ++i) sum += (w[i] = std::exp((l[i] - mx) / T));
  if (keeps_whole_vocabulary(p, n)) {  // every id, in id order
    std::vector<std::pair<int, float>> out(n);
    double renorm = 0;
    for (double& x : w) renorm += (x /= sum);
    for (int i = 0; i < n; ++i) out[i] = {i, static_cast<float>(w[i] / renorm)};
    return out;
  }
  auto probabilities = [&](Candidates c) {
    for (auto& e : c) e.second = w[e.first] / sum;
    return c;
  };
  Candidates c =
      probabilities(by_full_sort ? sorted_vocabulary(l) : likeliest_by_mass(l, w, sum, mx, p));
  double renorm = filter(c, p, c.size() < size_t(n));
  if (renorm < 0) {  // the prefix goes on past the candidates: the whole vocabulary
    c = probabilities(sorted_vocabulary(l));
    renorm = filter(c, p, false);
  }
  return normalised(c, renorm);
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
