// A real multipole-server in the test's process, on a free loopback port, over a backend and a
// scheduler of its own; destroying it stops all three.
#pragma once

#include <httplib.h>

#include <memory>
#include <thread>

#include "server.h"

namespace mp::testing {

struct Serving {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Scheduler> sched;
  std::unique_ptr<Server> server;
  std::thread thread;

  Serving(const std::shared_ptr<Model>& model, const BackendOptions& bo, const SchedulerOptions& so,
          ServerOptions o)
      : Serving(model, make_backend(model, bo), so, std::move(o)) {}
  Serving(const std::shared_ptr<Model>& model, std::unique_ptr<Backend> b,
          const SchedulerOptions& so, ServerOptions o) {
    backend = std::move(b);
    sched = std::make_unique<Scheduler>(*backend, model->tokenizer(), so);
    o.port = 0;
    o.access_log = false;
    server = std::make_unique<Server>(model, *sched, o);
    if (!server->bind()) throw Error("bind failed");
    thread = std::thread([this] { server->run(); });
  }
  ~Serving() {
    sched->shutdown();
    server->stop();
    thread.join();
  }
  httplib::Client client() const {
    httplib::Client c("127.0.0.1", server->port());
    c.set_read_timeout(60, 0);
    return c;
  }
};

}  // namespace mp::testing
