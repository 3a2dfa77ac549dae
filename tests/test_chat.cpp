// Chat templates (the Jinja subset against Python's Jinja2 on real templates), the chat format's
// tokenization, the converter carrying a template into the GGUF, and chat request parsing.
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "common/api.h"
#include "common/jinja.h"
#include "model_fixture.h"

namespace {

using json = nlohmann::json;
using namespace mp;

std::string read(const std::string& path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}
const std::string kTemplates = std::string(MULTIPOLE_TEST_DATA) + "/chat_templates/";
const SamplingParams kDefaults = api::request_sampling_defaults({});

// cases.json: every template of tests/data/chat_templates rendered by Python's Jinja2 as
// transformers does (make_expected.py), on conversations that include errors it raises.
TEST(ChatTemplate, RendersRealTemplatesAsJinja2Does) {
  const json cases = json::parse(read(kTemplates + "cases.json"));
  ASSERT_GE(cases.size(), 60u);
  int errors = 0;
  for (const auto& c : cases) {
    const std::string name = c["template"].get<std::string>() + " / " +
                             c["conversation"].get<std::string>() +
                             (c["context"]["add_generation_prompt"].get<bool>() ? " +gen" : "");
    const jinja::Template t(read(kTemplates + c["template"].get<std::string>()));
    if (c.contains("expected_error")) {
      ++errors;
      try {
        t.render(c["context"]);
        ADD_FAILURE() << name << ": rendered, Jinja2 raised " << c["expected_error"];
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find(c["expected_error"].get<std::string>()),
                  std::string::npos)
            << name << ": " << e.what();
      }
      continue;
    }
    EXPECT_EQ(t.render(c["context"]), c["expected"].get<std::string>()) << name;
  }
  EXPECT_GT(errors, 0);  // raise_exception() cases are among them
}

TEST(ChatTemplate, WhitespaceControlAndScoping) {
  auto render = [](const std::string& src, const json& ctx = json::object()) {
    return jinja::Template(src).render(ctx);
  };
  // trim_blocks and lstrip_blocks, as apply_chat_template sets them; '+' keeps, '-' strips.
  EXPECT_EQ(render("  {% if true %}\n  a\n  {% endif %}\nb\n"), "  a\nb");
  EXPECT_EQ(render("x  {%- if true -%}  y  {%- endif %} z"), "xy z");
  EXPECT_EQ(render("  {%+ if true %}a{% endif %}"), "  a");
  EXPECT_EQ(render("a {# note #}\nb"), "a b");
  // A set inside a loop lasts one iteration; a namespace carries values out.
  EXPECT_EQ(
      render("{% set x = 1 %}{% for i in [1, 2] %}{% set x = x + i %}{{ x }}{% endfor %}{{ x }}"),
      "231");
  EXPECT_EQ(render("{% set ns = namespace(s=0) %}{% for i in range(5) %}{% if i == 3 %}{% break %}"
                   "{% endif %}{% set ns.s = ns.s + i %}{% endfor %}{{ ns.s }}"),
            "3");
  EXPECT_EQ(render("{{ m | tojson }}|{{ m | tojson(indent=2) }}", {{"m", {{"a", {1, "é"}}}}}),
            "{\"a\": [1, \"é\"]}|{\n  \"a\": [\n    1,\n    \"é\"\n  ]\n}");
  EXPECT_EQ(
      render("{{ xs[1:] }} {{ xs[::-1][0] }} {{ xs[-1] }} {{ 'abc'[1] }}", {{"xs", {1, 2, 3}}}),
      "[2, 3] 3 3 b");
}

TEST(ChatTemplate, UnsupportedOrBrokenTemplatesAreRefusedWithTheirLine) {
  auto error_of = [](const std::string& src) -> std::string {
    try {
      jinja::Template(src).render({{"messages", json::array()}});
    } catch (const Error& e) {
      return e.what();
    }
    return "no error";
  };
  EXPECT_NE(error_of("a\n{% macro f() %}{% endmacro %}")
                .find("line 2: unsupported or unexpected tag 'macro'"),
            std::string::npos)
      << error_of("a\n{% macro f() %}{% endmacro %}");
  EXPECT_NE(error_of("{% if x %}open").find("'if' is not closed"), std::string::npos);
  EXPECT_NE(error_of("{{ x | nope }}").find("unknown filter 'nope'"), std::string::npos);
  EXPECT_NE(error_of("{{ 'a' < 1 }}").find("cannot compare"), std::string::npos);
  EXPECT_NE(error_of("{{ 'unclosed }}").find("not closed"), std::string::npos);
  EXPECT_NE(error_of("{% endfor %}").find("without its opening tag"), std::string::npos);
  EXPECT_NE(error_of("{{ raise_exception('bad roles') }}").find("bad roles"), std::string::npos);
}

// Templates and conversations that would take the process's memory, stack or time, or hit
// undefined behaviour in 64-bit arithmetic (Python's ints are unbounded), are refused with an
// Error naming the limit (tests/fuzz/fuzz_chat.cpp looks for more).
TEST(ChatTemplate, HostileTemplatesAreRefusedNotRun) {
  // A budget of 200,000 steps (5 million by default) keeps the test quick.
  auto render = [](const std::string& src, const json& ctx = json::object()) -> std::string {
    try {
      return jinja::Template(src).render(ctx, 200'000);
    } catch (const Error& e) {
      return std::string("error: ") + e.what();
    }
  };
  auto refused = [&](const std::string& src, const std::string& why, const json& ctx = {}) {
    const std::string got = render(src, ctx.is_null() ? json::object() : ctx);
    EXPECT_NE(got.find(why), std::string::npos) << src << " -> " << got.substr(0, 200);
  };
  refused("{% for i in range(100000000000) %}{% endfor %}", "more than 200000 steps");
  refused("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
          "steps");
  refused("{{ 'ab' * 10000000000 }}", "exceed 64 MiB");
  refused("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
          "{% endfor %}{{ ns.s|length }}",
          "exceed 64 MiB");
  refused("{{ 'a'|replace('a', 'b' * 1000000)|replace('b', 'c' * 1000) }}", "exceed 64 MiB");
  refused("{{ 9223372036854775807 + 1 }}", "integer overflow");
  refused("{{ -(-9223372036854775807 - 1) }}", "integer overflow");
  refused("{{ (-9223372036854775807 - 1) | abs }}", "integer overflow");
  refused("{{ 3037000500 * 3037000500 }}", "integer overflow");
  refused("{{ 2 ** 70 }}", "does not fit a 64-bit integer");
  refused("{{ (-9223372036854775807 - 1) // -1 }}", "does not fit");
  refused("{{ (10.0 ** 400) | int }}", "does not fit");
  refused("{{ 99999999999999999999 }}", "out of range");
  refused("{{ " + std::string(1000, '(') + "1" + std::string(1000, ')') + " }}", "too deeply");
  refused("{{ " + std::string(1000, '-') + "1 }}", "too deeply");
  std::string ifs;
  for (int i = 0; i < 1000; ++i) ifs += "{% if true %}";
  refused(ifs, "too deeply");
  refused("{{ {'a': 1}|tojson(indent=1000000000) }}", "exceeds 64 MiB");
  // Python's results where the numbers fit.
  EXPECT_EQ(render("{{ 'aXbXXc'|replace('X', 'yy') }} {{ 'aaa'.replace('a', '') }}"), "ayybyyyyc ");
  EXPECT_EQ(render("{{ 7 % -3 }} {{ -7 % 3 }} {{ (-9223372036854775807 - 1) % -1 }} {{ 7 // -2 }}"),
            "-2 2 0 -4");
  EXPECT_EQ(render("{{ range(5, 10, 9223372036854775807) }} {{ range(10, 0, -4) }}"),
            "[5] [10, 6, 2]");
  EXPECT_EQ(render("{{ [1, 2, 3][1::9223372036854775807] }} {{ 'abc'[::-9223372036854775807] }}"),
            "[2] c");
  // A conversation of 1,000 messages renders with a template that loops over it once, and is
  // refused by one that copies it at every message (quadratic work).
  json messages = json::array();
  for (int i = 0; i < 1000; ++i)
    messages.push_back({{"role", i % 2 ? "assistant" : "user"}, {"content", "m"}});
  const std::string once = render(
      "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}", {{"messages", messages}});
  EXPECT_EQ(once.size(), 1000u / 2 * (8 + 13));
  refused("{% for m in messages %}{{ messages|length }}{% endfor %}", "steps",
          {{"messages", messages}});
}

struct ChatModel : ::testing::Test, mp::testing::VariantModel {
  const Tokenizer& tok = model->tokenizer();
};

TEST_F(ChatModel, DefaultTemplateForABaseModel) {
  ASSERT_TRUE(model->chat_template().empty());
  const chat::Format f(*model);
  EXPECT_TRUE(f.is_default());
  ASSERT_EQ(f.stop(), std::vector<std::string>{chat::kDefaultStop});
  const json messages = {{{"role", "system"}, {"content", "Be brief."}},
                         {{"role", "user"}, {"content", "Hi"}},
                         {{"role", "assistant"}, {"content", "Hello!"}},
                         {{"role", "user"}, {"content", "Bye"}}};
  const std::string prompt = f.render(messages, true);
  EXPECT_EQ(prompt, "Be brief.\n\nUser: Hi\nAssistant: Hello!\nUser: Bye\nAssistant:");
  EXPECT_EQ(f.tokenize(prompt), tok.encode(prompt, tok.add_bos()));
}

TEST_F(ChatModel, SpecialTokensWrittenByTheTemplateBecomeTheirIds) {
  const chat::Format f(*model, read(kTemplates + "llama2.jinja"));
  EXPECT_FALSE(f.is_default());
  EXPECT_TRUE(f.stop().empty());
  const json messages = {{{"role", "user"}, {"content", "one"}},
                         {{"role", "assistant"}, {"content", "two"}},
                         {{"role", "user"}, {"content", "three"}}};
  const std::string prompt = f.render(messages, true);
  ASSERT_EQ(prompt, "<s>[INST] one [/INST] two </s><s>[INST] three [/INST]");
  std::vector<int> want = tok.encode("[INST] one [/INST] two ", false);
  want.insert(want.begin(), tok.bos());
  want.push_back(tok.eos());
  want.push_back(tok.bos());
  const auto tail = tok.encode("[INST] three [/INST]", false);
  want.insert(want.end(), tail.begin(), tail.end());
  EXPECT_EQ(f.tokenize(prompt), want);  // and no second BOS in front
}

TEST_F(ChatModel, ConverterCopiesTheChatTemplate) {
  const std::string source = read(kTemplates + "chatml.jinja");
  ConvertOptions overwrite;
  overwrite.overwrite = true;
  std::ofstream(dir / "hf/tokenizer_config.json") << json{{"chat_template", source}}.dump();
  convert_hf_to_gguf(dir / "hf", dir / "chat.gguf", overwrite);
  auto with = Model::load(dir / "chat.gguf");
  EXPECT_EQ(with->chat_template(), source);
  EXPECT_EQ(chat::Format(*with).source(), source);
  // A template list (transformers' named templates): "default" is taken.
  std::ofstream(dir / "hf/tokenizer_config.json") << json{
      {"chat_template",
       {{{"name", "tool_use"}, {"template", "x"}},
        {{"name", "default"}, {"template", "{{ 1 }}"}}}}}.dump();
  convert_hf_to_gguf(dir / "hf", dir / "chat.gguf", overwrite);
  EXPECT_EQ(Model::load(dir / "chat.gguf")->chat_template(), "{{ 1 }}");
  // A model template that does not parse: the default, with a warning.
  std::ofstream(dir / "hf/tokenizer_config.json")
      << json{{"chat_template", "{% macro m() %}"}}.dump();
  convert_hf_to_gguf(dir / "hf", dir / "chat.gguf", overwrite);
  std::string warning;
  const chat::Format f = chat::format_for(*Model::load(dir / "chat.gguf"), "", &warning);
  EXPECT_TRUE(f.is_default());
  EXPECT_NE(warning.find("macro"), std::string::npos) << warning;
  EXPECT_THROW(chat::format_for(*model, "{% macro m() %}", &warning), Error);  // asked for: fatal
}

// A request's sampling: its own fields, over the model's recommendation, over the OpenAI API's
// defaults (as llama-server and vLLM's generation config).
TEST_F(ChatModel, RequestsStartFromTheModelsRecommendedSampling) {
  const chat::Format f(*model);
  auto sampling_of = [&](const json& fields, const SamplingParams& defaults) {
    json body = {{"messages", {{{"role", "user"}, {"content", "Hi"}}}}};
    body.update(fields);
    return api::parse_chat_completions(body, f, 100, defaults).requests[0].sampling;
  };
  const SamplingParams openai = sampling_of(json::object(), kDefaults);
  EXPECT_EQ(openai.temperature, 1.0f);
  EXPECT_EQ(openai.top_k, 0);
  EXPECT_EQ(openai.top_p, 1.0f);
  EXPECT_EQ(openai.min_p, 0.0f);
  EXPECT_EQ(openai.repetition_penalty, 1.0f);
  EXPECT_EQ(openai.penalty_last_n, -1);

  SamplingRecommendation rec;
  rec.temperature = 0.8f;
  rec.repetition_penalty = 1.1f;
  rec.penalty_last_n = 64;
  const SamplingParams defaults = api::request_sampling_defaults(rec);
  const SamplingParams plain = sampling_of(json::object(), defaults);
  EXPECT_EQ(plain.temperature, 0.8f);
  EXPECT_EQ(plain.repetition_penalty, 1.1f);
  EXPECT_EQ(plain.penalty_last_n, 64);
  EXPECT_EQ(plain.top_p, 1.0f);  // not recommended: the API's default
  const SamplingParams own =
      sampling_of({{"temperature", 0.2}, {"repetition_penalty", 1.0}}, defaults);
  EXPECT_EQ(own.temperature, 0.2f);
  EXPECT_EQ(own.repetition_penalty, 1.0f);
  EXPECT_EQ(own.penalty_last_n, 64);
}

TEST_F(ChatModel, ChatRequestsAreParsedAndCheckedField) {
  const chat::Format f(*model);
  const json ok = {{"messages", {{{"role", "user"}, {"content", "Hi"}}}}, {"seed", 3}, {"n", 2}};
  const api::CompletionsCall call = api::parse_chat_completions(ok, f, 100, kDefaults);
  EXPECT_TRUE(call.chat);
  ASSERT_EQ(call.requests.size(), 2u);
  EXPECT_EQ(call.prompts[0], "User: Hi\nAssistant:");
  EXPECT_EQ(call.requests[0].prompt, f.tokenize(call.prompts[0]));
  EXPECT_EQ(call.requests[0].max_tokens, 100 - call.prompt_tokens[0]);  // the rest of the context
  EXPECT_EQ(call.requests[1].sampling.seed, 4u);
  EXPECT_EQ(call.requests[0].stop, std::vector<std::string>{chat::kDefaultStop});
  // Text parts are joined; developer is system; max_completion_tokens is max_tokens.
  json parts = {
      {"messages",
       {{{"role", "developer"}, {"content", "S"}},
        {{"role", "user"},
         {"content", {{{"type", "text"}, {"text", "a"}}, {{"type", "text"}, {"text", "b"}}}}}}},
      {"max_completion_tokens", 5},
      {"logprobs", true},
      {"top_logprobs", 2}};
  const auto c2 = api::parse_chat_completions(parts, f, 0, kDefaults);
  EXPECT_EQ(c2.prompts[0], "S\n\nUser: a\nb\nAssistant:");
  EXPECT_EQ(c2.requests[0].max_tokens, 5);
  EXPECT_TRUE(c2.with_logprobs);
  EXPECT_EQ(c2.requests[0].logprobs, 2);
  auto param_of = [&](const json& body) -> std::string {
    try {
      api::parse_chat_completions(body, f, 100, kDefaults);
    } catch (const api::ApiError& e) {
      EXPECT_EQ(e.status, 400);
      return e.param;
    }
    return "accepted";
  };
  const json user = {{"role", "user"}, {"content", "x"}};
  EXPECT_EQ(param_of({{"prompt", "x"}}), "messages");
  EXPECT_EQ(param_of({{"messages", json::array()}}), "messages");
  EXPECT_EQ(param_of({{"messages", {{{"role", "tool"}, {"content", "x"}}}}}), "messages[0].role");
  EXPECT_EQ(param_of({{"messages", {{{"content", "x"}}}}}), "messages[0]");
  EXPECT_EQ(param_of({{"messages", {{{"role", "user"}, {"content", {{{"type", "image_url"}}}}}}}}),
            "messages[0].content");
  EXPECT_EQ(param_of({{"messages", {user}}, {"top_logprobs", 2}}), "top_logprobs");
  EXPECT_EQ(param_of({{"messages", {user}}, {"max_completion_tokens", "5"}}),
            "max_completion_tokens");
  EXPECT_EQ(param_of({{"messages", {user}}, {"tools", {{{"type", "function"}}}}}), "tools");
  EXPECT_EQ(param_of({{"messages", {user}}, {"session", 5}}), "session");
  EXPECT_EQ(api::parse_chat_completions({{"messages", {user}}, {"session", "s1"}}, f, 0,
                                        kDefaults).session,
            "s1");
  EXPECT_EQ(param_of({{"messages", {{{"role", "user"}, {"content", std::string(600, 'z')}}}}}),
            "messages");  // over the context limit
  // The template's raise_exception() is the request's error.
  const chat::Format mistral(*model, read(kTemplates + "mistral.jinja"));
  try {
    api::parse_chat_completions({{"messages", {user, user}}}, mistral, 0, kDefaults);
    ADD_FAILURE() << "accepted";
  } catch (const api::ApiError& e) {
    EXPECT_NE(std::string(e.what()).find("must alternate"), std::string::npos) << e.what();
  }
}

}  // namespace
