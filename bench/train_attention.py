#!/usr/bin/env python3
"""Training's FMA attention, forward and backward, at the full model's shape (tools/train/train.py
--size full: 8 heads, 4 KV heads, d 64, n 8192, the summaries included) on one GPU, bf16, each
variant under torch.compile: gather (fma_attention: per-block key lists, SDPA with a float mask),
flash (fma_attention_flash: a causal SDPA call a fine block, FlashAttention) and flex
(fma_attention_flex: one FlexAttention call with a block mask), against exact causal attention
(SDPA, FlashAttention) at the same shape as the baseline measured in the same run.
usage: bench/train_attention.py [--windows 8] [--reps 10] [--block-size M --ranks R,R] [--flex]
(--flex adds the flex row: its compilation outlasted 250 s at this shape in session 15)"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools", "train"))
from fma_model import (Downsample, exact_attention, fma_attention, fma_attention_flash,  # noqa: E402
                       fma_attention_flex)
from train import model_config  # noqa: E402


def timed(f, reps):
    f()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        f()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8, help="sequences of n tokens (a micro-batch)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--flex", action="store_true", help="also time fma_attention_flex")
    ap.add_argument("--block-size", type=int, help="m (default the full model's 64)")
    ap.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")],
                    help="per-level ranks matching --block-size (e.g. 4,4 at m = 1024)")
    args = ap.parse_args()
    cfg = model_config(exact=False, size="full", ranks=args.ranks, block_size=args.block_size)
    B, H, KV, d, T = (args.windows, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                      cfg.max_position_embeddings)
    torch.manual_seed(0)
    kd, vd = Downsample(cfg, keys=True).cuda(), Downsample(cfg).cuda()
    for conv in (*kd, *vd):
        torch.nn.init.normal_(conv.weight, std=0.3)
    q = torch.randn(B, H, T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, KV, T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    grad = torch.randn(B, H, T, d, device="cuda", dtype=torch.bfloat16)
    variants = {
        "exact causal (SDPA)": torch.compile(lambda: exact_attention(q, k, v)),
        "FMA gather": torch.compile(lambda: fma_attention(cfg, q, k, v, kd, vd)),
        "FMA flash": torch.compile(lambda: fma_attention_flash(cfg, q, k, v, kd, vd)),
    }
    if args.flex:
        variants["FMA flex"] = torch.compile(lambda: fma_attention_flex(cfg, q, k, v, kd, vd))
    print(f"# {torch.cuda.get_device_name()}, PyTorch {torch.__version__}: {B} windows x {T} tokens, "
          f"{H} heads, {KV} KV heads, d {d}, m {cfg.fma_block_size}, ranks {cfg.fma_ranks}, bf16")
    print("| attention | forward + backward ms | tokens/s (one layer) |")
    print("|---|---|---|", flush=True)
    outputs, rows = {}, []
    for name, f in variants.items():
        def step():
            with torch.autocast("cuda", torch.bfloat16):
                out = f()
            out.backward(grad)
            return out
        outputs[name] = step().detach().float()
        both = timed(step, args.reps)
        rows.append((name, both))
        print(f"| {name} | {both:.3f} | {B * T / both * 1e3:,.0f} |", flush=True)
    print(f"FMA gather against exact causal: {rows[1][1] / rows[0][1]:.2f}x the time")
    for name, time in rows[2:]:
        err = ((outputs[name] - outputs["FMA gather"]).norm() / outputs["FMA gather"].norm()).item()
        print(f"{name}: {time / rows[1][1]:.2f}x gather's time; outputs' relative difference "
              f"{err:.1e} (bf16)")
        assert err < 2e-2, (name, err)


if __name__ == "__main__":
    main()
