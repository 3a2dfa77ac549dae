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
# Port 0: the kernel picks a free one, which the server reports.
"$build/server/multipole-server" --model "$work/model.gguf" --port 0 --threads 2 --quiet \
  --api-key test-key 2>"$work/server.log" &
server=$!
port=
for _ in $(seq 600); do
  port=$(sed -n 's|^listening on http://127.0.0.1:\([0-9]*\)$|\1|p' "$work/server.log")
  [ -n "$port" ] && break
  kill -0 $server 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
  sleep 0.1
done
[ -n "$port" ] || { echo "the server did not start" >&2; exit 1; }
node "$work/openai_sdk.mjs" "http://127.0.0.1:$port/v1"
