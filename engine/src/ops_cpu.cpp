#include "ops_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "numeric.h"

namespace mp::cpu {

void matmul(const float* x, int T, int K, const float* W, int N, float* y) {
  // Blocks of W rows stay in cache while every x row passes over them.
  constexpr int kRows = 16;
#pragma omp parallel for schedule(static)
  for (int nb = 0; nb < N; nb += kRows) {
    const int ne = std::min(N, nb + kRows);
    for (int t = 0; t < T; ++t)
      for (int n = nb; n < ne; ++n)
        y[int64_t(t) * N + n] = dot(x + int64_t(t) * K, W + int64_t(n) * K, K);
  }
}

void rmsnorm(const float* x, const float* w, int T, int n, float eps, float* y) {
  for (int t = 0; t < T; ++t) {
    const float* r = x + int64_t(t) * n;
    const float ms = dot(r, r, n) / static_cast<float>(n);
    const float inv = 1.0f / std::sqrt(ms + eps);
    for (int i = 0; i < n; ++i) y[int64_t(t) * n + i] = r[i] * inv * w[i];
  }
}

void rope(float* x, int T, int heads, int d, int64_t pos0, float theta, float linear_factor) {
  const int half = d / 2;
  std::vector<double> inv_freq(half);
  for (int i = 0; i < half; ++i) inv_freq[i] = std::pow(double(theta), -2.0 * i / d);
  std::vector<float> cs(half), sn(half);
  for (int t = 0; t < T; ++t) {
    for (int i = 0; i < half; ++i) {
      const double a = double(pos0 + t) / linear_factor * inv_freq[i];
      cs[i] = static_cast<float>(std::cos(a));
      sn[i] = static_cast<float>(std::sin(a));
    }
    for (int h = 0; h < heads; ++h) {
      float* v = x + (int64_t(t) * heads + h) * d;
      for (int i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cs[i] - b * sn[i];
        v[i + half] = b * cs[i] + a * sn[i];
      }
    }
  }
}

void swiglu(float* g, const float* u, int64_t n) {
  for (int64_t i = 0; i < n; ++i) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

}  // namespace mp::cpu
