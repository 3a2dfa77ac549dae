// CUDA twin of the host sampler (engine/src/sampler.cpp: sample_candidates + pick_candidate):
// penalties, greedy, temperature, top-k, top-p and min-p on the GPU (a row over many blocks where
// its settings allow, one block otherwise), so that only token ids cross to the host.
#pragma once

#include <span>

#include "device_array.cuh"

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

// A row whose sampler keeps the whole vocabulary (greedy, or temperature alone: the API's
// default) or takes a top-k of at most 256 (the CLI's 40) is spread over blocks of at least
// kSpreadIds ids, as many as fill the GPU, so that a batch-1 step's sampling is not one SM's
// work; the other rows take one block each.
constexpr int kSpreadIds = 1024;

// The GPU sampler of one stream: it keeps its scratch (the spread rows' per-block sums and the
// tickets that find each row's last block) from call to call.
class Sampler {
 public:
  // tokens[r], logprobs[r] (log-softmax of the raw logits at the token) for rows[r]; `rows` is
  // on the host, `rows_on_device` its copy on the device.
  void sample(const float* logits, int vocab, std::span<const SampleRow> rows,
              const SampleRow* rows_on_device, const int2* pens, int* tokens, float* logprobs,
              cudaStream_t st);

 private:
  // Apart, so that the tickets keep their places whatever a call's rows and blocks: each call
  // leaves them at 0 (in one buffer with the parts after them, a call of fewer rows wrote its
  // parts over the tickets of the next call's later rows).
  DeviceArray<uint8_t> parts_;
  DeviceArray<unsigned> tickets_;
  int resident_ = 0, resident_top_k_ = 0;  // spread blocks the GPU holds at once (each kernel)
};

// For rows[r]: the n likeliest tokens of the raw distribution, likeliest first (ties: lower id
// first), ids[r * n + j] and their log-probabilities lps[r * n + j] (host twin: top_logprobs).
void top_logprobs(const float* logits, int vocab, const int* rows, int n_rows, int n, int* ids,
                  float* lps, cudaStream_t st);

}  // namespace mp::cuda
