// The CUDA backend's factories (kernels/backend_cuda.cu), in builds with CUDA.
#pragma once

#include "multipole/multipole.h"

namespace mp {
namespace cuda {
// Which kernels compute a plan's summaries. Auto: the one-pass kernel for prompts; a decode
// step's whole cache update in one kernel after the attention (append_tokens). PerLevel: the
// per-level kernels (fp32, the reference) for every plan, decode steps too (their summaries
// into a pool, then copied into the ring); OnePass: the one-pass kernel for every plan where
// one_pass() holds. Tests and benchmarks ask for the latter two.
enum class SummaryKernels { Auto, PerLevel, OnePass };
// Q8_0 matrices in products of more than kGemvRows rows (cuBLAS, bf16). Auto: dequantized once
// at load when their bf16 copies take at most 1/16 of the device's memory, else as
// EachProduct: each product dequantizes its matrix into a scratch (tests ask for both).
enum class Q8Products { Auto, EachProduct };
// The launches of a decode step's chain of kernels (a layer's q/k/v GEMV, attention, o, gate/up
// and down GEMVs). Overlapped: each may start while the one before finishes
// (kernels/overlap.cuh); Serial: each after the one before, the reference.
enum class Launches { Overlapped, Serial };
}  // namespace cuda
class Communicator;
int cuda_device_count_present();
// The whole model on one device; `kernels`: every plan's summaries, `q8`: the Q8_0 products,
// `launches`: a decode step's (tests and benchmarks compare the fast paths with the reference).
std::unique_ptr<Backend> make_cuda_backend(
    std::shared_ptr<const Model> model, int n_slots, int64_t max_context, int device,
    cuda::SummaryKernels kernels = cuda::SummaryKernels::Auto,
    cuda::Q8Products q8 = cuda::Q8Products::Auto,
    cuda::Launches launches = cuda::Launches::Overlapped);
// Tensor-parallel shard comm.rank() of comm.size() on `device`, as make_cpu_shard (backend_cpu.h)
// on the CPU: its share of the heads and FFN columns, the outputs summed through `comm`.
std::unique_ptr<Backend> make_cuda_shard(std::shared_ptr<const Model> model, int n_slots,
                                         int64_t max_context, int device, Communicator& comm);
}  // namespace mp
