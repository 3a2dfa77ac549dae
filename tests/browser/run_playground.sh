#!/usr/bin/env bash
# Starts multipole-server with a model and drives its playground page in headless Chromium
# (Debian's chromium; exit 77, which ctest reports as skipped, where it is absent).
# usage: run_playground.sh BUILD_DIR [MODEL.gguf [SCREENSHOT.png]]   (default: a random model)
set -euo pipefail
build=$1
here=$(cd "$(dirname "$0")" && pwd)
browser=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$browser" ]; then
  echo "chromium is not installed (apt-get install chromium): the playground test is skipped" >&2
  exit 77
fi
work=$(mktemp -d)
server='' chrome=''
# On a failure, the logs of both.
on_exit() {
  local rc=$?
  if [ "$rc" != 0 ] && [ "$rc" != 77 ]; then
    for log in server chrome; do
      [ -f "$work/$log.log" ] && { echo "== $log.log" >&2; tail -n 30 "$work/$log.log" >&2; }
    done
  fi
  [ -n "$chrome" ] && kill $chrome 2>/dev/null
  [ -n "$server" ] && kill $server 2>/dev/null
  wait 2>/dev/null
  rm -rf "$work"
}
trap on_exit EXIT
model=${2:-}
if [ -z "$model" ]; then
  "$build/tests/make-test-checkpoint" "$work/hf" >/dev/null
  # A recommended sampling, which the page must show as its defaults (playground.mjs).
  "$build/tools/multipole-convert" "$work/hf" "$work/model.gguf" --sampling repeat-penalty=1.25 \
    2>/dev/null
  model=$work/model.gguf
fi
# shellcheck source=tests/support/start_server.sh
source "$here/../support/start_server.sh"
start_server "$build" "$work/server.log" --model "$model" --threads 2 --ctx-limit 4096
"$browser" --headless=new --no-sandbox --disable-gpu --disable-dev-shm-usage --no-first-run \
  --user-data-dir="$work/profile" --remote-debugging-port=0 --window-size=1280,900 \
  "http://127.0.0.1:$port/" 2>"$work/chrome.log" &
chrome=$!
devtools=
for _ in $(seq 600); do
  [ -s "$work/profile/DevToolsActivePort" ] && devtools=$(head -1 "$work/profile/DevToolsActivePort") && break
  kill -0 $chrome 2>/dev/null || { cat "$work/chrome.log" >&2; exit 1; }
  sleep 0.1
done
[ -n "$devtools" ] || { echo "chromium did not start" >&2; cat "$work/chrome.log" >&2; exit 1; }
node --experimental-websocket --no-warnings "$here/playground.mjs" "http://127.0.0.1:$port" "$devtools" ${3:+"$3"}
