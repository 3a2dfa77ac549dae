#!/usr/bin/env python3
"""Perplexity by position bucket on the long validation documents, computed by the engine
(multipole-perplexity, CPU backend): each document's first --max-doc tokens, with --ctx 0 the
whole prefix as context, with --ctx N windows of N tokens each from an empty state. Windows of
512 give every bucket past 512 the same spread of context, so what changes between those buckets
is the text alone.

usage: position_buckets.py MODEL.gguf DATA_DIR BUILD_DIR [--ctx N] [--max-doc N]
"""
import argparse
import json
import math
import os
import subprocess
import tempfile

import numpy as np

EDGES = [0, 512, 2048, 8192, 16384, 32768]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("build")
    ap.add_argument("--ctx", type=int, default=0)
    ap.add_argument("--max-doc", type=int, default=16384)
    args = ap.parse_args()
    val = np.fromfile(os.path.join(args.data, "val.bin"), dtype=np.uint16)
    docs = [d for d in json.load(open(os.path.join(args.data, "val_docs.json"))) if d["length"] > 8192]
    edges = [e for e in EDGES if e < args.max_doc] + [args.max_doc]
    total = [[] for _ in edges[1:]]
    print("| document | " + " | ".join(f"{a}-{b}" for a, b in zip(edges, edges[1:])) + " |")
    print("|---" * len(edges) + "|")
    with tempfile.TemporaryDirectory() as tmp:
        for d in docs:
            with open(f"{tmp}/ids.txt", "w") as f:
                f.write(" ".join(map(str, val[d["start"]:d["start"] + min(d["length"], args.max_doc)])))
            subprocess.run([f"{args.build}/tools/multipole-perplexity", "-m", args.model, "--ids",
                            "--ctx", str(args.ctx), "--nll-out", f"{tmp}/nll.json", f"{tmp}/ids.txt"],
                           check=True, capture_output=True)
            nll = np.array(json.load(open(f"{tmp}/nll.json")))  # nll[i]: token i + 1, seen from i
            row = []
            for b in range(len(edges) - 1):
                part = nll[edges[b]:edges[b + 1]]
                total[b].extend(part.tolist())
                row.append(f"{math.exp(part.mean()):.2f}" if len(part) else "-")
            print(f"| {d['source']} | " + " | ".join(row) + " |", flush=True)
    print("| **all** | " + " | ".join(f"**{math.exp(np.mean(t)):.2f}**" for t in total) + " |")


if __name__ == "__main__":
    main()
