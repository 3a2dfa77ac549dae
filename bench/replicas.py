#!/usr/bin/env python3
"""Throughput of replicas behind haproxy (issue 19): scripts/cluster.sh with one replica pinned
to core 0, then two pinned to cores 0 and 1 (--pin, --threads 1), the same load through haproxy
each time (bench/loadgen, serve.py's streams scenario on epoll: --clients streaming clients,
--requests each, --max-tokens tokens, no session); the load generator runs with 1 and 2
processes: equal totals show it is not the bottleneck. Prints a table, the ratio of two replicas to one, the load average seen, and
the CPU time the replicas got (a loaded machine leaves a pinned replica less than its core).

usage: replicas.py [--clients 16] [--requests 2] [--max-tokens 128] [--slots 8] [--port 18480]
                   [--model models/default.gguf] [--repeats 1] [--build build]
"""
import argparse
import os
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_average():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def cpu_seconds(pid):
    """User + system CPU time of a process (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(a, replicas, processes, work):
    env = dict(os.environ, MULTIPOLE_BUILD=a.build)
    cluster = [f"{ROOT}/scripts/cluster.sh", "--dir", os.path.join(work, "run"), "--port", str(a.port)]
    start = subprocess.run(cluster[:1] + ["start"] + cluster[1:] +
                           ["--model", a.model, "--replicas", str(replicas), "--pin", "--",
                            "--threads", "1", "--slots", str(a.slots)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if start.returncode != 0:
        raise SystemExit(start.stdout)
    try:
        before = load_average()
        pids = []
        for i in range(1, replicas + 1):
            with open(os.path.join(work, "run", f"replica{i}.pid")) as f:
                pids.append(int(f.read()))
        cpu0 = sum(cpu_seconds(p) for p in pids)
        out = subprocess.run([f"{a.build}/bench/loadgen", "--url", f"http://127.0.0.1:{a.port}",
                              "--clients", str(a.clients), "--requests", str(a.requests),
                              "--max-tokens", str(a.max_tokens), "--processes", str(processes)],
                             stdout=subprocess.PIPE, text=True).stdout
        # Its markdown row: clients, processes, requests, s, requests/s, tokens/s, TTFT p50, ...
        # errors.
        cells = [c.strip() for c in out.strip().splitlines()[-1].strip("|").split("|")]
        result = {"seconds": float(cells[3]), "tokens_per_s": float(cells[5]),
                  "ttft_p50_ms": float(cells[6]), "errors": int(cells[10])}
        result["load"] = (before, load_average())
        # The replicas' CPU time: what the machine's other load left them shows here.
        result["cpu_s"] = sum(cpu_seconds(p) for p in pids) - cpu0
        return result
    finally:
        subprocess.run(cluster[:1] + ["stop"] + cluster[1:], check=True, env=env)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--port", type=int, default=18480)
    p.add_argument("--model", default=f"{ROOT}/models/default.gguf")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--build", default=f"{ROOT}/build")
    a = p.parse_args()
    work = tempfile.mkdtemp(prefix="multipole-replicas-")
    rows = []
    for _ in range(a.repeats):
        for replicas in (1, 2):
            for processes in (1, 2):
                r = run(a, replicas, processes, work)
                rows.append((replicas, processes, r))
    print(f"{a.clients} streaming clients x {a.requests} requests x {a.max_tokens} tokens through "
          f"haproxy; replicas pinned one per core, --threads 1 --slots {a.slots}\n")
    print("| replicas | load generator processes | s | tokens/s | TTFT p50 ms | errors | "
          "replicas' CPU s (of s x replicas) | tokens per replica CPU s | load average before, after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for replicas, processes, r in rows:
        print(f"| {replicas} | {processes} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} | "
              f"{r['ttft_p50_ms']:.0f} | {r['errors']} | {r['cpu_s']:.1f} "
              f"({r['cpu_s'] / (r['seconds'] * replicas) * 100:.0f} %) | "
              f"{r['tokens_per_s'] * r['seconds'] / max(r['cpu_s'], 1e-9):.0f} | "
              f"{r['load'][0]:.1f}, {r['load'][1]:.1f} |")
    best = {n: max(r["tokens_per_s"] for m, _, r in rows if m == n) for n in (1, 2)}
    print(f"\ntwo replicas / one (best of each): {best[2] / best[1]:.2f}x")


if __name__ == "__main__":
    main()
