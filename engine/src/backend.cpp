#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>

#include "backend_cpu.h"
#include "backend_cuda.h"
#include "backend_replicas.h"
#include "backend_tensor_parallel.h"
#include "device_threads.h"
#include "file_io.h"
#include "sampling.h"

namespace mp {

#ifdef MULTIPOLE_HAVE_CUDA
int cuda_device_count() { return cuda_device_count_present(); }
#else
int cuda_device_count() { return 0; }
#endif
bool cuda_available() { return cuda_device_count() > 0; }

std::vector<int> parse_devices(std::string_view spec, std::string_view kind) {
  const int present = kind == "cpu" ? 0 : cuda_device_count();
  std::vector<int> ids;
  if (spec == "all") {
    for (int i = 0; i < std::max(present, 1); ++i) ids.push_back(i);
    return ids;
  }
  const std::string s(spec);
  size_t at = 0;
  while (at <= s.size()) {
    const size_t end = std::min(s.find(',', at), s.size());
    const std::string item = s.substr(at, end - at);
    if (item.empty() || item.size() > 6 ||
        item.find_first_not_of("0123456789") != std::string::npos)
      throw Error("devices '" + s + "': expected 'all' or device numbers like 0,1 (got '" + item +
                  "')");
    const int id = std::stoi(item);
    if (std::find(ids.begin(), ids.end(), id) != ids.end())
      throw Error("devices '" + s + "': device " + item + " is listed twice");
    if (kind != "cpu" && present > 0 && id >= present)
      throw Error("devices '" + s + "': device " + item + " does not exist (" +
                  std::to_string(present) + " CUDA devices)");
    ids.push_back(id);
    at = end + 1;
  }
  return ids;
}

std::unique_ptr<Backend> make_backend(std::shared_ptr<const Model> model,
                                      const BackendOptions& opts) {
  if (opts.kind != "auto" && opts.kind != "cpu" && opts.kind != "cuda")
    throw Error("unknown backend '" + opts.kind + "' (expected auto, cpu or cuda)");
  for (size_t i = 0; i < opts.devices.size(); ++i)
    if (opts.devices[i] < 0 ||
        std::find(opts.devices.begin(), opts.devices.begin() + i, opts.devices[i]) !=
            opts.devices.begin() + i)
      throw Error("backend devices: " + std::to_string(opts.devices[i]) +
                  " is negative or listed twice");
  if (opts.tensor_parallel != 0) return make_tensor_parallel_backend(std::move(model), opts);
  if (opts.devices.size() > 1) {
    std::vector<std::unique_ptr<Backend>> parts;
    std::vector<std::string> names;
    bool gpu = false;
    for (int d : opts.devices) {
      BackendOptions one = opts;
      one.devices = {d};
      parts.push_back(make_backend(model, one));
      gpu = parts.back()->name().starts_with("cuda");
      names.push_back((gpu ? "cuda:" : "cpu:") + std::to_string(d));
    }
    return make_replica_backend(std::move(parts), std::move(names),
                                gpu ? DeviceThreads::kGpuSpin : std::chrono::microseconds{});
  }
  const int device = opts.devices.empty() ? 0 : opts.devices[0];
  if (opts.kind == "cpu")
    return make_cpu_backend(std::move(model), opts.n_slots, opts.n_threads,
                            CpuProducts::of(opts));
#ifdef MULTIPOLE_HAVE_CUDA
  if (const int present = cuda_device_count(); present > 0) {
    if (device >= present)
      throw Error("CUDA device " + std::to_string(device) + " does not exist (" +
                  std::to_string(present) + " present)");
    const int64_t ctx = opts.max_context > 0 ? opts.max_context : model->config().n_ctx_train;
    return make_cuda_backend(std::move(model), opts.n_slots, ctx, device);
  }
#endif
  if (opts.kind == "cuda")
    throw Error(
        "backend 'cuda' asked for, but this build has no CUDA backend or no GPU is present");
  if (device != 0)
    throw Error("device " + std::to_string(device) + " asked for, but no GPU is present");
  return make_cpu_backend(std::move(model), opts.n_slots, opts.n_threads,
                          CpuProducts::of(opts));
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
  if (spec.top_logprobs > 0) {
    const std::vector<float> lp = log_softmax(logits);
    t.logprob = lp[t.token];
    t.top_logprobs = top_logprobs(lp, spec.top_logprobs);
  } else {  // the same value without the vocabulary-long vector
    t.logprob = static_cast<float>(double(logits[t.token]) - log_sum_exp(logits));
  }
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

void Backend::start_sample(std::span<const SeqChunk> chunks, std::span<const SampleSpec> specs) {
  started_ = forward_sample(chunks, specs);
}

std::vector<SampledToken> Backend::finish_sample(std::span<const SeqChunk> /*chunks*/,
                                                 std::span<const SampleSpec> /*specs*/) {
  return std::move(started_);
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
      const size_t at = nll.size();
      nll.resize(at + n);
      // Rows in parallel: a log-sum-exp over the vocabulary per token is the host's whole work
      // (65,536 tokens of a 16,384-piece vocabulary: 1.1 G exponentials).
#pragma omp parallel for schedule(static)
      for (size_t t = 0; t < n; ++t) {
        const auto row = std::span<const float>(logits).subspan(t * V, V);
        double mx = -INFINITY, sum = 0;
        for (float x : row) mx = std::max(mx, double(x));
        for (float x : row) sum += std::exp(double(x) - mx);
        nll[at + t] = mx + std::log(sum) - row[tokens[i + t + 1]];
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
