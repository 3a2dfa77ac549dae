// The OpenAI completions API: request parsing and validation, and the response objects, shared
// by multipole-server and multipole-batch.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "multipole/multipole.h"

namespace mp::api {

using json = nlohmann::json;

// An error in the OpenAI shape, with its HTTP status.
struct ApiError : Error {
  int status;
  std::string type, param, code;
  ApiError(int status, std::string message, std::string param = "", std::string code = "",
           std::string type = "invalid_request_error")
      : Error(std::move(message)),
        status(status),
        type(std::move(type)),
        param(std::move(param)),
        code(std::move(code)) {}
  json body() const;
};

// A parsed /v1/completions request: one CompletionRequest per (prompt, choice).
struct CompletionsCall {
  std::vector<std::string> prompts;
  int n = 1;
  bool stream = false, include_usage = false, echo = false;
  int logprobs = 0;
  std::vector<CompletionRequest> requests;  // prompts.size() * n, prompt-major; no on_event yet
  std::vector<int> prompt_tokens;           // per prompt
};

// Throws ApiError (400) naming the bad field. ctx_limit: most prompt tokens allowed (0: none).
CompletionsCall parse_completions(const json& body, const Tokenizer& tok, int64_t ctx_limit);

// Accumulates one choice's events into the non-streaming response's choice object.
struct ChoiceBuilder {
  std::string text;
  std::string finish_reason;
  int completion_tokens = 0;
  json tokens = json::array(), token_logprobs = json::array(), top_logprobs = json::array(),
       text_offset = json::array();
  void add(const CompletionEvent& e, const Tokenizer& tok, bool with_logprobs);
  json choice(int index, bool with_logprobs, const std::string& echo_prefix) const;
};

// The `logprobs` object of one event (streaming) or null.
json event_logprobs(const CompletionEvent& e, const Tokenizer& tok, size_t offset);
std::string finish_reason(const CompletionEvent& e);  // "stop" | "length" | "error"
json usage(int prompt_tokens, int completion_tokens);
// JSON text with invalid UTF-8 replaced, never an exception.
std::string dump(const json& j);

// Appends s as a JSON string literal, escaped as dump() escapes it; false (and nothing appended)
// when s is not valid UTF-8.
bool append_json_string(std::string& out, std::string_view s);

// The SSE event of one streamed token of a completion: what dump() gives for the chunk
// {"id", "object": "text_completion", "created", "model", "choices": [{"text", "index",
// "logprobs": null, "finish_reason": null}]}, written without building JSON objects (a stream
// sends one per token). Empty when the text is not valid UTF-8 (build it with dump() then).
class TokenChunk {
 public:
  TokenChunk(const std::string& id, int64_t created, const std::string& model);
  std::string event(int index, std::string_view text) const;

 private:
  std::string suffix_;  // the chunk's fields after "choices"
};

}  // namespace mp::api
