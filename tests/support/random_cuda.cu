#include "random_cuda.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

namespace mp::testing {
namespace {

// splitmix64's finalizer: consecutive counters give independent-looking 64-bit words.
__device__ uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

template <class T>
__global__ void normal_kernel(T* p, size_t n, uint64_t seed, float stddev) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    const uint64_t r = mix(seed ^ mix(i));
    // u1 in (0, 1] (its log is finite), u2 in [0, 1): 24 bits each, a float's mantissa.
    const float u1 = (float((r >> 40) & 0xffffff) + 1.0f) * 0x1p-24f;
    const float u2 = float((r >> 8) & 0xffffff) * 0x1p-24f;
    p[i] = T(stddev * sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2));
  }
}

template <class T>
void fill_normal(T* p, size_t n, uint32_t seed, float stddev) {
  if (n == 0) return;
  const size_t blocks = std::min<size_t>((n + 255) / 256, 65536);
  // The seed spread over 64 bits, so that seeds 1, 2, ... hash far apart.
  normal_kernel<<<static_cast<unsigned>(blocks), 256>>>(
      p, n, (uint64_t(seed) + 1) * 0x9e3779b97f4a7c15ull, stddev);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("fill_normal_device: ") + cudaGetErrorString(e));
}

}  // namespace

void fill_normal_device(float* p, size_t n, uint32_t seed, float stddev) {
  fill_normal(p, n, seed, stddev);
}
void fill_normal_device(__nv_bfloat16* p, size_t n, uint32_t seed, float stddev) {
  fill_normal(p, n, seed, stddev);
}

}  // namespace mp::testing
