#!/usr/bin/env bash
# Builds Multipole and runs every test: the release build (CUDA backend compiled where nvcc
# exists; its tests skip without a GPU) and a 60 s soak of the server, then the tests again under
# ASan + UBSan, then a short run of every libFuzzer target (clang, ASan + UBSan) over its seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
jobs=$(nproc)
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DMULTIPOLE_TESTS=ON
cmake --build build -j "$jobs"
(cd build && ctest -j "$jobs" --output-on-failure --timeout 600)
# Soak (issue 14): 60 s at 80 % of the server's measured capacity, cancellations and bad requests
# mixed in; fails on a 5xx other than 503, a wrong answer, a dead server or RSS drifting > 5 %.
/usr/bin/python3 bench/soak.py --server build/server/multipole-server --model models/default.gguf \
  --slots 4 --duration 70 --max-tokens 16
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMULTIPOLE_SANITIZE=ON -DMULTIPOLE_CUDA=OFF
cmake --build build-asan -j "$jobs"
(cd build-asan && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest -j "$jobs" --output-on-failure --timeout 900)
CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DMULTIPOLE_FUZZ=ON -DMULTIPOLE_CUDA=OFF
cmake --build build-fuzz -j "$jobs" --target multipole_fuzz
bash tests/fuzz/run.sh build-fuzz 10
