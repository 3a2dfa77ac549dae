// state_bytes: one sequence's state on the CPU backend (Backend::slot_bytes, fp32) for a Hugging
// Face config.json, exact attention (the baseline: every key and value kept) against the FMA
// conversion multipole-convert --fma would make, at several context lengths.
#include <cstdio>
#include <fstream>
#include <sstream>

#include "common/args.h"
#include "multipole/multipole.h"

int main(int argc, char** argv) {
  mp::cli::Args a(argc, argv, {},
                  "usage: state_bytes CONFIG.json [--block-size M] [--rank P] [--trained-length N]\n"
                  "  [--tokens 4096,65536,1048576]\n");
  a.check_known({"block-size", "rank", "trained-length", "tokens"});
  if (a.positional().size() != 1) a.fail("expected CONFIG.json");
  try {
    std::ifstream f(a.positional()[0]);
    if (!f) throw mp::Error("cannot read '" + a.positional()[0] + "'");
    std::stringstream text;
    text << f.rdbuf();
    const mp::Config exact = mp::config_from_hf_json(text.str());
    mp::FmaConversion conv;
    conv.block_size = static_cast<int>(a.integer("block-size", conv.block_size));
    conv.rank = static_cast<int>(a.integer("rank", conv.rank));
    conv.trained_length = a.integer("trained-length", 0);
    const mp::Config fma = mp::with_fma(exact, conv);
    std::printf("%s\nFMA: %s\n\n", exact.summary().c_str(), fma.summary().c_str());
    std::printf("| tokens | exact | FMA | exact / FMA |\n|---:|---:|---:|---:|\n");
    std::stringstream list(a.str("tokens", "4096,65536,1048576"));
    for (std::string item; std::getline(list, item, ',');) {
      const int64_t t = std::stoll(item);
      const double e = double(mp::cpu_state_bytes(exact, t)), m = double(mp::cpu_state_bytes(fma, t));
      std::printf("| %lld | %.1f MiB | %.2f MiB | %.0f |\n", static_cast<long long>(t), e / (1 << 20),
                  m / (1 << 20), e / m);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
