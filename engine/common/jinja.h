// The subset of Jinja2 that chat templates use (Hugging Face's tokenizer_config.json
// "chat_template", GGUF's tokenizer.chat_template), rendered as transformers'
// apply_chat_template renders them: trim_blocks and lstrip_blocks on, loop controls, the
// final newline dropped, raise_exception(), tojson as Python's json.dumps. Debian and the npm
// registry offer no maintained C++ Jinja library, hence this one; docs/SERVING.md lists what it
// accepts. What it does not know (macros, call blocks, includes, unknown filters) is refused
// with an Error naming it and its line, at parse time where possible.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace mp::jinja {

class Template {
 public:
  explicit Template(std::string_view source);  // throws mp::Error "line N: ..."
  ~Template();
  Template(Template&&) noexcept;
  Template& operator=(Template&&) noexcept;
  // Steps a render may take (a node evaluated, a loop turn, an element of a list or mapping
  // copied; about a microsecond each). A 1 MiB conversation of 32,000 messages takes 1.2 to 2.9
  // million with the templates of tests/data/chat_templates. Past the budget rendering stops
  // with an Error, as it does for a string over 64 MiB.
  static constexpr size_t kMaxSteps = 5'000'000;
  // Renders with the variables of `context` (a JSON object). Throws mp::Error on a runtime error
  // (a type mismatch, raise_exception(), an unknown method) or past a limit.
  std::string render(const nlohmann::json& context, size_t max_steps = kMaxSteps) const;

  struct Node;

 private:
  std::unique_ptr<Node> root_;
};

}  // namespace mp::jinja
