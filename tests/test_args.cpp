// The tools' command-line parser (engine/common/args.h).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "common/args.h"

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

}  // namespace
