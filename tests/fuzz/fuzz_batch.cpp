// multipole-batch's lines and records (engine/common/batch_lines.*): any line reads without
// throwing, into a request body or an error of its own; its records are JSON whatever the line
// held; and, written and read back as --resume reads them, a result counts as done under its
// line's own key (a resumed run neither redoes nor duplicates it) and an error does not.
#include "common/batch_lines.h"
#include "fuzz_support.h"

MULTIPOLE_FUZZ_TARGET(fuzz_batch) {
  using namespace mp;
  using api::json;
  const batch::Line l =
      batch::read_line(std::string(reinterpret_cast<const char*>(data), size), 7);
  fuzz::check(!l.key.empty(), "every line has a key");
  fuzz::check(l.error.empty() == l.body.is_object(), "a line is a request body or an error");
  (void)batch::model_name(l);
  auto reread = [](const json& r) { return json::parse(api::dump(r)); };  // as written, as read
  std::string key;
  const json error = api::ApiError(400, "fuzz").body();
  fuzz::check(
      !batch::done_record(reread(batch::record(l, 7, error, l.error.empty() ? 400 : 0)), &key),
      "an error record is not done");
  if (!l.error.empty()) return 0;
  const json choice = {{"index", 0},
                       {"text", "x"},
                       {"message", {{"role", "assistant"}, {"content", "x"}}},
                       {"finish_reason", "stop"}};
  const json result = {
      {"id", "cmpl-7"}, {"choices", json::array({choice})}, {"usage", json::object()}};
  fuzz::check(batch::done_record(reread(batch::record(l, 7, result, 200)), &key) && key == l.key,
              "a result record is done under its line's key");
  return 0;
}
