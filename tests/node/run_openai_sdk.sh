#!/usr/bin/env bash
# Starts multipole-server on a free loopback port with a random model, installs the OpenAI Node
# SDK (npm registry) in a temporary folder and streams a completion through it.
# usage: run_openai_sdk.sh BUILD_DIR
set -euo pipefail
build=$1
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
"$build/tests/make-test-checkpoint" "$work/hf" >/dev/null
"$build/tools/multipole-convert" "$work/hf" "$work/model.gguf" 2>/dev/null
cp "$here/openai_sdk.mjs" "$work/"
# Without the npm registry there is nothing to test against: exit 77, which ctest reports as
# skipped (SKIP_RETURN_CODE), saying why.
if ! (cd "$work" && npm init -y >/dev/null && timeout 180 npm install --silent --no-audit --no-fund openai@4 >/dev/null); then
  echo "npm install openai failed: the npm registry is not reachable" >&2
  exit 77
fi
port=$((20000 + RANDOM % 20000))
"$build/server/multipole-server" --model "$work/model.gguf" --port $port --threads 2 --quiet \
  --api-key test-key 2>"$work/server.log" &
server=$!
for _ in $(seq 50); do curl -s "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.1; done
node "$work/openai_sdk.mjs" "http://127.0.0.1:$port/v1"
