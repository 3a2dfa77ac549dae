// The golden fixtures: tests/data/golden (tools/train/make_golden.py), a model exported by the
// PyTorch reference and the logits PyTorch computed for it (float64, stored as f32), and any
// tests/data/golden-* beside it (tools/train/make_llama_golden.py: Llama-family models written and
// run by transformers). The engine must reproduce their logits.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "model_fixture.h"

namespace {

using namespace mp;

void check_fixture(const std::string& dir) {
  SCOPED_TRACE(dir);
  mp::testing::TempDir tmp;
  ConvertOptions co;
  co.dtype = DType::F32;
  convert_hf_to_gguf(dir, tmp / "golden.gguf", co);
  auto model = Model::load(tmp / "golden.gguf");
  const auto meta = nlohmann::json::parse(std::ifstream(dir + "/tokens.json"));
  const auto tokens = meta["tokens"].get<std::vector<int>>();
  const int V = meta["vocab"].get<int>();
  std::vector<float> want(tokens.size() * V);
  std::ifstream(dir + "/logits.f32", std::ios::binary)
      .read(reinterpret_cast<char*>(want.data()), static_cast<std::streamsize>(want.size() * 4));
  ASSERT_GT(tokens.size(), 3 * model->config().n_ctx_train);  // past the trained length

  auto b = make_backend(model, {.kind = "cpu", .n_slots = 1, .n_threads = 2});
  for (int chunk : {static_cast<int>(tokens.size()), 13}) {
    const int s = b->alloc_slot();
    std::vector<float> got;
    for (size_t i = 0; i < tokens.size(); i += chunk) {
      SeqChunk c{
          s, std::span<const int>(tokens).subspan(i, std::min<size_t>(chunk, tokens.size() - i)),
          true};
      const auto l = b->forward({&c, 1});
      got.insert(got.end(), l.begin(), l.end());
    }
    b->free_slot(s);
    ASSERT_EQ(got.size(), want.size());
    for (size_t t = 0; t < tokens.size(); ++t) {  // per position, relative to the row's norm
      double num = 0, den = 0;
      for (int v = 0; v < V; ++v) {
        const double d = got[t * V + v] - want[t * V + v];
        num += d * d;
        den += double(want[t * V + v]) * want[t * V + v];
      }
      ASSERT_LT(std::sqrt(num / den), 1e-4) << "position " << t << ", chunk " << chunk;
    }
  }
}

TEST(Golden, EngineReproducesPyTorchLogits) {
  std::vector<std::string> dirs;
  for (const auto& e : std::filesystem::directory_iterator(mp::testing::test_data_dir()))
    if (e.is_directory() && e.path().filename().string().starts_with("golden"))
      dirs.push_back(e.path().string());
  ASSERT_FALSE(dirs.empty());
  for (const auto& d : dirs) check_fixture(d);
}

}  // namespace
