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

__global__ void embed_q8_kernel(Q8Weights table, const int* tokens, int n, float* x) {
  const int t = blockIdx.x;
  const int64_t row = int64_t(tokens[t]) * n;
  for (int i = threadIdx.x; i < n; i += blockDim.x)
    x[int64_t(t) * n + i] = __half2float(table.scale[(row + i) / 32]) * table.q[row + i];
}

// One warp per output n: lane j reads 16 weights at a time (half a block, one 16-byte load) and
// the matching 16 inputs of each of the R rows; the warp's sums are reduced by shuffles.
constexpr int kQ8WarpsPerBlock = 4;
template <int R>
__global__ void gemv_q8_kernel(const __nv_bfloat16* x, int K, Q8Weights W, int N, float* y) {
  const int n = blockIdx.x * kQ8WarpsPerBlock + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (n >= N) return;
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0;
  const int8_t* wq = W.q + int64_t(n) * K;
  const __half* ws = W.scale + int64_t(n) * (K / 32);
  for (int k = lane * 16; k < K; k += 32 * 16) {
    const int4 packed = *reinterpret_cast<const int4*>(wq + k);
    const int8_t* q = reinterpret_cast<const int8_t*>(&packed);
    const float d = __half2float(ws[k / 32]);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int4* xv = reinterpret_cast<const int4*>(x + int64_t(r) * K + k);
      const int4 x0 = xv[0], x1 = xv[1];
      const __nv_bfloat162* h0 = reinterpret_cast<const __nv_bfloat162*>(&x0);
      const __nv_bfloat162* h1 = reinterpret_cast<const __nv_bfloat162*>(&x1);
      float s = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 a = __bfloat1622float2(h0[j]), b = __bfloat1622float2(h1[j]);
        s += q[2 * j] * a.x + q[2 * j + 1] * a.y + q[8 + 2 * j] * b.x + q[9 + 2 * j] * b.y;
      }
      acc[r] += d * s;
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float v = acc[r];
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) y[int64_t(r) * N + n] = v;
  }
}

// gemv_q8_kernel<T> for T = R..kQ8GemvRows.
template <int R>
void gemv_q8_rows(const __nv_bfloat16* x, int T, int K, Q8Weights W, int N, float* y,
                  cudaStream_t s) {
  if constexpr (R <= kQ8GemvRows) {
    if (T != R) return gemv_q8_rows<R + 1>(x, T, K, W, N, y, s);
    const int blocks = (N + kQ8WarpsPerBlock - 1) / kQ8WarpsPerBlock;
    gemv_q8_kernel<R><<<blocks, 32 * kQ8WarpsPerBlock, 0, s>>>(x, K, W, N, y);
  }
}

// Eight weights per thread: one 8-byte load, one 16-byte store.
__global__ void dequantize_q8_kernel(Q8Weights W, int64_t n8, __nv_bfloat16* w) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n8;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int2 packed = reinterpret_cast<const int2*>(W.q)[i];
    const int8_t* q = reinterpret_cast<const int8_t*>(&packed);
    const float d = __half2float(W.scale[i / 4]);
    __nv_bfloat162 out[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = __floats2bfloat162_rn(d * q[2 * j], d * q[2 * j + 1]);
    reinterpret_cast<int4*>(w)[i] = *reinterpret_cast<const int4*>(out);
  }
}

// With `add`: x += add first (the residual), stored back, then normalised. Each thread reads back
// only the elements it stored.
__global__ void rmsnorm_kernel(float* x, const float* add, const float* w, int n, float eps,
                               __nv_bfloat16* y) {
  float* r = x + int64_t(blockIdx.x) * n;
  float ss = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    float v = r[i];
    if (add) r[i] = v += add[int64_t(blockIdx.x) * n + i];
    ss += v * v;
  }
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
  // Not written without `add`.
  rmsnorm_kernel<<<T, 256, 0, s>>>(const_cast<float*>(x), nullptr, w, n, eps, y);
  check_launch("rmsnorm");
}
void add_rmsnorm(float* x, const float* add, const float* w, int T, int n, float eps,
                 __nv_bfloat16* y, cudaStream_t s) {
  rmsnorm_kernel<<<T, 256, 0, s>>>(x, add, w, n, eps, y);
  check_launch("add_rmsnorm");
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
void embed_q8(Q8Weights table, const int* tokens, int T, int n, float* x, cudaStream_t s) {
  embed_q8_kernel<<<T, 256, 0, s>>>(table, tokens, n, x);
  check_launch("embed_q8");
}
void gemv_q8(const __nv_bfloat16* x, int T, int K, Q8Weights W, int N, float* y, cudaStream_t s) {
  if (T < 1 || T > kQ8GemvRows || K % 32 != 0)
    throw Error("gemv_q8: " + std::to_string(T) + " rows of " + std::to_string(K) +
                " (1 to " + std::to_string(kQ8GemvRows) + " rows of whole blocks of 32)");
  gemv_q8_rows<1>(x, T, K, W, N, y, s);
  check_launch("gemv_q8");
}
void dequantize_q8(Q8Weights W, int64_t n, __nv_bfloat16* w, cudaStream_t s) {
  dequantize_q8_kernel<<<grid_for(n / 8), 256, 0, s>>>(W, n / 8, w);
  check_launch("dequantize_q8");
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
