#!/usr/bin/env bash
# Issue 15 on a lent multi-GPU machine (nvidia-h200-x2 or larger), in one call: the CUDA tests
# (the replica and tensor-parallel tests use GPUs 0 and 1 there; on one GPU they run their
# one-GPU halves), bench_multigpu for replicas (decode tokens/s on GPU 0 alone against all GPUs
# at the same batch per GPU, target >= 1.9x on 2: each GPU stepped by its own thread as the
# scheduler's step loops do, and all in one common step; then one process per GPU at once, the
# ceiling) and for tensor parallelism over 2 GPUs (decode and prefill against one GPU), then
# multipole-server with --devices 0 against --devices all under bench/loadgen (a step loop per
# GPU). Binaries come from scripts/gpu_bundle.sh (carried in .carry/gpu); NCCL is PyTorch's
# (loaded at run time). Results go to $OUT.
# BATCHES (default "64 256"): batches per GPU; SKIP_TESTS=1, SKIP_TP=1, SKIP_SERVER=1 skip those
# parts.
set -uo pipefail
# NCCL for tensor parallelism: the PyTorch wheel's nvidia/nccl/lib (libnccl.so.2).
nccl=$(python3 -c 'import nvidia.nccl as n, os; print(os.path.join(list(n.__path__)[0], "lib"))' \
       2>/dev/null) && export LD_LIBRARY_PATH=$nccl:${LD_LIBRARY_PATH:-}
echo "NCCL: ${nccl:-not found (tensor-parallel runs will fail)}"
source scripts/gpu_env.sh
gpus=$(nvidia-smi -L | wc -l)
for batch in ${BATCHES:-64 256}; do
  "$bin/bench_multigpu" models/default.gguf --devices all --batch "$batch" 2>&1 \
    | tee -a "$out/bench_multigpu.md"
  # The ceiling for replicas: one process per GPU, nothing shared but the host.
  if [ "$gpus" -ge 2 ]; then
    for d in $(seq 0 $((gpus - 1))); do
      "$bin/bench_multigpu" models/default.gguf --devices $d --batch "$batch" > "$out/alone$d" 2>&1 &
    done
    wait
    grep -h '^| [0-9]' "$out"/alone* | awk -F'|' -v b="$batch" '{ s += $5 } END {
      printf "\nOne process per GPU at batch %d at once: %.0f tokens/s together\n", b, s }' \
      | tee -a "$out/bench_multigpu.md"
    rm -f "$out"/alone*
  fi
done
if [ "$gpus" -ge 2 ] && [ -z "${SKIP_TP:-}" ]; then
  for batch in 1 ${BATCHES:-64 256}; do
    timeout 300 "$bin/bench_multigpu" models/default.gguf --tensor-parallel 2 --batch "$batch" \
      2>&1 | tee -a "$out/bench_multigpu.md"
  done
fi
[ -n "${SKIP_SERVER:-}" ] && exit 0
# The server: 256 slots per GPU, as many streaming clients as slots.
port=8080
url=http://127.0.0.1:$port
for devices in 0 all; do
  n=$([ $devices = all ] && echo "$gpus" || echo 1)
  "$bin/multipole-server" -m models/default.gguf --backend cuda --devices $devices --slots 256 \
    --max-queue 4096 --port $port --quiet >> "$out/server.log" 2>&1 &
  server=$!
  for _ in $(seq 120); do curl -sf $url/health >/dev/null && break; sleep 0.5; done
  # Warm-up: CUDA graphs and cuBLAS's first calls are not what is measured.
  "$bin/loadgen" --clients $((256 * n)) --processes $((2 * n)) --max-tokens 16 --url $url >/dev/null
  echo "## multipole-server --devices $devices: $((256 * n)) streams x 1024 tokens" \
    | tee -a "$out/serve.md"
  timeout 240 "$bin/loadgen" --clients $((256 * n)) --processes $((2 * n)) --max-tokens 1024 \
    --url $url 2>&1 | tee -a "$out/serve.md"
  curl -s $url/metrics | grep -E "^multipole_(device_(tokens|busy_seconds|steps)_total|steps_total)" \
    | tee -a "$out/serve.md"
  kill $server; wait $server 2>/dev/null
done
