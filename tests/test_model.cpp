// The whole model on the CPU backend: chunked prefill, token-by-token decode, batching, and
// state save/restore/fork all give the same logits.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <thread>

#include <xmmintrin.h>

#include "model_fixture.h"
#include "ops_cpu.h"
#include "sampling.h"

namespace {

using namespace mp;
using mp::testing::logits_in_chunks;
using mp::testing::ModelVariant;
using mp::testing::random_tokens;
using mp::testing::rel_err;
using mp::testing::VariantModel;

// Token by token, as decode does: only the last row each step.
std::vector<float> logits_decoding(Backend& b, const std::vector<int>& tokens) {
  const int slot = b.alloc_slot();
  std::vector<float> all;
  for (size_t i = 0; i < tokens.size(); ++i) {
    SeqChunk c{slot, std::span<const int>(tokens).subspan(i, 1), false};
    const auto l = b.forward({&c, 1});
    all.insert(all.end(), l.begin(), l.end());
  }
  b.free_slot(slot);
  return all;
}

class ChunkInvariance : public ::testing::TestWithParam<ModelVariant> {};

TEST_P(ChunkInvariance, PrefillChunksAndDecodeAgreePastTrainedLength) {
  const VariantModel vm(GetParam());
  const Config& c = vm.config;
  ASSERT_EQ(vm.model->config().fma_rotary_summaries, GetParam().rotary);
  auto b = make_backend(vm.model, {.kind = "cpu", .n_slots = 2, .n_threads = 2});
  const int m = c.fma_block_size;
  const auto tokens = random_tokens(3 * static_cast<int>(c.n_ctx_train) + 5, c.vocab_size, 11);
  const auto ref = logits_in_chunks(*b, tokens, static_cast<int>(tokens.size()));
  for (int chunk : {1, 3, m, 7 * m})
    EXPECT_LT(rel_err(logits_in_chunks(*b, tokens, chunk), ref), 1e-5) << chunk;
  EXPECT_LT(rel_err(logits_decoding(*b, tokens), ref), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(
    Models, ChunkInvariance,
    ::testing::Values(ModelVariant{.name = "groupedconv"},
                      ModelVariant{
                          .name = "conv", .ds = Downsampling::Conv, .kv_heads = 1, .tie = true},
                      ModelVariant{.name = "avgpool", .ds = Downsampling::AvgPool, .kv_heads = 4},
                      ModelVariant{.name = "groupedconv_bf16", .dtype = DType::BF16},
                      // Q8_0 where rows are whole blocks (all but ffn_down's 48: bf16)
                      ModelVariant{.name = "groupedconv_q8_0", .tie = true, .dtype = DType::Q8_0},
                      ModelVariant{.name = "exact", .fma = false, .tie = true},
                      ModelVariant{.name = "groupedconv_rotary", .rotary = true},
                      ModelVariant{.name = "groupedconv_rotary_bf16",
                                   .kv_heads = 1,
                                   .tie = true,
                                   .rotary = true,
                                   .dtype = DType::BF16},
                      ModelVariant{.name = "groupedconv_ranks_1_4", .ranks = {1, 4}},
                      ModelVariant{.name = "avgpool_rotary_ranks_4_2",
                                   .ds = Downsampling::AvgPool,
                                   .rotary = true,
                                   .ranks = {4, 2}}),
    [](const auto& info) { return std::string(info.param.name); });

// The whole sequence after k other tokens, through the engine (RoPE and the hierarchy move
// together): with k a multiple of n/2, the hierarchy's period, layer l's outputs do not change
// from position l n/2 on, where no window of layers 1..l reaches before the sequence (one layer:
// test_fma.cpp's SequenceShift); so the logits from n_layers n/2 on do not, with rotary or
// avgpool summaries. Per-channel groupedconv summaries move with k.
class ModelSequenceShift : public ::testing::TestWithParam<ModelVariant> {};

TEST_P(ModelSequenceShift, LogitsBeyondTheLayersReachDoNotChange) {
  const ModelVariant& v = GetParam();
  const VariantModel vm(v);
  const Config& c = vm.config;
  auto b = make_backend(vm.model, {.kind = "cpu", .n_slots = 1, .n_threads = 2});
  const int half = static_cast<int>(c.n_ctx_train) / 2;
  const double worst = mp::testing::largest_change_under_shifts(
      *b, random_tokens(6 * half + 5, c.vocab_size, 11), c.n_layers * half, c.vocab_size,
      {half, 3 * half, 32 * half}, {7 * c.fma_block_size});
  if (v.rotary || v.ds == Downsampling::AvgPool) {
    EXPECT_LT(worst, 1e-5);
  } else {
    EXPECT_GT(worst, 1e-2);
  }
  std::printf("%s: largest relative change of the logits over the shifts: %.2e\n", v.name, worst);
}

INSTANTIATE_TEST_SUITE_P(
    Models, ModelSequenceShift,
    ::testing::Values(ModelVariant{.name = "groupedconv_rotary", .rotary = true},
                      ModelVariant{.name = "avgpool", .ds = Downsampling::AvgPool},
                      ModelVariant{.name = "groupedconv_per_channel"}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(State, SavedAndRestoredStateContinuesExactly) {
  const VariantModel vm;
  const Config& c = vm.config;
  auto b = make_backend(vm.model, {.kind = "cpu", .n_slots = 3, .n_threads = 2});
  const auto prefix = random_tokens(100, c.vocab_size, 1),
             rest = random_tokens(50, c.vocab_size, 2);
  const int a = b->alloc_slot();
  SeqChunk pc{a, prefix, false};
  b->forward({&pc, 1});
  save_state_file(*b, a, vm.dir / "state.bin");
  const int forked = b->alloc_slot();
  b->copy_slot(a, forked);
  SeqChunk rc{a, rest, true};
  const auto original = b->forward({&rc, 1});

  const int restored = b->alloc_slot();
  load_state_file(*b, restored, vm.dir / "state.bin");
  EXPECT_EQ(b->slot_pos(restored), 100);
  SeqChunk rc2{restored, rest, true};
  EXPECT_EQ(b->forward({&rc2, 1}), original);  // bit for bit
  SeqChunk rc3{forked, rest, true};
  EXPECT_EQ(b->forward({&rc3, 1}), original);
}

TEST(State, RefusesStateOfAnotherModelOrTruncated) {
  const VariantModel vm, other({.ranks = {4, 4}});  // ranks 2 and 4
  auto b = make_backend(vm.model, {.kind = "cpu", .n_slots = 1, .n_threads = 1});
  const int s = b->alloc_slot();
  auto bytes = b->save_slot(s);
  bytes.resize(bytes.size() - 3);
  EXPECT_THROW(b->load_slot(s, bytes), Error);
  auto b2 = make_backend(other.model, {.kind = "cpu", .n_slots = 1, .n_threads = 1});
  const int s2 = b2->alloc_slot();
  try {
    b2->load_slot(s2, b->save_slot(s));
    FAIL() << "state of another model was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("another"), std::string::npos) << e.what();
  }
}

TEST(Batch, SequencesInOneBatchMatchSeparateRuns) {
  const VariantModel vm;
  const Config& c = vm.config;
  auto b = make_backend(vm.model, {.kind = "cpu", .n_slots = 3, .n_threads = 2});
  const auto t1 = random_tokens(70, c.vocab_size, 3), t2 = random_tokens(9, c.vocab_size, 4);
  const auto r1 = logits_in_chunks(*b, t1, 70), r2 = logits_in_chunks(*b, t2, 9);
  const int s1 = b->alloc_slot(), s2 = b->alloc_slot();
  SeqChunk cs[2] = {{s1, t1, true}, {s2, t2, false}};
  const auto both = b->forward(cs);
  const size_t V = c.vocab_size;
  ASSERT_EQ(both.size(), (70 + 1) * V);
  EXPECT_LT(rel_err({both.begin(), both.begin() + 70 * V}, r1), 1e-6);
  EXPECT_LT(rel_err({both.begin() + 70 * V, both.end()}, {r2.end() - V, r2.end()}), 1e-6);
}

// Random mixed steps (prompt chunks of any length beside single tokens, sequences ending and their
// slots reused) give each sequence the logits it gets alone, a chunk a call.
TEST(Batch, MixedStepsMatchEachChunkAlone) {
  const VariantModel vm;
  auto b = make_backend(vm.model, {.kind = "cpu", .n_slots = 5, .n_threads = 2});
  for (uint64_t seed : {1, 2}) {
    const auto batched = mp::testing::mixed_schedule_logits(*b, seed, 5, 40);
    const auto alone = mp::testing::mixed_schedule_logits(*b, seed, 5, 40, true);
    ASSERT_EQ(batched.size(), alone.size());
    EXPECT_LT(rel_err(batched, alone), 1e-5) << seed;
  }
}

// One-token steps whose queries read enough keys (about 2m a head at m = 256, exact attention's
// whole context) spread their heads' attention over the threads: the same bits as one thread.
TEST(Backend, ParallelDecodeAttentionIsTheSerialOne) {
  for (const ModelVariant& v : {ModelVariant{.heads = 8, .block = 256, .n = 1024},
                                ModelVariant{.fma = false, .heads = 8}}) {
    const VariantModel vm(v, 21);
    const auto tokens = random_tokens(600, vm.config.vocab_size, 5);
    std::vector<std::vector<float>> runs;
    for (int threads : {1, 2}) {
      auto b = make_backend(vm.model, {.kind = "cpu", .n_slots = 1, .n_threads = threads});
      runs.push_back(logits_in_chunks(*b, tokens, 1));
    }
    ASSERT_EQ(runs[0].size(), runs[1].size());
    EXPECT_EQ(std::memcmp(runs[0].data(), runs[1].data(), runs[0].size() * sizeof(float)), 0)
        << (v.fma ? "m = 256" : "exact");
  }
}

TEST(Backend, RejectsBadChunks) {
  const VariantModel vm;
  const Config& c = vm.config;
  auto b = make_backend(vm.model, {.kind = "cpu", .n_slots = 1, .n_threads = 1});
  const int s = b->alloc_slot();
  EXPECT_EQ(b->alloc_slot(), -1);
  std::vector<int> bad = {5, c.vocab_size};
  SeqChunk c1{s, bad, false};
  EXPECT_THROW(b->forward({&c1, 1}), Error);
  SeqChunk c2{s + 1, std::span<const int>(bad).first(1), false};
  EXPECT_THROW(b->forward({&c2, 1}), Error);
  const SeqChunk twice[2] = {{s, std::span<const int>(bad).first(1), false},
                             {s, std::span<const int>(bad).first(1), false}};
  EXPECT_THROW(b->forward(twice), Error);
  EXPECT_EQ(b->slot_pos(s), 0);  // nothing was appended
  b->forward({twice, 1});        // what the refused batches saw of the slot is forgotten
  EXPECT_EQ(b->slot_pos(s), 1);
}

// A long generation's attention grows peaky, and its softmax weights fall below fp32's normal
// range: every thread of a CPU step flushes them to zero (their microcode assists slowed 50,000
// generated tokens by up to 27 %). A new thread inherits its creator's floating-point mode
// (POSIX), which an earlier test's step may have set: the thread clears it first.
TEST(Backend, CpuStepsFlushSubnormalsOnEveryThread) {
  const VariantModel vm;
  const Config& c = vm.config;
  auto b = make_backend(vm.model, {.kind = "cpu", .n_slots = 1, .n_threads = 2});
  int before = -1, after = -1, workers = 0, workers_flushed = 0;
  float tiny_product = -1;
  std::thread([&] {
    _mm_setcsr(_mm_getcsr() & ~0x8040u);  // FTZ and DAZ off
    before = cpu::subnormals_flushed_in_this_thread();
    const auto tokens = random_tokens(20, c.vocab_size, 3);
    SeqChunk chunk{b->alloc_slot(), tokens, false};
    b->forward({&chunk, 1});
    after = cpu::subnormals_flushed_in_this_thread();
    volatile float tiny = 3e-20f;
    tiny_product = tiny * tiny;  // 9e-40: subnormal unless flushed
#pragma omp parallel num_threads(2) reduction(+ : workers, workers_flushed)
    {
      ++workers;
      workers_flushed += cpu::subnormals_flushed_in_this_thread();
    }
  }).join();
  EXPECT_EQ(before, 0);
  EXPECT_EQ(after, 1);
  EXPECT_EQ(tiny_product, 0.0f);
  EXPECT_EQ(workers, 2);
  EXPECT_EQ(workers_flushed, 2);
}

// forward_sample (the host default the CPU backend uses): each chunk's token is the sampler's
// choice on the logits forward() gives, with its log-probability; rows without parameters get
// none; malformed calls are refused before anything runs.
TEST(Backend, ForwardSampleIsTheSamplerOnForwardsLogits) {
  const VariantModel vm;
  const Config& c = vm.config;
  auto b = make_backend(vm.model, {.kind = "cpu", .n_slots = 4, .n_threads = 2});
  const auto t1 = random_tokens(30, c.vocab_size, 5), t2 = random_tokens(12, c.vocab_size, 6);
  SamplingParams greedy, wide;
  greedy.temperature = 0;
  wide.temperature = 1.2f, wide.top_k = 0, wide.top_p = 0.9f, wide.min_p = 0,
  wide.repetition_penalty = 1.3f;
  const int r1 = b->alloc_slot(), r2 = b->alloc_slot(), s1 = b->alloc_slot(), s2 = b->alloc_slot();
  SeqChunk ref[2] = {{r1, t1, false}, {r2, t2, false}};
  const auto logits = b->forward(ref);
  const size_t V = c.vocab_size;
  const std::span<const float> l1(logits.data(), V), l2(logits.data() + V, V);
  SeqChunk run[2] = {{s1, t1, false}, {s2, t2, false}};
  for (double u : {0.05, 0.5, 0.93}) {
    // Fresh slots each round: reset to position 0 so the chunks are the same prompts again.
    b->reset_slot(s1);
    b->reset_slot(s2);
    const auto pen1 = penalty_counts(greedy, t1, c.vocab_size);
    const auto pen2 = penalty_counts(wide, t2, c.vocab_size);
    const SampleSpec specs[2] = {{&greedy, pen1, u, 0}, {&wide, pen2, u, 5}};
    const auto got = b->forward_sample(run, specs);
    ASSERT_EQ(got.size(), 2u);
    EXPECT_EQ(got[0].token, pick_candidate(sample_candidates(greedy, l1, pen1), u));
    EXPECT_EQ(got[1].token, pick_candidate(sample_candidates(wide, l2, pen2), u));
    EXPECT_NEAR(got[1].logprob, log_softmax(l2)[got[1].token], 1e-6);
    EXPECT_TRUE(got[0].top_logprobs.empty());
    // The five likeliest tokens of the raw row, likeliest first, with their log-probabilities.
    const auto lp = log_softmax(l2);
    ASSERT_EQ(got[1].top_logprobs.size(), 5u);
    for (size_t j = 0; j < 5; ++j) {
      const auto [id, logprob] = got[1].top_logprobs[j];
      EXPECT_NEAR(logprob, lp[id], 1e-6);
      const float mine = lp[id];  // (clang 15 does not capture structured bindings)
      EXPECT_EQ(std::count_if(lp.begin(), lp.end(), [&](float x) { return x > mine; }), long(j));
    }
  }
  b->reset_slot(s1);
  const SampleSpec none[2] = {{}, {&greedy, {}, 0.5, 0}};
  EXPECT_EQ(b->forward_sample(run, none)[0].token, -1);  // a prompt chunk mid-way: no token
  const int64_t pos = b->slot_pos(s1);
  SeqChunk all_rows{s1, t1, true};
  EXPECT_THROW(b->forward_sample({&all_rows, 1}, {none + 1, 1}), Error);
  EXPECT_THROW(b->forward_sample({run, 2}, {none + 1, 1}), Error);
  EXPECT_EQ(b->slot_pos(s1), pos);
}

}  // namespace
