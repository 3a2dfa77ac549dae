// How the shards of a tensor-parallel backend sum their partial results: Megatron's all-reduce,
// once after the attention's output projection and once after the FFN's down projection.
#pragma once

#include <cstddef>
#include <memory>
#include <vector>

namespace mp {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // data (n floats) becomes the sum over the ranks of their data, the same bits on every rank.
  // Every rank calls it with the same n, in the same order of calls. On a GPU, data is device
  // memory and the sum is queued on `stream` (a cudaStream_t); on the CPU, stream is null.
  virtual void all_reduce_sum(float* data, size_t n, void* stream) = 0;
};

// N ranks that are threads of this process, summing through shared memory (the CPU backend's).
std::vector<std::unique_ptr<Communicator>> make_thread_communicators(int n);
#ifdef MULTIPOLE_HAVE_NCCL
// One NCCL rank per device, all in this process (ncclCommInitAll; kernels/nccl_communicator.cu).
std::vector<std::unique_ptr<Communicator>> make_nccl_communicators(const std::vector<int>& devices);
#endif

}  // namespace mp
