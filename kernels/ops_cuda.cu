#include <string>
#include <type_traits>

#include "block_reduce.cuh"
#include "ops_cuda.cuh"
#include "overlap.cuh"

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

// RoPE's (cos, sin) for channel pair i of d at position pos / linear_factor. Angles in double,
// as the CPU reference computes them: positions reach millions.
__device__ float2 rope_angle(int64_t pos, int i, int d, float theta, float linear_factor) {
  const double a = double(pos) / linear_factor * pow(double(theta), -2.0 * i / d);
  double sn, cs;
  sincos(a, &sn, &cs);
  return {float(cs), float(sn)};
}

// SwiGLU of a gate and up value, rounded for the next product.
__device__ __nv_bfloat16 silu_times(float g, float u) {
  return __float2bfloat16(g / (1.0f + expf(-g)) * u);
}

// 16 consecutive inputs (two 16-byte loads) as floats.
__device__ void load16(const __nv_bfloat16* p, float (&x)[16]) {
  const int4* v = reinterpret_cast<const int4*>(p);
  const int4 a = v[0], b = v[1];
  const __nv_bfloat162* h0 = reinterpret_cast<const __nv_bfloat162*>(&a);
  const __nv_bfloat162* h1 = reinterpret_cast<const __nv_bfloat162*>(&b);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f0 = __bfloat1622float2(h0[j]), f1 = __bfloat1622float2(h1[j]);
    x[2 * j] = f0.x, x[2 * j + 1] = f0.y, x[8 + 2 * j] = f1.x, x[9 + 2 * j] = f1.y;
  }
}

// The weights a GEMV reads, 16 of row n from column k at a time: load() once, dot() per row.
struct Bf16Rows {
  const __nv_bfloat16* w;
  struct Part {
    float w[16];
  };
  __device__ Part load(int64_t n, int K, int k) const {
    Part p;
    load16(w + n * K + k, p.w);
    return p;
  }
  __device__ static float dot(const Part& p, const float (&x)[16]) {
    float s = 0;
#pragma unroll
    for (int j = 0; j < 16; ++j) s += p.w[j] * x[j];
    return s;
  }
};
struct Q8Rows {  // half a block of 32 (one 16-byte load) and its block's scale
  Q8Weights W;
  struct Part {
    int4 packed;
    float d;
  };
  __device__ Part load(int64_t n, int K, int k) const {
    return {*reinterpret_cast<const int4*>(W.q + n * K + k),
            __half2float(W.scale[(n * K + k) / 32])};
  }
  __device__ static float dot(const Part& p, const float (&x)[16]) {
    const int8_t* q = reinterpret_cast<const int8_t*>(&p.packed);
    float s = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j)
      s += q[2 * j] * x[2 * j] + q[2 * j + 1] * x[2 * j + 1] + q[8 + 2 * j] * x[8 + 2 * j] +
           q[9 + 2 * j] * x[9 + 2 * j];
    return p.d * s;
  }
};

constexpr int kGemvWarpsPerBlock = 4;

// Where a GEMV's output goes: y[r][n] = the product (n < N)...
// Each form's outputs() is how many n there are (each from kWeightRows weight rows), its Early
// what its store needs of row r and output n that reads only the plan, computed before the wait
// for the kernel before (overlap.cuh).
struct NoEarly {};
struct FloatOut {
  float* y;
  int N;
  static constexpr int kWeightRows = 1;
  using Early = NoEarly;
  __host__ __device__ int outputs() const { return N; }
  __device__ int64_t weight_row(int n, int) const { return n; }
  __device__ Early early(int, int) const { return {}; }
  __device__ void store(int r, int n, const float (&v)[1], Early) const {
    y[int64_t(r) * N + n] = v[0];
  }
};
// ...or y[r][f] = bf16(silu(g) * u) of the gate row f and the up row F + f (the fused gate/up
// weights), both computed by one warp: no separate SwiGLU kernel and no fp32 [g | u] written...
struct SwigluOut {
  __nv_bfloat16* y;
  int F;
  static constexpr int kWeightRows = 2;
  using Early = NoEarly;
  __host__ __device__ int outputs() const { return F; }
  __device__ int64_t weight_row(int f, int j) const { return f + int64_t(j) * F; }
  __device__ Early early(int, int) const { return {}; }
  __device__ void store(int r, int f, const float (&v)[2], Early) const {
    y[int64_t(r) * F + f] = silu_times(v[0], v[1]);
  }
};
// ...or q, k, v split and rotated: one warp computes a head's channels i and i + d/2 (RoPE's
// pair), as split_qkv_rope_kernel would rotate them; the angle (double precision, the longest
// latency of the kernel) early.
struct RopeOut {
  QkvRope o;
  static constexpr int kWeightRows = 2;
  using Early = float2;
  __host__ __device__ int outputs() const { return (o.nh + 2 * o.nkv) * (o.d / 2); }
  __device__ int64_t weight_row(int n, int j) const {
    const int half = o.d / 2;
    return int64_t(n / half) * o.d + n % half + j * half;
  }
  __device__ Early early(int t, int n) const {
    const int half = o.d / 2;
    if (n / half >= o.nh + o.nkv) return {1.0f, 0.0f};  // v: not rotated
    return rope_angle(o.pos[t], n % half, o.d, o.theta, o.linear_factor);
  }
  __device__ void store(int t, int n, const float (&x)[2], Early cs) const {
    const int half = o.d / 2, h = n / half, i = n % half;
    if (h >= o.nh + o.nkv) {
      float* dst = o.v + (int64_t(t) * o.nkv + h - o.nh - o.nkv) * o.d;
      dst[i] = x[0], dst[i + half] = x[1];
      return;
    }
    float* dst = h < o.nh ? o.q + (int64_t(t) * o.nh + h) * o.d
                          : o.k + (int64_t(t) * o.nkv + h - o.nh) * o.d;
    dst[i] = x[0] * cs.x - x[1] * cs.y;
    dst[i + half] = x[1] * cs.x + x[0] * cs.y;
  }
};

// A GEMV with a residual input (GemvInput::residual) first does add_rmsnorm's work into shared
// memory: x + add (kept in `sums`, and stored to residual_out by block 0 alone: the other blocks
// still read x and add), its RMS, and the rows bf16((x + add) / rms * w) that the product reads.
// All R rows at once: one round trip to memory and one exchange between the warps, whatever R.
template <int R>
__device__ void normed_rows(const GemvInput& in, int K, float* sums, __nv_bfloat16* rows) {
  __shared__ float partial[kGemvWarpsPerBlock][R];
  __shared__ float inv[R];
  float* out = in.residual_out && blockIdx.x == 0 ? in.residual_out : nullptr;
  float ss[R];
#pragma unroll
  for (int r = 0; r < R; ++r) ss[r] = 0;
  for (int i = threadIdx.x; i < K; i += blockDim.x)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t at = int64_t(r) * K + i;
      const float v = in.residual[at] + (in.add ? in.add[at] : 0.0f);
      sums[at] = v;
      if (out) out[at] = v;
      ss[r] += v * v;
    }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    for (int o = 16; o > 0; o /= 2) ss[r] += __shfl_xor_sync(0xffffffffu, ss[r], o);
    if (lane == 0) partial[warp][r] = ss[r];
  }
  __syncthreads();
  if (threadIdx.x < R) {
    float total = 0;
    for (int w = 0; w < kGemvWarpsPerBlock; ++w) total += partial[w][threadIdx.x];
    inv[threadIdx.x] = rsqrtf(total / K + in.eps);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < K; i += blockDim.x)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t at = int64_t(r) * K + i;
      rows[at] = __float2bfloat16(sums[at] * inv[r] * in.norm_weight[i]);
    }
  __syncthreads();
}

// y = x[R][K] * W^T for a few rows (decode): one warp per M outputs (Out::kWeightRows weight
// rows each), lane j taking 16 weights at a time (each read once for all R rows) and the matching
// 16 inputs of each row; the warp's sums are reduced by shuffles. K must be a multiple of 16.
template <int R, int M, class Rows, class Out>
__global__ void gemv_kernel(GemvInput in, int K, Rows W, Out out) {
  // R x K sums, then R x K normalised rows, when in.residual (kNormedGemvBytes an input)
  extern __shared__ __align__(16) float sums[];
  constexpr int J = Out::kWeightRows;
  const int n0 = (blockIdx.x * kGemvWarpsPerBlock + threadIdx.x / 32) * M, lane = threadIdx.x % 32;
  auto has = [&](int m) { return n0 + m < out.outputs(); };
  // The warp's first 16 weights of each row (all of them at K <= 512) are constant, and the
  // store's Early reads only the plan: both before the wait for the kernel before (overlap.cuh),
  // the inputs after it.
  int k = lane * 16;
  typename Rows::Part w[M][J];
  typename Out::Early early[M]{};  // lane r's, for row r
#pragma unroll
  for (int m = 0; m < M; ++m) {
    if (has(m) && k < K)
#pragma unroll
      for (int j = 0; j < J; ++j) w[m][j] = W.load(out.weight_row(n0 + m, j), K, k);
    if (has(m) && lane < R) early[m] = out.early(lane, n0 + m);
  }
  wait_for_previous();
  let_next_start();
  const __nv_bfloat16* x = in.x;
  if constexpr (R <= kNormedGemvRows)
    if (in.residual) {
      auto* normed = reinterpret_cast<__nv_bfloat16*>(sums + R * K);
      normed_rows<R>(in, K, sums, normed);
      x = normed;
    }
  if (!has(0)) return;
  float acc[R][M][J];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int j = 0; j < J; ++j) acc[r][m][j] = 0;
  while (k < K) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float xs[16];
      load16(x + int64_t(r) * K + k, xs);
#pragma unroll
      for (int m = 0; m < M; ++m)
#pragma unroll
        for (int j = 0; j < J; ++j) acc[r][m][j] += Rows::dot(w[m][j], xs);
    }
    k += 32 * 16;
    if (k < K)
#pragma unroll
      for (int m = 0; m < M; ++m)
        if (has(m))
#pragma unroll
          for (int j = 0; j < J; ++j) w[m][j] = W.load(out.weight_row(n0 + m, j), K, k);
  }
  // Every lane ends up with every row's sums; lane r stores row r, so that the rows' epilogues
  // (RoPE's angles in double) run side by side rather than one after another.
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float mine[J] = {};
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int j = 0; j < J; ++j) {
        float v = acc[r][m][j];
        for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == r) mine[j] = v;
      }
    if (lane < R && has(m)) out.store(lane, n0 + m, mine, early[m]);
  }
}

// gemv_kernel<T> for T = R..kGemvRows.
template <int R, class Rows, class Out>
void gemv_rows(const char* what, const GemvInput& in, int T, int K, Rows W, Out out,
               cudaStream_t s, bool overlap) {
  if constexpr (R <= kGemvRows) {
    if (T != R) return gemv_rows<R + 1>(what, in, T, K, W, out, s, overlap);
    const size_t shared = in.residual ? size_t(R) * K * kNormedGemvBytes : 0;
    auto run = [&]<int M>() {
      const int warps = (out.outputs() + M - 1) / M,
                blocks = (warps + kGemvWarpsPerBlock - 1) / kGemvWarpsPerBlock;
      launch(what, overlap, gemv_kernel<R, M, Rows, Out>, blocks, 32 * kGemvWarpsPerBlock, shared,
             s, in, K, W, out);
    };
    if constexpr (std::is_same_v<Out, FloatOut>)
      if (out.outputs() >= kWideGemvOutputs) return run.template operator()<4>();
    run.template operator()<1>();
  }
}

template <class Rows>
void gemv(const char* what, const GemvInput& in, int T, int K, Rows W, int N, GemvOutput out,
          cudaStream_t s, int k_multiple, bool overlap) {
  using Kind = GemvOutput::Kind;
  const QkvRope& r = out.rope;
  const bool shape_ok = out.kind == Kind::Plain      ? true
                        : out.kind == Kind::SiluGated ? N % 2 == 0
                                                      : r.d % 2 == 0 && N == (r.nh + 2 * r.nkv) * r.d;
  if (!gemv_fits(T, K, in.residual != nullptr) || K % k_multiple != 0 || !shape_ok)
    throw Error(std::string(what) + ": " + std::to_string(T) + " rows of " + std::to_string(K) +
                " to " + std::to_string(N) + " (1 to " + std::to_string(kGemvRows) +
                " rows, a multiple of " + std::to_string(k_multiple) + " columns" +
                (in.residual ? ", within shared memory" : "") +
                (out.kind == Kind::SiluGated   ? ", an even N)"
                 : out.kind == Kind::SplitRope ? ", N = (heads + 2 kv heads) x an even d)"
                                               : ")"));
  // Every block reads all of the input while others store their outputs (the q/k/v split's
  // three outputs are never the input's buffer).
  if (out.kind != Kind::SplitRope) {
    const auto in_at = reinterpret_cast<uintptr_t>(in.x ? static_cast<const void*>(in.x)
                                                        : static_cast<const void*>(in.residual));
    const auto out_at = reinterpret_cast<uintptr_t>(
        out.kind == Kind::SiluGated ? static_cast<const void*>(out.gated)
                                    : static_cast<const void*>(out.y));
    const size_t in_bytes = size_t(T) * K * (in.x ? 2 : 4);
    const size_t out_bytes = out.kind == Kind::SiluGated ? size_t(T) * (N / 2) * 2 : size_t(T) * N * 4;
    if (in_at < out_at + out_bytes && out_at < in_at + in_bytes)
      throw Error(std::string(what) + ": the output overlaps the input");
  }
  if (out.kind == Kind::SiluGated)
    gemv_rows<1>(what, in, T, K, W, SwigluOut{out.gated, N / 2}, s, overlap);
  else if (out.kind == Kind::SplitRope)
    gemv_rows<1>(what, in, T, K, W, RopeOut{r}, s, overlap);
  else
    gemv_rows<1>(what, in, T, K, W, FloatOut{out.y, N}, s, overlap);
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

// With `add`: x += add first (the residual), stored back, then normalised. A warp a row: no
// block-wide reduction or barrier. Rows of a multiple of 4 floats move in float4s. Each lane
// reads back only the elements it stored.
constexpr int kNormRowsPerBlock = 4;
__global__ void rmsnorm_kernel(float* x, const float* add, const float* w, int T, int n,
                               float eps, __nv_bfloat16* y) {
  const int row = blockIdx.x * kNormRowsPerBlock + threadIdx.x / 32, lane = threadIdx.x & 31;
  if (row >= T) return;
  float* r = x + int64_t(row) * n;
  const float* a = add ? add + int64_t(row) * n : nullptr;
  __nv_bfloat16* out = y + int64_t(row) * n;
  const bool vec = n % 4 == 0;
  float ss = 0;
  if (vec) {
    for (int i = 4 * lane; i < n; i += 128) {
      float4 v = *reinterpret_cast<const float4*>(r + i);
      if (a) {
        const float4 b = *reinterpret_cast<const float4*>(a + i);
        v.x += b.x, v.y += b.y, v.z += b.z, v.w += b.w;
        *reinterpret_cast<float4*>(r + i) = v;
      }
      ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
  } else {
    for (int i = lane; i < n; i += 32) {
      float v = r[i];
      if (a) r[i] = v += a[i];
      ss += v * v;
    }
  }
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  const float inv = rsqrtf(ss / n + eps);
  if (!vec) {
    for (int i = lane; i < n; i += 32) out[i] = __float2bfloat16(r[i] * inv * w[i]);
    return;
  }
  for (int i = 4 * lane; i < n; i += 128) {
    const float4 v = *reinterpret_cast<const float4*>(r + i);
    const float4 g = *reinterpret_cast<const float4*>(w + i);
    const __nv_bfloat162 pair[2] = {__floats2bfloat162_rn(v.x * inv * g.x, v.y * inv * g.y),
                                    __floats2bfloat162_rn(v.z * inv * g.z, v.w * inv * g.w)};
    *reinterpret_cast<uint2*>(out + i) = *reinterpret_cast<const uint2*>(pair);
  }
}

__global__ void rope_angles_kernel(const int64_t* pos, int64_t n, int half, int d, float theta,
                                   float linear_factor, float2* angles) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n;
       e += int64_t(gridDim.x) * blockDim.x)
    angles[e] = rope_angle(pos[e / half], int(e % half), d, theta, linear_factor);
}

// Row t of qkv is [q heads | k heads | v heads] (one GEMM's output): q and k come out rotated,
// v copied, each contiguous.
__global__ void split_qkv_rope_kernel(const float* qkv, const float2* angles, int nh, int nkv,
                                      int d, float* q, float* k, float* v) {
  const int t = blockIdx.x, half = d / 2, width = (nh + 2 * nkv) * d;
  const float* row = qkv + int64_t(t) * width;
  const float2* cs_row = angles + int64_t(t) * half;
  for (int e = threadIdx.x; e < (nh + nkv) * half; e += blockDim.x) {
    const int h = e / half, i = e % half;
    const float2 cs = cs_row[i];
    const float x1 = row[h * d + i], x2 = row[h * d + i + half];
    float* dst = h < nh ? q + (int64_t(t) * nh + h) * d : k + (int64_t(t) * nkv + h - nh) * d;
    dst[i] = x1 * cs.x - x2 * cs.y;
    dst[i + half] = x2 * cs.x + x1 * cs.y;
  }
  for (int e = threadIdx.x; e < nkv * d; e += blockDim.x)
    v[int64_t(t) * nkv * d + e] = row[(nh + nkv) * d + e];
}

// Row t of gu is [gate (F) | up (F)]. V outputs a thread: 4 (16-byte loads, an 8-byte store)
// when F is a multiple of 4, else 1.
template <int V>
__global__ void swiglu_kernel(const float* gu, int F, int64_t n, __nv_bfloat16* y) {
  for (int64_t i = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) * V; i < n;
       i += int64_t(gridDim.x) * blockDim.x * V) {
    const int64_t t = i / F, f = i % F;
    const float* g = gu + t * 2 * F + f;
    if constexpr (V == 1) {
      y[i] = silu_times(g[0], g[F]);
    } else {
      const float4 a = *reinterpret_cast<const float4*>(g);
      const float4 b = *reinterpret_cast<const float4*>(g + F);
      const __nv_bfloat16 out[4] = {silu_times(a.x, b.x), silu_times(a.y, b.y),
                                    silu_times(a.z, b.z), silu_times(a.w, b.w)};
      *reinterpret_cast<uint2*>(y + i) = *reinterpret_cast<const uint2*>(out);
    }
  }
}

__global__ void gather_rows_kernel(const __nv_bfloat16* src, const int* rows, int n,
                                   __nv_bfloat16* dst) {
  const __nv_bfloat16* r = src + int64_t(rows[blockIdx.x]) * n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) dst[int64_t(blockIdx.x) * n + i] = r[i];
}

int grid_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + 255) / 256, 4096)); }
unsigned norm_blocks(int T) { return (T + kNormRowsPerBlock - 1) / kNormRowsPerBlock; }

}  // namespace

void embed(const __nv_bfloat16* table, const int* tokens, int T, int n, float* x, cudaStream_t s) {
  embed_kernel<<<T, 256, 0, s>>>(table, tokens, n, x);
  check_launch("embed");
}
void rmsnorm(const float* x, const float* w, int T, int n, float eps, __nv_bfloat16* y,
             cudaStream_t s) {
  // Not written without `add`.
  rmsnorm_kernel<<<norm_blocks(T), 32 * kNormRowsPerBlock, 0, s>>>(const_cast<float*>(x), nullptr,
                                                                  w, T, n, eps, y);
  check_launch("rmsnorm");
}
void add_rmsnorm(float* x, const float* add, const float* w, int T, int n, float eps,
                 __nv_bfloat16* y, cudaStream_t s) {
  rmsnorm_kernel<<<norm_blocks(T), 32 * kNormRowsPerBlock, 0, s>>>(x, add, w, T, n, eps, y);
  check_launch("add_rmsnorm");
}
void rope_angles(const int64_t* pos, int T, int d, float theta, float linear_factor,
                 float2* angles, cudaStream_t s) {
  const int64_t n = int64_t(T) * (d / 2);
  rope_angles_kernel<<<grid_for(n), 256, 0, s>>>(pos, n, d / 2, d, theta, linear_factor, angles);
  check_launch("rope_angles");
}
void split_qkv_rope(const float* qkv, const float2* angles, int T, int nh, int nkv, int d,
                    float* q, float* k, float* v, cudaStream_t s) {
  split_qkv_rope_kernel<<<T, 256, 0, s>>>(qkv, angles, nh, nkv, d, q, k, v);
  check_launch("split_qkv_rope");
}
void swiglu(const float* gu, int T, int F, __nv_bfloat16* y, cudaStream_t s) {
  const int64_t n = int64_t(T) * F;
  if (F % 4 == 0)
    swiglu_kernel<4><<<grid_for(n / 4), 256, 0, s>>>(gu, F, n, y);
  else
    swiglu_kernel<1><<<grid_for(n), 256, 0, s>>>(gu, F, n, y);
  check_launch("swiglu");
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
void gemv_q8(const GemvInput& x, int T, int K, Q8Weights W, int N, GemvOutput y, cudaStream_t s,
             bool overlap) {
  gemv("gemv_q8", x, T, K, Q8Rows{W}, N, y, s, 32, overlap);
}
void gemv_bf16(const GemvInput& x, int T, int K, const __nv_bfloat16* W, int N, GemvOutput y,
               cudaStream_t s, bool overlap) {
  gemv("gemv_bf16", x, T, K, Bf16Rows{W}, N, y, s, 16, overlap);
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
