#pragma once

#include "multipole/multipole.h"

namespace mp {
std::unique_ptr<Backend> make_cpu_backend(std::shared_ptr<const Model> model, int n_slots,
                                          int n_threads);
// Checks a forward call's chunks against the slots (shared by every backend).
void check_chunks(const Config& c, std::span<const SeqChunk> chunks, int n_slots,
                  const std::vector<bool>& in_use);
// Checks forward_sample's arguments (one spec per chunk, last rows only, valid parameters).
void check_sample_call(std::span<const SeqChunk> chunks, std::span<const SampleSpec> specs);
// Samples one chunk's next token on the host from its logits row, as forward_sample defines it.
SampledToken sample_on_host(const SampleSpec& spec, std::span<const float> logits);
}  // namespace mp
