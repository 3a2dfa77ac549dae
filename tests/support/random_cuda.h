// Random inputs made on the GPU for the kernel tests and bench_cuda: a 1M-token attention rig
// needs ~3G values, a minute of host mt19937 + normal_distribution, milliseconds here.
#pragma once

#include <cuda_bf16.h>

#include <cstddef>
#include <cstdint>

namespace mp::testing {

// n normal values of mean 0 and deviation `stddev` into device memory p, a function of (seed,
// index) alone (a counter-based hash and Box-Muller): the same on every run and GPU.
void fill_normal_device(float* p, size_t n, uint32_t seed, float stddev = 1.0f);
// The same values rounded to bf16 (the CUDA cache's fine window).
void fill_normal_device(__nv_bfloat16* p, size_t n, uint32_t seed, float stddev = 1.0f);

}  // namespace mp::testing
