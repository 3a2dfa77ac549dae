// multipole-convert: Hugging Face folder -> Multipole GGUF model file.
#include <unistd.h>

#include <cstdio>
#include <filesystem>

#include "common/args.h"
#include "common/sampling_args.h"
#include "multipole/multipole.h"

int main(int argc, char** argv) {
  mp::cli::Args args(
      argc, argv, {"force"},
      "usage: multipole-convert HF_DIR|IN.gguf OUT.gguf [--dtype f32|f16|bf16|q8_0] [--force]\n"
      "                         [--sampling LIST]\n"
      "                         [--fma avgpool|groupedconv [--block-size M] [--rank P]\n"
      "                          [--trained-length N]]\n"
      "Converts a Hugging Face folder (config.json, model.safetensors or its sharded\n"
      "index, SentencePiece tokenizer.model) into one GGUF file: a Multipole FMA\n"
      "checkpoint, or a LlamaForCausalLM / MistralForCausalLM one (exact attention,\n"
      "as in its source framework, unless --fma). Given a Multipole GGUF file, stores\n"
      "it again with --dtype (e.g. models/default.gguf as q8_0).\n"
      "  --dtype T           storage type of the matrices (default bf16; norms and\n"
      "                      biases stay f32). q8_0: GGUF's blocks of 32 int8 and an\n"
      "                      fp16 scale (embedding, LM head and summary weights too);\n"
      "                      tensors whose rows are not whole blocks stay bf16\n"
      "  --force             overwrite OUT.gguf if it exists\n"
      "  --sampling LIST     the model's recommended sampling (GGUF general.sampling.*,\n"
      "                      the defaults of multipole-generate, -batch and -server),\n"
      "                      e.g. temperature=0.8,top-k=0,top-p=1,min-p=0,\n"
      "                      repeat-penalty=1.1,penalty-last-n=64; each item replaces\n"
      "                      the source's (a folder's generation_config.json, a GGUF's\n"
      "                      own keys)\n"
      "  --fma K             make an exact-attention checkpoint an FMA model: avgpool\n"
      "                      summaries (no weights), or groupedconv summary weights\n"
      "                      that start as that average pooling (for uptraining)\n"
      "  --block-size M      FMA fine block size m (default 64)\n"
      "  --rank P            summaries per group p (default 4; must divide M)\n"
      "  --trained-length N  n, which fixes the levels: log2(N/M) - 1 (default: the\n"
      "                      checkpoint's max_position_embeddings)\n");
  args.check_known({"dtype", "force", "fma", "block-size", "rank", "trained-length", "sampling"});
  if (args.positional().size() != 2) args.fail("expected HF_DIR and OUT.gguf");
  if (!args.has("fma"))
    for (const char* o : {"block-size", "rank", "trained-length"})
      if (args.has(o)) args.fail(std::string("--") + o + " needs --fma");
  try {
    mp::ConvertOptions o;
    o.dtype = mp::parse_dtype(args.str("dtype", "bf16"));
    o.overwrite = args.has("force");
    if (args.has("sampling")) o.sampling = mp::cli::parse_sampling_list(args.str("sampling"));
    if (args.has("fma")) {
      mp::FmaConversion f;
      f.downsampling = mp::parse_downsampling(args.str("fma"));
      f.block_size = static_cast<int>(args.integer("block-size", f.block_size));
      f.rank = static_cast<int>(args.integer("rank", f.rank));
      f.trained_length = args.integer("trained-length", 0);
      o.fma = f;
    }
    if (isatty(STDERR_FILENO))  // a log file gets the summary line alone, not 100 overwrites
      o.progress = [](size_t done, size_t total, const std::string& name) {
        std::fprintf(stderr, "\r[%zu/%zu] %-60s", done, total, name.c_str());
        if (done == total) std::fputc('\n', stderr);
      };
    if (std::filesystem::is_regular_file(args.positional()[0]))
      mp::convert_gguf(args.positional()[0], args.positional()[1], o);
    else
      mp::convert_hf_to_gguf(args.positional()[0], args.positional()[1], o);
    auto m = mp::Model::load(args.positional()[1]);  // proves the file loads
    std::fprintf(stderr, "wrote %s: %s; recommended sampling: %s\n", args.positional()[1].c_str(),
                 m->config().summary().c_str(), m->recommended_sampling().describe().c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
