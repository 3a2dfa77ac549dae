#include "common/batch_lines.h"

#include <optional>

namespace mp::batch {

namespace {
// j[key] when it is a string, `fallback` when there is no such key, nothing for another type.
std::optional<std::string> string_field(const json& j, const char* key, const char* fallback) {
  const auto it = j.find(key);
  if (it == j.end()) return fallback;
  if (!it->is_string()) return std::nullopt;
  return it->get<std::string>();
}
}  // namespace

Line read_line(const std::string& text, size_t number) {
  Line l;
  l.id = "line-" + std::to_string(number);
  json j;
  try {
    j = json::parse(text);
  } catch (const std::exception& e) {
    l.error = std::string("line is not valid JSON: ") + e.what();
    l.key = "l:" + l.id.dump();
    return l;
  }
  if (!j.is_object()) {
    l.error = "line is not a JSON object";
    l.key = "l:" + l.id.dump();
    return l;
  }
  l.openai = j.contains("custom_id") || j.contains("url") || j.contains("body");
  if (!l.openai) {
    if (j.contains("id")) l.id = j["id"];
    l.key = "l:" + l.id.dump();
    l.chat = j.contains("messages");
    l.body = std::move(j);
    return l;
  }
  l.custom_id = j.value("custom_id", json(nullptr));
  l.key = "c:" + l.custom_id.dump();
  const auto method = string_field(j, "method", "POST"), url = string_field(j, "url", "");
  if (!l.custom_id.is_string())
    l.error = "'custom_id' must be a string";
  else if (method != "POST")
    l.error = "'method' must be \"POST\"";
  else if (url != "/v1/completions" && url != "/v1/chat/completions")
    l.error = "'url' must be \"/v1/completions\" or \"/v1/chat/completions\", got " +
              (url ? "'" + *url + "'" : "a " + std::string(j["url"].type_name()));
  else if (!j.contains("body") || !j["body"].is_object())
    l.error = "'body' must be a JSON object";
  if (!l.error.empty()) return l;
  l.chat = url == "/v1/chat/completions";
  l.body = std::move(j["body"]);
  return l;
}

std::string model_name(const Line& l) {
  const auto it = l.body.find("model");
  return it != l.body.end() && it->is_string() ? it->get<std::string>() : "multipole";
}

json record(const Line& l, size_t number, const json& body, int status) {
  if (!l.openai) {
    if (status != 200) return {{"id", l.id}, {"error", body.at("error")}};
    json out = {{"id", l.id}, {"choices", body.at("choices")}, {"usage", body.at("usage")}};
    const json& c = body.at("choices").at(0);
    out["completion"] = l.chat ? c.at("message").at("content") : c.at("text");
    out["finish_reason"] = c.at("finish_reason");
    return out;
  }
  const std::string id = "batch_req_" + std::to_string(number);
  if (status == 0)
    return {{"id", id},
            {"custom_id", l.custom_id},
            {"response", nullptr},
            {"error",
             {{"code", "invalid_request"}, {"message", body.at("error").at("message")}}}};
  const auto it = body.find("id");
  const std::string request_id = it != body.end() && it->is_string()
                                     ? it->get<std::string>()
                                     : (l.chat ? "chatcmpl-" : "cmpl-") + std::to_string(number);
  return {{"id", id},
          {"custom_id", l.custom_id},
          {"response", {{"status_code", status}, {"request_id", request_id}, {"body", body}}},
          {"error", nullptr}};
}

bool done_record(const json& r, std::string* key) {
  if (!r.is_object()) return false;
  if (r.contains("custom_id")) {
    *key = "c:" + r["custom_id"].dump();
    const auto response = r.find("response");
    if (response == r.end() || !response->is_object()) return false;
    const auto status = response->find("status_code");
    return status != response->end() && status->is_number() && *status == 200;
  }
  if (!r.contains("id") || r.contains("error")) return false;
  *key = "l:" + r["id"].dump();
  return true;
}

}  // namespace mp::batch
