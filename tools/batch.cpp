// multipole-batch: offline completions over a JSONL file, every request through the scheduler
// at once. Input lines are OpenAI Batch requests ({"custom_id", "method": "POST", "url":
// "/v1/completions" | "/v1/chat/completions", "body"}) or, the older shape, a request body with
// an "id". Results are appended as they finish, one write per line, so a run killed at any point
// keeps every result written; --resume drops a torn last line and failed results, then runs what
// has no result yet.
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <set>

#include "common/api.h"
#include "common/args.h"
#include "common/backend_args.h"
#include "common/batch_lines.h"
#include "common/cache_args.h"

using mp::api::json;
using mp::batch::Line;

namespace {

// --resume: keeps the finished results of `path` (dropping error records and a torn last line),
// rewritten atomically, and returns their keys.
std::set<std::string> compact_output(const std::string& path) {
  std::set<std::string> done;
  std::ifstream prev(path);
  if (!prev) return done;
  std::string kept;
  for (std::string line; std::getline(prev, line);) {
    if (prev.eof()) break;  // no final newline: torn by a kill mid-write
    std::string key;
    try {
      if (!mp::batch::done_record(json::parse(line), &key) || !done.insert(key).second) continue;
    } catch (...) {
      continue;
    }
    kept += line + "\n";
  }
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc | std::ios::binary);
    out << kept;
    out.flush();
    if (!out) throw mp::Error("cannot write '" + tmp + "'");
  }
  const int fd = ::open(tmp.c_str(), O_RDONLY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
  std::filesystem::rename(tmp, path);
  return done;
}

std::string duration(double s) {
  char b[32];
  if (s >= 3600)
    std::snprintf(b, sizeof b, "%dh%02dm", int(s / 3600), int(s / 60) % 60);
  else if (s >= 60)
    std::snprintf(b, sizeof b, "%dm%02ds", int(s / 60), int(s) % 60);
  else
    std::snprintf(b, sizeof b, "%.0fs", s);
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  mp::cli::Args a(argc, argv, {"resume", "cpu-fp32-products", "cpu-bf16-activations"},
                  "usage: multipole-batch --input IN.jsonl --output OUT.jsonl [options]\n"
                  "  Lines: OpenAI Batch requests (custom_id, method, url, body) or request\n"
                  "  bodies with an \"id\". Results are appended as they finish.\n"
                  "  -m, --model FILE GGUF model (default models/default.gguf)\n"
                  "  --resume         keep OUT.jsonl's finished results, run only the rest\n"
                  "  --slots N        sequences generated at once, per device (default 16)\n"
                  "  --ctx-limit N    most prompt tokens per request (default: trained length)\n"
                  "  --threads N      CPU threads (default: all cores)\n"
                  "  --backend KIND   auto, cpu or cuda (default auto)\n"
                  "  --devices LIST   GPUs to run replicas on: all or 0,1,... (default 0)\n"
                  "  --chat-template-file FILE  Jinja chat template replacing the model's\n" +
                      std::string(mp::cli::kCpuFp32ProductsUsage) + mp::cli::kPrefixCacheUsage,
                  {{"m", "model"}});
  std::set<std::string> known = {"input",   "output",  "model",  "resume",
                                 "slots",   "ctx-limit", "threads", "backend",
                                 "devices", "chat-template-file", "cpu-fp32-products",
                                 "cpu-bf16-activations"};
  known.insert(mp::cli::kPrefixCacheOptions.begin(), mp::cli::kPrefixCacheOptions.end());
  a.check_known(known);
  if (!a.has("input") || !a.has("output")) a.fail("--input and --output are required");
  try {
    auto model = mp::Model::load(a.str("model", "models/default.gguf"));
    const mp::Tokenizer& tok = model->tokenizer();
    std::string template_source, warning;
    if (a.has("chat-template-file")) {
      std::ifstream f(a.str("chat-template-file"));
      if (!f) throw mp::Error("cannot read '" + a.str("chat-template-file") + "'");
      template_source.assign(std::istreambuf_iterator<char>(f), {});
    }
    const mp::chat::Format format = mp::chat::format_for(*model, template_source, &warning);
    if (!warning.empty()) std::fprintf(stderr, "warning: %s\n", warning.c_str());
    const std::string out_path = a.str("output");
    const std::set<std::string> done =
        a.has("resume") ? compact_output(out_path) : std::set<std::string>{};
    std::ifstream in(a.str("input"));
    if (!in) throw mp::Error("cannot read '" + a.str("input") + "'");
    std::vector<Line> lines;
    std::vector<size_t> numbers;  // 1-based line numbers, for ids
    size_t number = 0;
    for (std::string text; std::getline(in, text);) {
      ++number;
      if (text.find_first_not_of(" \t\r") == std::string::npos) continue;
      lines.push_back(mp::batch::read_line(text, number));
      numbers.push_back(number);
    }

    const int fd = ::open(out_path.c_str(),
                          O_WRONLY | O_CREAT | O_APPEND | (a.has("resume") ? 0 : O_TRUNC), 0644);
    if (fd < 0) throw mp::Error("cannot write '" + out_path + "'");
    mp::BackendOptions bo = mp::cli::backend_from_args(a, 16);
    mp::SchedulerOptions so;
    so.max_queue = static_cast<int>(lines.size()) + 1;
    mp::cli::prefix_cache_from_args(a, bo, so);
    auto backend = mp::make_backend(model, bo);
    mp::Scheduler sched(*backend, tok, so);
    const int64_t ctx_limit = a.integer("ctx-limit", model->config().n_ctx_train);
    const mp::SamplingParams sampling =
        mp::api::request_sampling_defaults(model->recommended_sampling());
    const long long created = std::chrono::duration_cast<std::chrono::seconds>(
                                  std::chrono::system_clock::now().time_since_epoch())
                                  .count();

    struct Job {
      mp::api::CompletionsCall call;
      std::vector<mp::api::ChoiceBuilder> choices;
      int open = 0;
    };
    std::vector<Job> jobs(lines.size());
    std::mutex mu;
    std::condition_variable cv;
    std::vector<json> ready;  // records not yet written
    uint64_t tokens = 0;
    size_t skipped = 0, failed = 0, pending = 0;
    std::set<std::string> seen = done;
    for (size_t i = 0; i < lines.size(); ++i) {
      const Line& l = lines[i];
      if (done.count(l.key)) {
        ++skipped;
        continue;
      }
      auto fail_line = [&](const json& body, int status) {
        std::lock_guard<std::mutex> lock(mu);
        ++failed;
        ready.push_back(mp::batch::record(l, numbers[i], body, status));
      };
      if (!l.error.empty()) {
        fail_line(mp::api::ApiError(400, l.error).body(), 0);
        continue;
      }
      if (!seen.insert(l.key).second) {
        fail_line(
            mp::api::ApiError(
                400, "duplicate " + std::string(l.openai ? "custom_id " : "id ") + l.key.substr(2))
                .body(),
            0);
        continue;
      }
      Job& job = jobs[i];
      try {
        job.call = l.chat ? mp::api::parse_chat_completions(l.body, format, ctx_limit, sampling)
                          : mp::api::parse_completions(l.body, tok, ctx_limit, sampling);
        if (!job.call.session.empty()) throw mp::api::no_sessions();
      } catch (const mp::api::ApiError& e) {
        fail_line(e.body(), e.status);
        continue;
      }
      job.choices.resize(job.call.requests.size());
      job.open = static_cast<int>(job.call.requests.size());
      {
        std::lock_guard<std::mutex> lock(mu);
        ++pending;
      }
      const std::string model_name = mp::batch::model_name(l);
      for (size_t k = 0; k < job.call.requests.size(); ++k) {
        auto& r = job.call.requests[k];
        r.on_event = [&, i, k, model_name](const mp::CompletionEvent& e) {
          std::lock_guard<std::mutex> lock(mu);
          Job& jb = jobs[i];
          jb.choices[k].add(e, tok, jb.call);
          if (e.token >= 0) ++tokens;
          if (e.done && --jb.open == 0) {
            const std::string id = mp::api::id_prefix(jb.call) + std::to_string(numbers[i]);
            ready.push_back(
                mp::batch::record(lines[i], numbers[i],
                       mp::api::final_response(jb.call, id, created, model_name, jb.choices), 200));
            --pending;
            cv.notify_all();
          }
          return true;
        };
        sched.submit(std::move(r));
      }
    }
    // Writes what is ready, one write() per record: a kill leaves at most a torn last line.
    const bool tty = isatty(STDERR_FILENO);
    const size_t total = lines.size() - skipped;
    size_t written = 0;
    const auto t0 = std::chrono::steady_clock::now();
    auto last_sync = t0;
    std::unique_lock<std::mutex> lock(mu);
    while (true) {
      cv.wait_for(lock, std::chrono::milliseconds(500),
                  [&] { return !ready.empty() || pending == 0; });
      std::vector<json> batch;
      batch.swap(ready);
      const bool finished = pending == 0;
      const uint64_t toks = tokens;
      lock.unlock();
      for (const auto& r : batch) {
        const std::string line = mp::api::dump(r) + "\n";
        if (::write(fd, line.data(), line.size()) != ssize_t(line.size()))
          throw mp::Error("cannot write '" + out_path + "'");
        ++written;
      }
      const auto now = std::chrono::steady_clock::now();
      if (finished || now - last_sync > std::chrono::seconds(1)) {
        ::fdatasync(fd);  // also safe against a power loss, at most a second behind
        last_sync = now;
      }
      const double s = std::chrono::duration<double>(now - t0).count();
      if (tty) {
        const double eta = written > 0 ? s / double(written) * double(total - written) : 0;
        std::fprintf(stderr, "\r[%zu/%zu] %llu tokens, %.1f tokens/s, ETA %s   ", written, total,
                     static_cast<unsigned long long>(toks), toks / std::max(s, 1e-9),
                     written > 0 ? duration(eta).c_str() : "?");
      }
      if (finished) break;
      lock.lock();
    }
    ::close(fd);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr,
                 "%s%zu results written (%zu failed), %zu already done; %llu tokens in %s\n",
                 tty ? "\n" : "", written, failed, skipped, static_cast<unsigned long long>(tokens),
                 duration(s).c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
