#include "chat.h"

#include <algorithm>

namespace mp::chat {

const char* const kDefaultTemplate =
    "{%- for message in messages -%}\n"
    "{%- if message.role == 'system' -%}{{ message.content }}{{ '\\n\\n' }}\n"
    "{%- elif message.role == 'user' -%}User: {{ message.content }}{{ '\\n' }}\n"
    "{%- else -%}Assistant: {{ message.content }}{{ '\\n' }}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}Assistant:{%- endif -%}\n";
const char* const kDefaultStop = "\nUser:";

namespace {
const std::string& pick(const Model& model, const std::string& source) {
  static const std::string fallback = kDefaultTemplate;
  if (!source.empty()) return source;
  return model.chat_template().empty() ? fallback : model.chat_template();
}
}  // namespace

Format::Format(const Model& model, const std::string& source)
    : tok_(&model.tokenizer()),
      source_(pick(model, source)),
      is_default_(source_ == kDefaultTemplate),
      template_(source_) {
  if (is_default_) stop_.push_back(kDefaultStop);
  // Control pieces (<s>, </s>, <|im_start|> in models that have it) decode to nothing:
  // SentencePiece never produces them from text, so the template's text spells them.
  const Tokenizer& tok = *tok_;
  for (int id = 0; id < tok.vocab_size(); ++id) {
    const std::string piece = tok.piece(id);
    if (!piece.empty() && tok.decode(std::vector<int>{id}).empty())
      specials_.emplace_back(piece, id);
  }
  std::sort(specials_.begin(), specials_.end(),
            [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
  for (const auto& s : specials_)
    if (firsts_.find(s.first[0]) == std::string::npos) firsts_ += s.first[0];
}

std::string Format::render(const nlohmann::json& messages, bool add_generation_prompt) const {
  return template_.render({{"messages", messages},
                           {"add_generation_prompt", add_generation_prompt},
                           {"bos_token", tok_->piece(tok_->bos())},
                           {"eos_token", tok_->piece(tok_->eos())},
                           {"tools", nullptr}});
}

std::vector<int> Format::tokenize(const std::string& prompt) const {
  std::vector<int> ids;
  size_t done = 0;  // text before `done` is tokenized
  auto flush = [&](size_t upto) {
    if (upto > done) {
      const auto seg = tok_->encode(std::string_view(prompt).substr(done, upto - done), false);
      ids.insert(ids.end(), seg.begin(), seg.end());
    }
  };
  for (size_t at = 0; at < prompt.size();) {
    if (firsts_.find(prompt[at]) == std::string::npos) {
      ++at;
      continue;
    }
    const auto hit = std::find_if(specials_.begin(), specials_.end(), [&](const auto& s) {
      return prompt.compare(at, s.first.size(), s.first) == 0;
    });
    if (hit == specials_.end()) {
      ++at;
      continue;
    }
    flush(at);
    ids.push_back(hit->second);
    at += hit->first.size();
    done = at;
  }
  flush(prompt.size());
  if (tok_->add_bos() && (ids.empty() || ids[0] != tok_->bos()))
    ids.insert(ids.begin(), tok_->bos());
  return ids;
}

Format format_for(const Model& model, const std::string& source, std::string* warning) {
  if (!source.empty() || model.chat_template().empty()) return Format(model, source);
  try {
    return Format(model);
  } catch (const Error& e) {
    if (warning)
      *warning = std::string("the model's chat template cannot be used (") + e.what() +
                 "); chats use the plain default template";
    return Format(model, kDefaultTemplate);
  }
}

}  // namespace mp::chat
