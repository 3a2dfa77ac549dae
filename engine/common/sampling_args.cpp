#include "sampling_args.h"

#include <chrono>

namespace mp::cli {

SamplingParams sampling_from_args(const Args& a) {
  SamplingParams p;
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

}  // namespace mp::cli
