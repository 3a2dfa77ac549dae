#!/usr/bin/env bash
# Prints a hash of the sources the binaries are built from (the C++, CUDA and CMake files), so
# that a bundle (scripts/gpu_bundle.sh) records which sources it was built from and
# scripts/gpu_unpack.sh refuses one built from other sources than the carried tree's: a stale
# bundle once measured the code before a change as if it were the change.
# usage: source_hash.sh [TREE] (default: this repository)
set -euo pipefail
export LC_ALL=C  # the files' order, the same on every machine
cd "${1:-$(dirname "$0")/..}"
find CMakeLists.txt engine kernels server tools tests bench -type f \
  \( -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name '*.inc' \
     -o -name CMakeLists.txt \) -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
