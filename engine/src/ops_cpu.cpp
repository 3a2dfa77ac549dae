#include "ops_cpu.h"

#include <dlfcn.h>
#include <immintrin.h>
#include <omp.h>
#include <oneapi/dnnl/dnnl.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "numeric.h"

namespace mp::cpu {

// Q8_0 weights as the kernels read them (Matrix::q8, Matrix::q8_scale).
struct Q8Weights {
  const int8_t* q;
  const float* scale;
};

// --- The vector kernels, once per instruction set (simd_kernels.inc) -------------------------
// Each block is compiled for its instruction set (GCC's target pragma, clang's attribute push:
// the fuzz targets are built with clang).

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
#endif
namespace avx512 {
using V = __m512;
constexpr int kLanes = 16, kRegisters = 32;
inline V zero() { return _mm512_setzero_ps(); }
inline V load(const float* p) { return _mm512_loadu_ps(p); }
inline V load(const uint16_t* p) {  // bf16 -> fp32 is a shift. (The maskz forms: GCC 12 warns
                                    // about the undefined vectors inside the unmasked ones.)
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(
      _mm512_maskz_slli_epi32(0xffff, _mm512_maskz_cvtepu16_epi32(0xffff, h), 16));
}
inline V load(const int8_t* p) {
  return _mm512_maskz_cvtepi32_ps(
      0xffff,
      _mm512_maskz_cvtepi8_epi32(0xffff, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline V add(V a, V b) { return _mm512_add_ps(a, b); }
inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V div(V a, V b) { return _mm512_div_ps(a, b); }
inline V min(V a, V b) { return _mm512_maskz_min_ps(0xffff, a, b); }
inline V max(V a, V b) { return _mm512_maskz_max_ps(0xffff, a, b); }
inline V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a*b
inline V set1(float x) { return _mm512_set1_ps(x); }
inline V round(V v) {
  return _mm512_maskz_roundscale_ps(0xffff, v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline V pow2(V n) {  // 2^n for whole n in [-126, 127]: n + 127 into the exponent bits
  const __m512i e = _mm512_add_epi32(_mm512_maskz_cvtps_epi32(0xffff, n), _mm512_set1_epi32(127));
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xffff, e, 23));
}
inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
inline float hsum(V v) {
  v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(0xffff, v, v, 0x4e));  // 256-bit halves
  v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(0xffff, v, v, 0xb1));  // 128-bit quarters
  v = _mm512_add_ps(v, _mm512_maskz_permute_ps(0xffff, v, 0x4e));        // 64-bit pairs
  v = _mm512_add_ps(v, _mm512_maskz_permute_ps(0xffff, v, 0xb1));        // neighbours
  return _mm512_cvtss_f32(v);
}
// Lane j: hsum(v[j]), j < 16 (the maskz forms, as in load): four rounds that halve the vectors and double the sums' width.
// The rounds leave lane (block k, element e) with the input at [0,8,4,12][k] + [0,2,1,3][e]; the
// inputs are fed in that order, so that lane j holds v[j].
inline V hsum_each(const V* v) {
  constexpr int kFeed[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};
  V w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i) {
    const V a = v[kFeed[i]], b = v[kFeed[i + 8]];
    w[i] = add(_mm512_maskz_shuffle_f32x4(0xffff, a, b, 0x44),
               _mm512_maskz_shuffle_f32x4(0xffff, a, b, 0xee));
  }
  for (int i = 0; i < 4; ++i)
    x[i] = add(_mm512_maskz_shuffle_f32x4(0xffff, w[i], w[i + 4], 0x88),
               _mm512_maskz_shuffle_f32x4(0xffff, w[i], w[i + 4], 0xdd));
  for (int i = 0; i < 2; ++i)
    y[i] = add(_mm512_maskz_shuffle_ps(0xffff, x[i], x[i + 2], 0x44),
               _mm512_maskz_shuffle_ps(0xffff, x[i], x[i + 2], 0xee));
  return add(_mm512_maskz_shuffle_ps(0xffff, y[0], y[1], 0x88),
             _mm512_maskz_shuffle_ps(0xffff, y[0], y[1], 0xdd));
}
#include "simd_kernels.inc"

// f32_to_bf16 of each lane, in the low 16 bits of its 32: round to nearest even, NaN stays NaN.
// (The maskz forms, as in load.)
inline __m512i round_to_bf16(V v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i high = _mm512_maskz_srli_epi32(0xffff, u, 16);
  const __m512i lsb = _mm512_and_si512(high, _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_maskz_srli_epi32(
      0xffff, _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_or_epi32(rounded, nan, high, _mm512_set1_epi32(0x40));
}
inline void store_bf16(uint16_t* p, __m512i r) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_maskz_cvtepi32_epi16(0xffff, r));
}

// x[i] split into two bf16 halves: hi[i] = f32_to_bf16(x[i]), lo[i] = f32_to_bf16(x[i] - hi[i])
// (so hi + lo is x to about 2^-17 relative); lo null: hi only (x rounded once).
void split_bf16(const float* x, int64_t n, uint16_t* hi, uint16_t* lo) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const V v = load(x + i);
    const __m512i h = round_to_bf16(v);
    store_bf16(hi + i, h);
    if (!lo) continue;
    const V hf = _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xffff, h, 16));
    store_bf16(lo + i, round_to_bf16(_mm512_sub_ps(v, hf)));
  }
  for (; i < n; ++i) {
    hi[i] = f32_to_bf16(x[i]);
    if (lo) lo[i] = f32_to_bf16(x[i] - bf16_to_f32(hi[i]));
  }
}
}  // namespace avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace avx2 {
using V = __m256;
constexpr int kLanes = 8, kRegisters = 16;
inline V zero() { return _mm256_setzero_ps(); }
inline V load(const float* p) { return _mm256_loadu_ps(p); }
inline V load(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline V load(const int8_t* p) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline V add(V a, V b) { return _mm256_add_ps(a, b); }
inline V sub(V a, V b) { return _mm256_sub_ps(a, b); }
inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V div(V a, V b) { return _mm256_div_ps(a, b); }
inline V min(V a, V b) { return _mm256_min_ps(a, b); }
inline V max(V a, V b) { return _mm256_max_ps(a, b); }
inline V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a*b
inline V set1(float x) { return _mm256_set1_ps(x); }
inline V round(V v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline V pow2(V n) {  // 2^n for whole n in [-126, 127]: n + 127 into the exponent bits
  const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
}
inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
inline float hsum(V v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// Lane j: hsum(v[j]), j < 8 (as avx512's: lane (block k, element e) ends with the input at
// 4k + [0,2,1,3][e]).
inline V hsum_each(const V* v) {
  constexpr int kFeed[8] = {0, 2, 1, 3, 4, 6, 5, 7};
  V w[4], y[2];
  for (int i = 0; i < 4; ++i) {
    const V a = v[kFeed[i]], b = v[kFeed[i + 4]];
    w[i] = add(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
  }
  for (int i = 0; i < 2; ++i)
    y[i] = add(_mm256_shuffle_ps(w[i], w[i + 2], 0x44), _mm256_shuffle_ps(w[i], w[i + 2], 0xee));
  return add(_mm256_shuffle_ps(y[0], y[1], 0x88), _mm256_shuffle_ps(y[0], y[1], 0xdd));
}
#include "simd_kernels.inc"
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// --- Instruction-set dispatch ---------------------------------------------------------------

Isa detected_isa() {
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
      return Isa::Avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
    return Isa::Scalar;
  }();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512:
      return "avx512";
    case Isa::Avx2:
      return "avx2";
    case Isa::Scalar:
      return "scalar";
  }
  return "?";
}

Isa parse_isa(std::string_view name) {
  for (Isa i : {Isa::Scalar, Isa::Avx2, Isa::Avx512})
    if (name == isa_name(i)) return i;
  throw Error("CPU instruction set '" + std::string(name) + "' is not one of avx512, avx2, scalar");
}

namespace {
Isa& active() {
  static Isa isa = [] {
    const char* env = std::getenv("MULTIPOLE_CPU_ISA");
    if (!env || !*env) return detected_isa();
    Isa want;
    try {
      want = parse_isa(env);
    } catch (const Error& e) {
      throw Error(std::string("MULTIPOLE_CPU_ISA: ") + e.what());
    }
    if (want > detected_isa())
      throw Error(std::string("MULTIPOLE_CPU_ISA=") + env + ": this CPU supports at most " +
                  isa_name(detected_isa()));
    return want;
  }();
  return isa;
}
}  // namespace

Isa active_isa() { return active(); }

void set_isa(Isa isa) {
  if (isa > detected_isa())
    throw Error(std::string("CPU instruction set ") + isa_name(isa) +
                " is not supported here (at most " + isa_name(detected_isa()) + ")");
  active() = isa;
}

// --- Which products -------------------------------------------------------------------------

namespace {
// oneDNN, loaded rather than linked, so that binaries carried without it (the GPU machine's
// bundle) still run. Its sgemm is the same call in versions 2 and 3; the matmul primitive behind
// the bf16 products is called through version 2's C API (Debian 12's libdnnl-dev, the header this
// is built with; version 3 changed how memory and primitive descriptors are made), so it is
// loaded from libdnnl.so.2 only and left null elsewhere.
struct OneDnn {
  decltype(&dnnl_sgemm) sgemm = nullptr;
#if DNNL_VERSION_MAJOR == 2
  decltype(&dnnl_engine_create) engine_create = nullptr;
  decltype(&dnnl_stream_create) stream_create = nullptr;
  decltype(&dnnl_stream_wait) stream_wait = nullptr;
  decltype(&dnnl_stream_destroy) stream_destroy = nullptr;
  decltype(&dnnl_memory_desc_init_by_tag) memory_desc_init_by_tag = nullptr;
  decltype(&dnnl_memory_desc_get_size) memory_desc_get_size = nullptr;
  decltype(&dnnl_matmul_desc_init) matmul_desc_init = nullptr;
  decltype(&dnnl_primitive_attr_create) attr_create = nullptr;
  decltype(&dnnl_primitive_attr_set_scratchpad_mode) attr_set_scratchpad_mode = nullptr;
  decltype(&dnnl_primitive_attr_destroy) attr_destroy = nullptr;
  decltype(&dnnl_primitive_desc_create) primitive_desc_create = nullptr;
  decltype(&dnnl_primitive_desc_query) primitive_desc_query = nullptr;
  decltype(&dnnl_primitive_desc_query_md) primitive_desc_query_md = nullptr;
  decltype(&dnnl_primitive_desc_destroy) primitive_desc_destroy = nullptr;
  decltype(&dnnl_primitive_create) primitive_create = nullptr;
  decltype(&dnnl_primitive_execute) primitive_execute = nullptr;
  decltype(&dnnl_memory_create) memory_create = nullptr;
  decltype(&dnnl_memory_destroy) memory_destroy = nullptr;
  decltype(&dnnl_post_ops_create) post_ops_create = nullptr;
  decltype(&dnnl_post_ops_append_sum) post_ops_append_sum = nullptr;
  decltype(&dnnl_post_ops_destroy) post_ops_destroy = nullptr;
  decltype(&dnnl_primitive_attr_set_post_ops) attr_set_post_ops = nullptr;
  decltype(&dnnl_reorder_primitive_desc_create) reorder_desc_create = nullptr;
  decltype(&dnnl_primitive_destroy) primitive_destroy = nullptr;
  dnnl_engine_t engine = nullptr;  // the CPU engine, where the matmul API loaded
#endif
};

const OneDnn& onednn() {
  static const OneDnn o = [] {
    OneDnn o;
    void* lib = nullptr;
    for (const char* name : {"libdnnl.so.2", "libdnnl.so.3"})
      if ((lib = dlopen(name, RTLD_NOW | RTLD_LOCAL))) break;
    if (!lib) return o;
    o.sgemm = reinterpret_cast<decltype(&dnnl_sgemm)>(dlsym(lib, "dnnl_sgemm"));
#if DNNL_VERSION_MAJOR == 2
    auto version = reinterpret_cast<decltype(&dnnl_version)>(dlsym(lib, "dnnl_version"));
    if (!version || version()->major != 2) return o;
    bool all = true;
    auto get = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, name));
      all = all && fn;
    };
    get(o.engine_create, "dnnl_engine_create");
    get(o.stream_create, "dnnl_stream_create");
    get(o.stream_wait, "dnnl_stream_wait");
    get(o.stream_destroy, "dnnl_stream_destroy");
    get(o.memory_desc_init_by_tag, "dnnl_memory_desc_init_by_tag");
    get(o.memory_desc_get_size, "dnnl_memory_desc_get_size");
    get(o.matmul_desc_init, "dnnl_matmul_desc_init");
    get(o.attr_create, "dnnl_primitive_attr_create");
    get(o.attr_set_scratchpad_mode, "dnnl_primitive_attr_set_scratchpad_mode");
    get(o.attr_destroy, "dnnl_primitive_attr_destroy");
    get(o.primitive_desc_create, "dnnl_primitive_desc_create");
    get(o.primitive_desc_query, "dnnl_primitive_desc_query");
    get(o.primitive_desc_query_md, "dnnl_primitive_desc_query_md");
    get(o.primitive_desc_destroy, "dnnl_primitive_desc_destroy");
    get(o.primitive_create, "dnnl_primitive_create");
    get(o.primitive_execute, "dnnl_primitive_execute");
    get(o.memory_create, "dnnl_memory_create");
    get(o.memory_destroy, "dnnl_memory_destroy");
    get(o.post_ops_create, "dnnl_post_ops_create");
    get(o.post_ops_append_sum, "dnnl_post_ops_append_sum");
    get(o.post_ops_destroy, "dnnl_post_ops_destroy");
    get(o.attr_set_post_ops, "dnnl_primitive_attr_set_post_ops");
    get(o.reorder_desc_create, "dnnl_reorder_primitive_desc_create");
    get(o.primitive_destroy, "dnnl_primitive_destroy");
    if (!all || o.engine_create(&o.engine, dnnl_cpu, 0) != dnnl_success) o.engine = nullptr;
#endif
    return o;
  }();
  return o;
}

Products& products() {
  static Products p = onednn().sgemm ? Products::OneDnn : Products::Kernels;
  return p;
}
}  // namespace

Products active_products() { return products(); }

void set_products(Products p) {
  if (p == Products::OneDnn && !onednn().sgemm)
    throw Error("oneDNN's sgemm cannot be loaded (libdnnl.so.3 or .2)");
  products() = p;
}

// --- bf16 products: oneDNN's matmul on the CPU's bf16 units ----------------------------------
//
// y[T][N] = (hi + lo)[T][K] * W^T as two products of M rows: lo * W into y, then hi * W added to
// it by oneDNN's sum post-op (the two fp32 results summed once, as a pass adding them would,
// without that pass nor a 2M-row result). Sums and output fp32. W is the copy that
// pack_for_bf16_products made in the layout oneDNN's kernels read (no reorder of W inside every
// product), or else the model's bf16 rows as they are (oneDNN's "ba" layout of the [K][N]
// weights). A primitive is made (and compiled by oneDNN) per shape; T is rounded up to M, a
// multiple of kBf16RowStep (zero rows), so that a server's varying step sizes share a few.

namespace {
constexpr int kBf16RowStep = 16;  // an AMX tile's rows
// The rows of the product whose weights layout pack_for_bf16_products takes: the CPU backend's
// prefill step (products of other row counts are made for the same layout).
constexpr int kPackRows = 512;

// A vector's first n elements, grown (never shrunk) to hold them: a buffer reused by products of
// several shapes is neither reallocated nor zero-filled again when a larger shape comes back.
template <class T>
T* at_least(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}
}  // namespace

#if DNNL_VERSION_MAJOR == 2
struct PackedBf16 {
  dnnl_memory_desc_t desc;
  std::unique_ptr<uint16_t, decltype(&std::free)> data{nullptr, &std::free};
};

namespace {
struct Bf16Matmul {
  dnnl_primitive_t primitive = nullptr;
  dnnl_memory_desc_t src, weights, dst, scratchpad;
  std::string impl;  // oneDNN's implementation, e.g. "brg:avx512_core_amx_bf16"
};

// The primitive of y[M][N] = x[M][K] * W[K][N] (accumulate: y += ...) with W in layout `weights`
// (format any: oneDNN's choice, which m.weights then holds); m.primitive null if oneDNN cannot
// make one.
std::unique_ptr<Bf16Matmul> make_bf16_matmul(int M, int K, int N,
                                             const dnnl_memory_desc_t& weights, bool accumulate) {
  const OneDnn& d = onednn();
  auto m = std::make_unique<Bf16Matmul>();
  const dnnl_dims_t src_dims = {M, K}, dst_dims = {M, N};
  dnnl_matmul_desc_t desc;
  dnnl_primitive_attr_t attr = nullptr;
  dnnl_post_ops_t post_ops = nullptr;
  dnnl_primitive_desc_t pd = nullptr;
  if (d.memory_desc_init_by_tag(&m->src, 2, src_dims, dnnl_bf16, dnnl_ab) != dnnl_success ||
      d.memory_desc_init_by_tag(&m->dst, 2, dst_dims, dnnl_f32, dnnl_ab) != dnnl_success ||
      d.matmul_desc_init(&desc, &m->src, &weights, nullptr, &m->dst) != dnnl_success ||
      d.attr_create(&attr) != dnnl_success)
    return m;
  // A scratchpad per call (matmul_bf16), so that threads may run one primitive at once.
  bool ok = d.attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user) == dnnl_success;
  if (ok && accumulate)
    ok = d.post_ops_create(&post_ops) == dnnl_success &&
         d.post_ops_append_sum(post_ops, 1.0f) == dnnl_success &&
         d.attr_set_post_ops(attr, post_ops) == dnnl_success;
  if (ok && d.primitive_desc_create(&pd, &desc, attr, d.engine, nullptr) == dnnl_success) {
    const char* impl = "";
    d.primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &impl);
    m->impl = impl;
    m->weights = *d.primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
    m->scratchpad = *d.primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
    if (d.primitive_create(&m->primitive, pd) != dnnl_success) m->primitive = nullptr;
    d.primitive_desc_destroy(pd);
  }
  if (post_ops) d.post_ops_destroy(post_ops);
  d.attr_destroy(attr);
  return m;
}

dnnl_memory_desc_t weights_desc(int K, int N, dnnl_format_tag_t tag) {
  dnnl_memory_desc_t md;
  const dnnl_dims_t dims = {K, N};
  onednn().memory_desc_init_by_tag(&md, 2, dims, dnnl_bf16, tag);
  return md;
}

// The primitive of shape (M, K, N) for W's rows as they are or for packed weights, made at first
// use; null if oneDNN cannot make one. Kept for the process's life (a few per model shape); safe
// to call from several threads.
const Bf16Matmul* bf16_matmul(int M, int K, int N, const PackedBf16* packed, bool accumulate) {
  if (!onednn().engine) return nullptr;
  static std::mutex mutex;
  static auto* cache = new std::map<std::array<int, 5>, std::unique_ptr<Bf16Matmul>>;
  std::lock_guard lock(mutex);
  auto& slot = (*cache)[{M, K, N, packed != nullptr, accumulate}];
  if (!slot)
    slot = make_bf16_matmul(M, K, N, packed ? packed->desc : weights_desc(K, N, dnnl_ba),
                            accumulate);
  return slot->primitive ? slot.get() : nullptr;
}
}  // namespace
#endif

namespace {
// oneDNN's implementation of bf16 products where it runs them on bf16 hardware (AMX, or
// AVX512-BF16's dot products), else "": elsewhere oneDNN emulates bf16, slower than its sgemm.
const std::string& bf16_hardware_impl() {
  static const std::string impl = [] {
#if DNNL_VERSION_MAJOR == 2
    if (const Bf16Matmul* m = bf16_matmul(kBf16RowStep, 64, 64, nullptr, false))
      if (m->impl.find("amx_bf16") != std::string::npos ||
          m->impl.find("avx512_core_bf16") != std::string::npos)
        return m->impl;
#endif
    return std::string();
  }();
  return impl;
}
}  // namespace

bool bf16_products_available() {
  return active_products() == Products::OneDnn && active_isa() == Isa::Avx512 &&
         !bf16_hardware_impl().empty();
}

std::string kernels_summary(int n_threads, Activations activations) {
  if (n_threads <= 0) n_threads = omp_get_max_threads();
  std::string kernels;
  if (active_products() == Products::Reference)
    kernels = "dot-product loops";
  else if (active_products() == Products::Kernels)
    kernels = std::string(isa_name(active_isa())) + ", no oneDNN (libdnnl.so not found)";
  else if (activations != Activations::Fp32 && bf16_products_available())
    kernels = std::string(isa_name(active_isa())) + ", oneDNN bf16 matmul (" +
              bf16_hardware_impl() +
              (activations == Activations::Bf16 ? "; activations rounded to bf16)" : ")");
  else
    kernels = std::string(isa_name(active_isa())) + ", oneDNN sgemm";
  return kernels + ", " + std::to_string(n_threads) + (n_threads == 1 ? " thread" : " threads");
}

// --- Weights --------------------------------------------------------------------------------

Matrix to_matrix(std::initializer_list<const TensorView*> parts) {
  Matrix m;
  bool bf16 = active_products() != Products::Reference, q8 = bf16;
  for (const TensorView* t : parts) {
    if (t->shape.size() != 2 || (m.N > 0 && t->shape[1] != m.K))
      throw Error("tensor " + t->name + " is not a matrix of the others' width");
    m.K = static_cast<int>(t->shape[1]);
    m.N += static_cast<int>(t->shape[0]);
    bf16 = bf16 && t->dtype == DType::BF16;
    q8 = q8 && t->dtype == DType::Q8_0;
  }
  for (const TensorView* t : parts) {
    if (bf16) {
      const auto* p = static_cast<const uint16_t*>(t->data);
      m.bf16.insert(m.bf16.end(), p, p + t->numel());
    } else if (q8) {
      const auto* p = static_cast<const uint8_t*>(t->data);
      for (int64_t b = 0; b < t->numel() / kQ8Block; ++b) {
        const uint8_t* block = p + b * kQ8BlockBytes;
        m.q8_scale.push_back(q8_0_scale(block));
        m.q8.insert(m.q8.end(), block + 2, block + kQ8BlockBytes);
      }
    } else {
      const std::vector<float> f = t->to_f32();
      m.f32.insert(m.f32.end(), f.begin(), f.end());
    }
  }
  return m;
}

Matrix sub_matrix(const Matrix& m, int n0, int n, int k0, int k) {
  if (n0 < 0 || k0 < 0 || n0 + n > m.N || k0 + k > m.K) throw Error("sub_matrix: out of range");
  Matrix out;
  out.N = n;
  out.K = k;
  // Rows [n0, n0 + n), columns [k0, k0 + k) of `from`: m's elements, or one per `per` of them
  // (the Q8_0 scales).
  auto copy = [&](const auto& from, auto& to, int per) {
    for (int r = n0; r < n0 + n; ++r) {
      const auto row = from.begin() + (size_t(r) * m.K + k0) / per;
      to.insert(to.end(), row, row + k / per);
    }
  };
  if (m.is_bf16()) {
    copy(m.bf16, out.bf16, 1);
  } else if (m.is_q8()) {
    if (k0 % kQ8Block != 0 || k % kQ8Block != 0)
      throw Error("Q8_0 weights: columns [" + std::to_string(k0) + ", " + std::to_string(k0 + k) +
                  ") are not whole blocks of " + std::to_string(kQ8Block) +
                  " (tensor parallelism splits Q8_0 matrices at block boundaries only)");
    copy(m.q8, out.q8, 1);
    copy(m.q8_scale, out.q8_scale, kQ8Block);
  } else {
    copy(m.f32, out.f32, 1);
  }
  return out;
}

Matrix stack_rows(std::initializer_list<const Matrix*> parts) {
  Matrix out;
  bool bf16 = true, q8 = true;
  for (const Matrix* p : parts) {
    if (out.N > 0 && p->K != out.K) throw Error("stack_rows: parts of different widths");
    out.K = p->K;
    out.N += p->N;
    bf16 = bf16 && p->is_bf16();
    q8 = q8 && p->is_q8();
  }
  for (const Matrix* p : parts) {
    if (bf16) {
      out.bf16.insert(out.bf16.end(), p->bf16.begin(), p->bf16.end());
    } else if (q8) {
      out.q8.insert(out.q8.end(), p->q8.begin(), p->q8.end());
      out.q8_scale.insert(out.q8_scale.end(), p->q8_scale.begin(), p->q8_scale.end());
    } else {  // as to_matrix: fp32 unless every part is bf16
      const size_t at = out.f32.size();
      out.f32.resize(at + size_t(p->N) * p->K);
      for (int r = 0; r < p->N; ++r) p->row(r, out.f32.data() + at + size_t(r) * p->K);
    }
  }
  return out;
}

void Matrix::row(int n, float* out) const {
  const size_t off = size_t(n) * K;
  if (is_bf16())
    for (int k = 0; k < K; ++k) out[k] = bf16_to_f32(bf16[off + k]);
  else if (is_q8())
    for (int k = 0; k < K; ++k) out[k] = q8_scale[(off + k) / kQ8Block] * q8[off + k];
  else
    std::copy_n(f32.data() + off, K, out);
}

// --- Matrix-vector kernels: T <= kGemvRows rows, each weight read once ------------------------
//
// block<R, G>(n) computes outputs n..n+G-1 of all R rows: R*G accumulators, G weight vectors.
// Each thread takes one contiguous range of outputs.

namespace {

template <class F>
void split_outputs(int N, int G, F&& f) {
#pragma omp parallel
  {
    const int nt = omp_get_num_threads(), id = omp_get_thread_num();
    const int blocks = (N + G - 1) / G;
    const int b0 = int(int64_t(blocks) * id / nt), b1 = int(int64_t(blocks) * (id + 1) / nt);
    if (b0 < b1) f(b0 * G, std::min(N, b1 * G));
  }
}

float widen(float w) { return w; }
float widen(uint16_t w) { return bf16_to_f32(w); }

template <int R>
void gemv_scalar(const float* x, int K, Q8Weights w, int n0, int n1, int N, float* y) {
  const int blocks = K / kQ8Block;
  for (int n = n0; n < n1; ++n)
    for (int r = 0; r < R; ++r) {
      const float* xr = x + size_t(r) * K;
      float t = 0;
      for (int b = 0; b < blocks; ++b) {
        const size_t at = size_t(n) * K + size_t(b) * kQ8Block;
        float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int k = 0; k < kQ8Block; k += 8)
          for (int j = 0; j < 8; ++j) s[j] += float(w.q[at + k + j]) * xr[b * kQ8Block + k + j];
        t += w.scale[at / kQ8Block] *
             (((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])));
      }
      y[size_t(r) * N + n] = t;
    }
}

template <int R, class W>
void gemv_scalar(const float* x, int K, const W* w, int n0, int n1, int N, float* y) {
  for (int n = n0; n < n1; ++n) {
    const W* wn = w + size_t(n) * K;
    for (int r = 0; r < R; ++r) {
      const float* xr = x + size_t(r) * K;
      float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // independent sums, as in dot()
      int k = 0;
      for (; k + 8 <= K; k += 8)
        for (int j = 0; j < 8; ++j) s[j] += widen(wn[k + j]) * xr[k + j];
      float t = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
      for (; k < K; ++k) t += widen(wn[k]) * xr[k];
      y[size_t(r) * N + n] = t;
    }
  }
}

// W: const float*, const uint16_t* (bf16) or Q8Weights.
template <int R, class W>
void gemv_rows(const float* x, int K, W w, int N, float* y) {
  const Isa isa = active_isa();
  split_outputs(N, 4, [&](int n0, int n1) {
    if (isa == Isa::Avx512)
      avx512::gemv_range<R>(x, K, w, n0, n1, N, y);
    else if (isa == Isa::Avx2)
      avx2::gemv_range<R>(x, K, w, n0, n1, N, y);
    else
      gemv_scalar<R>(x, K, w, n0, n1, N, y);
  });
}

// gemv_rows<T> for T = 1..kGemvRows.
template <class W>
void gemv(const float* x, int T, int K, W w, int N, float* y) {
  if (T < 1 || T > kGemvRows)
    throw Error("gemv: " + std::to_string(T) + " rows (1 to " + std::to_string(kGemvRows) + ")");
  [&]<int... R>(std::integer_sequence<int, R...>) {
    ((T == R + 1 ? gemv_rows<R + 1>(x, K, w, N, y) : void()), ...);
  }
  (std::make_integer_sequence<int, kGemvRows>());
}

}  // namespace

// --- Matrix products ------------------------------------------------------------------------

#if DNNL_VERSION_MAJOR == 2
namespace {
// Runs `mm` on bf16 rows `src`, weights `weights` (W's rows or its packed copy), into `dst`.
dnnl_status_t execute(const Bf16Matmul& mm, dnnl_stream_t stream, const uint16_t* src,
                      const uint16_t* weights, float* dst, uint8_t* scratchpad) {
  const OneDnn& d = onednn();
  dnnl_memory_t mem[4] = {};
  const dnnl_memory_desc_t* descs[4] = {&mm.src, &mm.weights, &mm.dst, &mm.scratchpad};
  void* data[4] = {const_cast<uint16_t*>(src), const_cast<uint16_t*>(weights), dst, scratchpad};
  dnnl_status_t st = dnnl_success;
  for (int i = 0; i < 4 && st == dnnl_success; ++i)
    st = d.memory_create(&mem[i], descs[i], d.engine, data[i]);  // (read only: src, weights)
  if (st == dnnl_success) {
    const dnnl_exec_arg_t args[] = {{DNNL_ARG_SRC, mem[0]},
                                    {DNNL_ARG_WEIGHTS, mem[1]},
                                    {DNNL_ARG_DST, mem[2]},
                                    {DNNL_ARG_SCRATCHPAD, mem[3]}};
    st = d.primitive_execute(mm.primitive, stream, 4, args);
    if (st == dnnl_success) st = d.stream_wait(stream);
  }
  for (dnnl_memory_t m : mem)
    if (m) d.memory_destroy(m);
  return st;
}

// The bf16 path of matmul (bf16_products_available() and bf16 weights): x split in two bf16
// parts (split), or rounded once.
void matmul_bf16(const float* x, int T, const Matrix& W, float* y, bool split) {
  const int K = W.K, N = W.N;
  const int M = (T + kBf16RowStep - 1) / kBf16RowStep * kBf16RowStep;
  const PackedBf16* packed = W.packed.get();
  const Bf16Matmul* first = bf16_matmul(M, K, N, packed, false);
  const Bf16Matmul* second = split ? bf16_matmul(M, K, N, packed, true) : nullptr;
  if (!first || (split && !second))
    throw Error("matmul: oneDNN cannot make a bf16 product of " + std::to_string(M) + " x " +
                std::to_string(K) + " by " + std::to_string(K) + " x " + std::to_string(N));
  const OneDnn& d = onednn();
  // Per calling thread (tensor-parallel shards are threads), buffers that only grow: the parts
  // [M][K] each (x's rows, then zeros), the product [M][N] where T < M (else y itself).
  thread_local std::vector<uint16_t> halves;
  thread_local std::vector<float> product;
  thread_local std::vector<uint8_t> scratchpad;
  const int64_t n = int64_t(T) * K, rows_n = int64_t(M) * K;
  uint16_t* hi = at_least(halves, size_t(split ? 2 : 1) * rows_n);
  uint16_t* lo = split ? hi + rows_n : nullptr;
  float* out = T == M ? y : at_least(product, size_t(M) * N);
  size_t scratch_bytes = d.memory_desc_get_size(&first->scratchpad);
  if (second) scratch_bytes = std::max(scratch_bytes, d.memory_desc_get_size(&second->scratchpad));
  uint8_t* scratch = at_least(scratchpad, scratch_bytes);
  constexpr int64_t kPart = 16384;  // elements per task
  parallel_for((n + kPart - 1) / kPart, n >= 4 * kPart, [&](int64_t part) {
    const int64_t i = part * kPart;
    avx512::split_bf16(x + i, std::min(kPart, n - i), hi + i, lo ? lo + i : nullptr);
  });
  std::fill(hi + n, hi + rows_n, uint16_t{0});
  if (lo) std::fill(lo + n, lo + rows_n, uint16_t{0});

  const uint16_t* w = packed ? packed->data.get() : W.bf16.data();
  dnnl_stream_t stream = nullptr;
  dnnl_status_t st = d.stream_create(&stream, d.engine, dnnl_stream_default_flags);
  // The low parts' product first, the high parts' added to it: y = hi * W + lo * W.
  if (st == dnnl_success) st = execute(*first, stream, split ? lo : hi, w, out, scratch);
  if (st == dnnl_success && split) st = execute(*second, stream, hi, w, out, scratch);
  if (stream) d.stream_destroy(stream);
  if (st != dnnl_success)
    throw Error("matmul: oneDNN's bf16 matmul failed (status " + std::to_string(int(st)) + ")");
  if (out != y) std::copy_n(out, int64_t(T) * N, y);
}
}  // namespace
#endif

void pack_for_bf16_products(Matrix& m) {
#if DNNL_VERSION_MAJOR == 2
  if (!m.is_bf16() || !bf16_products_available()) return;
  const OneDnn& d = onednn();
  const auto layout = make_bf16_matmul(kPackRows, m.K, m.N,
                                       weights_desc(m.K, m.N, dnnl_format_tag_any), false);
  if (!layout->primitive) return;
  d.primitive_destroy(layout->primitive);
  auto packed = std::make_shared<PackedBf16>();
  packed->desc = layout->weights;
  const size_t bytes = (d.memory_desc_get_size(&packed->desc) + 63) / 64 * 64;
  packed->data.reset(static_cast<uint16_t*>(std::aligned_alloc(64, bytes)));
  if (!packed->data) throw std::bad_alloc();
  const dnnl_memory_desc_t rows = weights_desc(m.K, m.N, dnnl_ba);
  dnnl_primitive_desc_t pd = nullptr;
  dnnl_primitive_t reorder = nullptr;
  dnnl_memory_t from = nullptr, to = nullptr;
  dnnl_stream_t stream = nullptr;
  dnnl_status_t st = d.reorder_desc_create(&pd, &rows, d.engine, &packed->desc, d.engine, nullptr);
  if (st == dnnl_success) st = d.primitive_create(&reorder, pd);
  if (st == dnnl_success) st = d.memory_create(&from, &rows, d.engine, m.bf16.data());
  if (st == dnnl_success) st = d.memory_create(&to, &packed->desc, d.engine, packed->data.get());
  if (st == dnnl_success) st = d.stream_create(&stream, d.engine, dnnl_stream_default_flags);
  if (st == dnnl_success) {
    const dnnl_exec_arg_t args[] = {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}};
    st = d.primitive_execute(reorder, stream, 2, args);
    if (st == dnnl_success) st = d.stream_wait(stream);
  }
  if (stream) d.stream_destroy(stream);
  for (dnnl_memory_t mem : {from, to})
    if (mem) d.memory_destroy(mem);
  if (reorder) d.primitive_destroy(reorder);
  if (pd) d.primitive_desc_destroy(pd);
  if (st != dnnl_success)
    throw Error("oneDNN could not pack a " + std::to_string(m.N) + " x " + std::to_string(m.K) +
                " bf16 matrix for its products (status " + std::to_string(int(st)) + ")");
  m.packed = std::move(packed);
#else
  (void)m;
#endif
}

void matmul(const float* x, int T, const Matrix& W, float* y, std::span<float> wide,
            Activations activations) {
  const int K = W.K, N = W.N;
  if (T <= 0) return;
  if (active_products() == Products::Reference) {
    if (!W.is_f32()) throw Error("matmul: the reference path needs fp32 weights");
    return matmul_reference(x, T, K, W.f32.data(), N, y);
  }
  auto kernels = [&](int t0, int rows) {
    if (W.is_bf16())
      gemv(x + size_t(t0) * K, rows, K, W.bf16.data(), N, y + size_t(t0) * N);
    else if (W.is_q8())
      gemv(x + size_t(t0) * K, rows, K, Q8Weights{W.q8.data(), W.q8_scale.data()}, N,
           y + size_t(t0) * N);
    else
      gemv(x + size_t(t0) * K, rows, K, W.f32.data(), N, y + size_t(t0) * N);
  };
  if (T <= kGemvRows || active_products() == Products::Kernels) {
    for (int t0 = 0; t0 < T; t0 += kGemvRows) kernels(t0, std::min(kGemvRows, T - t0));
    return;
  }
#if DNNL_VERSION_MAJOR == 2
  if (activations != Activations::Fp32 && W.is_bf16() && bf16_products_available())
    return matmul_bf16(x, T, W, y, activations == Activations::SplitBf16);
#endif
  const float* wf = W.f32.data();
  if (!W.is_f32()) {
    const int64_t n = int64_t(N) * K;
    if (wide.size() < size_t(n)) throw Error("matmul: the widening buffer is too small");
    if (W.is_bf16()) {
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) wide[i] = bf16_to_f32(W.bf16[i]);
    } else {
#pragma omp parallel for schedule(static)
      for (int64_t b = 0; b < n / kQ8Block; ++b) {
        const float d = W.q8_scale[b];
        for (int j = 0; j < kQ8Block; ++j) wide[b * kQ8Block + j] = d * W.q8[b * kQ8Block + j];
      }
    }
    wf = wide.data();
  }
  const dnnl_status_t st = onednn().sgemm('N', 'T', T, N, K, 1.0f, x, K, wf, K, 0.0f, y, N);
  if (st != dnnl_success)
    throw Error("matmul: oneDNN sgemm failed (status " + std::to_string(int(st)) + ")");
}

void matmul_reference(const float* x, int T, int K, const float* W, int N, float* y) {
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

// --- Attention's inner loops ----------------------------------------------------------------

void scaled_dots(const float* q, const float* rows, int64_t stride, int n, int d, float scale,
                 float* s) {
  switch (active_isa()) {
    case Isa::Avx512:
      return avx512::scaled_dots(q, rows, stride, n, d, scale, s);
    case Isa::Avx2:
      return avx2::scaled_dots(q, rows, stride, n, d, scale, s);
    case Isa::Scalar:
      for (int j = 0; j < n; ++j) s[j] = dot(q, rows + j * stride, d) * scale;
  }
}

void add_weighted_rows(const float* p, const float* rows, int64_t stride, int n, int d,
                       float* out) {
  switch (active_isa()) {
    case Isa::Avx512:
      return avx512::add_weighted_rows(p, rows, stride, n, d, out);
    case Isa::Avx2:
      return avx2::add_weighted_rows(p, rows, stride, n, d, out);
    case Isa::Scalar:
      for (int j = 0; j < n; ++j)
        for (int c = 0; c < d; ++c) out[c] += p[j] * rows[j * stride + c];
  }
}

void scaled_dots_rows(const float* q, int64_t q_stride, int nq, const float* rows, int64_t stride,
                      int n, int d, float scale, float* s, int64_t s_stride) {
  switch (active_isa()) {
    case Isa::Avx512:
      return avx512::scaled_dots_rows(q, q_stride, nq, rows, stride, n, d, scale, s, s_stride);
    case Isa::Avx2:
      return avx2::scaled_dots_rows(q, q_stride, nq, rows, stride, n, d, scale, s, s_stride);
    case Isa::Scalar:
      for (int a = 0; a < nq; ++a)
        scaled_dots(q + a * q_stride, rows, stride, n, d, scale, s + a * s_stride);
  }
}

void add_weighted_rows_rows(const float* p, int64_t p_stride, int nq, const float* rows,
                            int64_t stride, int n, int d, float* out, int64_t out_stride) {
  switch (active_isa()) {
    case Isa::Avx512:
      return avx512::add_weighted_rows_rows(p, p_stride, nq, rows, stride, n, d, out, out_stride);
    case Isa::Avx2:
      return avx2::add_weighted_rows_rows(p, p_stride, nq, rows, stride, n, d, out, out_stride);
    case Isa::Scalar:
      for (int a = 0; a < nq; ++a)
        add_weighted_rows(p + a * p_stride, rows, stride, n, d, out + a * out_stride);
  }
}

// --- Elementwise operations (rows in parallel where enough of them pay for the threads) ------

void rmsnorm(const float* x, const float* w, int T, int n, float eps, float* y) {
  parallel_for(T, T >= 64, [&](int64_t t) {
    const float* r = x + t * n;
    const float ms = dot(r, r, n) / static_cast<float>(n);
    const float inv = 1.0f / std::sqrt(ms + eps);
    for (int i = 0; i < n; ++i) y[t * n + i] = r[i] * inv * w[i];
  });
}

RopeTable rope_table(int T, int d, int64_t pos0, float theta, float linear_factor) {
  const int half = d / 2;
  RopeTable table{T, d, std::vector<float>(size_t(T) * half), std::vector<float>(size_t(T) * half)};
  std::vector<double> inv_freq(half);
  for (int i = 0; i < half; ++i) inv_freq[i] = std::pow(double(theta), -2.0 * i / d);
  parallel_for(T, T >= 64, [&](int64_t t) {
    for (int i = 0; i < half; ++i) {
      const double a = double(pos0 + t) / linear_factor * inv_freq[i];
      table.cos[size_t(t) * half + i] = static_cast<float>(std::cos(a));
      table.sin[size_t(t) * half + i] = static_cast<float>(std::sin(a));
    }
  });
  return table;
}

void rope(float* x, int heads, const RopeTable& table) {
  const int T = table.T, d = table.d, half = d / 2;
  parallel_for(T, T >= 64, [&](int64_t t) {
    const float* cs = table.cos.data() + size_t(t) * half;
    const float* sn = table.sin.data() + size_t(t) * half;
    for (int h = 0; h < heads; ++h) {
      float* v = x + (t * heads + h) * d;
      for (int i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cs[i] - b * sn[i];
        v[i + half] = b * cs[i] + a * sn[i];
      }
    }
  });
}

void rope(float* x, int T, int heads, int d, int64_t pos0, float theta, float linear_factor) {
  rope(x, heads, rope_table(T, d, pos0, theta, linear_factor));
}

void swiglu(const float* gu, int T, int F, float* y) {
  const Isa isa = active_isa();
  parallel_for(T, int64_t(T) * F >= 65536, [&](int64_t t) {
    const float* g = gu + size_t(t) * 2 * F;
    const float* u = g + F;
    float* out = y + size_t(t) * F;
    if (isa == Isa::Avx512)
      avx512::swiglu(g, u, out, F);
    else if (isa == Isa::Avx2)
      avx2::swiglu(g, u, out, F);
    else
      for (int i = 0; i < F; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  });
}

void softmax(float* s, int n) {
  switch (active_isa()) {
    case Isa::Avx512:
      return avx512::softmax(s, n);
    case Isa::Avx2:
      return avx2::softmax(s, n);
    case Isa::Scalar:
      break;
  }
  const float mx = *std::max_element(s, s + n);
  double total = 0;
  for (int j = 0; j < n; ++j) total += (s[j] = std::exp(s[j] - mx));
  const float inv = static_cast<float>(1.0 / total);
  for (int j = 0; j < n; ++j) s[j] *= inv;
}

void vector_exp(const float* x, int64_t n, float* y) {
  switch (active_isa()) {
    case Isa::Avx512:
      return avx512::exp_rows(x, n, y);
    case Isa::Avx2:
      return avx2::exp_rows(x, n, y);
    case Isa::Scalar:
      for (int64_t i = 0; i < n; ++i) y[i] = std::exp(x[i]);
  }
}

constexpr unsigned kFlushBits = 0x8040;  // MXCSR's FTZ | DAZ
void flush_subnormals_in_this_thread() { _mm_setcsr(_mm_getcsr() | kFlushBits); }
bool subnormals_flushed_in_this_thread() { return (_mm_getcsr() & kFlushBits) == kFlushBits; }

}  // namespace mp::cpu
