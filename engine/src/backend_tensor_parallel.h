#pragma once

#include "multipole/multipole.h"

namespace mp {
// opts.tensor_parallel shards of the model presented as one backend with the plain backend's
// logits and states, each shard run from its own thread: CPU shards over in-process
// communicators, or CUDA shards on opts.devices (default 0..N-1) over NCCL.
std::unique_ptr<Backend> make_tensor_parallel_backend(std::shared_ptr<const Model> model,
                                                      const BackendOptions& opts);
}  // namespace mp
