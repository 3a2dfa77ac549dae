#!/usr/bin/env python3
"""Baselines for bench_cuda, measured in the same run: PyTorch SDPA (exact causal attention,
FlashAttention backend) and the plain PyTorch FMA (tools/train/fma_model.py) at the shapes of the
FMA prefill table, and SDPA's decode step over a KV cache. bf16, batch 1, 16 heads, d 64."""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools", "train"))
from fma_model import Downsample, FmaConfig, fma_attention  # noqa: E402


def bench(f, reps=5):
    f()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        f()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main():
    dev = "cuda"
    print(f"# PyTorch {torch.__version__} baselines on {torch.cuda.get_device_name()}\n")
    src = torch.empty(2 << 30, dtype=torch.uint8, device=dev).random_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), 10)
    print(f"device copy: {2 * src.numel() / ms / 1e9:.2f} TB/s (bytes read + written)\n")
    src = dst = None  # the 4 GiB freed before the attention rows
    print("| n | SDPA causal ms | plain PyTorch FMA ms | FMA peak GB |\n|---|---|---|---|")
    for n in (4096, 16384, 65536, 262144, 1048576):
        q, k, v = (torch.randn(1, 16, n, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
        sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), 3 if n > 65536 else 5)
        cfg = FmaConfig(num_attention_heads=16, num_key_value_heads=16, head_dim=64,
                        max_position_embeddings=n, fma_block_size=64, fma_rank=4)
        kd, vd = Downsample(cfg).to(dev), Downsample(cfg).to(dev)
        torch.cuda.reset_peak_memory_stats()
        try:
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                fma = bench(lambda: fma_attention(cfg, q, k, v, kd, vd), 3)
            peak = torch.cuda.max_memory_allocated() / 1e9
            fma_s = f"{fma:.2f}"
        except torch.OutOfMemoryError:
            fma_s, peak = "out of memory", float("nan")
        print(f"| {n} | {sdpa:.2f} | {fma_s} | {peak:.1f} |", flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    print("\n| KV context | SDPA decode step ms, batch 1 | batch 16 |\n|---|---|---|")
    for ctx in (1024, 4096, 65536, 1048576):
        row = []
        for batch in (1, 16):
            if batch * ctx > 16 * 65536 * 4:
                row.append("-")
                continue
            q = torch.randn(batch, 16, 1, 64, device=dev, dtype=torch.bfloat16)
            k, v = (torch.randn(batch, 16, ctx, 64, device=dev, dtype=torch.bfloat16) for _ in range(2))
            row.append(f"{bench(lambda: F.scaled_dot_product_attention(q, k, v), 20):.4f}")
        print(f"| {ctx} | {row[0]} | {row[1]} |", flush=True)


if __name__ == "__main__":
    main()
