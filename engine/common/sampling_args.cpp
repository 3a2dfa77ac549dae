#include "sampling_args.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <sstream>

namespace mp::cli {

SamplingParams sampling_from_args(const Args& a, const SamplingRecommendation& model) {
  SamplingParams p = model.over(SamplingParams{});
  p.temperature = static_cast<float>(a.real("temperature", p.temperature));
  p.top_k = static_cast<int>(a.integer("top-k", p.top_k));
  p.top_p = static_cast<float>(a.real("top-p", p.top_p));
  p.min_p = static_cast<float>(a.real("min-p", p.min_p));
  p.repetition_penalty = static_cast<float>(a.real("repeat-penalty", p.repetition_penalty));
  p.presence_penalty = static_cast<float>(a.real("presence-penalty", p.presence_penalty));
  p.frequency_penalty = static_cast<float>(a.real("frequency-penalty", p.frequency_penalty));
  p.penalty_last_n = static_cast<int>(a.integer("penalty-last-n", p.penalty_last_n));
  p.seed = a.has("seed")
               ? static_cast<uint64_t>(a.integer("seed", 0))
               : static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  try {
    p.validate();
  } catch (const Error& e) {
    a.fail(e.what());
  }
  return p;
}

SamplingRecommendation parse_sampling_list(const std::string& list) {
  SamplingRecommendation s;
  std::istringstream items(list);
  std::string item;
  while (std::getline(items, item, ',')) {
    const size_t eq = item.find('=');
    const std::string key = item.substr(0, eq),
                      text = eq == std::string::npos ? "" : item.substr(eq + 1);
    double v = 0;
    size_t used = 0;
    try {
      v = std::stod(text, &used);
    } catch (...) {
      used = 0;
    }
    if (eq == std::string::npos || used == 0 || used != text.size() || !std::isfinite(v))
      throw Error("sampling item '" + item + "' is not KEY=NUMBER");
    auto integer = [&]() {
      if (v != std::floor(v) || std::abs(v) > 1e9)
        throw Error("sampling item '" + item + "' needs an integer");
      return static_cast<int>(v);
    };
    if (key == "temperature")
      s.temperature = static_cast<float>(v);
    else if (key == "top-k")
      s.top_k = integer();
    else if (key == "top-p")
      s.top_p = static_cast<float>(v);
    else if (key == "min-p")
      s.min_p = static_cast<float>(v);
    else if (key == "repeat-penalty")
      s.repetition_penalty = static_cast<float>(v);
    else if (key == "penalty-last-n")
      s.penalty_last_n = integer();
    else
      throw Error("sampling item '" + item + "': the key is none of temperature, top-k, top-p, " +
                  "min-p, repeat-penalty, penalty-last-n");
  }
  return s;
}

std::string describe_sampling(const SamplingParams& p, const SamplingRecommendation& model) {
  char line[256];
  std::snprintf(line, sizeof line,
                "temperature %g, top-k %d, top-p %g, min-p %g, repeat-penalty %g, "
                "presence-penalty %g, frequency-penalty %g, penalty-last-n %d",
                p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty,
                p.frequency_penalty, p.penalty_last_n);
  return std::string(line) + " (the model recommends: " + model.describe() + ")";
}

}  // namespace mp::cli
