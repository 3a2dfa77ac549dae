// The tools' command-line parser (engine/common/args.h).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "common/args.h"
#include "common/sampling_args.h"

namespace {

mp::cli::Args parse(std::vector<std::string> words) {
  words.insert(words.begin(), "tool");
  std::vector<char*> argv;
  for (auto& w : words) argv.push_back(w.data());
  return mp::cli::Args(static_cast<int>(argv.size()), argv.data(), {"quiet"}, "usage\n",
                       {{"m", "model"}, {"p", "prompt"}});
}

TEST(Args, ShortNamesLongNamesFlagsAndPositionals) {
  const auto a = parse({"-m", "x.gguf", "--quiet", "-p", "Once upon", "-", "-5", "--n", "3"});
  EXPECT_EQ(a.str("model"), "x.gguf");
  EXPECT_EQ(a.str("prompt"), "Once upon");
  EXPECT_TRUE(a.has("quiet"));
  EXPECT_EQ(a.integer("n", 0), 3);
  EXPECT_EQ(a.positional(), (std::vector<std::string>{"-", "-5"}));
}

TEST(Args, ALaterValueWinsAndAllKeepsEvery) {
  const auto a = parse({"--model", "a", "-m", "b"});
  EXPECT_EQ(a.str("model"), "b");
  EXPECT_EQ(a.all("model"), (std::vector<std::string>{"a", "b"}));
}

TEST(ArgsDeathTest, UnknownShortOptionIsAnErrorNotAWordOfThePrompt) {
  EXPECT_EXIT(parse({"-x", "hello"}), testing::ExitedWithCode(2), "unknown option -x");
}

TEST(Args, Seconds) {
  EXPECT_EQ(parse({"--t", "0.25"}).seconds("t", 5), 0.25);
  EXPECT_EQ(parse({}).seconds("t", 5), 5);
  EXPECT_EXIT(parse({"--t", "0"}).seconds("t", 5), testing::ExitedWithCode(2),
              "--t needs a positive number of seconds, got '0'");
  EXPECT_EXIT(parse({"--t", "-1"}).seconds("t", 5), testing::ExitedWithCode(2), "positive");
}

TEST(ArgsDeathTest, MissingValueAndBadNumberAreErrors) {
  EXPECT_EXIT(parse({"--model"}), testing::ExitedWithCode(2), "--model needs a value");
  EXPECT_EXIT(parse({"--n", "3x"}).integer("n", 0), testing::ExitedWithCode(2),
              "--n needs an integer, got '3x'");
  EXPECT_EXIT(parse({"--model", "a", "--modle", "b"}).check_known({"model"}),
              testing::ExitedWithCode(2), "unknown option --modle");
}

// Sampling: the options given, over the model's recommendation, over the built-in defaults.
TEST(Args, SamplingOptionsReplaceTheModelsRecommendation) {
  mp::SamplingRecommendation model;
  model.temperature = 0.5f;
  model.top_k = 0;
  model.repetition_penalty = 1.1f;
  const mp::SamplingParams none = mp::cli::sampling_from_args(parse({"--seed", "1"}), model);
  EXPECT_EQ(none.temperature, 0.5f);
  EXPECT_EQ(none.top_k, 0);
  EXPECT_EQ(none.repetition_penalty, 1.1f);
  EXPECT_EQ(none.top_p, mp::SamplingParams{}.top_p);
  const mp::SamplingParams given =
      mp::cli::sampling_from_args(parse({"--top-k", "7", "--repeat-penalty", "1"}), model);
  EXPECT_EQ(given.top_k, 7);
  EXPECT_EQ(given.repetition_penalty, 1.0f);
  EXPECT_EQ(given.temperature, 0.5f);
  EXPECT_NE(mp::cli::describe_sampling(given, model).find("top-k 7"), std::string::npos);
}

TEST(Args, SamplingListsAreParsedAndBadItemsNamed) {
  const mp::SamplingRecommendation s = mp::cli::parse_sampling_list(
      "temperature=0.8,top-k=0,top-p=1,min-p=0,repeat-penalty=1.1,penalty-last-n=64");
  EXPECT_EQ(s.describe(),
            "temp 0.8, top_k 0, top_p 1, min_p 0, penalty_repeat 1.1, penalty_last_n 64");
  auto error = [](const std::string& list) {
    try {
      mp::cli::parse_sampling_list(list);
    } catch (const mp::Error& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  EXPECT_NE(error("top-k=1.5").find("'top-k=1.5' needs an integer"), std::string::npos);
  EXPECT_NE(error("temperature").find("KEY=NUMBER"), std::string::npos);
  EXPECT_NE(error("temperature=hot").find("KEY=NUMBER"), std::string::npos);
  EXPECT_NE(error("top_k=3").find("the key is none of"), std::string::npos);
}

}  // namespace
