// session_store: what resuming a stored session costs in the store, Redis (--session-store)
// against the local state directory (--state-dir, the baseline), for a state of --bytes bytes
// (the default model's: 1082640, at any context length). Per operation, median over
// --iterations: a turn's write (Lease::commit: encode, checksum, the store's write) and a resume
// on a server that does not hold the session (Sessions::acquire: the store's read, checksum,
// decode; with Redis also the claim and its release).
//   redis-server --port 6390 --save "" & build/bench/session_store redis://127.0.0.1:6390
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <random>

#include "common/args.h"
#include "common/redis_store.h"

namespace {

using namespace mp::sessions;

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Times {
  double write, resume;
};

// `make_store` gives a new server's view of the same store: its sessions are not in memory.
template <class MakeStore>
Times measure(MakeStore make_store, const State& state, int iterations) {
  Sessions writer("bench-model", make_store(), {});
  writer.create("bench").commit(state);
  std::vector<double> writes, resumes;
  for (int i = 0; i < iterations; ++i) {
    auto lease = writer.acquire("bench");
    const double t0 = now_ms();
    lease.commit(state);
    writes.push_back(now_ms() - t0);
  }
  for (int i = 0; i < iterations; ++i) {
    Sessions reader("bench-model", make_store(), {});
    const double t0 = now_ms();
    auto lease = reader.acquire("bench");
    resumes.push_back(now_ms() - t0);
    if (lease.state().bytes->size() != state.bytes->size()) throw mp::Error("wrong state read");
  }
  writer.remove("bench");
  return {median(writes), median(resumes)};
}

}  // namespace

int main(int argc, char** argv) {
  mp::cli::Args a(argc, argv, {},
                  "usage: session_store redis://HOST[:PORT][/PREFIX] [--bytes N] [--iterations N]\n"
                  "  [--dir DIR (default: a new directory under /dev/shm)]\n");
  a.check_known({"bytes", "iterations", "dir"});
  if (a.positional().size() != 1) a.fail("expected the Redis URL");
  try {
    const size_t bytes = static_cast<size_t>(a.integer("bytes", 1082640));
    const int iterations = static_cast<int>(a.integer("iterations", 50));
    std::mt19937 rng(1);
    auto data = std::make_shared<std::vector<uint8_t>>(bytes);
    for (auto& b : *data) b = static_cast<uint8_t>(rng());
    const State state{data, 42, 100000};
    const std::string dir =
        a.str("dir", "/dev/shm/multipole-session-bench-" + std::to_string(std::random_device{}()));
    const RedisOptions ro = parse_redis_url(a.positional()[0]);
    const Times local = measure([&] { return directory_store(dir); }, state, iterations);
    const Times redis = measure([&] { return redis_store(ro); }, state, iterations);
    std::filesystem::remove_all(dir);
    std::printf("state of %zu bytes, median of %d\n\n", bytes, iterations);
    std::printf("| operation | state directory (%s) | Redis | Redis / directory |\n|---|---:|---:|---:|\n",
                dir.c_str());
    std::printf("| turn's write | %.2f ms | %.2f ms | %.2f |\n", local.write, redis.write,
                redis.write / local.write);
    std::printf("| resume elsewhere | %.2f ms | %.2f ms | %.2f |\n", local.resume, redis.resume,
                redis.resume / local.resume);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
