#!/usr/bin/env bash
# The long-range evaluations (multipole-evals; docs/MODEL.md, "Long-range evaluations") of the
# shipped FMA model and of its exact-attention twin, in one GPU call (about 8 minutes): trains the
# twin as the model card's twin was trained (exact attention, seed 1, a plan of 1675 steps of
# 8 x 8192 tokens: the shipped model's windows in the same order) on the shipped model's token
# streams, converts it to a bf16 GGUF, and runs the same evaluations on models/default.gguf and
# on the twin with the engine's CUDA backend.
# usage (repository root, GPU machine): tools/train/long_evals_gpu.sh DATA OUT_DIR
#   DATA: prepare_corpus.py's output in the shipped model's tokenization
#     (/usr/bin/python3 tools/train/prepare_corpus.py build/corpus/raw DIR models/default.gguf),
#     train.bin val.bin val_docs.json tokenizer.model val.txt, as a folder or as a .tar.xz of
#     them (12 MB instead of 37: with the shipped model in the tree, the folder would not fit in
#     the 64 MiB the device tool carries)
#   the CUDA binaries: .carry/gpu/bundle.tar.xz (scripts/gpu_bundle.sh), or MULTIPOLE_BIN=DIR
# STEPS (default 1675) changes the twin's plan; TWIN=HF_DIR evaluates that folder instead of
# training one; EVAL_ARGS go to multipole-evals after the defaults below. TINY=1 DEVICE=cpu runs
# the same steps at toy size on the CPU (a check of the script: a tiny twin, short evaluations).
set -euo pipefail
data=$(realpath "$1") out=$(realpath "$2")
root=$(pwd) work=${WORK:-/tmp/twin}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
if [ -f "$data" ]; then
  rm -rf /tmp/evals_data && mkdir -p /tmp/evals_data && tar -C /tmp/evals_data -xJf "$data"
  data=/tmp/evals_data
fi
bin=${MULTIPOLE_BIN:-$root/.carry/gpu/bin}
[ -n "${MULTIPOLE_BIN:-}" ] || bash "$root/scripts/gpu_unpack.sh" || exit
export LD_LIBRARY_PATH=$root/.carry/gpu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
for f in "$bin/multipole-evals" "$bin/multipole-convert" "$data/val.txt" "$data/train.bin" models/default.gguf; do
  [ -e "$f" ] || { echo "missing: $f" >&2; exit 1; }
done
dev=${DEVICE:-cuda}
train=(--plan-steps "${STEPS:-1675}" --minutes 6.2)
evals=(--text "$data/val.txt" --backend "$dev" --chunk 4096 --spans 8 --passages 8 --trials 10)
contexts=512,8192
if [ -n "${TINY:-}" ]; then
  train=(--tiny --plan-steps 3 --batch 2 --warmup 1)
  # shellcheck disable=SC2054 # the commas are inside values
  evals=(--text "$data/val.txt" --backend "$dev" --contexts 0,40,300 --span 32 --spans 1
         --passage 16 --gaps 8,64 --passages 1 --passkey-contexts 300 --depths 0,1 --trials 1)
  contexts=32,64
else
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi

# 1. The twin, alone on the GPU (the card's twin shared it with the FMA model: same steps and
# windows, less time).
twin=${TWIN:-}
if [ -z "$twin" ]; then
  rm -rf "$work"
  (cd tools/train && python3 train.py --data "$data" --out "$work" --exact --seed 1 \
     --device "$dev" --final "${train[@]}")
  tail -n 3 "$work/train.log"
  cp "$work/train.log" "$out/train_twin.log"
  twin=$work/hf
fi
"$bin/multipole-convert" "$twin" "$work.gguf" --dtype bf16 --force 2>&1 | tail -n 1
# Its perplexity on the validation split, as the card measures it (a check of the training).
(cd tools/train && python3 evaluate.py "$twin" "$data" "$out/eval_twin.json" --device "$dev" \
   --contexts $contexts --parity-tokens 256 | grep ppl_ctx)

# 2. The same evaluations on both models, one after the other.
# shellcheck disable=SC2206 # EVAL_ARGS is words
evals+=(${EVAL_ARGS:-})
for m in "fma:models/default.gguf" "twin:$work.gguf"; do
  name=${m%%:*}
  start=$(date +%s)
  "$bin/multipole-evals" -m "${m#*:}" "${evals[@]}" --json-out "$out/evals_$name.json" \
    > "$out/evals_$name.md"
  echo "$name: $(($(date +%s) - start)) s"
done
for name in fma twin; do echo "# $name"; cat "$out/evals_$name.md"; done | tee "$out/results.md"
ls -la "$out"
