// Block-wide reduction for kernels whose blockDim.x is a multiple of 32 (at most 1024).
#pragma once

namespace mp::cuda {

// Every thread gets op over all threads' v; `identity` fills the unused warp slots.
template <class T, class Op>
__device__ T block_reduce(T v, Op op, T identity) {
  __shared__ T part[32];
  __shared__ T total;
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : identity;
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (threadIdx.x == 0) total = v;
  }
  __syncthreads();
  return total;
}

// Two block_reduces at the cost of one (one exchange through shared memory): a by op_a, b by op_b.
template <class A, class OpA, class B, class OpB>
__device__ void block_reduce_two(A& a, OpA op_a, A identity_a, B& b, OpB op_b, B identity_b) {
  __shared__ A part_a[32];
  __shared__ B part_b[32];
  __shared__ A total_a;
  __shared__ B total_b;
  for (int o = 16; o > 0; o >>= 1) {
    a = op_a(a, __shfl_xor_sync(0xffffffffu, a, o));
    b = op_b(b, __shfl_xor_sync(0xffffffffu, b, o));
  }
  if ((threadIdx.x & 31) == 0) part_a[threadIdx.x >> 5] = a, part_b[threadIdx.x >> 5] = b;
  __syncthreads();
  if (threadIdx.x < 32) {
    const bool used = threadIdx.x < (blockDim.x >> 5);
    a = used ? part_a[threadIdx.x] : identity_a;
    b = used ? part_b[threadIdx.x] : identity_b;
    for (int o = 16; o > 0; o >>= 1) {
      a = op_a(a, __shfl_xor_sync(0xffffffffu, a, o));
      b = op_b(b, __shfl_xor_sync(0xffffffffu, b, o));
    }
    if (threadIdx.x == 0) total_a = a, total_b = b;
  }
  __syncthreads();
  a = total_a, b = total_b;
}

struct Sum {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct Max {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return a > b ? a : b;
  }
};

}  // namespace mp::cuda
