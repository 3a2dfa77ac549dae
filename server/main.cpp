// multipole-server: OpenAI-compatible completions over HTTP with streaming.
#include <atomic>
#include <csignal>
#include <cstdlib>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <malloc.h>
#include <thread>

#include "common/args.h"
#include "common/backend_args.h"
#include "common/cache_args.h"
#include "server.h"

namespace {
std::atomic<bool> g_stop{false};
void on_signal(int) { g_stop = true; }
}  // namespace

int main(int argc, char** argv) {
  // glibc gives up to 8 malloc arenas per core to the server's ~140 threads; each arena's heap
  // then creeps up for many minutes as it meets the request mix's peaks (soak: +48 MiB in 5 min,
  // not levelling off). Two arenas level off within a minute (docs/RELIABILITY.md, soak).
  if (!std::getenv("MALLOC_ARENA_MAX")) mallopt(M_ARENA_MAX, 2);
  mp::cli::Args a(argc, argv, {"quiet", "log-steps", "cpu-fp32-products", "cpu-bf16-activations"},
                  "usage: multipole-server [options]\n"
                  "  -m, --model FILE  GGUF model (default models/default.gguf)\n"
                  "  --host ADDR       address to bind (default 127.0.0.1)\n"
                  "  --port N          port (default 8080)\n"
                  "  --slots N         sequences generated at once, per device (default 8)\n"
                  "  --max-queue N     requests that may wait for a slot (default 64)\n"
                  "  --ctx-limit N     most prompt tokens per request (default: trained length)\n"
                  "  --api-key KEY     require 'Authorization: Bearer KEY'\n"
                  "  --threads N       CPU threads for the model (default: all cores)\n"
                  "  --http-threads N  HTTP worker threads, one per open connection (default:\n"
                  "                    slots + max-queue + 64; connections beyond get 503)\n"
                  "  --event-threads N threads delivering tokens to the connections (default:\n"
                  "                    half the cores, 2 to 8)\n"
                  "  --stream-interval N  token events a stream's write gathers (default 0:\n"
                  "                    1 below 256 open streams, one more per 256, at most 4)\n"
                  "  --step-nice N     nice value of the model's step loops (default -10 where\n"
                  "                    allowed: root or CAP_SYS_NICE; else the process's)\n"
                  "  --prefill-per-step N  prompt tokens read per step, all requests together\n"
                  "                    (default: the backend's, 512 on the CPU, 65536 on CUDA)\n"
                  "  --max-body BYTES  largest request body (default 1048576); a larger one\n"
                  "                    gets 413 before it is read\n"
                  "  --read-timeout S  a connection whose client sends nothing for S seconds\n"
                  "                    while the server waits for its request closes (default 60)\n"
                  "  --write-timeout S a client that reads nothing of its response for S seconds\n"
                  "                    is dropped and its requests cancelled (default 60)\n"
                  "  --body-timeout S  a request body must arrive whole within S seconds, else\n"
                  "                    408 (default 60)\n"
                  "  --keep-alive-timeout S  an idle connection closes after S s (default 5)\n"
                  "  --send-buffer-kib N  socket send buffer of a connection (default 256;\n"
                  "                    0: the kernel's, which grows to 4 MiB)\n"
                  "  --backend KIND    auto, cpu or cuda (default auto)\n"
                  "  --devices LIST    GPUs to run replicas on: all or 0,1,... (default 0); new\n"
                  "                    requests go to the least loaded one\n"
                  "  --tensor-parallel N  split the model over N GPUs over NCCL (--devices then\n"
                  "                    lists N; default 0..N-1) or, with --backend cpu, N threads\n"
                  "  --name NAME       model id reported by /v1/models (default multipole)\n"
                  "  --chat-template-file FILE  Jinja chat template replacing the model's\n"
                  "  --state-dir DIR   keep sessions as files here, reloaded after a restart\n"
                  "                    (default: sessions in memory only)\n"
                  "  --max-sessions N  sessions kept; beyond, the least recently used go\n"
                  "                    (default 10000)\n"
                  "  --max-state-dir-mib N  cap on the session files (default: none)\n"
                  "  --session-memory-mib N  session states cached in memory when a state\n"
                  "                    directory holds them (default 256)\n"
                  "  --session-store redis://HOST[:PORT][/PREFIX]  sessions shared with other\n"
                  "                    servers in Redis (keys PREFIX<id>, default prefix\n"
                  "                    multipole:session:), instead of --state-dir\n"
                  "  --session-ttl-s N  a stored session expires N s after its last turn\n"
                  "                    (default 604800, a week; 0: never)\n"
                  "  --session-max-record-mib N  largest session record stored (default 64)\n"
                  "  --session-claim-s N  a request's claim on a session lapses after N s, if\n"
                  "                    its server died holding it (default 60)\n"
                  "  --quiet           no access log\n"
                  "  --log-steps       a line per model step on stderr: its rows, prompt tokens\n"
                  "                    and time (new sequences, backend, scheduler)\n" +
                      std::string(mp::cli::kCpuFp32ProductsUsage) + mp::cli::kPrefixCacheUsage,
                  {{"m", "model"}});
  std::set<std::string> known = {"model", "host", "port", "slots", "max-queue", "ctx-limit",
                                 "api-key", "threads", "http-threads", "prefill-per-step", "event-threads",
                                 "stream-interval", "step-nice",
                                 "backend", "devices", "tensor-parallel", "name", "quiet", "log-steps",
                                 "chat-template-file", "state-dir", "max-sessions",
                                 "max-state-dir-mib", "session-memory-mib", "max-body",
                                 "read-timeout", "write-timeout", "body-timeout",
                                 "keep-alive-timeout", "send-buffer-kib", "session-store",
                                 "session-ttl-s", "session-max-record-mib", "session-claim-s",
                                 "cpu-fp32-products", "cpu-bf16-activations"};
  known.insert(mp::cli::kPrefixCacheOptions.begin(), mp::cli::kPrefixCacheOptions.end());
  a.check_known(known);
  try {
    auto model = mp::Model::load(a.str("model", "models/default.gguf"));
    mp::BackendOptions bo = mp::cli::backend_from_args(a, 8);
    if (bo.n_slots <= 0) a.fail("--slots must be positive");
    bo.tensor_parallel = static_cast<int>(a.integer("tensor-parallel", 0));
    mp::SchedulerOptions so;
    so.max_queue = static_cast<int>(a.integer("max-queue", 64));
    so.max_prefill_per_step = static_cast<int>(a.integer("prefill-per-step", 0));
    so.log_steps = a.has("log-steps");
    so.event_threads = static_cast<int>(a.integer("event-threads", 0));
    const int step_nice = static_cast<int>(a.integer("step-nice", -10));
    if (step_nice < -20 || step_nice > 19) a.fail("--step-nice must be in -20..19");
    so.step_loop_nice = step_nice;
    if (so.event_threads < 0) a.fail("--event-threads must be 0 (automatic) or positive");
    mp::cli::prefix_cache_from_args(a, bo, so);
    auto backend = mp::make_backend(model, bo);
    mp::Scheduler sched(*backend, model->tokenizer(), so);
    mp::ServerOptions o;
    o.host = a.str("host", "127.0.0.1");
    o.port = static_cast<int>(a.integer("port", 8080));
    o.api_key = a.str("api-key");
    o.ctx_limit = a.integer("ctx-limit", 0);
    o.http_threads = static_cast<int>(a.integer("http-threads", 0));
    o.stream_interval = static_cast<int>(a.integer("stream-interval", 0));
    if (o.stream_interval < 0) a.fail("--stream-interval must be 0 (automatic) or positive");
    o.model_name = a.str("name", "multipole");
    const long long max_body = a.integer("max-body", static_cast<long long>(o.max_body));
    if (max_body <= 0) a.fail("--max-body must be positive");
    o.max_body = static_cast<size_t>(max_body);
    o.read_timeout = a.seconds("read-timeout", o.read_timeout);
    o.write_timeout = a.seconds("write-timeout", o.write_timeout);
    o.body_timeout = a.seconds("body-timeout", o.body_timeout);
    o.keep_alive_timeout = a.seconds("keep-alive-timeout", o.keep_alive_timeout);
    o.send_buffer = static_cast<int>(a.integer("send-buffer-kib", o.send_buffer >> 10)) << 10;
    if (a.has("chat-template-file")) {
      std::ifstream f(a.str("chat-template-file"));
      if (!f) throw mp::Error("cannot read '" + a.str("chat-template-file") + "'");
      o.chat_template.assign(std::istreambuf_iterator<char>(f), {});
    }
    o.access_log = !a.has("quiet");
    o.state_dir = a.str("state-dir");
    const long long max_sessions = a.integer("max-sessions", 10000),
                    dir_mib = a.integer("max-state-dir-mib", 0),
                    memory_mib = a.integer("session-memory-mib", 256);
    if (max_sessions <= 0 || dir_mib < 0 || memory_mib < 0)
      a.fail("--max-sessions must be positive, the MiB sizes >= 0");
    o.sessions.max_sessions = static_cast<size_t>(max_sessions);
    o.sessions.max_store_bytes = static_cast<size_t>(dir_mib) << 20;
    o.sessions.memory_bytes = static_cast<size_t>(memory_mib) << 20;
    o.session_store = a.str("session-store");
    const long long ttl = a.integer("session-ttl-s", o.redis.ttl_s),
                    record_mib = a.integer("session-max-record-mib", 64),
                    claim = a.integer("session-claim-s", o.redis.claim_ms / 1000);
    if (ttl < 0 || record_mib <= 0 || claim <= 0)
      a.fail("--session-ttl-s must be >= 0, --session-max-record-mib and --session-claim-s positive");
    o.redis.ttl_s = ttl;
    o.redis.max_record_bytes = static_cast<size_t>(record_mib) << 20;
    o.redis.claim_ms = claim * 1000;
    mp::Server server(model, sched, o);
    if (!server.bind()) throw mp::Error("cannot bind " + o.host + ":" + std::to_string(o.port));
    std::signal(SIGINT, on_signal);
    std::signal(SIGTERM, on_signal);
    std::thread watcher([&] {
      while (!g_stop) std::this_thread::sleep_for(std::chrono::milliseconds(100));
      std::fprintf(stderr, "stopping: no new requests; running ones are cancelled\n");
      sched.shutdown();
      server.stop();
    });
    std::fprintf(stderr,
                 "model: %s (%s), backend %s, %d slots\n"
                 "recommended sampling (a request's defaults): %s\nlistening on http://%s:%d\n",
                 model->path().c_str(), model->config().summary().c_str(), backend->name().c_str(),
                 backend->n_slots() - so.prefix_cache_slots,
                 model->recommended_sampling().describe().c_str(), o.host.c_str(), server.port());
    server.run();
    g_stop = true;
    watcher.join();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
