#!/usr/bin/env bash
# On the GPU machine: unpacks what scripts/gpu_bundle.sh packed (.carry/gpu/bin, .carry/gpu/lib).
set -euo pipefail
cd "$(dirname "$0")/.."
tar -C .carry/gpu -xJf .carry/gpu/bundle.tar.xz
