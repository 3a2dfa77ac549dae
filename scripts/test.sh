#!/usr/bin/env bash
# Builds Multipole and runs every test: the release build (CUDA backend compiled where nvcc
# exists; its tests skip without a GPU), then the tests again under ASan + UBSan, then a short run
# of every libFuzzer target (clang, ASan + UBSan) over its seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
jobs=$(nproc)
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DMULTIPOLE_TESTS=ON
cmake --build build -j "$jobs"
(cd build && ctest -j "$jobs" --output-on-failure --timeout 600)
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMULTIPOLE_SANITIZE=ON -DMULTIPOLE_CUDA=OFF
cmake --build build-asan -j "$jobs"
(cd build-asan && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest -j "$jobs" --output-on-failure --timeout 900)
CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DMULTIPOLE_FUZZ=ON -DMULTIPOLE_CUDA=OFF
cmake --build build-fuzz -j "$jobs" --target multipole_fuzz
bash tests/fuzz/run.sh build-fuzz 12
