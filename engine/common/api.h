// The OpenAI completions and chat completions APIs: request parsing and validation, and the
// response objects, shared by multipole-server and multipole-batch.
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "chat.h"
#include "multipole/multipole.h"

namespace mp::api {

using json = nlohmann::json;

// An error in the OpenAI shape, with its HTTP status.
struct ApiError : Error {
  int status;
  std::string type, param, code;
  int retry_after_s = 0;  // > 0: worth retrying after that long (the Retry-After header)
  ApiError(int status, std::string message, std::string param = "", std::string code = "",
           std::string type = "invalid_request_error")
      : Error(std::move(message)),
        status(status),
        type(std::move(type)),
        param(std::move(param)),
        code(std::move(code)) {}
  json body() const;
};

// Parses a request body (throws ApiError 400 when it is not JSON). A top-level "prompt" that is a
// flat array of integers is read by a dedicated scanner and held as a json binary of int32 ids,
// which parse_completions takes like the array: nlohmann's parser needs ~15 ms for 100k ids.
json parse_body(std::string_view body);
// The ids of a top-level "prompt" array of plain integers, and the body without it (the value
// replaced by null); nothing when the body has no such array or is not a simple object.
struct PromptIds {
  std::vector<int64_t> ids;
  std::string rest;
};
std::optional<PromptIds> scan_prompt_ids(std::string_view body);

// A parsed /v1/completions or /v1/chat/completions request: one CompletionRequest per
// (prompt, choice). A chat request has one prompt, its messages rendered by the chat template.
struct CompletionsCall {
  bool chat = false;                 // choices are messages (chat.completion) rather than text
  std::vector<std::string> prompts;  // their text (of token-id prompts only with echo)
  int n = 1;
  bool stream = false, include_usage = false, echo = false;
  // stream_options.continuous_usage_stats (vLLM's extension): every chunk carries its choice's
  // usage so far, with the sequence's state size as "state_bytes" (the playground shows both).
  bool continuous_usage = false;
  bool with_logprobs = false;  // completions: logprobs > 0; chat: "logprobs": true
  int logprobs = 0;  // alternatives per token (completions' logprobs, chat's top_logprobs)
  // "session": continue that session's state (multipole-server; the batch tool refuses it).
  std::string session;
  std::vector<CompletionRequest> requests;  // prompts.size() * n, prompt-major; no on_event yet
  std::vector<int> prompt_tokens;           // per prompt
};

// A request's sampling where it sets no field: the OpenAI API's (temperature 1, top_p 1, no
// top-k, min-p or penalties, penalties over the whole text), with the model's recommendation
// (general.sampling.*) replacing them, as llama-server and vLLM (generation_config.json) do.
SamplingParams request_sampling_defaults(const SamplingRecommendation& model);

// Throws ApiError (400) naming the bad field. ctx_limit: most prompt tokens allowed (0: none);
// `defaults`: request_sampling_defaults of the model.
CompletionsCall parse_completions(const json& body, const Tokenizer& tok, int64_t ctx_limit,
                                  const SamplingParams& defaults);
CompletionsCall parse_chat_completions(const json& body, const chat::Format& format,
                                       int64_t ctx_limit, const SamplingParams& defaults);

// Accumulates one choice's events into the non-streaming response's choice object.
struct ChoiceBuilder {
  std::string text;
  std::string finish_reason;
  int completion_tokens = 0, cached_tokens = 0;
  json tokens = json::array(), token_logprobs = json::array(), top_logprobs = json::array(),
       text_offset = json::array();
  json content_logprobs = json::array();  // chat
  void add(const CompletionEvent& e, const Tokenizer& tok, const CompletionsCall& call);
  json choice(int index, const CompletionsCall& call) const;  // echo included
};

// The response object around `choices`: "text_completion", "chat.completion" or, streaming a
// chat, "chat.completion.chunk".
json response(const CompletionsCall& call, const std::string& id, long long created,
              const std::string& model, json choices);
std::string id_prefix(const CompletionsCall& call);  // "cmpl-" | "chatcmpl-"
// The non-streaming response once every choice is done, usage included.
json final_response(const CompletionsCall& call, const std::string& id, long long created,
                    const std::string& model, const std::vector<ChoiceBuilder>& choices);
int prompt_total(const CompletionsCall& call);  // prompt tokens over all choices
// The streamed choice of one event; `first`: the choice's first chunk (carries the echo, or the
// chat delta's role); `offset`: the choice's text so far, in bytes.
json stream_choice(const CompletionsCall& call, int index, const CompletionEvent& e, bool first,
                   size_t offset, const Tokenizer& tok);
// The `logprobs` object of one event (completions shape).
json event_logprobs(const CompletionEvent& e, const Tokenizer& tok, size_t offset);
std::string finish_reason(const CompletionEvent& e);  // "stop" | "length" | "error"
ApiError no_sessions();  // the 400 for a "session" where sessions are not served
// OpenAI's usage object; cached_tokens: prompt tokens the prefix cache restored.
json usage(int prompt_tokens, int completion_tokens, int cached_tokens = 0);
// JSON text with invalid UTF-8 replaced, never an exception.
std::string dump(const json& j);

// Appends s as a JSON string literal, escaped as dump() escapes it; false (and nothing appended)
// when s is not valid UTF-8.
bool append_json_string(std::string& out, std::string_view s);

// The SSE event of one streamed token of a completion: what dump() gives for the chunk
// {"id", "object": "text_completion", "created", "model", "choices": [{"text", "index",
// "logprobs": null, "finish_reason": null}]}, written without building JSON objects (a stream
// sends one per token), appended to `out` (no allocation once `out` has room). False, with
// nothing appended, when the text is not valid UTF-8 (build it with dump() then).
class TokenChunk {
 public:
  TokenChunk(const std::string& id, int64_t created, const std::string& model);
  bool append_event(std::string& out, int index, std::string_view text) const;

 private:
  std::string suffix_;  // the chunk's fields after "choices"
};

}  // namespace mp::api
