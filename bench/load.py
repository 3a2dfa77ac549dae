#!/usr/bin/env python3
"""Load benchmark for multipole-server: N concurrent streaming clients on loopback for a bounded
time. Prints requests/s, tokens/s, time to first token and inter-token latency (p50/p99).
usage: load.py [--url http://127.0.0.1:8080] [--clients 8] [--seconds 20] [--max-tokens 64]"""
import argparse
import http.client
import json
import threading
import time
import urllib.parse


def client(url, deadline, max_tokens, seed, out):
    u = urllib.parse.urlparse(url)
    while time.time() < deadline:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
        body = json.dumps({"prompt": "The history of the", "max_tokens": max_tokens,
                           "temperature": 0.8, "seed": seed, "stream": True})
        t0 = time.time()
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            out["errors"] += 1
            resp.read()
            conn.close()
            continue
        stamps = []
        for line in resp:
            if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                ev = json.loads(line[6:])
                if ev["choices"] and ev["choices"][0]["finish_reason"] is None:
                    stamps.append(time.time())
        conn.close()
        if stamps:
            out["ttft"].append(stamps[0] - t0)
            out["itl"] += [b - a for a, b in zip(stamps, stamps[1:])]
        out["tokens"] += len(stamps)
        out["requests"] += 1
        seed += 1000


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1e3 if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    deadline = time.time() + a.seconds
    stats = [{"ttft": [], "itl": [], "tokens": 0, "requests": 0, "errors": 0} for _ in range(a.clients)]
    threads = [threading.Thread(target=client, args=(a.url, deadline, a.max_tokens, i, stats[i]))
               for i in range(a.clients)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    el = time.time() - t0
    ttft = sum((s["ttft"] for s in stats), [])
    itl = sum((s["itl"] for s in stats), [])
    req = sum(s["requests"] for s in stats)
    tok = sum(s["tokens"] for s in stats)
    err = sum(s["errors"] for s in stats)
    print("| clients | requests/s | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {a.clients} | {req / el:.2f} | {tok / el:.1f} | {pct(ttft, 50):.1f} | {pct(ttft, 99):.1f} | "
          f"{pct(itl, 50):.1f} | {pct(itl, 99):.1f} | {err} |")


if __name__ == "__main__":
    main()
