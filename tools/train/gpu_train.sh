#!/usr/bin/env bash
# The whole training job for one GPU call (the device machine keeps nothing between calls):
# the reference tests, both models (FMA and its exact-attention twin) trained side by side in two
# pieces that each resume the last checkpoint, the evaluation of both, and the FMA model's
# Hugging Face folder, split in pieces small enough to come back.
# usage (repository root, GPU machine): tools/train/gpu_train.sh DATA_DIR OUT_DIR PIECE_MINUTES
# FMA_ARGS (environment) goes to the FMA model's train.py, e.g. "--downsampling avgpool --rank 4";
# SEED (default 0) to both: it fixes the initialisation and the order of the training windows;
# STEPS, when set, fixes both plans' length in steps (the same tokens for both) instead of in time.
# RESUME=1 continues the runs left in /tmp by the previous call, when the machine was still warm
# (see docs/MODEL.md); otherwise they start afresh.
set -euo pipefail
data=$(realpath "$1") out=$2 piece=${3:-3.4}
[ -n "${RESUME:-}" ] || rm -rf /tmp/fma /tmp/exact
export PYTHONUNBUFFERED=1
cd tools/train
bash gpu_checks.sh
# Each piece loses about 40 s to start-up and saving.
plan=$(python3 -c "print(2 * ($piece - 0.7))")
both=(--data "$data" --minutes "$piece" --plan-minutes "$plan" --seed "${SEED:-0}"
      ${STEPS:+--plan-steps "$STEPS"})
for final in "" --final; do
  python3 train.py "${both[@]}" --out /tmp/fma $final ${FMA_ARGS:-} &
  python3 train.py "${both[@]}" --out /tmp/exact --exact $final &
  wait
  tail -n 3 /tmp/fma/train.log /tmp/exact/train.log
done
for m in fma exact; do  # side by side, as they trained
  if [ -d /tmp/$m/hf ]; then python3 evaluate.py /tmp/$m/hf "$data" "$out/eval_$m.json" > /tmp/eval_$m.txt & fi
  cp /tmp/$m/train.log "$out/train_$m.log"
done
wait
cat /tmp/eval_*.txt
(cd /tmp/fma/hf && split -b 15M -d model.safetensors "$out/fma_safetensors.part" && cp config.json "$out/fma_config.json")
ls -la "$out"
