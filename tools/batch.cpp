// multipole-batch: offline completions. JSONL in (one request per line, the /v1/completions
// fields plus an "id"), JSONL out in input order; every request goes through the scheduler at once.
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <map>
#include <mutex>
#include <set>

#include "common/api.h"
#include "common/args.h"

using mp::api::json;

int main(int argc, char** argv) {
  mp::cli::Args a(argc, argv, {"resume"},
                  "usage: multipole-batch --input IN.jsonl --output OUT.jsonl [options]\n"
                  "  -m, --model FILE GGUF model (default models/default.gguf)\n"
                  "  --resume         skip ids already in OUT.jsonl and append to it\n"
                  "  --slots N        sequences generated at once (default 16)\n"
                  "  --ctx-limit N    most prompt tokens per request (default: trained length)\n"
                  "  --threads N      CPU threads (default: all cores)\n"
                  "  --backend KIND   auto, cpu or cuda (default auto)\n",
                  {{"m", "model"}});
  a.check_known({"input", "output", "model", "resume", "slots", "ctx-limit", "threads", "backend"});
  if (!a.has("input") || !a.has("output")) a.fail("--input and --output are required");
  try {
    auto model = mp::Model::load(a.str("model", "models/default.gguf"));
    const mp::Tokenizer& tok = model->tokenizer();
    std::set<std::string> done_ids;
    if (a.has("resume")) {
      std::ifstream prev(a.str("output"));
      for (std::string line; std::getline(prev, line);) {
        try {
          const json j = json::parse(line);
          if (j.contains("id") && !j.contains("error")) done_ids.insert(j["id"].dump());
        } catch (...) {  // a torn last line from an interrupted run is redone
        }
      }
    }
    std::ifstream in(a.str("input"));
    if (!in) throw mp::Error("cannot read '" + a.str("input") + "'");
    std::vector<std::string> lines;
    for (std::string line; std::getline(in, line);)
      if (!line.empty()) lines.push_back(line);

    mp::BackendOptions bo;
    bo.kind = a.str("backend", "auto");
    bo.n_slots = static_cast<int>(a.integer("slots", 16));
    bo.n_threads = static_cast<int>(a.integer("threads", 0));
    auto backend = mp::make_backend(model, bo);
    mp::SchedulerOptions so;
    so.max_queue = static_cast<int>(lines.size()) + 1;
    mp::Scheduler sched(*backend, tok, so);
    const int64_t ctx_limit = a.integer("ctx-limit", model->config().n_ctx_train);

    struct Job {
      json id;
      std::optional<json> result;  // set when finished (or on a bad line)
      std::vector<mp::api::ChoiceBuilder> choices;
      int open = 0, prompt_tokens = 0;
      bool echo = false;
      std::vector<std::string> prompts;
      int n = 1;
    };
    std::vector<Job> jobs(lines.size());
    std::mutex mu;
    std::condition_variable cv;
    uint64_t tokens = 0;
    size_t skipped = 0;
    for (size_t i = 0; i < lines.size(); ++i) {
      Job& job = jobs[i];
      try {
        const json j = json::parse(lines[i]);
        job.id =
            j.is_object() && j.contains("id") ? j["id"] : json("line-" + std::to_string(i + 1));
        if (done_ids.count(job.id.dump())) {
          ++skipped;
          job.result = json(nullptr);  // already in the output
          continue;
        }
        auto call = mp::api::parse_completions(j, tok, ctx_limit);
        job.choices.resize(call.requests.size());
        job.open = static_cast<int>(call.requests.size());
        job.echo = call.echo;
        job.prompts = call.prompts;
        job.n = call.n;
        for (size_t k = 0; k < call.requests.size(); ++k)
          job.prompt_tokens += call.prompt_tokens[k / call.n];
        for (size_t k = 0; k < call.requests.size(); ++k) {
          auto& r = call.requests[k];
          r.on_event = [&, i, k](const mp::CompletionEvent& e) {
            std::lock_guard<std::mutex> lock(mu);
            Job& jb = jobs[i];
            jb.choices[k].add(e, tok, false);
            if (e.token >= 0) ++tokens;
            if (e.done && --jb.open == 0) {
              json out = {{"id", jb.id}, {"choices", json::array()}};
              int completion = 0;
              for (size_t c = 0; c < jb.choices.size(); ++c) {
                out["choices"].push_back(jb.choices[c].choice(
                    int(c), false, jb.echo ? jb.prompts[c / jb.n] : std::string()));
                completion += jb.choices[c].completion_tokens;
              }
              out["completion"] = out["choices"][0]["text"];
              out["finish_reason"] = out["choices"][0]["finish_reason"];
              out["usage"] = mp::api::usage(jb.prompt_tokens, completion);
              jb.result = out;
              cv.notify_all();
            }
            return true;
          };
          sched.submit(std::move(r));
        }
      } catch (const mp::api::ApiError& e) {
        job.result = json{{"id", job.id}, {"error", e.body()["error"]}};
      } catch (const std::exception& e) {
        job.result = json{{"id", job.id.is_null() ? json("line-" + std::to_string(i + 1)) : job.id},
                          {"error", {{"message", e.what()}, {"type", "invalid_request_error"}}}};
      }
    }
    std::ofstream out(a.str("output"), a.has("resume") ? std::ios::app : std::ios::trunc);
    if (!out) throw mp::Error("cannot write '" + a.str("output") + "'");
    const auto t0 = std::chrono::steady_clock::now();
    size_t written = 0;
    std::unique_lock<std::mutex> lock(mu);
    while (written < jobs.size()) {
      cv.wait_for(lock, std::chrono::milliseconds(500));
      while (written < jobs.size() && jobs[written].result) {  // in input order
        if (!jobs[written].result->is_null()) out << mp::api::dump(*jobs[written].result) << "\n";
        ++written;
      }
      out.flush();
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::fprintf(stderr, "\r[%zu/%zu] %llu tokens, %.1f tokens/s   ", written, jobs.size(),
                   static_cast<unsigned long long>(tokens), tokens / std::max(s, 1e-9));
    }
    std::fprintf(stderr, "\n%zu requests (%zu skipped as already done)\n", jobs.size(), skipped);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
