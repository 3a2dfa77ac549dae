// Many devices over CPU backends. Replicas (BackendOptions::devices): a backend over N CPU
// backends must give what one backend gives for the same batches, spread new sequences over the
// devices, and move states between them; with the reference products (a dot product per output,
// whatever the batch) the results are bit-identical, with oneDNN's sgemm (which may block a
// device's smaller batch otherwise) within 1e-5. Tensor parallelism (tensor_parallel): N shards
// over in-process communicators against the plain backend; N = 1 runs the same arithmetic
// (bit-identical), N > 1 sums each layer's attention and FFN outputs in parts (fp32: 1e-5).
#include <gtest/gtest.h>

#include <condition_variable>
#include <future>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include "backend_cpu.h"
#include "backend_replicas.h"
#include "device_threads.h"
#include "forwarding_backend.h"
#include "model_fixture.h"
#include "ops_cpu.h"

namespace {

using namespace mp;
using namespace mp::testing;

// A model variant and how the replicas under test run it.
struct ReplicasCase {
  ModelVariant model;
  bool reference_products = true;  // bit-identical results expected
};

class Replicas : public ::testing::TestWithParam<ReplicasCase> {
 protected:
  void SetUp() override {
    if (GetParam().reference_products) cpu::set_products(cpu::Products::Reference);
    one = make_backend(vm.model, {.kind = "cpu", .n_slots = 6, .n_threads = 1});
    spread =
        make_backend(vm.model, {.kind = "cpu", .n_slots = 2, .n_threads = 1, .devices = {0, 1, 2}});
  }
  void TearDown() override { cpu::set_products(products_); }
  // Expects bit-identical logits with the reference products, else within 1e-5.
  void expect_same(const std::vector<float>& got, const std::vector<float>& want,
                   const std::string& what) const {
    if (GetParam().reference_products) {
      EXPECT_TRUE(got == want) << what;
    } else {
      EXPECT_LT(rel_err(got, want), 1e-5) << what;
    }
  }
  // Allocates n slots on both; they get the same numbers (0, 1, ...).
  std::vector<int> alloc_both(int n) {
    std::vector<int> slots;
    for (int i = 0; i < n; ++i) {
      slots.push_back(one->alloc_slot());
      EXPECT_EQ(spread->alloc_slot(), slots.back());
    }
    return slots;
  }
  const cpu::Products products_ = cpu::active_products();
  const VariantModel vm{GetParam().model, 7};
  std::unique_ptr<Backend> one, spread;
};

TEST_P(Replicas, MixedBatchesGiveTheSingleBackendsLogitsExactly) {
  ASSERT_EQ(spread->n_slots(), 6);
  const int V = vm.config.vocab_size;
  const std::vector<int> slots = alloc_both(5);
  // Step 1: prompts of different lengths (some with every row's logits); step 2 and on: decode
  // steps of one token mixed with further prompt chunks, in an order that is not by slot.
  std::vector<std::vector<int>> toks;
  for (int i = 0; i < 40; ++i) toks.push_back(random_tokens(1 + (i * 37) % 90, V, 100 + i));
  int next = 0;
  for (int step = 0; step < 6; ++step) {
    std::vector<SeqChunk> batch;
    for (int k = 0; k < 5; ++k) {
      const int s = slots[(k * 3 + step) % 5];  // a different order each step
      const auto& t = toks[next++ % toks.size()];
      const size_t n = (step > 0 && (k + step) % 2) ? 1 : t.size();
      batch.push_back({s, std::span<const int>(t).first(n), (k + step) % 3 == 0});
    }
    const std::vector<float> want = one->forward(batch);
    const std::vector<float> got = spread->forward(batch);
    ASSERT_EQ(got.size(), want.size()) << step;
    expect_same(got, want, "step " + std::to_string(step));
    for (int s : slots) EXPECT_EQ(spread->slot_pos(s), one->slot_pos(s));
  }
  // forward_sample: the same tokens, log-probabilities and alternatives, in the caller's order.
  SamplingParams sp;
  sp.seed = 3;
  std::vector<SeqChunk> batch;
  std::vector<SampleSpec> specs;
  const auto more = random_tokens(9, V, 99);
  for (int k = 0; k < 5; ++k) {
    batch.push_back({slots[4 - k], std::span<const int>(more).first(k % 2 ? 1 : 9), false});
    specs.push_back({k == 2 ? nullptr : &sp, {}, 0.1 + 0.2 * k, k});
  }
  const auto want = one->forward_sample(batch, specs);
  const auto got = spread->forward_sample(batch, specs);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].token, want[i].token) << i;
    EXPECT_NEAR(got[i].logprob, want[i].logprob, GetParam().reference_products ? 0 : 1e-4) << i;
    ASSERT_EQ(got[i].top_logprobs.size(), want[i].top_logprobs.size());
    for (size_t j = 0; j < got[i].top_logprobs.size(); ++j) {
      EXPECT_EQ(got[i].top_logprobs[j].first, want[i].top_logprobs[j].first) << i;
    }
  }
  EXPECT_EQ(want[2].token, -1);
  EXPECT_GE(want[0].token, 0);
}

TEST_P(Replicas, StatesMoveBetweenDevices) {
  const int V = vm.config.vocab_size;
  const std::vector<int> slots = alloc_both(6);  // devices 0 1 2 0 1 2
  const auto prefix = random_tokens(150, V, 5), rest = random_tokens(40, V, 6);
  SeqChunk pc{slots[0], prefix, false};
  one->forward({&pc, 1});
  spread->forward({&pc, 1});
  // slot 0 -> 1 crosses devices (through save/load), 0 -> 3 stays on device 0.
  for (int dst : {slots[1], slots[3]}) {
    one->copy_slot(slots[0], dst);
    spread->copy_slot(slots[0], dst);
    EXPECT_EQ(spread->slot_pos(dst), 150);
    EXPECT_EQ(spread->save_slot(dst), one->save_slot(dst));  // the very same state
    SeqChunk c{dst, rest, true};
    const auto want = one->forward({&c, 1});
    expect_same(spread->forward({&c, 1}), want, "slot " + std::to_string(dst));
  }
  // The source is untouched: it continues as the single backend's does.
  SeqChunk c{slots[0], rest, false};
  const auto want = one->forward({&c, 1});
  expect_same(spread->forward({&c, 1}), want, "source");
}

INSTANTIATE_TEST_SUITE_P(Models, Replicas,
                         ::testing::Values(ReplicasCase{{.name = "groupedconv"}},
                                           ReplicasCase{{.name = "conv", .ds = Downsampling::Conv}},
                                           ReplicasCase{
                                               {.name = "avgpool", .ds = Downsampling::AvgPool}},
                                           ReplicasCase{{.name = "exact", .fma = false}},
                                           ReplicasCase{{.name = "groupedconv_onednn"}, false}),
                         [](const auto& info) { return std::string(info.param.model.name); });

// Every wanted job runs once per round, on its own thread, and the caller sees its writes and its
// failure; polling (GPU) and sleeping (CPU) threads alike.
TEST(DeviceThreads, EachRoundRunsEveryWantedJobOnceAndReportsItsFailure) {
  for (auto spin : {std::chrono::microseconds{0}, DeviceThreads::kGpuSpin}) {
    DeviceThreads threads(3, spin);
    std::mt19937 rng(11);
    std::vector<int> runs(3, 0), expected(3, 0);
    std::vector<std::thread::id> first(3);
    // Fewer rounds polling: four polling threads share this machine's cores.
    for (int round = 0; round < (spin.count() ? 200 : 2000); ++round) {
      std::vector<bool> want(3);
      for (size_t i = 0; i < 3; ++i) expected[i] += (want[i] = rng() % 3 != 0);
      threads.run(want, [&](size_t i) {
        ++runs[i];
        if (first[i] == std::thread::id()) first[i] = std::this_thread::get_id();
        EXPECT_EQ(first[i], std::this_thread::get_id()) << "device " << i << " changed thread";
      });
      ASSERT_EQ(runs, expected) << "round " << round;
    }
    EXPECT_NE(first[0], first[1]);
    EXPECT_NE(first[1], first[2]);
    EXPECT_THROW(threads.run({true, true, true},
                             [](size_t i) {
                               if (i == 1) throw Error("device 1 failed");
                             }),
                 Error);
    threads.run({true, true, true}, [&](size_t i) { ++runs[i]; });  // still usable after a failure
    EXPECT_EQ(runs[2], expected[2] + 1);
  }
}

TEST(ReplicaSlots, NewSequencesGoToTheLeastLoadedDevice) {
  const VariantModel vm;
  auto b = make_backend(vm.model, {.kind = "cpu", .n_slots = 3, .n_threads = 1, .devices = {4, 7}});
  ASSERT_EQ(b->n_slots(), 6);
  std::vector<int> got;
  for (int i = 0; i < 4; ++i) got.push_back(b->alloc_slot());
  EXPECT_EQ(got, (std::vector<int>{0, 1, 2, 3}));  // devices 0, 1, 0, 1 (slot % 2)
  // Device 0 finishes both of its sequences: the next two go there, the third too (a tie goes to
  // the lower device), then device 1 gets its last slot.
  b->free_slot(0);
  b->free_slot(2);
  EXPECT_EQ(b->alloc_slot() % 2, 0);
  EXPECT_EQ(b->alloc_slot() % 2, 0);
  EXPECT_EQ(b->alloc_slot() % 2, 0);
  EXPECT_EQ(b->alloc_slot() % 2, 1);
  EXPECT_EQ(b->alloc_slot(), -1);
  const auto stats = b->device_stats();
  ASSERT_EQ(stats.size(), 2u);
  EXPECT_EQ(stats[0].device, "cpu:4");
  EXPECT_EQ(stats[1].device, "cpu:7");
  EXPECT_EQ(stats[0].slots, 3);
  EXPECT_EQ(stats[0].slots_in_use + stats[1].slots_in_use, 6);
  EXPECT_EQ(b->n_devices(), 2);
  EXPECT_EQ(b->slot_device(3), 1);
  EXPECT_EQ(b->slot_device(4), 0);
  EXPECT_THROW(b->slot_device(6), Error);
  // Work is counted where it ran.
  const auto t = random_tokens(20, vm.config.vocab_size, 1);
  SeqChunk c{1, t, false};  // device 1
  b->forward({&c, 1});
  EXPECT_EQ(b->device_stats()[1].tokens, 20u);
  EXPECT_EQ(b->device_stats()[1].steps, 1u);
  EXPECT_EQ(b->device_stats()[0].tokens, 0u);
  EXPECT_GT(b->device_stats()[1].busy_seconds, 0);
  // A freed slot is fresh when handed out again.
  b->free_slot(1);
  EXPECT_EQ(b->alloc_slot(), 1);
  EXPECT_EQ(b->slot_pos(1), 0);
}

TEST(ReplicaSlots, BadBatchesAreRefusedBeforeAnyDeviceRuns) {
  const VariantModel vm;
  auto b = make_backend(vm.model, {.kind = "cpu", .n_slots = 2, .n_threads = 1, .devices = {0, 1}});
  const int s0 = b->alloc_slot(), s1 = b->alloc_slot();
  const auto t = random_tokens(10, vm.config.vocab_size, 1);
  std::vector<int> bad = t;
  bad[3] = vm.config.vocab_size;
  auto refused = [&](std::vector<SeqChunk> batch, const std::string& what) {
    try {
      b->forward(batch);
      ADD_FAILURE() << "accepted: " << what;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
    EXPECT_EQ(b->slot_pos(s0), 0);
    EXPECT_EQ(b->slot_pos(s1), 0);
  };
  refused({{s0, t, false}, {s1, bad, false}}, "outside the vocabulary");
  refused({{s0, t, false}, {3, t, false}}, "slot 3 is not allocated");
  refused({{s1, t, false}, {s1, t, false}}, "appears twice");
  EXPECT_THROW(b->copy_slot(s0, 9), Error);
  EXPECT_THROW(make_backend(vm.model, {.kind = "cpu", .n_slots = 2, .devices = {1, 1}}), Error);
}

TEST(ReplicaSlots, DeviceListsAreParsedAndChecked) {
  EXPECT_EQ(parse_devices("0,1,3", "cpu"), (std::vector<int>{0, 1, 3}));
  EXPECT_EQ(parse_devices("2", "cpu"), (std::vector<int>{2}));
  if (cuda_device_count() == 0) {
    EXPECT_EQ(parse_devices("all", "auto"), (std::vector<int>{0}));
  } else {
    EXPECT_EQ(parse_devices("all", "auto").size(), size_t(cuda_device_count()));
  }
  for (const char* bad : {"", "0,", ",1", "0,0", "a", "-1", "1;2", "9999999"})
    EXPECT_THROW(parse_devices(bad, "cpu"), Error) << bad;
}

// The scheduler tests compare tokens with one device's, so the arithmetic must not depend on
// how sequences are batched or prompts chunked: the reference products (a dot product per output,
// whatever the batch), and a prompt budget that reads every prompt in one chunk (a lane's share
// of it too).
struct ReferenceProducts {
  ReferenceProducts() { cpu::set_products(cpu::Products::Reference); }
  ~ReferenceProducts() { cpu::set_products(before); }
  const cpu::Products before = cpu::active_products();
};
constexpr int kWholePrompts = 1 << 16;

// What a request streamed: its tokens and how it ended.
struct Stream {
  std::vector<int> tokens;
  std::string reason;
  int cached_tokens = 0;
  std::shared_ptr<const std::vector<uint8_t>> state;
  int unfed_token = -1;
};

// Submits the request; the future holds what it streamed once its final event came.
std::future<Stream> submit(Scheduler& sched, CompletionRequest req) {
  auto got = std::make_shared<Stream>();
  auto done = std::make_shared<std::promise<Stream>>();
  std::future<Stream> f = done->get_future();
  req.on_event = [got, done](const CompletionEvent& e) {
    if (e.token >= 0) got->tokens.push_back(e.token);
    if (e.done) {
      got->reason = e.finish_reason;
      got->cached_tokens = e.cached_tokens;
      got->state = e.state;
      got->unfed_token = e.unfed_token;
      done->set_value(*got);
    }
    return true;
  };
  sched.submit(std::move(req));
  return f;
}

// Request r of the scheduler tests: prompts of different lengths, greedy and sampled.
CompletionRequest request(int r, int vocab, int max_tokens = 12) {
  CompletionRequest req;
  req.prompt = random_tokens(5 + 23 * r, vocab, r);
  req.max_tokens = max_tokens;
  req.ignore_eos = true;
  req.sampling.temperature = r % 2 ? 0.0f : 0.9f;
  req.sampling.seed = r;
  return req;
}

// The scheduler over replicas, one step loop per device: the same completions as over one
// backend, the requests spread over every device.
TEST(ReplicaSlots, SchedulerCompletionsMatchOneBackend) {
  const ReferenceProducts exact;
  const VariantModel vm;
  const int V = vm.config.vocab_size;
  auto run = [&](std::vector<int> devices) {
    auto b =
        make_backend(vm.model, {.kind = "cpu", .n_slots = 4, .n_threads = 1, .devices = devices});
    Scheduler sched(*b, vm.model->tokenizer(),
                    {.max_queue = 64, .max_prefill_per_step = kWholePrompts});
    std::vector<std::future<Stream>> done;
    for (int r = 0; r < 16; ++r) done.push_back(submit(sched, request(r, V)));
    std::vector<std::vector<int>> out;
    for (auto& f : done) {
      Stream s = f.get();
      EXPECT_EQ(s.reason, "length");
      out.push_back(s.tokens);
    }
    EXPECT_EQ(sched.stats().slots_in_use, 0);
    EXPECT_EQ(sched.stats().requests_done, 16u);
    return std::make_pair(out, b->device_stats());
  };
  const auto [want, none] = run({});
  const auto [got, stats] = run({0, 1, 2});
  EXPECT_TRUE(none.empty());
  EXPECT_EQ(got, want);
  for (const auto& v : got) EXPECT_EQ(v.size(), 12u);
  ASSERT_EQ(stats.size(), 3u);
  for (const DeviceStats& d : stats) {  // every device ran sequences, in steps of its own
    EXPECT_GT(d.tokens, 0u) << d.device;
    EXPECT_GE(d.steps, 12u) << d.device;
    EXPECT_EQ(d.slots_in_use, 0) << d.device;
  }
}

// Prompts longer than a step's prefill budget, their chunks in the same steps as other
// sequences' decoding, over two replicas: every greedy token is the best (to 1e-2) of one
// backend's logits for the whole text at once (the CPU twin of the CUDA test).
TEST(ReplicaSlots, ChunkedPrefillsBesideDecodingGenerateWhatOneBackendPredicts) {
  const ReferenceProducts exact;
  const VariantModel vm({.dtype = DType::BF16}, 14);
  const Config& c = vm.config;
  auto spread = make_backend(vm.model, {.kind = "cpu", .n_slots = 4, .n_threads = 1,
                                        .devices = {0, 1}});
  const int n = 8, max_tokens = 24;
  std::vector<std::vector<int>> prompts(n), got(n);
  {
    Scheduler sched(*spread, vm.model->tokenizer(), {.max_prefill_per_step = 128});
    std::vector<std::future<Stream>> done;
    for (int r = 0; r < n; ++r) {
      prompts[r] = random_tokens(3 + 41 * r, c.vocab_size, 60 + r);
      CompletionRequest req;
      req.prompt = prompts[r];
      req.max_tokens = max_tokens;
      req.ignore_eos = true;
      req.sampling.temperature = 0;
      done.push_back(submit(sched, std::move(req)));
    }
    for (int r = 0; r < n; ++r) got[r] = done[r].get().tokens;
  }
  auto one = make_backend(vm.model, {.kind = "cpu", .n_slots = 1, .n_threads = 1});
  for (int r = 0; r < n; ++r) {
    ASSERT_EQ(got[r].size(), size_t(max_tokens)) << r;
    const std::vector<float> below = greedy_shortfalls(*one, prompts[r], got[r]);
    for (int t = 0; t < max_tokens; ++t)
      EXPECT_LE(below[t], 1e-2f) << "request " << r << " token " << t;
  }
}

// A CPU backend whose forward calls wait while its gate is closed: a device as slow as a test
// wants, its completed calls counted.
class GatedBackend final : public mp::testing::ForwardingBackend {
 public:
  using ForwardingBackend::ForwardingBackend;
  void set_open(bool open) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      open_ = open;
    }
    cv_.notify_all();
  }
  int calls() const { return calls_.load(); }
  std::vector<float> forward(std::span<const SeqChunk> chunks) override {
    wait();
    auto out = inner().forward(chunks);
    ++calls_;
    return out;
  }
  std::vector<SampledToken> forward_sample(std::span<const SeqChunk> chunks,
                                           std::span<const SampleSpec> specs) override {
    wait();
    auto out = inner().forward_sample(chunks, specs);
    ++calls_;
    return out;
  }

 private:
  void wait() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return open_; });
  }
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = true;
  std::atomic<int> calls_{0};
};

// Replicas over gated CPU backends, and the same model on one plain backend.
class StepLoops : public ::testing::Test, protected VariantModel {
 protected:
  StepLoops() : VariantModel({}, 9) {}
  // Replicas of `n` gated devices of `slots` slots each.
  std::unique_ptr<Backend> replicas(int n, int slots) {
    std::vector<std::unique_ptr<Backend>> parts;
    std::vector<std::string> names;
    gates.clear();
    for (int d = 0; d < n; ++d) {
      auto g = std::make_unique<GatedBackend>(make_cpu_backend(model, slots, 1, {}));
      gates.push_back(g.get());
      parts.push_back(std::move(g));
      names.push_back("cpu:" + std::to_string(d));
    }
    return make_replica_backend(std::move(parts), std::move(names), {});
  }
  // What one device streams for the last of the requests, run one after the other.
  Stream alone(std::vector<CompletionRequest> reqs,
               SchedulerOptions o = {.max_prefill_per_step = kWholePrompts}) {
    auto b = make_backend(model, {.kind = "cpu", .n_slots = 4, .n_threads = 1});
    Scheduler sched(*b, model->tokenizer(), o);
    Stream last;
    for (auto& r : reqs) last = submit(sched, std::move(r)).get();
    return last;
  }
  Stream alone(CompletionRequest req) { return alone(std::vector{std::move(req)}); }
  const ReferenceProducts exact;
  // Waits (up to a minute: a failing test must not hang) for the future.
  static Stream within_a_minute(std::future<Stream>& f) {
    if (f.wait_for(std::chrono::seconds(60)) != std::future_status::ready) {
      ADD_FAILURE() << "no final event within a minute";
      return {};
    }
    return f.get();
  }
  const int V = config.vocab_size;
  std::vector<GatedBackend*> gates;  // of the last replicas() made
};

// Device 1 is stuck in its first step; device 0's streams run to their end meanwhile (counted in
// steps, not time), and device 1's streams then end as one device alone makes them.
TEST_F(StepLoops, AStuckDeviceDoesNotHoldUpTheOthers) {
  auto b = replicas(2, 2);
  Scheduler sched(*b, model->tokenizer(), {.max_prefill_per_step = kWholePrompts});
  gates[1]->set_open(false);
  gates[0]->set_open(false);  // until all four are placed: 0, 1, 0, 1
  std::vector<std::future<Stream>> f;
  for (int r = 0; r < 4; ++r) f.push_back(submit(sched, request(r, V)));
  gates[0]->set_open(true);
  for (int r : {0, 2}) {
    const Stream s = within_a_minute(f[r]);
    EXPECT_EQ(s.tokens, alone(request(r, V)).tokens) << r;
  }
  EXPECT_GE(gates[0]->calls(), 12);  // a step a token at least
  EXPECT_EQ(gates[1]->calls(), 0);   // still in its first step
  for (int r : {1, 3})
    EXPECT_EQ(f[r].wait_for(std::chrono::seconds(0)), std::future_status::timeout) << r;
  gates[1]->set_open(true);
  for (int r : {1, 3}) {
    const Stream s = within_a_minute(f[r]);
    EXPECT_EQ(s.tokens, alone(request(r, V)).tokens) << r;
  }
  EXPECT_GE(gates[1]->calls(), 12);
}

// A queued request, one on a running device and one on a stuck device are each cancelled by the
// loop that holds it; the others stream on unaffected and every slot comes back.
TEST_F(StepLoops, CancellationReachesTheLoopHoldingTheRequest) {
  auto b = replicas(2, 2);
  Scheduler sched(*b, model->tokenizer(), {.max_prefill_per_step = kWholePrompts});
  gates[0]->set_open(false);
  gates[1]->set_open(false);
  std::vector<std::future<Stream>> f;
  std::vector<uint64_t> ids;
  for (int r = 0; r < 5; ++r) {  // 0 and 2 on device 0, 1 and 3 on device 1, 4 queued
    auto req = request(r, V, r < 2 ? 100000 : 12);
    f.push_back(submit(sched, std::move(req)));
  }
  // Request ids count from 1 in submission order.
  sched.cancel(5);
  sched.cancel(2);  // request 1, on the stuck device 1
  gates[0]->set_open(true);
  const Stream queued = within_a_minute(f[4]);
  EXPECT_EQ(queued.reason, "cancelled");
  EXPECT_TRUE(queued.tokens.empty());
  EXPECT_EQ(within_a_minute(f[2]).tokens, alone(request(2, V)).tokens);
  sched.cancel(1);  // request 0, generating on device 0
  EXPECT_EQ(within_a_minute(f[0]).reason, "cancelled");
  EXPECT_EQ(gates[1]->calls(), 0);
  gates[1]->set_open(true);
  const Stream stuck = within_a_minute(f[1]);
  EXPECT_EQ(stuck.reason, "cancelled");
  EXPECT_LE(stuck.tokens.size(), 1u);  // at most the token of the step it was stuck in
  EXPECT_EQ(within_a_minute(f[3]).tokens, alone(request(3, V)).tokens);
  const SchedulerStats st = sched.stats();
  EXPECT_EQ(st.requests_done, 5u);
  EXPECT_EQ(st.slots_in_use, 0);
  EXPECT_EQ(st.queued, 0);
  for (const DeviceStats& d : st.devices) EXPECT_EQ(d.slots_in_use, 0) << d.device;
}

// A session's state made on device 0 continues on device 1, and a prompt's prefix cached from
// device 0 is restored on device 1: the tokens one device alone gives. A long request keeps
// device 0 the busier one, so the later requests go to device 1.
TEST_F(StepLoops, SessionsAndCachedPrefixesMoveBetweenDevices) {
  const SchedulerOptions o{.max_prefill_per_step = kWholePrompts,
                           .prefix_block = 16,
                           .prefix_cache_slots = 2,
                           .prefix_cache_bytes = size_t(64) << 20};
  auto b = replicas(2, 2);  // a cache slot and a request slot on each device
  Scheduler sched(*b, model->tokenizer(), o);
  // The first turn (on device 0: a tie goes to the lower device), its state kept.
  CompletionRequest first = request(3, V);
  first.keep_state = true;
  auto ff = submit(sched, first);
  const Stream turn = within_a_minute(ff);
  ASSERT_TRUE(turn.state);
  const uint64_t device1_before = b->device_stats()[1].tokens;
  EXPECT_EQ(device1_before, 0u);
  auto filler = submit(sched, request(0, V, 100000));  // device 0 from now on
  // The second turn continues the first: the unfed token, then new text, on device 1.
  auto second = [&] {
    CompletionRequest r = request(5, V);
    r.prompt.insert(r.prompt.begin(), turn.unfed_token);
    r.start_state = turn.state;
    return r;
  };
  auto fs = submit(sched, second());
  const Stream continued = within_a_minute(fs);
  EXPECT_EQ(continued.tokens, alone(second()).tokens);
  EXPECT_GT(b->device_stats()[1].tokens, device1_before);
  // The first turn's prompt with another question: its cached prefix restored on device 1.
  CompletionRequest question = request(3, V);
  const auto more = random_tokens(9, V, 77);
  question.prompt.insert(question.prompt.end(), more.begin(), more.end());
  // One device alone, with the same cache: the first prompt, then the question.
  const Stream want = alone({first, question}, o);
  auto fq = submit(sched, std::move(question));
  const Stream asked = within_a_minute(fq);
  EXPECT_EQ(asked.cached_tokens, 74);  // the whole first prompt
  EXPECT_EQ(want.cached_tokens, 74);
  EXPECT_EQ(asked.tokens, want.tokens);
  EXPECT_EQ(b->device_stats()[0].slots_in_use, 2);  // the cache slot and the filler
  sched.cancel(2);
  EXPECT_EQ(within_a_minute(filler).reason, "cancelled");
}

// A model variant split over `shards`.
struct TensorParallelCase {
  ModelVariant model;
  int shards;
};

class TensorParallel : public ::testing::TestWithParam<TensorParallelCase> {};

TEST_P(TensorParallel, LogitsAndStatesMatchThePlainBackend) {
  const int shards = GetParam().shards;
  const VariantModel vm(GetParam().model, 21);
  const Config& c = vm.config;
  auto plain = make_backend(vm.model, {.kind = "cpu", .n_slots = 3, .n_threads = 1});
  auto tp = make_backend(vm.model,
                         {.kind = "cpu", .n_slots = 3, .n_threads = 1, .tensor_parallel = shards});
  EXPECT_NE(tp->name().find("tensor parallel x" + std::to_string(shards)), std::string::npos);
  const double tol = shards == 1 ? 0 : 1e-5;
  auto expect_close = [&](const std::vector<float>& got, const std::vector<float>& want,
                          const std::string& what) {
    if (tol == 0) {
      EXPECT_TRUE(got == want) << what;
    } else {
      EXPECT_LT(rel_err(got, want), tol) << what;
    }
  };
  // A prompt past the trained length, in chunks and one by one.
  const auto tokens = random_tokens(2 * int(c.n_ctx_train) + 9, c.vocab_size, 3);
  for (int chunk : {int(tokens.size()), 7, 1})
    expect_close(logits_in_chunks(*tp, tokens, chunk), logits_in_chunks(*plain, tokens, chunk),
                 "chunk " + std::to_string(chunk));
  // A batch of a prompt and decode steps; then the states cross between the two backends.
  std::vector<int> ps, ts;
  for (int i = 0; i < 3; ++i) {
    ps.push_back(plain->alloc_slot());
    ts.push_back(tp->alloc_slot());
  }
  const auto a = random_tokens(70, c.vocab_size, 4), b = random_tokens(1, c.vocab_size, 5),
             d = random_tokens(33, c.vocab_size, 6);
  for (int step = 0; step < 2; ++step) {
    std::vector<SeqChunk> pb = {{ps[0], a, true}, {ps[1], b, false}, {ps[2], d, false}};
    std::vector<SeqChunk> tb = {{ts[0], a, true}, {ts[1], b, false}, {ts[2], d, false}};
    expect_close(tp->forward(tb), plain->forward(pb), "batch step " + std::to_string(step));
  }
  for (int i = 0; i < 3; ++i) EXPECT_EQ(tp->slot_pos(ts[i]), plain->slot_pos(ps[i]));
  // The tensor-parallel state is the plain format: saved from one, continued on the other.
  const auto tp_state = tp->save_slot(ts[0]);
  if (tol == 0) {
    EXPECT_EQ(tp_state, plain->save_slot(ps[0]));
  }
  plain->load_slot(ps[1], tp_state);
  tp->load_slot(ts[1], plain->save_slot(ps[0]));
  tp->copy_slot(ts[0], ts[2]);
  plain->copy_slot(ps[0], ps[2]);
  const auto more = random_tokens(20, c.vocab_size, 7);
  std::vector<SeqChunk> pb, tb;
  for (int i = 0; i < 3; ++i) {
    pb.push_back({ps[i], more, true});
    tb.push_back({ts[i], more, true});
  }
  const auto want = plain->forward(pb);
  expect_close(tp->forward(tb), want, "after moving states");
  // All three continue the same sequence: the same logits three times.
  const size_t n = want.size() / 3;
  EXPECT_LT(rel_err({want.begin() + n, want.begin() + 2 * n}, {want.begin(), want.begin() + n}),
            1e-5);
  // The shards hold the plain cache between them, plus each its own group bookkeeping.
  EXPECT_GE(tp->slot_bytes(ts[0]), plain->slot_bytes(ps[0]));
  EXPECT_LT(tp->slot_bytes(ts[0]), plain->slot_bytes(ps[0]) * 1.05);
}

INSTANTIATE_TEST_SUITE_P(
    Models, TensorParallel,
    ::testing::Values(
        TensorParallelCase{{.name = "groupedconv_tp1"}, 1},
        TensorParallelCase{{.name = "groupedconv_tp2"}, 2},
        TensorParallelCase{{.name = "conv_tp2", .ds = Downsampling::Conv}, 2},
        TensorParallelCase{{.name = "avgpool_tp2", .ds = Downsampling::AvgPool}, 2},
        TensorParallelCase{{.name = "avgpool_mha_tp4", .ds = Downsampling::AvgPool, .kv_heads = 4},
                           4},
        TensorParallelCase{{.name = "exact_tp2", .fma = false}, 2},
        TensorParallelCase{{.name = "groupedconv_bf16_tp2", .dtype = DType::BF16}, 2}),
    [](const auto& info) { return std::string(info.param.model.name); });

TEST(TensorParallelOptions, WhatDoesNotSplitIsRefused) {
  const VariantModel vm;  // 4 heads, 2 KV heads, 48 FFN
  auto refused = [&](BackendOptions o, const std::string& what) {
    try {
      make_backend(vm.model, o);
      ADD_FAILURE() << "accepted: " << what;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  refused({.kind = "cpu", .tensor_parallel = 4}, "KV heads (2) do not divide");
  refused({.kind = "cpu", .tensor_parallel = 3}, "attention heads (4) do not divide");
  refused({.kind = "cpu", .tensor_parallel = -1}, "tensor_parallel must be");
  if (cuda_device_count() == 0) {
    refused({.kind = "cuda", .tensor_parallel = 2}, "backend 'cuda' asked for");
  }
  refused({.kind = "cpu", .devices = {0, 1, 2}, .tensor_parallel = 2}, "give 2 devices");
  // A bad batch is refused before any shard runs (none is left waiting for the others).
  auto tp = make_backend(vm.model, {.kind = "cpu", .n_slots = 2, .tensor_parallel = 2});
  const int s = tp->alloc_slot();
  const auto t = random_tokens(5, 400, 1);
  SeqChunk bad[2] = {{s, t, false}, {1, t, false}};
  EXPECT_THROW(tp->forward(bad), Error);
  EXPECT_EQ(tp->slot_pos(s), 0);
  SeqChunk good{s, t, false};
  EXPECT_EQ(tp->forward({&good, 1}).size(), 400u);
}

}  // namespace
