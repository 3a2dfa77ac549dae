// Replays every fuzz target's seed corpus and every input a fuzzer ever failed on
// (tests/fuzz/regressions/<target>/) through the same target code, in the ordinary test build
// and under ASan + UBSan: a finding that comes back fails here, without clang or libFuzzer.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

int fuzz_gguf(const uint8_t* data, size_t size);
int fuzz_state(const uint8_t* data, size_t size);
int fuzz_completions(const uint8_t* data, size_t size);
int fuzz_convert(const uint8_t* data, size_t size);
int fuzz_tokenizer(const uint8_t* data, size_t size);
int fuzz_chat(const uint8_t* data, size_t size);
int fuzz_batch(const uint8_t* data, size_t size);

namespace {
namespace fs = std::filesystem;

struct Target {
  const char* name;
  int (*run)(const uint8_t*, size_t);
};

void PrintTo(const Target& t, std::ostream* os) { *os << t.name; }

class FuzzReplay : public ::testing::TestWithParam<Target> {};

TEST_P(FuzzReplay, SeedsAndRegressions) {
  const Target t = GetParam();
  int inputs = 0;
  for (const char* set : {"corpus", "regressions"}) {
    const fs::path dir = fs::path(MULTIPOLE_FUZZ_DIR) / set / t.name;
    if (!fs::exists(dir)) continue;
    for (const auto& e : fs::directory_iterator(dir)) {
      std::ifstream f(e.path(), std::ios::binary);
      const std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
      SCOPED_TRACE(e.path().string());
      // A copy of exactly the input's size, as libFuzzer passes it: ASan sees reads past it.
      const std::vector<uint8_t> input(bytes.begin(), bytes.end());
      EXPECT_EQ(t.run(input.data(), input.size()), 0);
      ++inputs;
    }
  }
  EXPECT_GT(inputs, 0) << "no seeds for fuzz_" << t.name;
}

INSTANTIATE_TEST_SUITE_P(Targets, FuzzReplay,
                         ::testing::Values(Target{"gguf", fuzz_gguf}, Target{"state", fuzz_state},
                                           Target{"completions", fuzz_completions},
                                           Target{"convert", fuzz_convert},
                                           Target{"tokenizer", fuzz_tokenizer},
                                           Target{"chat", fuzz_chat},
                                           Target{"batch", fuzz_batch}),
                         [](const auto& info) { return std::string(info.param.name); });

}  // namespace
