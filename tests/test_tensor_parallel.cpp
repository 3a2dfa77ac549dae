// Tensor parallelism on the CPU (BackendOptions::tensor_parallel): N shards over in-process
// communicators against the plain backend. N = 1 runs the same arithmetic (bit-identical); N > 1
// sums each layer's attention and FFN outputs in parts (fp32: 1e-5 relative).
#include <gtest/gtest.h>

#include "model_fixture.h"

namespace {

using namespace mp;
using namespace mp::testing;

struct Variant {
  const char* name;
  bool fma;
  Downsampling ds;
  int kv_heads;
  int tp;
  DType dtype = DType::F32;
};

class TensorParallel : public ::testing::TestWithParam<Variant> {};

TEST_P(TensorParallel, LogitsAndStatesMatchThePlainBackend) {
  const Variant v = GetParam();
  Config c = mp::testing::small_config();
  c.fma_enabled = v.fma;
  c.fma_downsampling = v.ds;
  c.n_kv_heads = v.kv_heads;
  TempDir dir;
  auto model = random_model(dir, c, v.dtype, 21);
  auto plain = make_backend(model, {.kind = "cpu", .n_slots = 3, .n_threads = 1});
  auto tp =
      make_backend(model, {.kind = "cpu", .n_slots = 3, .n_threads = 1, .tensor_parallel = v.tp});
  EXPECT_NE(tp->name().find("tensor parallel x" + std::to_string(v.tp)), std::string::npos);
  const double tol = v.tp == 1 ? 0 : 1e-5;
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
    ::testing::Values(Variant{"groupedconv_tp1", true, Downsampling::GroupedConv, 2, 1},
                      Variant{"groupedconv_tp2", true, Downsampling::GroupedConv, 2, 2},
                      Variant{"conv_tp2", true, Downsampling::Conv, 2, 2},
                      Variant{"avgpool_tp2", true, Downsampling::AvgPool, 2, 2},
                      Variant{"avgpool_mha_tp4", true, Downsampling::AvgPool, 4, 4},
                      Variant{"exact_tp2", false, Downsampling::GroupedConv, 2, 2},
                      Variant{"groupedconv_bf16_tp2", true, Downsampling::GroupedConv, 2, 2,
                              DType::BF16}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(TensorParallelOptions, WhatDoesNotSplitIsRefused) {
  TempDir dir;
  auto model = random_model(dir, mp::testing::small_config());  // 4 heads, 2 KV heads, 48 FFN
  auto refused = [&](BackendOptions o, const std::string& what) {
    try {
      make_backend(model, o);
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
  auto tp = make_backend(model, {.kind = "cpu", .n_slots = 2, .tensor_parallel = 2});
  const int s = tp->alloc_slot();
  const auto t = random_tokens(5, 400, 1);
  SeqChunk bad[2] = {{s, t, false}, {1, t, false}};
  EXPECT_THROW(tp->forward(bad), Error);
  EXPECT_EQ(tp->slot_pos(s), 0);
  SeqChunk good{s, t, false};
  EXPECT_EQ(tp->forward({&good, 1}).size(), 400u);
}

}  // namespace
