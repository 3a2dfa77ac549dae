#!/usr/bin/env python3
"""Where an FMA model's attention goes: per layer, the mean attention probability that queries at
positions [--from, n) give the fine keys (the 2m tokens around them, exact) and each level's
summaries, over windows of n tokens at the starts of the longest validation documents.
usage: attention_mass.py HF_DIR CORPUS_DIR [--windows 4] [--from 4096] [--device cpu]"""
import argparse

import numpy as np
import torch

from corpus import load_val
from fma_model import load_hf


def attention_mass(model, windows, start):
    """[layers, 1 + levels]: the mean over heads, queries from `start` on, and windows."""
    attns = [layer.self_attn for layer in model.model.layers]
    total = None
    for ids in windows:
        for a in attns:
            a.mass = []
        with torch.no_grad():
            model.hidden(torch.from_numpy(ids.astype(np.int64))[None])
        m = torch.stack([a.mass[0][0, :, start:].mean((0, 1)) for a in attns])
        total = m if total is None else total + m
    for a in attns:
        a.mass = None
    return total / len(windows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("hf")
    ap.add_argument("data")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--from", dest="start", type=int, default=4096)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    model, cfg = load_hf(args.hf, args.device, None)
    model.eval()
    n = cfg.max_position_embeddings
    val, docs = load_val(args.data)
    longest = sorted(docs, key=lambda d: -d["length"])[:args.windows]
    mass = attention_mass(model, [val[d["start"]:d["start"] + n] for d in longest], args.start)
    levels = mass.shape[1] - 1
    print(f"{len(longest)} windows of {n} tokens, queries {args.start}-{n}: mean attention mass")
    print("| layer | fine (2m) | " + " | ".join(
        f"level {l} (w {cfg.group_size(l)}, p {cfg.rank(l)})" for l in range(1, levels + 1))
        + " | all summaries |")
    print("|---" * (levels + 3) + "|")
    for i, row in enumerate(mass.tolist()):
        print(f"| {i} | " + " | ".join(f"{x:.3f}" for x in row) + f" | {sum(row[1:]):.3f} |")


if __name__ == "__main__":
    main()
