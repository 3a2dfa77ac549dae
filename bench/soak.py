#!/usr/bin/env python3
"""Soak test of multipole-server (issue 14): starts the server (or uses --url and --pid), measures
its capacity (completed requests/s of --slots closed-loop clients), then sends requests for
--duration seconds at --load (default 80 %) of that capacity, open loop (Poisson arrivals):
streamed and plain completions and chats with random prompts and max_tokens, some cancelled by a
client that disconnects mid-stream, and bad requests mixed in (malformed JSON, bad fields,
oversized prompts and bodies). Prints a table of the outcomes and exits 1 on any violation:
  - a 5xx other than the intended 503 overload answer;
  - a bad request not answered 4xx, a good one that fails (connection error, no [DONE], more
    tokens than asked) or takes longer than --request-timeout;
  - the server not alive at the end (/health, and its process where this script started it);
  - resident memory (RSS; and GPU memory where nvidia-smi shows the process) of the last window
    of the run more than 5 % above or below the first window's (window: a quarter of the run
    after --warmup, at most 10 minutes). The warm-up is left out because the server's memory
    grows at first, fast, then levels off: its malloc arenas (one per HTTP thread, up to 8 per
    core) reach the high-water marks of the request mix (docs/RELIABILITY.md has a 5-minute curve).

usage: soak.py [--server BIN --model GGUF --slots N ...] | [--url URL --pid PID] [--duration S]
CI: scripts/test.sh runs 100 s, the first 50 s warm-up.
"""
import argparse
import asyncio
import atexit
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import aiohttp

WORDS = ("the free software license permits you to copy modify and distribute program source "
         "code under terms that protect users rights").split()


def prompt_text(rng, words):
    return " ".join(rng.choice(WORDS) for _ in range(words))


def good_request(rng, max_tokens):
    """A valid request: (path, body, stream)."""
    body = {"max_tokens": rng.randint(1, max_tokens), "temperature": rng.choice([0, 0.7, 1.0]),
            "seed": rng.randint(0, 1 << 30), "ignore_eos": True}
    stream = rng.random() < 0.7
    if stream:
        body["stream"] = True
    if rng.random() < 0.3:
        body["messages"] = [{"role": "user", "content": prompt_text(rng, rng.randint(1, 30))}]
        return "/v1/chat/completions", body, stream
    body["prompt"] = prompt_text(rng, rng.randint(1, 30))
    return "/v1/completions", body, stream


def bad_request(rng, ctx_words, max_body):
    """An invalid request: (kind, path, raw body bytes)."""
    kind = rng.choice(["malformed json", "bad field", "oversized prompt", "oversized body"])
    if kind == "malformed json":
        data = rng.choice(['{"prompt": "x", ', "{not json", "[1, 2", '"prompt"', ""])
    elif kind == "bad field":
        data = json.dumps(rng.choice([
            {"prompt": "x", "temperature": 5}, {"prompt": "x", "max_tokens": "ten"},
            {"prompt": "x", "n": 0}, {"prompt": 3}, {"max_tokens": 3},
            {"prompt": "x", "stop": [1, 2]}, {"prompt": [1, 10 ** 9]},
            {"messages": "hi"}, {"messages": [{"role": "robot", "content": "x"}]}]))
    elif kind == "oversized prompt":  # more tokens than the context limit (a word: >= 1 token)
        data = json.dumps({"prompt": prompt_text(rng, ctx_words), "max_tokens": 4})
    else:
        data = json.dumps({"prompt": "x" * (max_body + 1024)})
    path = "/v1/chat/completions" if "messages" in data else "/v1/completions"
    return kind, path, data.encode()


class Tally:
    def __init__(self):
        self.outcomes = {}
        self.violations = []
        self.fivexx = 0  # 5xx answers other than 503

    def status(self, code, what):
        """An answer that is wrong for the request: a violation, 5xx counted apart."""
        self.fivexx += 500 <= code < 600 and code != 503
        self.violation(what)

    def add(self, outcome):
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def violation(self, what):
        self.add("VIOLATION")
        if len(self.violations) < 20:
            self.violations.append(what)


async def run_good(session, url, rng, tally, max_tokens, cancel, timeout):
    path, body, stream = good_request(rng, max_tokens)
    if cancel:
        body["stream"], stream = True, True
    try:
        async with session.post(url + path, json=body,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                text = await resp.text()
                if resp.status == 503 or resp.status == 429:
                    tally.add(f"{resp.status} overloaded")
                else:
                    tally.status(resp.status, f"good request {path} got {resp.status}: {text[:200]}")
                return
            if not stream:
                j = json.loads(await resp.text())
                if j["usage"]["completion_tokens"] > body["max_tokens"]:
                    tally.violation(f"more tokens than max_tokens: {j['usage']}")
                    return
                tally.add("ok")
                return
            events, done, stop_after = 0, False, rng.randint(1, 4)
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                if line.strip() == b"data: [DONE]":
                    done = True
                    break
                json.loads(line[6:])  # every event parses
                events += 1
                if cancel and events >= stop_after:
                    break  # leaving the block closes the connection mid-stream
            if cancel and not done:
                tally.add("cancelled (client disconnected)")
            elif not done:
                tally.violation(f"a stream ended without [DONE] after {events} events")
            elif events > body["max_tokens"] + 2:
                tally.violation(f"{events} events for max_tokens {body['max_tokens']}")
            else:
                tally.add("ok")
    except asyncio.TimeoutError:
        tally.violation(f"no answer within {timeout} s ({path})")
    except (aiohttp.ClientError, json.JSONDecodeError, KeyError) as e:
        tally.violation(f"good request {path} failed: {type(e).__name__}: {e}")


async def run_bad(session, url, rng, tally, ctx_words, max_body, timeout):
    kind, path, data = bad_request(rng, ctx_words, max_body)
    try:
        async with session.post(url + path, data=data,
                                headers={"Content-Type": "application/json"},
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            text = await resp.text()
            if resp.status in (429, 503):
                tally.add(f"{resp.status} overloaded")
            elif 400 <= resp.status < 500 and "error" in json.loads(text):
                tally.add(f"bad: {kind} -> {resp.status}")
            else:
                tally.status(resp.status, f"bad request ({kind}) got {resp.status}: {text[:200]}")
    except asyncio.TimeoutError:
        tally.violation(f"no answer within {timeout} s (bad: {kind})")
    except (aiohttp.ClientError, json.JSONDecodeError) as e:
        if kind == "oversized body":  # refused unread: the server may close while we send
            tally.add(f"bad: {kind} -> closed while sending")
        else:
            tally.violation(f"bad request ({kind}) failed: {type(e).__name__}: {e}")


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def gpu_bytes(pid):
    """The GPU memory nvidia-smi shows for the process; None without nvidia-smi or a GPU."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    used = [int(m) for p, m in (l.split(",") for l in out.strip().splitlines() if "," in l)
            if int(p) == pid]
    return sum(used) * 2 ** 20 if used else None


async def sample_memory(pid, samples, stop):
    while not stop.is_set():
        t = time.time()
        rss = rss_bytes(pid)
        gpu = await asyncio.get_running_loop().run_in_executor(None, gpu_bytes, pid)
        samples.append((t, rss, gpu))
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except asyncio.TimeoutError:
            pass


async def measure_capacity(session, url, args, rng):
    """Completed requests per second of --slots clients sending good requests back to back."""
    done = 0
    end = time.time() + args.capacity_seconds
    tally = Tally()

    async def client():
        nonlocal done
        while time.time() < end:
            await run_good(session, url, rng, tally, args.max_tokens, False, args.request_timeout)
            done += 1

    t0 = time.time()
    await asyncio.gather(*(client() for _ in range(args.slots)))
    if tally.violations:
        print("capacity phase:", *tally.violations, sep="\n  ", file=sys.stderr)
    return done / (time.time() - t0), tally


async def soak(args, url, pid):
    rng = random.Random(args.seed)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        capacity, cap_tally = await measure_capacity(session, url, args, rng)
        rate = args.load * capacity / (1 - args.bad_fraction)  # good requests at load * capacity
        print(f"capacity: {capacity:.2f} requests/s ({args.slots} clients, "
              f"{args.capacity_seconds:.0f} s); offering {rate:.2f} requests/s for "
              f"{args.duration:.0f} s", flush=True)
        tally = Tally()
        for v in cap_tally.violations:
            tally.violation("capacity phase: " + v)
        samples, stop = [], asyncio.Event()
        sampler = asyncio.create_task(sample_memory(pid, samples, stop))
        tasks = set()
        t0 = time.time()
        next_at = t0
        while True:
            next_at += rng.expovariate(rate)
            if next_at >= t0 + args.duration:
                break
            await asyncio.sleep(max(0.0, next_at - time.time()))
            u = rng.random()
            if u < args.bad_fraction:
                coro = run_bad(session, url, rng, tally, 2 * args.ctx_limit, args.max_body,
                               args.request_timeout)
            else:
                cancel = u < args.bad_fraction + args.cancel_fraction
                coro = run_good(session, url, rng, tally, args.max_tokens, cancel,
                                args.request_timeout)
            task = asyncio.create_task(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        soak_end = time.time()
        if tasks:
            await asyncio.wait(tasks, timeout=args.request_timeout + 5)
        stop.set()
        await sampler
        alive = False
        try:
            async with session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=10)) as r:
                alive = r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass
    return tally, samples, t0, soak_end, alive, capacity, rate


def window_mean(samples, lo, hi, k):
    xs = [s[k] for s in samples if lo <= s[0] <= hi and s[k] is not None]
    return sum(xs) / len(xs) if xs else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", default="build/server/multipole-server",
                    help="server binary to start (unless --url)")
    ap.add_argument("--model", default="models/default.gguf")
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--server-args", default="", help="more server options, one string")
    ap.add_argument("--url", help="a running server instead (with --pid for its memory)")
    ap.add_argument("--pid", type=int, help="the running server's process id")
    ap.add_argument("--duration", type=float, default=60, help="seconds of soak")
    ap.add_argument("--warmup", type=float,
                    help="first seconds of the soak left out of the memory comparison (malloc "
                         "arenas and caches filling; default: half of --duration, at most 60)")
    ap.add_argument("--capacity-seconds", type=float, default=15)
    ap.add_argument("--load", type=float, default=0.8, help="fraction of the capacity")
    ap.add_argument("--max-tokens", type=int, default=48, help="max_tokens is 1..this")
    ap.add_argument("--cancel-fraction", type=float, default=0.1)
    ap.add_argument("--bad-fraction", type=float, default=0.1)
    ap.add_argument("--ctx-limit", type=int, default=2048,
                    help="the server's --ctx-limit (passed to a server this script starts)")
    ap.add_argument("--max-body", type=int, default=1 << 20, help="the server's --max-body")
    ap.add_argument("--request-timeout", type=float, default=120)
    ap.add_argument("--rss-tolerance", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="append the results as one JSON line to this file")
    ap.add_argument("--curve", help="write the memory samples to this CSV file (seconds from the "
                                    "soak's start, RSS MiB, GPU MiB)")
    args = ap.parse_args()
    if args.warmup is None:
        args.warmup = min(60.0, args.duration / 2)

    proc = None
    if args.url:
        url, pid = args.url.rstrip("/"), args.pid
        if not pid:
            ap.error("--url needs --pid (the server's memory is read from /proc)")
    else:
        # Port 0: the server binds a free port and says which ("listening on URL"), so no other
        # process can take it between our choosing it and the server binding it.
        cmd = [args.server, "-m", args.model, "--port", "0", "--slots", str(args.slots),
               "--quiet", "--max-body", str(args.max_body), "--ctx-limit", str(args.ctx_limit)
               ] + args.server_args.split()
        log_path = os.environ.get("SOAK_SERVER_LOG")
        if not log_path:
            log_dir = tempfile.mkdtemp(prefix="soak-")
            atexit.register(shutil.rmtree, log_dir, True)
            log_path = os.path.join(log_dir, "server.log")
        log = open(log_path, "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        pid, url = proc.pid, None
        deadline = time.time() + 120
        while url is None:
            if proc.poll() is not None:
                with open(log_path) as f:
                    said = f.read()[-2000:]
                sys.exit(f"soak: the server exited at start ({proc.returncode}): {' '.join(cmd)}\n"
                         f"{said}")
            with open(log_path) as f:
                url = next((line.split()[-1] for line in f if line.startswith("listening on ")),
                           None)
            if url is None:
                if time.time() > deadline:
                    sys.exit("soak: the server did not start listening within 120 s")
                time.sleep(0.2)
    try:
        tally, samples, t0, t1, alive, capacity, rate = asyncio.run(soak(args, url, pid))
        if proc is not None and proc.poll() is not None:
            alive = False
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    if args.curve:
        with open(args.curve, "w") as f:
            f.write("seconds,rss_mib,gpu_mib\n")
            for t, rss, gpu in samples:
                f.write(f"{t - t0:.1f},{rss / 2**20:.1f},{'' if gpu is None else f'{gpu / 2**20:.0f}'}\n")
    t0 += args.warmup  # memory is compared from here on
    window = min(600.0, (t1 - t0) / 4)
    print("\n| outcome | requests |\n|---|---:|")
    for k in sorted(tally.outcomes):
        print(f"| {k} | {tally.outcomes[k]} |")
    fivexx = tally.fivexx
    print(f"| total | {sum(tally.outcomes.values())} |")
    ok = not tally.violations and alive
    mem = {}
    for name, k in (("RSS", 1), ("GPU memory", 2)):
        first, last = window_mean(samples, t0, t0 + window, k), window_mean(samples, t1 - window, t1, k)
        if first is None or last is None:
            continue
        drift = last / first - 1
        mem[name] = (first, last, drift)
        within = abs(drift) <= args.rss_tolerance
        ok &= within
        print(f"\n{name}: first {window:.0f} s {first / 2**20:.1f} MiB, last {window:.0f} s "
              f"{last / 2**20:.1f} MiB ({drift * 100:+.2f} %, limit "
              f"{args.rss_tolerance * 100:.0f} %){'' if within else '  VIOLATION'}")
    print(f"5xx other than 503: {fivexx}; server alive at the end: {'yes' if alive else 'NO'}")
    for v in tally.violations:
        print("violation:", v)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"capacity_rps": capacity, "offered_rps": rate,
                                "duration_s": t1 - t0, "outcomes": tally.outcomes,
                                "alive": alive, "memory": mem, "ok": ok}) + "\n")
    print("soak:", "passed" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
