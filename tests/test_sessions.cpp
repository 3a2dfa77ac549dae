// Sessions and the prefix cache through a real multipole-server: CRUD, a long conversation across
// restarts, another model's states, the disk cap, one request at a time, cached prompt tokens.
#include <gtest/gtest.h>
#include <httplib.h>

#include <filesystem>
#include <fstream>
#include <future>
#include <random>
#include <nlohmann/json.hpp>
#include <thread>

#include "common/sessions.h"
#include "model_fixture.h"
#include "server.h"

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

struct Models {
  mp::testing::TempDir dir;
  std::shared_ptr<Model> model = mp::testing::random_model(dir, mp::testing::small_config());
};

// One server over `model`; destroying it and making another over the same state_dir is a restart.
struct Server1 {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Scheduler> sched;
  std::unique_ptr<Server> server;
  std::thread thread;
  Server1(std::shared_ptr<Model> model, const std::string& state_dir,
          sessions::Options so = {}, SchedulerOptions sched_opts = {}) {
    backend = make_backend(model, {.kind = "cpu",
                                   .n_slots = 4 + sched_opts.prefix_cache_slots,
                                   .n_threads = 2});
    sched = std::make_unique<Scheduler>(*backend, model->tokenizer(), sched_opts);
    ServerOptions o;
    o.port = 0;
    o.access_log = false;
    o.state_dir = state_dir;
    o.ctx_limit = 1 << 20;
    o.sessions = so;
    server = std::make_unique<Server>(model, *sched, o);
    if (!server->bind()) throw Error("bind failed");
    thread = std::thread([this] { server->run(); });
  }
  ~Server1() {
    sched->shutdown();
    server->stop();
    thread.join();
  }
  httplib::Client client() const {
    httplib::Client c("127.0.0.1", server->port());
    c.set_read_timeout(60, 0);
    return c;
  }
  json call(const std::string& method, const std::string& path, const json& body = nullptr,
            int want = 200) const {
    auto c = client();
    httplib::Result r = method == "GET"      ? c.Get(path)
                        : method == "DELETE" ? c.Delete(path)
                                             : c.Post(path, body.is_null() ? "" : body.dump(),
                                                      "application/json");
    EXPECT_TRUE(r);
    if (!r) return nullptr;
    EXPECT_EQ(r->status, want) << method << " " << path << ": " << r->body;
    return json::parse(r->body);
  }
  // One turn: the new text and the response.
  json turn(const std::string& session, const std::string& prompt, uint64_t seed,
            int want = 200) const {
    return call("POST", "/v1/completions",
                {{"session", session},
                 {"prompt", prompt},
                 {"max_tokens", 4},
                 {"temperature", 0.8},
                 {"seed", seed}},
                want);
  }
};

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
  s.call("POST", "/v1/sessions", {{"id", "copy"}}, 409);
  s.call("POST", "/v1/sessions", {{"id", "bad id!"}}, 400);
  s.turn("nope", "x", 1, 404);
  s.call("POST", "/v1/completions", {{"session", id}, {"prompt", "x"}, {"n", 2}}, 400);
  EXPECT_EQ(s.call("DELETE", "/v1/sessions/copy")["deleted"], true);
  s.call("GET", "/v1/sessions/copy", nullptr, 404);
}

// 200 turns, the server restarted every 20, give the text of an uninterrupted run; each turn
// reads only its own tokens.
TEST(Sessions, AConversationSurvivesRestartsTokenForToken) {
  Models m;
  StateDirs dirs;
  const int turns = 200;
  auto words = [](int i) { return " turn " + std::to_string(i) + ":"; };
  std::vector<std::string> steady;
  {
    Server1 s(m.model, "");
    s.call("POST", "/v1/sessions", {{"id", "talk"}});
    for (int i = 0; i < turns; ++i) {
      const json r = s.turn("talk", words(i), 100 + i);
      steady.push_back(r["choices"][0]["text"]);
      // Only the new prompt is read (after the first turn: without BOS, after the unfed token
      // of the turn before), whatever the session's length.
      const auto& tok = m.model->tokenizer();
      EXPECT_EQ(r["usage"]["prompt_tokens"].get<size_t>(),
                i == 0 ? tok.encode(words(i), true).size() : tok.encode(words(i), false).size() + 1);
    }
  }
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
  const json r = s.turn("mine", " more", 1, 409);
  EXPECT_NE(r["error"]["message"].get<std::string>().find("another model"), std::string::npos);
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

TEST(Sessions, OneRequestAtATimeOnASession) {
  Models m;
  Server1 s(m.model, "");
  s.call("POST", "/v1/sessions", {{"id", "busy"}});
  // A long turn holds the session; a second request meanwhile gets 409.
  auto first = std::async(std::launch::async, [&] {
    return s.call("POST", "/v1/completions",
                  {{"session", "busy"}, {"prompt", "go"}, {"max_tokens", 500}, {"ignore_eos", true}});
  });
  for (int i = 0; i < 500 && s.sched->stats().slots_in_use == 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ASSERT_EQ(s.sched->stats().slots_in_use, 1);
  const json r = s.turn("busy", "x", 1, 409);
  EXPECT_EQ(r["error"]["code"], "session_conflict");
  s.call("DELETE", "/v1/sessions/busy", nullptr, 409);
  EXPECT_EQ(first.get()["usage"]["completion_tokens"], 500);
  const int prompt = static_cast<int>(m.model->tokenizer().encode("go", true).size());
  EXPECT_EQ(s.call("GET", "/v1/sessions/busy")["position"], prompt + 500);
  s.turn("busy", "x", 1);
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

}  // namespace
