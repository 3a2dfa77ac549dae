#include "evals.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>

namespace mp::evals {
namespace {

// -log softmax(row)[target], in double.
double nll_of(std::span<const float> row, int target) {
  double mx = -INFINITY, sum = 0;
  for (float x : row) mx = std::max(mx, double(x));
  for (float x : row) sum += std::exp(double(x) - mx);
  return mx + std::log(sum) - row[target];
}

double mean(std::span<const double> v) {
  return v.empty() ? NAN : std::accumulate(v.begin(), v.end(), 0.0) / double(v.size());
}

// Reserves `n` slots of b for one evaluation and frees them whatever happens.
class Slots {
 public:
  Slots(Backend& b, int n) : b_(b) {
    for (int i = 0; i < n; ++i) {
      const int s = b.alloc_slot();
      if (s < 0) {
        release();
        throw Error("evaluations: the backend has fewer than " + std::to_string(n) +
                    " free slots");
      }
      ids_.push_back(s);
    }
  }
  ~Slots() { release(); }
  int operator[](int i) const { return ids_[i]; }

 private:
  void release() {
    for (int s : ids_) b_.free_slot(s);
    ids_.clear();
  }
  Backend& b_;
  std::vector<int> ids_;
};

template <class... A>
std::string fmt(const char* f, A... a) {
  char buf[256];
  std::snprintf(buf, sizeof buf, f, a...);
  return buf;
}

}  // namespace

std::vector<int> Stream::slice(int64_t start, size_t n) const {
  const auto N = static_cast<int64_t>(tokens.size());
  std::vector<int> out(n);
  int64_t at = ((start % N) + N) % N;
  for (auto& t : out) {
    t = tokens[at];
    if (++at == N) at = 0;
  }
  return out;
}

Stream read_stream(const Tokenizer& tok, std::string_view text) {
  Stream s;
  for (size_t at = 0; at <= text.size();) {
    size_t end = text.find('\f', at);
    if (end == std::string_view::npos) end = text.size();
    const std::string_view doc = text.substr(at, end - at);
    at = end + 1;
    if (doc.find_first_not_of(" \n\t\r") == std::string_view::npos) continue;
    const size_t start = s.tokens.size();
    s.tokens.push_back(tok.bos());
    const auto ids = tok.encode(doc, false);
    s.tokens.insert(s.tokens.end(), ids.begin(), ids.end());
    s.tokens.push_back(tok.eos());
    s.docs.emplace_back(start, s.tokens.size() - start);
  }
  if (s.docs.empty()) throw Error("evaluations: the held-out text holds no document");
  return s;
}

std::vector<double> append(Backend& b, int slot, std::span<const int> tokens, int chunk,
                           bool nll, std::vector<float>* last) {
  if (chunk <= 0) throw Error("evaluations: chunk must be positive");
  const size_t V = static_cast<size_t>(b.config().vocab_size);
  std::vector<double> out;
  for (size_t i = 0; i < tokens.size(); i += chunk) {
    const size_t n = std::min(tokens.size() - i, size_t(chunk));
    const SeqChunk c{slot, tokens.subspan(i, n), nll};
    const std::vector<float> logits = b.forward({&c, 1});
    if (nll)
      for (size_t t = 0; t < n && i + t + 1 < tokens.size(); ++t)
        out.push_back(nll_of(std::span<const float>(logits).subspan(t * V, V), tokens[i + t + 1]));
    if (last && i + n == tokens.size()) last->assign(logits.end() - V, logits.end());
  }
  return out;
}

// --- 1. By position on fixed text ---------------------------------------------------------------

std::vector<size_t> position_spans(const Stream& s, const PositionOptions& o) {
  if (o.span < 2) throw Error("position evaluation: --span must be at least 2");
  if (o.spans < 1) throw Error("position evaluation: --spans must be at least 1");
  std::vector<size_t> order(s.docs.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return s.docs[a].second > s.docs[b].second; });
  std::vector<size_t> starts;
  for (size_t d : order) {
    const auto [start, len] = s.docs[d];
    if (starts.size() == size_t(o.spans) || len < size_t(o.span) + 2) break;
    starts.push_back(start + len - 1 - o.span);  // the span ends at the document's last token
  }
  if (starts.size() < size_t(o.spans))
    throw Error("position evaluation: only " + std::to_string(starts.size()) +
                " documents hold a span of " + std::to_string(o.span) + " tokens, " +
                std::to_string(o.spans) + " wanted");
  return starts;
}

PositionResult position_eval(Backend& b, const Stream& s, const PositionOptions& o, int chunk) {
  PositionResult r;
  r.contexts = o.contexts;
  r.span_starts = position_spans(s, o);
  Slots slot(b, 1);
  for (int64_t c : o.contexts) {
    if (c < 0) throw Error("position evaluation: a context is negative");
    std::vector<double> per_span, all;
    for (size_t start : r.span_starts) {
      b.reset_slot(slot[0]);
      if (c > 0) append(b, slot[0], s.slice(int64_t(start) - c, size_t(c)), chunk, false);
      const auto nll = append(b, slot[0], s.slice(int64_t(start), size_t(o.span)), chunk, true);
      per_span.push_back(mean(nll));
      all.insert(all.end(), nll.begin(), nll.end());
    }
    r.nll.push_back(per_span);
    r.mean_nll.push_back(mean(all));
  }
  return r;
}

// --- 2. Copy ------------------------------------------------------------------------------------

std::vector<CopyCase> copy_cases(const Stream& s, const CopyOptions& o) {
  if (o.passage < 2) throw Error("copy evaluation: --passage must be at least 2");
  if (o.passages < 1) throw Error("copy evaluation: --passages must be at least 1");
  if (o.gaps.empty()) throw Error("copy evaluation: no gap given");
  for (size_t i = 0; i < o.gaps.size(); ++i)
    if (o.gaps[i] < 1 || (i > 0 && o.gaps[i] <= o.gaps[i - 1]))
      throw Error("copy evaluation: gaps must be positive and ascending");
  const size_t N = s.tokens.size(), P = size_t(o.passage);
  if (size_t(o.gaps.back()) + P > N / 2)
    throw Error("copy evaluation: the held-out text (" + std::to_string(N) +
                " tokens) is too short for a gap of " + std::to_string(o.gaps.back()) +
                ": it needs twice the gap and passage");
  // Passage k starts in the first document at or after k N / passages whose text (BOS and EOS
  // left out) holds it; its other text starts N / 2 further on, so they never overlap.
  std::vector<CopyCase> cases;
  size_t d = 0;
  for (int k = 0; k < o.passages; ++k) {
    const size_t want = size_t(k) * N / size_t(o.passages);
    while (d < s.docs.size() && (s.docs[d].first + s.docs[d].second <= want ||
                                 s.docs[d].second < P + 2))
      ++d;
    if (d == s.docs.size())
      throw Error("copy evaluation: too few documents of " + std::to_string(P + 2) +
                  " tokens for " + std::to_string(o.passages) + " passages");
    const auto [start, len] = s.docs[d];
    const size_t a = std::clamp(want, start + 1, start + len - 1 - P);
    cases.push_back({a, (a + N / 2) % N});
  }
  return cases;
}

std::vector<int> copy_sequence(const Stream& s, const CopyCase& c, int passage, int64_t gap,
                               int bos, bool first_copy) {
  const auto p = s.slice(int64_t(c.passage), size_t(passage));
  const auto other = s.slice(int64_t(c.filler), size_t(gap));
  std::vector<int> seq{bos};
  if (first_copy) seq.insert(seq.end(), p.begin(), p.end());
  seq.insert(seq.end(), other.begin(), other.end());
  seq.insert(seq.end(), p.begin(), p.end());
  return seq;
}

CopyResult copy_eval(Backend& b, const Stream& s, const CopyOptions& o, int chunk) {
  CopyResult r;
  r.gaps = o.gaps;
  r.cases = copy_cases(s, o);
  r.second_nll.assign(o.gaps.size(), {});
  r.control_nll.assign(o.gaps.size(), {});
  Slots slot(b, 3);  // with the first copy, without it, a fork of either
  const int bos = b.config().bos_token_id;
  for (const CopyCase& c : r.cases) {
    const auto passage = s.slice(int64_t(c.passage), size_t(o.passage));
    std::vector<int> first{bos};
    first.insert(first.end(), passage.begin(), passage.end());
    b.reset_slot(slot[0]);
    const auto nll = append(b, slot[0], first, chunk, true);  // passage tokens 0..P-1
    r.first_nll.push_back(mean(std::span<const double>(nll).subspan(1)));
    b.reset_slot(slot[1]);
    append(b, slot[1], std::span<const int>(&bos, 1), chunk, false);
    int64_t fed = 0;
    for (size_t g = 0; g < o.gaps.size(); ++g) {
      const auto other = s.slice(int64_t(c.filler) + fed, size_t(o.gaps[g] - fed));
      fed = o.gaps[g];
      for (int with_first : {1, 0}) {
        const int stream = with_first ? slot[0] : slot[1];
        append(b, stream, other, chunk, false);
        b.copy_slot(stream, slot[2]);
        (with_first ? r.second_nll : r.control_nll)[g].push_back(
            mean(append(b, slot[2], passage, chunk, true)));
      }
    }
  }
  return r;
}

// --- 3. Passkey ---------------------------------------------------------------------------------

namespace {
const std::string kIntro =
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there.";
const std::string kFiller =
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
const std::string kQuestion = " What is the pass key? The pass key is";

std::string needle(const std::string& key) {
  return " The pass key is " + key + ". Remember it. " + key + " is the pass key.";
}

// `ids` starts with `prefix`, else the tokenizer merged tokens across a part's edge (then the
// prompts of two keys could differ before their needles).
void check_prefix(std::span<const int> ids, std::span<const int> prefix, const char* where) {
  if (ids.size() < prefix.size() || !std::equal(prefix.begin(), prefix.end(), ids.begin()))
    throw Error(std::string("passkey evaluation: the tokenizer joins tokens across ") + where);
}
}  // namespace

PasskeyPrompt passkey_prompt(const Tokenizer& tok, int64_t context, double depth,
                             const std::string& key) {
  if (!(depth >= 0 && depth <= 1)) throw Error("passkey evaluation: depths must lie in [0, 1]");
  const auto tokens = [&](const std::string& t) { return int64_t(tok.encode(t, false).size()); };
  // Token counts in context (a tokenizer with a dummy prefix adds one to a part encoded alone);
  // the filler count comes from a fixed key, so that every key shares the prompt's start.
  const int64_t fixed = 1 + tokens(kIntro + needle("00000") + kQuestion),
                filler = 1 + tokens(kIntro + (kFiller + needle("00000")) + kQuestion) - fixed;
  if (context < fixed + filler)
    throw Error("passkey evaluation: context " + std::to_string(context) +
                " is too short for the prompt (at least " + std::to_string(fixed + filler) +
                " tokens)");
  const int64_t k = (context - fixed) / filler, before = std::llround(depth * double(k));
  std::string head = kIntro, text;
  for (int64_t i = 0; i < before; ++i) head += kFiller;
  text = head + needle(key);
  for (int64_t i = before; i < k; ++i) text += kFiller;
  text += kQuestion;
  PasskeyPrompt p;
  p.prompt.push_back(tok.bos());
  const auto body = tok.encode(text, false);
  p.prompt.insert(p.prompt.end(), body.begin(), body.end());
  const auto head_ids = tok.encode(head, false);
  check_prefix(body, head_ids, "the needle's start");
  p.shared = p.needle = 1 + head_ids.size();
  const auto answered = tok.encode(text + " " + key, false);
  check_prefix(answered, body, "the answer's start");
  p.answer.assign(answered.begin() + std::ptrdiff_t(body.size()), answered.end());
  return p;
}

std::string passkey_key(uint64_t seed, int trial) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + uint64_t(trial) + 1;  // splitmix64
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return std::to_string(10000 + z % 90000);
}

std::string first_digits(std::string_view text) {
  const size_t a = text.find_first_of("0123456789");
  if (a == std::string_view::npos) return "";
  const size_t e = text.find_first_not_of("0123456789", a);
  return std::string(text.substr(a, e == std::string_view::npos ? e : e - a));
}

std::vector<PasskeyCell> passkey_eval(Backend& b, const Tokenizer& tok, const PasskeyOptions& o,
                                      int chunk) {
  if (o.trials < 1) throw Error("passkey evaluation: --trials must be at least 1");
  Slots slot(b, 3);  // the shared start, a trial's prompt and answer, its greedy decoding
  std::vector<PasskeyCell> cells;
  for (int64_t context : o.contexts) {
    for (double depth : o.depths) {
      PasskeyCell cell{.context = context, .depth = depth, .trials = o.trials};
      double logprob = 0;
      for (int t = 0; t < o.trials; ++t) {
        const std::string key = passkey_key(o.seed, t);
        const PasskeyPrompt p = passkey_prompt(tok, context, depth, key);
        if (t == 0) {
          cell.tokens = int64_t(p.prompt.size());
          cell.distance = int64_t(p.prompt.size() - p.needle);
          b.reset_slot(slot[0]);
          append(b, slot[0], std::span<const int>(p.prompt).first(p.shared), chunk, false);
        }
        b.copy_slot(slot[0], slot[1]);
        std::vector<float> last;
        append(b, slot[1], std::span<const int>(p.prompt).subspan(p.shared), chunk, false, &last);
        b.copy_slot(slot[1], slot[2]);
        // Log-probability of the key's tokens, fed one after the other.
        double nll = nll_of(last, p.answer[0]);
        for (double x : append(b, slot[1], p.answer, chunk, true)) nll += x;
        logprob -= nll;
        // Greedy decoding: as many tokens as the key's, and two more.
        std::vector<int> generated;
        for (size_t g = 0; g < p.answer.size() + 2; ++g) {
          generated.push_back(int(std::max_element(last.begin(), last.end()) - last.begin()));
          append(b, slot[2], std::span<const int>(generated).last(1), chunk, false, &last);
        }
        cell.correct += first_digits(tok.decode(generated)) == key;
      }
      cell.mean_logprob = logprob / o.trials;
      cells.push_back(cell);
    }
  }
  return cells;
}

// --- Tables -------------------------------------------------------------------------------------

std::string position_table(const PositionResult& r) {
  std::string t = "| context before the span | perplexity |", sep = "|---|---|";
  for (size_t i = 0; i < r.span_starts.size(); ++i) {
    t += fmt(" span %zu |", i + 1);
    sep += "---|";
  }
  t += "\n" + sep + "\n";
  for (size_t c = 0; c < r.contexts.size(); ++c) {
    t += fmt("| %lld | %.2f |", (long long)r.contexts[c], std::exp(r.mean_nll[c]));
    for (double x : r.nll[c]) t += fmt(" %.2f |", std::exp(x));
    t += "\n";
  }
  return t;
}

std::string copy_table(const CopyResult& r, int passage) {
  const double first = mean(r.first_nll);
  std::string t =
      "| D (tokens between the copies) | distance (D + passage) | NLL, first copy | "
      "NLL, second copy | drop (first - second) | NLL, passage without a first copy | "
      "gain (without - second) |\n"
      "|---|---|---|---|---|---|---|\n";
  for (size_t g = 0; g < r.gaps.size(); ++g) {
    const double second = mean(r.second_nll[g]), control = mean(r.control_nll[g]);
    t += fmt("| %lld | %lld | %.3f | %.3f | %.3f | %.3f | %.3f |\n", (long long)r.gaps[g],
             (long long)(r.gaps[g] + passage), first, second, first - second, control,
             control - second);
  }
  return t;
}

std::string passkey_table(const std::vector<PasskeyCell>& cells) {
  std::vector<double> depths;
  for (const auto& c : cells)
    if (std::find(depths.begin(), depths.end(), c.depth) == depths.end()) depths.push_back(c.depth);
  std::string t = "| context (tokens) |";
  for (double d : depths) t += fmt(" depth %g |", d);
  t += " all |\n|---|";
  for (size_t i = 0; i <= depths.size(); ++i) t += "---|";
  t += "\n";
  for (size_t i = 0; i < cells.size(); i += depths.size()) {
    int correct = 0, trials = 0;
    double lp = 0;
    t += fmt("| %lld |", (long long)cells[i].context);
    for (size_t j = i; j < i + depths.size(); ++j) {
      const auto& c = cells[j];
      t += fmt(" %d/%d (%.2f) |", c.correct, c.trials, c.mean_logprob);
      correct += c.correct;
      trials += c.trials;
      lp += c.mean_logprob * c.trials;
    }
    t += fmt(" %.0f %% (%.2f) |\n", 100.0 * correct / trials, lp / trials);
  }
  return t;
}

}  // namespace mp::evals
