// The CPU backend end to end on a model: prefill and generation tokens/s, with the dot-product
// loops the backend used before (cpu::matmul_reference, fp32 weights) as the baseline in the same
// run, or with --baseline the same backend on another file (e.g. the bf16 model against its
// Q8_0 copy). Prints a markdown table; each figure is the median of --repeats runs.
// usage: bench_cpu [MODEL.gguf] [--baseline BASE.gguf] [--threads N] [--repeats R] [--gen N]
//                  [--quick] [--cpu-time] [--cpu-bf16-activations]
// (--cpu-bf16-activations: the measured path's prefill products round their activations once to
// bf16, BackendOptions::cpu_bf16_activations.)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <random>
#include <string>
#include <vector>

#include "multipole/multipole.h"
#include "ops_cpu.h"

using namespace mp;

namespace {

// Wall-clock seconds, or with --cpu-time the process's CPU seconds: on a machine shared with
// other work, one thread's CPU time is the work a token costs, whatever the waits for a core.
bool g_cpu_time = false;
double now_seconds() {
  if (!g_cpu_time)
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + ts.tv_nsec * 1e-9;
}
double seconds_since(double t0) { return now_seconds() - t0; }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Tokens/s of the prompt's prefill (chunks of 512, as multipole-generate) and of `gen` one-token
// steps after it; one fresh slot.
std::pair<double, double> measure(Backend& b, int prompt, int gen, uint32_t seed) {
  const int vocab = b.config().vocab_size;
  std::mt19937 rng(seed);
  std::vector<int> tokens(prompt + gen);
  for (auto& t : tokens) t = 3 + static_cast<int>(rng() % (vocab - 3));
  const int slot = b.alloc_slot();
  constexpr int kChunk = 512;
  double t0 = now_seconds();
  for (int i = 0; i < prompt; i += kChunk) {
    const SeqChunk c{slot, std::span<const int>(tokens).subspan(i, std::min(kChunk, prompt - i)),
                     false};
    b.forward({&c, 1});
  }
  const double prefill = prompt / seconds_since(t0);
  t0 = now_seconds();
  for (int i = 0; i < gen; ++i) {
    const SeqChunk c{slot, std::span<const int>(tokens).subspan(prompt + i, 1), false};
    b.forward({&c, 1});
  }
  const double generation = gen / seconds_since(t0);
  b.free_slot(slot);
  return {prefill, generation};
}

}  // namespace

int main(int argc, char** argv) {
  std::string path = "models/default.gguf", baseline;
  int threads = 2, repeats = 3, gen = 128;
  bool quick = false, bf16_activations = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> int {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return std::stoi(argv[++i]);
    };
    if (a == "--threads")
      threads = value();
    else if (a == "--repeats")
      repeats = value();
    else if (a == "--gen")
      gen = value();
    else if (a == "--quick")
      quick = true;
    else if (a == "--cpu-time")
      g_cpu_time = true;
    else if (a == "--cpu-bf16-activations")
      bf16_activations = true;
    else if (a == "--baseline" && i + 1 < argc)
      baseline = argv[++i];
    else if (!a.empty() && a[0] == '-') {
      std::fprintf(stderr,
                   "unknown option %s\nusage: bench_cpu [MODEL.gguf] [--baseline BASE.gguf] "
                   "[--threads N] [--repeats R] [--gen N] [--quick] [--cpu-time] "
                   "[--cpu-bf16-activations]\n",
                   a.c_str());
      return 2;
    } else
      path = a;
  }
  try {
    auto model = Model::load(path);
    // Path 0 is the baseline: the reference products on the model, or the other file.
    const std::shared_ptr<Model> models[2] = {baseline.empty() ? model : Model::load(baseline),
                                              model};
    const std::vector<int> prompts =
        quick ? std::vector<int>{1, 512, 4096} : std::vector<int>{1, 512, 4096, 16384};
    // [path][prompt] -> prefill and generation tokens/s of each repeat
    std::vector<std::vector<std::vector<double>>> pre(2), gn(2);
    std::string names[2];
    const cpu::Products fast = cpu::active_products();
    cpu::Products products[2] = {baseline.empty() ? cpu::Products::Reference : fast, fast};
    std::unique_ptr<Backend> backends[2];
    for (int path_i = 0; path_i < 2; ++path_i) {
      cpu::set_products(products[path_i]);  // the reference's matrices are built fp32
      backends[path_i] = make_backend(models[path_i],
                                      {.kind = "cpu",
                                       .n_slots = 1,
                                       .n_threads = threads,
                                       .cpu_bf16_activations = path_i == 1 && bf16_activations});
      names[path_i] =
          (baseline.empty() ? "" : models[path_i]->path() + ", ") + backends[path_i]->name();
      std::fprintf(stderr, "%s\n", names[path_i].c_str());
      pre[path_i].resize(prompts.size());
      gn[path_i].resize(prompts.size());
      measure(*backends[path_i], 512, 8, 1);  // warm-up: page in the weights, size the buffers
    }
    // The two paths take turns, so that a change in the machine's load hits both alike.
    for (int r = 0; r < repeats; ++r)
      for (size_t p = 0; p < prompts.size(); ++p)
        for (int path_i = 0; path_i < 2; ++path_i) {
          cpu::set_products(products[path_i]);
          const auto [pf, g] = measure(*backends[path_i], prompts[p], gen, 100 + r);
          pre[path_i][p].push_back(pf);
          gn[path_i][p].push_back(g);
        }
    std::printf("\n%s (%s), tokens/s%s, median of %d runs\n\n", path.c_str(),
                model->config().summary().c_str(), g_cpu_time ? " of process CPU time" : "",
                repeats);
    std::printf("| | baseline: %s | %s | ratio |\n|---|---|---|---|\n", names[0].c_str(),
                names[1].c_str());
    auto row = [](const std::string& what, const std::vector<double>& a,
                  const std::vector<double>& b) {
      const double x = median(a), y = median(b);
      std::printf("| %s | %.0f | %.0f | %.2fx |\n", what.c_str(), x, y, y / x);
    };
    for (size_t p = 0; p < prompts.size(); ++p)
      if (prompts[p] > 1)
        row("prefill, " + std::to_string(prompts[p]) + "-token prompt", pre[0][p], pre[1][p]);
    for (size_t p = 0; p < prompts.size(); ++p)
      row("generation after " + std::to_string(prompts[p] == 1 ? 0 : prompts[p]) +
              " prompt tokens (" + std::to_string(gen) + " steps)",
          gn[0][p], gn[1][p]);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
