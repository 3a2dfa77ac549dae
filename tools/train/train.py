#!/usr/bin/env python3
"""Trains an FMA (or exact-attention) model on the tokenized corpus of prepare_corpus.py.

bf16 autocast, AdamW, linear warm-up then cosine decay, gradient clipping. Each run trains for at
most --minutes and leaves OUT/last.pt, which the next run resumes (model, optimiser, step, data
position, schedule). The schedule's length is fixed on the first run: --plan-steps, or the steps
that fit in --plan-minutes of training at the speed measured over its first steps. When the plan
is done, the run exports the Hugging Face folder OUT/hf (bf16 safetensors) for multipole-convert.

Llama-family checkpoints: --llama pretrains an exact-attention model with an untied head and
exports it as a LlamaForCausalLM folder (a stand-in for a pretrained checkpoint from elsewhere);
--init HF_DIR starts from such a folder (or one of ours) and, unless --exact, uptrains it as an
FMA model (--downsampling, --rank, --block-size, --trained-length, as multipole-convert --fma:
groupedconv summaries start as average pooling); --freeze trains the summary weights only.

usage: train.py --data DIR --out DIR [--exact] [--minutes M] [--plan-minutes M] ...
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch

from fma_model import FmaConfig, FmaModel, load_hf, save_hf


def llama_config(tiny, context):
    """The small Llama-architecture model pretrained here: exact attention, untied head, GQA."""
    if tiny:
        return FmaConfig(vocab_size=8192, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=32, intermediate_size=128,
                         tie_word_embeddings=False, max_position_embeddings=context,
                         fma_enabled=False)
    return FmaConfig(vocab_size=8192, hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                     num_key_value_heads=2, head_dim=64, intermediate_size=1024,
                     tie_word_embeddings=False, max_position_embeddings=context, fma_enabled=False)


def model_config(exact, tiny=False, downsampling="groupedconv", rank=2, scale_attn=True,
                 rotary_summaries=False, ranks=None):
    if tiny:  # for smoke tests of the pipeline
        return FmaConfig(vocab_size=8192, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=32, intermediate_size=128,
                         max_position_embeddings=256, fma_enabled=not exact, fma_block_size=16,
                         fma_rank=2, fma_rotary_summaries=rotary_summaries, fma_ranks=ranks)
    return FmaConfig(vocab_size=8192, hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                     num_key_value_heads=2, head_dim=64, intermediate_size=1024,
                     tie_word_embeddings=True, max_position_embeddings=8192, fma_enabled=not exact,
                     fma_block_size=64, fma_rank=rank, fma_downsampling=downsampling,
                     fma_scale_attn=scale_attn, fma_rotary_summaries=rotary_summaries,
                     fma_ranks=ranks)


def param_groups(model, cfg):
    """AdamW's parameter groups. Adam moves every weight by about lr a step whatever its size, but
    a level-l summary weight is about 1/w_l (it starts as a mean over w_l keys): at the shared lr
    the far levels' weights (1/2048) drown in noise within a few steps. Their lr is scaled by
    m / w_l, so every level moves by the same fraction of its size, and they are not decayed."""
    groups = {}
    for name, prm in model.named_parameters():
        if not prm.requires_grad:
            continue
        scale, decay = 1.0, (0.1 if prm.dim() >= 2 else 0.0)
        if ".fma." in name and name.endswith(".weight"):  # self_attn.fma.{k,v}_down.<level-1>
            scale, decay = cfg.fma_block_size / cfg.group_size(int(name.split(".")[-2]) + 1), 0.0
        groups.setdefault((scale, decay), []).append(prm)
    return [{"params": ps, "lr_scale": s, "weight_decay": wd} for (s, wd), ps in groups.items()]


def lr_at(step, total, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--exact", action="store_true", help="exact attention (the baseline twin)")
    ap.add_argument("--minutes", type=float, default=9.0, help="wall-clock budget of this run")
    ap.add_argument("--plan-minutes", type=float, default=9.0, help="training time of the whole plan")
    ap.add_argument("--plan-steps", type=int, help="the plan's length in steps, instead of in time "
                    "(to give two models the same tokens)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--final", action="store_true",
                    help="export at the end of this run even if the plan is not finished")
    ap.add_argument("--downsampling", default="groupedconv", choices=["avgpool", "groupedconv", "conv"])
    ap.add_argument("--rank", type=int, default=2, help="FMA rank p: summaries per group")
    ap.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")],
                    help="per-level ranks p_1,...,p_L (level 1 first), instead of --rank")
    ap.add_argument("--no-scale-attn", action="store_true",
                    help="no log(w/p) bonus on the summaries' scores")
    ap.add_argument("--rotary-summaries", action="store_true",
                    help="rotary key summaries: scores depend on relative positions only")
    ap.add_argument("--tiny", action="store_true", help="a tiny model, to smoke-test the pipeline")
    ap.add_argument("--llama", action="store_true",
                    help="pretrain an exact Llama-architecture model, exported as LlamaForCausalLM")
    ap.add_argument("--context", type=int, default=2048, help="--llama: the training length")
    ap.add_argument("--init", help="start from this Hugging Face folder (Llama-family or ours)")
    ap.add_argument("--block-size", type=int, default=64, help="--init: FMA block size m")
    ap.add_argument("--trained-length", type=int,
                    help="--init: FMA trained length n (default: the checkpoint's)")
    ap.add_argument("--freeze", action="store_true",
                    help="train the summary weights only, the transformer's stay as they are")
    args = ap.parse_args()
    t_start = time.time()
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = args.device
    torch.manual_seed(args.seed)
    if args.init:
        fma = None if args.exact else dict(downsampling=args.downsampling, block_size=args.block_size,
                                           rank=args.rank, trained_length=args.trained_length,
                                           rotary_summaries=args.rotary_summaries)
        model, cfg = load_hf(args.init, dev, fma)
    else:
        cfg = llama_config(args.tiny, args.context) if args.llama else \
            model_config(args.exact, args.tiny, args.downsampling, args.rank, not args.no_scale_attn,
                         args.rotary_summaries, args.ranks)
        model = FmaModel(cfg).to(dev)
    if args.freeze:
        for name, prm in model.named_parameters():
            prm.requires_grad_(".fma." in name)
        assert any(p.requires_grad for p in model.parameters()), "--freeze: no summary weights"
    n = cfg.max_position_embeddings
    data = np.memmap(os.path.join(args.data, "train.bin"), dtype=np.uint16, mode="r")
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "last.pt")
    log = open(os.path.join(args.out, "train.log"), "a")

    opt = torch.optim.AdamW(param_groups(model, cfg), lr=args.lr, betas=(0.9, 0.95),
                            **({"fused": True} if dev == "cuda" else {}))
    state = {"step": 0, "total_steps": args.plan_steps, "tokens": 0, "train_seconds": 0.0}
    rng = np.random.default_rng(args.seed)
    if os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location=dev, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        state = ck["state"]
        rng.bit_generator.state = ck["rng"]
        print(f"resumed at step {state['step']} of {state['total_steps']}", file=log, flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{'fma' if cfg.fma_enabled else 'exact'}: {n_params / 1e6:.2f}M parameters "
          f"({n_train / 1e6:.2f}M trained), "
          f"{len(data) / 1e6:.1f}M training tokens", file=log, flush=True)

    def batch():
        starts = rng.integers(0, len(data) - n - 1, args.batch)
        x = np.stack([data[s:s + n + 1] for s in starts]).astype(np.int64)
        x = torch.from_numpy(x)
        if dev == "cuda":
            x = x.pin_memory().to(dev, non_blocking=True)
        return x[:, :-1], x[:, 1:]

    def save():
        tmp = ckpt_path + ".tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": state,
                    "rng": rng.bit_generator.state, "config": cfg.__dict__}, tmp)
        os.replace(tmp, ckpt_path)

    budget = args.minutes * 60 - 30  # leave time to save
    t_run = time.time()
    while state["total_steps"] is None or state["step"] < state["total_steps"]:
        t0 = time.time()
        lr = lr_at(state["step"], state["total_steps"] or 10**9, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        x, y = batch()
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        state["step"] += 1
        state["tokens"] += x.numel()
        if state["step"] % 25 == 0 or state["step"] == 20:
            if dev == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t0
            print(f"step {state['step']} loss {loss.item():.4f} gnorm {gnorm.item():.2f} lr {lr:.2e} "
                  f"{x.numel() / dt:.0f} tok/s", file=log, flush=True)
        if state["total_steps"] is None and state["step"] in (10, 30):
            if dev == "cuda":
                torch.cuda.synchronize()
            if state["step"] == 10:
                t_mark = time.time()
            else:
                # Plan from the speed after warm-up: the time already spent counts against it.
                per_step = (time.time() - t_mark) / 20
                remaining = args.plan_minutes * 60 - (time.time() - t_run)
                state["total_steps"] = 30 + int(remaining / per_step)
                print(f"plan: {state['total_steps']} steps ({per_step:.3f} s/step)", file=log, flush=True)
        if time.time() - t_run > budget:
            break
    state["train_seconds"] += time.time() - t_run
    save()
    print(f"stopped at step {state['step']}, {state['tokens'] / 1e6:.1f}M tokens, "
          f"{state['train_seconds']:.0f} s of training", file=log, flush=True)
    if state["step"] < state["total_steps"] and args.final:
        print(f"final run: exporting at step {state['step']} of {state['total_steps']}", file=log,
              flush=True)
    if state["step"] >= state["total_steps"] or args.final:
        save_hf(model, os.path.join(args.out, "hf"), os.path.join(args.data, "tokenizer.model"),
                dtype=torch.bfloat16, llama=args.llama)
        json.dump(state, open(os.path.join(args.out, "done.json"), "w"))
        print(f"exported {args.out}/hf", file=log, flush=True)
    print(f"run took {time.time() - t_start:.0f} s", file=log, flush=True)


if __name__ == "__main__":
    main()
