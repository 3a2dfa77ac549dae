// write-loop: a writer for the kill test (tests/test_files.cpp), which SIGKILLs it at random
// moments. It prints "ready" once set up, then writes for ever:
//   write-loop state MODEL OUT    one more token (write_loop_token), then the slot's state to OUT
//   write-loop gguf HF_A HF_B OUT  HF_A converted to OUT, then HF_B, then HF_A, ...
#include <cstdio>
#include <string>

#include "checkpoint.h"

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  try {
    if (mode == "state" && argc == 4) {
      auto b = mp::make_backend(mp::Model::load(argv[2]), {.kind = "cpu", .n_slots = 1, .n_threads = 1});
      const int slot = b->alloc_slot();
      std::printf("ready\n");
      std::fflush(stdout);
      for (int64_t pos = 0;; ++pos) {
        const int token = mp::testing::write_loop_token(pos);
        const mp::SeqChunk c{slot, std::span<const int>(&token, 1), false};
        b->forward({&c, 1});
        mp::save_state_file(*b, slot, argv[3]);
      }
    }
    if (mode == "gguf" && argc == 5) {
      mp::ConvertOptions o;
      o.overwrite = true;
      std::printf("ready\n");
      std::fflush(stdout);
      for (int i = 0;; ++i) mp::convert_hf_to_gguf(argv[2 + i % 2], argv[4], o);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "write-loop: %s\n", e.what());
    return 1;
  }
  std::fprintf(stderr, "usage: write-loop state MODEL OUT | write-loop gguf HF_A HF_B OUT\n");
  return 2;
}
