#!/usr/bin/env python3
"""End to end through the real router (issue 19): scripts/cluster.sh starts redis-server, three
multipole-server replicas (a random test model, CPU) and haproxy with deploy/haproxy.cfg, all on
loopback; then
  - a 10-turn conversation whose turns go to the replicas' own ports chosen at random and through
    haproxy (the session named by the X-Session-Id header or the body's "session") equals the same
    conversation on one replica: texts, token counts, positions; haproxy sends every request on
    one session to one replica (consistent hashing), requests without a session round robin;
  - a replica killed with SIGKILL in the middle of a turn: the client's retry through haproxy lands
    on another replica and continues from the last completed turn (the same text and position as
    one replica's conversation: no turn applied twice); the failures before it are haproxy's
    502/503 naming the killed replica and the living replicas' 409 with Retry-After;
  - every record in Redis passes its checksum (the engine's hash_bytes, computed here);
  - cluster.sh stop ends every process; the replicas' logs hold no sanitizer report.
usage: test_cluster.py BUILD_DIR     (standard library only)
"""
import collections
import http.client
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TURNS = 10


def expect(ok, what):
    if not ok:
        raise AssertionError(what)


# An answer: its status, the replica haproxy sent the request to (None from a replica's own port),
# its body (parsed where it is JSON, as every replica's; else the text: haproxy's own error pages
# are HTML) and its Retry-After header.
Reply = collections.namedtuple("Reply", "status replica body retry_after")


def call(port, method, path, body=None, session_header=None, timeout=60):
    headers = {"Content-Type": "application/json"}
    if session_header:
        headers["X-Session-Id"] = session_header
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
    r = c.getresponse()
    data = r.read()
    c.close()
    is_json = (r.getheader("Content-Type") or "").startswith("application/json")
    return Reply(r.status, r.getheader("X-Multipole-Replica"),
                 json.loads(data) if is_json else data.decode(errors="replace"),
                 r.getheader("Retry-After"))


def ok(port, method, path, body=None, session_header=None):
    reply = call(port, method, path, body, session_header)
    expect(reply.status == 200, f"{method} {path} on port {port}: {reply}")
    return reply.replica, reply.body


def free_base_port():
    """A port P with P..P+4 free (haproxy, three replicas, redis), below the kernel's ephemeral
    range: no port 0 bind (other tests' servers) and no outgoing connection takes one of them
    before cluster.sh binds it."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral = int(f.read().split()[0])
    rng = random.Random()
    for _ in range(100):
        base = rng.randrange(10000, ephemeral - 5)
        socks = []
        try:
            for p in range(base, base + 5):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            pass
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no five free ports in a row")


def hash_bytes(b):
    """engine/src/fma_cpu.cpp's hash_bytes (the records' checksum)."""
    m = (1 << 64) - 1
    k1, k2 = 0x87c37b91114253d5, 0x4cf5ad432745937f
    rotl = lambda x: ((x << 31) | (x >> 33)) & m
    h = 0x9e3779b97f4a7c15
    n8 = len(b) // 8 * 8
    for (w,) in struct.iter_unpack("<Q", b[:n8]):
        h = rotl(h ^ (w * k1 & m)) * k2 & m
    tail = int.from_bytes(b[n8:], "little")
    h = (rotl(h ^ (tail * k1 & m)) * k2 & m) ^ len(b)
    h ^= h >> 33
    h = h * 0xff51afd7ed558ccd & m
    return h ^ (h >> 33)


def redis_command(port, *args):
    """One command in RESP over a socket; its bulk string reply (binary-safe) or None."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"*%d\r\n" % len(args) +
                  b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in (x.encode() for x in args)))
        f = s.makefile("rb")
        line = f.readline()
        expect(line[:1] == b"$", f"redis: {args[0]}: {line!r}")
        n = int(line[1:])
        return None if n < 0 else f.read(n + 2)[:-2]


def check_record(record, sid):
    """A session record (engine/common/sessions.h): magic, header, state, checksum."""
    expect(record[:8] == b"MPSESS01", f"session {sid}: bad magic")
    (n,) = struct.unpack("<I", record[8:12])
    header = json.loads(record[12:12 + n])
    (stored,) = struct.unpack("<Q", record[-8:])
    expect(stored == hash_bytes(record[:-8]), f"session {sid}: checksum mismatch")
    expect(header["id"] == sid, f"session {sid}: the record names {header['id']}")
    return header


class Cluster:
    def __init__(self, build, work):
        self.build, self.dir = build, os.path.join(work, "run")
        self.use_ports(free_base_port())
        self.model = os.path.join(work, "model.gguf")
        subprocess.run([f"{build}/tests/make-test-checkpoint", os.path.join(work, "hf")],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run([f"{build}/tools/multipole-convert", os.path.join(work, "hf"), self.model],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def use_ports(self, base):
        self.port = base
        self.replicas = {f"replica{i}": base + i for i in (1, 2, 3)}

    def start(self, *server_options):
        """cluster.sh start; on other ports where one was taken before it bound it (3 tries)."""
        for _ in range(3):
            started = self.script("start", "--", *server_options)
            if started.returncode == 0 or "bind" not in started.stdout:
                return started
            print(f"ports {self.port}-{self.port + 4}: one was taken; others", file=sys.stderr)
            self.use_ports(free_base_port())
        return started

    def script(self, action, *extra):
        env = dict(os.environ, MULTIPOLE_BUILD=self.build)
        return subprocess.run([f"{ROOT}/scripts/cluster.sh", action, "--dir", self.dir, "--port",
                               str(self.port), "--model", self.model, *extra], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def pid(self, name):
        with open(os.path.join(self.dir, name + ".pid")) as f:
            return int(f.read())


def words(i):
    return f" turn {i}:"


def turn_body(i, max_tokens=6):
    return {"prompt": words(i), "max_tokens": max_tokens, "temperature": 0.8, "seed": 100 + i}


def summary(out):
    """What must match between two runs of one turn."""
    return (out["choices"][0]["text"], out["usage"]["prompt_tokens"],
            out["usage"]["completion_tokens"], out["session"]["position"])


def one_replica(c, sid, turns, port=None):
    """The conversation on one replica's own port."""
    port = port or c.replicas["replica1"]
    ok(port, "POST", "/v1/sessions", {"id": sid})
    return [summary(ok(port, "POST", "/v1/completions", dict(b, session=sid))[1]) for b in turns]


def conversation_across_replicas(c, rng):
    turns = [turn_body(i) for i in range(TURNS)]
    want = one_replica(c, "solo", turns)
    direct = list(c.replicas.values())
    ok(rng.choice(direct + [c.port]), "POST", "/v1/sessions", {"id": "spread"})
    via_router = set(rng.sample(range(TURNS), 4))  # the other turns: a replica's own port
    got, routed, plan = [], set(), []
    for i, body in enumerate(turns):
        port = c.port if i in via_router else rng.choice(direct)
        # Through haproxy the session is named by the header, by the body, or both.
        how = rng.choice(["header", "body", "both"]) if port == c.port else "body"
        plan.append(f"{'router' if port == c.port else port}/{how}")
        replica, out = ok(port, "POST", "/v1/completions",
                          body if how == "header" else dict(body, session="spread"),
                          session_header="spread" if how != "body" else None)
        if port == c.port:
            routed.add(replica)
        got.append(summary(out))
    expect(got == want, f"turns {plan}:\n got  {got}\n want {want}")
    expect(len(routed) == 1, f"one session went to several replicas through haproxy: {routed}")
    # Requests without a session: round robin (along the hash ring, so not strictly in turn).
    plain = {ok(c.port, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 1})[0]
             for _ in range(9)}
    expect(len(plain) >= 2, f"requests without a session all went to {plain}")
    print(f"conversation: {TURNS} turns ({', '.join(plan)}) equal one replica's; "
          f"haproxy sent the session to {routed or 'no replica'}, plain requests to {sorted(plain)}")


def kill_mid_turn(c):
    done = [turn_body(i) for i in range(3)]
    # Long enough (about 1 s at 20,000 tokens/s) that the kill, right after the first token,
    # lands mid-turn on a loaded machine too (3,000 tokens, 0.15 s, were once all sent before it).
    long_turn = dict(turn_body(3, max_tokens=20000), ignore_eos=True)
    ok(c.port, "POST", "/v1/sessions", {"id": "killed"})
    for body in done:
        ok(c.port, "POST", "/v1/completions", body, session_header="killed")
    before = ok(c.port, "GET", "/v1/sessions/killed")[1]["position"]
    # The long turn, streamed through haproxy; its replica is killed after the first token.
    conn = http.client.HTTPConnection("127.0.0.1", c.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(dict(long_turn, stream=True)),
                 {"Content-Type": "application/json", "X-Session-Id": "killed"})
    r = conn.getresponse()
    expect(r.status == 200, f"the long turn: {r.status}")
    victim = r.getheader("X-Multipole-Replica")
    expect(r.readline().startswith(b"data: "), "the long turn sent no token")
    os.kill(c.pid(victim), signal.SIGKILL)
    rest = b""
    try:
        rest = r.read()
    except (http.client.HTTPException, OSError):
        pass  # the connection broke: what the client sees of a dead replica
    conn.close()
    expect(b"[DONE]" not in rest, "the turn finished before its replica was killed")
    # The client's retry of that turn, through haproxy, until it is served. Meanwhile: haproxy's own
    # 502 (a connection to the killed replica that broke) or 503 (none could be made), naming that
    # replica, until its health checks take it out; a living replica's 409 while the dead one's
    # claim stands (until its liveness key lapses, 3 s), retried after its Retry-After.
    t0, tries = time.time(), []
    while True:
        reply = call(c.port, "POST", "/v1/completions", long_turn, session_header="killed")
        tries.append(reply.status)
        if reply.status == 200 or time.time() - t0 > 20:
            break
        if reply.status == 409:
            expect(reply.replica != victim and isinstance(reply.body, dict) and
                   reply.body["error"]["code"] == "session_conflict" and reply.retry_after == "1",
                   f"retry: a 409 that is not a living replica's busy session: {reply}")
            time.sleep(float(reply.retry_after))
        else:
            expect(reply.status in (502, 503) and reply.replica == victim and
                   isinstance(reply.body, str) and f"<h1>{reply.status} " in reply.body,
                   f"retry: not haproxy's error page for the killed {victim}: {reply}")
            time.sleep(0.2)
    expect(reply.status == 200, f"the retries got {tries}")
    replica, out = reply.replica, reply.body
    expect(replica != victim, f"the retry went to the killed {victim}")
    alive = next(p for n, p in c.replicas.items() if n != victim)
    want = one_replica(c, "killed-ref", done + [long_turn], port=alive)
    ref_before = want[2][3]
    expect(before == ref_before, f"position before the killed turn {before}, want {ref_before}")
    expect(summary(out) == want[3], f"the retried turn {summary(out)[1:]} != {want[3][1:]}")
    after = ok(c.port, "GET", "/v1/sessions/killed")[1]["position"]
    expect(after == want[3][3], f"position after the retry {after}, want {want[3][3]}")
    print(f"kill: {victim} killed mid-turn at position {before}; retries {tries} over "
          f"{time.time() - t0:.1f} s; {replica} continued to {after}, as one replica did")
    return victim


def records_intact(c, victim):
    alive = next(p for n, p in c.replicas.items() if n != victim)
    listed = ok(alive, "GET", "/v1/sessions")[1]["data"]
    ids = sorted(s["id"] for s in listed)
    expect(ids == ["killed", "killed-ref", "solo", "spread"], f"sessions {ids}")
    for s in listed:
        record = redis_command(c.port + 4, "GET", "multipole:session:" + s["id"])
        header = check_record(record, s["id"])
        expect(header["position"] == s["position"], f"{s['id']}: position {header['position']}")
        corrupt = bytearray(record)
        corrupt[len(record) // 2] ^= 1
        expect(hash_bytes(bytes(corrupt[:-8])) != hash_bytes(record[:-8]), "the checksum missed a bit")
    print(f"records: {len(listed)} sessions in Redis, checksums and positions correct")


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    build = os.path.abspath(sys.argv[1])
    work = tempfile.mkdtemp(prefix="multipole-cluster-")
    seed = int(os.environ.get("SEED", random.randrange(1 << 30)))
    print(f"SEED={seed}")
    t0 = time.time()
    c = Cluster(build, work)
    started = c.start("--threads", "1", "--slots", "4")
    expect(started.returncode == 0, f"cluster.sh start failed:\n{started.stdout}")
    try:
        conversation_across_replicas(c, random.Random(seed))
        victim = kill_mid_turn(c)
        records_intact(c, victim)
    except BaseException:
        for name in ("haproxy", "replica1", "replica2", "replica3", "redis"):
            path = os.path.join(c.dir, name + ".log")
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    print(f"--- {name}.log\n{f.read()[-2000:]}", file=sys.stderr)
        raise
    finally:
        pids = [c.pid(n) for n in ("haproxy", "replica1", "replica2", "replica3", "redis")
                if os.path.exists(os.path.join(c.dir, n + ".pid"))]
        stopped = c.script("stop")
        left = [p for p in pids if os.path.exists(f"/proc/{p}") and
                open(f"/proc/{p}/stat").read().split()[2] != "Z"]
        # A sanitizer build's findings (the replicas report leaks as they exit on stop).
        findings = []
        for name in ("replica1", "replica2", "replica3"):
            with open(os.path.join(c.dir, name + ".log"), errors="replace") as f:
                findings += [f"{name}: {line.strip()}" for line in f
                             if "runtime error:" in line or "Sanitizer" in line]
        shutil.rmtree(work, ignore_errors=True)
    expect(stopped.returncode == 0, f"cluster.sh stop failed:\n{stopped.stdout}")
    expect(not left, f"processes left after cluster.sh stop: {left}")
    expect(not findings, "sanitizer reports:\n" + "\n".join(findings[:20]))
    print(f"stop: {len(pids)} processes ended; {time.time() - t0:.1f} s in all")


if __name__ == "__main__":
    main()
