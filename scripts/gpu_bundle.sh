#!/usr/bin/env bash
# Builds the CUDA test and benchmark binaries here and gathers them, with the shared libraries the
# GPU machine lacks, in .carry/gpu for the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build-cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DMULTIPOLE_CUDA=ON >/dev/null
cmake --build build-cuda --target multipole_gpu_tests bench_cuda multipole-generate multipole-perplexity
rm -rf .carry/gpu && mkdir -p .carry/gpu/bin .carry/gpu/lib
cp build-cuda/tests/multipole_gpu_tests build-cuda/bench/bench_cuda build-cuda/tools/multipole-generate \
   build-cuda/tools/multipole-perplexity .carry/gpu/bin/
strip .carry/gpu/bin/*
cp -L /lib/x86_64-linux-gnu/libsentencepiece.so.0 /lib/x86_64-linux-gnu/libgomp.so.1 .carry/gpu/lib/
du -sh .carry/gpu
