// The CUDA backend: the same model as the CPU backend (engine/src/backend_cpu.cpp) with bf16 or
// Q8_0 weights, fp32 activations and accumulation, GEMMs through cuBLAS (Q8_0 decode: a
// dequantizing GEMV kernel), and every slot's hierarchical cache in one pool of device memory
// allocated at start.
#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <map>

#include "../engine/src/backend_cpu.h"
#include "../engine/src/backend_cuda.h"
#include "../engine/src/communicator.h"
#include "../engine/src/fma_cpu.h"
#include "../engine/src/numeric.h"
#include "../engine/src/sampling.h"
#include "device_array.cuh"
#include "fma_cuda.cuh"
#include "sampling_cuda.cuh"

namespace mp {

int cuda_device_count_present() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

namespace {

using cuda::check;
using cuda::DeviceArray;

// Makes `device` current on the calling thread for a scope. Every entry point of the backend
// opens one: replicas call each backend from its own thread, tools from theirs, and a stream,
// a graph or memory of one device is an error on another.
class OnDevice {
 public:
  explicit OnDevice(int device) {
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) check(cudaSetDevice(device), "cudaSetDevice");
    set_ = prev_ != device;
  }
  ~OnDevice() {
    if (set_) cudaSetDevice(prev_);
  }
  OnDevice(const OnDevice&) = delete;
  OnDevice& operator=(const OnDevice&) = delete;

 private:
  int prev_ = 0;
  bool set_ = false;
};

// Arrays of several types in one device buffer, moved by one copy: each cudaMemcpyAsync costs the
// stream a few microseconds, and a step has a dozen small inputs and four outputs (a batch-1
// decode step takes about 0.3 ms). The arrays lie in the order given, at 64-byte aligned offsets.
class PackedArrays {
 public:
  // Lays the vectors out, copies them into the pinned mirror and starts one copy to the device;
  // true when the device buffer moved. The vectors may change as soon as it returns.
  template <class... T>
  bool upload(cudaStream_t s, const std::vector<T>&... v) {
    const bool moved = layout({v.size() * sizeof(T)...});
    uint8_t* h = buf_.staging(buf_.size());
    size_t i = 0;
    ((v.empty() ? void() : void(std::memcpy(h + offsets_[i], v.data(), v.size() * sizeof(T))),
      ++i),
     ...);
    buf_.upload_staged(used_, s);
    return moved;
  }
  // Lays out arrays of these sizes in bytes (for results); true when the device buffer moved.
  bool layout(std::initializer_list<size_t> bytes) {
    offsets_.clear();
    used_ = 0;
    for (size_t b : bytes) {
      offsets_.push_back(used_);
      used_ += (b + 63) / 64 * 64;
    }
    // Grown with headroom: each move drops the captured graphs.
    return used_ > buf_.size() && buf_.resize(used_ + used_ / 2);
  }
  // Starts copying every array back; host(i) is valid once the stream is synchronised.
  void download(cudaStream_t s) { host_ = buf_.download(used_, s); }
  template <class T>
  T* device(size_t i) const {
    return reinterpret_cast<T*>(buf_.get() + offsets_[i]);
  }
  template <class T>
  const T* host(size_t i) const {
    return reinterpret_cast<const T*>(host_ + offsets_[i]);
  }
  const std::vector<size_t>& offsets() const { return offsets_; }

 private:
  DeviceArray<uint8_t> buf_;
  std::vector<size_t> offsets_;
  size_t used_ = 0;
  const uint8_t* host_ = nullptr;
};

// Weights, once: plain copies (no pinned mirror kept).
template <class T>
DeviceArray<T> upload_once(const std::vector<T>& h) {
  DeviceArray<T> d(h.size());
  check(cudaMemcpy(d.get(), h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), "upload");
  return d;
}
// Rows [r0, r0 + nr) and columns [c0, c0 + nc) of a matrix (-1: to the end): all of it, or a
// tensor-parallel shard's part.
struct Part {
  const TensorView* t;
  int64_t r0 = 0, nr = -1, c0 = 0, nc = -1;
};
// A weight matrix [N][K] on the device: Q8_0 as stored (int8 and fp16 scales, see
// cuda::Q8Weights) where every part is Q8_0, else bf16.
struct Weights {
  int N = 0, K = 0;
  DeviceArray<__nv_bfloat16> bf16;
  DeviceArray<int8_t> q8;
  DeviceArray<__half> scale;
  // Q8_0 dequantized once, for cuBLAS products of more than kGemvRows rows, where room allows
  // (CudaBackend's constructor); else each such product dequantizes into a shared scratch.
  DeviceArray<__nv_bfloat16> q8_as_bf16;
  bool is_q8() const { return q8.get() != nullptr; }
  cuda::Q8Weights q8_view() const { return {q8.get(), scale.get()}; }
};

// Matrices stacked by rows: one GEMM computes all their outputs.
Weights upload_weights(std::initializer_list<Part> parts) {
  Weights w;
  bool q8 = true;
  for (const Part& p : parts) {
    w.K = int(p.nc < 0 ? p.t->shape[1] - p.c0 : p.nc);
    w.N += int(p.nr < 0 ? p.t->shape[0] - p.r0 : p.nr);
    q8 = q8 && p.t->dtype == DType::Q8_0;
  }
  if (q8) {  // the blocks of the parts' rows and columns
    std::vector<int8_t> hq;
    std::vector<__half> hs;
    for (const Part& p : parts) {
      const int64_t K = p.t->shape[1], nr = p.nr < 0 ? p.t->shape[0] - p.r0 : p.nr;
      if (p.c0 % kQ8Block != 0 || w.K % kQ8Block != 0)
        throw Error("Q8_0 tensor '" + p.t->name + "': columns [" + std::to_string(p.c0) + ", " +
                    std::to_string(p.c0 + w.K) + ") are not whole blocks of " +
                    std::to_string(kQ8Block) +
                    " (tensor parallelism splits Q8_0 matrices at block boundaries only)");
      const auto* bytes = static_cast<const uint8_t*>(p.t->data);
      for (int64_t r = p.r0; r < p.r0 + nr; ++r)
        for (int64_t b = p.c0 / kQ8Block; b < (p.c0 + w.K) / kQ8Block; ++b) {
          const uint8_t* block = bytes + (r * K / kQ8Block + b) * kQ8BlockBytes;
          __half_raw d;
          std::memcpy(&d.x, block, 2);
          hs.push_back(__half(d));
          hq.insert(hq.end(), block + 2, block + kQ8BlockBytes);
        }
    }
    w.q8 = upload_once(hq);
    w.scale = upload_once(hs);
    return w;
  }
  std::vector<__nv_bfloat16> h;
  for (const Part& p : parts) {
    const std::vector<float> f = p.t->to_f32();
    const int64_t K = p.t->shape[1], nr = p.nr < 0 ? p.t->shape[0] - p.r0 : p.nr;
    for (int64_t r = p.r0; r < p.r0 + nr; ++r)
      for (int64_t c = p.c0; c < p.c0 + w.K; ++c) h.push_back(__float2bfloat16(f[r * K + c]));
  }
  w.bf16 = upload_once(h);
  return w;
}

struct Layer {
  DeviceArray<float> attn_norm, ffn_norm;
  Weights wqkv, wo, gate_up, down;  // [q; k; v] and [gate; up] stacked
  std::vector<DeviceArray<float>> ds;                  // per level: wk, bk, wv, bv
  DeviceArray<const float*> ds_ptrs;                   // [4][L]: the Downsamplers table
  std::vector<DeviceArray<__nv_bfloat16>> taps;        // one-pass kernel: per level, k and v
  // The layer's part of the slot pool (cuda::CacheView: the fine window in bf16).
  DeviceArray<__nv_bfloat16> fine_k, fine_v;
  DeviceArray<float> sum_k, sum_v, acc_k, acc_v;
};

class CudaBackend final : public Backend {
 public:
  CudaBackend(std::shared_ptr<const Model> model, int n_slots, int64_t max_context, int device,
              Communicator* comm = nullptr,
              cuda::SummaryKernels kernels = cuda::SummaryKernels::Auto,
              cuda::Q8Products q8_products = cuda::Q8Products::Auto,
              cuda::Launches launches = cuda::Launches::Overlapped)
      : model_(std::move(model)),
        c_(comm ? shard_config(model_->config(), comm->size()) : model_->config()),
        device_(device),
        comm_(comm),
        kernels_(kernels),
        // MULTIPOLE_CUDA_SERIAL_LAUNCHES=1: no programmatic dependent launches, to tell a race
        // between overlapped kernels from other faults (as CUDA_LAUNCH_BLOCKING does for streams).
        launches_(std::getenv("MULTIPOLE_CUDA_SERIAL_LAUNCHES") ? cuda::Launches::Serial
                                                                : launches) {
    if (n_slots <= 0) throw Error("backend: n_slots must be positive");
    // Left current: the members' memory is freed on this device (see ~CudaBackend).
    check(cudaSetDevice(device_), "cudaSetDevice");
    check(cudaStreamCreate(&stream_), "cudaStreamCreate");
    check(cudaStreamCreate(&side_), "cudaStreamCreate");
    for (cudaEvent_t* e : {&attended_, &appended_})
      check(cudaEventCreateWithFlags(e, cudaEventDisableTiming), "cudaEventCreate");
    check(cublasCreate(&cublas_), "cublasCreate");
    check(cublasSetStream(cublas_, stream_), "cublasSetStream");
    // A fixed workspace keeps cuBLAS from allocating while a decode step is captured in a graph.
    cublas_workspace_.resize(32 << 20);
    check(cublasSetWorkspace(cublas_, cublas_workspace_.get(), cublas_workspace_.size()),
          "cublasSetWorkspace");
    namespace tn = tensor_names;
    // Whole matrices' sizes, and this shard's rows or columns of them (all without a comm).
    const Config& full = model_->config();
    const int64_t H = c_.hidden_size, V = c_.vocab_size, F = full.intermediate_size;
    const int64_t d = c_.head_dim, q = full.n_heads * d, kv = full.n_kv_heads * d;
    const int rank = comm ? comm->rank() : 0;
    const int64_t qs = c_.n_heads * d, kvs = c_.n_kv_heads * d;
    const int64_t Fs = c_.intermediate_size;
    shape_ = cuda::make_shape(c_);
    cap_ = c_.fma_enabled ? 2 * int64_t{c_.fma_block_size} : max_context;
    if (cap_ <= 0) throw Error("CUDA backend: exact attention needs a positive max_context");
    embed_ = upload_weights({{&model_->tensor(tn::token_embd(), {V, H})}});
    out_norm_ = upload_once(model_->tensor(tn::output_norm(), {H}).to_f32());
    if (!c_.tie_word_embeddings) head_ = upload_weights({{&model_->tensor(tn::output(), {V, H})}});
    const size_t L = c_.n_levels(), pd = size_t(c_.fma_rank) * c_.head_dim;
    for (int i = 0; i < c_.n_layers; ++i) {
      Layer l;
      l.attn_norm = upload_once(model_->tensor(tn::layer(i, "attn_norm"), {H}).to_f32());
      l.ffn_norm = upload_once(model_->tensor(tn::layer(i, "ffn_norm"), {H}).to_f32());
      auto w = [&](const char* name, int64_t rows, int64_t cols) {
        return &model_->tensor(tn::layer(i, name), {rows, cols});
      };
      l.wqkv = upload_weights({{w("attn_q", q, H), rank * qs, qs},
                               {w("attn_k", kv, H), rank * kvs, kvs},
                               {w("attn_v", kv, H), rank * kvs, kvs}});
      l.wo = upload_weights({{w("attn_output", H, q), 0, H, rank * qs, qs}});
      l.gate_up = upload_weights(
          {{w("ffn_gate", F, H), rank * Fs, Fs}, {w("ffn_up", F, H), rank * Fs, Fs}});
      l.down = upload_weights({{w("ffn_down", H, F), 0, H, rank * Fs, Fs}});
      if (c_.fma_enabled) {
        // The same transposed layout as the CPU reference's Downsampler.
        const cpu::LayerDownsamplers ds = cpu::make_layer_downsamplers(c_, *model_, i);
        std::vector<const float*> ptrs(4 * L, nullptr);
        for (size_t lv = 0; lv < L; ++lv) {
          for (int which = 0; which < 4; ++which) {
            const cpu::Downsampler& d = which < 2 ? ds.k[lv] : ds.v[lv];
            l.ds.push_back(upload_once(which % 2 == 0 ? d.weight : d.bias));
            ptrs[which * L + lv] = l.ds.back().get();
          }
        }
        l.ds_ptrs = upload_once(ptrs);
        if (cuda::one_pass(shape_))
          for (size_t lv = 0; lv < L; ++lv)
            for (const auto* d : {&ds.k[lv], &ds.v[lv]})
              l.taps.push_back(upload_once(cuda::one_pass_taps(*d, c_.head_dim)));
      }
      const size_t S = n_slots;
      l.fine_k.resize(S * cap_ * kvs);
      l.fine_v.resize(S * cap_ * kvs);
      l.sum_k.resize(S * L * 3 * c_.n_kv_heads * pd);
      l.sum_v.resize(S * L * 3 * c_.n_kv_heads * pd);
      l.acc_k.resize(S * L * c_.n_kv_heads * pd);
      l.acc_v.resize(S * L * c_.n_kv_heads * pd);
      layers_.push_back(std::move(l));
    }
    // Products of more than kGemvRows rows (prefill, large decode batches) go through cuBLAS in
    // bf16. Q8_0 matrices are dequantized for it once, here, when their bf16 copies take at most
    // 1/16 of the device's memory (the shipped model: 64 MB); else each product dequantizes its
    // matrix into a scratch as large as the largest (a pass over the weights every step).
    std::vector<Weights*> q8;
    for (Weights* w : {&embed_, &head_})
      if (w->is_q8()) q8.push_back(w);
    for (Layer& l : layers_)
      for (Weights* w : {&l.wqkv, &l.wo, &l.gate_up, &l.down})
        if (w->is_q8()) q8.push_back(w);
    size_t q8_total = 0, q8_largest = 0, free_bytes = 0, device_bytes = 0;
    for (const Weights* w : q8) {
      q8_total += size_t(w->N) * w->K;
      q8_largest = std::max(q8_largest, size_t(w->N) * w->K);
    }
    check(cudaMemGetInfo(&free_bytes, &device_bytes), "cudaMemGetInfo");
    if (q8_products == cuda::Q8Products::Auto &&
        q8_total * sizeof(__nv_bfloat16) <= device_bytes / 16) {
      for (Weights* w : q8) {
        w->q8_as_bf16.resize(size_t(w->N) * w->K);
        cuda::dequantize_q8(w->q8_view(), int64_t(w->N) * w->K, w->q8_as_bf16.get(), stream_);
      }
    } else if (q8_largest) {
      dequant_.resize(q8_largest);
    }
    check(cudaStreamSynchronize(stream_), "upload");
    pos_.assign(n_slots, 0);
    in_use_.assign(n_slots, false);
  }

  // The device stays current while the members free their memory after this body.
  ~CudaBackend() override {
    cudaSetDevice(device_);
    drop_graphs();
    cublasDestroy(cublas_);
    cudaStreamDestroy(stream_);
    cudaStreamDestroy(side_);
    cudaEventDestroy(attended_);
    cudaEventDestroy(appended_);
  }

  std::string name() const override { return "cuda"; }
  const Config& config() const override { return c_; }
  int n_slots() const override { return static_cast<int>(pos_.size()); }
  int alloc_slot() override {
    for (size_t i = 0; i < pos_.size(); ++i)
      if (!in_use_[i]) {
        in_use_[i] = true;
        pos_[i] = 0;
        return static_cast<int>(i);
      }
    return -1;
  }
  void free_slot(int s) override { in_use_.at(check_slot(s)) = false; }
  // Nothing on the device needs clearing: only positions below pos_ are ever read, and an
  // accumulator is read only for a group that began before the chunk.
  void reset_slot(int s) override { pos_[check_slot(s)] = 0; }
  int64_t slot_pos(int s) const override { return pos_[check_slot(s)]; }
  // About 20 ms of prefill on an H200 (docs/PERF.md: 32 x 100k-token prompts read fastest with
  // 65,536 of 32,768 / 65,536 / 131,072), and a stream generating meanwhile waits that long.
  int prefill_tokens_per_step() const override { return 65536; }
  size_t slot_bytes(int) const override {  // keys and values: bf16 fine window, fp32 summaries
    const size_t pd = size_t(c_.fma_rank) * c_.head_dim, kv = size_t(c_.n_kv_heads);
    return c_.n_layers * 2 *
           (cap_ * kv * c_.head_dim * sizeof(__nv_bfloat16) +
            size_t(c_.n_levels()) * 4 * kv * pd * sizeof(float));
  }

  void copy_slot(int src, int dst) override {
    const OnDevice on(device_);
    check_slot(src);
    check_slot(dst);
    auto copy = [&]<class T>(DeviceArray<T>& a) {
      const size_t per = a.size() / pos_.size();
      check(cudaMemcpyAsync(a.get() + dst * per, a.get() + src * per, per * sizeof(T),
                            cudaMemcpyDeviceToDevice, stream_),
            "copy_slot");
    };
    for (auto& l : layers_) {
      copy(l.fine_k), copy(l.fine_v);
      for (auto* a : {&l.sum_k, &l.sum_v, &l.acc_k, &l.acc_v}) copy(*a);
    }
    check(cudaStreamSynchronize(stream_), "copy_slot");
    pos_[dst] = pos_[src];
  }

  // The same bytes as the CPU backend's state: states move between backends.
  std::vector<uint8_t> save_slot(int s) const override {
    const OnDevice on(device_);
    check_slot(s);
    cpu::SeqCache seq = cpu::make_seq_cache(c_);
    seq.pos = pos_[s];
    const size_t kvd = size_t(c_.n_kv_heads) * c_.head_dim;
    for (int li = 0; li < c_.n_layers; ++li) {
      const Layer& l = layers_[li];
      cpu::LayerCache& h = seq.layers[li];
      if (!c_.fma_enabled) {
        h.fine_k.resize(seq.pos * kvd);
        h.fine_v.resize(seq.pos * kvd);
      }
      download(l.fine_k, s, h.fine_k);  // the device's order is the file's (fma_cpu.h)
      download(l.fine_v, s, h.fine_v);
      download(l.sum_k, s, h.sum_k);
      download(l.sum_v, s, h.sum_v);
      download(l.acc_k, s, h.acc_k);
      download(l.acc_v, s, h.acc_v);
      for (int lv = 1; lv <= c_.n_levels(); ++lv) {  // the ring holds the last 3 complete groups
        const int64_t done = seq.pos / c_.group_size(lv);
        for (int64_t g = std::max<int64_t>(0, done - 3); g < done; ++g)
          h.sum_group[(lv - 1) * 3 + g % 3] = g;
      }
    }
    return cpu::serialize(c_, seq, cpu::FineOrder::File);
  }

  void load_slot(int s, std::span<const uint8_t> bytes) override {
    const OnDevice on(device_);
    check_slot(s);
    cpu::SeqCache seq;
    cpu::deserialize(c_, bytes, seq, cpu::FineOrder::File);
    if (seq.pos > cap_ && !c_.fma_enabled)
      throw Error("sequence state: " + std::to_string(seq.pos) + " tokens exceed max_context");
    for (int li = 0; li < c_.n_layers; ++li) {
      Layer& l = layers_[li];
      const cpu::LayerCache& h = seq.layers[li];
      upload_part(l.fine_k, s, h.fine_k);
      upload_part(l.fine_v, s, h.fine_v);
      upload_part(l.sum_k, s, h.sum_k);
      upload_part(l.sum_v, s, h.sum_v);
      upload_part(l.acc_k, s, h.acc_k);
      upload_part(l.acc_v, s, h.acc_v);
    }
    check(cudaStreamSynchronize(stream_), "load_slot");
    pos_[s] = seq.pos;
  }

  std::vector<float> forward(std::span<const SeqChunk> chunks) override {
    const OnDevice on(device_);
    sample_rows_.clear();
    pens_.clear();
    top_rows_.clear();
    const cuda::BatchPlan& p = launch(chunks);
    std::vector<float> logits(size_t(p.rows_wanted) * c_.vocab_size);
    check(cudaMemcpyAsync(logits.data(), logits_.get(), logits.size() * 4, cudaMemcpyDeviceToHost,
                          stream_),
          "logits");
    check(cudaStreamSynchronize(stream_), "forward");
    return logits;
  }

  std::vector<SampledToken> forward_sample(std::span<const SeqChunk> chunks,
                                           std::span<const SampleSpec> specs) override {
    start_sample(chunks, specs);
    return finish_sample(chunks, specs);
  }

  bool samples_asynchronously() const override { return true; }
  // Launches the step, the sampler and the results' download; finish_sample waits for them.
  void start_sample(std::span<const SeqChunk> chunks, std::span<const SampleSpec> specs) override {
    const OnDevice on(device_);
    check_sample_call(chunks, specs);
    const int V = c_.vocab_size;
    sample_rows_.clear();
    pens_.clear();
    top_rows_.clear();
    top_n_ = 0;
    for (size_t i = 0; i < specs.size(); ++i) {
      const SampleSpec& sp = specs[i];
      if (!sp.params) continue;
      sample_rows_.push_back(
          {int(i), *sp.params, int(pens_.size()), int(sp.penalties.size()), sp.uniform});
      for (const auto& [id, n] : sp.penalties) pens_.push_back({id, n});
      if (sp.top_logprobs > 0) top_rows_.push_back(int(i));
      top_n_ = std::max(top_n_, std::min(sp.top_logprobs, V));
    }
    launch(chunks);  // logits row i is chunk i's last token; the sampler's inputs uploaded too
    const size_t R = sample_rows_.size(), T = top_rows_.size() * top_n_;
    sampled_.layout({R * sizeof(int), R * sizeof(float), T * sizeof(int), T * sizeof(float)});
    sampler_.sample(logits_.get(), V, sample_rows_, inputs_.device<cuda::SampleRow>(kSampleRows),
                    inputs_.device<int2>(kPens), sampled_.device<int>(kIds),
                    sampled_.device<float>(kLogprobs), stream_);
    cuda::top_logprobs(logits_.get(), V, inputs_.device<int>(kTopRows), int(top_rows_.size()),
                       top_n_, sampled_.device<int>(kTopIds), sampled_.device<float>(kTopLps),
                       stream_);
    sampled_.download(stream_);
  }

  std::vector<SampledToken> finish_sample(std::span<const SeqChunk> chunks,
                                          std::span<const SampleSpec> specs) override {
    const OnDevice on(device_);
    check(cudaStreamSynchronize(stream_), "forward_sample");
    const int V = c_.vocab_size, top_n = top_n_;
    const size_t R = sample_rows_.size();
    const int* ids = sampled_.host<int>(kIds);
    const float* lps = sampled_.host<float>(kLogprobs);
    const int* top_ids = sampled_.host<int>(kTopIds);
    const float* top_lps = sampled_.host<float>(kTopLps);
    std::vector<SampledToken> out(chunks.size());
    for (size_t r = 0; r < R; ++r) {
      SampledToken& t = out[sample_rows_[r].row];
      t.token = ids[r];
      t.logprob = lps[r];
    }
    for (size_t r = 0; r < top_rows_.size(); ++r) {
      SampledToken& t = out[top_rows_[r]];
      for (int j = 0; j < specs[top_rows_[r]].top_logprobs; ++j)
        t.top_logprobs.emplace_back(top_ids[r * top_n + j], top_lps[r * top_n + j]);
    }
    for (size_t r = 0; r < R; ++r) {  // a candidate list longer than the GPU keeps: the host's
      const int i = sample_rows_[r].row;
      if (out[i].token >= 0) continue;
      std::vector<float> row(V);
      check(cudaMemcpy(row.data(), logits_.get() + size_t(i) * V, size_t(V) * 4,
                       cudaMemcpyDeviceToHost),
            "logits");
      out[i] = sample_on_host(specs[i], row);
    }
    return out;
  }

 private:
  // Uploads the plan and sizes the scratch; true when any device buffer moved (captured graphs
  // then point at freed memory).
  bool stage(const cuda::BatchPlan& p) {
    const int T = p.T, H = c_.hidden_size, d = c_.head_dim, nh = c_.n_heads, nkv = c_.n_kv_heads;
    const int F = c_.intermediate_size, V = c_.vocab_size;
    const size_t R = p.rows.size();
    cudaStream_t s = stream_;
    // In the order of Input (a decode step's first arrays have their bucket's sizes, so each
    // bucket keeps its offsets from step to step).
    bool moved = inputs_.upload(s, p.tokens, p.pos, p.rows, p.attn, p.done, p.filling, p.commits,
                                p.chunks, p.table, sample_rows_, pens_, top_rows_);
    for (auto* a : {&x_, &x_spare_, &h_}) moved |= a->resize(size_t(T) * H);
    moved |= hb_.resize(size_t(T) * std::max(H, std::max(F, nh * d)));
    moved |= normed_.resize(size_t(T) * H);
    moved |= qkv_.resize(size_t(T) * (nh + 2 * nkv) * d);
    moved |= q_.resize(size_t(T) * nh * d);
    for (auto* a : {&k_, &v_}) moved |= a->resize(size_t(T) * nkv * d);
    moved |= gu_.resize(size_t(T) * 2 * F);
    moved |= angles_.resize(size_t(T) * (d / 2));
    // The new summaries: keys', then values' right after them (one clearing a layer). Their
    // split point is the plan's need, which a decode step's bucket fixes for its graph.
    moved |= new_kv_.resize(2 * new_summary_floats(p));
    // A decode step's split keys: tickets (zero when new, left at zero by every step), then the
    // partial results.
    if (p.padded && split_.resize(cuda::decode_scratch_floats(shape_, cap_, int(p.attn.size())))) {
      moved = true;
      check(cudaMemsetAsync(split_.get(), 0, cuda::kDecodeTickets * sizeof(unsigned), s),
            "decode tickets");
    }
    moved |= sel_.resize(R * H);
    moved |= logits_.resize(R * V);
    return moved;
  }

  // Floats (per half: keys, values) of the new summaries a plan can write: room for every group
  // that can complete (in a decode step, one per level per sequence; none where append_tokens
  // writes them into the ring).
  size_t new_summary_floats(const cuda::BatchPlan& p) const {
    if (p.append) return 0;
    const size_t seqs = p.padded ? size_t(p.T) : p.chunks.size();
    return std::max<size_t>(p.new_groups, seqs * c_.n_levels()) * c_.n_kv_heads * c_.fma_rank *
           c_.head_dim;
  }

  // The model's kernels for a staged plan, ending with the logits in logits_.
  void compute(const cuda::BatchPlan& p) {
    const int T = p.T, H = c_.hidden_size, d = c_.head_dim, nh = c_.n_heads, nkv = c_.n_kv_heads;
    const int L = c_.n_levels();
    cudaStream_t s = stream_;
    const int* tokens = inputs_.device<int>(kTokens);
    const auto* chunks = inputs_.device<cuda::ChunkDesc>(kChunks);
    const auto* table = inputs_.device<cuda::NewGroups>(kTable);
    if (embed_.is_q8())
      cuda::embed_q8(embed_.q8_view(), tokens, T, H, x_.get(), s);
    else
      cuda::embed(embed_.bf16.get(), tokens, T, H, x_.get(), s);
    // The residual stream; a norm fused into a GEMV writes its sum to the spare buffer.
    float *x = x_.get(), *spare = x_spare_.get();
    // A decode step's kernels overlap along its chain (overlap.cuh), except the first after the
    // side stream's join: that launch waits on an event, not on the kernel before.
    const bool chain = launches_ == cuda::Launches::Overlapped && p.padded && p.append && !comm_;
    // Rows too many for the GEMV: cuBLAS, then split_qkv_rope, whose RoPE angles (in double) are
    // worked out here once for every layer.
    const int64_t* pos = inputs_.device<int64_t>(kPos);
    float2* angles = angles_.get();
    if (!gemv_fits(T, layers_[0].wqkv))
      cuda::rope_angles(pos, T, d, c_.rope_theta, c_.rope_linear_factor, angles, s);
    for (int li = 0; li < c_.n_layers; ++li) {
      Layer& l = layers_[li];
      const cuda::CacheView cv{l.fine_k.get(), l.fine_v.get(), l.sum_k.get(), l.sum_v.get(),
                               l.acc_k.get(),  l.acc_v.get(),  cap_,          c_.fma_enabled};
      const float* const* dp = l.ds_ptrs.get();
      cuda::Downsamplers ds{dp, dp ? dp + L : nullptr, dp ? dp + 2 * L : nullptr,
                            dp ? dp + 3 * L : nullptr};
      for (size_t lv = 0; lv < l.taps.size() / 2; ++lv)
        ds.tk[lv] = l.taps[2 * lv].get(), ds.tv[lv] = l.taps[2 * lv + 1].get();
      // The previous layer's FFN output joins the residual stream in the norm.
      norm_matmul(x, spare, li == 0 ? nullptr : h_.get(), l.attn_norm.get(), T, l.wqkv,
                  cuda::GemvOutput::split_rope({q_.get(), k_.get(), v_.get(), pos, nh, nkv, d,
                                                c_.rope_theta, c_.rope_linear_factor, angles}),
                  chain && li == 0);
      const size_t fresh = new_summary_floats(p);
      float *new_k = new_kv_.get(), *new_v = new_k + fresh;
      if (c_.fma_enabled && !p.append) {
        // Cleared for the kernels that add into it, not where one block writes each entry whole
        // (one pass, no chunk over several ranges); and only what this plan can write: the
        // buffer has the largest batch's size, and clearing it all cost a batch-1 step 25 us in
        // a server that had run 1,024 streams.
        if (!p.one_pass || p.split_chunks)
          check(cudaMemsetAsync(new_k, 0, 2 * fresh * 4, s), "memset");
        cuda::summaries(shape_, cv, ds, p, chunks, table, inputs_.device<cuda::SumItem>(kDone),
                        inputs_.device<cuda::SumItem>(kFilling), k_.get(), v_.get(), new_k, new_v,
                        s);
      }
      // The attention rounds its output to bf16 itself, for the o-projection.
      cuda::attention(shape_, cv, chunks, table, inputs_.device<cuda::AttnItem>(kAttn),
                      int(p.attn.size()), p.padded, q_.get(), k_.get(), v_.get(), new_k, new_v,
                      nullptr, hb_.get(), split_.get(), s, true, chain);
      if (p.append) {
        // Beside the rest of the layer, which does not read the cache (a branch of the step's
        // graph); the layer's end waits for it (the next layer's q/k/v overwrite k_ and v_).
        check(cudaEventRecord(attended_, s), "fork");
        check(cudaStreamWaitEvent(side_, attended_, 0), "fork");
        cuda::append_tokens(shape_, cv, ds, chunks, int(p.chunks.size()), k_.get(), v_.get(),
                            side_);
        check(cudaEventRecord(appended_, side_), "join");
      } else {
        cuda::commit(inputs_.device<cuda::CommitItem>(kCommits), int(p.commits.size()), k_.get(),
                     v_.get(), new_k, new_v, cv, s);
      }
      matmul(hb_.get(), T, l.wo, h_.get(), chain);
      if (comm_) comm_->all_reduce_sum(h_.get(), size_t(T) * H, stream_);  // the heads' parts
      norm_matmul(x, spare, h_.get(), l.ffn_norm.get(), T, l.gate_up,
                  cuda::GemvOutput::silu_gated(hb_.get()), chain);
      matmul(hb_.get(), T, l.down, h_.get(), chain);
      if (comm_) comm_->all_reduce_sum(h_.get(), size_t(T) * H, stream_);  // the FFN's parts
      if (p.append) check(cudaStreamWaitEvent(s, appended_, 0), "join");
    }
    const Weights& head = c_.tie_word_embeddings ? embed_ : head_;
    // A decode step wants every row, in order (its padding included): no gathering.
    if (p.padded) return norm_matmul(x, spare, h_.get(), out_norm_.get(), T, head, logits_.get());
    const int R = static_cast<int>(p.rows.size());
    cuda::add_rmsnorm(x, h_.get(), out_norm_.get(), T, H, c_.rms_norm_eps, hb_.get(), s);
    cuda::gather_rows(hb_.get(), inputs_.device<int>(kRows), R, H, sel_.get(), s);
    matmul(sel_.get(), R, head, logits_.get());
  }

  // x += add (add may be null), then out = bf16(rmsnorm(x) * norm) * w^T. For a decode step's
  // fewest rows one GEMV kernel does it all, writing the sum to `spare` (x then points there and
  // spare at the old x); else add_rmsnorm in place, then the GEMV (with out's SwiGLU or RoPE in
  // it) or cuBLAS (and their kernels). overlap: a GEMV kernel right after the previous kernel
  // may start while it finishes (overlap.cuh).
  void norm_matmul(float*& x, float*& spare, const float* add, const float* norm, int T,
                   const Weights& w, cuda::GemvOutput out, bool overlap = false) {
    if (gemv_fits(T, w, true)) {
      gemv({x, add, norm, c_.rms_norm_eps, add ? spare : nullptr}, T, w, out, overlap);
      if (add) std::swap(x, spare);
      return;
    }
    const int H = c_.hidden_size;
    // The normed rows go to a buffer of their own: `out` may be hb_ (the FFN's gated output),
    // and a GEMV whose input is its output reads rows other blocks already overwrote.
    __nv_bfloat16* normed = normed_.get();
    if (add)
      cuda::add_rmsnorm(x, add, norm, T, H, c_.rms_norm_eps, normed, stream_);
    else
      cuda::rmsnorm(x, norm, T, H, c_.rms_norm_eps, normed, stream_);
    if (gemv_fits(T, w)) return gemv(normed, T, w, out, overlap);
    using Kind = cuda::GemvOutput::Kind;
    switch (out.kind) {
      case Kind::Plain:
        return matmul(normed, T, w, out.y);
      case Kind::SiluGated:
        matmul(normed, T, w, gu_.get());
        return cuda::swiglu(gu_.get(), T, w.N / 2, out.gated, stream_);
      case Kind::SplitRope: {
        const cuda::QkvRope& r = out.rope;
        matmul(normed, T, w, qkv_.get());
        return cuda::split_qkv_rope(qkv_.get(), r.angles, T, r.nh, r.nkv, r.d, r.q, r.k, r.v,
                                    stream_);
      }
    }
  }


  // y[T][w.N] = x[T][w.K] * w^T: a GEMV kernel for a few rows (decode; `overlap` as in
  // norm_matmul); else cuBLAS, on Q8_0 weights dequantized (once, or into dequant_ now).
  void matmul(const __nv_bfloat16* x, int T, const Weights& w, float* y, bool overlap = false) {
    if (gemv_fits(T, w)) return gemv(x, T, w, y, overlap);
    if (!w.is_q8()) return cuda::gemm(cublas_, x, T, w.K, w.bf16.get(), w.N, y);
    if (w.q8_as_bf16.get()) return cuda::gemm(cublas_, x, T, w.K, w.q8_as_bf16.get(), w.N, y);
    cuda::dequantize_q8(w.q8_view(), int64_t(w.N) * w.K, dequant_.get(), stream_);
    cuda::gemm(cublas_, x, T, w.K, dequant_.get(), w.N, y);
  }
  static bool gemv_fits(int T, const Weights& w, bool normed_input = false) {
    return cuda::gemv_fits(T, w.K, normed_input) && w.K % (w.is_q8() ? 32 : 16) == 0;
  }
  void gemv(const cuda::GemvInput& x, int T, const Weights& w, cuda::GemvOutput y,
            bool overlap = false) {
    if (w.is_q8()) return cuda::gemv_q8(x, T, w.K, w.q8_view(), w.N, y, stream_, overlap);
    cuda::gemv_bf16(x, T, w.K, w.bf16.get(), w.N, y, stream_, overlap);
  }

  // Checks and runs the chunks, leaving their wanted rows' logits in logits_.
  const cuda::BatchPlan& launch(std::span<const SeqChunk> chunks) {
    check_chunks(c_, chunks, n_slots(), in_use_);
    if (!c_.fma_enabled)
      for (const auto& ch : chunks)
        if (pos_[ch.slot] + int64_t(ch.tokens.size()) > cap_)
          throw Error("forward: " + std::to_string(pos_[ch.slot] + ch.tokens.size()) +
                      " tokens exceed the exact-attention context of " + std::to_string(cap_));
    cuda::BatchPlan& p = plan_;
    cuda::make_plan(c_, cap_, chunks, pos_, p, kernels_);
    if (stage(p)) drop_graphs();
    if (p.padded) {
      // A decode step: the same kernels with the same grids for every step of this bucket of
      // batch sizes, so it is captured once in a CUDA graph and replayed (launch overhead
      // dominates here).
      // A graph reads its inputs where they were at its capture: captured again if they moved.
      std::array<size_t, kGraphInputs> at;
      std::copy_n(inputs_.offsets().begin(), kGraphInputs, at.begin());
      auto it = graphs_.find(p.T);
      if (it != graphs_.end() && it->second.inputs_at != at) {
        cudaGraphExecDestroy(it->second.exec);
        graphs_.erase(it);
        it = graphs_.end();
      }
      if (it == graphs_.end()) {
        cudaGraph_t graph;
        check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), "capture");
        compute(p);
        check(cudaStreamEndCapture(stream_, &graph), "capture");
        cudaGraphExec_t exec;
        check(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
        cudaGraphDestroy(graph);
        it = graphs_.emplace(p.T, CapturedStep{exec, at}).first;
      }
      check(cudaGraphLaunch(it->second.exec, stream_), "cudaGraphLaunch");
    } else {
      compute(p);
    }
    for (const auto& ch : chunks) pos_[ch.slot] += static_cast<int64_t>(ch.tokens.size());
    return p;
  }

  void drop_graphs() {
    for (auto& [b, g] : graphs_) cudaGraphExecDestroy(g.exec);
    graphs_.clear();
  }

  int check_slot(int s) const {
    if (s < 0 || s >= n_slots()) throw Error("slot " + std::to_string(s) + " does not exist");
    return s;
  }
  // A slot's part of a pool array from or to a state's fp32 values (the fine window widened from
  // bf16, or rounded to it).
  void download(const DeviceArray<float>& a, int slot, std::vector<float>& dst) const {
    const size_t per = a.size() / pos_.size();
    check(cudaMemcpy(dst.data(), a.get() + slot * per, std::min(per, dst.size()) * 4,
                     cudaMemcpyDeviceToHost),
          "save_slot");
  }
  void download(const DeviceArray<__nv_bfloat16>& a, int slot, std::vector<float>& dst) const {
    const size_t per = a.size() / pos_.size(), n = std::min(per, dst.size());
    std::vector<__nv_bfloat16> h(n);
    check(cudaMemcpy(h.data(), a.get() + slot * per, n * sizeof(__nv_bfloat16),
                     cudaMemcpyDeviceToHost),
          "save_slot");
    for (size_t i = 0; i < n; ++i) dst[i] = __bfloat162float(h[i]);
  }
  void upload_part(DeviceArray<float>& a, int slot, const std::vector<float>& src) {
    const size_t per = a.size() / pos_.size();
    check(cudaMemcpyAsync(a.get() + slot * per, src.data(), std::min(per, src.size()) * 4,
                          cudaMemcpyHostToDevice, stream_),
          "load_slot");
  }
  void upload_part(DeviceArray<__nv_bfloat16>& a, int slot, const std::vector<float>& src) {
    const size_t per = a.size() / pos_.size(), n = std::min(per, src.size());
    std::vector<__nv_bfloat16> h(n);
    for (size_t i = 0; i < n; ++i) h[i] = __float2bfloat16(src[i]);
    check(cudaMemcpyAsync(a.get() + slot * per, h.data(), n * sizeof(__nv_bfloat16),
                          cudaMemcpyHostToDevice, stream_),
          "load_slot");
    check(cudaStreamSynchronize(stream_), "load_slot");  // h is gone when this returns
  }

  std::shared_ptr<const Model> model_;
  const Config c_;  // a shard's share of the heads and FFN columns under tensor parallelism
  int device_;
  Communicator* comm_;  // null unless a tensor-parallel shard
  cuda::SummaryKernels kernels_;
  cuda::Launches launches_;
  cuda::FmaShape shape_{};
  int64_t cap_ = 0;
  cudaStream_t stream_ = nullptr;
  // A decode step's cache update runs on side_ between these two events (compute).
  cudaStream_t side_ = nullptr;
  cudaEvent_t attended_ = nullptr, appended_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  Weights embed_, head_;  // head_ empty when tied to the embedding
  DeviceArray<__nv_bfloat16> dequant_;  // a Q8_0 matrix dequantized for cuBLAS (prefill)
  DeviceArray<float> out_norm_;
  std::vector<Layer> layers_;
  std::vector<int64_t> pos_;
  std::vector<bool> in_use_;
  // Per-call inputs and scratch, grown as needed.
  cuda::BatchPlan plan_;  // the running call's; its vectors keep their memory between calls
  // The call's inputs, one upload (stage): the plan's arrays, which captured graphs read, then the
  // sampler's.
  enum Input { kTokens, kPos, kRows, kAttn, kDone, kFilling, kCommits, kChunks, kTable,
               kSampleRows, kPens, kTopRows, kGraphInputs = kSampleRows };
  PackedArrays inputs_;
  DeviceArray<float> x_, x_spare_, h_, qkv_, q_, k_, v_, gu_, new_kv_, split_, logits_;
  DeviceArray<float2> angles_;  // RoPE's (cos, sin) of each row's channel pairs
  DeviceArray<__nv_bfloat16> hb_, normed_, sel_;
  DeviceArray<uint8_t> cublas_workspace_;
  cuda::Sampler sampler_;
  PackedArrays sampled_;  // forward_sample's results, one download, in this order:
  enum { kIds, kLogprobs, kTopIds, kTopLps };
  int top_n_ = 0;         // top logprobs a row of them holds
  // forward_sample's host staging, kept between steps (no allocation per step).
  std::vector<cuda::SampleRow> sample_rows_;
  std::vector<int2> pens_;
  std::vector<int> top_rows_;
  struct CapturedStep {
    cudaGraphExec_t exec;
    std::array<size_t, kGraphInputs> inputs_at;  // the offsets of the inputs it reads
  };
  std::map<int, CapturedStep> graphs_;  // decode step by padded batch size
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(std::shared_ptr<const Model> model, int n_slots,
                                           int64_t max_context, int device,
                                           cuda::SummaryKernels kernels, cuda::Q8Products q8,
                                           cuda::Launches launches) {
  return std::make_unique<CudaBackend>(std::move(model), n_slots, max_context, device, nullptr,
                                       kernels, q8, launches);
}

std::unique_ptr<Backend> make_cuda_shard(std::shared_ptr<const Model> model, int n_slots,
                                         int64_t max_context, int device, Communicator& comm) {
  return std::make_unique<CudaBackend>(std::move(model), n_slots, max_context, device, &comm);
}

}  // namespace mp
