#!/usr/bin/env bash
# Builds Multipole and runs the main job: generate text with the shipped default model.
# Extra arguments go to multipole-generate (e.g. a prompt, -n 200, --temperature 0).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh engine  # no test packages (PyTorch is hundreds of MB)
# The build folder of scripts/test.sh, without the tests (they need GoogleTest, NumPy, PyTorch);
# only the tool is built.
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DMULTIPOLE_TESTS=OFF >/dev/null
cmake --build build -j "$(nproc)" --target multipole-generate >/dev/null
if [ $# -eq 0 ]; then set -- "Once upon a time"; fi
exec build/tools/multipole-generate --model models/default.gguf "$@"
