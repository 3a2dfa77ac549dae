// Continuous batching. One step loop per device (one in all for a backend of one device), each
// on its own thread and never waiting for the others: admit waiting requests into free slots
// (one admission policy over all devices: arrival order, the least loaded device), apply
// cancellations, build the device's batch (a token of every generating sequence, then prompt
// chunks in arrival order within the step's budget), run it, turn the sampled tokens into
// events. Event threads hand the events to the requests' callbacks, so no step loop waits on a
// client. Host work per step is O(batch), per token O(1).
#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_set>

#include "multipole/multipole.h"
#include "prefix_cache.h"

namespace mp {

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Where a request's events go. Owned by the request's sequence until its final event is sent,
// then by the event thread, which deletes it once that event is delivered.
struct EventSink {
  uint64_t id;
  std::function<bool(const CompletionEvent&)> on_event;
  bool cancel_sent = false;  // touched by its event thread only
};

// A step's events for one event thread, compact: a token's event is a small record whose text
// lies in one shared byte buffer; the rare events with more (a final event, top logprobs) are
// whole CompletionEvents beside them. Buffers are cleared, not freed, and travel between the
// model thread and the event thread by swapping: no allocation per token in steady state.
struct EventBatch {
  struct Record {
    EventSink* sink;
    uint32_t text_begin, text_size;  // in `text`
    int token, completion_tokens;
    float logprob;
    int32_t full;  // index in `full`, or -1
    size_t state_bytes;
  };
  std::vector<Record> records;
  std::string text;
  std::vector<CompletionEvent> full;

  bool empty() const { return records.empty(); }
  void clear() {
    records.clear();
    text.clear();
    full.clear();
  }
  void append(EventBatch& other) {  // moves other's events behind these
    const auto text_base = static_cast<uint32_t>(text.size());
    const auto full_base = static_cast<int32_t>(full.size());
    for (Record r : other.records) {
      r.text_begin += text_base;
      if (r.full >= 0) r.full += full_base;
      records.push_back(r);
    }
    text += other.text;
    full.insert(full.end(), std::make_move_iterator(other.full.begin()),
                std::make_move_iterator(other.full.end()));
    other.clear();
  }
};

// One event thread: delivers its requests' events in order; a callback returning false (or
// throwing) cancels its request.
class EventThread {
 public:
  explicit EventThread(std::function<void(uint64_t)> cancel)
      : cancel_(std::move(cancel)), thread_([this] { run(); }) {}
  ~EventThread() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_one();
    thread_.join();  // after delivering everything queued
  }
  // Takes the batch's events (the batch is left empty, with room kept where possible).
  void post(EventBatch& batch) {
    if (batch.empty()) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (inbox_.empty())
        std::swap(inbox_, batch);
      else
        inbox_.append(batch);
      backlog_ = inbox_.records.size();
    }
    batch.clear();
    cv_.notify_one();
  }
  size_t backlog() {  // events posted and not yet delivered
    std::lock_guard<std::mutex> lock(mu_);
    return backlog_;
  }

 private:
  void run() {
    set_batch_scheduling("mp-events");
    EventBatch work;
    CompletionEvent token_event;  // reused: its text keeps its room
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stopping_ || !inbox_.empty(); });
        if (inbox_.empty()) return;  // stopping, nothing left
        std::swap(work, inbox_);
        backlog_ = 0;
      }
      for (const EventBatch::Record& r : work.records) {
        const CompletionEvent* e = &token_event;
        if (r.full >= 0) {
          e = &work.full[r.full];
        } else {
          token_event.text.assign(work.text, r.text_begin, r.text_size);
          token_event.token = r.token;
          token_event.logprob = r.logprob;
          token_event.completion_tokens = r.completion_tokens;
          token_event.state_bytes = r.state_bytes;
        }
        bool keep = false;
        try {
          keep = r.sink->on_event(*e);
        } catch (...) {
        }
        if (e->done) {
          delete r.sink;  // its last event
        } else if (!keep && !r.sink->cancel_sent) {
          r.sink->cancel_sent = true;
          cancel_(r.sink->id);
        }
      }
      work.clear();
    }
  }

  std::function<void(uint64_t)> cancel_;
  std::mutex mu_;
  std::condition_variable cv_;
  EventBatch inbox_;
  size_t backlog_ = 0;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace

struct Scheduler::Impl {
  struct Seq {
    Seq(CompletionRequest r, int vocab, const Tokenizer& tok)
        : sink(std::make_unique<EventSink>(EventSink{0, std::move(r.on_event)})),
          prompt(std::make_shared<const std::vector<int>>(std::move(r.prompt))),
          req(std::move(r)),
          sampler(req.sampling),
          penalties(req.sampling, vocab),
          text(tok, req.stop) {
      for (int t : *prompt) penalties.push(t);
    }
    uint64_t id = 0;
    std::unique_ptr<EventSink> sink;  // handed to the event thread with the final event
    std::shared_ptr<const std::vector<int>> prompt;  // shared with the prefix cache's entries
    CompletionRequest req;                           // its prompt moved to `prompt`
    int slot = -1;
    size_t prefilled = 0;  // prompt tokens already in the cache
    int cached = 0;        // of which restored from the prefix cache
    int generated = 0;
    int pending = -1;  // sampled token not yet fed to the model
    int last_sampled = -1;
    Sampler sampler;
    PenaltyCounts penalties;
    TextStream text;
  };

  // One device's step loop (vLLM's data-parallel engine core, in a thread): the sequences whose
  // slots lie on that device, stepped by the lane's own thread without waiting for other devices.
  struct Lane {
    int device = 0;
    size_t budget = 0;  // prompt tokens a step reads at most
    // Under mu: what admission handed to this lane, and cancellations it has not looked at yet.
    std::vector<std::unique_ptr<Seq>> incoming;
    std::unordered_set<uint64_t> cancelled;
    // The lane's own thread only.
    std::vector<std::unique_ptr<Seq>> running;  // in admission order
    std::vector<SeqChunk> batch;
    std::vector<Seq*> owners;
    std::vector<SampleSpec> specs;
    std::vector<EventBatch> outbox;  // per event thread, sent after each step
    // Tokens taken from the last step whose text is made while the device runs the next one.
    struct Unreported {
      Seq* seq;
      int token, completion_tokens;
      float logprob;
      size_t state_bytes;
    };
    std::vector<Unreported> unreported;
    uint64_t steps = 0;
    std::chrono::steady_clock::time_point admitted_at;  // when admit() stopped waiting
    struct {
      size_t decode_rows = 0, prompt_tokens = 0, chunks = 0;
    } planned;  // the step's batch, for the step log
    std::thread worker;
  };

  Backend& backend;
  const Tokenizer& tok;
  SchedulerOptions opts;
  const bool overlap = backend.samples_asynchronously();  // host work beside the device's
  // The policy's state, shared by the lanes; held for admission and counters, never over a step.
  mutable std::mutex mu;
  std::condition_variable cv;  // idle lanes wait on it for work
  std::deque<std::unique_ptr<Seq>> queue;
  uint64_t next_id = 1;
  bool stopping = false;
  bool slots_may_be_free = true;  // false from a failed allocation until a slot is freed
  SchedulerStats st;
  std::vector<std::unique_ptr<Lane>> lanes;  // one per device
  std::vector<std::unique_ptr<EventThread>> event_threads;
  // The prefix cache, one for every device (a snapshot restores into any device's slot), held
  // for a lookup or a snapshot and the state copy it makes.
  mutable std::mutex cache_mu;
  std::unique_ptr<PrefixCache> cache;

  Impl(Backend& b, const Tokenizer& t, SchedulerOptions o) : backend(b), tok(t), opts(o) {
    if (opts.max_prefill_per_step <= 0) opts.max_prefill_per_step = b.prefill_tokens_per_step();
    if (opts.prefix_cache_slots > 0 || opts.prefix_cache_bytes > 0) {
      PrefixCache::Options co{opts.prefix_block, opts.prefix_cache_bytes, {}};
      for (int i = 0; i < opts.prefix_cache_slots; ++i) {
        const int slot = b.alloc_slot();
        if (slot < 0)
          throw Error("the prefix cache wants " + std::to_string(opts.prefix_cache_slots) +
                      " of the backend's " + std::to_string(b.n_slots()) + " slots");
        co.slots.push_back(slot);
      }
      cache = std::make_unique<PrefixCache>(b, std::move(co));
    }
    st.slots = b.n_slots() - opts.prefix_cache_slots;
    st.max_queue = opts.max_queue;
    const int n_events =
        opts.event_threads > 0
            ? opts.event_threads
            : std::clamp(static_cast<int>(std::thread::hardware_concurrency() / 2), 2, 8);
    for (int i = 0; i < n_events; ++i)
      event_threads.push_back(std::make_unique<EventThread>([this](uint64_t id) { cancel(id); }));
    // The step's prompt budget is shared out: each device reads its part, as before together.
    const int n_lanes = b.n_devices();
    for (int d = 0; d < n_lanes; ++d) {
      auto lane = std::make_unique<Lane>();
      lane->device = d;
      lane->budget = (size_t(opts.max_prefill_per_step) + n_lanes - 1) / n_lanes;
      lane->outbox.resize(n_events);
      lanes.push_back(std::move(lane));
    }
    for (auto& lane : lanes) lane->worker = std::thread([this, l = lane.get()] { loop(*l); });
  }

  void cancel(uint64_t id) {
    std::lock_guard<std::mutex> lock(mu);
    for (auto& lane : lanes) lane->cancelled.insert(id);  // whichever holds it acts on it
    cv.notify_all();
  }

  // Admission, the one policy over every device (under mu): queued requests in arrival order,
  // each into a free slot of the least loaded device (Backend::alloc_slot), handed to that
  // device's lane. Any lane runs it at the start of its step.
  void place() {
    bool placed = false;
    while (!queue.empty()) {
      const int slot = backend.alloc_slot();
      if (slot < 0) {
        slots_may_be_free = false;
        break;
      }
      auto s = std::move(queue.front());
      queue.pop_front();
      s->slot = slot;
      lanes[backend.slot_device(slot)]->incoming.push_back(std::move(s));
      ++st.slots_in_use;
      placed = true;
    }
    st.queued = static_cast<int>(queue.size());
    if (placed && lanes.size() > 1) cv.notify_all();  // an idle lane may have got work
  }

  EventBatch& outbox_of(Lane& l, const Seq& s) { return l.outbox[s.id % l.outbox.size()]; }
  // An event with more than a token's fields; the final one hands the sink over.
  void send_full(Lane& l, Seq& s, CompletionEvent e) {
    EventBatch& b = outbox_of(l, s);
    b.records.push_back({e.done ? s.sink.release() : s.sink.get(), 0, 0, e.token,
                         e.completion_tokens, e.logprob, static_cast<int32_t>(b.full.size()),
                         e.state_bytes});
    b.full.push_back(std::move(e));
  }
  void post_events(Lane& l) {
    for (size_t i = 0; i < l.outbox.size(); ++i) event_threads[i]->post(l.outbox[i]);
  }

  // Frees the slot and counts the request done before its final event goes out: whoever wakes on
  // that event finds the slot free and the counters up to date.
  void finish(Lane& l, Seq& s, const std::string& reason) {
    CompletionEvent e;
    e.text = reason == "stop" || reason == "length" ? s.text.flush() : "";
    e.done = true;
    e.finish_reason = reason;
    e.prompt_tokens = static_cast<int>(s.prompt->size());
    e.completion_tokens = s.generated;
    e.cached_tokens = s.cached;
    const bool held = s.slot >= 0;
    if (held) {
      e.state_bytes = backend.slot_bytes(s.slot);
      if (s.req.keep_state && (reason == "stop" || reason == "length")) {
        e.state = std::make_shared<const std::vector<uint8_t>>(backend.save_slot(s.slot));
        e.unfed_token = s.last_sampled;
      }
      backend.free_slot(s.slot);
    }
    s.slot = -1;
    {
      std::lock_guard<std::mutex> lock(mu);
      ++st.requests_done;
      st.completion_tokens += s.generated;
      if (held) {
        --st.slots_in_use;
        slots_may_be_free = true;
      }
    }
    send_full(l, s, std::move(e));
  }

  // Takes a sequence's sampled token and decides whether it goes on. On a backend that samples
  // asynchronously, a token that can end the sequence only by its id or count (no stop strings,
  // no top logprobs) is reported later, by report_unreported while the device runs the next
  // step: its text cannot stop anything.
  void take_token(Lane& l, Seq& s, SampledToken& t) {
    const int id = s.last_sampled = t.token;
    ++s.generated;
    if (id == tok.eos() && !s.req.ignore_eos) return finish(l, s, "stop");
    s.penalties.push(id);
    const Lane::Unreported u{&s, id, s.generated, t.logprob, backend.slot_bytes(s.slot)};
    if (overlap && t.top_logprobs.empty() && s.req.stop.empty() &&
        s.generated < s.req.max_tokens) {
      l.unreported.push_back(u);
      s.pending = id;
      return;
    }
    if (t.top_logprobs.empty()) {
      report(l, u);
    } else {
      CompletionEvent e;
      e.token = id;
      e.logprob = t.logprob;
      e.top_logprobs = std::move(t.top_logprobs);
      s.text.push(id, e.text);
      e.completion_tokens = s.generated;
      e.state_bytes = backend.slot_bytes(s.slot);
      send_full(l, s, std::move(e));
    }
    if (s.text.stopped()) return finish(l, s, "stop");
    if (s.generated >= s.req.max_tokens) return finish(l, s, "length");
    s.pending = id;
  }

  // A token's event, the common one: its text straight into the event thread's batch.
  void report(Lane& l, const Lane::Unreported& u) {
    Seq& s = *u.seq;
    EventBatch& b = outbox_of(l, s);
    const size_t at = b.text.size();
    s.text.push(u.token, b.text);
    b.records.push_back({s.sink.get(), static_cast<uint32_t>(at),
                         static_cast<uint32_t>(b.text.size() - at), u.token, u.completion_tokens,
                         u.logprob, -1, u.state_bytes});
  }
  void report_unreported(Lane& l) {
    for (const Lane::Unreported& u : l.unreported) report(l, u);
    l.unreported.clear();
  }

  // Waits for work for the lane, runs admission and takes what it handed to this lane; false
  // when stopping.
  bool admit(Lane& l) {
    const size_t before = l.running.size();
    {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] {
        return stopping || !l.incoming.empty() || !l.running.empty() || !l.cancelled.empty() ||
               (!queue.empty() && slots_may_be_free);
      });
      if (stopping) return false;
      l.admitted_at = std::chrono::steady_clock::now();
      place();
      for (auto& s : l.incoming) l.running.push_back(std::move(s));
      l.incoming.clear();
    }
    bool failed = false;
    for (size_t i = before; i < l.running.size(); ++i) failed |= !start(l, *l.running[i]);
    if (failed) sweep(l);  // a sequence whose state could not be set up is finished
    return true;
  }

  // Whether a sequence's prompt states go to the prefix cache: they are the states of its prompt
  // prefixes only when it starts from an empty state.
  bool snapshots(const Seq& s) const { return cache && !s.req.start_state; }
  // At a block boundary, and at the end of a prompt of a quarter block or more: a shorter one is
  // cheaper to read again than a snapshot (about 1 MiB) is to keep.
  bool worth_snapshot(const Seq& s) const {
    const size_t B = cache->block();
    return s.prefilled % B == 0 || (s.prefilled == s.prompt->size() && s.prefilled >= B / 4);
  }

  // A new sequence's state: the one it continues, or the longest cached prefix of its prompt
  // (all but the last token: that one's logits pick the first generated token).
  // False when that failed (the sequence is then finished with an error).
  bool start(Lane& l, Seq& s) {
    try {
      if (s.req.start_state) {
        backend.load_slot(s.slot, *s.req.start_state);
      } else if (cache) {
        std::lock_guard<std::mutex> lock(cache_mu);
        s.prefilled = s.cached =
            static_cast<int>(cache->restore(*s.prompt, s.prompt->size() - 1, s.slot));
      }
    } catch (const std::exception& e) {
      finish(l, s, std::string("error: ") + e.what());
      return false;
    }
    return true;
  }

  // Cancellations, at once: queued ones leave the queue, running ones free their slot.
  void apply_cancellations(Lane& l) {
    std::unordered_set<uint64_t> gone;
    std::vector<std::unique_ptr<Seq>> dropped;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (l.cancelled.empty()) return;
      gone.swap(l.cancelled);
      for (auto& q : queue)
        if (gone.count(q->id)) dropped.push_back(std::move(q));
      std::erase_if(queue, [](const auto& q) { return !q; });
      st.queued = static_cast<int>(queue.size());
    }
    for (auto& q : dropped) finish(l, *q, "cancelled");
    report_unreported(l);  // a cancelled sequence's last token goes out before its final event
    for (auto& s : l.running)
      if (gone.count(s->id)) finish(l, *s, "cancelled");
    sweep(l);
  }

  // The step's batch: a token of every generating sequence, then prompt chunks in arrival order
  // within the budget; a token is sampled for every sequence whose prompt is done after it.
  void plan_step(Lane& l) {
    l.batch.clear();
    l.owners.clear();
    l.specs.clear();
    l.planned = {};
    size_t budget = l.budget;
    for (auto& s : l.running) {
      if (s->pending >= 0) {
        l.batch.push_back({s->slot, std::span<const int>(&s->pending, 1), false});
        ++l.planned.decode_rows;
      } else if (budget > 0) {
        size_t n = std::min(s->prompt->size() - s->prefilled, budget);
        if (snapshots(*s)) {
          // A chunk that crosses a block boundary ends at the last one, to be snapshot there
          // (the prompt's end is snapshot too, but a later prompt that shares only the part
          // before its last block, such as a document asked another question, needs that one).
          const size_t boundary = (s->prefilled + n) / cache->block() * cache->block();
          if (boundary > s->prefilled) n = boundary - s->prefilled;
        }
        l.batch.push_back({s->slot, std::span<const int>(*s->prompt).subspan(s->prefilled, n),
                           false});
        budget -= n;
        l.planned.prompt_tokens += n;
        ++l.planned.chunks;
      } else {
        continue;
      }
      l.owners.push_back(s.get());
      const bool last =
          s->pending >= 0 || s->prefilled + l.batch.back().tokens.size() == s->prompt->size();
      SampleSpec spec;
      if (last && s->req.max_tokens > 0)
        spec = {&s->sampler.params(), s->penalties.counts(), s->sampler.draw(), s->req.logprobs};
      l.specs.push_back(spec);
    }
  }

  // Runs the planned batch on the lane's device, reporting the previous step's tokens and
  // handing its events over while the device works; returns the seconds spent inside the
  // backend and counts the prompt tokens read.
  double run_step(Lane& l, size_t* prompt_tokens) {
    std::vector<SampledToken> sampled;
    const auto t0 = std::chrono::steady_clock::now();
    std::optional<std::string> failed;  // the backend's error, if it threw
    try {
      backend.start_sample(l.batch, l.specs);
    } catch (const std::exception& e) {
      failed = e.what();
    }
    double in_backend = seconds_since(t0);
    report_unreported(l);
    post_events(l);
    const auto t1 = std::chrono::steady_clock::now();
    if (!failed) {
      try {
        sampled = backend.finish_sample(l.batch, l.specs);
      } catch (const std::exception& e) {
        failed = e.what();
      }
    }
    in_backend += seconds_since(t1);
    if (failed) {
      for (Seq* s : l.owners) finish(l, *s, "error: " + *failed);
      return in_backend;
    }
    for (size_t i = 0; i < l.owners.size(); ++i) {
      Seq& s = *l.owners[i];
      if (s.pending < 0) {  // a prompt chunk
        s.prefilled += l.batch[i].tokens.size();
        *prompt_tokens += l.batch[i].tokens.size();
        if (snapshots(s) && worth_snapshot(s)) {
          try {
            std::lock_guard<std::mutex> lock(cache_mu);
            cache->store(s.prompt, s.prefilled, s.slot);
          } catch (const std::exception& e) {
            finish(l, s, std::string("error: prefix cache: ") + e.what());
            continue;
          }
        }
        if (s.prefilled < s.prompt->size()) continue;
        if (s.req.max_tokens == 0) {
          finish(l, s, "length");
          continue;
        }
      }
      take_token(l, s, sampled[i]);
    }
    return in_backend;
  }

  void loop(Lane& l) {
    name_this_thread(("mp-step-" + std::to_string(l.device)).c_str());
    if (opts.step_loop_nice &&
        setpriority(PRIO_PROCESS, static_cast<id_t>(gettid()), *opts.step_loop_nice) != 0)
      std::fprintf(stderr, "note: step loop %d keeps its priority (nice %d refused: %s)\n",
                   l.device, *opts.step_loop_nice, std::strerror(errno));
    while (admit(l)) {
      const auto t0 = std::chrono::steady_clock::now();
      apply_cancellations(l);
      post_events(l);  // final events of admission and cancellation: not held for the step
      double in_backend = 0;
      size_t prompt_tokens = 0;
      const bool stepped = !l.running.empty();
      if (stepped) {
        plan_step(l);
        in_backend = run_step(l, &prompt_tokens);
        sweep(l);
        ++l.steps;
      }
      const size_t backlog = opts.log_steps ? undelivered() : 0;
      post_events(l);
      const double seconds = seconds_since(t0);
      if (opts.log_steps && stepped)
        log_step(l, std::chrono::duration<double>(t0 - l.admitted_at).count(), seconds,
                 in_backend, backlog);
      std::lock_guard<std::mutex> lock(mu);
      st.step_seconds += seconds;
      st.backend_seconds += in_backend;
      st.prompt_tokens += prompt_tokens;
      st.steps += stepped;
    }
    // Shutting down: everything left is cancelled (the queue by whichever lane gets there first).
    std::vector<std::unique_ptr<Seq>> left;
    {
      std::lock_guard<std::mutex> lock(mu);
      for (auto& s : l.incoming) left.push_back(std::move(s));
      l.incoming.clear();
      for (auto& s : queue) left.push_back(std::move(s));
      queue.clear();
    }
    report_unreported(l);
    for (auto& s : l.running) finish(l, *s, "cancelled");
    l.running.clear();
    for (auto& s : left) finish(l, *s, "cancelled");
    post_events(l);
  }

  // Events of earlier steps still waiting for their event thread: a backlog that grows means the
  // callbacks deliver slower than the model makes tokens.
  size_t undelivered() const {
    size_t n = 0;
    for (const auto& t : event_threads) n += t->backlog();
    return n;
  }
  void log_step(const Lane& l, double admit_s, double step_s, double backend_s,
                size_t backlog) const {
    std::fprintf(stderr,
                 "device %d step %llu: %zu decode rows, %zu prompt tokens in %zu chunks; admit "
                 "%.3f ms, backend %.3f ms, scheduler %.3f ms; %zu events of earlier steps "
                 "undelivered\n",
                 l.device, static_cast<unsigned long long>(l.steps), l.planned.decode_rows,
                 l.planned.prompt_tokens, l.planned.chunks, admit_s * 1e3, backend_s * 1e3,
                 (step_s - backend_s) * 1e3, backlog);
  }

  // Drops finished sequences (finish() freed their slots and counted them).
  void sweep(Lane& l) {
    std::erase_if(l.running, [](const auto& s) { return s->slot < 0; });
  }
};

void name_this_thread(const char* name) {
  char short_name[16] = {};
  std::snprintf(short_name, sizeof short_name, "%s", name);
  pthread_setname_np(pthread_self(), short_name);
}

void set_batch_scheduling(const char* name) {
  name_this_thread(name);
  // Hints: failing changes only the timing. On Linux both apply to the calling thread alone.
  const sched_param param{};
  sched_setscheduler(0, SCHED_BATCH, &param);
  const auto tid = static_cast<id_t>(gettid());
  errno = 0;
  const int nice = getpriority(PRIO_PROCESS, tid);  // -1 can be a nice value: errno tells
  if (errno == 0) setpriority(PRIO_PROCESS, tid, std::min(nice + kBackgroundNice, 19));
}

Scheduler::Scheduler(Backend& backend, const Tokenizer& tok, SchedulerOptions opts)
    : impl_(std::make_unique<Impl>(backend, tok, opts)) {}

Scheduler::~Scheduler() {
  shutdown();
  for (auto& lane : impl_->lanes)
    if (lane->worker.joinable()) lane->worker.join();
  impl_->event_threads.clear();  // each delivers what is left, then stops
}

uint64_t Scheduler::submit(CompletionRequest req) {
  if (!req.on_event) throw Error("scheduler: request without on_event");
  if (req.prompt.empty()) throw Error("the prompt is empty");
  if (req.max_tokens < 0) throw Error("max_tokens must be >= 0");
  if (req.logprobs < 0) throw Error("logprobs must be >= 0");
  const int V = impl_->backend.config().vocab_size;
  for (int id : req.prompt)
    if (id < 0 || id >= V)
      throw Error("token id " + std::to_string(id) + " is outside the vocabulary");
  req.sampling.validate();
  // Built outside the lock: the penalties read the whole prompt once.
  auto s = std::make_unique<Impl::Seq>(std::move(req), V, impl_->tok);
  std::lock_guard<std::mutex> lock(impl_->mu);
  if (impl_->stopping) throw BusyError("the server is shutting down");
  const int free_slots = impl_->st.slots - impl_->st.slots_in_use;
  if (static_cast<int>(impl_->queue.size()) >= impl_->opts.max_queue + std::max(0, free_slots))
    throw BusyError("too many requests are waiting; try again later");
  const uint64_t id = s->id = s->sink->id = impl_->next_id++;
  impl_->queue.push_back(std::move(s));
  impl_->st.queued = static_cast<int>(impl_->queue.size());
  impl_->cv.notify_all();  // the lanes waiting for work: whichever gets the lock places it
  return id;
}

void Scheduler::cancel(uint64_t id) { impl_->cancel(id); }

SchedulerStats Scheduler::stats() const {
  std::vector<DeviceStats> devices = impl_->backend.device_stats();  // thread-safe on its own
  PrefixCacheStats prefix;
  if (impl_->cache) {
    std::lock_guard<std::mutex> lock(impl_->cache_mu);
    prefix = impl_->cache->stats();
  }
  std::lock_guard<std::mutex> lock(impl_->mu);
  SchedulerStats s = impl_->st;
  s.prefix = prefix;
  s.devices = std::move(devices);
  return s;
}

void Scheduler::shutdown() {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->stopping = true;
  }
  impl_->cv.notify_all();
}

}  // namespace mp
