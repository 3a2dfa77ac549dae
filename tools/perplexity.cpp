// multipole-perplexity: perplexity of a model over a text file or a file of token ids.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <sstream>

#include "common/args.h"
#include "common/backend_args.h"
#include "multipole/multipole.h"

int main(int argc, char** argv) {
  mp::cli::Args args(
      argc, argv, {"ids", "cpu-fp32-products", "cpu-bf16-activations"},
      "usage: multipole-perplexity -m, --model FILE [options] FILE\n"
      "Prints the perplexity of FILE under the model.\n"
      "  --ids             FILE holds whitespace-separated token ids, not text\n"
      "  --ctx N           evaluation window: the tokens are cut into windows of N, each\n"
      "                    evaluated from an empty state (default: the whole file)\n"
      "  --chunk N         prefill chunk size (default 512)\n"
      "  --nll-out FILE    write the per-token negative log-likelihoods (nats) as JSON\n"
      "  --backend KIND    auto, cpu or cuda (default auto)\n"
      "  --threads N       CPU threads (default: all cores)\n" +
          std::string(mp::cli::kCpuFp32ProductsUsage),
      {{"m", "model"}});
  args.check_known({"model", "ids", "ctx", "chunk", "nll-out", "backend", "threads",
                    "cpu-fp32-products", "cpu-bf16-activations"});
  if (args.positional().size() != 1) args.fail("expected one input FILE");
  const long long ctx = args.integer("ctx", 0);
  const int chunk = static_cast<int>(args.integer("chunk", 512));
  if (ctx < 0 || ctx == 1) args.fail("--ctx must be 0 (whole file) or >= 2");
  if (chunk <= 0) args.fail("--chunk must be positive");
  try {
    auto model = mp::Model::load(args.str("model", "models/default.gguf"));
    std::ifstream in(args.positional()[0], std::ios::binary);
    if (!in) throw mp::Error("cannot read '" + args.positional()[0] + "'");
    std::vector<int> tokens;
    if (args.has("ids")) {
      std::string w;
      while (in >> w) {
        size_t used = 0;
        long long id = -1;
        try {
          id = std::stoll(w, &used);
        } catch (...) {
        }
        if (used != w.size() || id < 0 || id >= model->config().vocab_size)
          throw mp::Error("'" + w + "' is not a token id of this model");
        tokens.push_back(static_cast<int>(id));
      }
    } else {
      const std::string text((std::istreambuf_iterator<char>(in)),
                             std::istreambuf_iterator<char>());
      tokens = model->tokenizer().encode(text, model->tokenizer().add_bos());
    }
    if (tokens.size() < 2) throw mp::Error("need at least 2 tokens to evaluate");
    auto backend = mp::make_backend(model, mp::cli::backend_from_args(args, 1));
    std::fprintf(stderr, "model: %s (%s), backend %s, %zu tokens\n", model->path().c_str(),
                 model->config().summary().c_str(), backend->name().c_str(), tokens.size());
    const size_t window = ctx > 0 ? size_t(ctx) : tokens.size();
    std::vector<double> nll;
    const auto t0 = std::chrono::steady_clock::now();
    for (size_t i = 0; i + 1 < tokens.size(); i += window) {
      const size_t n = std::min(window, tokens.size() - i);
      const auto part = mp::token_nlls(*backend, std::span<const int>(tokens).subspan(i, n), chunk);
      nll.insert(nll.end(), part.begin(), part.end());
    }
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    double sum = 0;
    for (double x : nll) sum += x;
    std::printf("perplexity: %.4f over %zu predicted tokens (mean NLL %.5f nats)\n",
                std::exp(sum / nll.size()), nll.size(), sum / nll.size());
    std::fprintf(stderr, "%.1f tokens/s (%zu tokens in %.2f s)\n", tokens.size() / secs,
                 tokens.size(), secs);
    if (args.has("nll-out"))
      mp::write_file_atomic(args.str("nll-out"), nlohmann::json(nll).dump() + "\n");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
