// CUDA twins of the CPU backend's dense operations (engine/src/ops_cpu.h), and the error checks
// every CUDA call goes through. Pointers are device pointers; every call is asynchronous on
// `stream` and checks its launch.
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <string>

#include "multipole/multipole.h"

namespace mp::cuda {

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(std::string("CUDA: ") + what + ": " + cudaGetErrorString(e));
}
inline void check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw Error(std::string("cuBLAS: ") + what + " failed with status " + std::to_string(int(s)));
}
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

// Lets `kernel` take `bytes` of dynamic shared memory (past 48 KB it must ask). The limit is a
// setting of each device: raised on a device's first call (replicas run one backend per device,
// from their own threads); `sized` holds the devices done, a bit each, one variable per kernel.
inline void allow_shared_memory(const void* kernel, size_t bytes, std::atomic<uint64_t>& sized,
                                const char* what) {
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  const uint64_t bit = uint64_t{1} << (device & 63);
  if (sized.load() & bit) return;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),
        what);
  sized |= bit;
}

// x[t] = embed[tokens[t]] (embed in bf16, x in f32)
void embed(const __nv_bfloat16* table, const int* tokens, int T, int n, float* x, cudaStream_t s);

// Q8_0 weights W[N][K] on the device: q[n*K + k] int8, one fp16 scale per block of 32,
// W[n][k] = scale[(n*K + k) / 32] * q[n*K + k] (the GGUF blocks split into two arrays, so that
// a warp reads 16-byte aligned weights). K is a multiple of 32.
struct Q8Weights {
  const int8_t* q;
  const __half* scale;
};
// x[t] = W[tokens[t]] for a Q8_0 embedding table of rows of n
void embed_q8(Q8Weights table, const int* tokens, int T, int n, float* x, cudaStream_t s);
// Up to this many rows (decode), the GEMV kernels compute a product: over Q8_0 weights (more rows
// dequantize the weights to bf16 (dequantize_q8) for gemm), and over bf16 ones (cuBLAS spends
// about 4 us on a decode step's small product, the GEMV about half).
constexpr int kGemvRows = 8;
// From this many outputs a plain GEMV gives each warp 4 of them: the default model's head
// (16,384) was 4,096 blocks, two waves on 132 SMs, each block normalising its input again.
constexpr int kWideGemvOutputs = 8192;
// A GEMV's input rows x[T][K]: bf16 activations as they are, or (residual set) what add_rmsnorm
// would give: residual[t] + add[t] (add may be null), written to residual_out (when set, a buffer
// other than residual), normalised and scaled by norm_weight, rounded to bf16. The second form
// saves a decode step one kernel per norm; its rows must fit in shared memory (gemv_fits).
struct GemvInput {
  const __nv_bfloat16* x = nullptr;
  const float* residual = nullptr;
  const float* add = nullptr;
  const float* norm_weight = nullptr;
  float eps = 0;
  float* residual_out = nullptr;
  GemvInput(const __nv_bfloat16* rows) : x(rows) {}  // NOLINT: the plain form converts
  GemvInput(const float* residual, const float* add, const float* norm_weight, float eps,
            float* residual_out)
      : residual(residual), add(add), norm_weight(norm_weight), eps(eps),
        residual_out(residual_out) {}
};
// The q/k/v projection's outputs as split_qkv_rope leaves them: contiguous q (nh heads of d), k
// and v (nkv heads each), q and k rotated for the rows' positions pos[t] / linear_factor.
// angles: rope_angles() of the rows, for split_qkv_rope (the GEMV works them out itself).
struct QkvRope {
  float *q, *k, *v;
  const int64_t* pos;
  int nh, nkv, d;
  float theta, linear_factor;
  const float2* angles = nullptr;
};
// Where the product goes: y[T][N] in fp32; or (silu_gated) y[t][f] = bf16(silu(g) * u) of the
// product's halves g = [0, N/2) and u = [N/2, N) (the fused gate/up weights); or (split_rope)
// the rows of [q | k | v] split and rotated (N = (nh + 2 nkv) d). The two fused forms save a
// decode step a kernel each.
struct GemvOutput {
  enum class Kind { Plain, SiluGated, SplitRope };
  Kind kind = Kind::Plain;
  float* y = nullptr;
  __nv_bfloat16* gated = nullptr;
  QkvRope rope{};
  GemvOutput(float* y) : y(y) {}  // NOLINT: the plain form converts
  static GemvOutput silu_gated(__nv_bfloat16* y) {
    GemvOutput o(nullptr);
    o.kind = Kind::SiluGated;
    o.gated = y;
    return o;
  }
  static GemvOutput split_rope(const QkvRope& r) {
    GemvOutput o(nullptr);
    o.kind = Kind::SplitRope;
    o.rope = r;
    return o;
  }
};
// Every block normalises all its rows (a GEMV has hundreds of blocks): past one row that costs
// more than the add_rmsnorm kernel it saves (H200, a decode step of the default model with the
// norms fused up to 4 rows: batch 1 0.212 -> 0.208 ms, batch 2 0.224 -> 0.237, 4 0.255 -> 0.268).
constexpr int kNormedGemvRows = 1;
// Shared memory a normalised input takes: its fp32 sum (x + add, computed once) and bf16 row.
constexpr size_t kNormedGemvBytes = sizeof(float) + sizeof(__nv_bfloat16);
inline bool gemv_fits(int T, int K, bool normed_input) {
  if (normed_input)
    return T >= 1 && T <= kNormedGemvRows && size_t(T) * K * kNormedGemvBytes <= 48 * 1024;
  return T >= 1 && T <= kGemvRows;
}
// y = x[T][K] * W^T, T <= kGemvRows: each weight read once for all rows, dequantized in
// registers, fp32 products and sums. K a multiple of 32. `overlap`: launched to start while the
// stream's previous kernel finishes, reading its first weights meanwhile (overlap.cuh). y must
// not overlap x: every block reads all of x while others write their outputs.
void gemv_q8(const GemvInput& x, int T, int K, Q8Weights W, int N, GemvOutput y, cudaStream_t s,
             bool overlap = false);
// The same over bf16 weights W[N][K] (what gemm computes, summed in another order); K a multiple
// of 16.
void gemv_bf16(const GemvInput& x, int T, int K, const __nv_bfloat16* W, int N, GemvOutput y,
               cudaStream_t s, bool overlap = false);
// w[i] = bf16(W's element i), n elements (a multiple of 32)
void dequantize_q8(Q8Weights W, int64_t n, __nv_bfloat16* w, cudaStream_t s);
// y[t] = bf16(x[t] / rms(x[t]) * w)
void rmsnorm(const float* x, const float* w, int T, int n, float eps, __nv_bfloat16* y,
             cudaStream_t s);
// x[t] += add[t] (a residual), then y[t] = bf16(x[t] / rms(x[t]) * w): one kernel for the two
void add_rmsnorm(float* x, const float* add, const float* w, int T, int n, float eps,
                 __nv_bfloat16* y, cudaStream_t s);
// RoPE's (cos, sin) of channel pair i of row t at position pos[t] / linear_factor:
// angles[t * d/2 + i]. Angles in double, as the CPU reference computes them (positions reach
// millions): worked out once for all layers of a forward.
void rope_angles(const int64_t* pos, int T, int d, float theta, float linear_factor,
                 float2* angles, cudaStream_t s);
// Splits rows of [q | k | v] (nh, nkv, nkv heads of d: the fused projection's output) into
// contiguous q, k, v, rotating q and k by the rows' rope_angles (rotate-half RoPE).
void split_qkv_rope(const float* qkv, const float2* angles, int T, int nh, int nkv, int d,
                    float* q, float* k, float* v, cudaStream_t s);
// y[t] = bf16(silu(g[t]) * u[t]) for rows gu[t] = [g (F) | u (F)] (the fused gate/up output)
void swiglu(const float* gu, int T, int F, __nv_bfloat16* y, cudaStream_t s);
// dst[r] = src[rows[r]], rows of n
void gather_rows(const __nv_bfloat16* src, const int* rows, int n_rows, int n, __nv_bfloat16* dst,
                 cudaStream_t s);
// y[T][N] = x[T][K] * W[N][K]^T, bf16 inputs, f32 accumulation and output.
void gemm(cublasHandle_t h, const __nv_bfloat16* x, int T, int K, const __nv_bfloat16* W, int N,
          float* y);

}  // namespace mp::cuda
