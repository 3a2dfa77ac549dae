// Continuous batching: one thread owns the backend; each step batches the next prompt chunk of
// every sequence still prefilling with one decode token of every generating sequence.
#include <algorithm>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <unordered_set>

#include "multipole/multipole.h"

namespace mp {

struct Scheduler::Impl {
  struct Seq {
    uint64_t id;
    CompletionRequest req;
    int slot = -1;
    size_t prefilled = 0;      // prompt tokens already in the cache
    std::vector<int> history;  // prompt + generated, for the penalties
    int generated = 0;
    int pending = -1;  // sampled token not yet fed to the model
    std::unique_ptr<Sampler> sampler;
    std::unique_ptr<TextStream> text;
  };

  Backend& backend;
  const Tokenizer& tok;
  SchedulerOptions opts;
  mutable std::mutex mu;
  std::condition_variable cv;
  std::deque<std::unique_ptr<Seq>> queue;
  std::vector<std::unique_ptr<Seq>> running;  // touched by the worker only
  std::unordered_set<uint64_t> cancelled;
  uint64_t next_id = 1;
  bool stopping = false;
  SchedulerStats st;
  std::thread worker;

  Impl(Backend& b, const Tokenizer& t, SchedulerOptions o) : backend(b), tok(t), opts(o) {
    st.slots = b.n_slots();
    worker = std::thread([this] { loop(); });
  }

  // Frees the slot and counts the request done, then sends the final event: whoever wakes on it
  // finds the slot free and the counters up to date.
  void finish(Seq& s, const std::string& reason) {
    CompletionEvent e;
    e.text = reason == "stop" || reason == "length" ? s.text->flush() : "";
    e.done = true;
    e.finish_reason = reason;
    e.prompt_tokens = static_cast<int>(s.req.prompt.size());
    e.completion_tokens = s.generated;
    const bool held = s.slot >= 0;
    if (held) backend.free_slot(s.slot);
    s.slot = -1;
    {
      std::lock_guard<std::mutex> lock(mu);
      ++st.requests_done;
      st.completion_tokens += s.generated;
      if (held) --st.slots_in_use;
    }
    try {
      s.req.on_event(e);
    } catch (...) {
    }
  }

  // Reports a sequence's sampled token. False: the sequence ends.
  bool step_token(Seq& s, const SampledToken& t) {
    const int id = t.token;
    CompletionEvent e;
    e.token = id;
    e.logprob = t.logprob;
    if (s.req.logprobs > 0) {
      const auto lp = log_softmax(t.logits);
      std::vector<int> idx(lp.size());
      for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int>(i);
      const int n = std::min<int>(s.req.logprobs, static_cast<int>(idx.size()));
      std::partial_sort(idx.begin(), idx.begin() + n, idx.end(),
                        [&](int a, int b) { return lp[a] > lp[b]; });
      for (int i = 0; i < n; ++i) e.top_logprobs.emplace_back(idx[i], lp[idx[i]]);
    }
    s.history.push_back(id);
    ++s.generated;
    if (id == tok.eos() && !s.req.ignore_eos) {
      finish(s, "stop");
      return false;
    }
    e.text = s.text->push(id);
    e.completion_tokens = s.generated;
    bool keep = true;
    try {
      keep = s.req.on_event(e);
    } catch (...) {
      keep = false;
    }
    if (!keep) {
      finish(s, "cancelled");
      return false;
    }
    if (s.text->stopped()) {
      finish(s, "stop");
      return false;
    }
    if (s.generated >= s.req.max_tokens) {
      finish(s, "length");
      return false;
    }
    s.pending = id;
    return true;
  }

  void loop() {
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return stopping || !queue.empty() || !running.empty(); });
        if (stopping) break;
        // Admit waiting requests into free slots.
        while (!queue.empty()) {
          const int slot = backend.alloc_slot();
          if (slot < 0) break;
          auto s = std::move(queue.front());
          queue.pop_front();
          s->slot = slot;
          running.push_back(std::move(s));
        }
        st.queued = static_cast<int>(queue.size());
        st.slots_in_use = static_cast<int>(running.size());
      }
      // Cancellations, at once: queued ones leave the queue, running ones free their slot.
      {
        std::unordered_set<uint64_t> gone;
        std::vector<std::unique_ptr<Seq>> dropped;
        {
          std::lock_guard<std::mutex> lock(mu);
          gone.swap(cancelled);
          for (auto& q : queue)
            if (gone.count(q->id)) dropped.push_back(std::move(q));
          std::erase_if(queue, [](const auto& q) { return !q; });
        }
        for (auto& q : dropped) finish(*q, "cancelled");
        for (auto& s : running)
          if (gone.count(s->id)) finish(*s, "cancelled");
        sweep();
      }
      if (running.empty()) continue;
      // One batch: prompt chunks (within the step's prefill budget) and decode tokens.
      std::vector<SeqChunk> batch;
      std::vector<Seq*> owners;
      int prefill_budget = opts.max_prefill_per_step;
      for (auto& s : running) {
        if (s->pending >= 0) {
          batch.push_back({s->slot, std::span<const int>(&s->pending, 1), false});
          owners.push_back(s.get());
        } else if (prefill_budget > 0) {
          const size_t left = s->req.prompt.size() - s->prefilled;
          const size_t n = std::min({left, size_t(opts.prefill_chunk), size_t(prefill_budget)});
          batch.push_back(
              {s->slot, std::span<const int>(s->req.prompt).subspan(s->prefilled, n), false});
          owners.push_back(s.get());
          prefill_budget -= static_cast<int>(n);
        }
      }
      // A token is sampled for every sequence whose prompt is complete after this step.
      std::vector<SampleSpec> specs(owners.size());
      for (size_t i = 0; i < owners.size(); ++i) {
        Seq& s = *owners[i];
        const bool last =
            s.pending >= 0 || s.prefilled + batch[i].tokens.size() == s.req.prompt.size();
        if (!last || s.req.max_tokens == 0) continue;
        specs[i] = {&s.sampler->params(), s.history, s.sampler->draw(), s.req.logprobs > 0};
      }
      std::vector<SampledToken> sampled;
      try {
        sampled = backend.forward_sample(batch, specs);
      } catch (const std::exception& e) {
        for (Seq* s : owners) finish(*s, std::string("error: ") + e.what());
        sweep();
        continue;
      }
      for (size_t i = 0; i < owners.size(); ++i) {
        Seq& s = *owners[i];
        if (s.pending < 0) {  // a prompt chunk
          s.prefilled += batch[i].tokens.size();
          {
            std::lock_guard<std::mutex> lock(mu);
            st.prompt_tokens += batch[i].tokens.size();
          }
          if (s.prefilled < s.req.prompt.size()) continue;
          if (s.req.max_tokens == 0) {
            finish(s, "length");
            continue;
          }
        }
        step_token(s, sampled[i]);
      }
      sweep();
      std::lock_guard<std::mutex> lock(mu);
      ++st.steps;
    }
    // Shutting down: everything left is cancelled.
    for (auto& s : running) finish(*s, "cancelled");
    running.clear();
    std::deque<std::unique_ptr<Seq>> left;
    {
      std::lock_guard<std::mutex> lock(mu);
      left.swap(queue);
    }
    for (auto& s : left) finish(*s, "cancelled");
  }

  // Drops finished sequences (finish() freed their slots and counted them).
  void sweep() {
    std::erase_if(running, [](const auto& s) { return s->slot < 0; });
  }
};

Scheduler::Scheduler(Backend& backend, const Tokenizer& tok, SchedulerOptions opts)
    : impl_(std::make_unique<Impl>(backend, tok, opts)) {}

Scheduler::~Scheduler() {
  shutdown();
  if (impl_->worker.joinable()) impl_->worker.join();
}

uint64_t Scheduler::submit(CompletionRequest req) {
  if (!req.on_event) throw Error("scheduler: request without on_event");
  if (req.prompt.empty()) throw Error("the prompt is empty");
  if (req.max_tokens < 0) throw Error("max_tokens must be >= 0");
  const int V = impl_->backend.config().vocab_size;
  for (int id : req.prompt)
    if (id < 0 || id >= V)
      throw Error("token id " + std::to_string(id) + " is outside the vocabulary");
  auto s = std::make_unique<Impl::Seq>();
  s->sampler = std::make_unique<Sampler>(req.sampling);  // validates the parameters
  s->text = std::make_unique<TextStream>(impl_->tok, req.stop);
  s->history = req.prompt;
  s->req = std::move(req);
  std::lock_guard<std::mutex> lock(impl_->mu);
  if (impl_->stopping) throw BusyError("the server is shutting down");
  const int free_slots = impl_->st.slots - impl_->st.slots_in_use;
  if (static_cast<int>(impl_->queue.size()) >= impl_->opts.max_queue + std::max(0, free_slots))
    throw BusyError("too many requests are waiting; try again later");
  s->id = impl_->next_id++;
  const uint64_t id = s->id;
  impl_->queue.push_back(std::move(s));
  impl_->st.queued = static_cast<int>(impl_->queue.size());
  impl_->cv.notify_one();
  return id;
}

void Scheduler::cancel(uint64_t id) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->cancelled.insert(id);
  impl_->cv.notify_one();
}

SchedulerStats Scheduler::stats() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->st;
}

void Scheduler::shutdown() {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->stopping = true;
  }
  impl_->cv.notify_all();
}

}  // namespace mp
