// A backend that hands every call to another: tests derive from it to watch or hold some calls
// (recording the batches, a device that is slow for as long as a test wants).
#pragma once

#include <memory>

#include "multipole/multipole.h"

namespace mp::testing {

class ForwardingBackend : public Backend {
 public:
  explicit ForwardingBackend(std::unique_ptr<Backend> inner) : inner_(std::move(inner)) {}
  std::string name() const override { return inner_->name(); }
  const Config& config() const override { return inner_->config(); }
  int n_slots() const override { return inner_->n_slots(); }
  int alloc_slot() override { return inner_->alloc_slot(); }
  void free_slot(int s) override { inner_->free_slot(s); }
  void reset_slot(int s) override { inner_->reset_slot(s); }
  void copy_slot(int a, int b) override { inner_->copy_slot(a, b); }
  int64_t slot_pos(int s) const override { return inner_->slot_pos(s); }
  std::vector<uint8_t> save_slot(int s) const override { return inner_->save_slot(s); }
  void load_slot(int s, std::span<const uint8_t> b) override { inner_->load_slot(s, b); }
  size_t slot_bytes(int s) const override { return inner_->slot_bytes(s); }
  int prefill_tokens_per_step() const override { return inner_->prefill_tokens_per_step(); }
  std::vector<float> forward(std::span<const SeqChunk> chunks) override {
    return inner_->forward(chunks);
  }
  std::vector<SampledToken> forward_sample(std::span<const SeqChunk> chunks,
                                           std::span<const SampleSpec> specs) override {
    return inner_->forward_sample(chunks, specs);
  }

 protected:
  Backend& inner() { return *inner_; }

 private:
  std::unique_ptr<Backend> inner_;
};

}  // namespace mp::testing
