// Chat messages to prompt tokens: the model's chat template (GGUF tokenizer.chat_template, or a
// plain default for base models), rendered by the Jinja subset of jinja.h, then tokenized with
// the template's special tokens (<s>, </s>, ... written as text) mapped to their ids.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "jinja.h"
#include "multipole/multipole.h"

namespace mp::chat {

// For base models without a template: "User: ..." / "Assistant: ..." lines after the system
// text, ending with "Assistant:"; generation stops at the next "\nUser:" (kDefaultStop).
extern const char* const kDefaultTemplate;
extern const char* const kDefaultStop;

class Format {
 public:
  // source: the template to use; empty: the model's, else kDefaultTemplate.
  // Throws Error when the template does not parse.
  Format(const Model& model, const std::string& source = "");
  const std::string& source() const { return source_; }
  bool is_default() const { return is_default_; }
  // Stop strings every chat request gets (the default template's turn marker).
  const std::vector<std::string>& stop() const { return stop_; }
  // messages: an OpenAI messages array whose contents are already strings (api.cpp checks).
  std::string render(const nlohmann::json& messages, bool add_generation_prompt) const;
  // The rendered prompt's tokens: special pieces written in the text become their ids, and BOS
  // is prepended when the model wants one and the text does not start with it.
  std::vector<int> tokenize(const std::string& prompt) const;

 private:
  const Tokenizer* tok_;
  std::string source_;
  bool is_default_;
  std::vector<std::string> stop_;
  jinja::Template template_;
  std::vector<std::pair<std::string, int>> specials_;  // control pieces, longest first
  std::string firsts_;                                 // their first characters
};

// The format a server or tool uses: `source` when given (one that does not parse throws), else
// the model's template, else the default. A model template that does not parse falls back to
// the default, with `warning` saying why.
Format format_for(const Model& model, const std::string& source, std::string* warning);

}  // namespace mp::chat
