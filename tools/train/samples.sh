#!/usr/bin/env bash
# Issue 12's samples: the same 9 runs for every model (5 prompts, temperature 0.8 and no other
# filter or penalty, whatever the model recommends (general.sampling.*), fixed seeds, 700 tokens;
# options given after OUT_DIR replace these), each scored by the distinct 4-grams of its first
# 400 words (distinct_ngrams.py). Prints docs/MODEL.md's table; the texts (sample_I.txt) and what the
# generator printed besides (sample_I.log: its speed, or why it failed) stay in OUT_DIR.
# usage (repository root): tools/train/samples.sh MODEL OUT_DIR [multipole-generate options...]
#   GENERATE: the multipole-generate binary (default build-cpu/tools/multipole-generate)
set -euo pipefail
model=$1 out=$2
shift 2
generate=${GENERATE:-build-cpu/tools/multipole-generate}
mkdir -p "$out"
runs=(
  "3|Once upon a time, in a small village by the sea,"
  "3|It was the best of times"
  "3|The history of the printing press"
  "3|The Linux kernel is"
  "11|The committee met on Tuesday to discuss"
  "12|The committee met on Tuesday to discuss"
  "13|The committee met on Tuesday to discuss"
  "14|The committee met on Tuesday to discuss"
  "15|The committee met on Tuesday to discuss"
)
echo "| prompt | seed | words | distinct 4-grams |"
echo "|---|---|---|---|"
i=0
for run in "${runs[@]}"; do
  seed=${run%%|*} prompt=${run#*|}
  file=$out/sample_$i.txt
  "$generate" -m "$model" --temperature 0.8 --top-k 0 --top-p 1 --min-p 0 --repeat-penalty 1 \
    --seed "$seed" -n 700 \
    -p "$prompt" "$@" > "$file" 2> "${file%.txt}.log" || { cat "${file%.txt}.log" >&2; exit 1; }
  # "N words, distinct 4-grams X": fewer than 400 words when the text ended (end of sequence).
  read -r words _ _ _ score < <(python3 "$(dirname "$0")/distinct_ngrams.py" "$file")
  echo "| $prompt | $seed | $words | $score |"
  i=$((i + 1))
done
