// make-fuzz-seeds DIR: writes the binary seed inputs of the fuzz targets under DIR/<target>/
// (the committed tests/fuzz/corpus); the JSON seeds of fuzz_completions are written by hand.
#include <cstring>

#include "fuzz_support.h"

namespace {
namespace fs = std::filesystem;

void put(const fs::path& dir, const std::string& name, const std::string& bytes) {
  fs::create_directories(dir);
  std::ofstream(dir / name, std::ios::binary) << bytes;
}
std::string u32(uint32_t v) { return std::string(reinterpret_cast<const char*>(&v), 4); }
std::string state_seed(bool fma, const std::vector<int>& tokens) {
  auto b = mp::make_backend(mp::fuzz::tiny_model(fma), {.kind = "cpu", .n_slots = 1});
  const mp::SeqChunk c{b->alloc_slot(), tokens, false};
  b->forward({&c, 1});
  const auto s = b->save_slot(0);
  // The target's first byte: model (bit 0); not sealed, the checksum is right already.
  return std::string(1, fma ? '\1' : '\0') + std::string(s.begin(), s.end());
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make-fuzz-seeds DIR\n");
    return 2;
  }
  const fs::path out = argv[1];
  for (bool fma : {true, false}) {
    const std::string name = fma ? "fma" : "exact";
    const fs::path hf = mp::fuzz::scratch_dir() / ("hf-" + name);
    (void)mp::fuzz::tiny_model(fma);  // writes the checkpoint and its GGUF under scratch_dir()
    put(out / "gguf", name + ".gguf", mp::fuzz::read_bytes(hf.string() + ".gguf"));
    const std::string config = mp::fuzz::read_bytes((hf / "config.json").string());
    const std::string st = mp::fuzz::read_bytes((hf / "model.safetensors").string());
    put(out / "convert", name, u32(config.size()) + config + u32(0) + st);
    put(out / "state", name + "-5", state_seed(fma, {3, 4, 5, 6, 7}));
    put(out / "state", name + "-13", state_seed(fma, {9, 8, 7, 6, 5, 4, 3, 10, 11, 12, 13, 14, 15}));
  }
  // Token ids: in range, past the vocabulary, negative, byte pieces; a stop string "e".
  std::string ids = std::string("\0\1", 2);
  for (int16_t id : {1, 50, 120, 7, 300, 2, 399, 400, -1, 3, 70, 71, 72, 200}) {
    char b[2];
    std::memcpy(b, &id, 2);
    ids.append(b, 2);
  }
  put(out / "tokenizer", "ids", ids + "e");
  put(out / "tokenizer", "text", "\x01Hello world, caf\xc3\xa9 \xe2\x82\xac \xff\xfe end.");
  return 0;
}
