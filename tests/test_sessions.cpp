// Sessions and the prefix cache through a real multipole-server: CRUD, a long conversation across
// restarts, another model's states, the disk cap, one request at a time, cached prompt tokens;
// replicas sharing sessions through a real redis-server (the Redis store, its compare-and-set and
// claims, a conversation alternating between replicas, concurrent turns, the store down).
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <future>
#include <random>
#include <nlohmann/json.hpp>
#include <thread>

#include "common/api.h"
#include "common/redis_store.h"
#include "common/sessions.h"
#include "model_fixture.h"
#include "server.h"
#include "serving.h"

namespace {

using json = nlohmann::json;
using namespace mp;

// Session files under /dev/shm when there is one: the tests check what is written, not how
// fast a disk syncs (each stored turn is an fsync).
struct StateDirs {
  std::filesystem::path root;
  StateDirs() {
    const std::filesystem::path shm = "/dev/shm";
    root = (std::filesystem::is_directory(shm) ? shm : std::filesystem::temp_directory_path()) /
           ("multipole-sessions-" + std::to_string(std::random_device{}()));
    std::filesystem::create_directories(root);
  }
  ~StateDirs() {
    std::error_code ec;
    std::filesystem::remove_all(root, ec);
  }
  std::string operator/(const std::string& name) const { return (root / name).string(); }
};

using Models = mp::testing::VariantModel;

// One server over `model`; destroying it and making another over the same state_dir is a restart.
// `store`: a state directory, a redis:// URL (sessions shared with other servers) or "" (memory).
struct Server1 : mp::testing::Serving {
  Server1(std::shared_ptr<Model> model, const std::string& store, sessions::Options so = {},
          SchedulerOptions sched_opts = {})
      : Serving(model,
                {.kind = "cpu", .n_slots = 4 + sched_opts.prefix_cache_slots, .n_threads = 2},
                sched_opts, options(store, so)) {}
  static ServerOptions options(const std::string& store, const sessions::Options& so) {
    ServerOptions o;
    (store.starts_with("redis://") ? o.session_store : o.state_dir) = store;
    o.ctx_limit = 1 << 20;
    o.sessions = so;
    return o;
  }
  httplib::Result send(const std::string& method, const std::string& path,
                       const json& body = nullptr) const {
    auto c = client();
    if (method == "GET") return c.Get(path);
    if (method == "DELETE") return c.Delete(path);
    return c.Post(path, body.is_null() ? "" : body.dump(), "application/json");
  }
  json call(const std::string& method, const std::string& path, const json& body = nullptr,
            int want = 200) const {
    httplib::Result r = send(method, path, body);
    EXPECT_TRUE(r);
    if (!r) return nullptr;
    EXPECT_EQ(r->status, want) << method << " " << path << ": " << r->body;
    return json::parse(r->body);
  }
  static json turn_body(const std::string& session, const std::string& prompt, uint64_t seed) {
    return {{"session", session},
            {"prompt", prompt},
            {"max_tokens", 4},
            {"temperature", 0.8},
            {"seed", seed}};
  }
  // One turn: the new text and the response.
  json turn(const std::string& session, const std::string& prompt, uint64_t seed,
            int want = 200) const {
    return call("POST", "/v1/completions", turn_body(session, prompt, seed), want);
  }
};

// A 409 with the Retry-After (seconds) of a busy session, or none (a conflict that waiting does
// not end).
void expect_conflict(const httplib::Result& r, const std::string& retry_after) {
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 409) << r->body;
  EXPECT_EQ(json::parse(r->body)["error"]["code"], "session_conflict") << r->body;
  EXPECT_EQ(r->get_header_value("Retry-After"), retry_after) << r->body;
}

TEST(Sessions, CreateInspectForkDelete) {
  Models m;
  Server1 s(m.model, "");
  const json empty = s.call("POST", "/v1/sessions", {{"id", "chat-1"}});
  EXPECT_EQ(empty["id"], "chat-1");
  EXPECT_EQ(empty["object"], "session");
  EXPECT_EQ(empty["position"], 0);
  EXPECT_EQ(empty["busy"], false);
  const json doc = s.call("POST", "/v1/sessions", {{"prompt", "A long document about licenses."}});
  const std::string id = doc["id"];
  EXPECT_EQ(id.rfind("sess-", 0), 0u);
  const int prompt_tokens =
      static_cast<int>(m.model->tokenizer().encode("A long document about licenses.", true).size());
  EXPECT_EQ(doc["position"], prompt_tokens);
  EXPECT_GT(doc["bytes"].get<size_t>(), 0u);
  EXPECT_EQ(s.call("GET", "/v1/sessions/" + id)["position"], prompt_tokens);
  EXPECT_EQ(s.call("GET", "/v1/sessions")["data"].size(), 2u);
  // A fork continues like its source: the same seed gives the same text.
  const json fork = s.call("POST", "/v1/sessions/" + id + "/fork", {{"id", "copy"}});
  EXPECT_EQ(fork["position"], prompt_tokens);
  const json a = s.turn(id, " Question:", 3), b = s.turn("copy", " Question:", 3);
  EXPECT_EQ(a["choices"][0]["text"], b["choices"][0]["text"]);
  EXPECT_EQ(a["session"]["position"], prompt_tokens + a["usage"]["prompt_tokens"].get<int>() + 4);
  // Errors: unknown, taken and bad ids.
  s.call("GET", "/v1/sessions/nope", nullptr, 404);
  expect_conflict(s.send("POST", "/v1/sessions", {{"id", "copy"}}), "");  // exists
  s.call("POST", "/v1/sessions", {{"id", "bad id!"}}, 400);
  s.turn("nope", "x", 1, 404);
  s.call("POST", "/v1/completions", {{"session", id}, {"prompt", "x"}, {"n", 2}}, 400);
  EXPECT_EQ(s.call("DELETE", "/v1/sessions/copy")["deleted"], true);
  s.call("GET", "/v1/sessions/copy", nullptr, 404);
}

// X-Session-Id (what deploy/haproxy.cfg hashes on) names the session like the body's "session"
// (or "id" creating one, or the path's id): alone, or equal to it; a different one is a 400 that
// changes nothing.
TEST(Sessions, TheSessionHeaderActsLikeTheBodysField) {
  Models m;
  Server1 s(m.model, "");
  auto send = [&](const std::string& method, const std::string& path, const json& body,
                  const std::string& header, int want) {
    httplib::Headers h;
    if (!header.empty()) h.emplace("X-Session-Id", header);
    auto c = s.client();
    auto r = method == "GET" ? c.Get(path, h) : c.Post(path, h, body.dump(), "application/json");
    EXPECT_TRUE(r);
    if (!r) return json();
    EXPECT_EQ(r->status, want) << method << " " << path << " " << header << ": " << r->body;
    return json::parse(r->body);
  };
  EXPECT_EQ(send("POST", "/v1/sessions", json::object(), "by-header", 200)["id"], "by-header");
  s.call("POST", "/v1/sessions", {{"id", "by-body"}});
  send("POST", "/v1/sessions", {{"id", "other"}}, "by-header", 400);
  s.call("GET", "/v1/sessions/other", nullptr, 404);
  // The same turn named by the header and by the body: the same text and position.
  const json turn = {{"prompt", " hello"}, {"max_tokens", 4}, {"temperature", 0.8}, {"seed", 5}};
  json in_body = turn;
  in_body["session"] = "by-body";
  const json a = send("POST", "/v1/completions", turn, "by-header", 200);
  const json b = s.call("POST", "/v1/completions", in_body);
  EXPECT_EQ(a["choices"][0]["text"], b["choices"][0]["text"]);
  EXPECT_EQ(a["session"]["id"], "by-header");
  EXPECT_EQ(a["session"]["position"], b["session"]["position"]);
  const int64_t position = b["session"]["position"];
  // Both, equal: a turn; both, different: 400 naming both, and neither session moves.
  EXPECT_GT(send("POST", "/v1/completions", in_body, "by-body", 200)["session"]["position"],
            position);
  const json clash = send("POST", "/v1/completions", in_body, "by-header", 400);
  EXPECT_EQ(clash["error"]["code"], "session_mismatch");
  const std::string msg = clash["error"]["message"];
  EXPECT_NE(msg.find("'by-header'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("'by-body'"), std::string::npos) << msg;
  EXPECT_EQ(s.call("GET", "/v1/sessions/by-header")["position"], position);
  EXPECT_GT(s.call("GET", "/v1/sessions/by-body")["position"], position);
  in_body.erase("session");
  in_body["messages"] = {{{"role", "user"}, {"content", "hi"}}};
  in_body.erase("prompt");
  EXPECT_EQ(send("POST", "/v1/chat/completions", in_body, "by-header", 200)["session"]["id"],
            "by-header");
  // The path's id against the header.
  send("GET", "/v1/sessions/by-body", nullptr, "by-body", 200);
  send("GET", "/v1/sessions/by-body", nullptr, "by-header", 400);
  send("POST", "/v1/sessions/by-body/fork", {{"id", "copy"}}, "by-header", 400);
  s.call("GET", "/v1/sessions/copy", nullptr, 404);
}

// The prompt of a test conversation's turn i.
std::string words(int i) { return " turn " + std::to_string(i) + ":"; }

// The conversation's texts on one server that keeps its session in memory; each turn reads only
// its new prompt (after the first turn: without BOS, after the unfed token of the turn before),
// whatever the session's length.
std::vector<std::string> one_server_conversation(const Models& m, int turns) {
  Server1 s(m.model, "");
  s.call("POST", "/v1/sessions", {{"id", "talk"}});
  std::vector<std::string> texts;
  const auto& tok = m.model->tokenizer();
  for (int i = 0; i < turns; ++i) {
    const json r = s.turn("talk", words(i), 100 + i);
    texts.push_back(r["choices"][0]["text"]);
    EXPECT_EQ(r["usage"]["prompt_tokens"].get<size_t>(),
              i == 0 ? tok.encode(words(i), true).size() : tok.encode(words(i), false).size() + 1);
  }
  return texts;
}

// 200 turns, the server restarted every 20, give the text of an uninterrupted run; each turn
// reads only its own tokens.
TEST(Sessions, AConversationSurvivesRestartsTokenForToken) {
  Models m;
  StateDirs dirs;
  const int turns = 200;
  const std::vector<std::string> steady = one_server_conversation(m, turns);
  std::vector<std::string> restarted;
  int64_t position = 0;
  for (int i = 0; i < turns; ++i) {
    Server1 s(m.model, dirs / "restarted");
    if (i == 0) s.call("POST", "/v1/sessions", {{"id", "talk"}});
    for (int end = i + 20; i < end; ++i) {
      const json r = s.turn("talk", words(i), 100 + i);
      restarted.push_back(r["choices"][0]["text"]);
      EXPECT_GT(r["session"]["position"].get<int64_t>(), position);
      position = r["session"]["position"];
    }
    --i;
  }
  EXPECT_EQ(restarted, steady);
  EXPECT_GT(position, 200 * 4);
}

TEST(Sessions, AStateOfAnotherModelIsRefused) {
  Models m;
  mp::testing::TempDir other_dir;
  StateDirs dirs;
  auto other = mp::testing::random_model(other_dir, mp::testing::small_config(), DType::F32, 7);
  ASSERT_NE(other->identity(), m.model->identity());
  {
    Server1 s(m.model, dirs / "state");
    s.call("POST", "/v1/sessions", {{"id", "mine"}, {"prompt", "hello there"}});
  }
  Server1 s(other, dirs / "state");
  EXPECT_EQ(s.call("GET", "/v1/sessions/mine")["id"], "mine");
  const auto r = s.send("POST", "/v1/completions", Server1::turn_body("mine", " more", 1));
  expect_conflict(r, "");
  EXPECT_NE(r->body.find("another model"), std::string::npos) << r->body;
}

TEST(Sessions, CorruptFilesAreSkippedAndTheDiskCapHonoured) {
  Models m;
  StateDirs dirs;
  const std::string dir = dirs / "state";
  size_t record = 0;
  {
    Server1 s(m.model, dir);
    s.call("POST", "/v1/sessions", {{"id", "a"}, {"prompt", "one two three"}});
    record = std::filesystem::file_size(dir + "/a.session");
  }
  // A session file cut short by a crash is reported and skipped, never loaded.
  std::filesystem::copy_file(dir + "/a.session", dir + "/b.session");
  std::filesystem::resize_file(dir + "/b.session", 10);
  {
    sessions::Options o;
    o.max_store_bytes = record * 5 / 2;  // room for two
    Server1 s(m.model, dir, o);
    EXPECT_EQ(s.call("GET", "/v1/sessions")["data"].size(), 1u);
    s.call("POST", "/v1/sessions", {{"id", "c"}, {"prompt", "one two three"}});
    s.turn("a", " four", 1);  // a is used after c: c is now the least recently used
    s.call("POST", "/v1/sessions", {{"id", "d"}, {"prompt", "one two three"}});
    size_t bytes = 0;
    for (const auto& f : std::filesystem::directory_iterator(dir))
      if (f.path().extension() == ".session") bytes += f.file_size();
    EXPECT_LE(bytes, o.max_store_bytes);
    s.call("GET", "/v1/sessions/c", nullptr, 404);
    s.call("GET", "/v1/sessions/a");
    s.call("GET", "/v1/sessions/d");
  }
}

// A long turn on `holder` holds a session; a turn or a delete on `other` (the same server, or
// another replica sharing the store) meanwhile gets 409, to be retried after a second
// (Retry-After); then `other` continues after the turn.
void one_request_at_a_time(const Models& m, const Server1& holder, const Server1& other) {
  // Long enough that the turn still runs when the other requests arrive (the test model writes
  // some 35 k tokens a second: 0.6 s): with 500 tokens it had ended first in 10 runs of 50 on a
  // loaded machine, and the "conflicting" turn rightly got a 200. 40 of 40 pass so under load.
  constexpr int kTokens = 20000;
  holder.call("POST", "/v1/sessions", {{"id", "busy"}});
  auto first = std::async(std::launch::async, [&] {
    return holder.call(
        "POST", "/v1/completions",
        {{"session", "busy"}, {"prompt", "go"}, {"max_tokens", kTokens}, {"ignore_eos", true}});
  });
  for (int i = 0; i < 5000 && holder.sched->stats().slots_in_use == 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  ASSERT_EQ(holder.sched->stats().slots_in_use, 1);
  expect_conflict(other.send("POST", "/v1/completions", Server1::turn_body("busy", "x", 1)), "1");
  expect_conflict(other.send("DELETE", "/v1/sessions/busy"), "1");
  EXPECT_EQ(first.get()["usage"]["completion_tokens"], kTokens);
  const int prompt = static_cast<int>(m.model->tokenizer().encode("go", true).size());
  EXPECT_EQ(other.call("GET", "/v1/sessions/busy")["position"], prompt + kTokens);
  const json next = other.turn("busy", "x", 1);  // its prompt starts with the unfed last token
  EXPECT_EQ(next["session"]["position"],
            prompt + kTokens - 1 + next["usage"]["prompt_tokens"].get<int>() + 4);
}

TEST(Sessions, OneRequestAtATimeOnASession) {
  Models m;
  Server1 s(m.model, "");
  one_request_at_a_time(m, s, s);
}

TEST(PrefixCacheServer, ARepeatedDocumentReportsCachedTokens) {
  Models m;
  Server1 s(m.model, "", {},
            {.prefix_block = 16, .prefix_cache_slots = 1, .prefix_cache_bytes = 16 << 20});
  std::string doc;
  for (int i = 0; i < 40; ++i) doc += " word" + std::to_string(i);
  const json req = {{"prompt", doc + " First?"}, {"max_tokens", 5}, {"seed", 1}};
  const json cold = s.call("POST", "/v1/completions", req);
  EXPECT_EQ(cold["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
  const json warm = s.call("POST", "/v1/completions", req);
  const int cached = warm["usage"]["prompt_tokens_details"]["cached_tokens"];
  EXPECT_GT(cached, 0);
  EXPECT_EQ(cached % 16, 0);
  EXPECT_EQ(warm["choices"][0]["text"], cold["choices"][0]["text"]);
  auto metrics = s.client().Get("/metrics");
  EXPECT_NE(metrics->body.find("multipole_prefix_cache_hits_total 1"), std::string::npos);
}

// A redis-server of the test's own, on a free loopback port, without persistence. The tests fail
// (not skip) without it: scripts/deps.sh installs redis-server.
class RedisServer {
 public:
  // A port free when picked may be taken before redis-server binds it (another test's connection
  // or server): then another port.
  explicit RedisServer(int port = free_port()) : port_(port) {
    for (int attempt = 1; !launch(); ++attempt) {
      if (attempt == 10) throw Error("redis-server found no free port in 10 attempts");
      port_ = free_port();
    }
  }
  ~RedisServer() { kill(); }
  void start() {  // again, after kill(): on the same port, which its clients know
    if (!launch())
      throw Error("redis-server cannot bind its port " + std::to_string(port_) + " again");
  }
  void kill() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }
  int port() const { return port_; }
  std::string url() const { return "redis://127.0.0.1:" + std::to_string(port_) + "/test:"; }
  sessions::RedisOptions options() const { return sessions::parse_redis_url(url()); }
  // redis-cli's answer to one command.
  std::string cli(const std::string& command) const {
    const std::string cmd = "redis-cli -p " + std::to_string(port_) + " " + command;
    FILE* f = popen(cmd.c_str(), "r");
    std::string out;
    char buf[256];
    while (f && fgets(buf, sizeof buf, f)) out += buf;
    if (f) pclose(f);
    while (!out.empty() && out.back() == '\n') out.pop_back();
    return out;
  }

 private:
  // Starts redis-server on port_ and waits until it listens there (its log says so: not another
  // test's server answering on that port); false when the port was taken.
  bool launch() {
    const std::string port = std::to_string(port_), dir = dir_ / "", log = dir + "redis.log";
    std::filesystem::remove(log);
    std::vector<std::string> args = {"redis-server", "--port", port, "--bind", "127.0.0.1",
                                     "--save", "", "--appendonly", "no", "--dir", dir,
                                     "--loglevel", "notice", "--logfile", log};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    if (posix_spawnp(&pid_, "redis-server", nullptr, nullptr, argv.data(), environ) != 0)
      throw Error("cannot start redis-server (scripts/deps.sh installs it)");
    for (int i = 0; i < 500; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      std::ifstream f(log);
      const std::string said(std::istreambuf_iterator<char>(f), {});
      if (said.find("Ready to accept connections") != std::string::npos) return true;
      int status;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        if (said.find("Address already in use") != std::string::npos) return false;
        throw Error("redis-server exited at start: " + said);
      }
    }
    throw Error("redis-server did not start listening within 5 s");
  }
  static int free_port() {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t n = sizeof a;
    if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
        getsockname(fd, reinterpret_cast<sockaddr*>(&a), &n) != 0)
      throw Error("no free port");
    close(fd);
    return ntohs(a.sin_port);
  }
  StateDirs dir_;
  int port_;
  pid_t pid_ = -1;
};

// A port taken by another listener: the test's redis-server goes to another one and is the one
// that answers there.
TEST(RedisStore, ATestsRedisServerLeavesATakenPortForAnother) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t n = sizeof a;
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(listen(fd, 1), 0);
  ASSERT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&a), &n), 0);
  const int taken = ntohs(a.sin_port);
  {
    RedisServer redis(taken);
    EXPECT_NE(redis.port(), taken);
    EXPECT_EQ(redis.cli("PING"), "PONG");
  }
  close(fd);
}

sessions::State random_state(int64_t position, uint32_t seed) {
  std::mt19937 rng(seed);
  auto bytes = std::make_shared<std::vector<uint8_t>>(4096);
  for (auto& b : *bytes) b = static_cast<uint8_t>(rng());
  return {bytes, static_cast<int>(rng() % 100), position};
}

TEST(RedisStore, UrlsAreParsedAndBadOnesNamed) {
  const auto o = sessions::parse_redis_url("redis://cache.local:6380/app:sessions:");
  EXPECT_EQ(o.host, "cache.local");
  EXPECT_EQ(o.port, 6380);
  EXPECT_EQ(o.prefix, "app:sessions:");
  const auto d = sessions::parse_redis_url("redis://10.0.0.1");
  EXPECT_EQ(d.host, "10.0.0.1");
  EXPECT_EQ(d.port, 6379);
  EXPECT_EQ(d.prefix, "multipole:session:");
  for (const char* bad : {"http://x", "redis://", "redis://h:0", "redis://h:99999", "redis://h:6x"}) {
    try {
      sessions::parse_redis_url(bad);
      ADD_FAILURE() << bad << " was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(bad), std::string::npos) << e.what();
    }
  }
}

TEST(RedisStore, VersionedPutsClaimsScanTtlAndSizeCap) {
  RedisServer redis;
  sessions::RedisOptions o = redis.options();
  o.ttl_s = 100;
  o.max_record_bytes = 8192;
  auto a = sessions::redis_store(o), b = sessions::redis_store(o);
  ASSERT_TRUE(a->shared());
  sessions::Info info;
  info.id = "s1";
  info.version = 1;
  const std::string v1 = sessions::encode_record(info, "model", random_state(5, 1));
  info.version = 2;
  const std::string v2 = sessions::encode_record(info, "model", random_state(9, 2));
  EXPECT_TRUE(a->put("s1", v1, 0));
  EXPECT_FALSE(b->put("s1", v1, 0));  // exists: a create elsewhere loses
  EXPECT_FALSE(b->put("s1", v2, 2));  // not the stored version
  EXPECT_EQ(a->get("s1"), v1);
  EXPECT_TRUE(b->put("s1", v2, 1));
  EXPECT_FALSE(a->put("s1", v2, 1));  // a's write after b's, from the same version: refused
  EXPECT_EQ(b->get("s1"), v2);
  EXPECT_FALSE(a->get("nope").has_value());
  // The TTL counts from the last write.
  const long ttl_ms = std::stol(redis.cli("PTTL test:s1"));
  EXPECT_GT(ttl_ms, 90'000);
  EXPECT_LE(ttl_ms, 100'000);
  // One claim at a time, whichever server asks; only its holder drops it.
  EXPECT_TRUE(a->claim("s1"));
  EXPECT_FALSE(b->claim("s1"));
  b->unclaim("s1");
  EXPECT_FALSE(b->claim("s1"));
  a->unclaim("s1");
  EXPECT_TRUE(b->claim("s1"));
  // Scan: headers of the records only (not the claim), with the records' sizes.
  const auto listed = a->scan(nullptr);
  ASSERT_EQ(listed.size(), 1u);
  EXPECT_EQ(listed[0].info.id, "s1");
  EXPECT_EQ(listed[0].info.position, 9);
  EXPECT_EQ(listed[0].info.version, 2u);
  EXPECT_EQ(listed[0].info.bytes, v2.size());
  // Too large a record is refused, naming the cap.
  info.version = 1;
  const std::string big = sessions::encode_record(info, "model", random_state(1, 3));
  o.max_record_bytes = 1000;
  try {
    sessions::redis_store(o)->put("s2", big, 0);
    ADD_FAILURE() << "a record over the cap was stored";
  } catch (const api::ApiError& e) {
    EXPECT_EQ(e.status, 413);
    EXPECT_NE(std::string(e.what()).find("1000"), std::string::npos);
  }
  EXPECT_TRUE(a->remove("s1"));
  EXPECT_FALSE(a->remove("s1"));
  EXPECT_TRUE(a->scan(nullptr).empty());
}

// A claim names its server, whose heartbeat keeps a liveness key: a living server keeps its claim
// past the liveness time; a dead one's (a store gone without releasing it) lapses within it,
// long before the claim's own expiry.
TEST(RedisStore, AClaimOfADeadServerLapsesWithinTheLivenessTime) {
  RedisServer redis;
  sessions::RedisOptions o = redis.options();
  o.liveness_ms = 300;
  auto b = sessions::redis_store(o);
  {
    auto a = sessions::redis_store(o);
    ASSERT_TRUE(a->claim("x"));
    std::this_thread::sleep_for(std::chrono::milliseconds(1000));
    EXPECT_FALSE(b->claim("x"));
    EXPECT_GT(std::stol(redis.cli("PTTL test:x:claim")), 50'000);
  }
  const auto t0 = std::chrono::steady_clock::now();
  bool taken = false;
  while (!taken && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5)) {
    taken = b->claim("x");
    if (!taken) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_TRUE(taken);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(2));
  EXPECT_TRUE(b->scan(nullptr).empty());  // claims and liveness keys are not sessions
}

// Two servers' Sessions over one Redis: a turn that outlived its claim while another server's turn
// was stored loses the compare-and-set (409); nothing interleaves.
TEST(RedisStore, ATurnThatOutlivedItsClaimLosesTheCompareAndSet) {
  RedisServer redis;
  sessions::RedisOptions o = redis.options();
  o.claim_ms = 200;
  sessions::Sessions one("model", sessions::redis_store(o), {}),
      two("model", sessions::redis_store(o), {});
  one.create("x").commit(random_state(3, 1));
  EXPECT_EQ(two.info("x").position, 3);  // created on one, seen by two
  auto slow = one.acquire("x");
  try {
    two.acquire("x");
    ADD_FAILURE() << "two servers held one session";
  } catch (const api::ApiError& e) {
    EXPECT_EQ(e.status, 409);
    EXPECT_NE(std::string(e.what()).find("another server"), std::string::npos);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // slow's claim lapses
  const sessions::State fast = random_state(7, 2);
  two.acquire("x").commit(fast);
  try {
    slow.commit(random_state(8, 3));
    ADD_FAILURE() << "a stale turn overwrote a newer one";
  } catch (const api::ApiError& e) {
    EXPECT_EQ(e.status, 409);
  }
  { auto gone = std::move(slow); }
  auto again = one.acquire("x");  // the newer state, not the one `one` had in memory
  EXPECT_EQ(again.state().position, 7);
  EXPECT_EQ(*again.state().bytes, *fast.bytes);
  EXPECT_EQ(again.state().unfed_token, fast.unfed_token);
}

// A conversation whose turns alternate between two replicas gives token for token the text of one
// server; each replica sees sessions the other created and wrote.
TEST(Replicas, AConversationAlternatingBetweenReplicasMatchesOneServer) {
  Models m;
  RedisServer redis;
  const int turns = 16;
  const std::vector<std::string> one = one_server_conversation(m, turns);
  Server1 a(m.model, redis.url()), b(m.model, redis.url());
  a.call("POST", "/v1/sessions", {{"id", "talk"}});
  b.call("POST", "/v1/sessions", {{"id", "talk"}}, 409);  // exists, on the other replica
  std::vector<std::string> both;
  int64_t position = 0;
  for (int i = 0; i < turns; ++i) {
    const Server1& s = i % 2 ? b : a;
    const json r = s.turn("talk", words(i), 100 + i);
    both.push_back(r["choices"][0]["text"]);
    EXPECT_GT(r["session"]["position"].get<int64_t>(), position);
    position = r["session"]["position"];
    EXPECT_EQ((i % 2 ? a : b).call("GET", "/v1/sessions/talk")["position"], position);
  }
  EXPECT_EQ(both, one);
  // A fork on one replica is continued on the other; a delete on one is seen by the other.
  a.call("POST", "/v1/sessions/talk/fork", {{"id", "copy"}});
  EXPECT_EQ(b.turn("copy", " more", 1)["choices"][0]["text"], a.turn("talk", " more", 1)["choices"][0]["text"]);
  EXPECT_EQ(b.call("GET", "/v1/sessions")["data"].size(), 2u);
  b.call("DELETE", "/v1/sessions/copy");
  a.call("GET", "/v1/sessions/copy", nullptr, 404);
  a.turn("copy", "x", 1, 404);
}

TEST(Replicas, ConcurrentTurnsOnOneSessionOneWinsTheOtherGets409) {
  Models m;
  RedisServer redis;
  Server1 a(m.model, redis.url()), b(m.model, redis.url());
  one_request_at_a_time(m, a, b);
}

// Redis down: completions without a session go on; session requests get a clear 503, counted in
// /metrics; they work again when Redis is back.
TEST(Replicas, AStoreThatIsDownFailsOnlySessionRequests) {
  Models m;
  RedisServer redis;
  Server1 a(m.model, redis.url());
  auto metric = [&](const std::string& name) {
    const std::string metrics = a.client().Get("/metrics")->body;
    const size_t at = metrics.find("\n" + name + " ");
    return at == std::string::npos ? -1.0 : std::stod(metrics.substr(at + name.size() + 2));
  };
  a.call("POST", "/v1/sessions", {{"id", "kept"}});
  EXPECT_EQ(a.call("GET", "/v1/sessions/absent", nullptr, 404)["error"]["code"], "session_not_found");
  EXPECT_EQ(metric("multipole_session_misses_total"), 1.0);
  EXPECT_GE(metric("multipole_session_store_calls_total"), 2.0);  // at least the claim and the write
  EXPECT_GT(metric("multipole_session_store_seconds_total"), 0.0);
  redis.kill();
  // ignore_eos: unseeded, the random model may sample EOS before its 3 tokens.
  const json plain = a.call("POST", "/v1/completions",
                            {{"prompt", "hello"}, {"max_tokens", 3}, {"ignore_eos", true}});
  EXPECT_EQ(plain["usage"]["completion_tokens"], 3);
  for (const json& e : {a.turn("kept", "x", 1, 503)["error"],
                        a.call("POST", "/v1/sessions", {{"id", "new"}}, 503)["error"],
                        a.call("GET", "/v1/sessions/kept", nullptr, 503)["error"]}) {
    EXPECT_EQ(e["code"], "session_store_unavailable");
    EXPECT_NE(e["message"].get<std::string>().find("session store is unavailable"),
              std::string::npos);
  }
  EXPECT_GE(metric("multipole_session_store_errors_total"), 3.0);
  redis.start();  // empty: it kept nothing
  a.call("POST", "/v1/sessions", {{"id", "new"}});
  EXPECT_EQ(a.turn("new", "x", 1)["session"]["position"].get<int>(),
            static_cast<int>(m.model->tokenizer().encode("x", true).size()) + 4);
}

}  // namespace
