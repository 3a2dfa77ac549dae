#!/usr/bin/env bash
# How the BLAS-like libraries Debian packages do on this machine's CPU backend shapes (the default
# model's: T = 512 rows, K x N of its projections and LM head), GFLOP/s, median of 7: the
# measurement behind the choice of oneDNN (docs/PERF.md, "CPU"). Needs, beside deps.sh's
# packages: libopenblas-openmp-dev libblis-openmp-dev. usage: bench/gemm_libraries.sh [THREADS]
set -euo pipefail
threads=${1:-2}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/gemm.cpp" <<'CPP'
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#ifdef USE_DNNL
#include <oneapi/dnnl/dnnl.h>
#else
#include <cblas.h>
#endif
int main(int, char** argv) {
  const int T = 512, shapes[][2] = {{384, 640}, {384, 2048}, {1024, 384}, {384, 384}, {384, 8192}};
  std::printf("| %s |", argv[1]);
  for (auto [K, N] : shapes) {
    std::vector<float> x(size_t(T) * K), w(size_t(N) * K), y(size_t(T) * N);
    for (auto& v : x) v = std::rand() / float(RAND_MAX) - 0.5f;
    for (auto& v : w) v = std::rand() / float(RAND_MAX) - 0.5f;
    auto run = [&] {
#ifdef USE_DNNL
      dnnl_sgemm('N', 'T', T, N, K, 1.f, x.data(), K, w.data(), K, 0.f, y.data(), N);
#else
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, N, K, 1.f, x.data(), K, w.data(), K,
                  0.f, y.data(), N);
#endif
    };
    run();
    std::vector<double> gflops;
    for (int r = 0; r < 7; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      int it = 0;
      double s;
      do {
        run();
        ++it;
        s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      } while (s < 0.1);
      gflops.push_back(2.0 * T * K * N * it / s / 1e9);
    }
    std::sort(gflops.begin(), gflops.end());
    std::printf(" %.0f |", gflops[3]);
  }
  std::printf("\n");
}
CPP
lib=/usr/lib/x86_64-linux-gnu inc=/usr/include/x86_64-linux-gnu
g++ -O2 -DUSE_DNNL "$work/gemm.cpp" -o "$work/onednn" -ldnnl
g++ -O2 "$work/gemm.cpp" -o "$work/openblas" -I$inc/openblas-openmp -L$lib/openblas-openmp \
  -Wl,-rpath,$lib/openblas-openmp -lopenblas
g++ -O2 "$work/gemm.cpp" -o "$work/blis" -I$inc/blis-openmp -L$lib/blis-openmp \
  -Wl,-rpath,$lib/blis-openmp -lblis
echo "GFLOP/s, T = 512, $threads threads; columns K x N"
echo "| library | 384 x 640 (q,k,v) | 384 x 2048 (gate,up) | 1024 x 384 (down) | 384 x 384 (o) | 384 x 8192 (head) |"
echo "|---|---|---|---|---|---|"
export OMP_NUM_THREADS=$threads
"$work/onednn" "oneDNN $(dpkg-query -W -f='${Version}' libdnnl2) dnnl_sgemm"
"$work/openblas" "OpenBLAS $(dpkg-query -W -f='${Version}' libopenblas0-openmp) ($(OPENBLAS_VERBOSE=2 "$work/openblas" x 2>&1 >/dev/null | sed -n 's/Core: //p') kernels)"
OPENBLAS_CORETYPE=SkylakeX "$work/openblas" "OpenBLAS, OPENBLAS_CORETYPE=SkylakeX"
"$work/blis" "BLIS $(dpkg-query -W -f='${Version}' libblis4-openmp)"
