#!/usr/bin/env bash
# Random checkpoint -> multipole-convert -> multipole-perplexity --nll-out, compared with an
# independent implementation to 1e-4 absolute per token: fma_reference.py (NumPy, FMA and exact)
# or llama_reference.py (PyTorch, Hugging Face's Llama). Options after `--` go to multipole-convert
# and to the reference (the --fma conversion options).
# usage: [THREADS=N] crosscheck.sh BUILD_DIR PYTHON REFERENCE.py [make-test-checkpoint options...] [-- convert options...]
set -euo pipefail
build=$1 python=$2 reference=$3
shift 3
here=$(cd "$(dirname "$0")" && pwd)
checkpoint=() convert=()
while (($#)); do
  if [[ $1 == -- ]]; then shift; convert=("$@"); break; fi
  checkpoint+=("$1"); shift
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$build/tests/make-test-checkpoint" "$work/hf" "${checkpoint[@]}"
"$build/tools/multipole-convert" "$work/hf" "$work/model.gguf" --dtype f32 "${convert[@]}" 2>/dev/null
# 3x the trained length (n = 64 unless --n or --trained-length says otherwise), fixed pseudo-random ids.
n=64
args=("${checkpoint[@]}" "${convert[@]}")
for ((i = 0; i < ${#args[@]}; i++)); do [[ ${args[i]} == --n || ${args[i]} == --trained-length ]] && n=${args[i + 1]}; done
"$python" -c "import random; random.seed(7); print(' '.join(str(random.randrange(3, 400)) for _ in range(3 * $n)))" > "$work/ids.txt"
"$build/tools/multipole-perplexity" --model "$work/model.gguf" --ids --chunk 37 --threads "${THREADS:-2}" \
  --nll-out "$work/engine.json" "$work/ids.txt"
"$python" "$here/$reference" "$work/hf" "$work/ids.txt" "${convert[@]}" > "$work/reference.json"
"$python" - "$work/engine.json" "$work/reference.json" <<'PY'
import json, sys
a, b = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
assert len(a) == len(b), (len(a), len(b))
err = max(abs(x - y) for x, y in zip(a, b))
print(f"{len(a)} tokens, max |NLL engine - NLL reference| = {err:.2e}")
sys.exit(0 if err <= 1e-4 else 1)
PY
