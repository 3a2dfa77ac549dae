// A small command-line parser shared by the tools: --name value, --flag, positional arguments,
// and the short spellings a tool names (-m for --model, as llama.cpp users type).
#pragma once

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace mp::cli {

// The flags setting BackendOptions::cpu_fp32_products and cpu_bf16_activations, in every tool
// that makes a backend.
inline const char* kCpuFp32ProductsUsage =
    "  --cpu-fp32-products  keep the CPU's prefill products fp32, not bf16 on AMX or\n"
    "                    AVX512-BF16 (docs/PERF.md, \"bf16 products\")\n"
    "  --cpu-bf16-activations  round the CPU's prefill activations once to bf16 there (faster;\n"
    "                    up to 0.05 nats, not the default's split into two bf16 parts)\n";

class Args {
 public:
  // `flags` take no value; every other --name takes one. `short_names` maps "m" to "model".
  // Any other -x is an error rather than a word of the prompt; "-" and "-5" stay positional.
  Args(int argc, char** argv, std::set<std::string> flags, std::string usage,
       const std::map<std::string, std::string>& short_names = {})
      : usage_(std::move(usage)) {
    for (int i = 1; i < argc; ++i) {
      std::string a = argv[i];
      if (a == "-h" || a == "--help") {
        std::fputs(usage_.c_str(), stdout);
        std::exit(0);
      }
      if (a.size() >= 2 && a[0] == '-' && std::isalpha(static_cast<unsigned char>(a[1]))) {
        auto it = short_names.find(a.substr(1));
        if (it == short_names.end()) fail("unknown option " + a);
        a = "--" + it->second;
      }
      if (a.rfind("--", 0) == 0) {
        const std::string name = a.substr(2);
        if (flags.count(name)) {
          opts_[name].push_back("1");
        } else if (i + 1 < argc) {
          opts_[name].push_back(argv[++i]);
        } else {
          fail("option --" + name + " needs a value");
        }
      } else {
        positional_.push_back(a);
      }
    }
  }
  [[noreturn]] void fail(const std::string& msg) const {
    std::fprintf(stderr, "error: %s\n\n%s", msg.c_str(), usage_.c_str());
    std::exit(2);
  }
  bool has(const std::string& k) const { return opts_.count(k) > 0; }
  std::string str(const std::string& k, const std::string& def = "") const {
    auto it = opts_.find(k);
    return it == opts_.end() ? def : it->second.back();
  }
  std::vector<std::string> all(const std::string& k) const {
    auto it = opts_.find(k);
    return it == opts_.end() ? std::vector<std::string>{} : it->second;
  }
  long long integer(const std::string& k, long long def) const {
    if (!has(k)) return def;
    try {
      size_t used = 0;
      long long v = std::stoll(str(k), &used);
      if (used != str(k).size()) throw 0;
      return v;
    } catch (...) {
      fail("--" + k + " needs an integer, got '" + str(k) + "'");
    }
  }
  double real(const std::string& k, double def) const {
    if (!has(k)) return def;
    try {
      size_t used = 0;
      double v = std::stod(str(k), &used);
      if (used != str(k).size()) throw 0;
      return v;
    } catch (...) {
      fail("--" + k + " needs a number, got '" + str(k) + "'");
    }
  }
  // A duration in seconds, which must be positive (a timeout of 0 would mean "none" to some
  // libraries and "at once" to others).
  double seconds(const std::string& k, double def) const {
    const double v = real(k, def);
    if (!(v > 0)) fail("--" + k + " needs a positive number of seconds, got '" + str(k) + "'");
    return v;
  }
  // Rejects options nobody asked for, so typos do not pass silently.
  void check_known(const std::set<std::string>& known) const {
    for (const auto& [k, v] : opts_)
      if (!known.count(k)) fail("unknown option --" + k);
  }
  const std::vector<std::string>& positional() const { return positional_; }

 private:
  std::string usage_;
  std::map<std::string, std::vector<std::string>> opts_;
  std::vector<std::string> positional_;
};

}  // namespace mp::cli
