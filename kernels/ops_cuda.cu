#include "block_reduce.cuh"
#include "ops_cuda.cuh"

namespace mp::cuda {
namespace {

__global__ void embed_kernel(const __nv_bfloat16* table, const int* tokens, int n, float* x) {
  const int t = blockIdx.x;
  const __nv_bfloat16* row = table + int64_t(tokens[t]) * n;
  for (int i = threadIdx.x; i < n; i += blockDim.x)
    x[int64_t(t) * n + i] = __bfloat162float(row[i]);
}

__global__ void rmsnorm_kernel(const float* x, const float* w, int n, float eps, __nv_bfloat16* y) {
  const float* r = x + int64_t(blockIdx.x) * n;
  float ss = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) ss += r[i] * r[i];
  const float inv = rsqrtf(block_reduce(ss, Sum{}, 0.0f) / n + eps);
  for (int i = threadIdx.x; i < n; i += blockDim.x)
    y[int64_t(blockIdx.x) * n + i] = __float2bfloat16(r[i] * inv * w[i]);
}

// Row t of qkv is [q heads | k heads | v heads] (one GEMM's output): q and k come out rotated,
// v copied, each contiguous.
__global__ void split_qkv_rope_kernel(const float* qkv, const int64_t* pos, int nh, int nkv, int d,
                                      float theta, float linear_factor, float* q, float* k,
                                      float* v) {
  const int t = blockIdx.x, half = d / 2, width = (nh + 2 * nkv) * d;
  const float* row = qkv + int64_t(t) * width;
  for (int e = threadIdx.x; e < (nh + nkv) * half; e += blockDim.x) {
    const int h = e / half, i = e % half;
    // Angles in double, as the CPU reference computes them: positions reach millions.
    const double a = double(pos[t]) / linear_factor * pow(double(theta), -2.0 * i / d);
    const float c = float(cos(a)), s = float(sin(a));
    const float x1 = row[h * d + i], x2 = row[h * d + i + half];
    float* dst = h < nh ? q + (int64_t(t) * nh + h) * d : k + (int64_t(t) * nkv + h - nh) * d;
    dst[i] = x1 * c - x2 * s;
    dst[i + half] = x2 * c + x1 * s;
  }
  for (int e = threadIdx.x; e < nkv * d; e += blockDim.x)
    v[int64_t(t) * nkv * d + e] = row[(nh + nkv) * d + e];
}

// Row t of gu is [gate (F) | up (F)].
__global__ void swiglu_kernel(const float* gu, int F, int64_t n, __nv_bfloat16* y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / F, f = i % F;
    const float g = gu[t * 2 * F + f], u = gu[t * 2 * F + F + f];
    y[i] = __float2bfloat16(g / (1.0f + expf(-g)) * u);
  }
}

__global__ void add_kernel(float* x, const float* y, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    x[i] += y[i];
}

__global__ void to_bf16_kernel(const float* x, int64_t n, __nv_bfloat16* y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    y[i] = __float2bfloat16(x[i]);
}

__global__ void gather_rows_kernel(const __nv_bfloat16* src, const int* rows, int n,
                                   __nv_bfloat16* dst) {
  const __nv_bfloat16* r = src + int64_t(rows[blockIdx.x]) * n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) dst[int64_t(blockIdx.x) * n + i] = r[i];
}

int grid_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + 255) / 256, 4096)); }

}  // namespace

void embed(const __nv_bfloat16* table, const int* tokens, int T, int n, float* x, cudaStream_t s) {
  embed_kernel<<<T, 256, 0, s>>>(table, tokens, n, x);
  check_launch("embed");
}
void rmsnorm(const float* x, const float* w, int T, int n, float eps, __nv_bfloat16* y,
             cudaStream_t s) {
  rmsnorm_kernel<<<T, 256, 0, s>>>(x, w, n, eps, y);
  check_launch("rmsnorm");
}
void split_qkv_rope(const float* qkv, const int64_t* pos, int T, int nh, int nkv, int d,
                    float theta, float linear_factor, float* q, float* k, float* v,
                    cudaStream_t s) {
  split_qkv_rope_kernel<<<T, 256, 0, s>>>(qkv, pos, nh, nkv, d, theta, linear_factor, q, k, v);
  check_launch("split_qkv_rope");
}
void swiglu(const float* gu, int T, int F, __nv_bfloat16* y, cudaStream_t s) {
  const int64_t n = int64_t(T) * F;
  swiglu_kernel<<<grid_for(n), 256, 0, s>>>(gu, F, n, y);
  check_launch("swiglu");
}
void add(float* x, const float* y, int64_t n, cudaStream_t s) {
  add_kernel<<<grid_for(n), 256, 0, s>>>(x, y, n);
  check_launch("add");
}
void to_bf16(const float* x, int64_t n, __nv_bfloat16* y, cudaStream_t s) {
  to_bf16_kernel<<<grid_for(n), 256, 0, s>>>(x, n, y);
  check_launch("to_bf16");
}
void gather_rows(const __nv_bfloat16* src, const int* rows, int n_rows, int n, __nv_bfloat16* dst,
                 cudaStream_t s) {
  if (n_rows == 0) return;
  gather_rows_kernel<<<n_rows, 256, 0, s>>>(src, rows, n, dst);
  check_launch("gather_rows");
}
void gemm(cublasHandle_t h, const __nv_bfloat16* x, int T, int K, const __nv_bfloat16* W, int N,
          float* y) {
  // Column-major view: y^T (N x T) = W (as K x N, transposed) * x^T (K x T).
  const float alpha = 1.0f, beta = 0.0f;
  check(
      cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, T, K, &alpha, W, CUDA_R_16BF, K, x, CUDA_R_16BF,
                   K, &beta, y, CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
      "gemm");
}

}  // namespace mp::cuda
