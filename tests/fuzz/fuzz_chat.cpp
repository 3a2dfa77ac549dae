// The chat request parser and the chat template (engine/common/chat.*, jinja.*). The input is a
// request body, rendered with the default template, or a template source, a NUL byte and a
// body. A template either parses or throws mp::Error; rendered over any JSON it gives text or
// throws mp::Error (never another exception: the server would answer 500); a request parses into
// requests the scheduler accepts, whose prompt is the rendered conversation's tokens, or fails
// with a 400 ApiError.
#include <algorithm>
#include <cstring>
#include <optional>

#include "common/api.h"
#include "common/chat.h"
#include "fuzz_support.h"

namespace {

// f() returns or throws mp::Error with a message; anything else is a finding.
template <class F>
void only_mp_errors(F&& f, const char* what) {
  try {
    f();
  } catch (const mp::api::ApiError&) {
    throw;  // the caller checks those
  } catch (const mp::Error& e) {
    mp::fuzz::check(std::strlen(e.what()) > 0, what);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fuzz: %s threw %s\n", what, e.what());
    std::abort();
  }
}

}  // namespace

MULTIPOLE_FUZZ_TARGET(fuzz_chat) {
  using namespace mp;
  const Model& model = *fuzz::tiny_model(true);
  const auto* nul = static_cast<const uint8_t*>(std::memchr(data, 0, size));
  const std::string source = nul ? std::string(reinterpret_cast<const char*>(data), nul - data)
                                 : std::string(chat::kDefaultTemplate);
  const uint8_t* body_at = nul ? nul + 1 : data;
  const api::json body = api::json::parse(body_at, data + size, nullptr, false);
  std::optional<chat::Format> format;
  only_mp_errors([&] { format.emplace(model, source); }, "parsing the template");
  if (!format) return 0;
  if (body.is_discarded()) return 0;
  // The template over the body as its context (any JSON: types a real context never has).
  only_mp_errors([&] { (void)jinja::Template(source).render(body); }, "rendering");
  // The request: a plain mp::Error is a 400 too (the server's handler maps it).
  std::optional<api::CompletionsCall> call;
  try {
    const SamplingParams defaults = api::request_sampling_defaults({});
    only_mp_errors([&] { call.emplace(api::parse_chat_completions(body, *format, 64, defaults)); },
                   "parse_chat_completions");
  } catch (const api::ApiError& e) {
    fuzz::check(e.status == 400, "bad requests are 400");
    fuzz::check(std::strlen(e.what()) > 0, "errors have a message");
    (void)api::dump(e.body());
  }
  if (!call) return 0;
  fuzz::check(call->chat && call->prompts.size() == 1 && call->n >= 1,
              "a chat has one prompt and choices");
  fuzz::check(call->requests.size() == size_t(call->n), "one request per choice");
  const std::vector<int> ids = format->tokenize(call->prompts[0]);
  for (const auto& r : call->requests) {
    fuzz::check(r.prompt == ids, "the prompt is the rendered conversation's tokens");
    fuzz::check(!r.prompt.empty() && r.prompt.size() <= 64, "prompts within the limit");
    for (int id : r.prompt)
      fuzz::check(id >= 0 && id < model.config().vocab_size, "ids in the vocabulary");
    fuzz::check(r.max_tokens >= 0, "max_tokens >= 0");
    for (const auto& s : format->stop())
      fuzz::check(std::find(r.stop.begin(), r.stop.end(), s) != r.stop.end(),
                  "the template's stop strings");
    r.sampling.validate();  // the scheduler's check: must not throw on a parsed request
  }
  return 0;
}
