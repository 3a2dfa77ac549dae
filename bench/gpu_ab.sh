#!/usr/bin/env bash
# Two builds measured against each other on one GPU in one call: bench_cuda of bundle A and of
# bundle B run alternately (A B A B ...), so that the machine and its state are the same for both
# (the machines of a lease differ by a few percent, more than most kernel changes: session 22's
# batch-1 figures). Each run's output is kept; the rows of bench_cuda's last table are printed
# with their bundle and round.
# usage (repository root, GPU machine): bench/gpu_ab.sh OUT BUNDLE_A BUNDLE_B ROUNDS ARGS...
#   BUNDLE_A/B: scripts/gpu_bundle.sh's DEST folders (e.g. .carry/gpu and .carry/gpunext; the
#   second may come from another tree: its source hash is not checked); ARGS: bench_cuda's, after
#   the model (e.g. models/default.gguf --decode 1,256).
set -euo pipefail
out=$1 a=$2 b=$3 rounds=$4
shift 4
mkdir -p "$out"
for bundle in "$a" "$b"; do ALLOW_OTHER_SOURCES=1 bash scripts/gpu_unpack.sh "$bundle"; done
for ((i = 1; i <= rounds; ++i)); do
  for side in A B; do
    bundle=$a
    [ "$side" = B ] && bundle=$b
    log=$out/$side$i.md
    LD_LIBRARY_PATH=$bundle/lib:/usr/local/cuda/lib64 "$bundle/bin/bench_cuda" "$@" > "$log" 2>&1 ||
      echo "$side round $i: bench_cuda rc $?"
    # The last table's rows (bench_cuda prints its summary table last).
    tac "$log" | awk '/^\|/ {if (!done) print; seen = 1; next} seen {done = 1}' | tac | sed "s/^/$side$i /"
  done
done
