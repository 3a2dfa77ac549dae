// Writes random Hugging Face style FMA checkpoints (config.json, safetensors, tokenizer.model)
// for the tests: the input of multipole-convert without a trainer.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "multipole/multipole.h"

namespace mp::testing {

struct CheckpointOptions {
  uint64_t seed = 1;
  DType dtype = DType::F32;
  int shards = 1;  // > 1 writes model.safetensors.index.json and that many shards
  // FmaForCausalLM (ours), or LlamaForCausalLM / MistralForCausalLM: a Hugging Face folder as
  // those write it (no fma_* keys: the config must have FMA off).
  std::string architecture = "FmaForCausalLM";
  // More random tensors of shape [hidden_size] by these names (a bias, a rotary buffer, ...).
  std::vector<std::string> extra_tensors;
};

// tests/data, or $MULTIPOLE_TEST_DATA.
std::string test_data_dir();
// The tokenizer fixture committed for the tests (vocab 400, BOS 1, EOS 2).
std::string fixture_tokenizer_path();
// A small config with every FMA feature switched on (n = 64, m = 8, p = 2: L = 2).
Config small_config();
void write_random_checkpoint(const std::string& dir, const Config& c, const CheckpointOptions& o);
std::string config_json(const Config& c, const std::string& architecture = "FmaForCausalLM");

// The token write-loop (tests/support/write_loop_main.cpp) feeds at position `pos`.
inline int write_loop_token(int64_t pos) { return 3 + static_cast<int>((pos * 7) % 390); }

}  // namespace mp::testing
