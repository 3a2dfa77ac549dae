#pragma once

#include "multipole/multipole.h"

namespace mp {
class Communicator;
// BackendOptions::cpu_fp32_products and cpu_bf16_activations.
struct CpuProducts {
  bool fp32 = false, bf16_activations = false;
  static CpuProducts of(const BackendOptions& o) {
    return {o.cpu_fp32_products, o.cpu_bf16_activations};
  }
};
std::unique_ptr<Backend> make_cpu_backend(std::shared_ptr<const Model> model, int n_slots,
                                          int n_threads, const CpuProducts& products);
// The model's config as one of `size` tensor-parallel shards sees it: its share of the query and
// KV heads and of the FFN columns. Throws Error naming what does not divide by `size`.
Config shard_config(const Config& c, int size);
// Shard comm.rank() of comm.size(): the heads and FFN columns of shard_config's counts from
// rank * count on, its cache holding only its KV heads; it sums the attention's and the FFN's
// outputs over the shards through `comm` (which must outlive it). Every shard computes the
// (same) logits.
std::unique_ptr<Backend> make_cpu_shard(std::shared_ptr<const Model> model, int n_slots,
                                        int n_threads, const CpuProducts& products,
                                        Communicator& comm);
// Checks a forward call's chunks against the slots (shared by every backend).
void check_chunks(const Config& c, std::span<const SeqChunk> chunks, int n_slots,
                  const std::vector<bool>& in_use);
// Checks forward_sample's arguments (one spec per chunk, last rows only, valid parameters).
void check_sample_call(std::span<const SeqChunk> chunks, std::span<const SampleSpec> specs);
// Samples one chunk's next token on the host from its logits row, as forward_sample defines it.
SampledToken sample_on_host(const SampleSpec& spec, std::span<const float> logits);
}  // namespace mp
