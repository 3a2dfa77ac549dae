// A random checkpoint converted to GGUF in a temporary folder, for tests that need a whole model.
#pragma once

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <initializer_list>
#include <ostream>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "checkpoint.h"

namespace mp::testing {

class TempDir {
 public:
  TempDir() {
    std::random_device rd;
    path_ = std::filesystem::temp_directory_path() /
            ("multipole-test-" + std::to_string(rd()) + std::to_string(rd()));
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string operator/(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

inline std::shared_ptr<Model> random_model(const TempDir& dir, const Config& c,
                                           DType dtype = DType::F32, uint64_t seed = 1) {
  CheckpointOptions o;
  o.seed = seed;
  write_random_checkpoint(dir / "hf", c, o);
  ConvertOptions co;
  co.dtype = dtype;
  co.overwrite = true;
  convert_hf_to_gguf(dir / "hf", dir / "model.gguf", co);
  return Model::load(dir / "model.gguf");
}

// A model variant: small_config() with what the variant names changed (designated initializers
// name only that). The parameterised tests run over lists of them.
struct ModelVariant {
  const char* name = "small_config";
  Downsampling ds = Downsampling::GroupedConv;
  bool fma = true;
  int kv_heads = 0;  // 0 here and for the sizes below: small_config()'s
  int heads = 0;
  bool tie = false;
  bool rotary = false;          // rotary key summaries
  std::vector<int> ranks = {};  // per-level ranks; fma_rank becomes their largest
  int head_dim = 0;
  int hidden = 0;
  int block = 0;  // m
  int64_t n = 0;  // trained length
  float rope_linear_factor = 1.0f;
  DType dtype = DType::F32;  // of the converted weights
};

// gtest prints a test's parameter with it (a failure names the variant).
inline std::ostream& operator<<(std::ostream& os, const ModelVariant& v) { return os << v.name; }

inline Config variant_config(const ModelVariant& v) {
  Config c = small_config();
  c.fma_downsampling = v.ds;
  c.fma_enabled = v.fma;
  if (v.kv_heads) c.n_kv_heads = v.kv_heads;
  if (v.heads) c.n_heads = v.heads;
  c.tie_word_embeddings = v.tie;
  c.fma_rotary_summaries = v.rotary;
  if (!v.ranks.empty()) c.fma_rank = *std::max_element(v.ranks.begin(), v.ranks.end());
  c.fma_level_ranks = v.ranks;
  if (v.head_dim) c.head_dim = v.head_dim;
  if (v.hidden) c.hidden_size = v.hidden;
  if (v.block) c.fma_block_size = v.block;
  if (v.n) c.n_ctx_train = v.n;
  c.rope_linear_factor = v.rope_linear_factor;
  return c;
}

// A random model of a variant (weights from `seed`), converted in a temporary folder of its own
// (dir / "hf" the checkpoint, dir / "model.gguf" the model).
struct VariantModel {
  explicit VariantModel(const ModelVariant& v = {}, uint64_t seed = 1)
      : config(variant_config(v)), model(random_model(dir, config, v.dtype, seed)) {}
  TempDir dir;
  Config config;
  std::shared_ptr<Model> model;
};

inline std::vector<int> random_tokens(int n, int vocab, uint64_t seed) {
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::vector<int> t(n);
  for (auto& x : t) x = 3 + static_cast<int>(rng() % (vocab - 3));
  return t;
}

// Norm-wise relative error; a non-finite value in `got` never passes.
inline double rel_err(const std::vector<float>& got, const std::vector<float>& want) {
  if (got.size() != want.size()) return INFINITY;
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    num += double(got[i] - want[i]) * (got[i] - want[i]);
    den += double(want[i]) * want[i];
  }
  return std::sqrt(num / den);
}

// Logits of every position of `tokens`, fed through a fresh slot in chunks of `chunk`.
inline std::vector<float> logits_in_chunks(Backend& b, const std::vector<int>& tokens, int chunk) {
  const int slot = b.alloc_slot();
  std::vector<float> all;
  for (size_t i = 0; i < tokens.size(); i += chunk) {
    const size_t n = std::min(tokens.size() - i, size_t(chunk));
    SeqChunk c{slot, std::span<const int>(tokens).subspan(i, n), true};
    const auto l = b.forward({&c, 1});
    all.insert(all.end(), l.begin(), l.end());
  }
  b.free_slot(slot);
  return all;
}

// A random schedule of mixed steps, the same for every backend (from `seed`): `n` sequences,
// each a prompt of 1-300 tokens then 20 more fed one a step; a step takes a random subset of them,
// a prompt chunk of 1-100 tokens or one token each (one step in three: one token each, a decode
// step); a sequence done frees its slot for a new one. The logits of each step's chunks (their
// last tokens), in order; one_chunk_a_call: every chunk in a forward call of its own.
inline std::vector<float> mixed_schedule_logits(Backend& b, uint64_t seed, int n, int steps,
                                                bool one_chunk_a_call = false) {
  std::mt19937 rng(static_cast<uint32_t>(seed));
  const int V = b.config().vocab_size;
  struct Seq {
    int slot;
    size_t prompt, fed;
    std::vector<int> tokens;
  };
  auto fresh = [&](int slot) {
    const size_t prompt = 1 + rng() % 300;
    return Seq{slot, prompt, 0, random_tokens(int(prompt) + 20, V, rng())};
  };
  std::vector<Seq> seqs;
  for (int i = 0; i < n; ++i) seqs.push_back(fresh(b.alloc_slot()));
  std::vector<float> out;
  for (int step = 0; step < steps; ++step) {
    const bool decode = rng() % 3 == 0;
    std::vector<SeqChunk> batch;
    for (Seq& s : seqs) {
      if (rng() % 4 == 0) continue;  // not in this step
      const bool chunk = s.fed < s.prompt && !decode;
      const size_t len = chunk ? std::min<size_t>(1 + rng() % 100, s.prompt - s.fed) : 1;
      batch.push_back({s.slot, std::span<const int>(s.tokens).subspan(s.fed, len), false});
      s.fed += len;
    }
    if (one_chunk_a_call) {
      for (const SeqChunk& c : batch) {
        const auto l = b.forward({&c, 1});
        out.insert(out.end(), l.begin(), l.end());
      }
    } else if (!batch.empty()) {
      const auto l = b.forward(batch);
      out.insert(out.end(), l.begin(), l.end());
    }
    for (Seq& s : seqs)
      if (s.fed == s.tokens.size()) {
        b.free_slot(s.slot);
        s = fresh(b.alloc_slot());
      }
  }
  for (const Seq& s : seqs) b.free_slot(s.slot);
  return out;
}

// How far each generated token of a greedy completion (`generated` after `prompt`) lies below the
// likeliest token of b's logits for the whole text read at once: (best - its logit) /
// max(1, |best|), 0 where it is the likeliest.
inline std::vector<float> greedy_shortfalls(Backend& b, const std::vector<int>& prompt,
                                            const std::vector<int>& generated) {
  std::vector<int> text = prompt;
  text.insert(text.end(), generated.begin(), generated.end() - 1);
  const std::vector<float> logits = logits_in_chunks(b, text, int(text.size()));
  const size_t V = logits.size() / text.size();
  std::vector<float> out;
  for (size_t t = 0; t < generated.size(); ++t) {
    const std::span<const float> l(logits.data() + (prompt.size() - 1 + t) * V, V);
    const float best = *std::max_element(l.begin(), l.end());
    out.push_back((best - l[generated[t]]) / std::max(1.0f, std::abs(best)));
  }
  return out;
}

// The whole sequence `tokens` after `shift` other (random) tokens, RoPE and the FMA hierarchy
// moved together: the largest relative change of its logits from position `from` on, over the
// shifts and the chunk sizes the shifted sequence is fed in, against `tokens` alone in one chunk.
inline double largest_change_under_shifts(Backend& b, const std::vector<int>& tokens, int from,
                                          int vocab, std::initializer_list<int> shifts,
                                          std::initializer_list<int> chunks) {
  const auto all = logits_in_chunks(b, tokens, static_cast<int>(tokens.size()));
  const std::vector<float> ref(all.begin() + size_t(from) * vocab, all.end());
  double worst = 0;
  for (int shift : shifts) {
    auto shifted = random_tokens(shift, vocab, static_cast<uint64_t>(shift));
    shifted.insert(shifted.end(), tokens.begin(), tokens.end());
    for (int chunk : chunks) {
      const auto got = logits_in_chunks(b, shifted, chunk);
      const std::vector<float> tail(got.begin() + size_t(shift + from) * vocab, got.end());
      worst = std::max(worst, rel_err(tail, ref));
    }
  }
  return worst;
}

}  // namespace mp::testing
