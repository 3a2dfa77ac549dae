#!/usr/bin/env bash
# Issue 12, items 1 and 2 on the GPU in one call: five FMA models of the shipped shape (6 layers,
# 384 hidden, n = 8192, m = 64, groupedconv, L = 6) trained side by side on the same plan (same
# seed, same windows in the same order, STEPS steps of 8 x 8192 tokens: equal tokens), differing
# only in the summaries: per-channel (today) or rotary key summaries (--rotary-summaries), rank
# p = 2 or p = 4, and per-level ranks 2,2,2,4,4,4 (p = 4 at the three coarse levels, w >= 512)
# with rotary summaries. Each is then evaluated (evaluate.py: perplexity at contexts 512 and 8192, by position on
# whole documents up to 32K, i.e. past the trained length, and by position on the same text), and
# OUT/results.md gets one table.
# usage (repository root, GPU machine): tools/train/summary_ablation_gpu.sh DATA_DIR OUT_DIR
# DATA_DIR as for gpu_train.sh (train.bin, val.bin, val_docs.json, tokenizer.model).
# STEPS (default 400) fixes the plan; MINUTES (default 6) caps the training, after which a run
# exports where it is (results.md then shows unequal steps).
set -euo pipefail
data=$(realpath "$1") out=$(realpath "$2")
steps=${STEPS:-400} minutes=${MINUTES:-6}
export PYTHONUNBUFFERED=1
cd tools/train
bash gpu_checks.sh
declare -A variant=([p2]="--rank 2" [p2_rotary]="--rank 2 --rotary-summaries"
                    [p4]="--rank 4" [p4_rotary]="--rank 4 --rotary-summaries"
                    [p2_4_rotary]="--ranks 2,2,2,4,4,4 --rotary-summaries")
for name in "${!variant[@]}"; do
  rm -rf "/tmp/ablation/$name"
  # shellcheck disable=SC2086 # the variant's flags are words
  python3 train.py --data "$data" --out "/tmp/ablation/$name" --seed 0 --plan-steps "$steps" \
    --minutes "$minutes" --final ${variant[$name]} &
done
wait
for name in "${!variant[@]}"; do
  cp "/tmp/ablation/$name/train.log" "$out/train_$name.log"
  python3 evaluate.py "/tmp/ablation/$name/hf" "$data" "$out/eval_$name.json" > "/tmp/ablation/eval_$name.txt" &
done
wait
python3 - "$out" /tmp/ablation <<'PY'
import json, os, sys
out, runs = sys.argv[1], sys.argv[2]
rows = ["| summaries | parameters | steps | tokens | ppl ctx 512 | ppl ctx 8192 | by position 0-512 / 512-2k / "
        "2k-8k / 8k-32k (past n) | same text 512-1k / 4k-8k |", "|---" * 8 + "|"]
for name in ("p2", "p2_rotary", "p4", "p4_rotary", "p2_4_rotary"):
    e = json.load(open(f"{out}/eval_{name}.json"))
    s = json.load(open(f"{runs}/{name}/done.json"))
    log = open(f"{runs}/{name}/train.log").read()
    params = log.split(": ", 1)[1].split(" parameters")[0]  # "fma: 18.79M parameters (...)"
    pos = " / ".join(f"{v:.2f}" for v in e["ppl_by_position"].values())
    same = e["ppl_by_position_same_text"]
    rows.append(f"| {name} | {params} | {s['step']} | {s['tokens'] / 1e6:.1f}M | {e['ppl_ctx512']:.2f} | "
                f"{e['ppl_ctx8192']:.2f} | {pos} | {same['512-1024']:.2f} / {same['4096-8192']:.2f} |")
open(os.path.join(out, "results.md"), "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
PY
