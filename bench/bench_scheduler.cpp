// The scheduler's own cost per token: N streams through the Scheduler over a backend that does
// no model work (it returns the next token at once), with the shipped model's tokenizer, against
// the same tokens produced by a bare loop over that backend (the floor). What the table shows is
// the host work a GPU step pays on top of its kernels.
// usage: bench_scheduler MODEL.gguf [streams=1024] [tokens=512]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <future>

#include "multipole/multipole.h"

namespace {

using namespace mp;

class NullBackend final : public Backend {
 public:
  NullBackend(const Config& c, int slots) : c_(c), pos_(slots, 0), used_(slots, false) {}
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
    std::vector<SampledToken> out(chunks.size());
    for (size_t i = 0; i < chunks.size(); ++i) {
      pos_[chunks[i].slot] += static_cast<int64_t>(chunks[i].tokens.size());
      // Ordinary text pieces, never EOS: ids 300.. of the vocabulary.
      if (specs[i].params) out[i].token = 300 + static_cast<int>(pos_[chunks[i].slot] % 4000);
    }
    return out;
  }

 private:
  Config c_;
  std::vector<int64_t> pos_;
  std::vector<bool> used_;
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: bench_scheduler MODEL.gguf [streams] [tokens]\n");
    return 2;
  }
  const int streams = argc > 2 ? std::atoi(argv[2]) : 1024;
  const int tokens = argc > 3 ? std::atoi(argv[3]) : 512;
  auto model = Model::load(argv[1]);
  NullBackend backend(model->config(), streams);
  SamplingParams sp;
  sp.temperature = 0.8f, sp.top_k = 0, sp.top_p = 1.0f, sp.min_p = 0.0f;
  const std::vector<int> prompt = model->tokenizer().encode("The history of the", true);

  // The floor: the same steps with nothing around them.
  double floor_s;
  {
    std::vector<int> slots, next(streams, 5);
    std::vector<SeqChunk> step;
    std::vector<SampleSpec> specs(streams, SampleSpec{&sp, {}, 0.5, 0});
    for (int i = 0; i < streams; ++i) {
      slots.push_back(backend.alloc_slot());
      step.push_back({slots[i], std::span<const int>(&next[i], 1), false});
    }
    const auto t0 = std::chrono::steady_clock::now();
    for (int t = 0; t < tokens; ++t) {
      const auto got = backend.forward_sample(step, specs);
      for (int i = 0; i < streams; ++i) next[i] = got[i].token;
    }
    floor_s = seconds_since(t0);
    for (int s : slots) backend.free_slot(s);
  }

  Scheduler sched(backend, model->tokenizer(), {.max_queue = streams});
  std::vector<std::future<void>> done;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < streams; ++i) {
    auto p = std::make_shared<std::promise<void>>();
    done.push_back(p->get_future());
    CompletionRequest r;
    r.prompt = prompt;
    r.sampling = sp;
    r.sampling.seed = i;
    r.max_tokens = tokens;
    r.ignore_eos = true;
    r.on_event = [p](const CompletionEvent& e) {
      if (e.done) p->set_value();
      return true;
    };
    sched.submit(std::move(r));
  }
  for (auto& d : done) d.wait();
  const double s = seconds_since(t0);
  const double n = double(streams) * tokens;
  const SchedulerStats st = sched.stats();
  std::printf("| streams | tokens each | scheduler tokens/s | bare loop tokens/s | scheduler us per "
              "token | steps |\n|---|---|---|---|---|---|\n");
  std::printf("| %d | %d | %.0f | %.0f | %.3f | %llu |\n", streams, tokens, n / s, n / floor_s,
              (s - floor_s) / n * 1e6, static_cast<unsigned long long>(st.steps));
  return 0;
}
