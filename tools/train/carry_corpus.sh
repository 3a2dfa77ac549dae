#!/usr/bin/env bash
# Groups a corpus folder (prepare_corpus2.py's output) into folders for the device tool's carry,
# each under MAX_BYTES (default 58 MB: the call's 64 MiB tree limit with the source tree beside
# it, docs/MODEL.md): DEST/c3a (shards.json, tokenizer.model, val_docs.json and the first
# shards), c3b, ... with the rest of the shards, the last of them also val.u16.xz and val.txt.xz
# (multipole-evals' text, xz-compressed: unpack it on the GPU machine). Each folder is one
# gpu_lease.sh call's CORPUS; the last one goes with the call that starts training.
# usage: tools/train/carry_corpus.sh CORPUS DEST [MAX_BYTES]
set -euo pipefail
corpus=$1 dest=$2 max=${3:-58000000}
letters=(a b c d e f g h i j k l m n o p)
rm -rf "$dest"/c3? && mkdir -p "$dest/c3a"
cp "$corpus"/shards.json "$corpus"/tokenizer.model "$corpus"/val_docs.json "$dest/c3a/"
i=0 size=$(du -cb "$dest"/c3a/* | tail -n 1 | cut -f1)
for f in "$corpus"/train-*.u16.xz; do
  s=$(stat -c %s "$f")
  if [ $((size + s)) -gt "$max" ]; then
    i=$((i + 1)) size=0
    mkdir -p "$dest/c3${letters[$i]}"
  fi
  cp "$f" "$dest/c3${letters[$i]}/"
  size=$((size + s))
done
xz -T2 -6 -c "$corpus/val.txt" > "$dest/val.txt.xz"
s=$(( $(stat -c %s "$corpus/val.u16.xz") + $(stat -c %s "$dest/val.txt.xz") ))
[ $((size + s)) -le "$max" ] || { i=$((i + 1)); mkdir -p "$dest/c3${letters[$i]}"; }
cp "$corpus/val.u16.xz" "$dest/c3${letters[$i]}/"
mv "$dest/val.txt.xz" "$dest/c3${letters[$i]}/"
du -sh "$dest"/c3?
