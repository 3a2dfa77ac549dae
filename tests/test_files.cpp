// Crash-safe files: state files and converted models are the old file or the new one wherever
// in the file their writer dies (killed at random byte offsets: tests/support/write_loop_main.cpp),
// and readers refuse truncated, corrupt or unknown state files, naming the file and the fault.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <optional>
#include <random>

#include "file_io.h"
#include "gguf.h"
#include "model_fixture.h"

namespace {

using namespace mp;
using mp::testing::TempDir;
using mp::testing::VariantModel;
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

// write-loop (tests/support/write_loop_main.cpp), set up once: each write(limit) has it fork a
// writer that the kernel kills as soon as `limit` bytes are written (-1: no limit).
class WriteLoop {
 public:
  explicit WriteLoop(const std::vector<std::string>& args) {
    int in[2], out[2];
    if (pipe2(in, O_CLOEXEC) != 0 || pipe2(out, O_CLOEXEC) != 0) throw Error("pipe failed");
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, in[0], STDIN_FILENO);
    posix_spawn_file_actions_adddup2(&fa, out[1], STDOUT_FILENO);
    std::vector<char*> argv = {const_cast<char*>(MULTIPOLE_WRITE_LOOP_BIN)};
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    const int err = posix_spawn(&pid_, argv[0], &fa, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    close(in[0]);
    close(out[1]);
    to_ = fdopen(in[1], "w");
    from_ = fdopen(out[0], "r");
    if (err != 0) throw Error(std::string("cannot start write-loop: ") + std::strerror(err));
    if (const std::string l = line(); l != "ready") throw Error("write-loop did not start: " + l);
  }
  ~WriteLoop() {
    std::fclose(to_);  // the end of its input: it exits
    std::fclose(from_);
    waitpid(pid_, nullptr, 0);
  }
  WriteLoop(const WriteLoop&) = delete;
  WriteLoop& operator=(const WriteLoop&) = delete;
  // How the writer ended: "killed" (by SIGXFSZ, `limit` bytes written) or "finished".
  std::string write(long long limit) {
    std::fprintf(to_, "%lld\n", limit);
    std::fflush(to_);
    return line();
  }

 private:
  std::string line() {
    char buf[256];
    if (!std::fgets(buf, sizeof buf, from_)) return "(write-loop exited)";
    std::string l(buf);
    if (!l.empty() && l.back() == '\n') l.pop_back();
    return l;
  }
  pid_t pid_ = -1;
  FILE* to_ = nullptr;
  FILE* from_ = nullptr;
};

// The files in `dir` whose names end as AtomicFile's temporaries do.
std::vector<std::string> temporaries_in(const TempDir& tmp) {
  const std::string dir = tmp / ".";
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().find(".tmp-") != std::string::npos)
      out.push_back(e.path().filename().string());
  return out;
}

// A limit anywhere in a file of `size` bytes (the writer is killed) or past it (it finishes):
// the first writes at 0, 1, size - 1 and size bytes.
long long next_limit(int write, size_t size, std::mt19937& rng) {
  const long long n = static_cast<long long>(size);
  if (write < 4) return std::array<long long, 4>{0, 1, n - 1, n}[write];
  return static_cast<long long>(rng() % static_cast<uint64_t>(n + n / 4));
}

// Has `loop` write `writes` times to `target` in `dir`, the k-th time the bytes want(k), killed
// at next_limit's offsets. After a kill the target must be as it was (`old`: none while there is
// no file) and its writer's temporary, of exactly the limit's size, alone beside it: the write
// removed those of the writers killed before it. After a finished write the target must be the
// new bytes (then checked(k, what)) and no temporary left. Returns how many were killed.
int kill_writes(WriteLoop& loop, const TempDir& dir, const std::string& target, int writes,
                uint32_t seed, std::optional<std::string> old,
                const std::function<std::string(int)>& want,
                const std::function<void(int, const std::string&)>& checked = {}) {
  std::mt19937 rng(seed);
  int killed = 0;
  for (int k = 0; k < writes; ++k) {
    const std::string now = want(k);
    const long long limit = next_limit(k, now.size(), rng);
    const std::string at = "write " + std::to_string(k) + ", limit " + std::to_string(limit) +
                           " of " + std::to_string(now.size()) + " bytes";
    const std::string ended = loop.write(limit);
    if (limit < static_cast<long long>(now.size())) {
      EXPECT_EQ(ended, "killed") << at;
      EXPECT_TRUE((fs::exists(target) ? std::optional(read_all(target)) : std::nullopt) == old)
          << at << ": not the old file";
      const auto left = temporaries_in(dir);
      EXPECT_EQ(left.size(), 1u) << at;
      if (left.size() == 1) {
        EXPECT_EQ(fs::file_size(dir / left[0]), static_cast<uintmax_t>(limit)) << at;
      }
      ++killed;
    } else {
      EXPECT_EQ(ended, "finished") << at;
      EXPECT_TRUE(read_all(target) == now) << at << ": not the new file";
      EXPECT_TRUE(temporaries_in(dir).empty()) << at;
      if (checked) checked(k, at);
      old = now;
    }
    if (::testing::Test::HasFailure()) break;
  }
  return killed;
}

// The state one token further each write, killed somewhere in the file or finishing: the file is
// the old state or the new one (the reference run's: the same tokens, one at a time), bit for bit.
TEST(CrashSafeFiles, KilledStateWriterLeavesTheOldOrTheNewState) {
  const VariantModel vm;
  auto b = make_backend(vm.model, {.kind = "cpu", .n_slots = 2, .n_threads = 1});
  const int ref_slot = b->alloc_slot(), check_slot = b->alloc_slot();
  const std::string out = vm.dir / "seq.state";
  WriteLoop loop({"state", vm.dir / "model.gguf", out});
  const int writes = 200;
  const int killed = kill_writes(
      loop, vm.dir, out, writes, 7, std::nullopt,
      [&](int k) {
        const int token = mp::testing::write_loop_token(k);  // as write-loop feeds it
        const SeqChunk ch{ref_slot, std::span<const int>(&token, 1), false};
        b->forward({&ch, 1});
        const auto bytes = b->save_slot(ref_slot);
        return std::string(bytes.begin(), bytes.end());
      },
      [&](int k, const std::string& at) {
        EXPECT_EQ(error_of([&] { load_state_file(*b, check_slot, out); }), "") << at;
        EXPECT_EQ(b->slot_pos(check_slot), k + 1) << at;
      });
  std::printf("%d writes: %d killed mid-write, %d finished\n", writes, killed, writes - killed);
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
  WriteLoop loop({"gguf", dir / "hf-a", dir / "hf-b", out});
  const int writes = 50;
  const int killed = kill_writes(loop, dir, out, writes, 8, want_b,
                                 [&](int k) { return k % 2 ? want_b : want_a; });  // a, b, a, ...
  std::printf("%d conversions: %d killed mid-write, %d finished\n", writes, killed,
              writes - killed);
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
  EXPECT_TRUE(temporaries_in(dir).empty());
}

// A writer killed mid-write leaves its temporary; the next write into the folder removes it,
// but not the temporary of a write in progress, nor files that only look alike.
TEST(CrashSafeFiles, TheNextWriteRemovesTemporariesOfKilledWriters) {
  const VariantModel vm;
  const TempDir& dir = vm.dir;
  ASSERT_EQ(WriteLoop({"state", dir / "model.gguf", dir / "seq.state"}).write(100), "killed");
  ASSERT_EQ(temporaries_in(dir).size(), 1u);
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
  const VariantModel vm;
  const TempDir& dir = vm.dir;
  auto b = make_backend(vm.model, {.kind = "cpu", .n_slots = 1, .n_threads = 1});
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
  const VariantModel vm;
  const TempDir& dir = vm.dir;
  auto b = make_backend(vm.model, {.kind = "cpu", .n_slots = 2, .n_threads = 1});
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
