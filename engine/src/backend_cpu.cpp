// The CPU backend: the reference implementation of the whole model in fp32 arithmetic (bf16 and
// Q8_0 weights widened exactly), threaded with OpenMP; matrix products in ops_cpu.
#include "backend_cpu.h"

#include <omp.h>


#include "communicator.h"
#include "fma_cpu.h"
#include "ops_cpu.h"

namespace mp {

void check_chunks(const Config& c, std::span<const SeqChunk> chunks, int n_slots,
                  const std::vector<bool>& in_use) {
  // The slots seen, marked in a bitmap the calling thread keeps (a set's node per chunk was a
  // thousand allocations a step at 1,024 rows) and unmarked on the way out, thrown or not.
  thread_local std::vector<bool> seen;
  if (seen.size() < size_t(n_slots)) seen.resize(size_t(n_slots));
  size_t marked = 0;
  struct Unmark {
    std::span<const SeqChunk> chunks;
    const size_t& marked;
    ~Unmark() {
      for (size_t i = 0; i < marked; ++i) seen[size_t(chunks[i].slot)] = false;
    }
  } unmark{chunks, marked};
  for (const auto& ch : chunks) {
    if (ch.slot < 0 || ch.slot >= n_slots || !in_use[ch.slot])
      throw Error("forward: slot " + std::to_string(ch.slot) + " is not allocated");
    if (seen[size_t(ch.slot)])
      throw Error("forward: slot " + std::to_string(ch.slot) + " appears twice in one batch");
    seen[size_t(ch.slot)] = true;
    ++marked;
    if (ch.tokens.empty()) throw Error("forward: empty chunk for slot " + std::to_string(ch.slot));
    for (int id : ch.tokens)
      if (id < 0 || id >= c.vocab_size)
        throw Error("forward: token id " + std::to_string(id) + " is outside the vocabulary");
  }
}

namespace {

struct LayerWeights {
  std::vector<float> attn_norm, ffn_norm;
  cpu::Matrix wqkv, wo, gate_up, down;  // q, k, v stacked; gate and up stacked
  cpu::LayerDownsamplers ds;
};

class CpuBackend final : public Backend {
 public:
  CpuBackend(std::shared_ptr<const Model> model, int n_slots, int n_threads,
             const CpuProducts& products, Communicator* comm = nullptr)
      : model_(std::move(model)),
        c_(comm ? shard_config(model_->config(), comm->size()) : model_->config()),
        n_threads_(n_threads),
        activations_(products.fp32 || !cpu::bf16_products_available()
                         ? cpu::Activations::Fp32
                         : products.bf16_activations ? cpu::Activations::Bf16
                                                     : cpu::Activations::SplitBf16),
        comm_(comm) {
    if (n_slots <= 0) throw Error("backend: n_slots must be positive");
    namespace tn = tensor_names;
    const Config& full = model_->config();
    const int64_t H = c_.hidden_size, V = c_.vocab_size;
    const int64_t d = c_.head_dim, q = full.n_heads * d, kv = full.n_kv_heads * d;
    const int64_t F = full.intermediate_size;
    // This shard's rows (out of n per shard) or columns of a whole matrix.
    const int rank = comm ? comm->rank() : 0;
    auto rows = [&](const TensorView& t, int64_t n) {
      const cpu::Matrix m = cpu::to_matrix({&t});
      return comm ? cpu::sub_matrix(m, int(rank * n), int(n), 0, m.K) : m;
    };
    auto cols = [&](const TensorView& t, int64_t n) {
      const cpu::Matrix m = cpu::to_matrix({&t});
      return comm ? cpu::sub_matrix(m, 0, m.N, int(rank * n), int(n)) : m;
    };
    // A matrix of products (product: also of prefill's, packed for them where they are bf16).
    auto keep = [&](cpu::Matrix m, bool product = true) {
      if (!m.is_f32()) wide_.resize(std::max(wide_.size(), size_t(m.N) * m.K));
      if (product && activations_ != cpu::Activations::Fp32) cpu::pack_for_bf16_products(m);
      return m;
    };
    const int64_t qs = c_.n_heads * d, kvs = c_.n_kv_heads * d, Fs = c_.intermediate_size;
    embed_ = keep(cpu::to_matrix({&model_->tensor(tn::token_embd(), {V, H})}),
                  c_.tie_word_embeddings);  // (else only its rows are read)
    for (int i = 0; i < c_.n_layers; ++i) {
      LayerWeights l;
      auto w = [&](const char* name, int64_t r, int64_t c) -> const TensorView& {
        return model_->tensor(tn::layer(i, name), {r, c});
      };
      l.attn_norm = model_->tensor(tn::layer(i, "attn_norm"), {H}).to_f32();
      const cpu::Matrix wq = rows(w("attn_q", q, H), qs), wk = rows(w("attn_k", kv, H), kvs),
                        wv = rows(w("attn_v", kv, H), kvs);
      l.wqkv = keep(cpu::stack_rows({&wq, &wk, &wv}));
      l.wo = keep(cols(w("attn_output", H, q), qs));
      l.ffn_norm = model_->tensor(tn::layer(i, "ffn_norm"), {H}).to_f32();
      const cpu::Matrix gate = rows(w("ffn_gate", F, H), Fs), up = rows(w("ffn_up", F, H), Fs);
      l.gate_up = keep(cpu::stack_rows({&gate, &up}));
      l.down = keep(cols(w("ffn_down", H, F), Fs));
      if (c_.fma_enabled) l.ds = cpu::make_layer_downsamplers(c_, *model_, i);
      layers_.push_back(std::move(l));
    }
    out_norm_ = model_->tensor(tn::output_norm(), {H}).to_f32();
    if (!c_.tie_word_embeddings)
      head_ = keep(cpu::to_matrix({&model_->tensor(tn::output(), {V, H})}));
    slots_.assign(n_slots, cpu::make_seq_cache(c_));
    in_use_.assign(n_slots, false);
  }

  std::string name() const override {
    return "cpu (" + cpu::kernels_summary(n_threads_, activations_) + ")";
  }
  const Config& config() const override { return c_; }
  int n_slots() const override { return static_cast<int>(slots_.size()); }

  int alloc_slot() override {
    for (size_t i = 0; i < slots_.size(); ++i)
      if (!in_use_[i]) {
        in_use_[i] = true;
        cpu::reset_seq_cache(c_, slots_[i]);
        return static_cast<int>(i);
      }
    return -1;
  }
  void free_slot(int s) override { in_use_.at(check(s)) = false; }
  void reset_slot(int s) override { cpu::reset_seq_cache(c_, slots_[check(s)]); }
  void copy_slot(int src, int dst) override { slots_[check(dst)] = slots_[check(src)]; }
  int64_t slot_pos(int s) const override { return slots_[check(s)].pos; }
  std::vector<uint8_t> save_slot(int s) const override {
    return cpu::serialize(c_, slots_[check(s)]);
  }
  void load_slot(int s, std::span<const uint8_t> bytes) override {
    cpu::deserialize(c_, bytes, slots_[check(s)]);
  }
  size_t slot_bytes(int s) const override { return cpu::seq_cache_bytes(c_, slots_[check(s)]); }
  // About 0.3 s of prefill on two cores: longer steps gain little speed.
  int prefill_tokens_per_step() const override { return 512; }

  std::vector<float> forward(std::span<const SeqChunk> chunks) override {
    check_chunks(c_, chunks, n_slots(), in_use_);
    const int prev_threads = omp_get_max_threads();
    if (n_threads_ > 0) omp_set_num_threads(n_threads_);
    // Every thread of this step, whichever pool OpenMP gives it (a few microseconds a step).
    cpu::flush_subnormals_in_this_thread();
#pragma omp parallel
    cpu::flush_subnormals_in_this_thread();
    std::vector<float> logits = run(chunks);
    if (n_threads_ > 0) omp_set_num_threads(prev_threads);
    return logits;
  }

 private:
  int check(int s) const {
    if (s < 0 || s >= n_slots()) throw Error("slot " + std::to_string(s) + " does not exist");
    return s;
  }

  const cpu::Matrix& head() const { return c_.tie_word_embeddings ? embed_ : head_; }

  void matmul(const std::vector<float>& x, int T, const cpu::Matrix& W, std::vector<float>& y) {
    cpu::matmul(x.data(), T, W, y.data(), wide_, activations_);
  }

  std::vector<float> run(std::span<const SeqChunk> chunks) {
    const int H = c_.hidden_size, d = c_.head_dim, nh = c_.n_heads, nkv = c_.n_kv_heads;
    const int F = c_.intermediate_size, V = c_.vocab_size;
    std::vector<int> row0;  // first row of each chunk
    int T = 0;
    for (const auto& ch : chunks) {
      row0.push_back(T);
      T += static_cast<int>(ch.tokens.size());
    }
    // Activations live in buffers that only grow (their first T rows are used): a one-token
    // step allocates none of them, and the next prefill does not zero-fill them again.
    auto rows_of = [T](std::vector<float>& buf, int width) -> std::vector<float>& {
      if (buf.size() < size_t(T) * width) buf.resize(size_t(T) * width);
      return buf;
    };
    auto &x = rows_of(x_, H), &h = rows_of(h_, H), &q = rows_of(q_, nh * d),
         &k = rows_of(k_, nkv * d), &v = rows_of(v_, nkv * d), &att = rows_of(att_, nh * d),
         &g = rows_of(g_, F),
         &stacked = rows_of(stacked_, 2 * F + (nh + 2 * nkv) * d);
    // Splits each row of `stacked` (width: the parts' sum) into the parts.
    auto split = [&](std::initializer_list<std::pair<std::vector<float>*, int>> parts) {
      int width = 0;
      for (const auto& part : parts) width += part.second;
      cpu::parallel_for(T, T >= 64, [&](int64_t t) {
        const float* row = stacked.data() + t * width;
        for (const auto& [buf, n] : parts) {
          std::copy_n(row, n, buf->data() + t * n);
          row += n;
        }
      });
    };
    // x += h, the residual connection.
    auto add_h_to_x = [&] {
      cpu::parallel_for(T, T >= 64, [&](int64_t t) {
        for (int64_t i = t * H; i < (t + 1) * H; ++i) x[i] += h[i];
      });
    };
    for (size_t c = 0; c < chunks.size(); ++c)
      for (size_t t = 0; t < chunks[c].tokens.size(); ++t)
        embed_.row(chunks[c].tokens[t], x.data() + (row0[c] + t) * H);

    // (chunk, first token, tokens, KV head) work items for the attention, in parallel over all
    // of them: up to kBlockQueries tokens of one FMA block each (ChunkAttention::attend_block), for
    // the query heads that share the KV head one after another on one thread, so that the second
    // finds the keys and values in its core's cache (a head per item read them once per head from
    // the shared cache: m = 1,024's fine window is 512 KB a KV head and layer).
    constexpr int kBlockQueries = 16;
    constexpr int64_t kParallelHeadKeys = 4096;
    const int m = c_.fma_enabled ? c_.fma_block_size : kBlockQueries;
    std::vector<std::array<int, 4>> items;
    // The keys the step's queries read, over all heads: a one-token step past the first 2m
    // tokens reads about 2m a head (m = 64: 1,024 in all, serial; m = 256: 4,096, in parallel),
    // exact attention its context.
    int64_t head_keys = 0;
    for (size_t c = 0; c < chunks.size(); ++c) {
      const int n = static_cast<int>(chunks[c].tokens.size());
      const int64_t pos0 = slots_[chunks[c].slot].pos, context = pos0 + n;
      head_keys += int64_t{n} * nh *
                   (c_.fma_enabled ? std::min<int64_t>(context, 2 * c_.fma_block_size) : context);
      for (int t = 0; t < n;) {
        const int64_t block_end = ((pos0 + t) / m + 1) * m;
        const int nq =
            static_cast<int>(std::min<int64_t>({kBlockQueries, n - t, block_end - pos0 - t}));
        for (int kvh = 0; kvh < nkv; ++kvh) items.push_back({static_cast<int>(c), t, nq, kvh});
        t += nq;
      }
    }

    std::vector<cpu::RopeTable> rope;  // each chunk's, for every layer
    for (size_t c = 0; c < chunks.size(); ++c)
      rope.push_back(cpu::rope_table(int(chunks[c].tokens.size()), d, slots_[chunks[c].slot].pos,
                                     c_.rope_theta, c_.rope_linear_factor));

    for (int li = 0; li < c_.n_layers; ++li) {
      const LayerWeights& w = layers_[li];
      cpu::rmsnorm(x.data(), w.attn_norm.data(), T, H, c_.rms_norm_eps, h.data());
      matmul(h, T, w.wqkv, stacked);
      split({{&q, nh * d}, {&k, nkv * d}, {&v, nkv * d}});
      std::vector<cpu::ChunkAttention> ca;
      ca.reserve(chunks.size());
      for (size_t c = 0; c < chunks.size(); ++c) {
        const int n = static_cast<int>(chunks[c].tokens.size());
        const int64_t pos0 = slots_[chunks[c].slot].pos;
        cpu::rope(q.data() + size_t(row0[c]) * nh * d, nh, rope[c]);
        cpu::rope(k.data() + size_t(row0[c]) * nkv * d, nkv, rope[c]);
        ca.emplace_back(c_, w.ds, slots_[chunks[c].slot].layers[li], pos0, n,
                        q.data() + size_t(row0[c]) * nh * d, k.data() + size_t(row0[c]) * nkv * d,
                        v.data() + size_t(row0[c]) * nkv * d);
      }
      auto attend = [&](size_t it, std::vector<float>& scratch) {
        const auto [c, t, nq, kvh] = items[it];
        for (int hd = kvh * (nh / nkv); hd < (kvh + 1) * (nh / nkv); ++hd)
          ca[c].attend_block(t, nq, hd, att.data() + (size_t(row0[c] + t) * nh + hd) * d,
                             int64_t{nh} * d, scratch);
      };
      if (head_keys >= kParallelHeadKeys) {
#pragma omp parallel
        {
          std::vector<float> scratch;
#pragma omp for schedule(dynamic)
          for (size_t it = 0; it < items.size(); ++it) attend(it, scratch);
        }
      } else {  // a few heads over few keys are not worth the threads' hand-over
        for (size_t it = 0; it < items.size(); ++it) attend(it, scratch_);
      }
      for (auto& a : ca) a.commit();
      matmul(att, T, w.wo, h);
      if (comm_) comm_->all_reduce_sum(h.data(), size_t(T) * H, nullptr);  // the heads' parts
      add_h_to_x();
      cpu::rmsnorm(x.data(), w.ffn_norm.data(), T, H, c_.rms_norm_eps, h.data());
      matmul(h, T, w.gate_up, stacked);
      cpu::swiglu(stacked.data(), T, F, g.data());
      matmul(g, T, w.down, h);
      if (comm_) comm_->all_reduce_sum(h.data(), size_t(T) * H, nullptr);  // the FFN's parts
      add_h_to_x();
    }
    for (const auto& ch : chunks) slots_[ch.slot].pos += static_cast<int64_t>(ch.tokens.size());

    // Logits only for the rows asked for (the last of each chunk unless all_logits).
    std::vector<int> rows;
    for (size_t c = 0; c < chunks.size(); ++c) {
      const int n = static_cast<int>(chunks[c].tokens.size());
      for (int t = chunks[c].all_logits ? 0 : n - 1; t < n; ++t) rows.push_back(row0[c] + t);
    }
    for (size_t r = 0; r < rows.size(); ++r)  // h: the normalised rows, in order
      cpu::rmsnorm(x.data() + size_t(rows[r]) * H, out_norm_.data(), 1, H, c_.rms_norm_eps,
                   h.data() + r * H);
    std::vector<float> logits(rows.size() * size_t(V));
    matmul(h, static_cast<int>(rows.size()), head(), logits);
    return logits;
  }

  std::shared_ptr<const Model> model_;
  const Config c_;  // a shard's share of the heads and FFN columns under tensor parallelism
  int n_threads_;
  cpu::Activations activations_;  // of products of more than 8 rows (cpu::matmul)
  Communicator* comm_;        // null unless a tensor-parallel shard
  cpu::Matrix embed_, head_;  // head_ empty when tied to the embedding
  std::vector<float> out_norm_;
  std::vector<LayerWeights> layers_;
  std::vector<float> wide_;  // bf16/Q8_0 weights widened for oneDNN's sgemm (the largest such)
  std::vector<float> x_, h_, q_, k_, v_, att_, g_, stacked_;  // activations, [T][width]
  std::vector<float> scratch_;  // the attention's on this thread
  std::vector<cpu::SeqCache> slots_;
  std::vector<bool> in_use_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(std::shared_ptr<const Model> model, int n_slots,
                                          int n_threads, const CpuProducts& products) {
  return std::make_unique<CpuBackend>(std::move(model), n_slots, n_threads, products);
}

Config shard_config(const Config& c, int size) {
  auto share = [&](int n, const char* what) {
    if (size <= 0 || n % size != 0)
      throw Error("tensor parallel " + std::to_string(size) + ": the model's " + what + " (" +
                  std::to_string(n) + ") do not divide by it");
    return n / size;
  };
  Config s = c;
  s.n_heads = share(c.n_heads, "attention heads");
  s.n_kv_heads = share(c.n_kv_heads, "KV heads");
  s.intermediate_size = share(c.intermediate_size, "FFN columns (intermediate_size)");
  return s;
}

std::unique_ptr<Backend> make_cpu_shard(std::shared_ptr<const Model> model, int n_slots,
                                        int n_threads, const CpuProducts& products,
                                        Communicator& comm) {
  return std::make_unique<CpuBackend>(std::move(model), n_slots, n_threads, products, &comm);
}

}  // namespace mp
