// A growable device allocation with a pinned host mirror (backend_cuda.cu, sampling_cuda.cu).
#pragma once

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "ops_cuda.cuh"

namespace mp::cuda {

// A device allocation that frees itself. Transfers go through a pinned host mirror, so that
// they are asynchronous (pageable copies cost a decode step tens of microseconds each).
template <class T>
class DeviceArray {
 public:
  DeviceArray() = default;
  explicit DeviceArray(size_t n) { resize(n); }
  ~DeviceArray() {
    cudaFree(p_);
    cudaFreeHost(host_);
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  DeviceArray(DeviceArray&& o) noexcept { swap(o); }
  DeviceArray& operator=(DeviceArray&& o) noexcept {
    swap(o);
    return *this;
  }
  // Grows (contents not kept); true when the memory moved.
  bool resize(size_t n) {
    if (n <= n_ && p_) return false;
    cudaFree(p_);
    p_ = nullptr;
    check(cudaMalloc(&p_, std::max<size_t>(n, 1) * sizeof(T)), "cudaMalloc");
    n_ = n;
    return true;
  }
  // The host data must stay unchanged only until the call returns; the stream is not synchronised.
  bool upload(const T* src, size_t n, cudaStream_t s) {
    const bool moved = resize(n);
    if (n) std::memcpy(mirror(n), src, n * sizeof(T));
    upload_staged(n, s);
    return moved;
  }
  // The pinned mirror of the first n elements, to fill before upload_staged.
  T* staging(size_t n) { return mirror(n); }
  void upload_staged(size_t n, cudaStream_t s) {
    if (n) check(cudaMemcpyAsync(p_, host_, n * sizeof(T), cudaMemcpyHostToDevice, s), "upload");
  }
  bool upload(const std::vector<T>& v, cudaStream_t s) { return upload(v.data(), v.size(), s); }
  // Starts copying the first n elements back; they are valid once the stream is synchronised.
  const T* download(size_t n, cudaStream_t s) {
    T* h = mirror(n);
    if (n) check(cudaMemcpyAsync(h, p_, n * sizeof(T), cudaMemcpyDeviceToHost, s), "download");
    return h;
  }
  T* get() const { return p_; }
  size_t size() const { return n_; }

 private:
  T* mirror(size_t n) {  // callers synchronise the stream between transfers
    if (n > host_n_ || !host_) {
      cudaFreeHost(host_);
      host_ = nullptr;
      check(cudaMallocHost(&host_, std::max<size_t>(n, 1) * sizeof(T)), "cudaMallocHost");
      host_n_ = n;
    }
    return host_;
  }
  void swap(DeviceArray& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    std::swap(host_, o.host_);
    std::swap(host_n_, o.host_n_);
  }
  T* p_ = nullptr;
  size_t n_ = 0;
  T* host_ = nullptr;
  size_t host_n_ = 0;
};

}  // namespace mp::cuda
