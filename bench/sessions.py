#!/usr/bin/env python3
"""The fixed-size state as a serving feature, measured against a running multipole-server.

  prefix    a document of --doc-tokens token ids (or, with --text-words, a text of that many
            words) asked --questions questions one after another:
            the first reads the whole document (cold), the others restore it from the prefix
            cache; prints the time to first token of each and the ratio, and the cache's memory
            from /metrics
  sessions  one session holding a document of --doc-tokens tokens, forked into --sessions
            sessions (the server persists each in its --state-dir); prints the fork rate, the
            state directory's bytes, the server's memory (--server-pid), then resumes
            --resumes random sessions with a short turn: their time to first token and prompt
            tokens read, against the cold read of the document; with --resume-url the
            resumes go to another replica sharing the sessions (--session-store)

usage: sessions.py prefix|sessions [--url http://127.0.0.1:8080] [--doc-tokens N] ...
Standard library only.
"""
import argparse
import http.client
import json
import os
import random
import statistics
import time
import urllib.parse


class Client:
    def __init__(self, url):
        u = urllib.parse.urlparse(url)
        self.host, self.port = u.hostname, u.port or 80

    def call(self, method, path, body=None):
        c = http.client.HTTPConnection(self.host, self.port, timeout=3600)
        c.request(method, path, body=None if body is None else json.dumps(body),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        c.close()
        if r.status != 200:
            raise SystemExit(f"{method} {path}: {r.status} {data[:300]!r}")
        return json.loads(data) if data.strip().startswith(b"{") else data.decode()

    def ttft(self, body):
        """Streams a completion; returns (seconds to the first token, the final usage)."""
        body = dict(body, stream=True, stream_options={"include_usage": True})
        data = json.dumps(body)  # the client's own encoding is not the server's time
        c = http.client.HTTPConnection(self.host, self.port, timeout=3600)
        t0 = time.perf_counter()
        c.request("POST", "/v1/completions", body=data,
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            raise SystemExit(f"completion: {r.status} {r.read()[:300]!r}")
        first, usage = None, None
        for line in r:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            ev = json.loads(line[6:])
            if ev.get("choices") and first is None:
                first = time.perf_counter() - t0
            if ev.get("usage"):
                usage = ev["usage"]
        c.close()
        return first, usage

    def metric(self, name):
        for line in self.call("GET", "/metrics").splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return float("nan")


def doc_ids(n, seed, vocab=8000):
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at "
         "which but have an they you were her she there been one all we their has would when if "
         "so no will more can out up about into them some could time these two may then do first "
         "any my now such like our over man me even most made after also did many before must "
         "through back years where much your way well down should because each just those people "
         "kernel license memory process file system free software network page").split()


def doc_text(n_words, seed):
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def prefix(a, cl):
    # Token ids, or with --text-words a text of that many words (its tokenization included).
    doc = doc_text(a.text_words, 1) if a.text_words else doc_ids(a.doc_tokens, 1)
    rows = []
    for q in range(a.questions):
        question = " " + doc_text(12, 100 + q) if a.text_words else doc_ids(16, 100 + q)
        t, usage = cl.ttft({"prompt": doc + question, "max_tokens": 1, "temperature": 0})
        rows.append((q, t, usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]))
    print("| question | TTFT ms | prompt tokens | cached tokens |\n|---|---|---|---|")
    for q, t, p, c in rows:
        print(f"| {q + 1}{' (cold)' if q == 0 else ''} | {t * 1e3:.1f} | {p} | {c} |")
    warm = statistics.median(r[1] for r in rows[1:])
    print(f"\ncold TTFT {rows[0][1] * 1e3:.1f} ms, warm median {warm * 1e3:.1f} ms: "
          f"{warm / rows[0][1] * 100:.2f} % of cold")
    entries = cl.metric("multipole_prefix_cache_entries_in_slots") + \
        cl.metric("multipole_prefix_cache_entries_on_host")
    print(f"prefix cache: {entries:.0f} snapshots, host bytes "
          f"{cl.metric('multipole_prefix_cache_host_bytes') / 2**20:.1f} MiB")


def rss_mib(pid):
    if not pid:
        return float("nan")
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def dir_bytes(path):
    return sum(e.stat().st_size for e in os.scandir(path) if e.name.endswith(".session"))


def sessions(a, cl):
    doc = doc_ids(a.doc_tokens, 1)
    t0 = time.perf_counter()
    base = cl.call("POST", "/v1/sessions", {"id": "base", "prompt": doc})
    cold = time.perf_counter() - t0
    print(f"session 'base': {base['position']} tokens, {base['bytes']} state bytes, "
          f"created in {cold:.2f} s (the document's cold read)")
    t0 = time.perf_counter()
    for i in range(a.sessions):
        cl.call("POST", "/v1/sessions/base/fork", {"id": f"s{i}"})
    forks = time.perf_counter() - t0
    print(f"{a.sessions} forks in {forks:.1f} s ({a.sessions / forks:.0f}/s)")
    if a.state_dir:
        b = dir_bytes(a.state_dir)
        print(f"state directory: {b / 2**30:.2f} GiB, {b / (a.sessions + 1) / 2**20:.3f} MiB a session")
    print(f"server RSS: {rss_mib(a.server_pid):.0f} MiB; sessions in memory: "
          f"{cl.metric('multipole_sessions_memory_bytes') / 2**20:.0f} MiB")
    rng = random.Random(7)
    rows = []
    if a.resume_url:
        cl = Client(a.resume_url)
    for _ in range(a.resumes):
        sid = f"s{rng.randrange(a.sessions)}"
        t, usage = cl.ttft({"session": sid, "prompt": doc_ids(8, rng.randrange(1 << 30)),
                            "max_tokens": 1, "temperature": 0})
        info = cl.call("GET", f"/v1/sessions/{sid}")
        rows.append((sid, t, usage["prompt_tokens"], info["position"]))
    print("\n| session | TTFT ms | prompt tokens read | position after |\n|---|---|---|---|")
    for sid, t, p, pos in rows:
        print(f"| {sid} | {t * 1e3:.1f} | {p} | {pos} |")
    med = statistics.median(r[1] for r in rows)
    print(f"\nresume median TTFT {med * 1e3:.1f} ms against the cold read {cold * 1e3:.0f} ms "
          f"({med / cold * 100:.2f} %)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("scenario", choices=["prefix", "sessions"])
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--doc-tokens", type=int, default=100_000)
    p.add_argument("--text-words", type=int, default=0, help="prefix: a text document instead")
    p.add_argument("--questions", type=int, default=6)
    p.add_argument("--sessions", type=int, default=10_000)
    p.add_argument("--resumes", type=int, default=20)
    p.add_argument("--state-dir", default="")
    p.add_argument("--resume-url", default="", help="resume on this replica (sessions scenario)")
    p.add_argument("--server-pid", type=int, default=0)
    a = p.parse_args()
    cl = Client(a.url)
    (prefix if a.scenario == "prefix" else sessions)(a, cl)


if __name__ == "__main__":
    main()
