// The scheduler's policy, seen through the batches it hands a (recording) CPU backend.
#include <gtest/gtest.h>
#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
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
// may raise it, else at the process's own; both are named. Asked from a thread niced by 3, and
// for that thread's nice minus 3 (the process's own: 0 when it was started without `nice`,
// which the loop once took for "unset"), then minus 8.
void check_step_loop_priority(int raise_by) {
  mp::testing::TempDir dir;
  auto model = mp::testing::random_model(dir, mp::testing::small_config());
  ThreadNotingBackend backend(make_backend(model, {.kind = "cpu", .n_slots = 2, .n_threads = 1}));
  const ThreadTraits caller = this_thread_traits();
  const int asked = std::max(-20, caller.nice - raise_by);
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
  EXPECT_EQ(backend.stepping.nice, may_raise_priority() ? asked : caller.nice) << raise_by;
  EXPECT_EQ(backend.stepping.policy, caller.policy);
}

TEST(Scheduler, EventThreadsGiveWayToTheStepLoop) {
  std::thread([] {
    const auto tid = static_cast<id_t>(gettid());
    const int own = getpriority(PRIO_PROCESS, tid);
    ASSERT_EQ(setpriority(PRIO_PROCESS, tid, std::min(own + 3, 19)), 0);
    for (int raise_by : {std::min(own + 3, 19) - own, 8}) check_step_loop_priority(raise_by);
  }).join();
}

// A CPU backend that runs each step on a thread of its own, as a GPU runs it beside the host:
// start_sample returns at once (after calling on_start with the step's number), finish_sample
// waits for the step. The first step waits at a gate until the test opens it, so that the
// test's requests all join the second step, whichever backend runs them.
class GatedBackend : public mp::testing::ForwardingBackend {
 public:
  GatedBackend(std::unique_ptr<Backend> inner, bool threaded)
      : ForwardingBackend(std::move(inner)), threaded_(threaded) {}
  bool samples_asynchronously() const override { return threaded_; }
  std::vector<SampledToken> forward_sample(std::span<const SeqChunk> chunks,
                                           std::span<const SampleSpec> specs) override {
    std::vector<int> sampling_slots;
    for (size_t i = 0; i < chunks.size(); ++i)
      if (specs[i].params) sampling_slots.push_back(chunks[i].slot);
    {
      std::unique_lock<std::mutex> lock(mu_);
      steps_.push_back(std::move(sampling_slots));
      entered_.notify_all();
      opened_.wait(lock, [&] { return open_; });
    }
    return inner().forward_sample(chunks, specs);
  }
  void start_sample(std::span<const SeqChunk> chunks, std::span<const SampleSpec> specs) override {
    if (on_start) on_start(starts_++);
    if (!threaded_) return Backend::start_sample(chunks, specs);
    step_ = std::async(std::launch::async, [=, this] { return forward_sample(chunks, specs); });
  }
  std::vector<SampledToken> finish_sample(std::span<const SeqChunk> chunks,
                                          std::span<const SampleSpec> specs) override {
    return threaded_ ? step_.get() : Backend::finish_sample(chunks, specs);
  }
  void wait_for_first_step() {
    std::unique_lock<std::mutex> lock(mu_);
    entered_.wait(lock, [&] { return !steps_.empty(); });
  }
  void open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    opened_.notify_all();
  }
  std::function<void(int)> on_start;
  // The slots that sampled a token in each step, in order.
  std::vector<std::vector<int>> steps() const {
    std::lock_guard<std::mutex> lock(mu_);
    return steps_;
  }

 private:
  const bool threaded_;
  int starts_ = 0;
  std::future<std::vector<SampledToken>> step_;
  mutable std::mutex mu_;
  std::condition_variable entered_, opened_;
  bool open_ = false;
  std::vector<std::vector<int>> steps_;
};


// The requests of OverlappedStepsGiveTheSameEvents, run on a gated backend; the first waits at
// the gate until the others are submitted.
std::vector<std::vector<CompletionEvent>> run_mixed_requests(const mp::testing::VariantModel& vm,
                                                             bool threaded,
                                                             const std::string& stop) {
  GatedBackend backend(make_backend(vm.model, {.kind = "cpu", .n_slots = 8, .n_threads = 1}),
                       threaded);
  Scheduler sched(backend, vm.model->tokenizer(), {.max_queue = 16, .max_prefill_per_step = 4096});
  std::vector<CompletionRequest> reqs(7);
  for (size_t i = 0; i < reqs.size(); ++i) {
    reqs[i].prompt = mp::testing::random_tokens(3 + 5 * int(i), vm.config.vocab_size, 40 + i);
    reqs[i].max_tokens = 24;
    reqs[i].ignore_eos = true;
    reqs[i].sampling.seed = 100 + i;
  }
  reqs[1].stop = {stop};                        // its text can end it
  reqs[2].logprobs = 3;                         // its events carry more than text
  reqs[3].max_tokens = 1;                       // done at its first token
  reqs[4].ignore_eos = false;                   // may end at EOS
  reqs[4].sampling.temperature = 1.5f;
  reqs[5].sampling.repetition_penalty = 1.3f;   // penalties see every token at once
  reqs[5].sampling.penalty_last_n = -1;
  reqs[6].keep_state = true;                    // its state after the last fed token
  // Steps 2-9 note, as they start, how many of the first request's token events have arrived:
  // they wait as long as it takes for those that must have come (overlapped, all but the one
  // of the step before), then 10 ms more for the one of the step before, which, overlapped,
  // cannot come yet. Waiting for what must come keeps a loaded machine from failing the test.
  std::atomic<int> first_request_tokens{0};
  std::map<int, int> arrived_at_start;
  backend.on_start = [&](int step) {
    if (step < 2 || step > 9) return;
    auto wait_for = [&](int count, std::chrono::microseconds limit) {
      const auto until = std::chrono::steady_clock::now() + limit;
      while (first_request_tokens < count && std::chrono::steady_clock::now() < until)
        std::this_thread::sleep_for(std::chrono::microseconds(200));
    };
    wait_for(threaded ? step - 1 : step, std::chrono::seconds(30));
    if (threaded) wait_for(step, std::chrono::milliseconds(10));
    arrived_at_start[step] = first_request_tokens;
  };
  std::vector<std::vector<CompletionEvent>> seen(reqs.size());
  std::vector<std::promise<void>> done(reqs.size());
  for (size_t i = 0; i < reqs.size(); ++i) {
    reqs[i].on_event = [&, i](const CompletionEvent& e) {
      seen[i].push_back(e);
      if (i == 0 && e.token >= 0) ++first_request_tokens;
      if (e.done) done[i].set_value();
      return true;
    };
    sched.submit(std::move(reqs[i]));
    if (i == 0) backend.wait_for_first_step();
  }
  backend.open();
  for (auto& d : done) d.get_future().wait();
  // The first request (slot 0, nothing but text, 24 tokens) samples in every step from the
  // first: overlapped, the token of step s - 1 is handed over only once step s has started;
  // otherwise before, so that it has arrived when step s starts.
  const auto steps = backend.steps();
  for (const auto& [step, arrived] : arrived_at_start) {
    for (int k = 0; k < step; ++k)
      EXPECT_EQ(std::count(steps[k].begin(), steps[k].end(), 0), 1) << "step " << k;
    EXPECT_EQ(arrived, threaded ? step - 1 : step) << "step " << step;
  }
  EXPECT_EQ(arrived_at_start.size(), 8u);
  return seen;
}

// A backend that samples asynchronously has each step's plain tokens reported while the next
// step runs: every request still sees exactly the events it sees with steps one after another
// (tokens, text, stop strings, logprobs, EOS, penalties, the final state), in the same order.
TEST(Scheduler, OverlappedStepsGiveTheSameEvents) {
  const mp::testing::VariantModel vm;
  // A stop string that the second request's text holds: two characters from its middle.
  std::string text;
  const auto discovery = run_mixed_requests(vm, false, "\x01");
  for (const auto& e : discovery[1]) text += e.text;
  ASSERT_GE(text.size(), 8u);
  const std::string stop = text.substr(text.size() / 2, 2);
  const auto sync = run_mixed_requests(vm, false, stop);
  const auto overlapped = run_mixed_requests(vm, true, stop);
  ASSERT_EQ(sync[1].back().finish_reason, "stop");
  ASSERT_EQ(sync[3].back().finish_reason, "length");
  ASSERT_TRUE(sync[6].back().state);
  for (size_t i = 0; i < sync.size(); ++i) {
    const auto &a = sync[i], &b = overlapped[i];
    ASSERT_EQ(a.size(), b.size()) << "request " << i;
    for (size_t k = 0; k < a.size(); ++k) {
      SCOPED_TRACE("request " + std::to_string(i) + ", event " + std::to_string(k));
      EXPECT_EQ(a[k].text, b[k].text);
      EXPECT_EQ(a[k].token, b[k].token);
      EXPECT_EQ(a[k].logprob, b[k].logprob);
      EXPECT_EQ(a[k].top_logprobs, b[k].top_logprobs);
      EXPECT_EQ(a[k].done, b[k].done);
      EXPECT_EQ(a[k].finish_reason, b[k].finish_reason);
      EXPECT_EQ(a[k].completion_tokens, b[k].completion_tokens);
      EXPECT_EQ(a[k].state_bytes, b[k].state_bytes);
      EXPECT_EQ(a[k].unfed_token, b[k].unfed_token);
      ASSERT_EQ(bool(a[k].state), bool(b[k].state));
      if (a[k].state) {
        EXPECT_TRUE(*a[k].state == *b[k].state);
      }
    }
  }
}

// A request cancelled while its steps overlap the host work: every token it was sent comes
// before its final event, and they are the first tokens of the same request run uncancelled.
// The step loop may run ahead of the event thread by any number of steps, so the uncancelled
// run is sized after the cancelled one has shown how many tokens it sent.
TEST(Scheduler, CancelledWhileStepsOverlap) {
  const mp::testing::VariantModel vm;
  auto run = [&](bool cancel_early, int max_tokens) {
    GatedBackend backend(make_backend(vm.model, {.kind = "cpu", .n_slots = 2, .n_threads = 1}),
                         true);
    backend.open();
    Scheduler sched(backend, vm.model->tokenizer(), {.max_queue = 4});
    CompletionRequest r;
    r.prompt = mp::testing::random_tokens(9, vm.config.vocab_size, 7);
    r.max_tokens = max_tokens;
    r.ignore_eos = true;
    r.sampling.seed = 5;
    std::vector<CompletionEvent> events;
    std::promise<void> done;
    uint64_t id = 0;
    std::promise<uint64_t> id_known;
    auto id_f = id_known.get_future().share();
    r.on_event = [&, id_f](const CompletionEvent& e) {
      events.push_back(e);
      if (cancel_early && e.token >= 0 && events.size() == 5) sched.cancel(id_f.get());
      if (e.done) done.set_value();
      return true;
    };
    id = sched.submit(std::move(r));
    id_known.set_value(id);
    done.get_future().wait();
    return events;
  };
  const auto cancelled = run(true, 1 << 20);
  ASSERT_EQ(cancelled.back().finish_reason, "cancelled");
  ASSERT_GE(cancelled.size(), 6u);
  const auto whole = run(false, int(cancelled.size()));
  ASSERT_EQ(whole.back().finish_reason, "length");
  ASSERT_LT(cancelled.size() - 1, whole.size());
  for (size_t k = 0; k + 1 < cancelled.size(); ++k) {
    EXPECT_FALSE(cancelled[k].done) << "an event after the final one";
    EXPECT_EQ(cancelled[k].token, whole[k].token);
    EXPECT_EQ(cancelled[k].text, whole[k].text);
  }
}

}  // namespace
