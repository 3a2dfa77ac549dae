// Pieces of sampling shared by the host sampler (sampler.cpp) and the GPU one (kernels/).
#pragma once

#include <span>
#include <utility>
#include <vector>

#include "multipole/multipole.h"

#if defined(__CUDACC__)
#define MP_HOST_DEVICE __host__ __device__
#else
#define MP_HOST_DEVICE
#endif

namespace mp {

// A logit after the penalties for a token seen `count` times in the window (CTRL-style
// repetition penalty, then OpenAI-style presence and frequency penalties).
template <class T>
MP_HOST_DEVICE inline T penalized(T l, const SamplingParams& p, int count) {
  if (p.repetition_penalty != 1.0f) l = l > 0 ? l / p.repetition_penalty : l * p.repetition_penalty;
  return l - (p.presence_penalty + T(p.frequency_penalty) * count);
}

// True when top-k, top-p and min-p are all off: every token stays a candidate, in id order, so
// neither the host nor the GPU sorts the vocabulary (the draw's distribution is the same).
MP_HOST_DEVICE inline bool keeps_whole_vocabulary(const SamplingParams& p, int vocab) {
  return (p.top_k <= 0 || p.top_k >= vocab) && p.top_p >= 1.0f && p.min_p <= 0;
}

// (id, count) of every distinct id in the penalties' window of `history`, ids outside [0, vocab)
// ignored; empty when no penalty is on. The reference that PenaltyCounts keeps up to date.
std::vector<std::pair<int, int>> penalty_counts(const SamplingParams& p,
                                                std::span<const int> history, int vocab);

// sample_candidates with the candidates ordered by a stable sort of the whole vocabulary (what it
// did before top-k and greedy took partial selection): the reference of the tests.
std::vector<std::pair<int, float>> sample_candidates_by_full_sort(const SamplingParams& p,
                                                                  std::span<const float> logits,
                                                                  PenaltyList penalties);

// log(sum(exp(logits))) in double: log_softmax(logits)[i] is float(logits[i] - it), so that one
// token's log-probability needs no vector of them all.
double log_sum_exp(std::span<const float> logits);

// The n likeliest tokens of a row of log-probabilities (log_softmax of the logits), likeliest
// first (ties: lower id first): the host twin of the GPU's top-N (kernels/sampling_cuda.cu).
std::vector<std::pair<int, float>> top_logprobs(std::span<const float> logprobs, int n);

}  // namespace mp
