#!/usr/bin/env bash
# The trainer's tests and the GPU's name, first in every GPU training call (run from tools/train):
# the PyTorch FMA against its per-query version, and the trainer's data, checkpoints and
# resumption (on the CPU, and on the GPU where there is one).
set -euo pipefail
python3 test_fma_model.py 2>&1 | tail -n 3
python3 test_trainer.py 2>&1 | tail -n 3
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
