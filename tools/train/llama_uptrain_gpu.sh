#!/usr/bin/env bash
# FMA on a pretrained Llama-architecture model, in one GPU call (about 7 minutes): pretrain a small
# exact-attention Llama (untied head, GQA; it stands for a pretrained checkpoint from elsewhere) and
# save it as a LlamaForCausalLM folder; evaluate it as it is (exact), with training-free avgpool
# summaries, and after uptraining groupedconv summaries (started as that avgpool) with the
# transformer frozen and with everything trained; write OUT/results.md and the evaluations.
# With the engine's binaries carried (.carry/gpu/bundle.tar.xz from scripts/gpu_bundle.sh, or
# MULTIPOLE_BIN=DIR holding multipole-convert and multipole-perplexity) the Llama folder is also converted
# the three ways and each GGUF scored by the engine on the parity sample, against PyTorch.
# usage (repository root): tools/train/llama_uptrain_gpu.sh DATA_DIR OUT_DIR
# TINY=1 DEVICE=cpu runs the same steps at toy size (the CPU test of the pipeline). Where
# transformers is installed it first writes OUT/golden-llama and OUT/golden-mistral
# (make_llama_golden.py), to be copied into tests/data.
set -euo pipefail
data=$(realpath "$1") out=$(realpath "$2")
root=$(pwd)
export PYTHONUNBUFFERED=1
dev=${DEVICE:-cuda}
m=64 p=4 ctx=2048 contexts=512,2048 parity=8192
pretrain=(--minutes 4.2 --plan-minutes 3.5 --batch 32)
uptrain=(--minutes 2.0 --plan-minutes 1.35 --batch 32 --warmup 30)
if [ -n "${TINY:-}" ]; then
  m=8 p=2 ctx=64 contexts=32,64 parity=256
  pretrain=(--tiny --plan-steps 4 --batch 2 --warmup 2)
  uptrain=(--plan-steps 3 --batch 2 --warmup 1)
fi
fma=(--block-size "$m" --rank "$p")
work=${WORK:-/tmp/llama_uptrain}
rm -rf "$work" && mkdir -p "$work" "$out"
cd tools/train
[ -n "${TINY:-}" ] || { python3 test_fma_model.py 2>&1 | tail -3; nvidia-smi --query-gpu=name --format=csv,noheader; }
common=(--data "$data" --device "$dev" --final)

# 0. Where transformers is installed: the golden fixtures of tests/data/golden-{llama,mistral}.
if [ -z "${TINY:-}" ]; then
  if python3 -c "import transformers" 2> /dev/null; then
    python3 make_llama_golden.py "$out" "$root/tests/data/tiny-spm.model" || echo "golden fixtures: FAILED"
  else
    echo "golden fixtures: transformers is not installed"
  fi
fi

# 1. The pretrained checkpoint.
python3 train.py "${common[@]}" --llama --context $ctx --out "$work/llama" "${pretrain[@]}"
tail -n 2 "$work/llama/train.log"
# 2. Uptraining side by side: summaries only (transformer frozen), and everything at a lower lr.
python3 train.py "${common[@]}" --init "$work/llama/hf" --downsampling groupedconv "${fma[@]}" \
  --freeze --lr 2e-3 --out "$work/frozen" "${uptrain[@]}" &
python3 train.py "${common[@]}" --init "$work/llama/hf" --downsampling groupedconv "${fma[@]}" \
  --lr 3e-4 --out "$work/full" "${uptrain[@]}" &
wait
tail -n 2 "$work/frozen/train.log" "$work/full/train.log"
cp "$work"/llama/train.log "$out/train_llama.log"
cp "$work"/frozen/train.log "$out/train_frozen.log"
cp "$work"/full/train.log "$out/train_full.log"
# 3. Evaluations, side by side.
ev=(--device "$dev" --contexts "$contexts" --parity-tokens "$parity")
python3 evaluate.py "$work/llama/hf" "$data" "$out/eval_exact.json" "${ev[@]}" > /dev/null &
python3 evaluate.py "$work/llama/hf" "$data" "$out/eval_avgpool.json" "${ev[@]}" --fma avgpool "${fma[@]}" > /dev/null &
python3 evaluate.py "$work/frozen/hf" "$data" "$out/eval_frozen.json" "${ev[@]}" > /dev/null &
python3 evaluate.py "$work/full/hf" "$data" "$out/eval_full.json" "${ev[@]}" > /dev/null &
wait
# 4. The table.
python3 - "$out" "$m" "$p" <<'PY' | tee "$out/results.md"
import json, os, sys
out, m, p = sys.argv[1], sys.argv[2], sys.argv[3]
rows = [("exact", "exact attention (the pretrained model as it is)"),
        ("avgpool", f"FMA avgpool, m = {m}, p = {p}, training-free"),
        ("frozen", f"FMA groupedconv m = {m}, p = {p}, uptrained, transformer frozen"),
        ("full", f"FMA groupedconv m = {m}, p = {p}, uptrained, all weights")]
evals = {k: json.load(open(os.path.join(out, f"eval_{k}.json"))) for k, _ in rows}
ctxs = [k for k in evals["exact"] if k.startswith("ppl_ctx")]
print("| model | " + " | ".join(f"perplexity, context {c[7:]}" for c in ctxs) + " |")
print("|---|" + "---|" * len(ctxs))
for k, label in rows:
    print(f"| {label} | " + " | ".join(f"{evals[k][c]:.2f}" for c in ctxs) + " |")
PY
# 5. The engine, where its binaries came along.
bin=${MULTIPOLE_BIN:-$root/.carry/gpu/bin}
[ -n "${MULTIPOLE_BIN:-}" ] || [ ! -f "$root/.carry/gpu/bundle.tar.xz" ] || bash "$root/scripts/gpu_unpack.sh" || exit
if [ -x "$bin/multipole-convert" ]; then
  export LD_LIBRARY_PATH=$root/.carry/gpu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  convert() { "$bin/multipole-convert" "$@" --dtype bf16 --force 2>&1 | tail -n 1; }
  convert "$work/llama/hf" "$work/exact.gguf"
  convert "$work/llama/hf" "$work/avgpool.gguf" --fma avgpool "${fma[@]}"
  convert "$work/llama/hf" "$work/groupedconv.gguf" --fma groupedconv "${fma[@]}"
  convert "$work/frozen/hf" "$work/frozen.gguf"
  # groupedconv as converted computes what avgpool does: scored against avgpool's PyTorch run.
  for pair in exact:exact avgpool:avgpool groupedconv:avgpool frozen:frozen; do
    echo "engine $pair: $(python3 engine_parity.py "$out/eval_${pair#*:}.json" "$work/${pair%:*}.gguf" "$bin" | tail -n 1)"
  done | tee "$out/engine.txt"
fi
# 6. The pretrained Llama folder in pieces small enough to come back.
(cd "$work/llama/hf" && split -b 15M -d model.safetensors "$out/llama_safetensors.part" && cp config.json "$out/llama_config.json")
ls -la "$out"
