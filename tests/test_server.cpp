// A real multipole-server (in process, on a free loopback port) driven over HTTP.
#include <arpa/inet.h>
#include <poll.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>

#include <fstream>
#include <functional>
#include <future>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "common/chat.h"
#include "model_fixture.h"
#include "common/api.h"
#include "null_backend.h"
#include "server.h"
#include "serving.h"

namespace {

using json = nlohmann::json;
using namespace mp;

// The model first (a base constructed before the server that uses it).
struct Running : mp::testing::VariantModel, mp::testing::Serving {
  explicit Running(int slots = 4, int max_queue = 64, std::string api_key = "",
                   int64_t ctx_limit = 0, int http_threads = 0, std::vector<int> devices = {},
                   const std::function<void(ServerOptions&)>& adjust = nullptr)
      : Serving(model,
                {.kind = "cpu", .n_slots = slots, .n_threads = 2, .devices = std::move(devices)},
                {.max_queue = max_queue}, options(std::move(api_key), ctx_limit, http_threads, adjust)) {}
  static ServerOptions options(std::string api_key, int64_t ctx_limit, int http_threads,
                               const std::function<void(ServerOptions&)>& adjust) {
    ServerOptions o;
    o.api_key = std::move(api_key);
    o.ctx_limit = ctx_limit;
    o.http_threads = http_threads;
    o.max_body = 64 * 1024;
    if (adjust) adjust(o);
    return o;
  }
  httplib::Result post(const json& body, const char* path = "/v1/completions") const {
    return client().Post(path, body.dump(), "application/json");
  }
  httplib::Result chat(const json& body) const { return post(body, "/v1/chat/completions"); }
};

// The data: payloads of an SSE body, [DONE] last.
std::vector<std::string> sse_events(const std::string& body) {
  std::vector<std::string> out;
  size_t at = 0;
  while ((at = body.find("data: ", at)) != std::string::npos) {
    const size_t end = body.find("\n\n", at);
    out.push_back(body.substr(at + 6, end - at - 6));
    at = end;
  }
  return out;
}

std::string streamed_text(const std::string& body, json* usage = nullptr,
                          std::string* finish = nullptr) {
  const auto ev = sse_events(body);
  EXPECT_FALSE(ev.empty());
  EXPECT_EQ(ev.back(), "[DONE]");
  std::string text;
  for (size_t i = 0; i + 1 < ev.size(); ++i) {
    const json j = json::parse(ev[i]);  // every event parses
    EXPECT_EQ(j["object"], "text_completion");
    if (j["choices"].empty()) {
      if (usage) *usage = j["usage"];
      continue;
    }
    text += j["choices"][0]["text"].get<std::string>();
    if (finish && !j["choices"][0]["finish_reason"].is_null())
      *finish = j["choices"][0]["finish_reason"];
  }
  return text;
}

TEST(Server, PlainAndStreamingCompletionsAgree) {
  Running s;
  const json req = {
      {"prompt", "The license"}, {"max_tokens", 12}, {"temperature", 0.9}, {"seed", 5}};
  auto r = s.post(req);
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  const json j = json::parse(r->body);
  const std::string text = j["choices"][0]["text"];
  EXPECT_EQ(j["usage"]["completion_tokens"].get<int>() + j["usage"]["prompt_tokens"].get<int>(),
            j["usage"]["total_tokens"].get<int>());
  EXPECT_EQ(j["usage"]["completion_tokens"], 12);
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  json stream_req = req;
  stream_req["stream"] = true;
  stream_req["stream_options"] = {{"include_usage", true}};
  auto rs = s.post(stream_req);
  ASSERT_EQ(rs->status, 200);
  EXPECT_EQ(rs->get_header_value("Content-Type"), "text/event-stream");
  json usage;
  std::string finish;
  EXPECT_EQ(streamed_text(rs->body, &usage, &finish), text);
  EXPECT_EQ(usage, j["usage"]);
  EXPECT_EQ(finish, "length");
  // echo, logprobs, n and several prompts.
  auto r2 = s.post({{"prompt", {"a", "b"}},
                    {"n", 2},
                    {"max_tokens", 3},
                    {"echo", true},
                    {"logprobs", 2},
                    {"seed", 1}});
  ASSERT_EQ(r2->status, 200) << r2->body;
  const json j2 = json::parse(r2->body);
  ASSERT_EQ(j2["choices"].size(), 4u);
  EXPECT_EQ(j2["choices"][2]["text"].get<std::string>().substr(0, 1), "b");
  EXPECT_EQ(j2["choices"][0]["logprobs"]["tokens"].size(), 3u);
  EXPECT_EQ(j2["choices"][0]["logprobs"]["top_logprobs"][0].size(), 2u);
}

TEST(Server, ConcurrentStreamsGiveTheSameTextAsSequentialRuns) {
  Running s(8);
  const int n = 64;
  auto req = [](int i) {
    return json{{"prompt", "Request " + std::to_string(i)},
                {"max_tokens", 8},
                {"temperature", 1.0},
                {"seed", i},
                {"stream", true}};
  };
  std::vector<std::string> sequential;
  for (int i = 0; i < n; ++i) sequential.push_back(streamed_text(s.post(req(i))->body));
  std::vector<std::future<std::string>> futures;
  for (int i = 0; i < n; ++i)
    futures.push_back(std::async(std::launch::async, [&, i] {
      auto r = s.post(req(i));
      if (!r) return "HTTP error " + httplib::to_string(r.error());
      return r->status == 200 ? streamed_text(r->body)
                              : "HTTP " + std::to_string(r->status) + " " + r->body;
    }));
  for (int i = 0; i < n; ++i) EXPECT_EQ(futures[i].get(), sequential[i]) << i;
}

// A raw TCP connection to the server (-1 on failure).
int connect_to(const Running& s) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(s.server->port()));
  inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// A client that closes its connection mid-request: its slot is freed within a step or two.
// Streaming clients are noticed at the next event, others at the next 200 ms keep-alive space.
void check_disconnect_frees_slot(bool stream) {
  Running s(2);
  const int fd = connect_to(s);
  ASSERT_GE(fd, 0);
  const std::string body = json{
      {"prompt", "x"},
      {"max_tokens", 100000},
      {"ignore_eos", true},
      {"stream", stream}}.dump();
  const std::string http =
      "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
      "Content-Length: " +
      std::to_string(body.size()) + "\r\n\r\n" + body;
  ASSERT_EQ(write(fd, http.data(), http.size()), ssize_t(http.size()));
  if (stream) {  // read until the first event: the request then holds its slot
    std::string got;
    char buf[512];
    while (got.find("data: ") == std::string::npos) {
      const ssize_t n = read(fd, buf, sizeof buf);
      ASSERT_GT(n, 0);
      got.append(buf, size_t(n));
    }
  } else {  // wait until it is generating (the first keep-alive space may not be out yet)
    for (int i = 0; i < 250 && s.sched->stats().steps < 30; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(s.sched->stats().slots_in_use, 1);
  close(fd);
  for (int i = 0; i < 150 && s.sched->stats().slots_in_use != 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(s.sched->stats().slots_in_use, 0);
  EXPECT_LT(s.sched->stats().completion_tokens, 100000u);
}

TEST(Server, ClientThatDisconnectsFreesItsSlot) { check_disconnect_frees_slot(true); }
TEST(Server, NonStreamingClientThatDisconnectsFreesItsSlot) { check_disconnect_frees_slot(false); }

int status_of(const httplib::Result& r) { return r ? r->status : -1; }

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Everything the server sends on fd until it closes the connection (or `limit_s` passes).
std::string read_until_closed(int fd, double limit_s) {
  std::string got;
  char buf[4096];
  const auto t0 = std::chrono::steady_clock::now();
  while (seconds_since(t0) < limit_s) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, 100) <= 0) continue;
    const ssize_t n = read(fd, buf, sizeof buf);
    if (n <= 0) break;  // closed (or reset once the answer is in)
    got.append(buf, size_t(n));
  }
  return got;
}

// The status and the JSON body of a raw HTTP response (chunked bodies are not expected here).
std::pair<int, json> parse_response(const std::string& raw) {
  const size_t head_end = raw.find("\r\n\r\n");
  if (raw.rfind("HTTP/1.1 ", 0) != 0 || head_end == std::string::npos) return {-1, json()};
  return {std::stoi(raw.substr(9, 3)),
          json::parse(raw.substr(head_end + 4), nullptr, false)};
}

// Sends what it can of `bytes` (the server may have closed the connection: no SIGPIPE).
void send_some(int fd, const std::string& bytes) {
  size_t at = 0;
  while (at < bytes.size()) {
    const ssize_t n = send(fd, bytes.data() + at, bytes.size() - at, MSG_NOSIGNAL);
    if (n <= 0) return;
    at += size_t(n);
  }
}

// The bytes queued to send on the established loopback TCP connection from `local_port` to
// `remote_port` (/proc/net/tcp's tx_queue: written, not yet taken by the peer); -1 where no such
// connection is established (not yet, or closing).
long tcp_send_queue(int local_port, int remote_port) {
  for (const char* table : {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::ifstream in(table);
    std::string line, slot, local, remote, state, queues;
    std::getline(in, line);  // the header
    while (in >> slot >> local >> remote >> state >> queues && std::getline(in, line)) {
      auto port = [](const std::string& a) { return std::stoi(a.substr(a.rfind(':') + 1), nullptr, 16); };
      if (port(local) == local_port && port(remote) == remote_port && state == "01")
        return std::stol(queues.substr(0, queues.find(':')), nullptr, 16);
    }
  }
  return -1;
}

// Slow clients hold neither a slot nor the (single) HTTP thread for longer than their timeout:
// a request made after them is served.
void expect_thread_free(const Running& s, double within_s) {
  const auto t0 = std::chrono::steady_clock::now();
  auto c = s.client();
  const auto r = c.Post("/v1/completions", json{{"prompt", "x"}, {"max_tokens", 1}}.dump(),
                        "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  EXPECT_LT(seconds_since(t0), within_s);
}

// A streaming client that stops reading (its socket open, its receive buffer small and full):
// once the server's writes stall for the write timeout, the request is cancelled, its slot freed
// and the HTTP thread released.
TEST(Server, ReaderThatStopsReadingLosesItsSlotAfterTheWriteTimeout) {
  Running s(2, 64, "", 0, 1, {}, [](ServerOptions& o) {
    o.write_timeout = 1;
    o.send_buffer = 16 << 10;  // full within a second however loaded the machine
  });
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  const int small = 4096;
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);  // before connect: the window
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(s.server->port()));
  inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  const std::string body = json{{"prompt", "x"},     {"max_tokens", 1000000}, {"ignore_eos", true},
                                {"stream", true},   {"logprobs", 5}}.dump();
  send_some(fd, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body);
  std::string got;
  char buf[512];
  while (got.find("data: ") == std::string::npos) {  // streaming: it holds its slot
    const ssize_t n = read(fd, buf, sizeof buf);
    ASSERT_GT(n, 0);
    got.append(buf, size_t(n));
  }
  EXPECT_EQ(s.sched->stats().slots_in_use, 1);
  sockaddr_in me{};
  socklen_t me_len = sizeof me;
  ASSERT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&me), &me_len), 0);
  // From here on nothing is read. The buffers fill at the pace tokens are made (a loaded machine
  // takes seconds), then the server's writes stall: the write timeout counts from the last byte
  // its socket took, which is when the server's send queue last grew.
  const auto t0 = std::chrono::steady_clock::now();
  auto stalled = t0;
  long queued = -1;
  while (s.sched->stats().slots_in_use != 0 && seconds_since(t0) < 120) {
    const long q = tcp_send_queue(s.server->port(), ntohs(me.sin_port));
    if (q > queued) queued = q, stalled = std::chrono::steady_clock::now();
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  const double freed = seconds_since(t0), after_stall = seconds_since(stalled);
  std::printf("stalled reader: slot freed %.2f s after it stopped reading, %.2f s after the "
              "server's send queue stopped growing at %ld bytes (write timeout 1 s)\n",
              freed, after_stall, queued);
  EXPECT_EQ(s.sched->stats().slots_in_use, 0);
  EXPECT_GT(queued, 0) << "the server's send queue was never seen filling";
  // A stalled write fails after at most two write timeouts (httplib's send blocks for one under
  // SO_SNDTIMEO, then its wait for room takes another), then the next step drops the request;
  // 2 s more for a loaded machine to schedule the HTTP and model threads.
  EXPECT_LT(after_stall, 2 * 1.0 + 2.0);
  EXPECT_LT(s.sched->stats().completion_tokens, 1000000u);
  expect_thread_free(s, 5.0);
  // What the server had written before its writes stalled: the socket buffers' worth.
  const size_t buffered = read_until_closed(fd, 10).size() + got.size();
  std::printf("stalled reader: %.0f KiB were in the socket buffers\n", buffered / 1024.0);
  EXPECT_LT(buffered, 256u << 10);
  close(fd);
}

// A body trickling in a byte at a time, each byte well within the read timeout: the body
// timeout ends it with 408 and the connection (and its thread) is released.
TEST(Server, BodySentAByteAtATimeGets408AfterTheBodyTimeout) {
  Running s(2, 64, "", 0, 1, {}, [](ServerOptions& o) {
    o.body_timeout = 1;
    o.read_timeout = 30;
  });
  const int fd = connect_to(s);
  ASSERT_GE(fd, 0);
  send_some(fd, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                "Content-Length: 1000\r\n\r\n");
  const auto t0 = std::chrono::steady_clock::now();
  std::string got;
  for (int i = 0; i < 100 && got.empty(); ++i) {  // a byte every 200 ms, up to 20 s
    send_some(fd, " ");
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, 200) > 0) got = read_until_closed(fd, 5);
  }
  const double answered = seconds_since(t0);
  std::printf("trickled body: answered %.2f s after its headers (body timeout 1 s)\n", answered);
  const auto [status, err] = parse_response(got);
  EXPECT_EQ(status, 408) << got;
  EXPECT_EQ(err["error"]["code"], "request_timeout") << got;
  EXPECT_GE(answered, 0.9);
  EXPECT_LT(answered, 3.0);
  expect_thread_free(s, 5.0);
  close(fd);
}

// A body larger than --max-body (here 64 KiB) is refused with 413 as soon as its headers say so,
// or, chunked, once the limit is passed: the client sends a little of its declared gigabyte and
// gets the answer at once, the connection closed.
TEST(Server, GigabyteBodyGets413WithoutBeingRead) {
  Running s(2, 64, "", 0, 1);
  const std::string head =
      "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n";
  const std::string some(128 * 1024, ' ');
  for (const std::string framing : {"Content-Length: 1073741824\r\n\r\n",
                                    "Transfer-Encoding: chunked\r\n\r\n40000000\r\n"}) {
    SCOPED_TRACE(framing);
    const int fd = connect_to(s);
    ASSERT_GE(fd, 0);
    const auto t0 = std::chrono::steady_clock::now();
    send_some(fd, head + framing + some);
    const std::string got = read_until_closed(fd, 10);
    const double answered = seconds_since(t0);
    std::printf("1 GB body (%s): 413 after %.1f ms\n", framing.substr(0, 17).c_str(),
                answered * 1e3);
    const auto [status, err] = parse_response(got);
    EXPECT_EQ(status, 413) << got;
    EXPECT_EQ(err["error"]["code"], "request_too_large") << got;
    EXPECT_NE(err["error"]["message"].get<std::string>().find("65536 bytes"), std::string::npos);
    EXPECT_LT(answered, 2.0);  // not after a read timeout, nor after reading a gigabyte
    close(fd);
  }
  // A chunked body within the limit is read as any other.
  const int fd = connect_to(s);
  ASSERT_GE(fd, 0);
  send_some(fd, "POST /tokenize HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                "Transfer-Encoding: chunked\r\n\r\n"
                "c\r\n{\"content\":\"\r\nc\r\nfree softwar\r\n3\r\ne\"}\r\n0\r\n\r\n");
  const std::string got = read_until_closed(fd, 10);
  close(fd);
  const auto [status, tokens] = parse_response(got);
  EXPECT_EQ(status, 200) << got;
  auto c = s.client();
  const auto plain = c.Post("/tokenize", R"({"content":"free software"})", "application/json");
  ASSERT_EQ(status_of(plain), 200);
  EXPECT_EQ(tokens, json::parse(plain->body));
  expect_thread_free(s, 5.0);
}

void expect_error(const httplib::Result& r, int status, const std::string& param = "") {
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, status) << r->body;
  const json j = json::parse(r->body);
  ASSERT_TRUE(j["error"].is_object()) << r->body;
  EXPECT_TRUE(j["error"]["message"].is_string());
  EXPECT_TRUE(j["error"].contains("type") && j["error"].contains("param") &&
              j["error"].contains("code"));
  if (!param.empty()) {
    EXPECT_EQ(j["error"]["param"], param);
  }
}

TEST(Server, BadRequestsGetOpenAiErrors) {
  Running s(2, 64, "", 20);
  auto c = s.client();
  expect_error(c.Post("/v1/completions", "{not json", "application/json"), 400);
  expect_error(s.post({{"prompt", 3}}), 400, "prompt");
  expect_error(s.post({{"prompt", "x"}, {"max_tokens", "ten"}}), 400, "max_tokens");
  expect_error(s.post({{"prompt", "x"}, {"temperature", 5}}), 400, "temperature");
  expect_error(s.post({{"prompt", "x"}, {"n", 0}}), 400, "n");
  expect_error(s.post({{"prompt", "x"}, {"stop", {1, 2}}}), 400, "stop");
  expect_error(s.post({{"max_tokens", 3}}), 400, "prompt");
  expect_error(s.post({{"prompt", {1, 99999}}}), 400, "prompt");
  expect_error(s.post({{"prompt", {json::array()}}}), 400, "prompt");
  expect_error(s.post({{"prompt", {1, "x"}}}), 400, "prompt");
  expect_error(s.post({{"prompt", std::string(500, 'z')}}), 400, "prompt");  // over the ctx limit
  expect_error(c.Post("/v1/completions", std::string(100 * 1024, ' '), "application/json"), 413);
  expect_error(c.Post("/detokenize", R"({"tokens":[1,99999]})", "application/json"), 400, "tokens");
  // A field of another type is the client's error (it was a 500 from a JSON type error).
  expect_error(c.Post("/tokenize", R"({"content":"x","add_special":"yes"})", "application/json"),
               400, "add_special");
  expect_error(c.Get("/nope"), 404);
  // Invalid UTF-8 in a prompt: a clear error, not a crash.
  const std::string bad_utf8 = std::string("{\"prompt\":\"\xff\xfe\"}");
  EXPECT_EQ(status_of(c.Post("/v1/completions", bad_utf8, "application/json")), 400);
  EXPECT_EQ(status_of(c.Get("/health")), 200);
}

TEST(Server, ApiKeyAndFullQueue) {
  {
    Running s(1, 64, "secret");
    expect_error(s.post({{"prompt", "x"}}), 401);
    auto c = s.client();
    c.set_bearer_token_auth("secret");
    EXPECT_EQ(status_of(c.Post("/v1/completions", json{{"prompt", "x"}, {"max_tokens", 1}}.dump(),
                               "application/json")),
              200);
    EXPECT_EQ(status_of(s.client().Get("/v1/models")), 401);
  }
  Running s(1, 0);  // one slot, no queue
  std::vector<std::future<int>> f;
  for (int i = 0; i < 6; ++i)
    f.push_back(std::async(std::launch::async, [&] {
      auto r = s.post({{"prompt", "x"}, {"max_tokens", 1000}, {"ignore_eos", true}});
      // A refusal says when to try again, as the 503 at the connection limit does.
      if (status_of(r) == 429) {
        EXPECT_EQ(r->get_header_value("Retry-After"), "1");
      }
      return status_of(r);
    }));
  int ok = 0, busy = 0;
  for (auto& x : f) {
    const int st = x.get();
    ok += st == 200;
    busy += st == 429;
  }
  EXPECT_GE(ok, 1);
  EXPECT_GE(busy, 1);
  EXPECT_EQ(ok + busy, 6);
}

// More connections than HTTP threads (and the few that may wait for one): the next one gets an
// immediate OpenAI-shaped 503, not a wait behind connections that may stay open for minutes; once
// they close, requests are served again.
TEST(Server, ConnectionsBeyondTheThreadsGetAFast503) {
  Running s(1, 0, "", 0, 2);  // 2 HTTP threads: 2 served + 16 waiting connections
  std::vector<int> idle;
  for (int i = 0; i < 18; ++i) {
    idle.push_back(connect_to(s));
    ASSERT_GE(idle.back(), 0);
  }
  const auto t0 = std::chrono::steady_clock::now();
  const auto r = s.post({{"prompt", "x"}, {"max_tokens", 1}});
  const double waited =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  expect_error(r, 503);
  EXPECT_EQ(json::parse(r->body)["error"]["code"], "server_overloaded");
  EXPECT_EQ(r->get_header_value("Retry-After"), "1");
  EXPECT_LT(waited, 5.0);  // not the 60 s read timeout of a waiting connection
  for (int fd : idle) close(fd);
  int status = 0;
  for (int i = 0; i < 100 && status != 200; ++i) {
    status = status_of(s.post({{"prompt", "x"}, {"max_tokens", 1}}));
    if (status != 200) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(status, 200);
}

// A prompt given as token ids (OpenAI's array form) is the same request as its text.
TEST(Server, TokenIdPromptsEqualTheirText) {
  Running s;
  auto c = s.client();
  const auto t =
      c.Post("/tokenize", R"({"content":"free software","add_special":true})", "application/json");
  ASSERT_EQ(status_of(t), 200);
  const json ids = json::parse(t->body)["tokens"];
  const json common = {{"max_tokens", 12}, {"seed", 5}, {"temperature", 0.9}, {"echo", true}};
  json as_text = common, as_ids = common, both = common;
  as_text["prompt"] = "free software";
  as_ids["prompt"] = ids;
  both["prompt"] = {ids, ids};
  const auto a = s.post(as_text), b = s.post(as_ids), ab = s.post(both);
  ASSERT_EQ(status_of(a), 200);
  ASSERT_EQ(status_of(b), 200);
  ASSERT_EQ(status_of(ab), 200);
  const json ja = json::parse(a->body), jb = json::parse(b->body), jab = json::parse(ab->body);
  EXPECT_EQ(ja["choices"][0]["text"], jb["choices"][0]["text"]);
  EXPECT_EQ(jab["choices"].size(), 2u);
  EXPECT_EQ(ja["usage"]["prompt_tokens"], jb["usage"]["prompt_tokens"]);
}

// The streamed token chunk written by hand is, byte for byte, what dump() makes of the same
// object, for random texts (quotes, backslashes, control bytes, multi-byte characters); invalid
// UTF-8 is left to dump().
TEST(Api, TokenChunkEqualsTheDumpOfTheSameObject) {
  std::mt19937 rng(9);
  const std::vector<std::string> parts = {"a", "\"", "\\", "\n", "\t", "\x01", "\x1f", "\x7f",
                                          "é", "東", "🙂", " ", "\r", "\b", "\f", "/"};
  const api::TokenChunk chunk("cmpl-7", 1700000000, "multi\"pole");
  for (int trial = 0; trial < 2000; ++trial) {
    std::string text;
    for (int k = static_cast<int>(rng() % 12); k > 0; --k) text += parts[rng() % parts.size()];
    const int index = static_cast<int>(rng() % 20);
    const json j = {{"id", "cmpl-7"},
                    {"object", "text_completion"},
                    {"created", 1700000000},
                    {"model", "multi\"pole"},
                    {"choices",
                     {{{"text", text},
                       {"index", index},
                       {"logprobs", nullptr},
                       {"finish_reason", nullptr}}}}};
    std::string out = "before";
    ASSERT_TRUE(chunk.append_event(out, index, text)) << trial;
    ASSERT_EQ(out, "before" + ("data: " + api::dump(j) + "\n\n")) << trial;
  }
  for (const char* bad : {"\xff", "a\xc3", "\xed\xa0\x80", "\xe0\x80\x80", "\xf4\x90\x80\x80"}) {
    std::string out = "before";
    EXPECT_FALSE(chunk.append_event(out, 0, bad)) << bad;
    EXPECT_EQ(out, "before") << bad;
  }
}

// parse_body's scanner of token-id prompts agrees with the full JSON parser on random bodies:
// valid ones (prompts among members with quotes, escapes, nested "prompt" keys, odd spacing) and
// each of them mutated by a byte. Whenever the scanner takes a prompt, the body parses exactly
// when the rest does, the ids are the prompt's, and the rest is the body with prompt = null.
TEST(Api, ScannedPromptIdsAgreeWithTheFullParser) {
  std::mt19937_64 rng(12);
  auto pick = [&](std::initializer_list<const char*> xs) { return *(xs.begin() + rng() % xs.size()); };
  auto space = [&] { return std::string(pick({"", "", " ", "\n\t", "  \r\n"})); };
  std::function<std::string(int)> value = [&](int depth) -> std::string {
    switch (rng() % (depth > 2 ? 4 : 6)) {
      case 0: return std::to_string(static_cast<int64_t>(rng() % 2000) - 1000);
      case 1: return pick({"true", "false", "null", "1.5e3", "-0.25"});
      case 2: return pick({R"("text")", R"("a \"prompt\": [1]")", R"("\\")", R"("\u00e9}{][")", R"("")"});
      case 3: return pick({R"("prompt")", R"("x,y")", "0"});
      case 4: {
        std::string a = std::string("[") + space();
        for (int k = static_cast<int>(rng() % 4); k > 0; --k) a += value(depth + 1) + (k > 1 ? "," : "") + space();
        return a + "]";
      }
      default: {
        std::string o = std::string("{") + space();
        for (int k = static_cast<int>(rng() % 3); k > 0; --k)
          o += std::string(pick({R"("prompt")", R"("k")", R"("\"")"})) + ":" + space() + value(depth + 1) + (k > 1 ? "," : "");
        return o + "}";
      }
    }
  };
  auto ids = [&] {
    std::string a = std::string("[") + space();
    const int n = 1 + static_cast<int>(rng() % 40);
    for (int k = 0; k < n; ++k) {
      a += rng() % 50 == 0 ? pick({"1.0", "01", "1e2", "99999999999999999999", "-5", "\"7\"", "[1]"})
                           : std::to_string(rng() % (rng() % 4 == 0 ? 9223372036854775807ull : 400));
      a += space();
      if (k + 1 < n) a += ',' + space();
    }
    return a + "]";
  };
  int scanned = 0, agreed_on_mutants = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    std::vector<std::string> members;
    for (int k = static_cast<int>(rng() % 4); k > 0; --k)
      members.push_back(std::string(pick({R"("max_tokens")", R"("stop")", R"("pr\u006fmpt")", R"("echo")"})) + space() + ":" + space() + value(0));
    members.insert(members.begin() + rng() % (members.size() + 1), R"("prompt")" + space() + ":" + space() + ids());
    if (rng() % 20 == 0) members.push_back(R"("prompt":[1])");  // twice
    std::string body = space() + std::string("{") + space();
    for (size_t k = 0; k < members.size(); ++k) {
      body += members[k] + space();
      if (k + 1 < members.size()) body += ',' + space();
    }
    body += std::string("}") + space();
    for (int mutant = 0; mutant < 2; ++mutant) {
      if (mutant == 1) {  // one byte inserted, deleted or replaced
        const size_t at = rng() % body.size();
        const char c = "{}[],:\"\\0-1 e."[rng() % 14];
        switch (rng() % 3) {
          case 0: body.insert(body.begin() + at, c); break;
          case 1: body.erase(at, 1); break;
          default: body[at] = c;
        }
      }
      const std::optional<api::PromptIds> found = api::scan_prompt_ids(body);
      const json full = json::parse(body, nullptr, false);
      if (!found) continue;
      scanned += mutant == 0;
      json rest = json::parse(found->rest, nullptr, false);
      ASSERT_EQ(full.is_discarded(), rest.is_discarded()) << body;
      if (full.is_discarded()) continue;
      agreed_on_mutants += mutant;
      ASSERT_TRUE(full["prompt"].is_array()) << body;
      std::vector<int64_t> expect;
      for (const auto& t : full["prompt"]) {
        ASSERT_TRUE(t.is_number_integer()) << body;
        expect.push_back(t.get<int64_t>());
      }
      ASSERT_EQ(found->ids, expect) << body;
      json without = full;
      without["prompt"] = nullptr;
      ASSERT_EQ(rest, without) << body;
      const json parsed = api::parse_body(body);
      ASSERT_TRUE(parsed["prompt"].is_binary());
      ASSERT_EQ(parsed["prompt"].get_binary().size(), expect.size() * 8);
    }
  }
  // Most valid bodies take the fast path (not those with a bad id, an escaped "prompt" key or
  // two prompts), and the mutants exercised the agreement.
  EXPECT_GT(scanned, 1000);
  EXPECT_GT(agreed_on_mutants, 100);
}

// The chunks of a streamed chat: the concatenated delta contents, the role of each choice's
// first delta, the finish reason and the usage chunk; every chunk parses and has the chat shape.
struct ChatStream {
  std::string text, role, finish;
  json usage;
  std::vector<json> chunks;
};
ChatStream chat_stream(const std::string& body) {
  ChatStream out;
  const auto ev = sse_events(body);
  EXPECT_FALSE(ev.empty());
  EXPECT_EQ(ev.back(), "[DONE]");
  for (size_t i = 0; i + 1 < ev.size(); ++i) {
    const json j = json::parse(ev[i]);
    EXPECT_EQ(j["object"], "chat.completion.chunk");
    EXPECT_EQ(j["id"].get<std::string>().rfind("chatcmpl-", 0), 0u);
    out.chunks.push_back(j);
    if (j["choices"].empty()) {
      out.usage = j["usage"];
      continue;
    }
    const json& d = j["choices"][0]["delta"];
    if (d.contains("role")) {
      EXPECT_TRUE(out.role.empty()) << "the role comes once, first";
      EXPECT_EQ(out.chunks.size(), 1u);
      out.role = d["role"];
    }
    if (d.contains("content")) out.text += d["content"].get<std::string>();
    if (!j["choices"][0]["finish_reason"].is_null()) out.finish = j["choices"][0]["finish_reason"];
  }
  return out;
}

TEST(Server, ChatCompletionsAreCompletionsOfTheRenderedConversation) {
  Running s;
  const json messages = {{{"role", "system"}, {"content", "You answer."}},
                         {{"role", "user"}, {"content", "The license"}}};
  const json req = {{"messages", messages},
                    {"max_tokens", 12},
                    {"temperature", 0.9},
                    {"seed", 5},
                    {"ignore_eos", true}};
  auto r = s.chat(req);
  ASSERT_EQ(status_of(r), 200) << (r ? r->body : "");
  const json j = json::parse(r->body);
  EXPECT_EQ(j["object"], "chat.completion");
  EXPECT_EQ(j["choices"][0]["message"]["role"], "assistant");
  EXPECT_TRUE(j["choices"][0]["logprobs"].is_null());
  const std::string text = j["choices"][0]["message"]["content"];
  // The same tokens as a completion of the default template's text, with its stop string.
  const chat::Format format(*s.model);
  const std::string prompt = format.render(messages, true);
  auto rc = s.post({{"prompt", prompt},
                    {"max_tokens", 12},
                    {"temperature", 0.9},
                    {"seed", 5},
                    {"ignore_eos", true},
                    {"stop", chat::kDefaultStop}});
  const json jc = json::parse(rc->body);
  EXPECT_EQ(text, jc["choices"][0]["text"]);
  EXPECT_EQ(j["choices"][0]["finish_reason"], jc["choices"][0]["finish_reason"]);
  EXPECT_EQ(j["usage"], jc["usage"]);
  EXPECT_EQ(j["usage"]["prompt_tokens"], int(format.tokenize(prompt).size()));
  // Streaming gives the same text in deltas, the role first, then usage.
  json sreq = req;
  sreq["stream"] = true;
  sreq["stream_options"] = {{"include_usage", true}};
  auto rs = s.chat(sreq);
  ASSERT_EQ(status_of(rs), 200);
  EXPECT_EQ(rs->get_header_value("Content-Type"), "text/event-stream");
  const ChatStream st = chat_stream(rs->body);
  EXPECT_EQ(st.text, text);
  EXPECT_EQ(st.role, "assistant");
  EXPECT_EQ(st.finish, j["choices"][0]["finish_reason"]);
  EXPECT_EQ(st.usage, j["usage"]);
}

TEST(Server, ChatLogprobsChoicesAndContinuousUsage) {
  Running s;
  const json user = {{{"role", "user"}, {"content", "Hi"}}};
  auto r = s.chat({{"messages", user},
                   {"max_tokens", 5},
                   {"n", 2},
                   {"seed", 1},
                   {"logprobs", true},
                   {"top_logprobs", 3},
                   {"ignore_eos", true}});
  ASSERT_EQ(status_of(r), 200) << r->body;
  const json j = json::parse(r->body);
  ASSERT_EQ(j["choices"].size(), 2u);
  size_t entries = 0;  // one per generated token
  for (int c = 0; c < 2; ++c) {
    const json& content = j["choices"][c]["logprobs"]["content"];
    ASSERT_TRUE(content.is_array());
    entries += content.size();
    for (const auto& t : content) {
      EXPECT_LE(t["logprob"].get<double>(), 0.0);
      ASSERT_EQ(t["top_logprobs"].size(), 3u);
      // the alternatives are in order, the best at least as likely as the token drawn
      EXPECT_GE(t["top_logprobs"][0]["logprob"].get<double>(), t["logprob"].get<double>() - 1e-6);
      EXPECT_EQ(t["bytes"].size(), t["token"].get<std::string>().size());
    }
  }
  EXPECT_EQ(entries, j["usage"]["completion_tokens"].get<size_t>());
  // continuous_usage_stats: every chunk says where the context is and the state's size, which
  // stays the same as the context grows.
  auto rs = s.chat({{"messages", user},
                    {"max_tokens", 20},
                    {"seed", 1},
                    {"stream", true},
                    {"ignore_eos", true},
                    {"stream_options", {{"continuous_usage_stats", true}}}});
  const ChatStream st = chat_stream(rs->body);
  ASSERT_GE(st.chunks.size(), 20u);
  int last = 0;
  const json first = st.chunks[0]["usage"];
  for (const auto& c : st.chunks) {
    ASSERT_TRUE(c.contains("usage")) << c;
    const int done = c["usage"]["completion_tokens"];
    EXPECT_GE(done, last);
    last = done;
    EXPECT_EQ(c["usage"]["prompt_tokens"], first["prompt_tokens"]);
    EXPECT_EQ(c["usage"]["total_tokens"], c["usage"]["prompt_tokens"].get<int>() + done);
    EXPECT_EQ(c["usage"]["state_bytes"], first["state_bytes"]);
  }
  EXPECT_EQ(last, 20);
  EXPECT_EQ(first["state_bytes"].get<size_t>(), s.backend->slot_bytes(0));
  EXPECT_GT(first["state_bytes"].get<size_t>(), 0u);
}

TEST(Server, BadChatRequestsGetOpenAiErrors) {
  Running s(2, 64, "", 20);
  expect_error(s.chat({{"prompt", "x"}}), 400, "messages");
  expect_error(s.chat({{"messages", "hi"}}), 400, "messages");
  expect_error(s.chat({{"messages", {{{"role", "robot"}, {"content", "x"}}}}}), 400,
               "messages[0].role");
  expect_error(s.chat({{"messages", {{{"role", "user"}, {"content", std::string(500, 'z')}}}}}),
               400, "messages");
  expect_error(s.chat({{"messages", {{{"role", "user"}, {"content", "x"}}}}, {"session", "a"}}),
               404, "session");
}

TEST(Server, PlaygroundPageIsServedAtTheRoot) {
  Running s;
  auto r = s.client().Get("/");
  ASSERT_EQ(status_of(r), 200);
  EXPECT_EQ(r->get_header_value("Content-Type"), "text/html; charset=utf-8");
  std::ifstream f(std::string(MULTIPOLE_SOURCE_DIR) + "/server/playground.html");
  const std::string page((std::istreambuf_iterator<char>(f)), {});
  ASSERT_GT(page.size(), 1000u);
  EXPECT_EQ(r->body, page);  // the file, byte for byte
}

// The model's recommended sampling is what a request gets where it sets no field, and /props says
// so (llama-server's shape); a request's own field replaces it.
TEST(Server, RequestsDefaultToTheModelsRecommendedSampling) {
  const mp::testing::VariantModel vm;
  mp::ConvertOptions co;
  co.sampling.temperature = 0;  // greedy: every seed gives the same text
  co.sampling.repetition_penalty = 1.25f;
  mp::convert_gguf(vm.dir / "model.gguf", vm.dir / "greedy.gguf", co);
  const auto model = Model::load(vm.dir / "greedy.gguf");
  mp::testing::Serving s(model, {.kind = "cpu", .n_slots = 2, .n_threads = 2}, {}, {});
  auto c = s.client();
  const json props = json::parse(c.Get("/props")->body);
  const json& p = props["default_generation_settings"]["params"];
  EXPECT_EQ(p["temperature"], 0.0);
  EXPECT_EQ(p["repeat_penalty"], 1.25);
  EXPECT_EQ(p["top_p"], 1.0);  // the API's own default: the model says nothing of it
  EXPECT_EQ(p["repeat_last_n"], -1);
  auto text = [&](const json& fields) {
    json body = {{"prompt", "x"}, {"max_tokens", 12}, {"ignore_eos", true}};
    body.update(fields);
    return json::parse(c.Post("/v1/completions", body.dump(), "application/json")->body)["choices"]
        [0]["text"]
            .get<std::string>();
  };
  EXPECT_EQ(text({{"seed", 1}}), text({{"seed", 2}}));
  EXPECT_NE(text({{"seed", 1}, {"temperature", 1.5}}), text({{"seed", 2}, {"temperature", 1.5}}));
}

TEST(Server, TokenizeModelsAndMetrics) {
  Running s;
  auto c = s.client();
  auto t = c.Post("/tokenize", R"({"content":"free software"})", "application/json");
  ASSERT_EQ(status_of(t), 200);
  const json ids = json::parse(t->body)["tokens"];
  auto d = c.Post("/detokenize", json{{"tokens", ids}}.dump(), "application/json");
  EXPECT_EQ(json::parse(d->body)["content"], "free software");
  EXPECT_EQ(json::parse(c.Get("/v1/models")->body)["data"][0]["id"], "multipole");
  // Four tokens whatever the random model samples (an end of text as the fourth ended it with
  // three token events: two inter-token gaps).
  s.post({{"prompt", "x"}, {"max_tokens", 4}, {"ignore_eos", true}});
  const std::string m = c.Get("/metrics")->body;
  EXPECT_NE(m.find("multipole_generated_tokens_total 4"), std::string::npos) << m;
  EXPECT_NE(m.find("multipole_time_to_first_token_seconds_count 1"), std::string::npos) << m;
  EXPECT_NE(m.find("multipole_inter_token_latency_seconds_count 3"), std::string::npos) << m;
  // The resident memory, as /proc/self/status gives it (this process is the server).
  const size_t at = m.find("\nprocess_resident_memory_bytes ");
  ASSERT_NE(at, std::string::npos) << m;
  const double rss = std::stod(m.substr(at + 31));
  std::ifstream status("/proc/self/status");
  double vm_rss_kb = 0;
  for (std::string line; std::getline(status, line);)
    if (line.rfind("VmRSS:", 0) == 0) vm_rss_kb = std::stod(line.substr(6));
  EXPECT_GT(rss, 1e6);
  EXPECT_NEAR(rss / (vm_rss_kb * 1024), 1.0, 0.05);
}

// The streamed writes a stream's tokens took (the server's counter).
double stream_writes(const mp::testing::Serving& s) {
  const std::string m = s.client().Get("/metrics")->body;
  const std::string name = "\nmultipole_stream_writes_total ";
  const size_t at = m.find(name);
  return at == std::string::npos ? -1 : std::stod(m.substr(at + name.size()));
}

// --stream-interval 4: a stream's events go out four tokens to a write (its first token and its
// end at once), the same events as one token to a write.
TEST(Server, StreamIntervalGathersTokensIntoFewerWrites) {
  const json req = {{"prompt", "The license"}, {"max_tokens", 41}, {"ignore_eos", true},
                    {"temperature", 0.9}, {"seed", 3},        {"stream", true}};
  std::string texts[2];
  double writes[2];
  for (int interval : {1, 4}) {
    // Steps of 5 ms, as a loaded GPU's: the HTTP thread keeps up with one token a wake.
    const mp::testing::VariantModel m;
    ServerOptions o = Running::options("", 0, 0, nullptr);
    o.stream_interval = interval;
    mp::testing::Serving s(m.model,
                           std::make_unique<NullBackend>(m.model->config(), 2,
                                                         std::chrono::milliseconds(5)),
                           {.max_queue = 4}, o);
    auto r = s.client().Post("/v1/completions", req.dump(), "application/json");
    ASSERT_EQ(status_of(r), 200) << r->body;
    texts[interval / 4] = streamed_text(r->body);
    writes[interval / 4] = stream_writes(s);
  }
  EXPECT_EQ(texts[1], texts[0]);
  // At most: the first token, ten writes of four, the end (usage, [DONE]).
  EXPECT_LE(writes[1], 12);
  EXPECT_GE(writes[1], 2);
  EXPECT_GT(writes[0], writes[1]);  // one token to a wake: a write each, as fast as they come
}

// The HTTP threads that served requests run as background work (named mp-http, nice raised by
// kBackgroundNice): writing to clients gives way to the step loop.
TEST(Server, HttpThreadsGiveWayToTheStepLoop) {
  Running s;
  ASSERT_EQ(status_of(s.post({{"prompt", "x"}, {"max_tokens", 2}})), 200);
  errno = 0;
  const int own_nice = getpriority(PRIO_PROCESS, static_cast<id_t>(gettid()));
  ASSERT_EQ(errno, 0);
  int http_threads = 0;
  for (const auto& task : std::filesystem::directory_iterator("/proc/self/task")) {
    std::ifstream comm(task.path() / "comm");
    std::string name;
    std::getline(comm, name);
    if (name != "mp-http") continue;
    ++http_threads;
    errno = 0;
    const auto tid = static_cast<id_t>(std::stoi(task.path().filename()));
    const int nice = getpriority(PRIO_PROCESS, tid);
    ASSERT_EQ(errno, 0);  // -1 is also a nice value
    EXPECT_EQ(nice, std::min(own_nice + kBackgroundNice, 19));
  }
  EXPECT_GE(http_threads, 1);
}

// Replicas: /metrics reports each device, and both ran a choice of a two-choice request.
TEST(Server, MetricsPerDeviceWithReplicas) {
  Running s(2, 64, "", 0, 0, {0, 1});
  // Long enough that the first choice still runs when the second is placed (the HTTP thread
  // submitting them runs at a lower priority than the step loops): the least loaded device is
  // then the other one.
  auto r = s.post({{"prompt", "free"}, {"max_tokens", 2000}, {"ignore_eos", true}, {"n", 2}});
  ASSERT_EQ(status_of(r), 200) << r->body;
  const std::string m = s.client().Get("/metrics")->body;
  EXPECT_NE(m.find("multipole_slots 4"), std::string::npos) << m;
  for (const char* dev : {"cpu:0", "cpu:1"}) {
    const std::string slots = std::string("multipole_device_slots{device=\"") + dev + "\"} 2\n";
    EXPECT_NE(m.find(slots), std::string::npos) << m;
    const std::string tokens = std::string("multipole_device_tokens_total{device=\"") + dev + "\"} ";
    const size_t at = m.find(tokens);
    ASSERT_NE(at, std::string::npos) << m;
    EXPECT_GE(std::stod(m.substr(at + tokens.size())), 5) << dev;  // prompt and 4 fed tokens
  }
}

}  // namespace
