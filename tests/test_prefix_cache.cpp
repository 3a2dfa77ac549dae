// The prefix cache: what it restores is the state the prefix's tokens make; a scheduler with it
// gives a warm request exactly the cold one's tokens.
#include "prefix_cache.h"

#include <gtest/gtest.h>

#include <future>

#include "model_fixture.h"

namespace {

using namespace mp;

struct Fixture : mp::testing::VariantModel {
  std::unique_ptr<Backend> backend =
      make_backend(model, {.kind = "cpu", .n_slots = 6, .n_threads = 2});
  int vocab() const { return model->config().vocab_size; }

  // A slot holding tokens[0, n), read in chunks that end at multiples of `block`.
  int run(const std::vector<int>& tokens, size_t n, size_t block) {
    const int slot = backend->alloc_slot();
    for (size_t at = 0; at < n;) {
      const size_t end = std::min(n, (at / block + 1) * block);
      SeqChunk c{slot, std::span<const int>(tokens).subspan(at, end - at), false};
      backend->forward({&c, 1});
      at = end;
    }
    return slot;
  }
  std::vector<uint8_t> state_of(const std::vector<int>& tokens, size_t n, size_t block) {
    const int slot = run(tokens, n, block);
    auto bytes = backend->save_slot(slot);
    backend->free_slot(slot);
    return bytes;
  }
};

std::shared_ptr<const std::vector<int>> shared(std::vector<int> v) {
  return std::make_shared<const std::vector<int>>(std::move(v));
}

TEST(PrefixCache, RestoresTheLongestCachedPrefixExactly) {
  Fixture f;
  const int B = 16;
  PrefixCache cache(*f.backend, {.block = B, .host_bytes = 64 << 20, .slots = {}});
  const auto doc = shared(mp::testing::random_tokens(70, f.vocab(), 1));
  const int s = f.run(*doc, 70, B);  // snapshots at 16, 32, 48, 64 and the end
  for (size_t n : {16, 32, 48, 64}) {
    f.backend->free_slot(s);
    const int again = f.run(*doc, n, B);
    ASSERT_EQ(again, s);
    cache.store(doc, n, s);
  }
  f.backend->free_slot(s);
  ASSERT_EQ(f.run(*doc, 70, B), s);
  cache.store(doc, 70, s);
  f.backend->free_slot(s);
  EXPECT_EQ(cache.stats().stores, 5u);

  // A prompt that shares 40 tokens with the document gets the prefix of 32.
  std::vector<int> other(doc->begin(), doc->begin() + 40);
  for (int t : mp::testing::random_tokens(30, f.vocab(), 2)) other.push_back(t);
  const int slot = f.backend->alloc_slot();
  EXPECT_EQ(cache.restore(other, other.size() - 1, slot), 32u);
  EXPECT_EQ(f.backend->save_slot(slot), f.state_of(*doc, 32, B));
  // The whole document and more: its end snapshot; the document itself: within the limit only.
  std::vector<int> longer = *doc;
  longer.push_back(5);
  EXPECT_EQ(cache.restore(longer, longer.size() - 1, slot), 70u);
  EXPECT_EQ(f.backend->save_slot(slot), f.state_of(*doc, 70, B));
  EXPECT_EQ(cache.restore(*doc, doc->size() - 1, slot), 64u);
  // Nothing shared: a miss leaves the slot alone.
  const auto before = f.backend->save_slot(slot);
  EXPECT_EQ(cache.restore(mp::testing::random_tokens(50, f.vocab(), 3), 49, slot), 0u);
  EXPECT_EQ(f.backend->save_slot(slot), before);
  const PrefixCacheStats st = cache.stats();
  EXPECT_EQ(st.lookups, 4u);
  EXPECT_EQ(st.hits, 3u);
  EXPECT_EQ(st.cached_tokens, 32u + 70 + 64);
  EXPECT_EQ(st.entries_on_host, 5u);
  // Storing a cached prefix again adds nothing.
  cache.store(doc, 32, slot);
  EXPECT_EQ(cache.stats().stores, 5u);
}

uint64_t colliding_hash(uint64_t, std::span<const int>) { return 42; }

TEST(PrefixCache, AHashCollisionIsCaughtByTheTokens) {
  Fixture f;
  const int B = 8;
  PrefixCache cache(*f.backend, {.block = B, .host_bytes = 64 << 20, .slots = {}}, colliding_hash);
  const auto a = shared(mp::testing::random_tokens(24, f.vocab(), 4));
  const int s = f.run(*a, 16, B);
  cache.store(a, 16, s);
  f.backend->free_slot(s);
  // Every prefix hashes alike: another prompt of the same shape must not get a's state.
  auto b = mp::testing::random_tokens(24, f.vocab(), 5);
  const int slot = f.backend->alloc_slot();
  EXPECT_EQ(cache.restore(b, 23, slot), 0u);
  b[15] = (*a)[15];  // even one that differs early only
  std::copy(a->begin() + 1, a->begin() + 15, b.begin() + 1);
  EXPECT_EQ(cache.restore(b, 23, slot), 0u);
  EXPECT_EQ(cache.restore(*a, 23, slot), 16u);
  EXPECT_EQ(f.backend->save_slot(slot), f.state_of(*a, 16, B));
}

TEST(PrefixCache, EvictsTheLeastRecentlyUsedUnderItsCaps) {
  Fixture f;
  const int B = 8;
  const size_t state = f.state_of(mp::testing::random_tokens(8, f.vocab(), 6), 8, B).size();
  // One slot of the backend, room for one state on the host.
  const int cache_slot = f.backend->alloc_slot();
  PrefixCache cache(*f.backend, {.block = B, .host_bytes = state + state / 2, .slots = {cache_slot}});
  std::vector<std::shared_ptr<const std::vector<int>>> docs;
  for (int i = 0; i < 3; ++i) {
    docs.push_back(shared(mp::testing::random_tokens(12, f.vocab(), 10 + i)));
    const int s = f.run(*docs[i], 8, B);
    cache.store(docs[i], 8, s);
    f.backend->free_slot(s);
  }
  // docs[2] in the slot, docs[1] moved to the host, docs[0] dropped.
  PrefixCacheStats st = cache.stats();
  EXPECT_EQ(st.entries_in_slots, 1u);
  EXPECT_EQ(st.entries_on_host, 1u);
  EXPECT_EQ(st.evictions, 1u);
  EXPECT_EQ(st.host_bytes, state);
  const int slot = f.backend->alloc_slot();
  EXPECT_EQ(cache.restore(*docs[0], 11, slot), 0u);
  for (int i : {1, 2}) {
    EXPECT_EQ(cache.restore(*docs[i], 11, slot), 8u);
    EXPECT_EQ(f.backend->save_slot(slot), f.state_of(*docs[i], 8, B));
  }
}

// Runs requests through a scheduler with the prefix cache and returns each one's tokens,
// log-probabilities and cached prompt tokens.
struct Outcome {
  std::vector<int> tokens;
  std::vector<float> logprobs;
  int cached = 0;
};
Outcome complete(Scheduler& sched, std::vector<int> prompt, uint64_t seed) {
  auto done = std::make_shared<std::promise<void>>();
  auto out = std::make_shared<Outcome>();
  CompletionRequest r;
  r.prompt = std::move(prompt);
  r.max_tokens = 12;
  r.ignore_eos = true;
  r.sampling.seed = seed;
  r.sampling.temperature = 0.9f;
  r.on_event = [done, out](const CompletionEvent& e) {
    if (e.token >= 0) {
      out->tokens.push_back(e.token);
      out->logprobs.push_back(e.logprob);
    }
    if (e.done) {
      out->cached = e.cached_tokens;
      done->set_value();
    }
    return true;
  };
  sched.submit(std::move(r));
  done->get_future().wait();
  return *out;
}

TEST(PrefixCache, WarmRequestsGiveTheColdTokensBitForBit) {
  Fixture f;
  Scheduler sched(*f.backend, f.model->tokenizer(),
                  {.prefix_block = 32, .prefix_cache_slots = 1, .prefix_cache_bytes = 64 << 20});
  const auto doc = mp::testing::random_tokens(100, f.vocab(), 7);
  const Outcome cold = complete(sched, doc, 99);
  EXPECT_EQ(cold.cached, 0);
  const Outcome warm = complete(sched, doc, 99);
  EXPECT_EQ(warm.cached, 96);  // the last block boundary below the prompt's last token
  EXPECT_EQ(warm.tokens, cold.tokens);
  EXPECT_EQ(warm.logprobs, cold.logprobs);
  // A follow-up that extends the document restores the document's end.
  auto question = doc;
  for (int t : mp::testing::random_tokens(20, f.vocab(), 8)) question.push_back(t);
  const Outcome follow = complete(sched, question, 5);
  EXPECT_EQ(follow.cached, 100);
  // The cold run of the follow-up, without a cache.
  auto other = make_backend(f.model, {.kind = "cpu", .n_slots = 1, .n_threads = 2});
  Scheduler plain(*other, f.model->tokenizer());
  const Outcome follow_cold = complete(plain, question, 5);
  EXPECT_EQ(follow_cold.cached, 0);
  EXPECT_EQ(follow.tokens, follow_cold.tokens);
  for (size_t i = 0; i < follow.logprobs.size(); ++i)
    EXPECT_NEAR(follow.logprobs[i], follow_cold.logprobs[i], 1e-5);
  const SchedulerStats st = sched.stats();
  EXPECT_EQ(st.prefix.hits, 2u);
  EXPECT_EQ(st.prefix.lookups, 3u);
  EXPECT_EQ(st.slots, 5);  // one of the six went to the cache
}

}  // namespace
