#!/usr/bin/env bash
# On the GPU machine: unpacks what scripts/gpu_bundle.sh packed (BUNDLE, default .carry/gpu: its
# bin/ and lib/) and checks that it was built from this tree's sources (scripts/source_hash.sh):
# exit 4 if not, unless ALLOW_OTHER_SOURCES=1 (a bundle kept for another tree on purpose).
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=${1:-.carry/gpu}
tar -C "$bundle" -xJf "$bundle/bundle.tar.xz"
built=$(cat "$bundle/SOURCE_HASH" 2>/dev/null || echo unknown) here=$(bash scripts/source_hash.sh)
if [ "$built" != "$here" ] && [ -z "${ALLOW_OTHER_SOURCES:-}" ]; then
  echo "gpu_unpack: $bundle was built from other sources ($built) than this tree's ($here):" \
    "pack it again (scripts/gpu_bundle.sh), or ALLOW_OTHER_SOURCES=1" >&2
  exit 4
fi
