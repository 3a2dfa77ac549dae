// Programmatic dependent launch (Hopper): a kernel launched with `overlap` may start while the
// kernel before it on its stream is still finishing, so that its launch, its blocks' start and
// its reads of constant data (weights) hide behind the other's tail. Such a kernel calls
// wait_for_previous() before it reads or writes anything of the stream's earlier work (the
// wait returns once that kernel has completed and its writes are visible), then
// let_next_start() so that the kernel after it may be scheduled early in turn. Launched
// without `overlap`, the same kernel runs as any other: both calls return at once. A kernel
// that waits completes only after the one before it, so the order of the chain holds
// transitively.
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "ops_cuda.cuh"

namespace mp::cuda {

__device__ inline void wait_for_previous() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ inline void let_next_start() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// kernel<<<grid, block, shared, s>>>(args...), allowed to overlap the stream's previous kernel
// when `overlap` (the kernel must call wait_for_previous() first, as above).
template <class... Params, class... Args>
void launch(const char* what, bool overlap, void (*kernel)(Params...), dim3 grid, dim3 block,
            size_t shared, cudaStream_t s, Args&&... args) {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid, cfg.blockDim = block, cfg.dynamicSmemBytes = shared, cfg.stream = s;
  cfg.attrs = overlap ? &attr : nullptr, cfg.numAttrs = overlap ? 1 : 0;
  check(cudaLaunchKernelEx(&cfg, kernel, Params(std::forward<Args>(args))...), what);
}

}  // namespace mp::cuda
