// multipole-convert: Hugging Face folder -> Multipole GGUF model file.
#include <cstdio>

#include "common/args.h"
#include "multipole/multipole.h"

int main(int argc, char** argv) {
  mp::cli::Args args(
      argc, argv, {"force"},
      "usage: multipole-convert HF_DIR OUT.gguf [--dtype f32|f16|bf16] [--force]\n"
      "Converts a Hugging Face style FMA checkpoint (config.json, model.safetensors\n"
      "or its sharded index, tokenizer.model) into one GGUF file.\n"
      "  --dtype T   storage type of the matrices (default bf16; norms and\n"
      "              biases stay f32)\n"
      "  --force     overwrite OUT.gguf if it exists\n");
  args.check_known({"dtype", "force"});
  if (args.positional().size() != 2) args.fail("expected HF_DIR and OUT.gguf");
  try {
    mp::ConvertOptions o;
    o.dtype = mp::parse_dtype(args.str("dtype", "bf16"));
    o.overwrite = args.has("force");
    o.progress = [](size_t done, size_t total, const std::string& name) {
      std::fprintf(stderr, "\r[%zu/%zu] %-60s", done, total, name.c_str());
      if (done == total) std::fputc('\n', stderr);
    };
    mp::convert_hf_to_gguf(args.positional()[0], args.positional()[1], o);
    auto m = mp::Model::load(args.positional()[1]);  // proves the file loads
    std::fprintf(stderr, "wrote %s: %s\n", args.positional()[1].c_str(),
                 m->config().summary().c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
