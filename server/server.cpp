#include "server.h"

#include <httplib.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <condition_variable>
#include <cstdio>
#include <future>
#include <mutex>
#include <optional>

#include "common/api.h"
#include "playground.h"

namespace mp {

using api::json;

namespace {

// The process's resident memory (RSS), from /proc/self/statm; 0 where there is none.
uint64_t resident_bytes() {
  unsigned long long pages = 0, resident = 0;
  FILE* f = std::fopen("/proc/self/statm", "r");
  if (!f) return 0;
  const int got = std::fscanf(f, "%llu %llu", &pages, &resident);
  std::fclose(f);
  return got == 2 ? resident * static_cast<uint64_t>(sysconf(_SC_PAGESIZE)) : 0;
}

// Seconds as httplib's (seconds, microseconds).
std::pair<time_t, time_t> sec_usec(double s) {
  const auto us = static_cast<time_t>(std::llround(s * 1e6));
  return {us / 1000000, us % 1000000};
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// A Prometheus histogram with fixed buckets (seconds). Lock-free: every streamed token is
// observed on one of the scheduler's event threads, which must not queue on one another.
struct Histogram {
  static constexpr std::array<double, 11> bounds = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                    0.5,   1,    2.5,   5,    10};
  std::array<std::atomic<uint64_t>, bounds.size() + 1> counts{};
  std::atomic<double> sum{0};
  void observe(double v) {
    size_t i = 0;
    while (i < bounds.size() && v > bounds[i]) ++i;
    counts[i].fetch_add(1, std::memory_order_relaxed);
    sum.fetch_add(v, std::memory_order_relaxed);
  }
  std::string render(const std::string& name, const std::string& help) const {
    std::string o = "# HELP " + name + " " + help + "\n# TYPE " + name + " histogram\n";
    uint64_t cum = 0;
    for (size_t i = 0; i < bounds.size(); ++i) {
      cum += counts[i].load(std::memory_order_relaxed);
      char b[64];
      std::snprintf(b, sizeof b, "%g", bounds[i]);
      o += name + "_bucket{le=\"" + b + "\"} " + std::to_string(cum) + "\n";
    }
    cum += counts.back().load(std::memory_order_relaxed);  // the count: +Inf's bucket
    o += name + "_bucket{le=\"+Inf\"} " + std::to_string(cum) + "\n";
    o += name + "_sum " + std::to_string(sum.load(std::memory_order_relaxed)) + "\n" + name +
         "_count " + std::to_string(cum) + "\n";
    return o;
  }
};

// True on the threads that answer connections the server has no room for (OverflowingPool).
thread_local bool t_refuse = false;

// httplib's thread pool, bounded: a connection that finds every worker busy (each streaming
// client holds one) and `slack` connections already waiting is not queued behind streams that may
// run for minutes; one of a few refusal threads answers it at once with 503.
class OverflowingPool final : public httplib::TaskQueue {
 public:
  OverflowingPool(size_t workers, size_t slack, size_t refusers)
      : room_(workers + slack), serve_(workers), refuse_(refusers) {}
  void enqueue(std::function<void()> fn) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (taken_ == room_) {
        refuse_.enqueue([fn = std::move(fn)] {
          t_refuse = true;
          fn();
        });
        return;
      }
      ++taken_;  // waiting or being served
    }
    serve_.enqueue([this, fn = std::move(fn)] {
      static thread_local const bool batch = (set_batch_scheduling("mp-http"), true);
      (void)batch;
      fn();
      std::lock_guard<std::mutex> lock(mu_);
      --taken_;
    });
  }
  void shutdown() override {
    serve_.shutdown();
    refuse_.shutdown();
  }

 private:
  std::mutex mu_;
  size_t taken_ = 0;
  const size_t room_;
  httplib::ThreadPool serve_, refuse_;
};

// Events of one HTTP request's completions, from the scheduler's event thread to the HTTP thread.
// The HTTP thread swaps `events` with a vector of its own, so both keep their room: no
// allocation per token once a stream runs. The event thread wakes the HTTP thread only for what
// it must write: a stream's first event, every `tokens_per_write` events after it, and final
// events (a request that does not stream waits for its final events alone).
struct Channel {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::pair<int, CompletionEvent>> events;  // (choice index, event)
  int open = 0;                                        // choices not yet done
  bool woken = false;                                  // the first wake happened
  std::atomic<bool> abandoned{false};                  // the client went away
};

// A completion's hold on its session: the position before the turn, the lease until the turn is
// stored (or given up).
struct SessionTurn {
  std::optional<sessions::Sessions::Lease> lease;
  int64_t fed_before = 0;  // tokens in the session's state before this turn
  // Stores the turn when the request finished with its state; releases the session either way.
  // Returns the session's info, or null when nothing was stored.
  json settle(const CompletionEvent& e) {
    json out = nullptr;
    if (lease && e.state) {
      try {
        const sessions::Info info = lease->commit(
            {e.state, e.unfed_token, fed_before + e.prompt_tokens + e.completion_tokens});
        out = {{"id", info.id}, {"position", info.position}};
      } catch (const std::exception& err) {  // the text went out; say the turn was not kept
        out = {{"id", lease->id()}, {"error", std::string("not stored: ") + err.what()}};
      }
    }
    lease.reset();
    return out;
  }
};

json session_json(const sessions::Info& i) {
  return {{"id", i.id},         {"object", "session"},    {"position", i.position},
          {"bytes", i.bytes},   {"created", i.created},   {"updated", i.updated},
          {"busy", i.busy}};
}

}  // namespace

struct Server::Impl {
  std::shared_ptr<const Model> model;
  Scheduler& sched;
  ServerOptions opts;
  httplib::Server http;
  int bound_port = -1;
  socket_t listen_fd = -1;
  // cpp-httplib 0.11 listens with a backlog of 5: a burst of clients overflowed it (connections
  // dropped by the kernel, some clients failing). Listening again only resizes the queue.
  bool widen_backlog() const { return listen_fd >= 0 && ::listen(listen_fd, SOMAXCONN) == 0; }
  std::atomic<uint64_t> next_request{1};
  std::atomic<int> streams{0};  // streaming responses open
  std::atomic<uint64_t> stream_writes{0};
  // Events a stream's write gathers (ServerOptions::stream_interval): a thread wake and a write
  // per token cost the host ~30 us of CPU, which at 1,024 streams and 400k tokens/s is more
  // cores than a GPU host has to spare beside the step loop.
  size_t tokens_per_write() const {
    if (opts.stream_interval > 0) return static_cast<size_t>(opts.stream_interval);
    return static_cast<size_t>(std::min(4, 1 + streams.load(std::memory_order_relaxed) / 256));
  }
  std::mutex metrics_mu;
  std::map<int, uint64_t> responses;  // by status
  Histogram ttft, itl;
  chat::Format chat_format;
  const SamplingParams sampling_defaults;  // a request's, before its own fields
  std::unique_ptr<sessions::Sessions> sessions;

  Impl(std::shared_ptr<const Model> m, Scheduler& s, ServerOptions o, std::string* warning)
      : model(std::move(m)),
        sched(s),
        opts(std::move(o)),
        chat_format(chat::format_for(*model, opts.chat_template, warning)),
        sampling_defaults(api::request_sampling_defaults(model->recommended_sampling())) {
    if (opts.ctx_limit <= 0) opts.ctx_limit = model->config().n_ctx_train;
    if (!opts.state_dir.empty() && !opts.session_store.empty())
      throw Error("a state directory and a session store exclude each other: choose one");
    std::unique_ptr<sessions::Store> store =
        !opts.session_store.empty()
            ? sessions::redis_store(sessions::parse_redis_url(opts.session_store, opts.redis))
        : !opts.state_dir.empty() ? sessions::directory_store(opts.state_dir)
                                  : nullptr;
    std::vector<std::string> problems;
    sessions = std::make_unique<sessions::Sessions>(model->identity(), std::move(store),
                                                    opts.sessions, &problems);
    for (const auto& p : problems) std::fprintf(stderr, "warning: skipped %s\n", p.c_str());
    if (opts.http_threads <= 0) {
      const SchedulerStats st = sched.stats();
      opts.http_threads = st.slots + st.max_queue + 64;
    }
    http.new_task_queue = [n = opts.http_threads] { return new OverflowingPool(n, 16, 4); };
    http.set_payload_max_length(opts.max_body);
    // Slow clients (docs/RELIABILITY.md): a read or a write that makes no progress for its
    // timeout fails, which closes the connection; a failed write of a stream cancels its requests
    // (release() below), so a reader that stopped reading frees its slot. httplib's 5 s defaults
    // were too short for a streaming client that a loaded machine leaves unscheduled a while.
    const auto [read_s, read_us] = sec_usec(opts.read_timeout);
    const auto [write_s, write_us] = sec_usec(opts.write_timeout);
    http.set_read_timeout(read_s, read_us);
    http.set_write_timeout(write_s, write_us);
    http.set_keep_alive_timeout(std::max<time_t>(1, std::lround(opts.keep_alive_timeout)));
    // Keep the listening socket, to raise its backlog after bind (below).
    http.set_socket_options([this](socket_t sock) {
      httplib::default_socket_options(sock);
      // Accepted sockets inherit it: a token's small write must not wait for the client's
      // delayed ACK of the previous one (Nagle's algorithm, up to 40 ms).
      const int one = 1;
      setsockopt(sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      // A fixed send buffer (the kernel's grows to 4 MiB): what a client that stopped reading
      // holds, and how much is written before the write timeout starts to count.
      const int send_buffer = static_cast<int>(opts.send_buffer);
      if (send_buffer > 0) setsockopt(sock, SOL_SOCKET, SO_SNDBUF, &send_buffer, sizeof send_buffer);
      listen_fd = sock;
    });
    http.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
      if (t_refuse) {  // no thread to serve it: answered before its body is read
        res.set_header("Connection", "close");
        api::ApiError overloaded(503, "the server is at its connection limit; try again later",
                                 "", "server_overloaded", "server_error");
        overloaded.retry_after_s = 1;
        error(res, overloaded);
        return httplib::Server::HandlerResponse::Handled;
      }
      if (declared_body(req) > opts.max_body) {  // refused before a byte of it is read
        error_and_close(res, too_large());
        return httplib::Server::HandlerResponse::Handled;
      }
      if (opts.api_key.empty() || req.path == "/health")
        return httplib::Server::HandlerResponse::Unhandled;
      if (req.get_header_value("Authorization") != "Bearer " + opts.api_key) {
        error(res, api::ApiError(401, "invalid or missing API key", "", "invalid_api_key",
                                 "authentication_error"));
        return httplib::Server::HandlerResponse::Handled;
      }
      return httplib::Server::HandlerResponse::Unhandled;
    });
    // Statuses httplib sets itself (413 for oversized bodies, 404, ...) get an OpenAI body too.
    http.set_error_handler([this](const httplib::Request&, httplib::Response& res) {
      if (!res.body.empty() || res.has_header("Content-Type")) return;  // ours already
      const std::string msg = res.status == 413   ? "the request body is too large"
                              : res.status == 404 ? "no such endpoint"
                                                  : "request failed";
      error(res, api::ApiError(res.status, msg, "", res.status == 413 ? "request_too_large" : ""));
    });
    http.set_logger([this](const httplib::Request& req, const httplib::Response& res) {
      {
        std::lock_guard<std::mutex> lock(metrics_mu);
        ++responses[res.status];
      }
      if (this->opts.access_log)
        std::fprintf(stderr, "%s %s %s %d %s\n", req.remote_addr.c_str(), req.method.c_str(),
                     req.path.c_str(), res.status, res.get_header_value("X-Request-Id").c_str());
    });
    http.Get("/health", [](const httplib::Request&, httplib::Response& res) {
      res.set_content("{\"status\":\"ok\"}", "application/json");
    });
    http.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
      json j = {{"object", "list"},
                {"data",
                 {{{"id", opts.model_name},
                   {"object", "model"},
                   {"created", 0},
                   {"owned_by", "multipole"}}}}};
      res.set_content(api::dump(j), "application/json");
    });
    // llama-server's /props, the part that applies: the sampling a request gets where it sets no
    // field (the model's recommendation over the API's defaults; the playground shows it).
    http.Get("/props", [this](const httplib::Request&, httplib::Response& res) {
      const SamplingParams& d = sampling_defaults;
      auto real = [](float v) { return std::round(double(v) * 1e6) / 1e6; };  // 0.8, not 0.800000011
      const json params = {{"temperature", real(d.temperature)},
                           {"top_k", d.top_k},
                           {"top_p", real(d.top_p)},
                           {"min_p", real(d.min_p)},
                           {"repeat_penalty", real(d.repetition_penalty)},
                           {"repeat_last_n", d.penalty_last_n},
                           {"presence_penalty", real(d.presence_penalty)},
                           {"frequency_penalty", real(d.frequency_penalty)}};
      json j = {{"model", opts.model_name},
                {"n_ctx", opts.ctx_limit},
                {"default_generation_settings", {{"params", params}}}};
      res.set_content(api::dump(j), "application/json");
    });
    http.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      res.set_content(metrics(), "text/plain; version=0.0.4");
    });
    post("/tokenize", [this](const httplib::Request& req, httplib::Response& res) {
      handle(res, [&] {
        const json b = parse_body(req);
        if (!b.contains("content") || !b["content"].is_string())
          throw api::ApiError(400, "'content' must be a string", "content");
        const auto special = b.find("add_special");
        if (special != b.end() && !special->is_boolean())
          throw api::ApiError(400, "'add_special' must be a boolean", "add_special");
        const bool bos = special != b.end() && special->get<bool>();
        res.set_content(api::dump({{"tokens", model->tokenizer().encode(
                                                  b["content"].get<std::string>(), bos)}}),
                        "application/json");
      });
    });
    post("/detokenize", [this](const httplib::Request& req, httplib::Response& res) {
      handle(res, [&] {
        const json b = parse_body(req);
        if (!b.contains("tokens") || !b["tokens"].is_array())
          throw api::ApiError(400, "'tokens' must be an array of token ids", "tokens");
        std::vector<int> ids;
        for (const auto& t : b["tokens"]) {
          if (!t.is_number_integer() || t.get<long long>() < 0 ||
              t.get<long long>() >= model->config().vocab_size)
            throw api::ApiError(400, "'tokens' holds an invalid token id", "tokens");
          ids.push_back(t.get<int>());
        }
        res.set_content(api::dump({{"content", model->tokenizer().decode(ids)}}),
                        "application/json");
      });
    });
    post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
      handle(res, [&] { completions(req, res, false); });
    });
    post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
      handle(res, [&] { completions(req, res, true); });
    });
    post("/v1/sessions", [this](const httplib::Request& req, httplib::Response& res) {
      handle(res, [&] { create_session(req, res); });
    });
    http.Get("/v1/sessions", [this](const httplib::Request&, httplib::Response& res) {
      json data = json::array();
      for (const auto& i : sessions->list()) data.push_back(session_json(i));
      res.set_content(api::dump({{"object", "list"}, {"data", data}}), "application/json");
    });
    http.Get(R"(/v1/sessions/([A-Za-z0-9_-]+))",
             [this](const httplib::Request& req, httplib::Response& res) {
               handle(res, [&] {
                 res.set_content(api::dump(session_json(sessions->info(path_session(req)))),
                                 "application/json");
               });
             });
    http.Delete(R"(/v1/sessions/([A-Za-z0-9_-]+))",
                [this](const httplib::Request& req, httplib::Response& res) {
                  handle(res, [&] {
                    sessions->remove(path_session(req));
                    res.set_content(api::dump({{"id", req.matches[1]},
                                               {"object", "session.deleted"},
                                               {"deleted", true}}),
                                    "application/json");
                  });
                });
    post(R"(/v1/sessions/([A-Za-z0-9_-]+)/fork)",
              [this](const httplib::Request& req, httplib::Response& res) {
                handle(res, [&] {
                  const json b = req.body.empty() ? json::object() : parse_body(req);
                  const sessions::Info i = sessions->fork(path_session(req), string_field(b, "id"));
                  res.set_content(api::dump(session_json(i)), "application/json");
                });
              });
    http.Get("/", [](const httplib::Request&, httplib::Response& res) {
      res.set_content(playground_html(), "text/html; charset=utf-8");
    });
  }

  // The Content-Length a request declares; 0 without one.
  static uint64_t declared_body(const httplib::Request& req) {
    const std::string v = req.get_header_value("Content-Length");
    return v.empty() ? 0 : std::strtoull(v.c_str(), nullptr, 10);
  }
  api::ApiError too_large() const {
    return api::ApiError(413,
                         "the request body is larger than the server's limit of " +
                             std::to_string(opts.max_body) + " bytes (--max-body)",
                         "", "request_too_large");
  }

  // Answers `e` and drops the connection without reading what the client still sends (the rest
  // of an oversized or late body, which would otherwise be read as the next request). httplib
  // 0.11 has no call for it: a content provider that fails once the answer is written closes it.
  void error_and_close(httplib::Response& res, const api::ApiError& e) {
    res.status = e.status;
    res.set_header("Connection", "close");
    auto body = std::make_shared<const std::string>(api::dump(e.body()));
    res.set_content_provider(body->size(), "application/json",
                             [body](size_t offset, size_t, httplib::DataSink& sink) {
                               sink.write(body->data() + offset, body->size() - offset);
                               return false;
                             });
  }

  // A POST endpoint. Its body is read here, not by httplib (which reads a chunked body or one
  // without a length whole, whatever its size): at most max_body bytes, and all of it within
  // body_timeout, so that a client sending a byte a second does not hold a thread for hours.
  void post(const char* path,
            std::function<void(const httplib::Request&, httplib::Response&)> handler) {
    http.Post(path, [this, handler = std::move(handler)](const httplib::Request& req,
                                                         httplib::Response& res,
                                                         const httplib::ContentReader& read) {
      httplib::Request with_body = req;
      const double deadline = now_s() + opts.body_timeout;
      bool large = false, late = false;
      const bool whole = read([&](const char* data, size_t n) {
        large = with_body.body.size() + n > opts.max_body;
        late = now_s() > deadline;
        if (large || late) return false;
        with_body.body.append(data, n);
        return true;
      });
      if (large) return error_and_close(res, too_large());
      if (late)
        return error_and_close(
            res, api::ApiError(408,
                               "the request body did not arrive within " +
                                   api::dump(opts.body_timeout) + " s (--body-timeout)",
                               "", "request_timeout"));
      if (!whole)
        return error_and_close(res, api::ApiError(400,
                                                  "the request body could not be read: the "
                                                  "client stopped sending it, or its chunked "
                                                  "encoding is malformed"));
      handler(with_body, res);
    });
  }

  // One access-log line per finished completion: request id, tokens and timings from the
  // request's arrival (t0; `submitted`: parsed and handed to the scheduler).
  void log_completion(const std::string& id, int prompt_tokens, int completion_tokens, double t0,
                      double submitted, double first_token, bool stream) {
    if (!opts.access_log) return;
    const double total = now_s() - t0;
    std::fprintf(stderr,
                 "%s %s prompt_tokens=%d completion_tokens=%d parse_ms=%.1f ttft_ms=%.1f "
                 "total_ms=%.1f tokens_per_s=%.1f\n",
                 id.c_str(), stream ? "stream" : "plain", prompt_tokens, completion_tokens,
                 (submitted - t0) * 1e3, first_token > 0 ? (first_token - t0) * 1e3 : 0.0,
                 total * 1e3, completion_tokens / std::max(total, 1e-9));
  }

  static std::string string_field(const json& b, const char* key) {
    if (!b.is_object()) throw api::ApiError(400, "the request body must be a JSON object");
    if (!b.contains(key) || b[key].is_null()) return "";
    if (!b[key].is_string())
      throw api::ApiError(400, std::string("'") + key + "' must be a string", key);
    return b[key].get<std::string>();
  }

  // The session a request names: `named` (the body's `field`, or the path's id) or the
  // X-Session-Id header, which routers hash on (deploy/haproxy.cfg) and which works whatever the
  // body's size: either one, or both equal; two different ones are refused.
  static std::string session_of(const httplib::Request& req, const std::string& named,
                                const char* field) {
    const std::string header = req.get_header_value("X-Session-Id");
    if (header.empty() || header == named) return named;
    if (named.empty()) return header;
    throw api::ApiError(400,
                        "the X-Session-Id header names session '" + header + "' but the request's " +
                            field + " names '" + named + "'",
                        field, "session_mismatch");
  }
  static std::string path_session(const httplib::Request& req) {
    return session_of(req, req.matches[1], "path");
  }

  // POST /v1/sessions {"id"?, "prompt"?}: a new session, empty or holding the prompt's state.
  void create_session(const httplib::Request& req, httplib::Response& res) {
    const json b = req.body.empty() ? json::object() : parse_body(req);
    sessions::Sessions::Lease lease = sessions->create(session_of(req, string_field(b, "id"), "id"));
    sessions::State state;
    try {
      if (b.contains("prompt") && !b["prompt"].is_null()) {
        api::CompletionsCall call = api::parse_completions(
            {{"prompt", b["prompt"]}, {"max_tokens", 0}}, model->tokenizer(), opts.ctx_limit,
            sampling_defaults);
        if (call.requests.size() != 1)
          throw api::ApiError(400, "a session starts from one prompt", "prompt");
        CompletionRequest& r = call.requests[0];
        r.keep_state = true;
        state.position = static_cast<int64_t>(r.prompt.size());
        std::promise<CompletionEvent> done;
        r.on_event = [&done](const CompletionEvent& e) {
          if (e.done) done.set_value(e);
          return true;
        };
        sched.submit(std::move(r));
        const CompletionEvent e = done.get_future().get();
        if (!e.state) throw api::ApiError(500, "reading the prompt failed: " + e.finish_reason,
                                          "prompt", "", "server_error");
        state.bytes = e.state;
      }
      lease.commit(state);
    } catch (...) {
      const std::string id = lease.id();
      { auto gone = std::move(lease); }  // released, then removed: it never held anything
      sessions->remove(id);
      throw;
    }
    const std::string id = lease.id();
    { auto done = std::move(lease); }
    res.set_content(api::dump(session_json(sessions->info(id))), "application/json");
  }

  // A completion on a session: its state, then the unfed token of its last turn and the new
  // prompt (its BOS dropped once the session holds tokens).
  std::shared_ptr<SessionTurn> begin_turn(api::CompletionsCall& call) {
    if (call.requests.size() != 1)
      throw api::ApiError(400, "a request on a session has one prompt and n = 1", "n");
    auto turn = std::make_shared<SessionTurn>();
    turn->lease.emplace(sessions->acquire(call.session));
    const sessions::State& st = turn->lease->state();
    turn->fed_before = st.position - (st.unfed_token >= 0 ? 1 : 0);
    std::vector<int>& prompt = call.requests[0].prompt;
    const Tokenizer& tok = model->tokenizer();
    if (st.position > 0 && !prompt.empty() && tok.add_bos() && prompt.front() == tok.bos())
      prompt.erase(prompt.begin());
    if (st.unfed_token >= 0) prompt.insert(prompt.begin(), st.unfed_token);
    if (prompt.empty())
      throw api::ApiError(400, "the prompt is empty", call.chat ? "messages" : "prompt");
    call.prompt_tokens[0] = static_cast<int>(prompt.size());
    call.requests[0].start_state = st.bytes;
    call.requests[0].keep_state = true;
    return turn;
  }

  static json parse_body(const httplib::Request& req) { return api::parse_body(req.body); }

  void error(httplib::Response& res, const api::ApiError& e) {
    res.status = e.status;
    if (e.retry_after_s > 0) res.set_header("Retry-After", std::to_string(e.retry_after_s));
    res.set_content(api::dump(e.body()), "application/json");
  }

  template <class F>
  void handle(httplib::Response& res, F&& f) {
    try {
      f();
    } catch (const api::ApiError& e) {
      error(res, e);
    } catch (const BusyError& e) {  // the queue is full: a slot frees within seconds
      api::ApiError busy(429, e.what(), "", "rate_limit_exceeded", "rate_limit_error");
      busy.retry_after_s = 1;
      error(res, busy);
    } catch (const Error& e) {
      error(res, api::ApiError(400, e.what()));
    } catch (const std::exception& e) {
      error(res, api::ApiError(500, e.what(), "", "", "server_error"));
    }
  }

  // /v1/completions and /v1/chat/completions: the same machinery, api.* shapes the objects.
  void completions(const httplib::Request& req, httplib::Response& res, bool chat) {
    const double t0 = now_s();
    api::CompletionsCall call =
        chat ? api::parse_chat_completions(parse_body(req), chat_format, opts.ctx_limit,
                                           sampling_defaults)
             : api::parse_completions(parse_body(req), model->tokenizer(), opts.ctx_limit,
                                      sampling_defaults);
    call.session = session_of(req, call.session, "session");
    const std::shared_ptr<SessionTurn> turn = call.session.empty() ? nullptr : begin_turn(call);
    const std::string id = api::id_prefix(call) + std::to_string(next_request++);
    res.set_header("X-Request-Id", id);
    const auto created = std::chrono::duration_cast<std::chrono::seconds>(
                             std::chrono::system_clock::now().time_since_epoch())
                             .count();
    auto ch = std::make_shared<Channel>();
    std::vector<uint64_t> ids;
    double submitted = 0;
    // Per choice, touched only by the event thread of its request.
    auto last = std::make_shared<std::vector<double>>(call.requests.size(), 0.0);
    auto first_token = std::make_shared<std::atomic<double>>(0.0);  // of any choice
    ch->open = static_cast<int>(call.requests.size());
    try {
      for (size_t i = 0; i < call.requests.size(); ++i) {
        auto& r = call.requests[i];
        r.on_event = [this, ch, i, t0, last, first_token,
                      streaming = call.stream](const CompletionEvent& e) {
          if (e.token >= 0) {  // timing of real tokens
            const double t = now_s();
            double none = 0;
            first_token->compare_exchange_strong(none, t, std::memory_order_relaxed);
            ((*last)[i] == 0 ? ttft : itl).observe(t - ((*last)[i] == 0 ? t0 : (*last)[i]));
            (*last)[i] = t;
          }
          bool wake;
          {
            std::lock_guard<std::mutex> lock(ch->mu);
            ch->events.emplace_back(static_cast<int>(i), e);
            if (e.done) --ch->open;
            wake = e.done || (streaming && (!ch->woken || ch->events.size() >= tokens_per_write()));
            ch->woken |= wake;
          }
          if (wake) ch->cv.notify_one();
          return !ch->abandoned.load();
        };
        ids.push_back(sched.submit(std::move(r)));
      }
      submitted = now_s();
    } catch (...) {
      for (auto rid : ids) sched.cancel(rid);
      throw;
    }
    const Tokenizer& tok = model->tokenizer();
    const int prompt_total = api::prompt_total(call);
    // A completion object around its choices, the same in every response shape.
    auto completion = [=, this](json choices) {
      return api::response(call, id, created, opts.model_name, std::move(choices));
    };
    // The client went away (a write failed): its requests stop at the next step.
    auto release = [this, ch, ids](bool success) {
      if (success) return;
      ch->abandoned = true;
      for (auto rid : ids) sched.cancel(rid);
    };
    if (!call.stream) {
      // The JSON body goes out once every choice is done. Until then a space every 200 ms
      // (leading whitespace is valid JSON) is the write that finds out whether the client is
      // still there, so that one that disconnects frees its slots as a streaming one does.
      auto choices = std::make_shared<std::vector<api::ChoiceBuilder>>(call.requests.size());
      auto session = std::make_shared<json>(nullptr);
      res.set_chunked_content_provider(
          "application/json",
          [=, this, &tok](size_t, httplib::DataSink& sink) {
            std::unique_lock<std::mutex> lock(ch->mu);
            ch->cv.wait_for(lock, std::chrono::milliseconds(200), [&] { return ch->open == 0; });
            for (const auto& [i, e] : ch->events) {
              (*choices)[i].add(e, tok, call);
              if (e.done && turn) *session = turn->settle(e);
            }
            ch->events.clear();
            if (ch->open > 0) {
              lock.unlock();
              return sink.write(" ", 1);
            }
            lock.unlock();
            json out = api::final_response(call, id, created, opts.model_name, *choices);
            if (turn) out["session"] = *session;
            const std::string body = api::dump(out);
            if (!sink.write(body.data(), body.size())) return false;
            sink.done();
            log_completion(id, prompt_total, out["usage"]["completion_tokens"], t0, submitted,
                           first_token->load(), false);
            return true;
          },
          release);
      return;
    }
    res.set_header("Cache-Control", "no-cache");
    auto offsets = std::make_shared<std::vector<size_t>>(call.requests.size(), 0);
    auto started = std::make_shared<std::vector<bool>>(call.requests.size(), false);
    auto completion_total = std::make_shared<int>(0);
    auto cached_total = std::make_shared<int>(0);
    auto session = std::make_shared<json>(nullptr);
    auto sent_done = std::make_shared<bool>(false);
    const api::TokenChunk token_chunk(id, created, opts.model_name);
    // The HTTP thread's buffers, kept between wakes; while they live the stream counts as open.
    struct Buffers {
      explicit Buffers(std::atomic<int>& open) : streams(open) { ++streams; }
      ~Buffers() { --streams; }
      std::atomic<int>& streams;
      std::vector<std::pair<int, CompletionEvent>> batch;
      std::string chunk;
    };
    auto buffers = std::make_shared<Buffers>(streams);
    res.set_chunked_content_provider(
        "text/event-stream",
        [=, this, &tok](size_t, httplib::DataSink& sink) {
          std::unique_lock<std::mutex> lock(ch->mu);
          ch->cv.wait_for(lock, std::chrono::milliseconds(200),
                          [&] { return !ch->events.empty() || ch->open == 0; });
          auto& batch = buffers->batch;
          batch.swap(ch->events);
          const bool finished = ch->open == 0;
          lock.unlock();
          // Everything that arrived since the last wake goes out in one write.
          std::string& chunk = buffers->chunk;
          chunk.clear();
          auto add = [&](const json& j) { chunk += "data: " + api::dump(j) + "\n\n"; };
          for (auto& [i, e] : batch) {
            if ((*started)[i] && !e.done && !call.chat && !call.continuous_usage &&
                !call.with_logprobs &&  // a plain token of a completion: the fast way
                token_chunk.append_event(chunk, i, e.text)) {
              (*offsets)[i] += e.text.size();
              continue;
            }
            json event =
                completion({api::stream_choice(call, i, e, !(*started)[i], (*offsets)[i], tok)});
            (*started)[i] = true;
            if (call.continuous_usage) {
              event["usage"] = api::usage(call.prompt_tokens[i / call.n], e.completion_tokens);
              event["usage"]["state_bytes"] = e.state_bytes;
            }
            (*offsets)[i] += e.text.size();
            if (e.done) {
              *completion_total += e.completion_tokens;
              *cached_total += e.cached_tokens;
              if (turn) *session = turn->settle(e);
            }
            add(event);
          }
          batch.clear();
          const bool last = finished && !*sent_done;
          if (last) {
            *sent_done = true;
            if (call.include_usage) {
              json usage = completion(json::array());
              usage["usage"] = api::usage(prompt_total, *completion_total, *cached_total);
              if (turn) usage["session"] = *session;
              add(usage);
            }
            chunk += "data: [DONE]\n\n";
          }
          if (!chunk.empty()) {
            stream_writes.fetch_add(1, std::memory_order_relaxed);
            if (!sink.write(chunk.data(), chunk.size())) return false;
          }
          if (last) {
            sink.done();
            log_completion(id, prompt_total, *completion_total, t0, submitted, first_token->load(),
                           true);
          }
          return true;
        },
        release);
  }

  std::string metrics() {
    const SchedulerStats s = sched.stats();
    std::string o;
    auto gauge = [&](const char* name, const char* help, double v, const char* type = "gauge") {
      o += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n" +
           name + " " + std::to_string(v) + "\n";
    };
    gauge("multipole_slots", "Sequence slots of the backend.", s.slots);
    gauge("multipole_slots_in_use", "Slots holding a running request.", s.slots_in_use);
    gauge("multipole_queue_depth", "Requests waiting for a slot.", s.queued);
    gauge("multipole_requests_finished_total", "Completions finished.", double(s.requests_done),
          "counter");
    gauge("multipole_prompt_tokens_total", "Prompt tokens processed.", double(s.prompt_tokens),
          "counter");
    gauge("multipole_generated_tokens_total", "Tokens generated.", double(s.completion_tokens),
          "counter");
    gauge("multipole_steps_total", "Batched model steps (every device's together).",
          double(s.steps), "counter");
    gauge("multipole_step_seconds_total", "Time the model thread spent in steps.", s.step_seconds,
          "counter");
    gauge("multipole_backend_seconds_total", "Part of it inside the backend.", s.backend_seconds,
          "counter");
    gauge("multipole_stream_writes_total",
          "Writes of streamed events to clients (several tokens' events each under load).",
          double(stream_writes.load()), "counter");
    const PrefixCacheStats& p = s.prefix;
    gauge("multipole_prefix_cache_lookups_total", "Prompts looked up in the prefix cache.",
          double(p.lookups), "counter");
    gauge("multipole_prefix_cache_hits_total", "Prompts that restored a cached prefix.",
          double(p.hits), "counter");
    gauge("multipole_prefix_cache_cached_tokens_total", "Prompt tokens restored, not read.",
          double(p.cached_tokens), "counter");
    gauge("multipole_prefix_cache_evictions_total", "Snapshots dropped for room.",
          double(p.evictions), "counter");
    gauge("multipole_prefix_cache_entries_in_slots", "Snapshots in backend slots.",
          double(p.entries_in_slots));
    gauge("multipole_prefix_cache_entries_on_host", "Snapshots in host memory.",
          double(p.entries_on_host));
    gauge("multipole_prefix_cache_host_bytes", "Host memory the snapshots hold.",
          double(p.host_bytes));
    const sessions::Stats ss = sessions->stats();
    gauge("multipole_sessions", "Sessions held.", double(ss.sessions));
    gauge("multipole_sessions_busy", "Sessions with a request running.", double(ss.busy));
    gauge("multipole_sessions_memory_bytes", "Session states in memory.", double(ss.memory_bytes));
    gauge("multipole_sessions_store_bytes", "Session records in the state directory.",
          double(ss.store_bytes));
    gauge("multipole_sessions_evicted_total", "Sessions removed for room.", double(ss.evicted),
          "counter");
    gauge("multipole_session_loads_total", "Session states read from the store.",
          double(ss.loads), "counter");
    gauge("multipole_session_saves_total", "Session states written to the store.",
          double(ss.saves), "counter");
    gauge("multipole_session_store_errors_total",
          "Session store operations that found it unavailable.", double(ss.store_errors),
          "counter");
    gauge("multipole_session_store_calls_total", "Operations on the session store.",
          double(ss.store_calls), "counter");
    gauge("multipole_session_store_seconds_total", "Time the session store's operations took.",
          ss.store_seconds, "counter");
    gauge("multipole_session_misses_total", "Requests naming a session that does not exist.",
          double(ss.misses), "counter");
    if (!s.devices.empty()) {
      // Per device of a replicated backend, labelled by device.
      auto per_device = [&](const char* name, const char* help, const char* type, auto value) {
        o += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
        for (const DeviceStats& d : s.devices)
          o += std::string(name) + "{device=\"" + d.device + "\"} " + std::to_string(value(d)) +
               "\n";
      };
      per_device("multipole_device_slots", "Sequence slots of the device.", "gauge",
                 [](const DeviceStats& d) { return d.slots; });
      per_device("multipole_device_slots_in_use", "Its slots holding a running request.", "gauge",
                 [](const DeviceStats& d) { return d.slots_in_use; });
      per_device("multipole_device_tokens_total", "Tokens run on it (prompt and generated).",
                 "counter", [](const DeviceStats& d) { return d.tokens; });
      per_device("multipole_device_busy_seconds_total", "Time its forward calls took.", "counter",
                 [](const DeviceStats& d) { return d.busy_seconds; });
      per_device("multipole_device_steps_total", "Forward calls run on it (its step loop's).",
                 "counter", [](const DeviceStats& d) { return d.steps; });
    }
    gauge("process_resident_memory_bytes", "Resident memory of the server process (RSS).",
          double(resident_bytes()));
    std::lock_guard<std::mutex> lock(metrics_mu);
    o += "# HELP multipole_http_responses_total HTTP responses by status.\n"
         "# TYPE multipole_http_responses_total counter\n";
    for (const auto& [code, n] : responses)
      o += "multipole_http_responses_total{status=\"" + std::to_string(code) + "\"} " +
           std::to_string(n) + "\n";
    o += ttft.render("multipole_time_to_first_token_seconds", "Time from request to first token.");
    o += itl.render("multipole_inter_token_latency_seconds", "Time between consecutive tokens.");
    return o;
  }
};

Server::Server(std::shared_ptr<const Model> model, Scheduler& scheduler, ServerOptions opts) {
  std::string warning;
  impl_ = std::make_unique<Impl>(std::move(model), scheduler, std::move(opts), &warning);
  if (!warning.empty()) std::fprintf(stderr, "warning: %s\n", warning.c_str());
}
Server::~Server() { stop(); }

bool Server::bind() {
  if (impl_->opts.port == 0) {
    impl_->bound_port = impl_->http.bind_to_any_port(impl_->opts.host);
  } else if (impl_->http.bind_to_port(impl_->opts.host, impl_->opts.port)) {
    impl_->bound_port = impl_->opts.port;
  }
  return impl_->bound_port > 0 && impl_->widen_backlog();
}
int Server::port() const { return impl_->bound_port; }
void Server::run() { impl_->http.listen_after_bind(); }
void Server::stop() { impl_->http.stop(); }

}  // namespace mp
