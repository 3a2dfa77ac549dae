#!/usr/bin/env bash
# The serving benchmark in one GPU call (issue 10's numbers): bench_cuda's decode at batch 1 and
# 1024 as the baseline, then multipole-server on the same GPU under bench/serve.py's scenarios,
# then multipole-generate's speed over 50,000 tokens. Binaries come from scripts/gpu_bundle.sh
# (carried in .carry/gpu). Results go to $OUT. SKIP_TESTS=1 skips the CUDA tests, SKIP_GENERATE=1
# the generate run; PREFILL_BUDGETS="N M" runs the prefill scenario with each --prefill-per-step;
# STREAM_PROCESSES="2 4" the process counts of bench/loadgen (C++, epoll) for the 1,024 streams
# (equal totals show that it is not the bottleneck), PY_PROCESSES="8" those of serve.py (aiohttp)
# for the same load, STREAM_TOKENS their tokens each (default 512); SKIP_LONG=1 skips the one-stream
# runs. The server logs its steps (--log-steps) into $out/server.log.
set -uo pipefail
source scripts/gpu_env.sh
"$bin/bench_cuda" models/default.gguf --decode 1,1024 2>&1 | tee "$out/bench_decode.md"

port=8080
url=http://127.0.0.1:$port
start_server() {  # extra server options as arguments
  "$bin/multipole-server" -m models/default.gguf --backend cuda --slots 1024 --max-queue 4096 \
    --ctx-limit 200000 --port $port --quiet --log-steps "$@" >> "$out/server.log" 2>&1 &
  server=$!
  for _ in $(seq 120); do curl -sf $url/health >/dev/null && break; sleep 0.5; done
}
stop_server() { kill $server; wait $server 2>/dev/null; }
metrics() {
  curl -s $url/metrics | grep -E "^multipole_(steps|step_seconds|backend_seconds)_total" | tr '\n' ' ' \
    | tee -a "$out/serve.md"; echo | tee -a "$out/serve.md"
}
serve() {
  timeout "${1}" python3 bench/serve.py "${@:2}" --url $url 2>&1 | tee -a "$out/serve.md"
  metrics
}
start_server ${SERVER_ARGS:-}
# Warm-up, left out of the numbers: the first steps capture the CUDA graphs of each batch size
# (about 0.1 s at 1,024 streams).
"$bin/loadgen" --clients 1024 --processes 4 --max-tokens 16 --url $url > /dev/null
if [ -z "${SKIP_LONG:-}" ]; then
  echo "## one stream" | tee -a "$out/serve.md"
  serve 120 streams --clients 1 --requests 4 --max-tokens 512
fi
for p in ${STREAM_PROCESSES:-2 4}; do
  echo "## 1,024 streams x ${STREAM_TOKENS:-512} tokens, bench/loadgen in $p processes" | tee -a "$out/serve.md"
  timeout 240 "$bin/loadgen" --clients 1024 --processes $p --max-tokens ${STREAM_TOKENS:-512} \
    --url $url 2>&1 | tee -a "$out/serve.md"
  metrics
done
for p in ${PY_PROCESSES:-8}; do
  echo "## 1,024 streams x ${STREAM_TOKENS:-512} tokens, serve.py in $p processes" | tee -a "$out/serve.md"
  serve 240 streams --clients 1024 --processes $p --max-tokens ${STREAM_TOKENS:-512}
done
if [ -z "${SKIP_LONG:-}" ]; then
  echo "## one stream of 50,000 tokens through the server" | tee -a "$out/serve.md"
  serve 300 long --max-tokens 50000
fi
stop_server
for budget in ${PREFILL_BUDGETS:-0}; do
  start_server --prefill-per-step $budget
  echo "## 32 prompts of 100k tokens while 64 streams generate (budget $budget)" | tee -a "$out/serve.md"
  serve 240 prefill --clients 32 --prompt-tokens 100000 --max-tokens 64 --background 64 \
    --processes 4
  stop_server
done
if [ -z "${SKIP_GENERATE:-}" ]; then
  echo "## multipole-generate, 50,000 tokens" | tee -a "$out/serve.md"
  timeout 300 "$bin/multipole-generate" -m models/default.gguf --backend cuda --ignore-eos \
    -n 50000 -p The 2>&1 >/dev/null | tail -4 | tee -a "$out/serve.md"
fi
