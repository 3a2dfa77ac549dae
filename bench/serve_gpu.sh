#!/usr/bin/env bash
# The serving benchmark in one GPU call (issue 10's numbers): bench_cuda's decode at batch 1 and
# 1024 as the baseline, then multipole-server on the same GPU under bench/serve.py's scenarios,
# then multipole-generate's speed over 50,000 tokens. Binaries come from scripts/gpu_bundle.sh
# (carried in .carry/gpu). Results go to $OUT. SKIP_TESTS=1 skips the CUDA tests, SKIP_GENERATE=1
# the generate run; PREFILL_BUDGETS="N M" runs the prefill scenario with each --prefill-per-step;
# STREAM_PROCESSES="2 4" the process counts of bench/loadgen (C++, epoll) for the 1,024 streams
# (equal totals show that it is not the bottleneck), PY_PROCESSES="8" those of serve.py (aiohttp)
# for the same load, STREAM_TOKENS their tokens each (default 512); SKIP_LONG=1 skips the one-stream
# runs. The server logs its steps (--log-steps) into $out/server.log. SERVER_CPUS and LOADGEN_CPUS
# (taskset lists, e.g. 0-9 and 10-15) keep the server and the load generator on cores of their own,
# as when the clients are other machines; BUSY=N times the engine's batch-1,024 step again beside N
# busy processes (what sharing the host's cores costs the step alone). NORMAL_PRIORITY=1 renices
# the server's delivery threads (mp-events, mp-http) to nice 0 after the warm-up: the A/B of their
# lower priority (needs root). STEP_CORE=N runs the step loop alone on core N (and keeps its SMT
# sibling free): what the host's other work costs the step (SERVER_ARGS="--step-nice 0" for the
# A/B of the step loops' priority).
set -uo pipefail
source scripts/gpu_env.sh
"$bin/bench_cuda" models/default.gguf --decode 1,1024 2>&1 | tee "$out/bench_decode.md"
if [ -n "${BUSY:-}" ]; then
  for _ in $(seq "$BUSY"); do (while :; do :; done) & done
  echo "## beside $BUSY busy processes" | tee -a "$out/bench_decode.md"
  "$bin/bench_cuda" models/default.gguf --decode 1024 2>&1 | tail -1 | tee -a "$out/bench_decode.md"
  jobs -p | xargs -r kill 2>/dev/null; wait 2>/dev/null
fi
pinned() {  # the command prefix that keeps a program on the cores of the list $1, if any
  if [ -n "$1" ]; then echo "taskset -c $1"; fi
}

port=8080
url=http://127.0.0.1:$port
start_server() {  # extra server options as arguments
  $(pinned "${SERVER_CPUS:-}") "$bin/multipole-server" -m models/default.gguf --backend cuda --slots 1024 --max-queue 4096 \
    --ctx-limit 200000 --port $port --quiet --log-steps "$@" >> "$out/server.log" 2>&1 &
  server=$!
  rm -f "$out/thread_cpu.json"
  for _ in $(seq 120); do curl -sf $url/health >/dev/null && break; sleep 0.5; done
}
stop_server() { kill $server; wait $server 2>/dev/null; }
# The server's counters, and its CPU seconds (user + system) by thread since the last call.
metrics() {
  echo "server CPU: $(python3 bench/thread_cpu.py $server "$out/thread_cpu.json")" | tee -a "$out/serve.md"
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
if [ -n "${STEP_CORE:-}" ]; then
  # The step loop alone on core $STEP_CORE: its SMT sibling and it are left to no other thread
  # of the server nor to the load generator.
  siblings=$(cat /sys/devices/system/cpu/cpu$STEP_CORE/topology/thread_siblings_list)
  others=$(python3 -c "import os,sys; s=set(); [s.update(range(int(a), int(b or a) + 1)) for a, _, b in (p.partition('-') for p in sys.argv[1].split(','))]; print(','.join(str(c) for c in sorted(os.sched_getaffinity(0) - s)))" "$siblings")
  for task in /proc/$server/task/*; do
    if grep -q '^mp-step' $task/comm; then taskset -p -c $STEP_CORE ${task##*/}; else taskset -p -c $others ${task##*/}; fi
  done > /dev/null
  LOADGEN_CPUS=$others
  echo "(step loop on core $STEP_CORE, siblings $siblings kept free; the rest on $others)" | tee -a "$out/serve.md"
fi
if [ -n "${NORMAL_PRIORITY:-}" ]; then
  for task in /proc/$server/task/*; do
    grep -qE '^mp-(events|http)$' $task/comm && renice -n 0 -p "${task##*/}" >/dev/null
  done
  echo "(delivery threads reniced to 0)" | tee -a "$out/serve.md"
fi
if [ -z "${SKIP_LONG:-}" ]; then
  echo "## one stream" | tee -a "$out/serve.md"
  serve 120 streams --clients 1 --requests 4 --max-tokens 512
fi
for p in ${STREAM_PROCESSES:-2 4}; do
  echo "## 1,024 streams x ${STREAM_TOKENS:-512} tokens, bench/loadgen in $p processes" | tee -a "$out/serve.md"
  # shellcheck disable=SC2046 # the prefix is words, or none
  timeout 240 $(pinned "${LOADGEN_CPUS:-}") "$bin/loadgen" --clients 1024 --processes $p --max-tokens ${STREAM_TOKENS:-512} \
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
