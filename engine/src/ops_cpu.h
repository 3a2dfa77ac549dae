// The CPU backend's dense operations (the references of the CUDA kernels of the same names).
#pragma once

#include <cstdint>

namespace mp::cpu {

// y[T][N] = x[T][K] * W[N][K]^T
void matmul(const float* x, int T, int K, const float* W, int N, float* y);
// y[t] = x[t] / rms(x[t]) * w, rows of n
void rmsnorm(const float* x, const float* w, int T, int n, float eps, float* y);
// Rotates the first `heads` vectors of d in each of T rows (row stride heads*d), Hugging Face's
// rotate-half convention, row t at position (pos0 + t) / linear_factor (linear RoPE scaling).
void rope(float* x, int T, int heads, int d, int64_t pos0, float theta, float linear_factor);
// g[i] = silu(g[i]) * u[i]
void swiglu(float* g, const float* u, int64_t n);

}  // namespace mp::cpu
