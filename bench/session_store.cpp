// session_store: what resuming a stored session costs in the store, Redis (--session-store)
// against the local state directory (--state-dir, the baseline), for a state of --bytes bytes
// (the default model's: 1082640, at any context length). Per operation, median over
// --iterations: a turn's write (Lease::commit: encode, checksum, the store's write) and a resume
// on a server that does not hold the session (Sessions::acquire: the store's read, checksum,
// decode; with Redis also the claim and its release).
// With --model, real states instead: a prompt of each --tokens length (random ids) read into a
// CPU backend slot (the time of re-reading the prompt, the baseline), its state stored, then
// resumed elsewhere: the store's read plus Backend::load_slot into a fresh slot, whose next
// logits must equal the original slot's.
//   redis-server --port 6390 --save "" & build/bench/session_store redis://127.0.0.1:6390
//   build/bench/session_store redis://127.0.0.1:6390 --model models/default.gguf --tokens 1000 --tokens 100000
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
// `load`: what the resuming server does with the state after the store's read (nothing, or
// loading it into a backend slot).
template <class MakeStore, class Load>
Times measure(MakeStore make_store, const State& state, int iterations, Load load) {
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
    load(*lease.state().bytes);
    resumes.push_back(now_ms() - t0);
    if (*lease.state().bytes != *state.bytes) throw mp::Error("wrong state read");
  }
  writer.remove("bench");
  return {median(writes), median(resumes)};
}

// The next token's logits of `slot` after `token`; the slot is left as it was.
std::vector<float> next_logits(mp::Backend& b, int slot, int token) {
  const std::vector<uint8_t> before = b.save_slot(slot);
  const int t[1] = {token};
  mp::SeqChunk c{slot, t, false};
  std::vector<float> l = b.forward({&c, 1});
  b.load_slot(slot, before);
  return l;
}

}  // namespace

int main(int argc, char** argv) {
  mp::cli::Args a(argc, argv, {},
                  "usage: session_store redis://HOST[:PORT][/PREFIX] [--bytes N] [--iterations N]\n"
                  "  [--dir DIR (default: a new directory under /dev/shm)]\n"
                  "  [--model FILE [--tokens N]... (real states of prompts of N tokens; default 1000\n"
                  "  and 100000)]\n");
  a.check_known({"bytes", "iterations", "dir", "model", "tokens"});
  if (a.positional().size() != 1) a.fail("expected the Redis URL");
  try {
    const int iterations = static_cast<int>(a.integer("iterations", 50));
    const std::string dir =
        a.str("dir", "/dev/shm/multipole-session-bench-" + std::to_string(std::random_device{}()));
    const RedisOptions ro = parse_redis_url(a.positional()[0]);
    auto directory = [&] { return directory_store(dir); };
    auto redis = [&] { return redis_store(ro); };
    if (!a.has("model")) {
      const size_t bytes = static_cast<size_t>(a.integer("bytes", 1082640));
      std::mt19937 rng(1);
      auto data = std::make_shared<std::vector<uint8_t>>(bytes);
      for (auto& b : *data) b = static_cast<uint8_t>(rng());
      const State state{data, 42, 100000};
      auto nothing = [](const std::vector<uint8_t>&) {};
      const Times local = measure(directory, state, iterations, nothing);
      const Times remote = measure(redis, state, iterations, nothing);
      std::filesystem::remove_all(dir);
      std::printf("state of %zu bytes, median of %d\n\n", bytes, iterations);
      std::printf("| operation | state directory (%s) | Redis | Redis / directory |\n|---|---:|---:|---:|\n",
                  dir.c_str());
      std::printf("| turn's write | %.2f ms | %.2f ms | %.2f |\n", local.write, remote.write,
                  remote.write / local.write);
      std::printf("| resume elsewhere | %.2f ms | %.2f ms | %.2f |\n", local.resume, remote.resume,
                  remote.resume / local.resume);
      return 0;
    }
    auto model = mp::Model::load(a.str("model"));
    auto backend = mp::make_backend(model, {.kind = "cpu", .n_slots = 2});
    const int vocab = model->config().vocab_size;
    std::printf("%s, %s; Redis %s, median of %d\n\n", model->path().c_str(),
                backend->name().c_str(), a.positional()[0].c_str(), iterations);
    std::printf("| session tokens | state bytes | re-reading the prompt | Redis: turn's write | "
                "Redis: resume elsewhere (read + load) | state directory: resume | "
                "prompt / Redis resume |\n|---:|---:|---:|---:|---:|---:|---:|\n");
    std::vector<std::string> lengths = a.all("tokens");
    if (lengths.empty()) lengths = {"1000", "100000"};
    for (const std::string& n : lengths) {
      if (n.empty() || n.size() > 9 || n.find_first_not_of("0123456789") != std::string::npos ||
          std::stoi(n) == 0)
        a.fail("--tokens must be a positive number of tokens, not '" + n + "'");
      std::mt19937 rng(static_cast<uint32_t>(std::stoi(n)));
      std::vector<int> prompt(std::stoul(n));
      for (auto& t : prompt) t = 3 + static_cast<int>(rng() % (vocab - 3));
      const int slot = backend->alloc_slot(), other = backend->alloc_slot();
      const double t0 = now_ms();
      const size_t step = backend->prefill_tokens_per_step();
      for (size_t i = 0; i < prompt.size(); i += step) {
        mp::SeqChunk c{slot, std::span<const int>(prompt).subspan(i, std::min(step, prompt.size() - i)),
                       false};
        backend->forward({&c, 1});
      }
      const double reread = now_ms() - t0;
      const State state{std::make_shared<std::vector<uint8_t>>(backend->save_slot(slot)), 5,
                        static_cast<int64_t>(prompt.size())};
      auto into_slot = [&](const std::vector<uint8_t>& bytes) { backend->load_slot(other, bytes); };
      const Times local = measure(directory, state, iterations, into_slot);
      const Times remote = measure(redis, state, iterations, into_slot);
      if (next_logits(*backend, other, 5) != next_logits(*backend, slot, 5))
        throw mp::Error("the resumed slot's logits differ from the original's");
      std::printf("| %s | %zu | %.1f ms | %.2f ms | %.2f ms | %.2f ms | %.0f |\n", n.c_str(),
                  state.bytes->size(), reread, remote.write, remote.resume, local.resume,
                  reread / remote.resume);
      std::fflush(stdout);
      backend->free_slot(slot);
      backend->free_slot(other);
    }
    std::filesystem::remove_all(dir);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
