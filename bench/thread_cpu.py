#!/usr/bin/env python3
"""CPU seconds (user + system) of a process's threads, summed by thread name (the server names
its threads: mp-step-N, mp-events, mp-http; others keep the program's name), since the previous
call with the same state file. Used by bench/serve_gpu.sh to say where the server's host time
goes. usage: thread_cpu.py PID STATE_FILE"""
import glob
import json
import os
import re
import sys

pid, state_file = sys.argv[1], sys.argv[2]
hz = os.sysconf("SC_CLK_TCK")
now = {}
for stat in glob.glob(f"/proc/{pid}/task/*/stat"):
    try:
        text = open(stat).read()
    except OSError:  # the thread ended meanwhile
        continue
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    group = re.sub(r"-\d+$", "", name)
    now[group] = now.get(group, 0) + ticks
before = json.load(open(state_file)) if os.path.exists(state_file) else {}
json.dump(now, open(state_file, "w"))
parts = sorted(((now[g] - before.get(g, 0)) / hz, g) for g in now)
print("; ".join(f"{g} {s:.2f} s" for s, g in reversed(parts) if s > 0.005))
