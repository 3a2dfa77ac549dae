// multipole-batch as a program: the OpenAI Batch formats, the older JSONL shape, --resume, and
// a loop of SIGKILLs that must lose no finished result and duplicate none.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <thread>

#include "model_fixture.h"

extern char** environ;

namespace {

using json = nlohmann::json;
using namespace mp;

struct BatchRun {
  mp::testing::TempDir dir;
  std::string slots = "4";
  BatchRun() { mp::testing::random_model(dir, mp::testing::small_config()); }
  std::vector<std::string> argv(bool resume, const std::string& out = "out.jsonl") const {
    std::vector<std::string> a = {MULTIPOLE_BATCH_BIN, "--model",  dir / "model.gguf",
                                  "--threads", "1",  "--slots",  slots,
                                  "--input",   dir / "in.jsonl", "--output", dir / out};
    if (resume) a.push_back("--resume");
    return a;
  }
  pid_t spawn(const std::vector<std::string>& args) const {
    std::vector<char*> av;
    for (const auto& s : args) av.push_back(const_cast<char*>(s.c_str()));
    av.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
    pid_t pid = -1;
    EXPECT_EQ(posix_spawn(&pid, av[0], &fa, nullptr, av.data(), environ), 0);
    posix_spawn_file_actions_destroy(&fa);
    return pid;
  }
  int run(bool resume, const std::string& out = "out.jsonl") const {
    int st = 0;
    waitpid(spawn(argv(resume, out)), &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  }
  // The complete lines of an output file (a torn last line left out), each parsed.
  std::vector<json> records(const std::string& out = "out.jsonl") const {
    std::vector<json> r;
    std::ifstream f(dir / out);
    for (std::string line; std::getline(f, line);) {
      if (f.eof()) break;
      r.push_back(json::parse(line));
    }
    return r;
  }
  void input(const std::vector<json>& lines) const {
    std::ofstream f(dir / "in.jsonl");
    for (const auto& l : lines) f << l.dump() << "\n";
  }
};

json openai_line(const std::string& id, const std::string& url, json body) {
  return {{"custom_id", id}, {"method", "POST"}, {"url", url}, {"body", std::move(body)}};
}

std::map<std::string, json> by_custom_id(const std::vector<json>& recs) {
  std::map<std::string, json> m;
  for (const auto& r : recs) {
    const std::string id = r["custom_id"];
    EXPECT_EQ(m.count(id), 0u) << "duplicate result for " << id;
    m[id] = r;
  }
  return m;
}

TEST(Batch, OpenAiBatchFormatRoundTrip) {
  BatchRun b;
  const json user = {{{"role", "user"}, {"content", "Tell me"}}};
  b.input({openai_line("chat-1", "/v1/chat/completions",
                       {{"messages", user}, {"max_tokens", 6}, {"seed", 1}, {"ignore_eos", true}}),
           openai_line("text-1", "/v1/completions",
                       {{"prompt", "User: Tell me\nAssistant:"},
                        {"max_tokens", 6},
                        {"seed", 1},
                        {"ignore_eos", true},
                        {"stop", "\nUser:"},
                        {"n", 2}}),
           openai_line("bad-body", "/v1/completions", {{"prompt", 3}}),
           openai_line("bad-url", "/v1/embeddings", {{"input", "x"}}),
           {{"custom_id", "no-body"}, {"method", "POST"}, {"url", "/v1/completions"}}});
  ASSERT_EQ(b.run(false), 0);
  const auto recs = by_custom_id(b.records());
  ASSERT_EQ(recs.size(), 5u);
  const json& chat = recs.at("chat-1");
  EXPECT_EQ(chat["id"].get<std::string>().rfind("batch_req_", 0), 0u);
  EXPECT_TRUE(chat["error"].is_null());
  EXPECT_EQ(chat["response"]["status_code"], 200);
  const json& body = chat["response"]["body"];
  EXPECT_EQ(body["object"], "chat.completion");
  EXPECT_EQ(chat["response"]["request_id"], body["id"]);
  EXPECT_EQ(body["usage"]["completion_tokens"], 6);
  const json& text = recs.at("text-1")["response"]["body"];
  EXPECT_EQ(text["object"], "text_completion");
  ASSERT_EQ(text["choices"].size(), 2u);
  // The chat request is the completion of its rendered prompt: the same tokens, the same text.
  EXPECT_EQ(body["choices"][0]["message"]["content"], text["choices"][0]["text"]);
  EXPECT_EQ(body["usage"],
            json({{"prompt_tokens", text["usage"]["prompt_tokens"].get<int>() / 2},
                  {"completion_tokens", 6},
                  {"total_tokens", text["usage"]["prompt_tokens"].get<int>() / 2 + 6},
                  {"prompt_tokens_details", {{"cached_tokens", 0}}}}));
  // A request the API refuses: its status and error body; a line that is no request: an error.
  EXPECT_EQ(recs.at("bad-body")["response"]["status_code"], 400);
  EXPECT_EQ(recs.at("bad-body")["response"]["body"]["error"]["param"], "prompt");
  EXPECT_TRUE(recs.at("bad-url")["response"].is_null());
  EXPECT_NE(recs.at("bad-url")["error"]["message"].get<std::string>().find("/v1/embeddings"),
            std::string::npos);
  EXPECT_NE(recs.at("no-body")["error"]["message"].get<std::string>().find("body"),
            std::string::npos);
}

TEST(Batch, OlderShapeStillWorksAndResumeRedoesOnlyWhatIsMissing) {
  BatchRun b;
  {
    std::ofstream f(b.dir / "in.jsonl");
    f << R"({"id": "a", "prompt": "one", "max_tokens": 4, "seed": 1})"
         "\n"
      << "this is not json\n"
      << R"({"id": "c", "prompt": "three", "max_tokens": 3, "n": 2, "seed": 2})"
         "\n";
  }
  ASSERT_EQ(b.run(false), 0);
  std::map<std::string, json> out;
  for (const auto& r : b.records()) out[r["id"].dump()] = r;
  ASSERT_EQ(out.size(), 3u);
  EXPECT_EQ(out["\"a\""]["usage"]["completion_tokens"], 4);
  EXPECT_EQ(out["\"a\""]["completion"], out["\"a\""]["choices"][0]["text"]);
  EXPECT_TRUE(out["\"line-2\""].contains("error"));
  EXPECT_EQ(out["\"c\""]["choices"].size(), 2u);
  // Keep "a" and the error, and half of "c"'s line as a kill mid-write leaves it: --resume
  // drops the torn line and the error, redoes those, and "c" comes out the same (same seed).
  {
    std::ofstream f(b.dir / "out.jsonl");
    const std::string c = out["\"c\""].dump();
    f << out["\"a\""].dump() << "\n"
      << out["\"line-2\""].dump() << "\n"
      << c.substr(0, c.size() / 2);
  }
  ASSERT_EQ(b.run(true), 0);
  const auto again = b.records();
  ASSERT_EQ(again.size(), 3u);
  EXPECT_EQ(again[0], out["\"a\""]);  // kept as it was
  std::map<std::string, json> redone;
  for (size_t i = 1; i < again.size(); ++i) redone[again[i]["id"].dump()] = again[i];
  EXPECT_TRUE(redone["\"line-2\""].contains("error"));
  EXPECT_EQ(redone["\"c\""]["choices"], out["\"c\""]["choices"]);
}

// Fields of the wrong JSON type fail their own line with a message, never the run: a url or
// method that is no string, a custom_id that is no string, a "model" of null or a number (a null
// model and a wrong-typed url each stopped the whole run with a JSON type error once).
TEST(Batch, WronglyTypedFieldsFailTheirLineOnly) {
  BatchRun b;
  const json body = {{"prompt", "one"}, {"max_tokens", 3}, {"seed", 1}, {"ignore_eos", true}};
  json null_model = body, number_model = body;
  null_model["model"] = nullptr;
  number_model["model"] = 5;
  b.input({{{"custom_id", "url"}, {"method", "POST"}, {"url", 5}, {"body", body}},
           {{"custom_id", "method"}, {"method", 7}, {"url", "/v1/completions"}, {"body", body}},
           {{"custom_id", 3}, {"url", "/v1/completions"}, {"body", body}},
           openai_line("null-model", "/v1/completions", null_model),
           openai_line("number-model", "/v1/completions", number_model),
           openai_line("good", "/v1/completions", body)});
  ASSERT_EQ(b.run(false), 0);
  const auto recs = b.records();
  ASSERT_EQ(recs.size(), 6u);
  std::map<std::string, json> by_id;
  for (const auto& r : recs) by_id[r["custom_id"].dump()] = r;
  auto message = [&](const std::string& id) {
    const json& r = by_id.at(id);
    return r["error"].is_null() ? r["response"]["body"]["error"]["message"].get<std::string>()
                                : r["error"]["message"].get<std::string>();
  };
  EXPECT_NE(message("\"url\"").find("'url' must be"), std::string::npos);
  EXPECT_NE(message("\"url\"").find("got a number"), std::string::npos);
  EXPECT_NE(message("\"method\"").find("'method' must be"), std::string::npos);
  EXPECT_NE(message("3").find("'custom_id' must be a string"), std::string::npos);
  EXPECT_NE(message("\"number-model\"").find("'model' must be a string"), std::string::npos);
  for (const char* ok : {"\"null-model\"", "\"good\""}) {
    EXPECT_EQ(by_id.at(ok)["response"]["status_code"], 200) << ok;
    EXPECT_EQ(by_id.at(ok)["response"]["body"]["usage"]["completion_tokens"], 3) << ok;
  }
  EXPECT_EQ(by_id.at("\"null-model\"")["response"]["body"]["model"], "multipole");
}

// SIGKILL at random moments (after 0-2 more results appear, plus 0-1 ms), then --resume, until a
// run completes: every result written before a kill is still there after it, none is ever
// written twice, and the final file holds exactly the results of an uninterrupted run.
TEST(Batch, KillsAtAnyMomentLoseAndDuplicateNothing) {
  BatchRun b;
  b.slots = "1";  // results one by one, so that kills fall between them
  std::vector<json> lines;
  for (int i = 0; i < 48; ++i) {
    const json body = {{"max_tokens", 32 + i % 16}, {"seed", i}, {"ignore_eos", true}};
    json chat = body, text = body;
    chat["messages"] = {{{"role", "user"}, {"content", "Question " + std::to_string(i)}}};
    text["prompt"] = "Document " + std::to_string(i);
    std::string id = "r";
    id += std::to_string(i);  // not "r" + to_string(i): GCC 12 warns (-Wrestrict, a false alarm)
    lines.push_back(i % 2 ? openai_line(id, "/v1/chat/completions", chat)
                          : openai_line(id, "/v1/completions", text));
  }
  b.input(lines);
  ASSERT_EQ(b.run(false, "reference.jsonl"), 0);
  const auto reference = by_custom_id(b.records("reference.jsonl"));
  ASSERT_EQ(reference.size(), lines.size());

  std::mt19937 rng(7);
  std::set<std::string> seen;  // results present after the previous kill
  int kills = 0, mid_run = 0, exit_code = -1;
  for (int round = 0; round < 80 && exit_code != 0; ++round) {
    const pid_t pid = b.spawn(b.argv(round > 0));
    const size_t target = seen.size() + std::uniform_int_distribution<size_t>(0, 2)(rng);
    while (b.records().size() < target && waitpid(pid, nullptr, WNOHANG) == 0)
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    std::this_thread::sleep_for(
        std::chrono::microseconds(std::uniform_int_distribution<int>(0, 1000)(rng)));
    kill(pid, SIGKILL);  // a no-op on a process already gone
    int st = 0;
    waitpid(pid, &st, 0);
    kills += WIFSIGNALED(st);
    exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    const auto now = by_custom_id(b.records());  // fails on a duplicate
    mid_run += WIFSIGNALED(st) && now.size() > seen.size() && now.size() < reference.size();
    for (const auto& id : seen) EXPECT_EQ(now.count(id), 1u) << id << " lost after kill " << kills;
    for (const auto& [id, r] : now) {
      seen.insert(id);
      EXPECT_EQ(r["response"]["body"]["choices"], reference.at(id)["response"]["body"]["choices"])
          << id;
    }
  }
  ASSERT_EQ(exit_code, 0);
  const auto final_records = by_custom_id(b.records());
  EXPECT_EQ(final_records.size(), reference.size());
  for (const auto& [id, r] : reference)
    EXPECT_EQ(final_records.at(id)["response"]["body"]["choices"], r["response"]["body"]["choices"])
        << id;
  EXPECT_GE(kills, 5);
  EXPECT_GE(mid_run, 3);  // kills that fell between results of the same run
  std::printf("%d kills, %d of them between results of a run\n", kills, mid_run);
}

}  // namespace
