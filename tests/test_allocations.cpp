// No heap allocation per generated token in the scheduler's steady state: operator new is counted
// (this test's own executable, so that no other test runs with the counting operator new) while
// streams run through a Scheduler over a backend that does no work.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <future>
#include <new>

#include "checkpoint.h"
#include "null_backend.h"

namespace {
std::atomic<uint64_t> g_allocations{0};
}  // namespace

void* operator new(size_t n) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }

namespace {

using namespace mp;

// Allocations of `streams` requests of `tokens` tokens each, from submission to the last event.
uint64_t allocations_of_run(const Model& model, int streams, int tokens, uint64_t* steps) {
  NullBackend backend(model.config(), streams);
  Scheduler sched(backend, model.tokenizer(), {.max_queue = streams, .event_threads = 2});
  const std::vector<int> prompt = model.tokenizer().encode("The history of the", true);
  std::vector<std::promise<int>> done(streams);
  std::vector<CompletionRequest> requests(streams);
  for (int i = 0; i < streams; ++i) {
    requests[i].prompt = prompt;
    requests[i].max_tokens = tokens;
    requests[i].ignore_eos = true;
    requests[i].sampling.seed = i;
    requests[i].on_event = [&done, i](const CompletionEvent& e) {
      if (e.done) done[i].set_value(e.completion_tokens);
      return true;
    };
  }
  const uint64_t before = g_allocations.load();
  for (auto& r : requests) sched.submit(std::move(r));
  for (auto& d : done) EXPECT_EQ(d.get_future().get(), tokens);
  const uint64_t n = g_allocations.load() - before;
  *steps = sched.stats().steps;
  return n;
}

// Runs of 100 and of 400 tokens a stream: the 300 tokens more of each of 64 streams may cost
// allocations per step (the backend's result), never per token.
TEST(Allocations, NoneForEachGeneratedTokenInTheScheduler) {
  const auto model = Model::load(mp::testing::test_data_dir() + "/../../models/default.gguf");
  const int streams = 64;
  uint64_t short_steps = 0, long_steps = 0;
  const uint64_t short_run = allocations_of_run(*model, streams, 100, &short_steps);
  const uint64_t long_run = allocations_of_run(*model, streams, 400, &long_steps);
  const uint64_t extra_tokens = uint64_t(streams) * 300, extra_steps = long_steps - short_steps;
  const uint64_t extra = long_run > short_run ? long_run - short_run : 0;
  ASSERT_GE(extra_steps, 300u);
  EXPECT_LE(extra, 2 * extra_steps) << "allocations per extra token: "
                                    << double(extra) / extra_tokens;
}

}  // namespace
