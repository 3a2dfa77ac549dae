// A backend that does no model work: each chunk's next token comes at once (or after a fixed
// step time, as a GPU's step would take), so that what is measured over it is the host work
// around the model (the scheduler, the server's delivery).
#pragma once

#include <chrono>
#include <future>
#include <memory>
#include <thread>
#include <vector>

#include "multipole/multipole.h"

namespace mp {

class NullBackend final : public Backend {
 public:
  // With a step time the backend samples asynchronously unless `overlap` is off: start_sample
  // returns at once and finish_sample waits for the rest of the step, as a GPU's would.
  NullBackend(const Config& c, int slots, std::chrono::microseconds step = {}, bool overlap = true)
      : c_(c), step_(step), overlap_(overlap), pos_(slots, 0), used_(slots, false) {}
  std::string name() const override { return "null"; }
  const Config& config() const override { return c_; }
  int n_slots() const override { return static_cast<int>(pos_.size()); }
  int alloc_slot() override {
    for (size_t i = 0; i < used_.size(); ++i)
      if (!used_[i]) {
        used_[i] = true;
        pos_[i] = 0;
        return static_cast<int>(i);
      }
    return -1;
  }
  void free_slot(int s) override { used_[s] = false; }
  void reset_slot(int s) override { pos_[s] = 0; }
  void copy_slot(int a, int b) override { pos_[b] = pos_[a]; }
  int64_t slot_pos(int s) const override { return pos_[s]; }
  std::vector<uint8_t> save_slot(int) const override { return {}; }
  void load_slot(int, std::span<const uint8_t>) override {}
  size_t slot_bytes(int) const override { return 0; }
  int prefill_tokens_per_step() const override { return 32768; }
  std::vector<float> forward(std::span<const SeqChunk>) override { return {}; }
  std::vector<SampledToken> forward_sample(std::span<const SeqChunk> chunks,
                                           std::span<const SampleSpec> specs) override {
    start_sample(chunks, specs);
    return finish_sample(chunks, specs);
  }
  bool samples_asynchronously() const override { return overlap_ && step_.count() > 0; }
  void start_sample(std::span<const SeqChunk> chunks, std::span<const SampleSpec> specs) override {
    ready_at_ = std::chrono::steady_clock::now() + step_;
    sampled_.assign(chunks.size(), {});
    for (size_t i = 0; i < chunks.size(); ++i) {
      pos_[chunks[i].slot] += static_cast<int64_t>(chunks[i].tokens.size());
      // Ordinary text pieces, never EOS: ids 300.. of the vocabulary.
      if (specs[i].params) sampled_[i].token = 300 + static_cast<int>(pos_[chunks[i].slot] % 4000);
    }
  }
  std::vector<SampledToken> finish_sample(std::span<const SeqChunk>,
                                          std::span<const SampleSpec>) override {
    if (step_.count() > 0) std::this_thread::sleep_until(ready_at_);
    return std::move(sampled_);
  }

 private:
  Config c_;
  std::chrono::microseconds step_;
  bool overlap_;
  std::chrono::steady_clock::time_point ready_at_;
  std::vector<SampledToken> sampled_;
  std::vector<int64_t> pos_;
  std::vector<bool> used_;
};

// Submits `streams` requests of `tokens` tokens each (ignoring EOS; seed i for request i) and
// waits for all of them; returns the tokens they generated.
inline int64_t run_streams(Scheduler& sched, const std::vector<int>& prompt, int streams,
                           int tokens, const SamplingParams& sampling = {}) {
  std::vector<std::future<int>> done;
  done.reserve(streams);
  for (int i = 0; i < streams; ++i) {
    auto p = std::make_shared<std::promise<int>>();
    done.push_back(p->get_future());
    CompletionRequest r;
    r.prompt = prompt;
    r.sampling = sampling;
    r.sampling.seed = i;
    r.max_tokens = tokens;
    r.ignore_eos = true;
    r.on_event = [p](const CompletionEvent& e) {
      if (e.done) p->set_value(e.completion_tokens);
      return true;
    };
    sched.submit(std::move(r));
  }
  int64_t generated = 0;
  for (auto& d : done) generated += d.get();
  return generated;
}

}  // namespace mp
