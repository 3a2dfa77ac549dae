// What delivering a token costs the server, without a model: multipole-server's own Server and
// Scheduler over a backend that does no work (bench/null_backend.h), streamed to by loadgen
// (N streaming clients on epoll in P processes; the loadgen binary beside this one). The model
// thread makes tokens far faster than they can be delivered, so the tokens/s that reach the
// clients is the delivery path's rate: event thread (on_event: timing, queueing to the
// connection) -> HTTP thread (SSE formatting, the write) -> socket -> client. Baseline in the
// same run: the same Scheduler with callbacks that do nothing (the scheduler's own rate).
// usage: bench_delivery MODEL.gguf [clients=256] [tokens=512] [event_threads=2] [processes=1]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <string>
#include <thread>

#include "null_backend.h"
#include "server.h"

namespace {

using namespace mp;

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Tokens/s of `streams` requests of `tokens` tokens through a Scheduler, callbacks doing nothing.
double scheduler_alone(const Model& model, int streams, int tokens, int event_threads) {
  NullBackend backend(model.config(), streams);
  Scheduler sched(backend, model.tokenizer(), {.max_queue = streams, .event_threads = event_threads});
  std::vector<std::future<void>> done;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < streams; ++i) {
    auto p = std::make_shared<std::promise<void>>();
    done.push_back(p->get_future());
    CompletionRequest r;
    r.prompt = model.tokenizer().encode("The history of the", true);
    r.max_tokens = tokens;
    r.ignore_eos = true;
    r.on_event = [p](const CompletionEvent& e) {
      if (e.done) p->set_value();
      return true;
    };
    sched.submit(std::move(r));
  }
  for (auto& d : done) d.wait();
  return double(streams) * tokens / seconds_since(t0);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr,
                 "usage: bench_delivery MODEL.gguf [clients] [tokens] [event_threads] "
                 "[processes]\n");
    return 2;
  }
  const int clients = argc > 2 ? std::atoi(argv[2]) : 256;
  const int tokens = argc > 3 ? std::atoi(argv[3]) : 512;
  const int event_threads = argc > 4 ? std::atoi(argv[4]) : 2;
  const int processes = argc > 5 ? std::atoi(argv[5]) : 1;
  std::shared_ptr<const Model> model = Model::load(argv[1]);
  const double alone = scheduler_alone(*model, clients, tokens, event_threads);

  NullBackend backend(model->config(), clients);
  Scheduler sched(backend, model->tokenizer(),
                  {.max_queue = clients, .event_threads = event_threads});
  ServerOptions so;
  so.port = 0;
  so.access_log = false;
  Server server(model, sched, so);
  if (!server.bind()) {
    std::fprintf(stderr, "bench_delivery: cannot bind a port\n");
    return 1;
  }
  std::thread http([&] { server.run(); });
  const std::string self = argv[0];
  const std::string loadgen = self.substr(0, self.rfind('/') + 1) + "loadgen";
  const std::string cmd = loadgen + " --url http://127.0.0.1:" + std::to_string(server.port()) +
                          " --clients " + std::to_string(clients) + " --processes " +
                          std::to_string(processes) + " --max-tokens " + std::to_string(tokens);
  // loadgen's row: | clients | processes | requests | s | requests/s | tokens/s | ...
  std::string row;
  FILE* out = popen(cmd.c_str(), "r");
  char line[1024];
  while (out && std::fgets(line, sizeof line, out)) row = line;
  const int rc = out ? pclose(out) : -1;
  server.stop();
  http.join();
  std::vector<std::string> cells;
  for (size_t at = row.find('|'); at != std::string::npos;) {
    const size_t next = row.find('|', at + 1);
    if (next == std::string::npos) break;
    cells.push_back(row.substr(at + 1, next - at - 1));
    at = next;
  }
  if (rc != 0 || cells.size() < 11) {
    std::fprintf(stderr, "bench_delivery: %s failed: %s\n", cmd.c_str(), row.c_str());
    return 1;
  }
  const double served = std::atof(cells[5].c_str());
  std::printf("| clients | tokens each | event threads | scheduler alone tokens/s | through the "
              "server tokens/s | per event thread | ratio | ITL p50 / p99 ms | errors |\n"
              "|---|---|---|---|---|---|---|---|---|\n");
  std::printf("| %d | %d | %d | %.0f | %.0f | %.0f | %.3f | %s / %s | %s |\n", clients, tokens,
              event_threads, alone, served, served / event_threads, served / alone,
              cells[8].c_str(), cells[9].c_str(), cells[10].c_str());
  return 0;
}
