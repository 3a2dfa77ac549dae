// multipole-batch's lines and records (tools/batch.cpp): an input line read into a request or an
// error of its own, the output record of a line, and which written records count as done for
// --resume. Any line reads without throwing: one bad line gets an error record, the others run.
#pragma once

#include <string>

#include "common/api.h"

namespace mp::batch {

using api::json;

// One input line: its request, and what identifies its result across runs.
struct Line {
  bool openai = false;  // OpenAI Batch shape (else a bare body with "id")
  bool chat = false;
  std::string key;  // "c:" custom_id or "l:" id: results already written are found by it
  json custom_id, id;
  json body;
  std::string error;  // the line cannot be run (bad JSON, bad url...)
};

// Line `number` (1-based) of the input.
Line read_line(const std::string& text, size_t number);

// The model named in the response: the request's "model" when it is a string.
std::string model_name(const Line& l);

// The output record of a line: its response body (status 200), an API error (its status and
// body: ApiError::body()) or, status 0, a line that could not be run (an ApiError body).
json record(const Line& l, size_t number, const json& body, int status);

// Whether a written record counts as done (a result, not an error), and its line's key.
bool done_record(const json& r, std::string* key);

}  // namespace mp::batch
