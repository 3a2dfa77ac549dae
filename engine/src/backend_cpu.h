#pragma once

#include "multipole/multipole.h"

namespace mp {
std::unique_ptr<Backend> make_cpu_backend(std::shared_ptr<const Model> model, int n_slots,
                                          int n_threads);
// Checks a forward call's chunks against the slots (shared by every backend).
void check_chunks(const Config& c, std::span<const SeqChunk> chunks, int n_slots,
                  const std::vector<bool>& in_use);
}  // namespace mp
