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
# shellcheck source=tests/support/start_server.sh
source "$here/../support/start_server.sh"
start_server "$build" "$work/server.log" --model "$work/model.gguf" --threads 2 --api-key test-key
if ! node "$work/openai_sdk.mjs" "http://127.0.0.1:$port/v1"; then
  echo "== the server's log" >&2
  tail -n 40 "$work/server.log" >&2
  exit 1
fi
