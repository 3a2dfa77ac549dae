// Crash-safe files: state files and converted models are the old file or the new one whatever
// moment their writer dies at (SIGKILL loop over tests/support/write_loop_main.cpp), and readers
// refuse truncated, corrupt or unknown state files, naming the file and the fault.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <map>
#include <random>

#include "file_io.h"
#include "gguf.h"
#include "model_fixture.h"

namespace {

using namespace mp;
using mp::testing::random_model;
using mp::testing::TempDir;
namespace fs = std::filesystem;

std::string read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}
void write_all(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

// The error message of f(), or "" if it did not throw mp::Error.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// Starts write-loop with `args`, waits for its "ready", lets it write for `delay_us` and kills it.
void run_and_kill(const std::vector<std::string>& args, int delay_us) {
  int out[2];
  ASSERT_EQ(pipe(out), 0);
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    dup2(out[1], STDOUT_FILENO);
    close(out[0]);
    close(out[1]);
    std::vector<char*> argv = {const_cast<char*>(MULTIPOLE_WRITE_LOOP_BIN)};
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }
  close(out[1]);
  char ready[6] = {};
  size_t got = 0;
  while (got < sizeof ready) {
    const ssize_t k = read(out[0], ready + got, sizeof ready - got);
    if (k <= 0) break;
    got += static_cast<size_t>(k);
  }
  close(out[0]);
  EXPECT_EQ(std::string(ready, got), "ready\n") << "write-loop did not start";
  usleep(static_cast<useconds_t>(delay_us));
  kill(pid, SIGKILL);
  int status = 0;
  waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << "write-loop exited early";
}

// Removes the temporary files a killed writer left beside `target`; returns how many.
int remove_temporaries(const std::string& target) {
  int n = 0;
  const std::string prefix = fs::path(target).filename().string() + ".tmp-";
  for (const auto& e : fs::directory_iterator(fs::path(target).parent_path()))
    if (e.path().filename().string().starts_with(prefix)) {
      fs::remove(e.path());
      ++n;
    }
  return n;
}

// A CPU backend over a random small model, written to dir/model.gguf.
std::unique_ptr<Backend> small_backend(const TempDir& dir, int slots) {
  return make_backend(random_model(dir, mp::testing::small_config()),
                      {.kind = "cpu", .n_slots = slots, .n_threads = 1});
}

TEST(CrashSafeFiles, KilledStateWriterLeavesTheOldOrTheNewState) {
  TempDir dir;
  auto b = small_backend(dir, 2);
  // The state after each position, fed as write-loop feeds it (one token a step: same bits).
  const int ref_slot = b->alloc_slot(), check_slot = b->alloc_slot();
  std::vector<std::vector<uint8_t>> ref;
  auto state_at = [&](int64_t pos) {
    while (static_cast<int64_t>(ref.size()) < pos) {
      const int token = mp::testing::write_loop_token(static_cast<int64_t>(ref.size()));
      const SeqChunk ch{ref_slot, std::span<const int>(&token, 1), false};
      b->forward({&ch, 1});
      ref.push_back(b->save_slot(ref_slot));
    }
    return std::string(ref[pos - 1].begin(), ref[pos - 1].end());
  };
  const std::string out = dir / "seq.state";
  std::mt19937 rng(7);
  std::string old;  // "" while there is no file
  int replaced = 0, kept = 0, killed_mid_write = 0;
  const int kills = 200;
  for (int k = 0; k < kills; ++k) {
    run_and_kill({"state", dir / "model.gguf", out}, static_cast<int>(rng() % 25000));
    killed_mid_write += remove_temporaries(out);
    if (!fs::exists(out)) {
      ASSERT_TRUE(old.empty()) << "kill " << k << ": the state file vanished";
      ++kept;
      continue;
    }
    const std::string now = read_all(out);
    if (now == old) {
      ++kept;
      continue;
    }
    ASSERT_EQ(error_of([&] { load_state_file(*b, check_slot, out); }), "") << "kill " << k;
    const int64_t pos = b->slot_pos(check_slot);
    ASSERT_GE(pos, 1);
    ASSERT_TRUE(now == state_at(pos)) << "kill " << k << ": a mix of states at position " << pos;
    old = now;
    ++replaced;
  }
  std::printf("%d kills: %d left a new state, %d the old one; %d died mid-write (temporary "
              "file left)\n", kills, replaced, kept, killed_mid_write);
  EXPECT_GE(replaced, kills / 20);  // the loop did write (often: about half the kills here)
}

TEST(CrashSafeFiles, KilledConverterLeavesTheOldOrTheNewModel) {
  TempDir dir;
  const Config c = mp::testing::small_config();
  mp::testing::CheckpointOptions a, bopt;
  a.seed = 1;
  bopt.seed = 2;
  mp::testing::write_random_checkpoint(dir / "hf-a", c, a);
  mp::testing::write_random_checkpoint(dir / "hf-b", c, bopt);
  ConvertOptions o;
  convert_hf_to_gguf(dir / "hf-a", dir / "a.gguf", o);
  convert_hf_to_gguf(dir / "hf-b", dir / "b.gguf", o);
  const std::string want_a = read_all(dir / "a.gguf"), want_b = read_all(dir / "b.gguf");
  ASSERT_NE(want_a, want_b);
  const std::string out = dir / "out.gguf";
  write_all(out, want_b);
  std::mt19937 rng(8);
  std::string old = want_b;
  int replaced = 0, killed_mid_write = 0;
  for (int k = 0; k < 50; ++k) {
    run_and_kill({"gguf", dir / "hf-a", dir / "hf-b", out}, static_cast<int>(rng() % 40000));
    killed_mid_write += remove_temporaries(out);
    const std::string now = read_all(out);
    ASSERT_TRUE(now == want_a || now == want_b) << "kill " << k << ": a partial model";
    replaced += now != old;
    old = now;
  }
  std::printf("50 kills of the converter: %d left another model, %d the old one; %d died "
              "mid-write\n", replaced, 50 - replaced, killed_mid_write);
  EXPECT_EQ(Model::load(out)->config().summary(), c.summary());
}

TEST(CrashSafeFiles, FailedWriteKeepsTheOldFileAndLeavesNoTemporary) {
  TempDir dir;
  const std::string path = dir / "m.gguf";
  write_all(path, "the old file");
  const std::vector<gguf::TensorOut> bad = {
      {"t", {4}, DType::F32, [](std::vector<uint8_t>& out) { out.resize(3); }}};
  EXPECT_NE(error_of([&] { gguf::write(path, {}, bad); }).find("'t' produced 3 bytes"),
            std::string::npos);
  EXPECT_EQ(read_all(path), "the old file");
  EXPECT_EQ(remove_temporaries(path), 0);
}

// The files in `dir` whose names end as AtomicFile's temporaries do.
std::vector<std::string> temporaries_in(const TempDir& tmp) {
  const std::string dir = tmp / ".";
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().find(".tmp-") != std::string::npos)
      out.push_back(e.path().filename().string());
  return out;
}

// A writer killed mid-write leaves its temporary; the next write into the folder removes it,
// but not the temporary of a write in progress, nor files that only look alike.
TEST(CrashSafeFiles, TheNextWriteRemovesTemporariesOfKilledWriters) {
  TempDir dir;
  const auto b = small_backend(dir, 1);
  const std::string out = dir / "seq.state";
  std::mt19937 rng(9);
  for (int k = 0; k < 100 && temporaries_in(dir).empty(); ++k)
    run_and_kill({"state", dir / "model.gguf", out}, static_cast<int>(rng() % 25000));
  ASSERT_EQ(temporaries_in(dir).size(), 1u) << "no writer was killed mid-write in 100 kills";
  write_all(dir / "notes.tmp-1234", "not ours: 4 digits");
  write_all(dir / "notes.tmp-abcdefgz", "not ours: not hex");
  {
    AtomicFile live(dir / "live.gguf");  // the next write: removes the killed writer's file
    live.write("x", 1);
    ASSERT_EQ(temporaries_in(dir).size(), 3u);  // the notes and its own
    // Another stray (as a writer killed now would leave), while `live` is still writing: a
    // write cannot clean then, as it cannot tell strays from temporaries being written.
    write_all(dir / "seq.state.tmp-0123abcd", "stray");
    write_file_atomic(dir / "other", "y");
    EXPECT_EQ(temporaries_in(dir).size(), 4u);
    live.commit();
  }
  EXPECT_EQ(read_all(dir / "live.gguf"), "x");
  write_file_atomic(dir / "other", "z");  // alone in the folder: cleans
  auto left = temporaries_in(dir);
  std::sort(left.begin(), left.end());
  EXPECT_EQ(left, (std::vector<std::string>{"notes.tmp-1234", "notes.tmp-abcdefgz"}));
  EXPECT_EQ(read_all(dir / "other"), "z");
}

TEST(StateFile, RefusesTruncatedCorruptAndUnknownFilesNamingThem) {
  TempDir dir;
  auto b = small_backend(dir, 1);
  const int s = b->alloc_slot();
  const auto tokens = mp::testing::random_tokens(37, b->config().vocab_size, 3);
  const SeqChunk ch{s, tokens, false};
  b->forward({&ch, 1});
  const std::string path = dir / "seq.state";
  save_state_file(*b, s, path);
  const std::string good = read_all(path);
  auto refusal = [&](const std::string& bytes) {
    write_all(path, bytes);
    const std::string e = error_of([&] { load_state_file(*b, s, path); });
    EXPECT_NE(e.find("'" + path + "'"), std::string::npos) << e;
    return e;
  };
  std::string flipped = good;
  flipped[good.size() / 2] ^= 0x10;
  EXPECT_NE(refusal(flipped).find("checksum mismatch"), std::string::npos);
  for (size_t cut : {size_t(0), size_t(40), good.size() / 2, good.size() - 1})
    EXPECT_NE(refusal(good.substr(0, cut)).find("truncated"), std::string::npos) << cut;
  EXPECT_NE(refusal(good + "x").find("trailing bytes"), std::string::npos);
  std::string v3 = good;
  v3[16] = 3;  // the version, second value of the header
  EXPECT_NE(refusal(v3).find("version 3 is not supported"), std::string::npos);
  EXPECT_NE(refusal(std::string(200, 'x')).find("not a state file"), std::string::npos);
  EXPECT_NE(error_of([&] { load_state_file(*b, s, dir / "absent.state"); }).find("absent.state"),
            std::string::npos);
  EXPECT_EQ(b->slot_pos(s), 37);  // no refusal touched the slot
}

TEST(StateFile, ReadsVersionOneWithoutChecksum) {
  TempDir dir;
  auto b = small_backend(dir, 2);
  const int s = b->alloc_slot(), t = b->alloc_slot();
  const int V = b->config().vocab_size;
  const auto prefix = mp::testing::random_tokens(29, V, 4),
             rest = mp::testing::random_tokens(11, V, 5);
  const SeqChunk ch{s, prefix, false};
  b->forward({&ch, 1});
  std::string v1 = read_all((save_state_file(*b, s, dir / "v2.state"), dir / "v2.state"));
  v1[16] = 1;
  v1.resize(v1.size() - 8);  // version 1 ends where the checksum begins
  write_all(dir / "v1.state", v1);
  load_state_file(*b, t, dir / "v1.state");
  EXPECT_EQ(b->slot_pos(t), 29);
  const SeqChunk a{s, rest, true}, r{t, rest, true};
  EXPECT_EQ(b->forward({&r, 1}), b->forward({&a, 1}));  // bit for bit
}

}  // namespace
