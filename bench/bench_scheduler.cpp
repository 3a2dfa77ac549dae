// The scheduler's own cost per token: N streams through the Scheduler over a backend that does
// no model work (it returns the next token at once), with the shipped model's tokenizer, against
// the same tokens produced by a bare loop over that backend (the floor). What the table shows is
// the host work a GPU step pays on top of its kernels: the wall time per token over the floor,
// the model thread's own time per token (its steps less the backend's calls: what a GPU step
// waits for), and the heap allocations per token of every thread (operator new, counted here).
// With a step time (step_us, e.g. 2000 as a GPU step at batch 1,024 takes) the backend's steps
// take that long, and the scheduler's host work runs after each step, then beside it (the
// backend sampling asynchronously, as the CUDA backend does): the two rows and the bare loop show
// what overlapping the host work wins.
// usage: bench_scheduler MODEL.gguf [streams=1024] [tokens=512] [step_us=0]
#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "allocation_count.h"
#include "multipole/multipole.h"
#include "null_backend.h"

namespace {

using namespace mp;

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// One run of the streams through a Scheduler; prints its table row.
void run(const Model& model, int streams, int tokens, std::chrono::microseconds step, bool overlap,
         double floor_s) {
  NullBackend backend(model.config(), streams, step, overlap);
  SamplingParams sp;
  sp.temperature = 0.8f, sp.top_k = 0, sp.top_p = 1.0f, sp.min_p = 0.0f;
  const std::vector<int> prompt = model.tokenizer().encode("The history of the", true);
  Scheduler sched(backend, model.tokenizer(), {.max_queue = streams});
  const uint64_t allocations_before = mp::testing::allocations();
  const auto t0 = std::chrono::steady_clock::now();
  run_streams(sched, prompt, streams, tokens, sp);
  const double s = seconds_since(t0);
  const uint64_t allocations = mp::testing::allocations() - allocations_before;
  const double n = double(streams) * tokens;
  const SchedulerStats st = sched.stats();
  std::printf("| %s | %d | %d | %.0f | %.0f | %.3f | %.3f | %.3f | %llu |\n",
              step.count() == 0 ? "none" : overlap ? "beside the step" : "after the step",
              streams, tokens, n / s, n / floor_s, (s - floor_s) / n * 1e6,
              (st.step_seconds - st.backend_seconds) / n * 1e6, double(allocations) / n,
              static_cast<unsigned long long>(st.steps));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: bench_scheduler MODEL.gguf [streams] [tokens] [step_us]\n");
    return 2;
  }
  const int streams = argc > 2 ? std::atoi(argv[2]) : 1024;
  const int tokens = argc > 3 ? std::atoi(argv[3]) : 512;
  const std::chrono::microseconds step(argc > 4 ? std::atoll(argv[4]) : 0);
  auto model = Model::load(argv[1]);

  // The floor: the same steps with nothing around them.
  double floor_s;
  {
    NullBackend backend(model->config(), streams, step);
    SamplingParams sp;
    std::vector<int> slots, next(streams, 5);
    std::vector<SeqChunk> batch;
    std::vector<SampleSpec> specs(streams, SampleSpec{&sp, {}, 0.5, 0});
    for (int i = 0; i < streams; ++i) {
      slots.push_back(backend.alloc_slot());
      batch.push_back({slots[i], std::span<const int>(&next[i], 1), false});
    }
    const auto t0 = std::chrono::steady_clock::now();
    for (int t = 0; t < tokens; ++t) {
      const auto got = backend.forward_sample(batch, specs);
      for (int i = 0; i < streams; ++i) next[i] = got[i].token;
    }
    floor_s = seconds_since(t0);
  }
  std::printf("| host work | streams | tokens each | scheduler tokens/s | bare loop tokens/s | "
              "scheduler us per token | model thread us per token | allocations per token | "
              "steps |\n|---|---|---|---|---|---|---|---|---|\n");
  if (step.count() == 0) {
    run(*model, streams, tokens, step, false, floor_s);
  } else {  // the same steps with the host work after each, then beside each
    run(*model, streams, tokens, step, false, floor_s);
    run(*model, streams, tokens, step, true, floor_s);
  }
  return 0;
}
