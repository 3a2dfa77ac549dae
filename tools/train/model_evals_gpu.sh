#!/usr/bin/env bash
# The evaluations of a trained full model (issue 12) in one call of the GPU machine: converts its
# bf16 Hugging Face folder to bf16 and Q8_0 GGUFs, then (each step capped in time, so one slow step
# leaves the others' results) evaluate.py (perplexity at 512 and 8192, by position, the parity
# sample), the long-range evaluations through the engine on CUDA (multipole-evals), Q8_0 against
# bf16 (perplexity on the first 65,536 validation ids, decode speed at batch 1 and 256) and the
# prompt table. Results in OUT: eval_NAME.json, evals_NAME.{md,json}, results_NAME.md.
# usage (repository root, GPU machine, .carry/gpu carried): model_evals_gpu.sh HF CORPUS OUT NAME
#   HF: train.py's OUT/hf (config.json, model.safetensors; tokenizer.model is taken from CORPUS)
#   CORPUS: shards.json, val.u16.xz, val_docs.json, tokenizer.model and val.txt (or val.txt.xz);
#   outside.txt (or .xz): also the by-position table on it
#   VAL_IDS: validation ids for the engine's perplexities (default 65,536); COMPARE: another
#   GGUF scored beside this model at contexts 512 and 8192 on them
#   BACKEND=cpu, DEVICE=cpu (evaluate.py) and GPU_BUNDLE=a folder whose bin/ holds a CPU build's
#   tools check the script on a CPU with a tiny model (no bench_cuda then; EVAL_ARGS: options
#   appended to multipole-evals', which override its defaults)
#   GPU_BUNDLE: where scripts/gpu_bundle.sh's bin/ and lib/ are unpacked (default: .carry/gpu,
#   unpacked here; a folder outside the tree lets an earlier call of the lease carry the bundle)
set -uo pipefail
hf=$(realpath "$1") data=$(realpath "$2") out=$(realpath "$3") name=$4
root=$(pwd) work=/tmp/evals_$4 gpu=${GPU_BUNDLE:-$(pwd)/.carry/gpu} backend=${BACKEND:-cuda}
export PYTHONUNBUFFERED=1
[ -n "${GPU_BUNDLE:-}" ] || bash scripts/gpu_unpack.sh || exit
bin=$gpu/bin
export LD_LIBRARY_PATH=$gpu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
mkdir -p "$out" "$work"
[ -f "$data/val.txt" ] || xz -dkc "$data/val.txt.xz" > "$data/val.txt"
cp -n "$data/tokenizer.model" "$hf/"
results=$out/results_$name.md

step() {  # SECONDS COMMAND...: runs it, its output into the results, whatever its end
  local limit=$1 start rc
  shift
  start=$(date +%s)
  echo "## \`${*#"$root"/}\`" >> "$results"
  timeout "$limit" "$@" 2>&1 | tee -a "$results"
  rc=${PIPESTATUS[0]}
  echo "($(($(date +%s) - start)) s, exit $rc)" | tee -a "$results"
}

nvidia-smi --query-gpu=name --format=csv,noheader 2>&1 | tee "$results"
for d in bf16 q8_0; do
  "$bin/multipole-convert" "$hf" "$work/$d.gguf" --dtype "$d" --force > /dev/null
done
ls -l "$work"/*.gguf | tee -a "$results"
cd tools/train || exit 1
step 200 python3 evaluate.py "$hf" "$data" "$out/eval_$name.json" --max-tokens 2000000 \
  --device "${DEVICE:-cuda}"
cd "$root" || exit 1
step 130 "$bin/multipole-evals" -m "$work/q8_0.gguf" --text "$data/val.txt" --backend "$backend" \
  --chunk 4096 --spans 8 --passages 8 --trials 10 --json-out "$out/evals_$name.json" ${EVAL_ARGS:-}
# The by-position table on the outside text (Austen's novels) too, when CORPUS has outside.txt
# (or .xz), for this model and COMPARE's: prose unlike the training text (docs/MODEL.md).
if [ -f "$data/outside.txt" ] || [ -f "$data/outside.txt.xz" ]; then
  [ -f "$data/outside.txt" ] || xz -dkc "$data/outside.txt.xz" > "$data/outside.txt"
  for m in "$work/q8_0.gguf" ${COMPARE:-}; do
    step 60 "$bin/multipole-evals" -m "$m" --text "$data/outside.txt" --backend "$backend" \
      --tasks position --contexts 0,128,512,1024,2048,4096,8192,16384 --spans 6 --chunk 4096
  done
fi
PYTHONPATH=tools/train python3 -c "import sys; from corpus import load_val
open(sys.argv[2], 'w').write(' '.join(map(str, load_val(sys.argv[1])[0][:int(sys.argv[3])])))" \
  "$data" "$work/val_ids.txt" "${VAL_IDS:-65536}"
perplexity() {  # SECONDS MODEL CONTEXT: the engine's perplexity on those ids
  step "$1" "$bin/multipole-perplexity" -m "$2" --ids --ctx "$3" --backend "$backend" \
    "$work/val_ids.txt"
}
for d in bf16 q8_0; do perplexity 40 "$work/$d.gguf" 8192; done
# COMPARE=OTHER.gguf: both models through the engine at contexts 512 and 8192 on the same ids
# (the FMA model against its twin at equal tokens, issue 12); this one's 8192 is above.
if [ -n "${COMPARE:-}" ]; then
  perplexity 60 "$work/q8_0.gguf" 512
  for ctx in 512 8192; do perplexity 60 "$COMPARE" $ctx; done
fi
[ "$backend" = cuda ] || exit 0
step 50 "$bin/bench_cuda" "$work/q8_0.gguf" --decode 1,256 --baseline "$work/bf16.gguf"
step 40 "$bin/bench_cuda" "$work/q8_0.gguf" --prompts
