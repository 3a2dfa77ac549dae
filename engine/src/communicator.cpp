#include "communicator.h"

#include <algorithm>
#include <barrier>

namespace mp {
namespace {

struct Shared {
  explicit Shared(int n) : sync(n), data(n) {}
  std::barrier<> sync;
  std::vector<const float*> data;  // each rank's buffer during a call
};

class ThreadCommunicator final : public Communicator {
 public:
  ThreadCommunicator(std::shared_ptr<Shared> shared, int rank)
      : shared_(std::move(shared)), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return static_cast<int>(shared_->data.size()); }
  // Every rank adds the buffers in rank order, so all get the same bits.
  void all_reduce_sum(float* data, size_t n, void*) override {
    if (size() == 1) return;
    shared_->data[rank_] = data;
    shared_->sync.arrive_and_wait();  // every buffer is ready
    sum_.assign(shared_->data[0], shared_->data[0] + n);
    for (int r = 1; r < size(); ++r) {
      const float* other = shared_->data[r];
      for (size_t i = 0; i < n; ++i) sum_[i] += other[i];
    }
    shared_->sync.arrive_and_wait();  // nobody reads the buffers any more
    std::copy(sum_.begin(), sum_.end(), data);
  }

 private:
  std::shared_ptr<Shared> shared_;
  int rank_;
  std::vector<float> sum_;
};

}  // namespace

std::vector<std::unique_ptr<Communicator>> make_thread_communicators(int n) {
  auto shared = std::make_shared<Shared>(n);
  std::vector<std::unique_ptr<Communicator>> out;
  for (int r = 0; r < n; ++r) out.push_back(std::make_unique<ThreadCommunicator>(shared, r));
  return out;
}

}  // namespace mp
