// What delivering a token costs the server, without a model: multipole-server's own Server and
// Scheduler over a backend that does no work but takes a fixed step time (bench/../tests/support/
// null_backend.h; 2 ms, about a GPU step at batch 1,024), streamed to by loadgen (N streaming
// clients on epoll in P processes; the loadgen binary beside this one). Each stream then gets an
// event per step, as on the GPU: one on_event, one wake of its HTTP thread, one write. Measured:
// the server process's CPU time (user + system, getrusage: robust to other load on the machine)
// per token delivered, against the same Scheduler and backend with callbacks that do nothing
// (the scheduler's own share) in the same run; their difference is the delivery path's cost:
// event thread (on_event: timing, queueing to the connection) -> HTTP thread (SSE formatting,
// the write) -> socket. Also the tokens/s and ITL that loadgen saw.
// usage: bench_delivery MODEL.gguf [clients=256] [tokens=256] [event_threads=2] [processes=1]
//                       [step_us=2000]
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

#include "null_backend.h"
#include "server.h"

namespace {

using namespace mp;

double cpu_seconds() {  // the process's, all threads
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         1e-6 * double(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

// CPU seconds of `streams` requests of `tokens` tokens through a Scheduler, callbacks doing
// nothing.
double scheduler_alone(const Model& model, int streams, int tokens, int event_threads,
                       std::chrono::microseconds step) {
  NullBackend backend(model.config(), streams, step);
  Scheduler sched(backend, model.tokenizer(), {.max_queue = streams, .event_threads = event_threads});
  const double t0 = cpu_seconds();
  run_streams(sched, model.tokenizer().encode("The history of the", true), streams, tokens);
  return cpu_seconds() - t0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr,
                 "usage: bench_delivery MODEL.gguf [clients] [tokens] [event_threads] "
                 "[processes] [step_us]\n");
    return 2;
  }
  const int clients = argc > 2 ? std::atoi(argv[2]) : 256;
  const int tokens = argc > 3 ? std::atoi(argv[3]) : 256;
  const int event_threads = argc > 4 ? std::atoi(argv[4]) : 2;
  const int processes = argc > 5 ? std::atoi(argv[5]) : 1;
  const std::chrono::microseconds step(argc > 6 ? std::atoi(argv[6]) : 2000);
  std::shared_ptr<const Model> model = Model::load(argv[1]);
  const double n = double(clients) * tokens;
  const double alone_us = scheduler_alone(*model, clients, tokens, event_threads, step) / n * 1e6;

  NullBackend backend(model->config(), clients, step);
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
  const double t0 = cpu_seconds();
  FILE* out = popen(cmd.c_str(), "r");
  char line[1024];
  while (out && std::fgets(line, sizeof line, out)) row = line;
  const int rc = out ? pclose(out) : -1;
  const double served_us = (cpu_seconds() - t0) / n * 1e6;
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
  std::printf("| clients x tokens | event threads | step | server CPU us per token | of which "
              "the scheduler (callbacks doing nothing) | delivery CPU us per token | tokens/s "
              "(loadgen) | ITL p50 / p99 ms | errors |\n|---|---|---|---|---|---|---|---|---|\n");
  std::printf("| %d x %d | %d | %.1f ms | %.2f | %.2f | **%.2f** | %s | %s / %s | %s |\n", clients,
              tokens, event_threads, step.count() / 1e3, served_us, alone_us, served_us - alone_us,
              cells[5].c_str(), cells[8].c_str(), cells[9].c_str(), cells[10].c_str());
  return 0;
}
