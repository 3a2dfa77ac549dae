// The host sampler's cost per token: sample_candidates (top-k and greedy by partial selection)
// against sample_candidates_by_full_sort (the stable sort of the whole vocabulary it replaced) on
// the same random logits, in the same run, in microseconds of the process's CPU time per call.
// Prints a markdown table with the ratio. usage: bench_sampler [--vocab N] [--calls N]
#include <algorithm>
#include <cstdio>
#include <ctime>
#include <random>
#include <string>
#include <vector>

#include "sampling.h"

using namespace mp;

namespace {

double cpu_seconds() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + ts.tv_nsec * 1e-9;
}

}  // namespace

int main(int argc, char** argv) {
  int vocab = 8192, calls = 2000;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--vocab")
      vocab = std::stoi(argv[i + 1]);
    else if (a == "--calls")
      calls = std::stoi(argv[i + 1]);
    else {
      std::fprintf(stderr, "unknown option %s\nusage: bench_sampler [--vocab N] [--calls N]\n",
                   a.c_str());
      return 2;
    }
  }
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0, 3);
  std::vector<std::vector<float>> rows(16, std::vector<float>(vocab));
  for (auto& r : rows)
    for (auto& x : r) x = normal(rng);
  struct Case {
    const char* name;
    SamplingParams p;
  };
  SamplingParams defaults;  // the CLI's: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05
  SamplingParams greedy;
  greedy.temperature = 0;
  SamplingParams top_k_only = defaults;
  top_k_only.top_p = 1.0f;
  top_k_only.min_p = 0;
  SamplingParams top_p_only = defaults;  // what OpenAI-style clients often send
  top_p_only.top_k = 0;
  top_p_only.min_p = 0;
  SamplingParams temperature_only = top_p_only;  // the server API's default
  temperature_only.top_p = 1.0f;
  const Case cases[] = {{"defaults (top-k 40, top-p 0.95, min-p 0.05)", defaults},
                        {"top-k 40 only", top_k_only},
                        {"top-p 0.95 only", top_p_only},
                        {"temperature only", temperature_only},
                        {"greedy", greedy}};
  std::printf("\nsample_candidates, %d ids, microseconds of CPU time per call (median of 5 x %d "
              "calls)\n\n| parameters | baseline: full stable sort | partial selection | ratio |\n"
              "|---|---|---|---|\n",
              vocab, calls);
  for (const Case& c : cases) {
    double us[2];
    for (int path = 0; path < 2; ++path) {
      std::vector<double> runs;
      size_t sink = 0;
      for (int rep = 0; rep < 5; ++rep) {
        const double t0 = cpu_seconds();
        for (int i = 0; i < calls; ++i) {
          const auto& row = rows[i % rows.size()];
          sink += (path == 0 ? sample_candidates_by_full_sort(c.p, row, {})
                             : sample_candidates(c.p, row, {}))
                      .size();
        }
        runs.push_back((cpu_seconds() - t0) / calls * 1e6);
      }
      std::sort(runs.begin(), runs.end());
      us[path] = runs[2];
      if (sink == 0) std::fprintf(stderr, "no candidates\n");
    }
    std::printf("| %s | %.1f | %.1f | %.1fx |\n", c.name, us[0], us[1], us[0] / us[1]);
  }
}
