#!/usr/bin/env bash
# Issue 16's numbers in one GPU call: the CUDA tests, then multipole-server on the GPU under
# bench/sessions.py: a 100k-token document asked six questions through the prefix cache, and
# 10,000 persisted sessions forked from a 100k-token one (disk, memory, resume cost). Binaries
# from scripts/gpu_bundle.sh (carried in .carry/gpu); results in $OUT. SKIP_TESTS=1 skips the
# tests; SESSIONS=N changes the number of sessions; SERVER_ARGS adds server options. The server's
# access log and step log (--log-steps) go to $out/server.log.
set -uo pipefail
source scripts/gpu_env.sh
state=$(mktemp -d /tmp/state.XXXX)
url=http://127.0.0.1:8080
"$bin/multipole-server" -m models/default.gguf --backend cuda --slots 64 --ctx-limit 200000 \
  --state-dir "$state" --max-sessions 20000 --session-memory-mib 256 --log-steps ${SERVER_ARGS:-} \
  > "$out/server.log" 2>&1 &
server=$!
for _ in $(seq 120); do curl -sf $url/health >/dev/null && break; sleep 0.5; done
echo "## prefix cache: a 100k-token document, six questions" | tee -a "$out/sessions.md"
timeout 200 python3 bench/sessions.py prefix --doc-tokens 100000 --url $url 2>&1 | tee -a "$out/sessions.md"
echo "## the same as text (about 100k tokens of words: its tokenization included)" | tee -a "$out/sessions.md"
timeout 200 python3 bench/sessions.py prefix --text-words 90000 --url $url 2>&1 | tee -a "$out/sessions.md"
echo "## ${SESSIONS:-10000} sessions of 100k tokens" | tee -a "$out/sessions.md"
timeout 300 python3 bench/sessions.py sessions --doc-tokens 100000 --sessions ${SESSIONS:-10000} \
  --state-dir "$state" --server-pid $server --url $url 2>&1 | tee -a "$out/sessions.md"
du -sh "$state" | tee -a "$out/sessions.md"
curl -s $url/metrics | grep -E "^multipole_(prefix|sessions)" | tee -a "$out/sessions.md"
kill $server; wait $server 2>/dev/null
# A restart reads the 10,000 headers only.
t0=$(date +%s%N)
"$bin/multipole-server" -m models/default.gguf --backend cuda --slots 8 --state-dir "$state" \
  --max-sessions 20000 --quiet > "$out/server2.log" 2>&1 &
server=$!
for _ in $(seq 240); do curl -sf $url/health >/dev/null && break; sleep 0.25; done
echo "restart with $(ls "$state" | wc -l) session files: healthy after $(( ($(date +%s%N) - t0) / 1000000 )) ms, RSS $(grep VmRSS /proc/$server/status)" | tee -a "$out/sessions.md"
kill $server; wait $server 2>/dev/null
rm -rf "$state"
