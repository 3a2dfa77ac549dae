// CUDA twin of the host sampler (engine/src/sampler.cpp: sample_candidates + pick_candidate):
// penalties, greedy, temperature, top-k, top-p and min-p on the GPU, one block per row, so that
// only token ids cross to the host.
#pragma once

#include "ops_cuda.cuh"

namespace mp::cuda {

struct SampleRow {
  int row;  // in the logits
  SamplingParams params;
  int pen_begin, pen_count;  // its (id, count) pairs in the penalty list, sorted by id
  double uniform;
};

// The most candidates a row keeps on the GPU; a row whose filtered list could be longer (top_k
// off or above this, top_p and min_p keeping this many) gets token -1: the host samples it.
constexpr int kMaxSampleCandidates = 8192;

// tokens[r], logprobs[r] (log-softmax of the raw logits at the token) for rows[r].
void sample(const float* logits, int vocab, const SampleRow* rows, int n_rows, const int2* pens,
            int* tokens, float* logprobs, cudaStream_t st);

// For rows[r]: the n likeliest tokens of the raw distribution, likeliest first (ties: lower id
// first), ids[r * n + j] and their log-probabilities lps[r * n + j] (host twin: top_logprobs).
void top_logprobs(const float* logits, int vocab, const int* rows, int n_rows, int n, int* ids,
                  float* lps, cudaStream_t st);

}  // namespace mp::cuda
