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
  // Renders with the variables of `context` (a JSON object). Throws mp::Error on a runtime error
  // (a type mismatch, raise_exception(), an unknown method).
  std::string render(const nlohmann::json& context) const;

  struct Node;

 private:
  std::unique_ptr<Node> root_;
};

}  // namespace mp::jinja
