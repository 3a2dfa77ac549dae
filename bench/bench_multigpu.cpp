// Many GPUs against one, in markdown tables with the ratio. Replicas: aggregate decode
// throughput on the first device alone and on all, at the same batch per device, three ways: each
// device stepped by its own thread without waiting for the others (what the scheduler's step
// loop per device does), all devices in one common step (the lock-step baseline), and a backend
// of its own per device stepped by its own thread (the replica layer left out: what sharing one
// process costs without it). With
// --tensor-parallel N: decode at the same batch and prefill of one long prompt, one GPU against
// the model split over N. Decode is sampled as the server's API does.
// usage: bench_multigpu MODEL.gguf [--backend cuda] [--devices all] [--batch 256] [--steps 1000]
//                       [--context 1000] [--threads N] [--tensor-parallel N [--prompt 65536]]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <future>
#include <random>

#include "common/args.h"
#include "multipole/multipole.h"

using namespace mp;

namespace {

struct DecodeRun {
  double tokens_per_s, p50_ms, p99_ms;  // the step's time at the median and the 99th percentile
};

// `steps` decode steps of the slots after a prompt of `context` tokens each.
DecodeRun decode(Backend& b, const std::vector<int>& slots, int context, int steps) {
  const Config& c = b.config();
  std::mt19937 rng(2);
  const int batch = static_cast<int>(slots.size());
  std::vector<std::vector<int>> prompts(batch, std::vector<int>(context));
  std::vector<SeqChunk> pre;
  for (int i = 0; i < batch; ++i) {
    for (auto& x : prompts[i]) x = 3 + int(rng() % (c.vocab_size - 3));
    pre.push_back({slots[i], prompts[i], false});
  }
  b.forward(pre);
  SamplingParams sp;
  sp.temperature = 0.8f, sp.top_k = 0, sp.top_p = 1.0f, sp.min_p = 0.0f;
  std::vector<int> next(batch, 5);
  std::vector<SeqChunk> step;
  std::vector<SampleSpec> specs(batch, SampleSpec{&sp, {}, 0.5, 0});
  for (int i = 0; i < batch; ++i)
    step.push_back({slots[i], std::span<const int>(&next[i], 1), false});
  b.forward_sample(step, specs);  // warm-up (CUDA graphs captured)
  std::vector<double> ms(steps);
  const auto t0 = std::chrono::steady_clock::now();
  for (int s = 0; s < steps; ++s) {
    const auto s0 = std::chrono::steady_clock::now();
    const auto sampled = b.forward_sample(step, specs);
    for (int i = 0; i < batch; ++i) next[i] = sampled[i].token;
    ms[s] = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - s0).count();
  }
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::sort(ms.begin(), ms.end());
  return {double(batch) * steps / sec, ms[steps / 2], ms[std::min(steps - 1, steps * 99 / 100)]};
}

// Every slot of the backend, allocated.
std::vector<int> all_slots(Backend& b) {
  std::vector<int> slots;
  for (int s; (s = b.alloc_slot()) >= 0;) slots.push_back(s);
  return slots;
}

// Runs at once: their tokens/s summed, the slowest one's step times.
DecodeRun sum_of(std::vector<std::future<DecodeRun>>& runs) {
  DecodeRun total{0, 0, 0};
  for (auto& f : runs) {
    const DecodeRun r = f.get();
    total.tokens_per_s += r.tokens_per_s;
    total.p50_ms = std::max(total.p50_ms, r.p50_ms);
    total.p99_ms = std::max(total.p99_ms, r.p99_ms);
  }
  return total;
}

// Each device's slots decoded by a thread of their own, as the scheduler's step loops do.
DecodeRun decode_per_device(Backend& b, int context, int steps) {
  std::vector<std::vector<int>> by_device(b.n_devices());
  for (int s : all_slots(b)) by_device[b.slot_device(s)].push_back(s);
  std::vector<std::future<DecodeRun>> runs;
  for (const auto& slots : by_device)
    runs.push_back(std::async(std::launch::async, [&b, &slots, context, steps] {
      return decode(b, slots, context, steps);
    }));
  return sum_of(runs);
}

// Tokens per second of one prompt of `n` tokens read in chunks of `chunk`.
double prefill_tokens_per_s(Backend& b, int n, int chunk) {
  std::mt19937 rng(3);
  std::vector<int> ids(n);
  for (auto& x : ids) x = 3 + int(rng() % (b.config().vocab_size - 3));
  const int slot = b.alloc_slot();
  SeqChunk warm{slot, std::span<const int>(ids).first(std::min(n, chunk)), false};
  b.forward({&warm, 1});
  b.reset_slot(slot);
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < n; i += chunk) {
    SeqChunk c{slot, std::span<const int>(ids).subspan(i, std::min(chunk, n - i)), false};
    b.forward({&c, 1});
  }
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  b.free_slot(slot);
  return n / sec;
}

}  // namespace

int main(int argc, char** argv) {
  cli::Args a(argc, argv, {},
              "usage: bench_multigpu MODEL.gguf [--backend cuda] [--devices all] [--batch 256]\n"
              "                      [--steps 1000] [--context 1000] [--threads N]\n"
              "  decode tokens/s on the first device alone and on all, --batch per device\n");
  a.check_known(
      {"backend", "devices", "batch", "steps", "context", "threads", "tensor-parallel", "prompt"});
  if (a.positional().size() != 1) a.fail("one model file expected");
  try {
    auto model = Model::load(a.positional()[0]);
    BackendOptions o;
    o.kind = a.str("backend", "cuda");
    o.n_slots = static_cast<int>(a.integer("batch", 256));
    o.n_threads = static_cast<int>(a.integer("threads", 0));
    o.max_context = 4096;
    const std::vector<int> all = parse_devices(a.str("devices", "all"), o.kind);
    const int steps = static_cast<int>(a.integer("steps", 1000));
    const int context = static_cast<int>(a.integer("context", 1000));
    if (o.n_slots <= 0 || steps <= 0 || context <= 0) a.fail("--batch, --steps, --context > 0");
    if (a.has("tensor-parallel")) {
      const int n = static_cast<int>(a.integer("tensor-parallel", 2));
      const int prompt = static_cast<int>(a.integer("prompt", 65536));
      std::printf(
          "\n## Tensor parallel %d: decode at batch %d (context ~%d), prefill of %d tokens "
          "(%s)\n\n| backend | decode tokens/s | vs one | prefill tokens/s | vs one |\n"
          "|---|---|---|---|---|\n",
          n, o.n_slots, context, prompt, model->config().summary().c_str());
      double one_decode = 0, one_prefill = 0;
      for (int tp : {0, n}) {
        o.tensor_parallel = tp;
        o.devices =
            tp ? std::vector<int>(all.begin(), all.begin() + std::min<size_t>(n, all.size()))
               : std::vector<int>{all[0]};
        if (tp && int(o.devices.size()) != n) a.fail("--devices lists fewer than N devices");
        o.max_context = std::max(4096, prompt);
        auto b = make_backend(model, o);
        const double pre = prefill_tokens_per_s(*b, prompt, b->prefill_tokens_per_step());
        const double dec = decode(*b, all_slots(*b), context, steps).tokens_per_s;
        if (!tp) one_decode = dec, one_prefill = pre;
        std::printf("| %s | %.0f | %.2fx | %.0f | %.2fx |\n", b->name().c_str(), dec,
                    dec / one_decode, pre, pre / one_prefill);
        std::fflush(stdout);
      }
      return 0;
    }
    std::printf("\n## Replicas: decode at batch %d per device, context ~%d (%s)\n\n", o.n_slots,
                context, model->config().summary().c_str());
    std::printf(
        "| devices | stepped | batch | tokens/s (aggregate) | vs one device | step ms p50 / p99 |\n"
        "|---|---|---|---|---|---|\n");
    std::string list;
    for (int d : all) {
      if (!list.empty()) list += ',';
      list += std::to_string(d);
    }
    double one = 0;
    auto row = [&](const std::string& devices, const char* how, int batch, const DecodeRun& r) {
      if (one == 0) one = r.tokens_per_s;
      std::printf("| %s | %s | %d | %.0f | %.2fx | %.3f / %.3f |\n", devices.c_str(), how, batch,
                  r.tokens_per_s, r.tokens_per_s / one, r.p50_ms, r.p99_ms);
      std::fflush(stdout);
    };
    o.devices = {all[0]};
    auto alone = make_backend(model, o);
    row(std::to_string(all[0]), "alone", o.n_slots,
        decode(*alone, all_slots(*alone), context, steps));
    alone.reset();
    if (all.size() > 1) {
      o.devices = all;
      // Each device by its own thread (the scheduler's step loops; slowest device's step times),
      // then every device in one common step (the lock-step baseline).
      auto b = make_backend(model, o);
      row(list, "a loop per device", b->n_slots(), decode_per_device(*b, context, steps));
      b = make_backend(model, o);
      row(list, "one common step", b->n_slots(), decode(*b, all_slots(*b), context, steps));
      b.reset();
      // A backend of its own per device, each stepped by its own thread in this one process:
      // the replica layer left out, so that its cost and the process's shared cost separate.
      std::vector<std::unique_ptr<Backend>> own;
      for (int d : all) {
        o.devices = {d};
        own.push_back(make_backend(model, o));
      }
      std::vector<std::future<DecodeRun>> runs;
      for (auto& p : own)
        runs.push_back(std::async(std::launch::async, [&p, context, steps] {
          return decode(*p, all_slots(*p), context, steps);
        }));
      row(list, "a backend per device", o.n_slots * int(all.size()), sum_of(runs));
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
