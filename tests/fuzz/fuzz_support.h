// What the fuzz targets share: a scratch folder for inputs that must be files, the tokenizer
// fixture and small models built once per process.
#pragma once

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>

#include "checkpoint.h"
#include "multipole/multipole.h"

// A target is a function of the input bytes that returns 0, or aborts on a violated property.
// Built with MULTIPOLE_FUZZ_MAIN it is also libFuzzer's entry point; the regression test
// (tests/test_fuzz_replay.cpp) links the plain functions and replays corpus/ and regressions/.
#ifdef MULTIPOLE_FUZZ_MAIN
#define MULTIPOLE_FUZZ_TARGET(name)                                                         \
  int name(const uint8_t* data, size_t size);                                               \
  extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {                 \
    return name(data, size);                                                                \
  }                                                                                         \
  int name(const uint8_t* data, size_t size)
#else
#define MULTIPOLE_FUZZ_TARGET(name) int name(const uint8_t* data, size_t size)
#endif

namespace mp::fuzz {

namespace fs = std::filesystem;

// A folder of this process, removed at exit; in memory (/dev/shm) where there is one.
inline const fs::path& scratch_dir() {
  static const fs::path dir = [] {
    const fs::path base = fs::exists("/dev/shm") ? fs::path("/dev/shm") : fs::temp_directory_path();
    fs::path d = base / ("multipole-fuzz-" + std::to_string(getpid()));
    fs::create_directories(d);
    std::atexit([] {
      std::error_code ec;
      fs::remove_all(scratch_dir(), ec);
    });
    return d;
  }();
  return dir;
}

inline std::string write_scratch(const std::string& name, const void* data, size_t size) {
  const fs::path p = scratch_dir() / name;
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(static_cast<const char*>(data), static_cast<std::streamsize>(size));
  if (!f) {
    std::fprintf(stderr, "fuzz: cannot write %s\n", p.c_str());
    std::abort();
  }
  return p.string();
}

inline std::string read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

// The small test config shrunk (n = 32, m = 4, p = 2: L = 2 levels; 400 tokens, the tokenizer
// fixture's): seeds stay a few kilobytes.
inline Config tiny_config(bool fma) {
  Config c = testing::small_config();
  c.hidden_size = 8;
  c.n_layers = 1;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.head_dim = 4;
  c.intermediate_size = 8;
  c.n_ctx_train = 32;
  c.fma_block_size = 4;
  c.tie_word_embeddings = true;
  c.fma_enabled = fma;
  return c;
}

// The tiny model (FMA or exact), converted once per process.
inline std::shared_ptr<Model> tiny_model(bool fma) {
  static std::map<bool, std::shared_ptr<Model>> models;
  auto& m = models[fma];
  if (!m) {
    const std::string dir = (scratch_dir() / (fma ? "hf-fma" : "hf-exact")).string();
    testing::write_random_checkpoint(dir, tiny_config(fma), {});
    ConvertOptions o;
    o.dtype = DType::F32;
    o.overwrite = true;
    convert_hf_to_gguf(dir, dir + ".gguf", o);
    m = Model::load(dir + ".gguf");
  }
  return m;
}

inline const Tokenizer& fixture_tokenizer() {
  static const Tokenizer tok(read_bytes(testing::fixture_tokenizer_path()), tiny_config(true));
  return tok;
}

// A property a target checks failed: report it as a crash.
inline void check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz: property violated: %s\n", what);
    std::abort();
  }
}

}  // namespace mp::fuzz
