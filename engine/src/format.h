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

// "[a, b, c]", for error messages that name a tensor's shape.
std::string shape_str(const std::vector<int64_t>& shape);

}  // namespace mp
