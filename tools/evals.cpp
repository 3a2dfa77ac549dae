// multipole-evals: long-range evaluations of a model (engine/common/evals.h): perplexity by
// position on fixed text, the copy test and passkey retrieval, on any backend.
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <sstream>

#include "common/args.h"
#include "common/backend_args.h"
#include "common/evals.h"
#include "multipole/multipole.h"

namespace {
const char* kUsage =
    "usage: multipole-evals -m, --model FILE --text FILE [options]\n"
    "Long-range evaluations (docs/MODEL.md): prints a markdown table per task.\n"
    "  --text FILE           held-out documents separated by form feeds (prepare_corpus.py's\n"
    "                        val.txt); the position and copy tests read it\n"
    "  --tasks LIST          any of position,copy,passkey (default: all three)\n"
    "  --contexts LIST       position: contexts before each span\n"
    "                        (default 0,128,512,1024,2048,4096,8192,16384,32768,65536)\n"
    "  --span N              position: tokens per span (default 512)\n"
    "  --spans N             position: spans, the ends of the longest documents (default 4)\n"
    "  --passage N           copy: passage tokens (default 256)\n"
    "  --gaps LIST           copy: tokens of other text between the copies\n"
    "                        (default 128,256,...,32768)\n"
    "  --passages N          copy: passages (default 4)\n"
    "  --passkey-contexts L  passkey: prompt lengths (default 1024,2048,...,32768)\n"
    "  --depths LIST         passkey: where the key lies, 0 (start) to 1 (end)\n"
    "                        (default 0,0.25,0.5,0.75,1)\n"
    "  --trials N            passkey: keys per cell (default 5)\n"
    "  --seed N              passkey: the keys' seed (default 1)\n"
    "  --json-out FILE       also write the results as JSON\n"
    "  --chunk N             prefill chunk size (default 512)\n"
    "  --backend KIND        auto, cpu or cuda (default auto)\n"
    "  --threads N           CPU threads (default: all cores)\n";

template <class T>
std::vector<T> list(const mp::cli::Args& args, const std::string& name, std::vector<T> def) {
  if (!args.has(name)) return def;
  std::vector<T> out;
  std::stringstream ss(args.str(name));
  for (std::string item; std::getline(ss, item, ',');) {
    size_t used = 0;
    try {
      out.push_back(std::is_integral_v<T> ? T(std::stoll(item, &used)) : T(std::stod(item, &used)));
    } catch (...) {
    }
    if (used == 0 || used != item.size()) args.fail("--" + name + ": '" + item + "' is not a number");
  }
  if (out.empty()) args.fail("--" + name + " is empty");
  return out;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

int main(int argc, char** argv) {
  using namespace mp::evals;
  mp::cli::Args args(argc, argv, {"cpu-fp32-products", "cpu-bf16-activations"},
                     std::string(kUsage) + mp::cli::kCpuFp32ProductsUsage, {{"m", "model"}});
  args.check_known({"model", "text", "tasks", "contexts", "span", "spans", "passage", "gaps",
                    "passages", "passkey-contexts", "depths", "trials", "seed", "json-out", "chunk",
                    "backend", "threads", "cpu-fp32-products", "cpu-bf16-activations"});
  if (!args.positional().empty()) args.fail("unexpected argument '" + args.positional()[0] + "'");
  bool run[3] = {};
  {
    std::stringstream ss(args.str("tasks", "position,copy,passkey"));
    for (std::string t; std::getline(ss, t, ',');) {
      if (t == "position") run[0] = true;
      else if (t == "copy") run[1] = true;
      else if (t == "passkey") run[2] = true;
      else args.fail("--tasks: unknown task '" + t + "' (position, copy, passkey)");
    }
  }
  PositionOptions po;
  po.contexts = list(args, "contexts", po.contexts);
  po.span = int(args.integer("span", po.span));
  po.spans = int(args.integer("spans", po.spans));
  CopyOptions co;
  co.passage = int(args.integer("passage", co.passage));
  co.gaps = list(args, "gaps", co.gaps);
  co.passages = int(args.integer("passages", co.passages));
  PasskeyOptions ko;
  ko.contexts = list(args, "passkey-contexts", ko.contexts);
  ko.depths = list(args, "depths", ko.depths);
  ko.trials = int(args.integer("trials", ko.trials));
  ko.seed = uint64_t(args.integer("seed", 1));
  const int chunk = int(args.integer("chunk", 512));
  if ((run[0] || run[1]) && !args.has("text")) args.fail("the position and copy tests need --text");
  try {
    auto model = mp::Model::load(args.str("model", "models/default.gguf"));
    const auto& tok = model->tokenizer();
    Stream stream;
    if (run[0] || run[1]) {
      std::ifstream in(args.str("text"), std::ios::binary);
      if (!in) throw mp::Error("cannot read '" + args.str("text") + "'");
      stream = read_stream(tok, std::string(std::istreambuf_iterator<char>(in), {}));
    }
    // The longest sequence any task runs: exact attention keeps that many tokens per slot.
    int64_t longest = 0;
    if (run[0]) longest = std::max(longest, *std::max_element(po.contexts.begin(), po.contexts.end()) + po.span);
    if (run[1]) longest = std::max(longest, 1 + 2 * co.passage + co.gaps.back());
    if (run[2]) longest = std::max(longest, *std::max_element(ko.contexts.begin(), ko.contexts.end()) + 64);
    mp::BackendOptions bo = mp::cli::backend_from_args(args, 3);
    bo.max_context = longest + 1024;  // the passkey prompt's length is approximate
    auto backend = mp::make_backend(model, bo);
    std::fprintf(stderr, "model: %s (%s), backend %s\n", model->path().c_str(),
                 model->config().summary().c_str(), backend->name().c_str());
    if (!stream.docs.empty())
      std::fprintf(stderr, "held-out text: %zu tokens in %zu documents\n", stream.tokens.size(),
                   stream.docs.size());
    nlohmann::json out = {{"model", model->path()}, {"config", model->config().summary()},
                          {"backend", backend->name()}};
    if (run[0]) {
      const auto t0 = std::chrono::steady_clock::now();
      const auto r = position_eval(*backend, stream, po, chunk);
      std::printf("## Perplexity by position on fixed text (%d spans of %d tokens)\n\n%s\n",
                  po.spans, po.span, position_table(r).c_str());
      out["position"] = {{"contexts", r.contexts}, {"span", po.span}, {"span_starts", r.span_starts},
                         {"nll", r.nll}, {"mean_nll", r.mean_nll}, {"seconds", seconds_since(t0)}};
    }
    if (run[1]) {
      const auto t0 = std::chrono::steady_clock::now();
      const auto r = copy_eval(*backend, stream, co, chunk);
      std::printf("## Copy test (%d passages of %d tokens)\n\n%s\n", co.passages, co.passage,
                  copy_table(r, co.passage).c_str());
      nlohmann::json cases = nlohmann::json::array();
      for (const auto& c : r.cases) cases.push_back({c.passage, c.filler});
      out["copy"] = {{"gaps", r.gaps}, {"passage", co.passage}, {"cases", cases},
                     {"first_nll", r.first_nll}, {"second_nll", r.second_nll},
                     {"control_nll", r.control_nll},
                     {"seconds", seconds_since(t0)}};
    }
    if (run[2]) {
      const auto t0 = std::chrono::steady_clock::now();
      const auto cells = passkey_eval(*backend, tok, ko, chunk);
      std::printf("## Passkey retrieval (correct/trials by greedy decoding, and the key's mean "
                  "log-probability)\n\n%s\n", passkey_table(cells).c_str());
      nlohmann::json js = nlohmann::json::array();
      for (const auto& c : cells)
        js.push_back({{"context", c.context}, {"depth", c.depth}, {"tokens", c.tokens},
                      {"distance", c.distance}, {"trials", c.trials}, {"correct", c.correct},
                      {"mean_logprob", c.mean_logprob}});
      out["passkey"] = {{"cells", js}, {"seed", ko.seed}, {"seconds", seconds_since(t0)}};
    }
    std::fflush(stdout);
    if (args.has("json-out")) mp::write_file_atomic(args.str("json-out"), out.dump(1) + "\n");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
