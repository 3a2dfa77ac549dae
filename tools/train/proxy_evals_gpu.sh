#!/usr/bin/env bash
# On the GPU machine, after gpu_lease.sh's proxy runs (docs/MODEL.md, "Content-chosen
# summaries"): evaluate.py on each model's Hugging Face folder (LEASE_DIR/MODEL/hf) at once, model
# i on GPU i mod the GPUs, then proxy_table.py's verdict over those that finished. Results in OUT:
# eval_MODEL.json and .log, proxies.md. The verdict's measures only (the windowed perplexities and
# the same-text buckets over SAME_TEXT_DOCS documents, not the whole documents'): on one H200 the
# whole evaluation of two models side by side took more than 4 minutes (session 18).
# usage (repository root): tools/train/proxy_evals_gpu.sh CORPUS OUT MODEL...
#   CORPUS: evaluate.py's data (shards.json, val.u16.xz, val_docs.json)
#   LEASE_DIR (default /tmp/lease), MAX_TOKENS (default 1000000), SAME_TEXT_DOCS (default 48),
#   DEVICE (default cuda)
set -euo pipefail
corpus=$(realpath "$1") out=$(realpath -m "$2")
shift 2
work=${LEASE_DIR:-/tmp/lease}
mkdir -p "$out"
ngpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
cd tools/train
pids=() i=0
for m in "$@"; do
  (if [ "$ngpus" -gt 0 ]; then export CUDA_VISIBLE_DEVICES=$((i % ngpus)); fi
   exec python3 evaluate.py "$work/$m/hf" "$corpus" "$out/eval_$m.json" \
     --max-tokens "${MAX_TOKENS:-1000000}" --same-text-docs "${SAME_TEXT_DOCS:-48}" \
     --no-whole-docs --device "${DEVICE:-cuda}") > "$out/eval_$m.log" 2>&1 &
  pids+=($!)
  i=$((i + 1))
done
rows=() rc=0 i=0
for m in "$@"; do
  if wait "${pids[$i]}"; then
    rows+=("$m=$out/eval_$m.json")
  else
    echo "proxy_evals: evaluate.py failed on $m (its log: $out/eval_$m.log)" >&2
    rc=1
  fi
  i=$((i + 1))
done
[ ${#rows[@]} -eq 0 ] || python3 proxy_table.py "${rows[@]}" | tee "$out/proxies.md"
exit $rc
