#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>

#include "backend_cpu.h"
#include "file_io.h"
#include "sampling.h"

namespace mp {

#ifdef MULTIPOLE_HAVE_CUDA
std::unique_ptr<Backend> make_cuda_backend(std::shared_ptr<const Model> model, int n_slots,
                                           int64_t max_context);
bool cuda_device_present();
bool cuda_available() { return cuda_device_present(); }
#else
bool cuda_available() { return false; }
#endif

std::unique_ptr<Backend> make_backend(std::shared_ptr<const Model> model,
                                      const BackendOptions& opts) {
  if (opts.kind == "cpu") return make_cpu_backend(std::move(model), opts.n_slots, opts.n_threads);
  if (opts.kind != "auto" && opts.kind != "cuda")
    throw Error("unknown backend '" + opts.kind + "' (expected auto, cpu or cuda)");
#ifdef MULTIPOLE_HAVE_CUDA
  if (cuda_available()) {
    const int64_t ctx = opts.max_context > 0 ? opts.max_context : model->config().n_ctx_train;
    return make_cuda_backend(std::move(model), opts.n_slots, ctx);
  }
#endif
  if (opts.kind == "cuda")
    throw Error(
        "backend 'cuda' asked for, but this build has no CUDA backend or no GPU is present");
  return make_cpu_backend(std::move(model), opts.n_slots, opts.n_threads);
}

void check_sample_call(std::span<const SeqChunk> chunks, std::span<const SampleSpec> specs) {
  if (specs.size() != chunks.size()) throw Error("forward_sample: one spec per chunk");
  for (const SeqChunk& c : chunks)
    if (c.all_logits) throw Error("forward_sample: chunks must want their last row only");
  for (const SampleSpec& sp : specs)
    if (sp.params) sp.params->validate();
}

SampledToken sample_on_host(const SampleSpec& spec, std::span<const float> logits) {
  SampledToken t;
  t.token = pick_candidate(sample_candidates(*spec.params, logits, spec.penalties), spec.uniform);
  const std::vector<float> lp = log_softmax(logits);
  t.logprob = lp[t.token];
  if (spec.top_logprobs > 0) t.top_logprobs = top_logprobs(lp, spec.top_logprobs);
  return t;
}

std::vector<SampledToken> Backend::forward_sample(std::span<const SeqChunk> chunks,
                                                  std::span<const SampleSpec> specs) {
  check_sample_call(chunks, specs);
  const std::vector<float> logits = forward(chunks);
  const size_t V = config().vocab_size;
  std::vector<SampledToken> out(chunks.size());
  for (size_t i = 0; i < chunks.size(); ++i)
    if (specs[i].params)
      out[i] = sample_on_host(specs[i], std::span<const float>(logits).subspan(i * V, V));
  return out;
}

std::vector<double> token_nlls(Backend& b, std::span<const int> tokens, int chunk) {
  if (chunk <= 0) throw Error("token_nlls: chunk must be positive");
  const int slot = b.alloc_slot();
  if (slot < 0) throw Error("token_nlls: no free slot");
  const int V = b.config().vocab_size;
  std::vector<double> nll;
  try {
    for (size_t i = 0; i + 1 < tokens.size(); i += chunk) {
      // Feed tokens [i, i+n); their logits predict tokens [i+1, i+n].
      const size_t n = std::min(tokens.size() - 1 - i, size_t(chunk));
      SeqChunk c{slot, tokens.subspan(i, n), true};
      const std::vector<float> logits = b.forward({&c, 1});
      for (size_t t = 0; t < n; ++t) {
        const auto row = std::span<const float>(logits).subspan(t * V, V);
        double mx = -INFINITY, sum = 0;
        for (float x : row) mx = std::max(mx, double(x));
        for (float x : row) sum += std::exp(double(x) - mx);
        nll.push_back(mx + std::log(sum) - row[tokens[i + t + 1]]);
      }
    }
  } catch (...) {
    b.free_slot(slot);
    throw;
  }
  b.free_slot(slot);
  return nll;
}

void save_state_file(const Backend& b, int slot, const std::string& path) {
  const std::vector<uint8_t> bytes = b.save_slot(slot);
  write_file_atomic(path, {reinterpret_cast<const char*>(bytes.data()), bytes.size()});
}

void load_state_file(Backend& b, int slot, const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error("cannot read state file '" + path + "': " + std::strerror(errno));
  const std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(f)),
                                   std::istreambuf_iterator<char>());
  if (f.bad()) throw Error("reading state file '" + path + "' failed: " + std::strerror(errno));
  try {
    b.load_slot(slot, bytes);
  } catch (const Error& e) {
    throw Error("state file '" + path + "': " + e.what());
  }
}

}  // namespace mp
