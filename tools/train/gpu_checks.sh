#!/usr/bin/env bash
# First in every GPU training call (run from tools/train): the PyTorch FMA against its per-query
# version, the further test files named (gpu_lease.sh: test_trainer.py, the trainer's data,
# checkpoints and resumption on the CPU and the GPU, about 2 minutes), and the GPU's name.
# usage: gpu_checks.sh [TEST_FILE.py ...]
set -euo pipefail
for t in test_fma_model.py "$@"; do
  python3 "$t" 2>&1 | tail -n 3
done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
