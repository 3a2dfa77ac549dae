// The completion request parser (engine/common/api.cpp, parse_body and parse_completions): any body
// either parses into requests the scheduler accepts or fails with a 400 ApiError.
#include "common/api.h"
#include "fuzz_support.h"

MULTIPOLE_FUZZ_TARGET(fuzz_completions) {
  using namespace mp;
  const Tokenizer& tok = fuzz::fixture_tokenizer();
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  try {
    const api::json body = api::parse_body(text);  // the scanned prompt ids too
    const api::CompletionsCall call =
        api::parse_completions(body, tok, 64, api::request_sampling_defaults({}));
    fuzz::check(!call.prompts.empty() && call.n >= 1, "a call has prompts and choices");
    fuzz::check(call.requests.size() == call.prompts.size() * size_t(call.n),
                "one request per prompt and choice");
    for (const auto& r : call.requests) {
      fuzz::check(!r.prompt.empty() && r.prompt.size() <= 64, "prompts within the limit");
      for (int id : r.prompt) fuzz::check(id >= 0 && id < 400, "prompt ids in the vocabulary");
      fuzz::check(r.max_tokens >= 0, "max_tokens >= 0");
      r.sampling.validate();  // the scheduler's check: must not throw on a parsed request
    }
  } catch (const api::ApiError& e) {
    fuzz::check(e.status == 400, "bad requests are 400");
    fuzz::check(!std::string(e.what()).empty(), "errors have a message");
    (void)api::dump(e.body());
  }
  return 0;
}
