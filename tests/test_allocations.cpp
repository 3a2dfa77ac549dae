// No heap allocation per generated token in the scheduler's steady state: operator new is counted
// (allocation_count.cpp, in this test's own executable) while streams run through a Scheduler
// over a backend that does no work.
#include <gtest/gtest.h>

#include "allocation_count.h"
#include "checkpoint.h"
#include "null_backend.h"

namespace {

using namespace mp;

// Allocations of `streams` requests of `tokens` tokens each, from submission to the last event.
uint64_t allocations_of_run(const Model& model, int streams, int tokens, uint64_t* steps) {
  NullBackend backend(model.config(), streams);
  Scheduler sched(backend, model.tokenizer(), {.max_queue = streams, .event_threads = 2});
  const std::vector<int> prompt = model.tokenizer().encode("The history of the", true);
  const uint64_t before = mp::testing::allocations();
  EXPECT_EQ(run_streams(sched, prompt, streams, tokens), int64_t(streams) * tokens);
  const uint64_t n = mp::testing::allocations() - before;
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
  const uint64_t extra_tokens = uint64_t(streams) * 300;
  const uint64_t extra = long_run > short_run ? long_run - short_run : 0;
  // Each stream needs a step a token; more steps when the streams start apart (the submissions
  // race the first steps), so the steps of the two runs differ by less than 300 at times: the
  // long run's steps bound what per-step allocations add, far below the 19,200 of one a token.
  ASSERT_GE(long_steps, 400u);
  EXPECT_LE(extra, 2 * long_steps) << "allocations per extra token: "
                                   << double(extra) / extra_tokens << " (" << short_steps
                                   << " and " << long_steps << " steps)";
}

}  // namespace
