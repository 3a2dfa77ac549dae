// The scheduler's policy, seen through the batches it hands a (recording) CPU backend.
#include <gtest/gtest.h>
#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>

#include <future>
#include <map>
#include <mutex>

#include "forwarding_backend.h"
#include "model_fixture.h"

namespace {

using namespace mp;

// A CPU backend that records every step's chunks: (slot, position before, tokens).
class RecordingBackend final : public mp::testing::ForwardingBackend {
 public:
  struct Chunk {
    int slot;
    int64_t pos;
    size_t tokens;
    bool samples;
  };
  using ForwardingBackend::ForwardingBackend;
  std::vector<SampledToken> forward_sample(std::span<const SeqChunk> chunks,
                                           std::span<const SampleSpec> specs) override {
    std::vector<Chunk> step;
    for (size_t i = 0; i < chunks.size(); ++i)
      step.push_back({chunks[i].slot, inner().slot_pos(chunks[i].slot), chunks[i].tokens.size(),
                      specs[i].params != nullptr});
    {
      std::lock_guard<std::mutex> lock(mu_);
      steps_.push_back(std::move(step));
    }
    return inner().forward_sample(chunks, specs);
  }
  std::vector<std::vector<Chunk>> steps() const {
    std::lock_guard<std::mutex> lock(mu_);
    return steps_;
  }

 private:
  mutable std::mutex mu_;
  std::vector<std::vector<Chunk>> steps_;
};

struct Rig : mp::testing::VariantModel {
  RecordingBackend backend;
  Scheduler sched;
  Rig(int slots, int budget)
      : backend(make_backend(model, {.kind = "cpu", .n_slots = slots, .n_threads = 2})),
        sched(backend, model->tokenizer(), {.max_queue = 64, .max_prefill_per_step = budget}) {}

  // Submits a request; the future is ready with its final event.
  std::future<CompletionEvent> submit(int prompt_tokens, int max_tokens, uint64_t seed,
                                      std::function<void(const CompletionEvent&)> each = {},
                                      uint64_t* id = nullptr) {
    auto done = std::make_shared<std::promise<CompletionEvent>>();
    CompletionRequest r;
    r.prompt = mp::testing::random_tokens(prompt_tokens, model->config().vocab_size, seed);
    r.max_tokens = max_tokens;
    r.ignore_eos = true;
    r.sampling.seed = seed;
    r.on_event = [done, each](const CompletionEvent& e) {
      if (each) each(e);
      if (e.done) done->set_value(e);
      return true;
    };
    const uint64_t got = sched.submit(std::move(r));
    if (id) *id = got;
    return done->get_future();
  }
};

// While a long prompt is read, a generating stream gets a token in every step, and no step
// reads more prompt tokens than the budget.
TEST(Scheduler, LongPromptDoesNotStallRunningStreams) {
  Rig rig(4, 32);
  std::promise<void> started;
  int seen = 0;
  uint64_t stream_id = 0;
  // The stream generates until it is cancelled, after the long prompt is done: it runs through
  // every step of the reading however the threads are scheduled.
  auto stream = rig.submit(5, 1 << 20, 1, [&](const CompletionEvent& e) {
    if (e.token >= 0 && ++seen == 3) started.set_value();
  }, &stream_id);
  started.get_future().wait();
  auto long_prompt = rig.submit(400, 2, 2);
  ASSERT_EQ(long_prompt.get().finish_reason, "length");
  rig.sched.cancel(stream_id);
  ASSERT_EQ(stream.get().finish_reason, "cancelled");
  const auto steps = rig.backend.steps();
  int stream_slot = steps.front().front().slot, reading_steps = 0;
  for (const auto& step : steps) {
    size_t prompt = 0;
    bool stream_in = false, reading = false;
    for (const auto& c : step) {
      if (c.slot == stream_slot) {
        stream_in = true;
        if (c.pos >= 5) {
          EXPECT_EQ(c.tokens, 1u);
        }
      } else {
        reading |= c.pos + int64_t(c.tokens) < 400;  // a chunk before the prompt's last
        prompt += c.tokens;
      }
    }
    EXPECT_LE(prompt, 32u);
    if (reading) {
      ++reading_steps;
      EXPECT_TRUE(stream_in) << "the stream skipped a step while the prompt was read";
    }
  }
  EXPECT_GE(reading_steps, 400 / 32);
}

// Prompts are read first come, first served: each step fills its budget in arrival order, so a
// step's chunks all finish their prompts but the last, which takes what is left of the budget;
// prompts finish in the order they came; every prompt token is read exactly once.
TEST(Scheduler, PromptsAreReadInArrivalOrderFillingEachStep) {
  Rig rig(8, 100);
  std::vector<std::future<CompletionEvent>> done;
  for (int i = 0; i < 8; ++i) done.push_back(rig.submit(130 + 37 * i, 1, 10 + i));
  for (auto& d : done) ASSERT_EQ(d.get().finish_reason, "length");
  std::map<int, int64_t> read;  // by slot
  std::vector<int> finished;    // slots in the order their prompts were done
  for (const auto& step : rig.backend.steps()) {
    size_t total = 0;
    for (size_t i = 0; i < step.size(); ++i) {
      const auto& c = step[i];
      EXPECT_EQ(c.pos, read[c.slot]) << "a prompt token read twice or skipped";
      read[c.slot] += c.tokens;
      total += c.tokens;
      if (c.samples) finished.push_back(c.slot);
      if (i + 1 < step.size()) {
        EXPECT_TRUE(c.samples) << "a chunk cut short before the budget";
      }
    }
    EXPECT_LE(total, 100u);
    if (!step.back().samples) {
      EXPECT_EQ(total, 100u) << "a step left budget unused";
    }
  }
  ASSERT_EQ(finished.size(), 8u);
  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ(finished[i], i) << "slots are handed out in order: slot i is request i";
    EXPECT_EQ(read[i], 130 + 37 * i);
  }
}

// A callback that blocks holds up only its own request's events: the model thread and the other
// requests go on (here another request finishes while the first one's callback waits for it).
TEST(Scheduler, ABlockedCallbackDelaysNoOtherRequest) {
  Rig rig(4, 64);
  std::promise<void> other_done;
  auto other_done_f = other_done.get_future().share();
  bool waited = false;
  auto blocked = rig.submit(5, 20, 1, [&, other_done_f](const CompletionEvent& e) {
    if (e.token >= 0 && !waited) {
      waited = true;
      EXPECT_EQ(other_done_f.wait_for(std::chrono::seconds(60)), std::future_status::ready);
    }
  });
  auto other = rig.submit(5, 30, 2);  // request id 2: the other event thread
  EXPECT_EQ(other.get().completion_tokens, 30);
  other_done.set_value();
  EXPECT_EQ(blocked.get().completion_tokens, 20);
}

// How the calling thread is scheduled: its name, nice value and policy.
struct ThreadTraits {
  std::string name;
  int nice = 0, policy = 0;
};
ThreadTraits this_thread_traits() {
  char name[16] = {};
  pthread_getname_np(pthread_self(), name, sizeof name);
  return {name, getpriority(PRIO_PROCESS, static_cast<id_t>(gettid())), sched_getscheduler(0)};
}

// A backend that notes how the thread calling its steps is scheduled.
class ThreadNotingBackend final : public mp::testing::ForwardingBackend {
 public:
  using ForwardingBackend::ForwardingBackend;
  std::vector<SampledToken> forward_sample(std::span<const SeqChunk> chunks,
                                           std::span<const SampleSpec> specs) override {
    {
      std::lock_guard<std::mutex> lock(mu);
      stepping = this_thread_traits();
    }
    return inner().forward_sample(chunks, specs);
  }
  std::mutex mu;
  ThreadTraits stepping;
};

// Whether this process may raise a thread's priority (root or CAP_SYS_NICE), tried on a thread
// of its own.
bool may_raise_priority() {
  bool raised = false;
  std::thread([&] {
    const auto tid = static_cast<id_t>(gettid());
    const int nice = getpriority(PRIO_PROCESS, tid);
    raised = nice > -20 && setpriority(PRIO_PROCESS, tid, nice - 1) == 0;
  }).join();
  return raised;
}

// Delivering tokens gives way to the step loop: the event threads run as background work (a
// lower priority, SCHED_BATCH), the step loop at the nice value it asks for where the process
// may raise it, else at the process's own; both are named.
TEST(Scheduler, EventThreadsGiveWayToTheStepLoop) {
  mp::testing::TempDir dir;
  auto model = mp::testing::random_model(dir, mp::testing::small_config());
  ThreadNotingBackend backend(make_backend(model, {.kind = "cpu", .n_slots = 2, .n_threads = 1}));
  const ThreadTraits caller = this_thread_traits();
  const int asked = std::max(-20, caller.nice - 5);
  std::promise<ThreadTraits> delivering;
  {
    Scheduler sched(backend, model->tokenizer(), {.max_queue = 4, .step_loop_nice = asked});
    CompletionRequest r;
    r.prompt = mp::testing::random_tokens(5, model->config().vocab_size, 1);
    r.max_tokens = 2;
    r.on_event = [&](const CompletionEvent& e) {
      if (e.done) delivering.set_value(this_thread_traits());
      return true;
    };
    sched.submit(std::move(r));
    const ThreadTraits events = delivering.get_future().get();
    EXPECT_EQ(events.name, "mp-events");
    EXPECT_EQ(events.nice, std::min(caller.nice + kBackgroundNice, 19));
    EXPECT_EQ(events.policy, SCHED_BATCH);
  }
  std::lock_guard<std::mutex> lock(backend.mu);
  EXPECT_EQ(backend.stepping.name, "mp-step-0");
  EXPECT_EQ(backend.stepping.nice, may_raise_priority() ? asked : caller.nice);
  EXPECT_EQ(backend.stepping.policy, caller.policy);
}

}  // namespace
