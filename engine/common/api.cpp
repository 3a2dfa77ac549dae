#include "api.h"

#include <cmath>
#include <cstdio>

namespace mp::api {

json ApiError::body() const {
  return {{"error",
           {{"message", what()},
            {"type", type},
            {"param", param.empty() ? json(nullptr) : json(param)},
            {"code", code.empty() ? json(nullptr) : json(code)}}}};
}

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

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

std::string TokenChunk::event(int index, std::string_view text) const {
  std::string out = "data: {\"choices\":[{\"finish_reason\":null,\"index\":" +
                    std::to_string(index) + ",\"logprobs\":null,\"text\":";
  if (!append_json_string(out, text)) return {};
  out += "}";
  return out += suffix_;
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

CompletionsCall parse_completions(const json& b, const Tokenizer& tok, int64_t ctx_limit) {
  if (!b.is_object()) throw bad("", "the request body must be a JSON object");
  CompletionsCall call;
  if (!b.contains("prompt"))
    throw ApiError(400, "'prompt' is required", "prompt", "missing_required_parameter");
  // As in OpenAI's API: a string, an array of strings, an array of token ids, or an array of
  // such arrays. Token ids are taken as they are (no BOS added).
  const json& p = b["prompt"];
  std::vector<std::vector<int>> prompt_ids;
  const char* kPromptShape =
      "'prompt' must be a string, an array of at most 64 strings, an array of token ids or an "
      "array of at most 64 arrays of token ids";
  auto token_array = [&](const json& a) {
    std::vector<int> ids;
    for (const auto& t : a) {
      if (!t.is_number_integer()) throw bad("prompt", kPromptShape);
      const long long id = t.get<long long>();
      if (id < 0 || id >= tok.vocab_size())
        throw bad("prompt", "'prompt' holds the token id " + std::to_string(id) +
                                ", outside the vocabulary");
      ids.push_back(static_cast<int>(id));
    }
    call.prompts.push_back(tok.decode(ids));
    prompt_ids.push_back(std::move(ids));
  };
  auto text = [&](const json& t) {
    call.prompts.push_back(t.get<std::string>());
    prompt_ids.push_back(tok.encode(call.prompts.back(), tok.add_bos()));
  };
  if (p.is_string()) {
    text(p);
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
  if (b.contains("model") && !b["model"].is_null() && !b["model"].is_string())
    throw bad("model", "'model' must be a string");
  if (b.contains("user") && !b["user"].is_null() && !b["user"].is_string())
    throw bad("user", "'user' must be a string");
  const int max_tokens = static_cast<int>(integer(b, "max_tokens", 16, 0, 1 << 20));
  call.n = static_cast<int>(integer(b, "n", 1, 1, 16));
  call.stream = boolean(b, "stream", false);
  call.echo = boolean(b, "echo", false);
  call.logprobs = static_cast<int>(integer(b, "logprobs", 0, 0, 20));
  if (b.contains("stream_options") && !b["stream_options"].is_null()) {
    if (!b["stream_options"].is_object())
      throw bad("stream_options", "'stream_options' must be an object");
    call.include_usage = boolean(b["stream_options"], "include_usage", false);
  }
  std::vector<std::string> stop;
  if (b.contains("stop") && !b["stop"].is_null()) {
    if (b["stop"].is_string()) {
      stop.push_back(b["stop"].get<std::string>());
    } else if (b["stop"].is_array() && b["stop"].size() <= 4) {
      for (const auto& s : b["stop"]) {
        if (!s.is_string()) throw bad("stop", "'stop' must be a string or an array of strings");
        stop.push_back(s.get<std::string>());
      }
    } else {
      throw bad("stop", "'stop' must be a string or an array of at most 4 strings");
    }
  }
  SamplingParams sp;
  sp.temperature = static_cast<float>(number(b, "temperature", 1.0, 0, 2));
  sp.top_p = static_cast<float>(number(b, "top_p", 1.0, 0, 1));
  if (sp.top_p <= 0) throw bad("top_p", "'top_p' must be greater than 0");
  sp.top_k = static_cast<int>(integer(b, "top_k", 0, 0, 1 << 20));
  sp.min_p = static_cast<float>(number(b, "min_p", 0.0, 0, 1));
  sp.presence_penalty = static_cast<float>(number(b, "presence_penalty", 0, -2, 2));
  sp.frequency_penalty = static_cast<float>(number(b, "frequency_penalty", 0, -2, 2));
  sp.repetition_penalty = static_cast<float>(number(b, "repetition_penalty", 1, 0.01, 10));
  sp.penalty_last_n = -1;
  const bool ignore_eos = boolean(b, "ignore_eos", false);
  const bool seeded = b.contains("seed") && !b["seed"].is_null();
  const long long seed = integer(b, "seed", 0, -(1LL << 62), 1LL << 62);
  for (size_t pi = 0; pi < call.prompts.size(); ++pi) {
    const std::vector<int>& ids = prompt_ids[pi];
    if (ids.empty()) throw bad("prompt", "the prompt is empty");
    if (ctx_limit > 0 && static_cast<int64_t>(ids.size()) > ctx_limit)
      throw ApiError(400,
                     "the prompt has " + std::to_string(ids.size()) +
                         " tokens, more than this server's limit of " + std::to_string(ctx_limit),
                     "prompt", "context_length_exceeded");
    call.prompt_tokens.push_back(static_cast<int>(ids.size()));
    for (int c = 0; c < call.n; ++c) {
      CompletionRequest r;
      r.prompt = ids;
      r.sampling = sp;
      // Each choice draws its own numbers; without a seed, from the clock.
      r.sampling.seed =
          seeded
              ? static_cast<uint64_t>(seed) + pi * 1000 + c
              : static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) +
                    c;
      r.max_tokens = max_tokens;
      r.stop = stop;
      r.ignore_eos = ignore_eos;
      r.logprobs = call.logprobs;
      call.requests.push_back(std::move(r));
    }
  }
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

void ChoiceBuilder::add(const CompletionEvent& e, const Tokenizer& tok, bool with_logprobs) {
  if (with_logprobs && e.token >= 0) {
    const json lp = event_logprobs(e, tok, text.size());
    tokens.push_back(lp["tokens"][0]);
    token_logprobs.push_back(lp["token_logprobs"][0]);
    top_logprobs.push_back(lp["top_logprobs"][0]);
    text_offset.push_back(lp["text_offset"][0]);
  }
  text += e.text;
  if (e.done) {
    finish_reason = api::finish_reason(e);
    completion_tokens = e.completion_tokens;
  }
}

json ChoiceBuilder::choice(int index, bool with_logprobs, const std::string& echo_prefix) const {
  json lp = nullptr;
  if (with_logprobs)
    lp = {{"tokens", tokens},
          {"token_logprobs", token_logprobs},
          {"top_logprobs", top_logprobs},
          {"text_offset", text_offset}};
  return {{"text", echo_prefix + text},
          {"index", index},
          {"logprobs", lp},
          {"finish_reason", finish_reason}};
}

std::string finish_reason(const CompletionEvent& e) {
  if (e.finish_reason == "stop" || e.finish_reason == "length") return e.finish_reason;
  return "error";
}

json usage(int prompt_tokens, int completion_tokens) {
  return {{"prompt_tokens", prompt_tokens},
          {"completion_tokens", completion_tokens},
          {"total_tokens", prompt_tokens + completion_tokens}};
}

}  // namespace mp::api
