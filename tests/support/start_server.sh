# shellcheck shell=bash
# Sourced by the scripted tests: start_server BUILD_DIR LOG [OPTIONS...] starts multipole-server
# on a free loopback port (port 0: the kernel picks one, which the server reports) and sets
# $server (its pid) and $port once it listens; it exits 1 when the server does not start.
start_server() {
  local build=$1 log=$2
  shift 2
  : > "$log"  # there before the first look at it (the server's own redirection may come later)
  "$build/server/multipole-server" --port 0 --quiet "$@" 2>"$log" &
  server=$!
  port=
  for _ in $(seq 600); do
    port=$(sed -n 's|^listening on http://127.0.0.1:\([0-9]*\)$|\1|p' "$log")
    [ -n "$port" ] && return 0
    kill -0 $server 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.1
  done
  echo "the server did not start" >&2
  exit 1
}
