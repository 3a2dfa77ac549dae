#!/usr/bin/env python3
"""Serving benchmark for multipole-server: concurrent streaming clients (aiohttp), split over
several processes so that the load generator is not the bottleneck (run it with two process
counts: the totals must agree). Prints one markdown row and, with --json, a JSON line.

Scenarios:
  streams  N clients, each sending --requests requests one after another (short prompt,
           --max-tokens tokens, temperature 0.8, ignore_eos, the API's other defaults)
  prefill  --clients prompts of --prompt-tokens token ids each, --max-tokens tokens, all at once,
           while --background streams generate; reports prompt tokens/s (prompt tokens over the
           time from the first request to the last first token) and the background streams'
           inter-token latency during that time
  long     one stream of --max-tokens tokens: tokens/s over its first and last 1,000 tokens

usage: serve.py SCENARIO [--url http://127.0.0.1:8080] [--clients N] [--processes P] ...
"""
import argparse
import asyncio
import json
import multiprocessing as mp
import random
import time

import aiohttp


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1e3 if xs else float("nan")


async def stream_one(session, url, body, rec):
    """One streaming request (body: a dict, or JSON text made in advance); returns its start and
    its tokens' arrival times."""
    t0 = time.time()
    stamps = []
    data = body if isinstance(body, str) else json.dumps(body)
    async with session.post(url + "/v1/completions", data=data,
                            headers={"Content-Type": "application/json"}) as resp:
        if resp.status != 200:
            await resp.read()
            rec["errors"] += 1
            rec["statuses"][resp.status] = rec["statuses"].get(resp.status, 0) + 1
            return t0, stamps
        # Counted, not parsed, so that the load generator stays cheap: every token's event has
        # a null finish_reason (the last one a reason, then [DONE]); the events of one read
        # arrived at the same time.
        pattern, tail = b'"finish_reason":null', b""
        async for data in resp.content.iter_any():
            now = time.time()
            joined = tail + data  # a pattern split between two reads counts once
            stamps += [now] * joined.count(pattern)
            tail = joined[-(len(pattern) - 1):]
    rec["requests"] += 1
    return t0, stamps


def new_record():
    return {"requests": 0, "errors": 0, "statuses": {}, "tokens": 0, "ttft": [], "itl": [],
            "first": [], "starts": [], "stamps": []}


def add_stream(rec, t0, stamps, keep_stamps=False):
    rec["tokens"] += len(stamps)
    rec["starts"].append(t0)
    if stamps:
        rec["ttft"].append(stamps[0] - t0)
        rec["first"].append(stamps[0])
        rec["itl"] += [b - a for a, b in zip(stamps, stamps[1:])]
    if keep_stamps:
        rec["stamps"].append(stamps)


async def streams_worker(a, n_clients, seed, start_at):
    rec = new_record()
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        await asyncio.sleep(max(0.0, start_at - time.time()))

        async def client(i):
            for r in range(a.requests):
                body = {"prompt": a.prompt, "max_tokens": a.max_tokens, "temperature": 0.8,
                        "ignore_eos": True, "stream": True, "seed": seed + 1000 * i + r}
                t0, stamps = await stream_one(session, a.url, body, rec)
                add_stream(rec, t0, stamps)

        await asyncio.gather(*(client(i) for i in range(n_clients)))
    rec["end"] = time.time()
    return rec


async def prefill_worker(a, n_clients, seed, start_at):
    """n_clients long prompts at start_at, their bodies made before; or, in a process of their
    own (so that making those bodies cannot delay their reading), a.background streams that start
    at once."""
    rec = new_record()
    bg = new_record()
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    rng = random.Random(seed)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        async def background(i):
            await asyncio.sleep(max(0.0, start_at - 0.5 - time.time()))
            body = {"prompt": a.prompt, "max_tokens": a.background_tokens, "temperature": 0.8,
                    "ignore_eos": True, "stream": True, "seed": seed + i}
            t0, stamps = await stream_one(session, a.url, body, bg)
            add_stream(bg, t0, stamps, keep_stamps=True)

        bodies = [json.dumps({"prompt": [1] + [rng.randrange(3, a.vocab)
                                               for _ in range(a.prompt_tokens - 1)],
                              "max_tokens": a.max_tokens, "temperature": 0.8,
                              "ignore_eos": True, "stream": True, "seed": seed + 100 + i})
                  for i in range(n_clients)]

        async def long_prompt(i):
            await asyncio.sleep(max(0.0, start_at - time.time()))
            t0, stamps = await stream_one(session, a.url, bodies[i], rec)
            add_stream(rec, t0, stamps)

        tasks = [background(i) for i in range(a.background)] + \
                [long_prompt(i) for i in range(n_clients)]
        await asyncio.gather(*tasks)
    rec["end"] = time.time()
    rec["background"] = bg
    return rec


async def long_worker(a):
    rec = new_record()
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        body = {"prompt": a.prompt, "max_tokens": a.max_tokens, "temperature": 0.8,
                "ignore_eos": True, "stream": True, "seed": 1}
        t0, stamps = await stream_one(session, a.url, body, rec)
        add_stream(rec, t0, stamps, keep_stamps=True)
    rec["end"] = time.time()
    return rec


def run_worker(args):
    a, n, seed, start_at = args
    fn = {"streams": streams_worker, "prefill": prefill_worker}[a.scenario]
    return asyncio.run(fn(a, n, seed, start_at))


def merge(recs):
    out = new_record()
    for r in recs:
        for k in ("requests", "errors", "tokens"):
            out[k] += r[k]
        for k in ("ttft", "itl", "first", "starts", "stamps"):
            out[k] += r[k]
        for s, n in r["statuses"].items():
            out["statuses"][s] = out["statuses"].get(s, 0) + n
    out["end"] = max(r["end"] for r in recs)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("scenario", choices=["streams", "prefill", "long"])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--requests", type=int, default=1, help="per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--prompt", default="The history of the")
    ap.add_argument("--prompt-tokens", type=int, default=100000)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--background", type=int, default=0)
    ap.add_argument("--background-tokens", type=int, default=8000)
    ap.add_argument("--label", default="")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    if a.scenario == "long":
        rec = asyncio.run(long_worker(a))
        s = rec["stamps"][0] if rec["stamps"] else []
        w = 1000
        first = w / (s[w] - s[0]) if len(s) > w else float("nan")
        last = w / (s[-1] - s[-1 - w]) if len(s) > 2 * w else float("nan")
        print("| tokens | tokens/s, first 1,000 | tokens/s, last 1,000 | ratio |")
        print("|---|---|---|---|")
        print(f"| {len(s)} | {first:.0f} | {last:.0f} | {last / first:.3f} |")
        if a.json:
            print(json.dumps({"scenario": "long", "tokens": len(s), "first": first, "last": last}))
        return

    start_at = time.time() + 2.0 + 0.2 * a.processes
    shares = [a.clients // a.processes + (1 if i < a.clients % a.processes else 0)
              for i in range(a.processes)]
    jobs = [(a, n, 7919 * (i + 1), start_at) for i, n in enumerate(shares) if n > 0]
    if a.scenario == "prefill":  # the background streams get a process of their own, the first
        quiet = argparse.Namespace(**{**vars(a), "background": 0})
        jobs = [(a, 0, 1, start_at)] + [(quiet, n, s, t) for _, n, s, t in jobs]
    with mp.Pool(len(jobs)) as pool:
        recs = pool.map(run_worker, jobs)
    rec = merge(recs)
    elapsed = rec["end"] - start_at
    result = {"scenario": a.scenario, "label": a.label, "clients": a.clients,
              "processes": a.processes, "requests": rec["requests"], "errors": rec["errors"],
              "statuses": rec["statuses"], "seconds": elapsed,
              "requests_per_s": rec["requests"] / elapsed, "tokens_per_s": rec["tokens"] / elapsed,
              "ttft_p50_ms": pct(rec["ttft"], 50), "ttft_p99_ms": pct(rec["ttft"], 99),
              "itl_p50_ms": pct(rec["itl"], 50), "itl_p99_ms": pct(rec["itl"], 99)}
    if a.scenario == "streams":
        print("| clients | processes | requests | s | requests/s | tokens/s | TTFT p50 ms | "
              "TTFT p99 ms | ITL p50 ms | ITL p99 ms | errors |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        print(f"| {a.clients} | {a.processes} | {rec['requests']} | {elapsed:.1f} | "
              f"{result['requests_per_s']:.1f} | {result['tokens_per_s']:.0f} | "
              f"{result['ttft_p50_ms']:.0f} | {result['ttft_p99_ms']:.0f} | "
              f"{result['itl_p50_ms']:.1f} | {result['itl_p99_ms']:.1f} | {rec['errors']} |")
    else:
        window = (start_at, max(rec["first"]) if rec["first"] else start_at)
        prompt_rate = a.clients * a.prompt_tokens / max(window[1] - window[0], 1e-9)
        bg = recs[0]["background"]
        gaps = [b - x for st in bg["stamps"] for x, b in zip(st, st[1:])
                if window[0] <= b <= window[1]]
        result.update({"prompt_tokens_per_s": prompt_rate, "prefill_window_s": window[1] - window[0],
                       "background_itl_p50_ms": pct(gaps, 50),
                       "background_itl_p99_ms": pct(gaps, 99),
                       "background_tokens": bg["tokens"]})
        print("| prompts x tokens | processes | prefill window s | prompt tokens/s | TTFT p50 ms | "
              "TTFT p99 ms | background streams | their ITL p50 ms | p99 ms | errors |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        print(f"| {a.clients} x {a.prompt_tokens} | {a.processes} | {window[1] - window[0]:.2f} | "
              f"{prompt_rate:.0f} | {result['ttft_p50_ms']:.0f} | {result['ttft_p99_ms']:.0f} | "
              f"{a.background} | {result['background_itl_p50_ms']:.1f} | "
              f"{result['background_itl_p99_ms']:.1f} | {rec['errors']} |")
    if a.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
