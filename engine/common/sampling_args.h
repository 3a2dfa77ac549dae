// The sampling options shared by the tools that generate text.
#pragma once

#include <set>
#include <string>

#include "args.h"
#include "multipole/multipole.h"

namespace mp::cli {

inline const char* kSamplingUsage =
    "Sampling (defaults: the model's recommendation, GGUF general.sampling.*, where it has\n"
    "one; otherwise those below):\n"
    "  --temperature F        0 = greedy (default 0.8)\n"
    "  --top-k N              keep the N most likely tokens, 0 = off (default 40)\n"
    "  --top-p F              nucleus sampling mass (default 0.95)\n"
    "  --min-p F              drop tokens below F * p(best) (default 0.05)\n"
    "  --repeat-penalty F     CTRL-style repetition penalty, 1 = off (default 1)\n"
    "  --presence-penalty F   (default 0)\n"
    "  --frequency-penalty F  (default 0)\n"
    "  --penalty-last-n N     window of the penalties, -1 = all (default 64)\n"
    "  --seed N               random seed (default: from the clock)\n";

inline const std::set<std::string> kSamplingOptions = {
    "temperature",       "top-k",          "top-p", "min-p", "repeat-penalty", "presence-penalty",
    "frequency-penalty", "penalty-last-n", "seed"};

// The options given, over the model's recommendation, over SamplingParams' defaults.
SamplingParams sampling_from_args(const Args& a, const SamplingRecommendation& model);

// "temperature=0.8,top-k=0,repeat-penalty=1.1": the options above that a recommendation holds
// (temperature, top-k, top-p, min-p, repeat-penalty, penalty-last-n). Throws Error naming the bad
// item.
SamplingRecommendation parse_sampling_list(const std::string& list);

// One line for a tool's log: the parameters in effect and where they came from.
std::string describe_sampling(const SamplingParams& p, const SamplingRecommendation& model);

}  // namespace mp::cli
