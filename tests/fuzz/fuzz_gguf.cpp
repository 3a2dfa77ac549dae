// The GGUF reader and the model checks behind it (config, tokenizer, every tensor's place and
// shape): any bytes either load or fail with mp::Error; what loads lies inside the file.
#include "format.h"
#include "fuzz_support.h"
#include "gguf.h"

MULTIPOLE_FUZZ_TARGET(fuzz_gguf) {
  using namespace mp;
  gguf::File f;
  try {
    // libFuzzer's buffer is exactly `size` bytes on the heap: ASan sees any read past it.
    f = gguf::parse(data, size);
  } catch (const Error&) {
    return 0;
  }
  volatile uint8_t sink = 0;  // keeps the reads below
  for (const auto& t : f.tensors) {
    fuzz::check(t.offset <= size && t.nbytes <= size - t.offset, "a tensor lies inside the file");
    fuzz::check(t.offset >= f.data_offset, "a tensor lies in the data section");
    if (t.nbytes) sink = sink ^ data[t.offset] ^ data[t.offset + t.nbytes - 1];
  }
  // The whole loader over the same bytes, from a file as in production (mmap).
  try {
    const auto m = Model::load(fuzz::write_scratch("model.gguf", data, size));
    for (const auto& spec : expected_tensors(m->config()))
      fuzz::check(m->tensor(spec.name, spec.shape).nbytes() > 0, "expected tensors are present");
    const Tokenizer& tok = m->tokenizer();
    const std::vector<int> ids = tok.encode("fuzz", true);
    for (int id : ids) fuzz::check(id >= 0 && id < m->config().vocab_size, "ids in the vocabulary");
  } catch (const Error&) {
  }
  return 0;
}
