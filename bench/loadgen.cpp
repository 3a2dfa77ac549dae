// A cheap load generator for multipole-server's streaming completions: bench/serve.py's `streams`
// scenario (N clients, each streaming --requests completions one after another, temperature 0.8,
// ignore_eos) on non-blocking sockets and epoll, one thread per process, so that the clients cost
// the server's host little. Tokens are counted as serve.py counts them (each token event has a
// null finish_reason; the events of one read arrived together). Run it with two --processes
// counts: equal totals show that it is not the bottleneck. Prints serve.py's markdown row.
//
// usage: loadgen [--url http://127.0.0.1:8080] [--clients N] [--processes P] [--requests R]
//                [--max-tokens M] [--prompt TEXT]
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "common/args.h"

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

struct Options {
  std::string host = "127.0.0.1";
  int port = 8080;
  int clients = 8, processes = 1, requests = 1, max_tokens = 512;
  std::string prompt = "The history of the";
};

struct Totals {
  long requests = 0, errors = 0, tokens = 0;
  double end = 0;
  std::vector<double> ttft, itl;
};

constexpr std::string_view kTokenPattern = "\"finish_reason\":null";
constexpr std::string_view kDone = "data: [DONE]";

// One client: its current request's connection and what has arrived of it.
struct Client {
  int index = 0, request = 0, fd = -1;
  std::string out;  // the request, and how much of it went
  size_t sent = 0;
  std::string tail;  // the last bytes read, for a pattern split between two reads
  bool status_seen = false, ok = false;
  double t0 = 0;
  std::vector<double> stamps;
};

std::string request_text(const Options& o, int seed) {
  const std::string body = nlohmann::json{{"prompt", o.prompt},
                                          {"max_tokens", o.max_tokens},
                                          {"temperature", 0.8},
                                          {"ignore_eos", true},
                                          {"stream", true},
                                          {"seed", seed}}
                               .dump();
  return "POST /v1/completions HTTP/1.1\r\nHost: " + o.host +
         "\r\nContent-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) +
         "\r\n\r\n" + body;
}

size_t count(std::string_view s, std::string_view pattern) {
  size_t n = 0;
  for (size_t at = s.find(pattern); at != s.npos; at = s.find(pattern, at + pattern.size())) ++n;
  return n;
}

class Worker {
 public:
  Worker(const Options& o, int first_client, int n_clients, int seed)
      : o_(o), ep_(epoll_create1(0)), seed_(seed), clients_(n_clients) {
    for (int i = 0; i < n_clients; ++i) clients_[i].index = first_client + i;
  }
  ~Worker() { close(ep_); }

  Totals run(double start_at) {
    std::this_thread::sleep_for(std::chrono::duration<double>(std::max(0.0, start_at - now_s())));
    for (auto& c : clients_) open(c);
    std::vector<epoll_event> events(1024);
    std::vector<char> buf(1 << 16);
    while (active_ > 0) {
      const int n = epoll_wait(ep_, events.data(), static_cast<int>(events.size()), 1000);
      for (int e = 0; e < n; ++e) {
        Client& c = clients_[events[e].data.u32];
        if (c.sent < c.out.size()) {
          send_more(c);
          continue;
        }
        const ssize_t got = read(c.fd, buf.data(), buf.size());
        if (got < 0 && errno == EAGAIN) continue;
        if (got <= 0) {
          finish(c, false);
          continue;
        }
        received(c, std::string_view(buf.data(), static_cast<size_t>(got)), now_s());
      }
    }
    t_.end = now_s();
    return t_;
  }

 private:
  void open(Client& c) {
    c.fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    const int one = 1;
    setsockopt(c.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(o_.port));
    inet_pton(AF_INET, o_.host.c_str(), &addr.sin_addr);
    c.out = request_text(o_, seed_ + 1000 * c.index + c.request);
    c.sent = 0;
    c.tail.clear();
    c.status_seen = c.ok = false;
    c.stamps.clear();
    c.t0 = now_s();
    if (connect(c.fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0 && errno != EINPROGRESS)
      throw std::runtime_error(std::string("connect: ") + std::strerror(errno));
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLOUT;
    ev.data.u32 = static_cast<uint32_t>(&c - clients_.data());
    epoll_ctl(ep_, EPOLL_CTL_ADD, c.fd, &ev);
    ++active_;
  }
  void send_more(Client& c) {
    const ssize_t n = send(c.fd, c.out.data() + c.sent, c.out.size() - c.sent, MSG_NOSIGNAL);
    if (n < 0 && errno == EAGAIN) return;
    if (n < 0) return finish(c, false);
    c.sent += static_cast<size_t>(n);
    if (c.sent == c.out.size()) {  // from now on only reading
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.u32 = static_cast<uint32_t>(&c - clients_.data());
      epoll_ctl(ep_, EPOLL_CTL_MOD, c.fd, &ev);
    }
  }
  void received(Client& c, std::string_view data, double t) {
    if (!c.status_seen) {
      c.status_seen = true;
      c.ok = data.substr(0, 12) == "HTTP/1.1 200";
      if (!c.ok) return finish(c, false);
    }
    const std::string joined = c.tail + std::string(data);
    c.stamps.insert(c.stamps.end(), count(joined, kTokenPattern), t);
    if (joined.find(kDone) != joined.npos) return finish(c, true);
    c.tail = joined.substr(joined.size() - std::min(joined.size(), kTokenPattern.size() - 1));
  }
  void finish(Client& c, bool ok) {
    epoll_ctl(ep_, EPOLL_CTL_DEL, c.fd, nullptr);
    close(c.fd);
    c.fd = -1;
    --active_;
    if (!ok) {
      ++t_.errors;
    } else {
      ++t_.requests;
      t_.tokens += static_cast<long>(c.stamps.size());
      if (!c.stamps.empty()) t_.ttft.push_back(c.stamps[0] - c.t0);
      for (size_t i = 1; i < c.stamps.size(); ++i) t_.itl.push_back(c.stamps[i] - c.stamps[i - 1]);
    }
    if (++c.request < o_.requests) open(c);
  }

  const Options& o_;
  int ep_, seed_, active_ = 0;
  std::vector<Client> clients_;
  Totals t_;
};

// A child's totals through a pipe: the counts, then the two latency lists.
void write_totals(int fd, const Totals& t) {
  std::string s = std::to_string(t.requests) + " " + std::to_string(t.errors) + " " +
                  std::to_string(t.tokens) + " " + std::to_string(t.end) + " " +
                  std::to_string(t.ttft.size()) + " " + std::to_string(t.itl.size());
  char num[32];
  for (const auto* list : {&t.ttft, &t.itl})
    for (double x : *list) s += (std::snprintf(num, sizeof num, " %.9g", x), num);
  for (size_t at = 0; at < s.size();) {
    const ssize_t n = write(fd, s.data() + at, s.size() - at);
    if (n <= 0) break;
    at += static_cast<size_t>(n);
  }
}

Totals read_totals(int fd) {
  std::string s;
  char buf[1 << 16];
  for (ssize_t n; (n = read(fd, buf, sizeof buf)) > 0;) s.append(buf, static_cast<size_t>(n));
  Totals t;
  size_t n_ttft = 0, n_itl = 0;
  int used = 0;
  if (std::sscanf(s.c_str(), "%ld %ld %ld %lf %zu %zu%n", &t.requests, &t.errors, &t.tokens, &t.end,
                  &n_ttft, &n_itl, &used) != 6)
    throw std::runtime_error("a load process died before reporting");
  const char* p = s.c_str() + used;
  auto next = [&] {
    char* end = nullptr;
    const double x = std::strtod(p, &end);
    p = end;
    return x;
  };
  for (size_t i = 0; i < n_ttft; ++i) t.ttft.push_back(next());
  for (size_t i = 0; i < n_itl; ++i) t.itl.push_back(next());
  return t;
}

double pct_ms(std::vector<double> xs, double p) {
  if (xs.empty()) return 0.0 / 0.0;
  std::sort(xs.begin(), xs.end());
  return xs[std::min(xs.size() - 1, static_cast<size_t>(p / 100 * xs.size()))] * 1e3;
}

}  // namespace

int main(int argc, char** argv) {
  mp::cli::Args a(argc, argv, {},
                  "usage: loadgen [--url http://HOST:PORT] [--clients N] [--processes P]\n"
                  "               [--requests R] [--max-tokens M] [--prompt TEXT]\n",
                  {});
  a.check_known({"url", "clients", "processes", "requests", "max-tokens", "prompt"});
  Options o;
  const std::string url = a.str("url", "http://127.0.0.1:8080");
  const size_t colon = url.rfind(':');
  if (url.rfind("http://", 0) != 0 || colon < 7) a.fail("--url must be http://HOST:PORT");
  o.host = url.substr(7, colon - 7);
  o.port = std::stoi(url.substr(colon + 1));
  o.clients = static_cast<int>(a.integer("clients", 8));
  o.processes = static_cast<int>(a.integer("processes", 1));
  o.requests = static_cast<int>(a.integer("requests", 1));
  o.max_tokens = static_cast<int>(a.integer("max-tokens", 512));
  o.prompt = a.str("prompt", o.prompt);
  if (o.clients <= 0 || o.processes <= 0 || o.requests <= 0) a.fail("counts must be positive");

  const double start_at = now_s() + 1.0 + 0.05 * o.processes;
  std::vector<int> pipes;
  std::vector<pid_t> children;
  for (int p = 0, first = 0; p < o.processes; ++p) {
    const int share = o.clients / o.processes + (p < o.clients % o.processes ? 1 : 0);
    int fds[2];
    if (pipe(fds) != 0) throw std::runtime_error("pipe");
    const pid_t pid = fork();
    if (pid == 0) {
      close(fds[0]);
      Worker w(o, first, share, 7919 * (p + 1));
      write_totals(fds[1], w.run(start_at));
      _exit(0);
    }
    close(fds[1]);
    pipes.push_back(fds[0]);
    children.push_back(pid);
    first += share;
  }
  Totals all;
  for (int fd : pipes) {
    const Totals t = read_totals(fd);
    close(fd);
    all.requests += t.requests;
    all.errors += t.errors;
    all.tokens += t.tokens;
    all.end = std::max(all.end, t.end);
    all.ttft.insert(all.ttft.end(), t.ttft.begin(), t.ttft.end());
    all.itl.insert(all.itl.end(), t.itl.begin(), t.itl.end());
  }
  for (pid_t pid : children) waitpid(pid, nullptr, 0);
  const double elapsed = all.end - start_at;
  std::printf(
      "| clients | processes | requests | s | requests/s | tokens/s | TTFT p50 ms | TTFT p99 ms | "
      "ITL p50 ms | ITL p99 ms | errors |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
  std::printf("| %d | %d | %ld | %.1f | %.1f | %.0f | %.0f | %.0f | %.1f | %.1f | %ld |\n", o.clients,
              o.processes, all.requests, elapsed, all.requests / elapsed, all.tokens / elapsed,
              pct_ms(all.ttft, 50), pct_ms(all.ttft, 99), pct_ms(all.itl, 50), pct_ms(all.itl, 99),
              all.errors);
  return all.errors == 0 ? 0 : 1;
}
