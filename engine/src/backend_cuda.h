// The CUDA backend's factories (kernels/backend_cuda.cu), in builds with CUDA.
#pragma once

#include "multipole/multipole.h"

namespace mp {
class Communicator;
int cuda_device_count_present();
// The whole model on one device.
std::unique_ptr<Backend> make_cuda_backend(std::shared_ptr<const Model> model, int n_slots,
                                           int64_t max_context, int device);
// Tensor-parallel shard comm.rank() of comm.size() on `device`, as make_cpu_shard (backend_cpu.h)
// on the CPU: its share of the heads and FFN columns, the outputs summed through `comm`.
std::unique_ptr<Backend> make_cuda_shard(std::shared_ptr<const Model> model, int n_slots,
                                         int64_t max_context, int device, Communicator& comm);
}  // namespace mp
