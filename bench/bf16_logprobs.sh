#!/usr/bin/env bash
# What the CPU backend's bf16 products (docs/PERF.md, "bf16 products") do to a model's
# log-probabilities: multipole-perplexity with them (the default where the CPU has AMX or
# AVX512-BF16) and with --cpu-fp32-products, on TEXT and on the cross-check tests' kind of input
# (3 x 8192 pseudo-random ids in 3..400, random.seed(7)); prints max and mean |delta NLL| per token
# and both perplexities. usage: bench/bf16_logprobs.sh BUILD_DIR MODEL.gguf TEXT [THREADS [FLAG]]
# FLAG: for the bf16 side, e.g. --cpu-bf16-activations (activations rounded once, not split).
set -euo pipefail
build=$1 model=$2 text=$3 threads=${4:-2} bf16_flag=${5:-}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -c "import random; random.seed(7); print(' '.join(str(random.randrange(3, 400)) for _ in range(3 * 8192)))" > "$work/ids.txt"
for input in text ids; do
  file=$text ids=()
  [[ $input == ids ]] && file=$work/ids.txt ids=(--ids)
  for path in bf16 fp32; do
    flag=()
    [[ $path == fp32 ]] && flag=(--cpu-fp32-products)
    [[ $path == bf16 && -n $bf16_flag ]] && flag=("$bf16_flag")
    "$build/tools/multipole-perplexity" -m "$model" --backend cpu --threads "$threads" --ctx 8192 \
      "${ids[@]}" "${flag[@]}" --nll-out "$work/$input.$path.json" "$file" >/dev/null 2>"$work/log"
    grep -o 'backend [^,]*([^)]*)[^,]*' "$work/log" | head -1 >&2
  done
  python3 - "$input" "$work/$input.bf16.json" "$work/$input.fp32.json" <<'PY'
import json, math, sys
a, b = json.load(open(sys.argv[2])), json.load(open(sys.argv[3]))
d = [abs(x - y) for x, y in zip(a, b)]
print(f"| {sys.argv[1]} | {len(d)} | {max(d):.2e} | {sum(d) / len(d):.2e} | "
      f"{math.exp(sum(a) / len(a)):.4f} | {math.exp(sum(b) / len(b)):.4f} |")
PY
done
