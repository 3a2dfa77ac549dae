// Long-range evaluations of a model through any backend (docs/MODEL.md, "Long-range
// evaluations"): perplexity by position on fixed text, a copy test (a passage repeated after D
// tokens of other text) and passkey retrieval. multipole-evals runs them; the tests check the
// inputs they build and their scoring.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "multipole/multipole.h"

namespace mp::evals {

// Held-out text as one token stream: documents (BOS text EOS) back to back. Reads past either
// end wrap around, so a context may reach back further than the text before a span.
struct Stream {
  std::vector<int> tokens;
  std::vector<std::pair<size_t, size_t>> docs;  // (start, length) of each document in tokens
  std::vector<int> slice(int64_t start, size_t n) const;
};
// Documents separated by form feeds (prepare_corpus.py's val.txt), each encoded with BOS and
// EOS. Throws Error when no document holds text.
Stream read_stream(const Tokenizer& tok, std::string_view text);

// Appends tokens to a slot's state in chunks of `chunk`. Returns, when `nll`, the negative
// log-likelihood of tokens[i + 1] given all before it (tokens.size() - 1 values), else nothing
// (and no logits are computed but the last row's); `last`, when given, gets the last token's
// logits.
std::vector<double> append(Backend& b, int slot, std::span<const int> tokens, int chunk,
                           bool nll, std::vector<float>* last = nullptr);

// 1. Perplexity by position on fixed text: `spans` spans of `span` tokens, each the end of one
// of the longest documents, are scored after each of `contexts` tokens of the text before them
// (sequence: stream[s - c, s + span), scored: its last span - 1 tokens). Every context scores the
// same tokens; only what comes before them differs.
struct PositionOptions {
  std::vector<int64_t> contexts = {0, 128, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536};
  int span = 512;
  int spans = 4;
};
struct PositionResult {
  std::vector<int64_t> contexts;
  std::vector<size_t> span_starts;        // in the stream
  std::vector<std::vector<double>> nll;   // [context][span]: mean NLL of the span's tokens
  std::vector<double> mean_nll;           // [context]: over all spans' tokens
};
std::vector<size_t> position_spans(const Stream& s, const PositionOptions& o);
PositionResult position_eval(Backend& b, const Stream& s, const PositionOptions& o, int chunk);

// 2. The copy test: BOS, a passage of `passage` tokens from inside one document, the first D
// tokens of other text (the stream from a point half the stream away), the passage again. The
// NLL of the passage's tokens 1.. in its second copy against its first says what the model
// recalls across D + passage tokens; so does its NLL against a control, the passage after BOS
// and the same D tokens with no first copy. One run per passage and one for its control: each
// state is forked at every D.
struct CopyOptions {
  int passage = 256;
  std::vector<int64_t> gaps = {128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768};
  int passages = 4;
};
struct CopyCase {
  size_t passage = 0, filler = 0;  // stream offsets of the passage and of its other text
};
struct CopyResult {
  std::vector<int64_t> gaps;
  std::vector<CopyCase> cases;
  std::vector<double> first_nll;                // [case]: mean NLL of the first copy
  std::vector<std::vector<double>> second_nll;  // [gap][case]: mean NLL of the second copy
  // [gap][case]: the same tokens after BOS and the same D tokens without the first copy: what
  // the second copy's NLL would be if nothing were recalled
  std::vector<std::vector<double>> control_nll;
};
std::vector<CopyCase> copy_cases(const Stream& s, const CopyOptions& o);
// The sequence of one case and gap, with the first copy or without it (the control): what
// copy_eval runs, less the forking.
std::vector<int> copy_sequence(const Stream& s, const CopyCase& c, int passage, int64_t gap,
                               int bos, bool first_copy);
CopyResult copy_eval(Backend& b, const Stream& s, const CopyOptions& o, int chunk);

// 3. Passkey retrieval: "The pass key is NNNNN. Remember it. NNNNN is the pass key." at
// `depth` (0: right after the instructions, 1: right before the question) in repeated filler,
// the whole prompt `context` tokens long (to within one filler sentence), ending in "What is
// the pass key? The pass key is". Scored by greedy decoding (correct when the first run of
// digits generated is the key) and by the log-probability of the key's tokens.
struct PasskeyOptions {
  std::vector<int64_t> contexts = {1024, 2048, 4096, 8192, 16384, 32768};
  std::vector<double> depths = {0, 0.25, 0.5, 0.75, 1};
  int trials = 5;
  uint64_t seed = 1;
};
struct PasskeyPrompt {
  std::vector<int> prompt;  // BOS ... "The pass key is"
  std::vector<int> answer;  // " NNNNN"
  size_t shared = 0;        // prompt[0, shared) is the same whatever the key
  size_t needle = 0;        // where the needle starts in prompt
};
PasskeyPrompt passkey_prompt(const Tokenizer& tok, int64_t context, double depth,
                             const std::string& key);
struct PasskeyCell {
  int64_t context = 0;
  double depth = 0;
  int64_t tokens = 0;    // prompt length of the cell's first trial
  int64_t distance = 0;  // tokens from the needle's start to the prompt's end
  int trials = 0, correct = 0;
  double mean_logprob = 0;  // of the key's tokens, summed over them, mean over trials
};
// The key of trial t: five digits from `seed` (the same keys for every cell).
std::string passkey_key(uint64_t seed, int trial);
// The first run of ASCII digits in text ("" when none).
std::string first_digits(std::string_view text);
std::vector<PasskeyCell> passkey_eval(Backend& b, const Tokenizer& tok, const PasskeyOptions& o,
                                      int chunk);

// Markdown tables of the results.
std::string position_table(const PositionResult& r);
std::string copy_table(const CopyResult& r, int passage);
std::string passkey_table(const std::vector<PasskeyCell>& cells);

}  // namespace mp::evals
