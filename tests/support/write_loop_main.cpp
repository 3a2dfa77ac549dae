// write-loop: the writer the kill tests (tests/test_files.cpp) stop mid-write. It sets up once
// (loading a model and linked libraries is what takes time), prints "ready", then for each line
// "LIMIT" on stdin forks a writer that writes one file and exits, its file size limit at LIMIT
// bytes (RLIMIT_FSIZE; -1: none): the kernel kills it with SIGXFSZ at the write() that would pass
// the limit, so it dies with exactly LIMIT bytes written. It prints how the writer ended,
// "killed" or "finished", and exits at the end of stdin.
//   write-loop state MODEL OUT     the slot one more token on (write_loop_token), then its state
//                                  to OUT (save_state_file)
//   write-loop gguf HF_A HF_B OUT  HF_A converted to OUT, HF_B the next time, and so on
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <functional>
#include <string>

#include "checkpoint.h"

namespace {

// Forking copies only the calling thread: a lock another thread held would stay locked.
int thread_count() {
  int n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/task")) ++n;
  return n;
}

// Runs write() in a child with its file size limit at `limit` bytes; how the child ended.
std::string write_limited(long long limit, const std::function<void()>& write) {
  if (const int n = thread_count(); n != 1)
    throw mp::Error("write-loop must be single-threaded to fork, not " + std::to_string(n) +
                    " threads");
  const pid_t pid = fork();
  if (pid < 0) return "fork failed";
  if (pid == 0) {
    const rlimit none{0, 0};
    setrlimit(RLIMIT_CORE, &none);  // SIGXFSZ's default action dumps core
    if (limit >= 0) {
      const rlimit file{static_cast<rlim_t>(limit), static_cast<rlim_t>(limit)};
      setrlimit(RLIMIT_FSIZE, &file);
    }
    signal(SIGXFSZ, SIG_DFL);
    try {
      write();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "write-loop: the writer failed: %s\n", e.what());
      _exit(1);
    }
    _exit(0);  // no exit handlers: the parent's are not the child's to run
  }
  int status = 0;
  if (waitpid(pid, &status, 0) != pid) return "wait failed";
  if (WIFSIGNALED(status) && WTERMSIG(status) == SIGXFSZ) return "killed";
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return "finished";
  return "failed (wait status " + std::to_string(status) + ")";
}

// Answers each limit read from stdin with how its writer ended.
void serve(const std::function<void()>& before_each, const std::function<void()>& write) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // each line to the test as it is written
  std::printf("ready\n");
  long long limit;
  while (std::scanf("%lld", &limit) == 1) {
    before_each();
    std::printf("%s\n", write_limited(limit, write).c_str());
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  try {
    if (mode == "state" && argc == 4) {
      auto b =
          mp::make_backend(mp::Model::load(argv[2]), {.kind = "cpu", .n_slots = 1, .n_threads = 1});
      const int slot = b->alloc_slot();
      int64_t pos = 0;
      serve(
          [&] {
            const int token = mp::testing::write_loop_token(pos++);
            const mp::SeqChunk c{slot, std::span<const int>(&token, 1), false};
            b->forward({&c, 1});
          },
          [&] { mp::save_state_file(*b, slot, argv[3]); });
      return 0;
    }
    if (mode == "gguf" && argc == 5) {
      mp::ConvertOptions o;
      o.overwrite = true;
      int writes = 0;
      const char* source = nullptr;
      serve([&] { source = argv[2 + writes++ % 2]; },
            [&] { mp::convert_hf_to_gguf(source, argv[4], o); });
      return 0;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "write-loop: %s\n", e.what());
    return 1;
  }
  std::fprintf(stderr, "usage: write-loop state MODEL OUT | write-loop gguf HF_A HF_B OUT\n");
  return 2;
}
