// The CPU backend's dense operations (the references of the CUDA kernels of the same names).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "multipole/multipole.h"

namespace mp::cpu {

// Instruction-set paths of the hand-written kernels, chosen at start-up: the best the CPU
// supports, or a lower one named by the environment variable MULTIPOLE_CPU_ISA
// (avx512, avx2, scalar), which is how a CPU without AVX-512 is simulated.
enum class Isa { Scalar, Avx2, Avx512 };
Isa detected_isa();  // the best the CPU supports
Isa active_isa();
void set_isa(Isa isa);  // throws Error if the CPU lacks it
const char* isa_name(Isa isa);
Isa parse_isa(std::string_view name);  // throws Error naming the accepted names
// What a product of more than kGemvRows rows by bf16 weights does with its activations where
// bf16_products_available() (below): Fp32: oneDNN's sgemm on the weights widened; SplitBf16: two
// bf16 parts (fp32 to about 1e-5, the default); Bf16: rounded once to bf16, as llama.cpp does
// with bf16 weights (half the bf16 work; 2e-3 relative per product, up to 0.05 nats of
// log-probability on the default model: docs/PERF.md).
enum class Activations { Fp32, SplitBf16, Bf16 };
// The CPU backend's kernels in one line, e.g. "avx512, oneDNN sgemm, 2 threads", or with bf16
// activations where they are available "avx512, oneDNN bf16 matmul (brg:avx512_core_amx_bf16),
// 2 threads".
std::string kernels_summary(int n_threads, Activations activations);

// bf16 weights in the layout of oneDNN's bf16 products (pack_for_bf16_products).
struct PackedBf16;

// A weight matrix W[N][K] as the CPU backend keeps it: bf16 weights stay bf16 (half the bytes
// to stream per token; widening bf16 to fp32 is exact), Q8_0 weights stay int8 with one scale per
// block of 32 (the fp16 scales widened, exactly: W[n][k] = q8_scale[(n*K + k) / 32] * q8[n*K + k]),
// other types become fp32.
struct Matrix {
  int N = 0, K = 0;
  std::vector<uint16_t> bf16;
  std::vector<int8_t> q8;
  std::vector<float> q8_scale;
  std::vector<float> f32;
  std::shared_ptr<const PackedBf16> packed;  // null unless pack_for_bf16_products made it
  bool is_bf16() const { return !bf16.empty(); }
  bool is_q8() const { return !q8.empty(); }
  bool is_f32() const { return !f32.empty(); }
  void row(int n, float* out) const;  // row n as fp32
};
// 2D tensors [N_i][K] stacked into one [sum N_i][K] (one product instead of several: fewer
// thread start-ups per token); bf16 (Q8_0) stays bf16 (Q8_0) where every part is bf16 (Q8_0).
Matrix to_matrix(std::initializer_list<const TensorView*> parts);
// Rows [n0, n0 + n) and columns [k0, k0 + k) of m: a tensor-parallel shard's part. Q8_0 columns
// must be whole blocks of 32 (throws Error otherwise).
Matrix sub_matrix(const Matrix& m, int n0, int n, int k0, int k);
// The parts stacked by rows (equal widths; bf16 or Q8_0 where every part is, as to_matrix).
Matrix stack_rows(std::initializer_list<const Matrix*> parts);

// How matmul runs products of more than kGemvRows rows, process-wide: oneDNN's sgemm (loaded
// from libdnnl.so.3 or .2 at first use; the default where it loads), the matrix-vector kernels on
// blocks of kGemvRows rows (where it does not, as in the GPU machine's bundle), or, for every
// product, matmul_reference (the benchmark's baseline: matrices built while it is chosen keep
// fp32 weights, as the backend did before).
enum class Products { OneDnn, Kernels, Reference };
Products active_products();
void set_products(Products p);  // throws Error if oneDNN is asked for and cannot be loaded

// Up to this many rows, matmul is a matrix-vector kernel that streams W once for all rows.
constexpr int kGemvRows = 8;

// bf16 products: a product of more than kGemvRows rows by bf16 weights may run on the CPU's
// bf16 units (AMX, AVX512-BF16) through oneDNN's bf16 matmul. Each activation is split into two
// bf16 parts, hi = bf16(x) and lo = bf16(x - hi), both multiplied by the (exact) bf16 weights
// with fp32 sums: x is kept to about 2^-17 relative, so the result is fp32's to about 1e-5
// (rounding x to bf16 alone costs 2e-3 per product and 0.05 nats of log-probability on the
// default model: docs/PERF.md, "bf16 products"). Available where oneDNN 2 loads and runs them on
// such hardware, active_products() is OneDnn and active_isa() is avx512 (so
// MULTIPOLE_CPU_ISA=avx2 turns them off as a CPU without AVX-512 would).
bool bf16_products_available();
// Gives m, where it has bf16 weights and bf16_products_available(), a copy of them in the layout
// oneDNN's bf16 products read (else a product reorders W into it at every call: 6.5 % of a
// prefill's time). Costs the matrix's bf16 bytes again; products of 1-8 rows keep reading
// m.bf16. Sub-matrices and stacks of m are made without it.
void pack_for_bf16_products(Matrix& m);

// y[T][N] = x[T][K] * W^T. T <= kGemvRows: the hand-written kernels of active_isa() (Q8_0:
// each block's weights dequantized in registers); more rows: with bf16 activations (SplitBf16,
// Bf16), bf16 weights and bf16_products_available(), a bf16 product (above); else as
// active_products() says, bf16 and Q8_0 weights widened into `wide` (at least N*K floats) for
// oneDNN's sgemm.
void matmul(const float* x, int T, const Matrix& W, float* y, std::span<float> wide,
            Activations activations = Activations::Fp32);
// The same by the dot-product loop the backend used before (the tests' reference and the
// benchmark's baseline).
void matmul_reference(const float* x, int T, int K, const float* W, int N, float* y);
// Attention's inner loops, on rows of d floats `stride` apart, through active_isa()'s kernels
// (scalar: dot(), as the backend did before):
// s[j] = scale * q.row[j] for j < n
void scaled_dots(const float* q, const float* rows, int64_t stride, int n, int d, float scale,
                 float* s);
// out[0..d) += sum_j p[j] * row[j]
void add_weighted_rows(const float* p, const float* rows, int64_t stride, int n, int d, float* out);
// The same for nq queries over the same rows, several at once (each row loaded once for them):
// query a's q at q + a*q_stride, its scores at s + a*s_stride (p at p + a*p_stride, out at out +
// a*out_stride). Scalar: the single-query functions above, query by query.
void scaled_dots_rows(const float* q, int64_t q_stride, int nq, const float* rows, int64_t stride,
                      int n, int d, float scale, float* s, int64_t s_stride);
void add_weighted_rows_rows(const float* p, int64_t p_stride, int nq, const float* rows,
                            int64_t stride, int n, int d, float* out, int64_t out_stride);
// y[t] = x[t] / rms(x[t]) * w, rows of n
void rmsnorm(const float* x, const float* w, int T, int n, float eps, float* y);
// RoPE's cos and sin for T rows of head size d, row t at position (pos0 + t) / linear_factor
// (linear RoPE scaling): [T][d/2] each. Made once per step, used by every layer.
struct RopeTable {
  int T = 0, d = 0;
  std::vector<float> cos, sin;
};
RopeTable rope_table(int T, int d, int64_t pos0, float theta, float linear_factor);
// Rotates the first `heads` vectors of d in each of table.T rows (row stride heads*d), Hugging
// Face's rotate-half convention.
void rope(float* x, int heads, const RopeTable& table);
// The same with the table made for this call.
void rope(float* x, int T, int heads, int d, int64_t pos0, float theta, float linear_factor);
// The elementwise exps below go through active_isa()'s vector exp (2 ulp where exp(x) is a
// normal float; 1.6e-38 below exp(-87); scalar: std::exp, the former loops).
// y[t][i] = silu(gu[t][i]) * gu[t][F + i]: rows of [gate | up] as their stacked product gives
// them, y [T][F]
void swiglu(const float* gu, int T, int F, float* y);
// s[j] = exp(s[j] - max) / sum (the attention's scores, in place)
void softmax(float* s, int n);
// y[i] = exp(x[i]) for x in [-87, 88] (the tests' way to the vector exp itself)
void vector_exp(const float* x, int64_t n, float* y);

// f(i) for i in [0, n): over the threads where `parallel`, else a plain loop on this thread. An
// OpenMP region costs about 3 us even when its if clause is false (docs/PERF.md, session 9), and a
// one-token step would open dozens: small steps call f directly.
template <class F>
void parallel_for(int64_t n, bool parallel, F&& f) {
  if (!parallel) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) f(i);
}

// Makes this thread's float arithmetic flush subnormal results and inputs to zero (x86's FTZ and
// DAZ). A softmax weight below 1.2e-38 is then as cheap as any other, instead of a
// microcode assist per operation: without it, generation on the CPU slowed by 15-27 % over 50,000
// tokens as the attention grew peaky. The values lost are below fp32's normal range.
void flush_subnormals_in_this_thread();
bool subnormals_flushed_in_this_thread();

}  // namespace mp::cpu
