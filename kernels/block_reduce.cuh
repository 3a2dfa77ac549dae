// Block-wide reduction for kernels whose blockDim.x is a multiple of 32 (at most 1024).
#pragma once

namespace mp::cuda {

// A lane's v from lane (this lane ^ o): float2 as its two halves.
template <class T>
__device__ T shfl_xor(T v, int o) {
  return __shfl_xor_sync(0xffffffffu, v, o);
}
__device__ inline float2 shfl_xor(float2 v, int o) {
  return make_float2(shfl_xor(v.x, o), shfl_xor(v.y, o));
}

// Every thread gets op over all threads' v; `identity` fills the unused warp slots.
template <class T, class Op>
__device__ T block_reduce(T v, Op op, T identity) {
  __shared__ T part[32];
  __shared__ T total;
  for (int o = 16; o > 0; o >>= 1) v = op(v, shfl_xor(v, o));
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : identity;
    for (int o = 16; o > 0; o >>= 1) v = op(v, shfl_xor(v, o));
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
    a = op_a(a, shfl_xor(a, o));
    b = op_b(b, shfl_xor(b, o));
  }
  if ((threadIdx.x & 31) == 0) part_a[threadIdx.x >> 5] = a, part_b[threadIdx.x >> 5] = b;
  __syncthreads();
  if (threadIdx.x < 32) {
    const bool used = threadIdx.x < (blockDim.x >> 5);
    a = used ? part_a[threadIdx.x] : identity_a;
    b = used ? part_b[threadIdx.x] : identity_b;
    for (int o = 16; o > 0; o >>= 1) {
      a = op_a(a, shfl_xor(a, o));
      b = op_b(b, shfl_xor(b, o));
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

// Whether this block is the last of `blocks` blocks sharing `ticket` to get here (the last sets it
// back to 0 for the next launch): every block's writes before the call are then visible to it.
__device__ inline bool last_block_to_arrive(unsigned* ticket, int blocks) {
  __shared__ bool last;
  __threadfence();  // this block's writes are visible before the ticket counts them
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(ticket, 1u) == unsigned(blocks - 1);
    if (last) *ticket = 0;  // every block has counted
  }
  __syncthreads();
  if (last) __threadfence();
  return last;
}

}  // namespace mp::cuda
