// The sequence-state file loader. First byte: bit 0 picks the tiny FMA or exact-attention model;
// bit 1 "seals" the rest, replacing its last 8 bytes by the checksum of what precedes them, so
// that the fuzzer reaches past the checksum into the structure. Whatever loads must run: a few
// more tokens, then a save that loads back to the same bytes.
#include <cstring>

#include "fma_cpu.h"
#include "fuzz_support.h"

MULTIPOLE_FUZZ_TARGET(fuzz_state) {
  using namespace mp;
  if (size == 0) return 0;
  const bool fma = data[0] & 1;
  std::vector<uint8_t> bytes(data + 1, data + size);
  if ((data[0] & 2) && bytes.size() >= 8) {
    const uint64_t sum =
        hash_bytes(std::span<const uint8_t>(bytes).first(bytes.size() - 8));
    std::memcpy(bytes.data() + bytes.size() - 8, &sum, 8);
  }
  static std::map<bool, std::unique_ptr<Backend>> backends;
  auto& b = backends[fma];
  if (!b) {
    b = make_backend(fuzz::tiny_model(fma), {.kind = "cpu", .n_slots = 1, .n_threads = 1});
    b->alloc_slot();
  }
  const std::string path = fuzz::write_scratch("seq.state", bytes.data(), bytes.size());
  try {
    load_state_file(*b, 0, path);
  } catch (const Error& e) {
    fuzz::check(std::string(e.what()).find(path) != std::string::npos,
                "a refused state file is named in the error");
    return 0;
  }
  const int64_t pos = b->slot_pos(0);
  const std::vector<int> tokens = {5, 6, 7};
  const SeqChunk chunk{0, tokens, true};
  try {
    b->forward({&chunk, 1});
  } catch (const Error&) {
    return 0;  // e.g. past an exact model's context: refused, not a crash
  }
  fuzz::check(b->slot_pos(0) == pos + 3, "the position advances");
  const std::vector<uint8_t> saved = b->save_slot(0);
  b->load_slot(0, saved);
  fuzz::check(b->save_slot(0) == saved, "a saved state loads back to the same bytes");
  return 0;
}
