// multipole-generate: streams a completion of a prompt to stdout.
#include <chrono>
#include <cstdio>
#include <iostream>
#include <iterator>

#include "common/args.h"
#include "common/backend_args.h"
#include "common/sampling_args.h"
#include "multipole/multipole.h"

namespace {
const char* kUsage =
    "usage: multipole-generate [options] [PROMPT...]\n"
    "Writes a completion of PROMPT (or of standard input when no prompt is given) to stdout.\n"
    "  -m, --model FILE       GGUF model (default models/default.gguf)\n"
    "  -p, --prompt TEXT      the prompt (instead of positional words)\n"
    "  -n, --max-tokens N     tokens to generate (default 128)\n"
    "  --stop TEXT            stop when TEXT appears (repeatable)\n"
    "  --ignore-eos           keep generating past the end-of-sequence token\n"
    "  --chunk N              prefill chunk size (default 512)\n"
    "  --backend KIND         auto, cpu or cuda (default auto)\n"
    "  --device N             the GPU to run on (default 0)\n"
    "  --threads N            CPU threads (default: all cores)\n";

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

int main(int argc, char** argv) {
  mp::cli::Args args(argc, argv, {"ignore-eos", "cpu-fp32-products", "cpu-bf16-activations"},
                     std::string(kUsage) + mp::cli::kCpuFp32ProductsUsage + mp::cli::kSamplingUsage,
                     {{"m", "model"}, {"p", "prompt"}, {"n", "max-tokens"}});
  auto known = mp::cli::kSamplingOptions;
  known.insert({"model", "prompt", "max-tokens", "stop", "ignore-eos", "chunk", "backend", "device",
                "threads", "cpu-fp32-products", "cpu-bf16-activations"});
  args.check_known(known);
  const int max_tokens = static_cast<int>(args.integer("max-tokens", 128));
  const int chunk = static_cast<int>(args.integer("chunk", 512));
  if (max_tokens < 0) args.fail("--max-tokens must be >= 0");
  if (chunk <= 0) args.fail("--chunk must be positive");

  std::string prompt = args.str("prompt");
  if (!args.has("prompt")) {
    for (const auto& w : args.positional()) prompt += (prompt.empty() ? "" : " ") + w;
    if (args.positional().empty())
      prompt.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
  }
  try {
    auto model = mp::Model::load(args.str("model", "models/default.gguf"));
    const auto& tok = model->tokenizer();
    const auto sampling = mp::cli::sampling_from_args(args, model->recommended_sampling());
    mp::BackendOptions bo = mp::cli::backend_from_args(args, 1);
    if (args.has("device")) {
      bo.devices = mp::parse_devices(args.str("device"), bo.kind);
      if (bo.devices.size() != 1) args.fail("--device takes one device number");
    }
    auto backend = mp::make_backend(model, bo);
    std::fprintf(stderr, "model: %s (%s)\nbackend: %s\nsampling: %s\n", model->path().c_str(),
                 model->config().summary().c_str(), backend->name().c_str(),
                 mp::cli::describe_sampling(sampling, model->recommended_sampling()).c_str());

    const std::vector<int> prompt_ids = tok.encode(prompt, tok.add_bos());
    if (prompt_ids.empty()) throw mp::Error("the prompt is empty and the model adds no BOS token");
    const int slot = backend->alloc_slot();
    const auto t0 = std::chrono::steady_clock::now();
    mp::Sampler sampler(sampling);
    mp::PenaltyCounts penalties(sampling, model->config().vocab_size);
    for (int t : prompt_ids) penalties.push(t);
    // The last prompt chunk and each generated token come back as the next sampled token (on
    // the GPU with the CUDA backend); the chunks before only fill the cache.
    auto feed = [&](std::span<const int> tokens) {
      const mp::SeqChunk c{slot, tokens, false};
      const mp::SampleSpec spec{&sampler.params(), penalties.counts(), sampler.draw(), 0};
      return backend->forward_sample({&c, 1}, {&spec, 1})[0].token;
    };
    size_t i = 0;
    for (; i + chunk < prompt_ids.size(); i += chunk) {
      const mp::SeqChunk c{slot, std::span<const int>(prompt_ids).subspan(i, chunk), false};
      backend->forward({&c, 1});
    }
    int id = feed(std::span<const int>(prompt_ids).subspan(i));
    const double t_prefill = seconds_since(t0);
    const size_t n_prompt = prompt_ids.size();

    mp::TextStream stream(tok, args.all("stop"));
    std::fputs(prompt.c_str(), stdout);
    std::fflush(stdout);
    const auto t1 = std::chrono::steady_clock::now();
    int generated = 0;
    const char* reason = "length";
    // Speed over the first and the last 1,000 tokens: it must not fall as the text grows.
    constexpr int kWindow = 1000;
    std::vector<double> at(kWindow + 1);  // when each of the last kWindow + 1 tokens came
    double first_window = 0;
    while (generated < max_tokens) {
      at[generated % at.size()] = seconds_since(t1);
      if (generated == kWindow) first_window = at[kWindow];
      ++generated;
      penalties.push(id);
      if (id == tok.eos() && !args.has("ignore-eos")) {
        reason = "eos";
        break;
      }
      std::fputs(stream.push(id).c_str(), stdout);
      std::fflush(stdout);
      if (stream.stopped()) {
        reason = "stop";
        break;
      }
      if (generated == max_tokens) break;
      id = feed(std::span<const int>(&id, 1));
    }
    std::fputs(stream.flush().c_str(), stdout);
    std::fputs("\n", stdout);
    const double t_gen = seconds_since(t1);
    std::fprintf(stderr,
                 "\nprompt: %zu tokens in %.3f s (%.1f tokens/s)\n"
                 "generated: %d tokens in %.3f s (%.1f tokens/s), stopped by %s\n"
                 "state: %.1f KiB at position %lld\n",
                 n_prompt, t_prefill, n_prompt / std::max(t_prefill, 1e-9), generated, t_gen,
                 generated / std::max(t_gen, 1e-9), reason, backend->slot_bytes(slot) / 1024.0,
                 static_cast<long long>(backend->slot_pos(slot)));
    if (generated > 2 * kWindow) {
      const double last_window = at[(generated - 1) % at.size()] - at[generated % at.size()];
      std::fprintf(stderr, "speed: %.1f tokens/s over the first %d tokens, %.1f over the last %d\n",
                   kWindow / first_window, kWindow, kWindow / last_window, kWindow);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
