// The GPUs' Communicator: one NCCL rank per device of this process. The all-reduce is queued on
// the calling shard's stream (and captured into its CUDA graphs with the rest of a decode step).
// libnccl.so.2 is loaded when the first communicator is made, so that the binaries run where it is
// absent (it is 200 MB; the GPU machine's comes with PyTorch), as long as nothing splits a model.
#include <dlfcn.h>
#include <nccl.h>

#include "../engine/src/communicator.h"
#include "multipole/multipole.h"

namespace mp {
namespace {

struct Nccl {
  decltype(&ncclCommInitAll) init_all;
  decltype(&ncclAllReduce) all_reduce;
  decltype(&ncclCommDestroy) destroy;
  decltype(&ncclGetErrorString) error_string;
};

const Nccl& nccl() {
  static const Nccl lib = [] {
    void* h = dlopen("libnccl.so.2", RTLD_NOW | RTLD_GLOBAL);
    if (!h)
      throw Error(std::string("tensor parallelism on GPUs needs NCCL: cannot load libnccl.so.2 (") +
                  dlerror() + "); put its folder on LD_LIBRARY_PATH");
    auto sym = [h](const char* name) {
      void* p = dlsym(h, name);
      if (!p) throw Error(std::string("libnccl.so.2 lacks ") + name);
      return p;
    };
    return Nccl{reinterpret_cast<decltype(&ncclCommInitAll)>(sym("ncclCommInitAll")),
                reinterpret_cast<decltype(&ncclAllReduce)>(sym("ncclAllReduce")),
                reinterpret_cast<decltype(&ncclCommDestroy)>(sym("ncclCommDestroy")),
                reinterpret_cast<decltype(&ncclGetErrorString)>(sym("ncclGetErrorString"))};
  }();
  return lib;
}

void check_nccl(ncclResult_t r, const char* what) {
  if (r != ncclSuccess) throw Error(std::string("NCCL ") + what + ": " + nccl().error_string(r));
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(ncclComm_t comm, int rank, int size) : comm_(comm), rank_(rank), size_(size) {}
  ~NcclCommunicator() override { nccl().destroy(comm_); }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void all_reduce_sum(float* data, size_t n, void* stream) override {
    check_nccl(nccl().all_reduce(data, data, n, ncclFloat, ncclSum, comm_,
                                 static_cast<cudaStream_t>(stream)),
               "all-reduce");
  }

 private:
  ncclComm_t comm_;
  int rank_, size_;
};

}  // namespace

std::vector<std::unique_ptr<Communicator>> make_nccl_communicators(
    const std::vector<int>& devices) {
  const int n = static_cast<int>(devices.size());
  std::vector<ncclComm_t> comms(n);
  check_nccl(nccl().init_all(comms.data(), n, devices.data()), "init");
  std::vector<std::unique_ptr<Communicator>> out;
  for (int r = 0; r < n; ++r) out.push_back(std::make_unique<NcclCommunicator>(comms[r], r, n));
  return out;
}

}  // namespace mp
