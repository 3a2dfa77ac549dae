#!/usr/bin/env bash
# Builds the CUDA test and benchmark binaries here and gathers them, with the shared libraries the
# GPU machine lacks, in .carry/gpu for the device tool's `carry`. Each binary holds the whole
# library's device code (~6 MB): the tools (generate, perplexity) come only with BUNDLE_TOOLS=1, so
# that the carried tree stays well under the device tool's 64 MiB next to the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bins=(tests/multipole_gpu_tests bench/bench_cuda)
[ -n "${BUNDLE_TOOLS:-}" ] && bins+=(tools/multipole-generate tools/multipole-perplexity)
cmake -S . -B build-cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DMULTIPOLE_CUDA=ON >/dev/null
cmake --build build-cuda --target "${bins[@]##*/}"
rm -rf .carry/gpu && mkdir -p .carry/gpu/bin .carry/gpu/lib
for b in "${bins[@]}"; do cp "build-cuda/$b" .carry/gpu/bin/; done
strip .carry/gpu/bin/*
cp -L /lib/x86_64-linux-gnu/libsentencepiece.so.0 /lib/x86_64-linux-gnu/libgomp.so.1 .carry/gpu/lib/
du -sh .carry/gpu
