#!/usr/bin/env bash
# Builds the CUDA binaries here and packs them, with the shared libraries the GPU machine lacks,
# into DEST/bundle.tar.xz (default .carry/gpu) for the device tool's `carry` (the GPU scripts
# unpack it with scripts/gpu_unpack.sh). xz keeps the ~6 MB of device code each binary holds down
# to about 1 MB, so that the carried tree stays well under the device tool's 64 MiB next to the
# default model.
# BUILD_DIR (default build-cuda) is the CMake build folder to use; DEST another folder for a
# branch's bundle beside main's.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD_DIR:-build-cuda}
# BINS (default: all of them) names fewer, for a quicker kernel check.
default_bins="tests/multipole_gpu_tests bench/bench_cuda bench/bench_multigpu bench/loadgen
  server/multipole-server tools/multipole-generate tools/multipole-perplexity tools/multipole-convert
  tools/multipole-evals"
read -r -d '' -a bins <<< "${BINS:-$default_bins}" || true

cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMULTIPOLE_CUDA=ON >/dev/null
cmake --build "$build" --target "${bins[@]##*/}"
stage=$(mktemp -d)
mkdir -p "$stage/bin" "$stage/lib"
for b in "${bins[@]}"; do cp "$build/$b" "$stage/bin/"; done
strip "$stage"/bin/*
bash scripts/source_hash.sh > "$stage/SOURCE_HASH"  # checked by scripts/gpu_unpack.sh
# Only the libraries these binaries load (a kernel check's two binaries need neither TLS nor
# Redis: two bundles then fit one call's tree beside the model).
needed=$(ldd "$stage"/bin/* | awk '{print $1}' | sort -u)
for lib in libsentencepiece.so.0 libgomp.so.1 libcpp-httplib.so.0.11 libssl.so.3 libcrypto.so.3 \
           libbrotlidec.so.1 libbrotlienc.so.1 libbrotlicommon.so.1 libhiredis.so.0.14; do
  if grep -qx "$lib" <<< "$needed"; then cp -L "/lib/x86_64-linux-gnu/$lib" "$stage/lib/"; fi
done
dest=${DEST:-.carry/gpu}
rm -rf "$dest" && mkdir -p "$dest"
tar -C "$stage" -cf - . | xz -T2 -6 > "$dest/bundle.tar.xz"
rm -rf "$stage"
du -sh "$dest"
