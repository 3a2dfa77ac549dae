// The mapping between Config and the GGUF metadata keys of a Multipole model file.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "gguf.h"
#include "multipole/multipole.h"

namespace mp {

inline constexpr const char* kArchitecture = "fma";
inline constexpr const char* kTokenizerKey = "tokenizer.sentencepiece.model";
inline constexpr const char* kChatTemplateKey = "tokenizer.chat_template";

std::map<std::string, gguf::Value> config_to_gguf(const Config& c);
Config config_from_gguf(const gguf::File& f);

// general.sampling.*: read refuses a value of the wrong type or out of SamplingParams' range;
// write adds the fields the recommendation has (temp, top_p, min_p, penalty_repeat as f32,
// top_k and penalty_last_n as i32, as llama.cpp writes them).
SamplingRecommendation sampling_from_gguf(const gguf::File& f);
void sampling_to_gguf(const SamplingRecommendation& s, std::map<std::string, gguf::Value>& kv);

// "[a, b, c]", for error messages that name a tensor's shape.
std::string shape_str(const std::vector<int64_t>& shape);

}  // namespace mp
