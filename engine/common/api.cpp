#include "api.h"

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>

namespace mp::api {

json ApiError::body() const {
  return {{"error",
           {{"message", what()},
            {"type", type},
            {"param", param.empty() ? json(nullptr) : json(param)},
            {"code", code.empty() ? json(nullptr) : json(code)}}}};
}

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

namespace {

// Just enough of JSON's grammar to walk a top-level object's members and find where values end;
// what it skips is checked by the full parser afterwards.
struct JsonWalker {
  std::string_view s;
  size_t i = 0;
  void ws() {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) ++i;
  }
  bool eat(char c) {
    ws();
    if (i >= s.size() || s[i] != c) return false;
    ++i;
    return true;
  }
  // A string's raw contents (escapes left as they are).
  bool string(std::string_view* raw = nullptr) {
    ws();
    if (i >= s.size() || s[i] != '"') return false;
    const size_t start = ++i;
    while (i < s.size() && s[i] != '"') i += s[i] == '\\' ? 2 : 1;
    if (i >= s.size()) return false;
    if (raw) *raw = s.substr(start, i - start);
    ++i;
    return true;
  }
  bool skip_value() {
    ws();
    if (i >= s.size()) return false;
    if (s[i] == '"') return string();
    if (s[i] != '[' && s[i] != '{') {  // a number, true, false or null
      const size_t start = i;
      while (i < s.size() && !std::strchr(",}] \t\n\r", s[i])) ++i;
      return i > start;
    }
    int depth = 0;
    while (i < s.size()) {
      const char c = s[i];
      if (c == '"') {
        if (!string()) return false;
        continue;
      }
      ++i;
      if (c == '[' || c == '{') ++depth;
      if ((c == ']' || c == '}') && --depth == 0) return true;
    }
    return false;
  }
  // A non-empty array of JSON integers (-?(0|[1-9][0-9]*)) that fit in 64 bits.
  bool integers(std::vector<int64_t>& out) {
    if (!eat('[')) return false;
    do {
      ws();
      const size_t start = i;
      if (i < s.size() && s[i] == '-') ++i;
      const size_t digits = i;
      while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i;
      if (i == digits || (s[digits] == '0' && i > digits + 1)) return false;
      int64_t v = 0;
      const auto [end, err] = std::from_chars(s.data() + start, s.data() + i, v);
      if (err != std::errc() || end != s.data() + i) return false;
      out.push_back(v);
    } while (eat(','));
    return eat(']');
  }
};

}  // namespace

std::optional<PromptIds> scan_prompt_ids(std::string_view body) {
  JsonWalker w{body};
  if (!w.eat('{') || w.eat('}')) return std::nullopt;
  PromptIds found;
  size_t from = 0, to = 0;  // the prompt's value
  do {
    std::string_view key;
    if (!w.string(&key) || key.find('\\') != key.npos || !w.eat(':')) return std::nullopt;
    if (key == "prompt") {
      if (to > 0) return std::nullopt;  // twice: the full parser decides
      w.ws();
      from = w.i;
      if (!w.integers(found.ids)) return std::nullopt;
      to = w.i;
    } else if (!w.skip_value()) {
      return std::nullopt;
    }
  } while (w.eat(','));
  if (!w.eat('}') || to == 0) return std::nullopt;
  w.ws();
  if (w.i != body.size()) return std::nullopt;
  found.rest.reserve(body.size() - (to - from) + 4);
  found.rest.append(body.substr(0, from)).append("null").append(body.substr(to));
  return found;
}

json parse_body(std::string_view body) {
  try {
    std::optional<PromptIds> scanned = scan_prompt_ids(body);
    if (!scanned) return json::parse(body);
    json j = json::parse(scanned->rest);
    const auto* bytes = reinterpret_cast<const uint8_t*>(scanned->ids.data());
    j["prompt"] = json::binary(std::vector<uint8_t>(bytes, bytes + scanned->ids.size() * 8));
    return j;
  } catch (const json::exception& e) {
    throw ApiError(400, std::string("the body is not valid JSON: ") + e.what());
  }
}

bool append_json_string(std::string& out, std::string_view s) {
  const size_t start = out.size();
  out += '"';
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = s[i];
    if (c >= 0x80) {  // copy a whole, valid UTF-8 character
      const size_t len = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 ? 2 : 0;
      bool ok = len > 0 && c < 0xF5 && i + len <= s.size();
      for (size_t k = 1; ok && k < len; ++k) ok = (static_cast<unsigned char>(s[i + k]) & 0xC0) == 0x80;
      if (ok && len == 3) {  // no overlong form, no surrogate
        const unsigned char c1 = s[i + 1];
        ok = !(c == 0xE0 && c1 < 0xA0) && !(c == 0xED && c1 >= 0xA0);
      } else if (ok && len == 4) {
        const unsigned char c1 = s[i + 1];
        ok = !(c == 0xF0 && c1 < 0x90) && !(c == 0xF4 && c1 >= 0x90);
      }
      if (!ok) {
        out.resize(start);
        return false;
      }
      out.append(s.substr(i, len));
      i += len;
      continue;
    }
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
    ++i;
  }
  out += '"';
  return true;
}

TokenChunk::TokenChunk(const std::string& id, int64_t created, const std::string& model) {
  // dump() writes an object's keys in order: choices, created, id, model, object.
  suffix_ = "],\"created\":" + std::to_string(created) + ",\"id\":";
  append_json_string(suffix_, id);
  suffix_ += ",\"model\":";
  if (!append_json_string(suffix_, model)) suffix_ += dump(model);
  suffix_ += ",\"object\":\"text_completion\"}\n\n";
}

bool TokenChunk::append_event(std::string& out, int index, std::string_view text) const {
  const size_t start = out.size();
  out += "data: {\"choices\":[{\"finish_reason\":null,\"index\":";
  char digits[16];
  const auto [end, ec] = std::to_chars(digits, digits + sizeof digits, index);
  out.append(digits, end);
  out += ",\"logprobs\":null,\"text\":";
  if (!append_json_string(out, text)) {
    out.resize(start);
    return false;
  }
  out += '}';
  out += suffix_;
  return true;
}

namespace {

ApiError bad(const std::string& param, const std::string& msg) {
  return ApiError(400, msg, param, "invalid_value");
}

double number(const json& b, const char* key, double def, double lo, double hi) {
  if (!b.contains(key) || b[key].is_null()) return def;
  if (!b[key].is_number()) throw bad(key, std::string("'") + key + "' must be a number");
  const double v = b[key].get<double>();
  if (!std::isfinite(v) || v < lo || v > hi)
    throw bad(key, std::string("'") + key + "' must be between " + std::to_string(lo) + " and " +
                       std::to_string(hi));
  return v;
}

long long integer(const json& b, const char* key, long long def, long long lo, long long hi) {
  if (!b.contains(key) || b[key].is_null()) return def;
  if (!b[key].is_number_integer()) throw bad(key, std::string("'") + key + "' must be an integer");
  const long long v = b[key].get<long long>();
  if (v < lo || v > hi)
    throw bad(key, std::string("'") + key + "' must be between " + std::to_string(lo) + " and " +
                       std::to_string(hi));
  return v;
}

bool boolean(const json& b, const char* key, bool def) {
  if (!b.contains(key) || b[key].is_null()) return def;
  if (!b[key].is_boolean()) throw bad(key, std::string("'") + key + "' must be a boolean");
  return b[key].get<bool>();
}

}  // namespace

namespace {

// The fields both endpoints share; `call` gets n, stream and its options, `r` the rest.
CompletionRequest parse_common(const json& b, CompletionsCall& call, int max_tokens_default,
                               const SamplingParams& defaults) {
  if (b.contains("model") && !b["model"].is_null() && !b["model"].is_string())
    throw bad("model", "'model' must be a string");
  if (b.contains("user") && !b["user"].is_null() && !b["user"].is_string())
    throw bad("user", "'user' must be a string");
  if (b.contains("session") && !b["session"].is_null()) {
    if (!b["session"].is_string()) throw bad("session", "'session' must be a string");
    call.session = b["session"].get<std::string>();
  }
  CompletionRequest r;
  r.max_tokens = static_cast<int>(integer(b, "max_tokens", max_tokens_default, 0, 1 << 20));
  call.n = static_cast<int>(integer(b, "n", 1, 1, 16));
  call.stream = boolean(b, "stream", false);
  if (b.contains("stream_options") && !b["stream_options"].is_null()) {
    if (!b["stream_options"].is_object())
      throw bad("stream_options", "'stream_options' must be an object");
    call.include_usage = boolean(b["stream_options"], "include_usage", false);
    call.continuous_usage = boolean(b["stream_options"], "continuous_usage_stats", false);
  }
  if (b.contains("stop") && !b["stop"].is_null()) {
    if (b["stop"].is_string()) {
      r.stop.push_back(b["stop"].get<std::string>());
    } else if (b["stop"].is_array() && b["stop"].size() <= 4) {
      for (const auto& s : b["stop"]) {
        if (!s.is_string()) throw bad("stop", "'stop' must be a string or an array of strings");
        r.stop.push_back(s.get<std::string>());
      }
    } else {
      throw bad("stop", "'stop' must be a string or an array of at most 4 strings");
    }
  }
  SamplingParams& sp = r.sampling;
  sp = defaults;
  sp.temperature = static_cast<float>(number(b, "temperature", sp.temperature, 0, 2));
  sp.top_p = static_cast<float>(number(b, "top_p", sp.top_p, 0, 1));
  if (sp.top_p <= 0) throw bad("top_p", "'top_p' must be greater than 0");
  sp.top_k = static_cast<int>(integer(b, "top_k", sp.top_k, 0, 1 << 20));
  sp.min_p = static_cast<float>(number(b, "min_p", sp.min_p, 0, 1));
  sp.presence_penalty =
      static_cast<float>(number(b, "presence_penalty", sp.presence_penalty, -2, 2));
  sp.frequency_penalty =
      static_cast<float>(number(b, "frequency_penalty", sp.frequency_penalty, -2, 2));
  sp.repetition_penalty =
      static_cast<float>(number(b, "repetition_penalty", sp.repetition_penalty, 0.01, 10));
  r.ignore_eos = boolean(b, "ignore_eos", false);
  // Each choice draws its own numbers (add_prompt); without a seed, from the clock.
  const bool seeded = b.contains("seed") && !b["seed"].is_null();
  const long long seed = integer(b, "seed", 0, -(1LL << 62), 1LL << 62);
  sp.seed =
      seeded ? static_cast<uint64_t>(seed)
             : static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  return r;
}

// Adds a prompt's n choices; choice c of prompt p draws with seed + 1000 p + c.
void add_prompt(CompletionsCall& call, const CompletionRequest& base, std::string text,
                std::vector<int> ids, int64_t ctx_limit) {
  if (ids.empty()) throw bad(call.chat ? "messages" : "prompt", "the prompt is empty");
  if (ctx_limit > 0 && static_cast<int64_t>(ids.size()) > ctx_limit)
    throw ApiError(400,
                   "the prompt has " + std::to_string(ids.size()) +
                       " tokens, more than this server's limit of " + std::to_string(ctx_limit),
                   call.chat ? "messages" : "prompt", "context_length_exceeded");
  const size_t pi = call.prompts.size();
  call.prompts.push_back(std::move(text));
  call.prompt_tokens.push_back(static_cast<int>(ids.size()));
  for (int c = 0; c < call.n; ++c) {
    CompletionRequest r = base;
    r.prompt = ids;
    r.sampling.seed = base.sampling.seed + pi * 1000 + c;
    r.logprobs = call.logprobs;
    call.requests.push_back(std::move(r));
  }
}

// A message's content as a string: a string, or an array of text parts (joined by newlines, as
// vLLM does). Other parts (images, audio) are refused.
std::string message_content(const json& m, size_t i) {
  const std::string where = "messages[" + std::to_string(i) + "].content";
  if (!m.contains("content") || m["content"].is_null()) return "";
  const json& c = m["content"];
  if (c.is_string()) return c.get<std::string>();
  if (!c.is_array()) throw bad(where, "'" + where + "' must be a string or an array of parts");
  std::string text;
  for (size_t k = 0; k < c.size(); ++k) {
    const json& part = c[k];
    if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
        !part["text"].is_string())
      throw bad(where, "'" + where +
                           "' may hold only text parts ({\"type\": \"text\", "
                           "\"text\": ...}); this model reads text only");
    if (k) text += "\n";
    text += part["text"].get<std::string>();
  }
  return text;
}

}  // namespace

SamplingParams request_sampling_defaults(const SamplingRecommendation& model) {
  SamplingParams p;
  p.temperature = 1;
  p.top_k = 0;
  p.top_p = 1;
  p.min_p = 0;
  p.penalty_last_n = -1;
  return model.over(p);
}

CompletionsCall parse_completions(const json& b, const Tokenizer& tok, int64_t ctx_limit,
                                  const SamplingParams& defaults) {
  if (!b.is_object()) throw bad("", "the request body must be a JSON object");
  CompletionsCall call;
  if (!b.contains("prompt"))
    throw ApiError(400, "'prompt' is required", "prompt", "missing_required_parameter");
  // As in OpenAI's API: a string, an array of strings, an array of token ids, or an array of
  // such arrays. Token ids are taken as they are (no BOS added).
  const json& p = b["prompt"];
  call.echo = boolean(b, "echo", false);
  // text (for echo only: decoding 100k ids takes ~0.1 s), ids
  std::vector<std::pair<std::string, std::vector<int>>> prompts;
  const char* kPromptShape =
      "'prompt' must be a string, an array of at most 64 strings, an array of token ids or an "
      "array of at most 64 arrays of token ids";
  auto token_ids = [&](std::span<const int64_t> in) {
    std::vector<int> ids;
    ids.reserve(in.size());
    for (const long long id : in) {
      if (id < 0 || id >= tok.vocab_size())
        throw bad("prompt",
                  "'prompt' holds the token id " + std::to_string(id) + ", outside the vocabulary");
      ids.push_back(static_cast<int>(id));
    }
    prompts.emplace_back(call.echo ? tok.decode(ids) : std::string(), std::move(ids));
  };
  auto token_array = [&](const json& a) {
    std::vector<int64_t> ids;
    for (const auto& t : a) {
      if (!t.is_number_integer()) throw bad("prompt", kPromptShape);
      ids.push_back(t.get<int64_t>());
    }
    token_ids(ids);
  };
  auto scanned_array = [&](const json::binary_t& b) {  // parse_body's int64 ids
    std::vector<int64_t> ids(b.size() / 8);
    std::memcpy(ids.data(), b.data(), ids.size() * 8);
    token_ids(ids);
  };
  auto text = [&](const json& t) {
    const std::string s = t.get<std::string>();
    prompts.emplace_back(s, tok.encode(s, tok.add_bos()));
  };
  if (p.is_string()) {
    text(p);
  } else if (p.is_binary()) {
    scanned_array(p.get_binary());
  } else if (p.is_array() && !p.empty() && p[0].is_number_integer()) {
    token_array(p);
  } else if (p.is_array() && !p.empty() && p.size() <= 64) {
    for (const auto& x : p) {
      if (x.is_string())
        text(x);
      else if (x.is_array() && !x.empty())
        token_array(x);
      else
        throw bad("prompt", kPromptShape);
    }
  } else {
    throw bad("prompt", kPromptShape);
  }
  const CompletionRequest base = parse_common(b, call, 16, defaults);
  call.logprobs = static_cast<int>(integer(b, "logprobs", 0, 0, 20));
  call.with_logprobs = call.logprobs > 0;
  for (auto& [text, ids] : prompts)
    add_prompt(call, base, std::move(text), std::move(ids), ctx_limit);
  return call;
}

CompletionsCall parse_chat_completions(const json& b, const chat::Format& format,
                                       int64_t ctx_limit, const SamplingParams& defaults) {
  if (!b.is_object()) throw bad("", "the request body must be a JSON object");
  CompletionsCall call;
  call.chat = true;
  if (!b.contains("messages"))
    throw ApiError(400, "'messages' is required", "messages", "missing_required_parameter");
  const json& in = b["messages"];
  if (!in.is_array() || in.empty())
    throw bad("messages", "'messages' must be a non-empty array of messages");
  json messages = json::array();
  for (size_t i = 0; i < in.size(); ++i) {
    const json& m = in[i];
    const std::string where = "messages[" + std::to_string(i) + "]";
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string())
      throw bad(where, "'" + where + "' must be an object with a string 'role'");
    std::string role = m["role"].get<std::string>();
    if (role == "developer") role = "system";  // OpenAI's newer name for it
    if (role != "system" && role != "user" && role != "assistant")
      throw bad(where + ".role", "'" + where +
                                     ".role' must be system, developer, user or "
                                     "assistant (tools are not supported), got '" +
                                     role + "'");
    if (m.contains("tool_calls") && !m["tool_calls"].is_null())
      throw bad(where + ".tool_calls", "tool calls are not supported");
    json out = {{"role", role}, {"content", message_content(m, i)}};
    if (m.contains("name") && m["name"].is_string()) out["name"] = m["name"];
    messages.push_back(std::move(out));
  }
  if (b.contains("tools") && !b["tools"].is_null() &&
      !(b["tools"].is_array() && b["tools"].empty()))
    throw bad("tools", "tools are not supported");
  std::string prompt;
  try {
    prompt = format.render(messages, true);
  } catch (const Error& e) {  // raise_exception() or a template error: the messages' fault
    throw bad("messages", e.what());
  }
  std::vector<int> ids = format.tokenize(prompt);
  // Without max_tokens (or OpenAI's newer max_completion_tokens), as vLLM: the rest of the
  // context, at least 16 tokens.
  const int64_t rest =
      ctx_limit > 0 ? std::max<int64_t>(ctx_limit - int64_t(ids.size()), 16) : 4096;
  CompletionRequest base = parse_common(b, call, static_cast<int>(rest), defaults);
  const long long newer = integer(b, "max_completion_tokens", -1, 0, 1 << 20);
  if (newer >= 0) base.max_tokens = static_cast<int>(newer);
  for (const auto& s : format.stop()) base.stop.push_back(s);
  call.with_logprobs = boolean(b, "logprobs", false);
  call.logprobs = static_cast<int>(integer(b, "top_logprobs", 0, 0, 20));
  if (call.logprobs > 0 && !call.with_logprobs)
    throw bad("top_logprobs", "'top_logprobs' needs 'logprobs': true");
  add_prompt(call, base, std::move(prompt), std::move(ids), ctx_limit);
  return call;
}

json event_logprobs(const CompletionEvent& e, const Tokenizer& tok, size_t offset) {
  json top = json::object();
  for (const auto& [id, lp] : e.top_logprobs) top[tok.decode(std::vector<int>{id})] = lp;
  return {{"tokens", {tok.decode(std::vector<int>{e.token})}},
          {"token_logprobs", {e.logprob}},
          {"top_logprobs", {top}},
          {"text_offset", {offset}}};
}

namespace {

// One token of a chat choice's logprobs.content, with its alternatives.
json chat_logprob(const CompletionEvent& e, const Tokenizer& tok) {
  auto entry = [&](int id, float lp) {
    const std::string t = tok.decode(std::vector<int>{id});
    json bytes = json::array();
    for (unsigned char c : t) bytes.push_back(int(c));
    return json{{"token", t}, {"logprob", lp}, {"bytes", std::move(bytes)}};
  };
  json out = entry(e.token, e.logprob);
  out["top_logprobs"] = json::array();
  for (const auto& [id, lp] : e.top_logprobs) out["top_logprobs"].push_back(entry(id, lp));
  return out;
}

std::string echo_of(const CompletionsCall& call, int choice) {
  return call.echo ? call.prompts[size_t(choice / call.n)] : std::string();
}

}  // namespace

void ChoiceBuilder::add(const CompletionEvent& e, const Tokenizer& tok,
                        const CompletionsCall& call) {
  if (call.with_logprobs && e.token >= 0) {
    if (call.chat) {
      content_logprobs.push_back(chat_logprob(e, tok));
    } else {
      const json lp = event_logprobs(e, tok, text.size());
      tokens.push_back(lp["tokens"][0]);
      token_logprobs.push_back(lp["token_logprobs"][0]);
      top_logprobs.push_back(lp["top_logprobs"][0]);
      text_offset.push_back(lp["text_offset"][0]);
    }
  }
  text += e.text;
  if (e.done) {
    finish_reason = api::finish_reason(e);
    completion_tokens = e.completion_tokens;
    cached_tokens = e.cached_tokens;
  }
}

json ChoiceBuilder::choice(int index, const CompletionsCall& call) const {
  json lp = nullptr;
  if (call.with_logprobs && call.chat) {
    lp = {{"content", content_logprobs}};
  } else if (call.with_logprobs) {
    lp = {{"tokens", tokens},
          {"token_logprobs", token_logprobs},
          {"top_logprobs", top_logprobs},
          {"text_offset", text_offset}};
  }
  if (call.chat)
    return {{"index", index},
            {"message", {{"role", "assistant"}, {"content", text}}},
            {"logprobs", lp},
            {"finish_reason", finish_reason}};
  return {{"text", echo_of(call, index) + text},
          {"index", index},
          {"logprobs", lp},
          {"finish_reason", finish_reason}};
}

json response(const CompletionsCall& call, const std::string& id, long long created,
              const std::string& model, json choices) {
  return {{"id", id},
          {"object", !call.chat    ? "text_completion"
                     : call.stream ? "chat.completion.chunk"
                                   : "chat.completion"},
          {"created", created},
          {"model", model},
          {"choices", std::move(choices)}};
}

std::string id_prefix(const CompletionsCall& call) { return call.chat ? "chatcmpl-" : "cmpl-"; }

int prompt_total(const CompletionsCall& call) {
  int total = 0;
  for (size_t i = 0; i < call.requests.size(); ++i) total += call.prompt_tokens[i / call.n];
  return total;
}

json final_response(const CompletionsCall& call, const std::string& id, long long created,
                    const std::string& model, const std::vector<ChoiceBuilder>& choices) {
  json out = response(call, id, created, model, json::array());
  int completion_total = 0, cached_total = 0;
  for (size_t i = 0; i < choices.size(); ++i) {
    out["choices"].push_back(choices[i].choice(int(i), call));
    completion_total += choices[i].completion_tokens;
    cached_total += choices[i].cached_tokens;
  }
  out["usage"] = usage(prompt_total(call), completion_total, cached_total);
  return out;
}

json stream_choice(const CompletionsCall& call, int index, const CompletionEvent& e, bool first,
                   size_t offset, const Tokenizer& tok) {
  const json finish = e.done ? json(api::finish_reason(e)) : json(nullptr);
  const bool has_lp = call.with_logprobs && e.token >= 0;
  if (call.chat) {
    json delta = json::object();
    if (first) delta["role"] = "assistant";
    if (first || !e.text.empty()) delta["content"] = e.text;
    return {{"index", index},
            {"delta", delta},
            {"logprobs", has_lp ? json{{"content", {chat_logprob(e, tok)}}} : json(nullptr)},
            {"finish_reason", finish}};
  }
  return {{"text", (first ? echo_of(call, index) : std::string()) + e.text},
          {"index", index},
          {"logprobs", has_lp ? event_logprobs(e, tok, offset) : json(nullptr)},
          {"finish_reason", finish}};
}

std::string finish_reason(const CompletionEvent& e) {
  if (e.finish_reason == "stop" || e.finish_reason == "length") return e.finish_reason;
  return "error";
}

ApiError no_sessions() {
  return ApiError(400, "sessions are served by multipole-server, not here", "session",
                  "invalid_value");
}

json usage(int prompt_tokens, int completion_tokens, int cached_tokens) {
  return {{"prompt_tokens", prompt_tokens},
          {"completion_tokens", completion_tokens},
          {"total_tokens", prompt_tokens + completion_tokens},
          {"prompt_tokens_details", {{"cached_tokens", cached_tokens}}}};
}

}  // namespace mp::api
