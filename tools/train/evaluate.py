#!/usr/bin/env python3
"""Held-out evaluation of a trained model (train.py's OUT/hf folder) on the validation split
(val.bin, or the val stream of a sharded corpus's shards.json).

Prints and writes JSON with: perplexity at context 512 and 8192 (the validation stream cut into
windows, each from an empty state), perplexity by position bucket on the long validation
documents (each evaluated whole, up to --max-doc tokens; --no-whole-docs: not these, as proxy
runs are scored), perplexity by position on the same text (by_position_same_text;
--same-text-docs N: over the first N long documents), and a parity sample: the per-token NLL of
the first --parity-tokens validation tokens at context 8192 in float32, for comparison with
multipole-perplexity (engine_parity.py).

With --contexts only the perplexity at those contexts (and the parity sample at the largest);
with --fma an exact-attention folder (a Llama-family one) is evaluated as multipole-convert --fma
would make it.

usage: evaluate.py HF_DIR DATA_DIR OUT.json [--device cuda] [--max-doc N] [--contexts 512,2048]
       [--max-tokens N] [--parity-only] [--same-text-docs N] [--no-whole-docs]
       [--fma avgpool|groupedconv --block-size M --rank P [--trained-length N]]
"""
import argparse
import contextlib
import json
import math
import time

import numpy as np
import torch

from corpus import load_val
from fma_model import load_hf


@torch.no_grad()
def nll_rows(model, rows, device, bf16, batch_tokens=65536):
    """Per-token NLL [R, L - 1] of rows [R, L] of ids, each row on its own from an empty state;
    the rows go through the model in batches of about batch_tokens tokens."""
    per_batch = max(1, batch_tokens // rows.shape[1])
    out = []
    for i in range(0, len(rows), per_batch):
        w = torch.from_numpy(rows[i:i + per_batch].astype(np.int64)).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            out.append(model.nll(w).float().cpu())
    return torch.cat(out)


def nll_windows(model, ids, ctx, device, bf16):
    """Per-token NLL of ids cut into windows of ctx (the last one shorter), each window from an
    empty state: its first token is not predicted."""
    full = len(ids) // ctx
    parts = [nll_rows(model, ids[:full * ctx].reshape(full, ctx), device, bf16).reshape(-1)] \
        if full else []
    if len(ids) - full * ctx >= 2:
        parts.append(nll_rows(model, ids[None, full * ctx:], device, bf16)[0])
    return torch.cat(parts)


def by_position_same_text(model, val, docs, device, bf16, n=8192, step=1024, max_docs=None):
    """Perplexity by position with the text held fixed. On whole documents a position bucket also
    changes the text (documents open with titles and tables of contents), so here every token t of
    [n, 2n) of each document of at least 2n tokens (the first max_docs of them) is scored at
    n / step positions: in the windows of n tokens that start at s = t - n + step, ..., t
    (multiples of step). Each bucket then holds the same tokens, and only the context before them
    differs."""
    edges = [e for e in (0, 128, 512, 1024, 2048, 4096) if e < n] + [n]
    sums, counts = np.zeros(len(edges) - 1), np.zeros(len(edges) - 1)
    bucket = np.searchsorted(edges, np.arange(n), side="right") - 1
    long_docs = [d for d in docs if d["length"] >= 2 * n][:max_docs]
    for d in long_docs:
        doc = val[d["start"]:d["start"] + d["length"]]
        starts = range(step, 2 * n, step)
        full = [s for s in starts if s + n <= len(doc)]  # batched; the rest one by one
        nlls = dict(zip(full, nll_rows(model, np.stack([doc[s:s + n] for s in full]), device,
                                       bf16).numpy())) if full else {}
        for s in starts:
            nll = nlls[s] if s in nlls else nll_windows(model, doc[s:], n, device, bf16).numpy()
            pos = np.arange(len(nll))
            keep = (s + 1 + pos >= n) & (s + 1 + pos < 2 * n)  # nll[i]: token s + 1 + i, seen from i
            np.add.at(sums, bucket[pos[keep]], nll[keep])
            np.add.at(counts, bucket[pos[keep]], 1)
    return {"same_text_docs": len(long_docs),
            "ppl_by_position_same_text": {f"{edges[b]}-{edges[b + 1]}": math.exp(sums[b] / counts[b])
                                          for b in range(len(edges) - 1) if counts[b]}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("hf")
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-doc", type=int, default=32768)
    ap.add_argument("--parity-tokens", type=int, default=16384)
    ap.add_argument("--contexts", help="comma-separated contexts: only these windowed perplexities")
    ap.add_argument("--max-tokens", type=int,
                    help="the windowed perplexities on the first N validation tokens only")
    ap.add_argument("--parity-only", action="store_true",
                    help="only the parity sample (at context 8192): a CPU can make it")
    ap.add_argument("--same-text-docs", type=int,
                    help="the same-text buckets over the first N long documents only")
    ap.add_argument("--no-whole-docs", action="store_true",
                    help="no buckets over whole documents (a proxy run's verdict needs the "
                         "same-text ones: proxy_evals_gpu.sh)")
    ap.add_argument("--fma", choices=["avgpool", "groupedconv"])
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--trained-length", type=int)
    args = ap.parse_args()
    t0 = time.time()
    fma = args.fma and dict(downsampling=args.fma, block_size=args.block_size, rank=args.rank,
                            trained_length=args.trained_length)
    model, cfg = load_hf(args.hf, args.device, fma)
    model.eval()
    val, docs = load_val(args.data)
    bf16 = args.device == "cuda"
    res = {"model": "fma" if cfg.fma_enabled else "exact", "val_tokens": int(len(val))}
    contexts = [int(c) for c in args.contexts.split(",")] if args.contexts else [512, 8192]
    if args.parity_only:
        finish(res, model, val[:args.parity_tokens], 8192, args, t0)
        return
    for ctx in contexts:
        nll = nll_windows(model, val[:args.max_tokens], ctx, args.device, bf16)
        res[f"ppl_ctx{ctx}"] = math.exp(nll.mean().item())
    if args.contexts:
        finish(res, model, val[:args.parity_tokens], max(contexts), args, t0)
        return
    if not args.no_whole_docs:
        res.update(by_position_whole_docs(model, val, docs, cfg, args.max_doc, args.device, bf16))
    res.update(by_position_same_text(model, val, docs, args.device, bf16,
                                     max_docs=args.same_text_docs))
    finish(res, model, val[:args.parity_tokens], 8192, args, t0)


def by_position_whole_docs(model, val, docs, cfg, max_doc, device, bf16):
    """Perplexity by position bucket on the long documents, each evaluated whole from its start
    (up to max_doc tokens; an exact-attention model up to 8192)."""
    edges = [0, 512, 2048, 8192, max_doc]
    sums, counts = [0.0] * 4, [0] * 4
    long_docs = [d for d in docs if d["length"] > 8192]
    for d in long_docs:
        n = min(d["length"], max_doc if cfg.fma_enabled else 8192)
        ids = val[d["start"]:d["start"] + n]
        nll = nll_windows(model, ids, n, device, bf16)
        for b in range(4):
            part = nll[edges[b]:edges[b + 1]]
            sums[b] += part.sum().item()
            counts[b] += part.numel()
    return {"long_docs": len(long_docs),
            "ppl_by_position": {f"{edges[b]}-{edges[b + 1]}": math.exp(sums[b] / counts[b])
                                for b in range(4) if counts[b]}}


def finish(res, model, ids, ctx, args, t0):
    """Adds the parity sample (float32, the weights as stored: bf16-rounded) and writes res."""
    nll = nll_windows(model.float(), ids, ctx, args.device, False)
    res["parity"] = {"tokens": ids.tolist(), "ctx": ctx, "nll": nll.tolist()}
    res["eval_seconds"] = time.time() - t0
    json.dump(res, open(args.out, "w"))
    print(json.dumps({k: v for k, v in res.items() if k != "parity"}, indent=1))


if __name__ == "__main__":
    main()
