// make-test-checkpoint: writes a random HF checkpoint for the cross-check scripts.
#include <algorithm>
#include <cstdio>
#include <string>

#include "checkpoint.h"
#include "common/args.h"

int main(int argc, char** argv) {
  mp::cli::Args a(argc, argv, {"no-fma", "tie", "no-scale", "rotary"},
                  "usage: make-test-checkpoint DIR [--downsampling K] [--no-fma] [--tie]\n"
                  "  [--no-scale] [--rotary (rotary key summaries)] [--kv-heads N] [--n N] [--m M] "
                  "[--p P] [--ranks P1:P2:...] [--seed S]\n"
                  "  [--dtype f32|f16|bf16] [--shards N] [--theta T] [--rope-linear F]\n"
                  "  [--arch LlamaForCausalLM|MistralForCausalLM (FMA off)]\n");
  a.check_known({"no-fma", "tie", "no-scale", "rotary", "downsampling", "kv-heads", "n", "m", "p",
                 "ranks", "seed", "dtype", "shards", "theta", "rope-linear", "arch"});
  if (a.positional().size() != 1) a.fail("expected DIR");
  mp::Config c = mp::testing::small_config();
  c.fma_enabled = !a.has("no-fma");
  c.tie_word_embeddings = a.has("tie");
  c.fma_scale_attn = !a.has("no-scale");
  c.fma_rotary_summaries = a.has("rotary");
  c.fma_downsampling = mp::parse_downsampling(a.str("downsampling", "groupedconv"));
  c.n_kv_heads = static_cast<int>(a.integer("kv-heads", c.n_kv_heads));
  c.n_ctx_train = a.integer("n", c.n_ctx_train);
  c.fma_block_size = static_cast<int>(a.integer("m", c.fma_block_size));
  c.fma_rank = static_cast<int>(a.integer("p", c.fma_rank));
  c.rope_theta = static_cast<float>(a.real("theta", c.rope_theta));
  c.rope_linear_factor = static_cast<float>(a.real("rope-linear", 1.0));
  const std::string ranks = a.str("ranks", "");  // p_1:...:p_L; fma_rank becomes the largest
  for (size_t at = 0; at < ranks.size();) {
    const size_t colon = std::min(ranks.find(':', at), ranks.size());
    c.fma_level_ranks.push_back(std::stoi(ranks.substr(at, colon - at)));
    c.fma_rank =
        at == 0 ? c.fma_level_ranks.back() : std::max(c.fma_rank, c.fma_level_ranks.back());
    at = colon + 1;
  }
  c.validate();
  mp::testing::CheckpointOptions o;
  o.seed = static_cast<uint64_t>(a.integer("seed", 1));
  o.dtype = mp::parse_dtype(a.str("dtype", "f32"));
  o.shards = static_cast<int>(a.integer("shards", 1));
  o.architecture = a.str("arch", "FmaForCausalLM");
  if (o.architecture != "FmaForCausalLM") c.fma_enabled = false;
  mp::testing::write_random_checkpoint(a.positional()[0], c, o);
  std::printf("%s\n", c.summary().c_str());
  return 0;
}
