#!/usr/bin/env bash
# A cluster on this machine, all on loopback: redis-server (sessions), three multipole-server
# replicas sharing their sessions through it (--session-store), and haproxy in front with
# deploy/haproxy.cfg (session-hashed, health-checked). Pid files and logs in the run folder.
#
# usage: cluster.sh start|stop|status [--dir DIR] [--port P] [--model FILE] [--replicas N]
#                   [--pin] [-- SERVER OPTIONS...]
#   --dir DIR       run folder: pid files, logs (default run/cluster in the repository)
#   --port P        haproxy listens on P, the replicas on P+1..P+N, redis-server on P+4
#                   (default 8080)
#   --model FILE    GGUF model (default the repository's models/default.gguf)
#   --replicas N    1 to 3 replicas (default 3); haproxy's health checks take the absent ones
#                   out of the rotation, which start waits for
#   --pin           replica i runs on CPU core i-1 only (taskset); pass --threads 1 with it
#   -- ...          options for every replica (default: --backend cpu)
# stop ends haproxy, then the replicas (SIGTERM: running requests are cancelled), then Redis;
# whatever has not exited after 10 s gets SIGKILL. status prints each process and its health.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)  # paths given as options are the caller's

usage() { sed -n '6,17s/^# \{0,1\}//p' "$0" >&2; exit 2; }
[ $# -ge 1 ] || usage
action=$1
shift
dir=$root/run/cluster port=8080 model=$root/models/default.gguf replicas=3 pin=0 server_opts=(--backend cpu)
while [ $# -gt 0 ]; do
  case $1 in
    --dir) dir=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --model) model=$2; shift 2 ;;
    --replicas) replicas=$2; shift 2 ;;
    --pin) pin=1; shift ;;
    --) shift; server_opts=(--backend cpu "$@"); break ;;
    *) echo "cluster.sh: unknown option '$1'" >&2; usage ;;
  esac
done
[[ $port =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65531 ] ||
  { echo "cluster.sh: --port must be a port number (1-65531), not '$port'" >&2; exit 2; }
[[ $replicas =~ ^[1-3]$ ]] || { echo "cluster.sh: --replicas must be 1, 2 or 3, not '$replicas'" >&2; exit 2; }
build=${MULTIPOLE_BUILD:-$root/build}
redis_port=$((port + 4))

# The answer's status line of GET /health on a loopback port, within 2 s ("" when none).
health() {
  timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1 && printf 'GET /health HTTP/1.0\r\n\r\n' >&3 &&
    head -1 <&3 | tr -d '\r'" 2>/dev/null || true
}
alive() { [ -f "$dir/$1.pid" ] && kill -0 "$(cat "$dir/$1.pid")" 2>/dev/null; }

# Ends the process of a pid file: SIGTERM, then SIGKILL after 10 s.
end() {
  local name=$1 pid
  [ -f "$dir/$name.pid" ] || return 0
  pid=$(cat "$dir/$name.pid")
  if kill -TERM "$pid" 2>/dev/null; then
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "$name (pid $pid) did not stop within 10 s: killed" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$dir/$name.pid"
}

stop() {
  end haproxy
  for i in 1 2 3; do end "replica$i"; done
  end redis
}

# Waits until `check` succeeds; on failure prints the log, stops everything and exits.
wait_for() {
  local name=$1 check=$2
  for _ in $(seq 300); do
    eval "$check" && return 0
    alive "$name" || break
    sleep 0.1
  done
  echo "cluster.sh: $name did not start (log $dir/$name.log):" >&2
  tail -20 "$dir/$name.log" >&2
  stop
  exit 1
}

start() {
  for name in redis replica1 replica2 replica3 haproxy; do
    alive "$name" && { echo "cluster.sh: $name is running already (pid $(cat "$dir/$name.pid")); stop first" >&2; exit 1; }
  done
  [ -x "$build/server/multipole-server" ] ||
    { echo "cluster.sh: no $build/server/multipole-server (build first)" >&2; exit 1; }
  [ -f "$model" ] || { echo "cluster.sh: no model file '$model'" >&2; exit 1; }
  for tool in redis-server redis-cli haproxy; do
    command -v "$tool" >/dev/null || { echo "cluster.sh: $tool is missing (scripts/deps.sh installs it)" >&2; exit 1; }
  done
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  # setsid: the cluster outlives this script and the terminal's Ctrl-C.
  setsid redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$dir" --logfile "$dir/redis.log" </dev/null >/dev/null 2>&1 &
  echo $! >"$dir/redis.pid"
  # Ours answering, not another redis-server on that port.
  wait_for redis "timeout 2 redis-cli -p $redis_port info server 2>/dev/null | tr -d '\r' | grep -qx \"process_id:\$(cat '$dir/redis.pid')\""
  for i in $(seq "$replicas"); do
    local pin_cmd=()
    [ "$pin" = 1 ] && pin_cmd=(taskset -c $(((i - 1) % $(nproc))))
    setsid "${pin_cmd[@]}" "$build/server/multipole-server" --model "$model" --host 127.0.0.1 \
      --port $((port + i)) --session-store "redis://127.0.0.1:$redis_port" --quiet \
      "${server_opts[@]}" </dev/null >"$dir/replica$i.log" 2>&1 &
    echo $! >"$dir/replica$i.pid"
  done
  for i in $(seq "$replicas"); do
    wait_for "replica$i" "grep -q '^listening on' '$dir/replica$i.log'"
  done
  MULTIPOLE_ROUTER_BIND=127.0.0.1:$port MULTIPOLE_REPLICA1=127.0.0.1:$((port + 1)) \
    MULTIPOLE_REPLICA2=127.0.0.1:$((port + 2)) MULTIPOLE_REPLICA3=127.0.0.1:$((port + 3)) \
    setsid haproxy -db -f "$root/deploy/haproxy.cfg" </dev/null >"$dir/haproxy.log" 2>&1 &
  echo $! >"$dir/haproxy.pid"
  wait_for haproxy "[ \"\$(health $port)\" = 'HTTP/1.1 200 OK' ]"
  # Absent replicas: two failed checks, 1 s apart, take them out.
  [ "$replicas" = 3 ] || sleep 3
  echo "cluster: http://127.0.0.1:$port (haproxy), replicas on ports $((port + 1))-$((port + replicas)), redis on $redis_port; run folder $dir"
}

status() {
  local ok=0 name pid
  for name in redis replica1 replica2 replica3 haproxy; do
    case $name in
      redis) addr=$redis_port ;;
      haproxy) addr=$port ;;
      *) addr=$((port + ${name#replica})) ;;
    esac
    if alive "$name"; then
      pid=$(cat "$dir/$name.pid")
      if [ "$name" = redis ]; then state=$(redis-cli -p "$addr" ping 2>/dev/null || true)
      else state=$(health "$addr"); fi
      printf '%-9s pid %-7s 127.0.0.1:%-5s %s\n' "$name" "$pid" "$addr" "${state:-not answering}"
    else
      printf '%-9s not running\n' "$name"
      ok=1
    fi
  done
  return $ok
}

case $action in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) usage ;;
esac
