// multipole-server: the OpenAI-style HTTP API over a Scheduler. HTTP threads parse, validate
// and wait; only the scheduler's thread runs the model.
#pragma once

#include <memory>
#include <string>

#include "multipole/multipole.h"

namespace mp {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;            // 0: any free port (see Server::port())
  std::string api_key;        // empty: no authentication
  int64_t ctx_limit = 0;      // most prompt tokens per request; 0: the model's trained length
  size_t max_body = 1 << 20;  // bytes; larger bodies get 413
  int http_threads = 128;     // each streaming client holds one while it streams
  std::string model_name = "multipole";
  bool access_log = true;
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
