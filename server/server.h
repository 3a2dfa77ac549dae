// multipole-server: the OpenAI-style HTTP API over a Scheduler. HTTP threads parse, validate
// and wait; only the scheduler's thread runs the model.
#pragma once

#include <memory>
#include <string>

#include "common/redis_store.h"
#include "common/sessions.h"
#include "multipole/multipole.h"

namespace mp {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;            // 0: any free port (see Server::port())
  std::string api_key;        // empty: no authentication
  int64_t ctx_limit = 0;      // most prompt tokens per request; 0: the model's trained length
  size_t max_body = 1 << 20;  // bytes; larger bodies get 413, unread
  // Slow clients, in seconds: a read or write of a connection that makes no progress for its
  // timeout closes it (a stream whose reader stopped reading is cancelled); a request body must
  // arrive whole within body_timeout (else 408); an idle kept-alive connection closes after
  // keep_alive_timeout (whole seconds).
  double read_timeout = 60, write_timeout = 60, body_timeout = 60, keep_alive_timeout = 5;
  // Socket send buffer of a connection, bytes (Linux doubles it): the most a client that stopped
  // reading leaves in the kernel before its writes stall; a stream sends far less per second.
  int send_buffer = 256 << 10;  // 0: the kernel's own (auto-tuned)
  // HTTP worker threads; each open connection holds one (a streaming client while it streams).
  // 0: one for every slot and queue place of the scheduler, plus 64 for quick requests. A
  // connection beyond them and 16 waiting gets an immediate 503.
  int http_threads = 0;
  // Token events a stream's write gathers (vLLM's --stream-interval): each write is an SSE event
  // per token as always, sent together. 0: automatic, 1 while fewer than 256 streams are open,
  // then one more per 256 streams, at most 4 (a token then waits at most 3 steps: ~7 ms at 1,024
  // streams on an H200). A stream's first token and its final event are never held.
  int stream_interval = 0;
  std::string model_name = "multipole";
  std::string chat_template;  // Jinja source replacing the model's chat template (empty: none)
  bool access_log = true;
  // Sessions (/v1/sessions, "session" in a completion): kept in memory, and as files in
  // state_dir when it is set, reloaded after a restart.
  std::string state_dir;
  sessions::Options sessions;
  // Or shared with other servers (replicas) in Redis: "redis://host[:port][/prefix]"; `redis`
  // holds the store's other settings.
  std::string session_store;
  sessions::RedisOptions redis;
};

class Server {
 public:
  Server(std::shared_ptr<const Model> model, Scheduler& scheduler, ServerOptions opts);
  ~Server();
  bool bind();  // binds host:port; false on failure
  int port() const;
  void run();  // serves until stop()
  void stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mp
