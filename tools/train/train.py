#!/usr/bin/env python3
"""Trains an FMA (or exact-attention) model on a tokenized corpus (corpus.py: the sharded corpus
of docs/DATA.md, or prepare_corpus.py's train.bin).

bf16 autocast, fused AdamW (CUDA), TF32, linear warm-up then cosine decay, gradient clipping,
micro-batches whose gradients accumulate (--micro-batch), optionally torch.compile (--compile,
eager if compiling fails); the loss is read back every --log-every steps only. Each run trains for
at most --minutes and leaves a checkpoint in parts (checkpoint.py: OUT/ckpt-STEP, OUT/latest)
holding the weights, AdamW's state, the step, the RNG states, the data cursor and the plan, which
the next run resumes exactly (refusing another model or plan, naming the field). The plan's length
is fixed on the first run: --plan-steps, or the steps that fit in --plan-minutes of training at
the speed measured over its first steps. When the plan is done (or with --final), the run exports
the Hugging Face folder OUT/hf (bf16 safetensors) for multipole-convert.

--size full is the 30-50M model of issue 12 (docs/MODEL.md, "The full model"); --benchmark-steps N
times it (or --size small, tiny) and its exact twin and prints tokens/s and peak memory.

Llama-family checkpoints: --llama pretrains an exact-attention model with an untied head and
exports it as a LlamaForCausalLM folder (a stand-in for a pretrained checkpoint from elsewhere);
--init HF_DIR starts from such a folder (or one of ours) and, unless --exact, uptrains it as an
FMA model (--downsampling, --rank, --block-size, --trained-length, as multipole-convert --fma:
groupedconv summaries start as average pooling); --freeze trains the summary weights only.

Several GPUs (torchrun, or python3 -m torch.distributed.run --nproc_per_node G train.py ...): each
process takes an equal share of every step's windows and the gradients are averaged before
clipping, so the plan, the checkpoints and the result are those of one process (to rounding); the
plan must then be fixed in steps (--plan-steps).

usage: train.py --data DIR --out DIR [--size full] [--exact] [--minutes M] [--plan-steps N] ...
       train.py --export RUN_OR_CKPT --out HF_DIR --data DIR
       train.py --benchmark-steps N --size full [--batch B] [--benchmark-micro 4,8] [--compile]
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

import checkpoint
from corpus import Corpus, CorpusError, Windows
from fma_model import FmaConfig, FmaModel, flex_attention_available, fma_flex_mask, load_hf, save_hf


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


FULL_RANKS = [2, 2, 2, 4, 4, 4]  # per level, w = 64 ... 2048 (docs/MODEL.md, session 5's comparison)


def model_config(exact, size="small", downsampling="groupedconv", rank=2, scale_attn=True,
                 rotary_summaries=False, ranks=None, block_size=None):
    """tiny: for smoke tests of the pipeline; small: the shipped model's shape (the summary
    options as given); full: the 30-50M model of issue 12 with the summaries MODEL.md measured best
    (rotary key summaries, ranks 2,2,2,4,4,4 unless --ranks says otherwise). block_size: m
    (default 64, tiny 16); another m changes the number of levels, which --ranks must match."""
    if size == "tiny":
        return FmaConfig(vocab_size=8192, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=32, intermediate_size=128,
                         max_position_embeddings=256, fma_enabled=not exact,
                         fma_block_size=block_size or 16, fma_rank=2,
                         fma_downsampling=downsampling, fma_scale_attn=scale_attn,
                         fma_rotary_summaries=rotary_summaries, fma_ranks=ranks)
    if size == "full":
        return FmaConfig(vocab_size=16384, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=64, intermediate_size=1408,
                         tie_word_embeddings=True, max_position_embeddings=8192,
                         fma_enabled=not exact, fma_block_size=block_size or 64,
                         fma_ranks=None if exact else ranks or FULL_RANKS,
                         fma_downsampling=downsampling, fma_scale_attn=scale_attn,
                         fma_rotary_summaries=not exact and downsampling != "conv")
    return FmaConfig(vocab_size=8192, hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                     num_key_value_heads=2, head_dim=64, intermediate_size=1024,
                     tie_word_embeddings=True, max_position_embeddings=8192, fma_enabled=not exact,
                     fma_block_size=block_size or 64, fma_rank=rank, fma_downsampling=downsampling,
                     fma_scale_attn=scale_attn, fma_rotary_summaries=rotary_summaries,
                     fma_ranks=ranks)


def param_groups(model, cfg):
    """AdamW's parameter groups. Adam moves every weight by about lr a step whatever its size, but
    a level-l summary weight is about 1/w_l (it starts as a mean over w_l keys): at the shared lr
    the far levels' weights (1/2048) drown in noise within a few steps. Their lr is scaled by
    m / w_l, so every level moves by the same fraction of its size, and they are not decayed
    (nor are attnpool's queries and biases, logits at the shared lr)."""
    groups = {}
    for name, prm in model.named_parameters():
        if not prm.requires_grad:
            continue
        scale, decay = 1.0, (0.1 if prm.dim() >= 2 else 0.0)
        if ".fma." in name:  # self_attn.fma.{k,v}_down.<level-1>: never decayed
            decay = 0.0
            if name.endswith(".weight"):
                scale = cfg.fma_block_size / cfg.group_size(int(name.split(".")[-2]) + 1)
        groups.setdefault((scale, decay), []).append(prm)
    return [{"params": ps, "lr_scale": s, "weight_decay": wd} for (s, wd), ps in groups.items()]


def lr_at(step, total, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def parameter_counts(model):
    """Parameters by kind: embeddings (the token embedding, and the LM head when untied),
    downsampling (the summary convolutions), transformer (everything else: layers, final norm)."""
    counts = {"transformer": 0, "embeddings": 0, "downsampling": 0}
    for name, prm in model.named_parameters():
        kind = "downsampling" if ".fma." in name else \
            "embeddings" if name in ("model.embed_tokens.weight", "lm_head.weight") else "transformer"
        counts[kind] += prm.numel()
    return counts


def describe(cfg, model):
    c = parameter_counts(model)
    return (f"{'fma' if cfg.fma_enabled else 'exact'}: {sum(c.values()) / 1e6:.2f}M parameters "
            f"({c['transformer'] / 1e6:.2f}M transformer + {c['embeddings'] / 1e6:.2f}M embeddings + "
            f"{c['downsampling'] / 1e6:.2f}M downsampling)")


def parse_args(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", help="a corpus folder: shards.json and the shards present, or train.bin")
    ap.add_argument("--out", help="the run's folder: checkpoints, train.log, hf/")
    ap.add_argument("--exact", action="store_true", help="exact attention (the baseline twin)")
    ap.add_argument("--size", choices=["tiny", "small", "full"], default="small",
                    help="tiny: a smoke test; small: the shipped model's shape; full: the 30-50M "
                    "model of issue 12 (docs/MODEL.md)")
    ap.add_argument("--minutes", type=float, default=9.0, help="wall-clock budget of this run")
    ap.add_argument("--plan-minutes", type=float, default=9.0, help="training time of the whole plan")
    ap.add_argument("--plan-steps", type=int, help="the plan's length in steps, instead of in time "
                    "(to give two models the same tokens)")
    ap.add_argument("--stop-at", type=int, help="end this run at this step (the plan goes on)")
    ap.add_argument("--batch", type=int, default=8, help="windows per optimiser step")
    ap.add_argument("--micro-batch", type=int, default=0,
                    help="windows per forward and backward pass (gradients accumulate); 0: the "
                    "whole batch, halved while the GPU runs out of memory")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the loss (eager if compiling fails)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="with --compile: torch.compile's reduce-overhead mode, each step's "
                    "forward and backward replayed as CUDA graphs (the compiled FMA step is bound "
                    "by the host's kernel launches, docs/MODEL.md); one micro-batch a step")
    ap.add_argument("--fma-attention", default="gather", choices=["flex", "flash", "gather"],
                    help="FMA attention in training: gather (per-block key lists, SDPA with a "
                    "score mask), flash (per-block causal SDPA calls, FlashAttention on the GPU: "
                    "docs/MODEL.md) or flex (one FlexAttention call: the GPU, PyTorch >= 2.5; its "
                    "compilation at the full model's shape outlasted 250 s in session 15)")
    ap.add_argument("--benchmark-models", default="fma,exact",
                    help="with --benchmark-steps: which of fma, exact to time")
    ap.add_argument("--log-every", type=int, default=25,
                    help="steps between loss readings (the only host synchronisations)")
    ap.add_argument("--final", action="store_true",
                    help="export at the end of this run even if the plan is not finished")
    ap.add_argument("--export", metavar="CKPT",
                    help="write a checkpoint's weights (a run folder's latest, or a ckpt-STEP "
                    "folder) as the Hugging Face folder --out (bf16, as a finished run exports; "
                    "the tokenizer from --data) and exit: a run looked at before its plan ends")
    ap.add_argument("--benchmark-steps", type=int,
                    help="time this many steps of the FMA model and of its exact twin, print "
                    "tokens/s and peak memory, and exit (no --out needed)")
    ap.add_argument("--benchmark-micro", type=lambda s: [int(x) for x in s.split(",")],
                    help="micro-batch sizes to time (default: --micro-batch)")
    ap.add_argument("--profile", metavar="DIR",
                    help="with --benchmark-steps: two more steps of each model under torch.profiler, "
                    "its operators by their own time on the device (the CPU's without a GPU) in "
                    "DIR/MODEL-mbN.txt")
    ap.add_argument("--downsampling", default="groupedconv",
                    choices=["avgpool", "groupedconv", "conv", "attnpool"],
                    help="attnpool: summaries chosen by content (PyTorch only: multipole-convert refuses it)")
    ap.add_argument("--rank", type=int, default=2, help="FMA rank p: summaries per group")
    ap.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")],
                    help="per-level ranks p_1,...,p_L (level 1 first), instead of --rank")
    ap.add_argument("--no-scale-attn", action="store_true",
                    help="no log(w/p) bonus on the summaries' scores")
    ap.add_argument("--rotary-summaries", action="store_true",
                    help="rotary key summaries: scores depend on relative positions only")
    ap.add_argument("--tiny", action="store_true", help="--size tiny")
    ap.add_argument("--llama", action="store_true",
                    help="pretrain an exact Llama-architecture model, exported as LlamaForCausalLM")
    ap.add_argument("--context", type=int, default=2048, help="--llama: the training length")
    ap.add_argument("--init", help="start from this Hugging Face folder (Llama-family or ours)")
    ap.add_argument("--block-size", type=int,
                    help="FMA block size m (default 64, tiny 16), of a fresh model or --init's")
    ap.add_argument("--trained-length", type=int,
                    help="--init: FMA trained length n (default: the checkpoint's)")
    ap.add_argument("--freeze", action="store_true",
                    help="train the summary weights only, the transformer's stay as they are")
    args = ap.parse_args(argv)
    if args.tiny:
        args.size = "tiny"
    if args.profile and args.benchmark_steps is None:
        ap.error("--profile goes with --benchmark-steps")
    if args.benchmark_steps is None and not (args.data and args.out):
        ap.error("--data and --out are needed (except with --benchmark-steps)")
    if args.cuda_graphs and not args.compile:
        ap.error("--cuda-graphs goes with --compile")
    if args.micro_batch and args.batch % args.micro_batch:
        ap.error(f"--micro-batch {args.micro_batch} does not divide --batch {args.batch}")
    return args


def fma_kernel(args, dev):
    """--fma-attention, checked: flex only on the GPU with PyTorch >= 2.5."""
    if args.fma_attention == "flex" and not (dev == "cuda" and flex_attention_available()):
        raise SystemExit("--fma-attention flex: needs CUDA and PyTorch >= 2.5")
    return args.fma_attention


def build(args, exact, dev):
    """(model, cfg) of this run: from --init, or fresh from the seed."""
    torch.manual_seed(args.seed)
    if args.init:
        fma = None if exact else dict(downsampling=args.downsampling,
                                      block_size=args.block_size or 64,
                                      rank=args.rank, trained_length=args.trained_length,
                                      rotary_summaries=args.rotary_summaries)
        return load_hf(args.init, dev, fma)
    cfg = llama_config(args.size == "tiny", args.context) if args.llama else \
        model_config(exact, args.size, args.downsampling, args.rank, not args.no_scale_attn,
                     args.rotary_summaries, args.ranks, args.block_size)
    return FmaModel(cfg).to(dev), cfg


def open_corpus(args, cfg):
    """The training corpus; a sharded one sets the model's BOS and EOS, and must have the full
    model's vocabulary (the tiny and small ones stand in for any)."""
    corpus = Corpus(args.data, cfg.vocab_size if args.size == "full" else None)
    if corpus.sharded:
        cfg.bos_token_id, cfg.eos_token_id = corpus.bos, corpus.eos
    return corpus


OutOfMemory = getattr(torch.cuda, "OutOfMemoryError", ())  # () catches nothing (PyTorch 1.13)


class Ranks:
    """The processes that train one model together (torchrun's RANK, WORLD_SIZE, LOCAL_RANK; one
    process without them). Each takes an equal share of a step's windows; gradients are averaged
    before clipping, so every process takes the same optimiser step and holds the same weights;
    rank 0 alone writes the log, the checkpoints and the export."""

    def __init__(self, dev, from_env=True):
        env = os.environ if from_env else {}
        self.world, self.rank = int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0"))
        self.dev = dev
        if self.world > 1:
            if dev == "cuda":
                torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
            torch.distributed.init_process_group("nccl" if dev == "cuda" else "gloo")

    def share(self, batch):
        """This process's windows of a step's batch."""
        k, rest = divmod(len(batch), self.world)
        if rest:
            raise ValueError(f"--batch {len(batch)} does not split over {self.world} processes")
        return batch[self.rank * k:(self.rank + 1) * k]

    def average(self, tensors):
        """Each tensor replaced by its mean over the processes (one collective for all)."""
        if self.world == 1:
            return
        flat = torch._utils._flatten_dense_tensors(tensors)
        torch.distributed.all_reduce(flat)  # a sum: gloo has no average
        flat /= self.world
        for t, mean in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors)):
            t.copy_(mean)

    def any(self, flag):
        """Whether any process says so: every process must ask at the same step."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.dev)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def check_same(self, params):
        """Refuses processes whose weights have drifted apart (they take identical steps)."""
        if self.world == 1:
            return
        sums = torch.stack([p.detach().double().sum() for p in params])
        low, high = sums.clone(), sums.clone()
        torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise RuntimeError("the processes' weights differ")

    def close(self):
        if self.world > 1:
            torch.distributed.destroy_process_group()


class Trainer:
    """One model's optimiser step: bf16 autocast, micro-batches whose gradients accumulate,
    clipping, fused AdamW on CUDA. Nothing here waits for the GPU: the loss stays on the device."""

    def __init__(self, model, cfg, args, dev, ranks=None):
        self.model, self.dev, self.args = model, dev, args
        self.ranks = ranks or Ranks(dev, from_env=False)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(param_groups(model, cfg), lr=args.lr, betas=(0.9, 0.95),
                                     **({"fused": True} if dev == "cuda" else {}))
        self.loss_fn = model.loss
        self.compiled = args.compile and hasattr(torch, "compile")
        self.graphs = self.compiled and args.cuda_graphs and dev == "cuda"
        if self.graphs and args.micro_batch not in (0, args.batch):
            raise SystemExit("--cuda-graphs: one micro-batch a step (a replay overwrites the last "
                             "one's outputs, gradients included)")
        if self.compiled:
            self.loss_fn = torch.compile(model.loss, mode="reduce-overhead" if self.graphs else None)
        elif args.compile:
            print("--compile: this PyTorch has no torch.compile; eager", flush=True)
        self.checked = not self.compiled
        self.micro = args.micro_batch  # 0: found on the first step
        self.kernel = fma_kernel(args, dev) if cfg.fma_enabled else "gather"
        model.use_attention(self.kernel)
        if self.kernel == "flex":  # its block mask made outside the compiled loss
            fma_flex_mask(cfg, cfg.max_position_embeddings, dev)

    def step(self, x, y, lr):
        for g in self.opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        if not self.checked:  # the first compiled step: fall back to eager if compiling fails
            try:
                out = self._step(x, y)
                self.checked = True
                return out
            except OutOfMemory:
                raise
            except Exception as e:  # noqa: BLE001 (any compiler failure)
                print(f"--compile failed ({type(e).__name__}: {str(e)[:300]}); eager", flush=True)
                self.loss_fn, self.checked, self.compiled = self.model.loss, True, False
                self.graphs = False
                if self.kernel == "flex":  # FlexAttention is only fast compiled
                    self.kernel = "gather"
                    self.model.use_attention(self.kernel)
        return self._step(x, y)

    def _step(self, x, y):
        B = x.shape[0]
        while True:
            try:
                return self._accumulate(x, y, self.micro or B)
            except OutOfMemory:
                if self.args.micro_batch or (self.micro or B) == 1 or self.graphs:
                    raise
                mb = (self.micro or B) // 2
                while B % mb:
                    mb -= 1
                self.micro = mb
                self.opt.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                print(f"out of GPU memory: micro-batch {mb}", flush=True)

    def _accumulate(self, x, y, mb):
        self.opt.zero_grad(set_to_none=True)
        B = x.shape[0]
        total = None
        for i in range(0, B, mb):
            if self.graphs:  # this step's replay may overwrite the last step's outputs
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast(self.dev, dtype=torch.bfloat16):
                loss = self.loss_fn(x[i:i + mb], y[i:i + mb])
            if self.graphs:
                loss = loss.clone()  # outlives the next replay (the log reads it later)
            if mb < B:
                loss = loss * (mb / B)
            loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        self.ranks.average([p.grad for p in self.params])
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return total, gnorm


def to_device(batch, dev):
    t = torch.from_numpy(batch)
    if dev == "cuda":
        t = t.pin_memory().to(dev, non_blocking=True)
    return t[:, :-1], t[:, 1:]


def sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def profile_steps(tr, batches, dev, args, path):
    """Two steps under torch.profiler: the table of operators by their own (self) time on the
    device, or on the CPU without a GPU, written to path; what a step's time is spent on."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if dev == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for s in range(2):
            tr.step(*to_device(batches[s % 3], dev), args.lr)
        sync(dev)
    events = prof.key_averages()
    if dev != "cuda":
        key = "self_cpu_time_total"
    else:  # renamed in PyTorch 2.4
        key = "self_device_time_total"
        if not hasattr(events[0], key):
            key = "self_cuda_time_total"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"2 steps of {args.batch} windows, sorted by {key}\n")
        f.write(events.table(sort_by=key, row_limit=40) + "\n")


def benchmark(args, dev):
    """Tokens/s and peak memory of the FMA model and its exact twin, one after the other, on the
    same windows (random ones without --data)."""
    n_micro = args.benchmark_micro or [args.micro_batch]
    rows = []
    models = args.benchmark_models.split(",")
    for exact in [e for e, name in ((False, "fma"), (True, "exact")) if name in models]:
        for mb in n_micro:
            args.micro_batch = mb
            model, cfg = build(args, exact, dev)
            n = cfg.max_position_embeddings
            if args.data:
                windows = Windows(open_corpus(args, cfg), args.seed, args.batch, n)
                batches = [windows.batch_at(s) for s in range(3)]
            else:
                rng = np.random.default_rng(args.seed)
                batches = [rng.integers(3, cfg.vocab_size, (args.batch, n + 1)) for _ in range(3)]
            tr = Trainer(model, cfg, args, dev)
            name = describe(cfg, model).split(" (")[0]
            if tr.kernel != "gather":
                name += f" [{tr.kernel}]"
            if tr.graphs:
                name += " [CUDA graphs]"
            try:
                for s in range(3):  # warm-up (and compilation)
                    tr.step(*to_device(batches[s], dev), args.lr)
                sync(dev)
                if dev == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.time()
                for s in range(args.benchmark_steps):
                    loss, _ = tr.step(*to_device(batches[s % 3], dev), args.lr)
                sync(dev)
                dt = (time.time() - t0) / args.benchmark_steps
                peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
                rows.append((name, tr.compiled, tr.micro or args.batch, dt, args.batch * n / dt, peak,
                             loss.item()))
                print(f"{name}, micro-batch {rows[-1][2]}: {rows[-1][4]:,.0f} tokens/s", flush=True)
                if args.profile:
                    profile_steps(tr, batches, dev, args,
                                  f"{args.profile}/{name.split(':')[0]}-mb{tr.micro or args.batch}.txt")
            except OutOfMemory:
                rows.append((name, tr.compiled, mb, float("nan"), float("nan"), float("inf"),
                             float("nan")))
            print(f"benchmarked {name}, micro-batch {tr.micro or args.batch}", flush=True)
            del tr, model
            if dev == "cuda":
                torch.cuda.empty_cache()
    print(f"\n{args.benchmark_steps} steps of {args.batch} x {n} tokens, size {args.size}, {dev}")
    print("| model | compiled | micro-batch | s/step | tokens/s | peak GiB | last loss |")
    print("|---|---|---|---|---|---|---|")
    for name, compiled, mb, dt, tps, peak, loss in rows:
        print(f"| {name} | {'yes' if compiled else 'no'} | {mb} | {dt:.3f} | {tps:,.0f} | {peak:.1f} "
              f"| {loss:.3f} |")
    best = {m: max((r[4] for r in rows if r[0].startswith(m) and r[4] == r[4]), default=float("nan"))
            for m in ("fma", "exact")}
    print(f"FMA / exact tokens/s (best micro-batch of each): {best['fma'] / best['exact']:.3f}")


def export_checkpoint(ckpt, out, tokenizer):
    """The weights of checkpoint folder `ckpt` (or of a run folder's latest) as the Hugging Face
    folder `out`, bf16 as a finished run's export; returns its step."""
    folder = ckpt if os.path.exists(os.path.join(ckpt, "manifest.json")) else checkpoint.latest(ckpt)
    if folder is None:
        raise checkpoint.CheckpointError(f"{ckpt}: neither a checkpoint nor a run folder with one")
    man, state = checkpoint.load(folder)
    model = FmaModel(FmaConfig(**man["config"]))
    model.load_state_dict(state["model"])
    save_hf(model, out, tokenizer, dtype=torch.bfloat16)
    return man["step"]


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    dev = args.device
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.benchmark_steps:
        benchmark(args, dev)
        return
    if args.export:
        if not args.out or not args.data:
            raise SystemExit("--export: give --out (the folder to write) and --data (its tokenizer)")
        step = export_checkpoint(args.export, args.out, os.path.join(args.data, "tokenizer.model"))
        print(f"exported step {step} of {args.export} to {args.out}")
        return
    ranks = Ranks(dev)
    model, cfg = build(args, args.exact, dev)
    if args.freeze:
        for name, prm in model.named_parameters():
            prm.requires_grad_(".fma." in name)
        assert any(p.requires_grad for p in model.parameters()), "--freeze: no summary weights"
    n = cfg.max_position_embeddings
    corpus = open_corpus(args, cfg)
    windows = Windows(corpus, args.seed, args.batch, n)
    os.makedirs(args.out, exist_ok=True)

    def say(msg):
        if ranks.rank == 0:
            with open(os.path.join(args.out, "train.log"), "a") as log:
                print(msg, file=log)

    tr = Trainer(model, cfg, args, dev, ranks)
    # The plan: what a resumed run must share with the run it continues.
    plan = {"batch": args.batch, "context": n, "lr": args.lr, "warmup": args.warmup,
            "seed": args.seed, "schedule": "linear warm-up, cosine to 0.1 lr",
            "betas": [0.9, 0.95], "weight_decay": 0.1, "clip": 1.0, "freeze": args.freeze,
            "corpus": "sharded" if corpus.sharded else "legacy", "total_steps": args.plan_steps}
    progress = {"step": 0, "tokens": 0, "train_seconds": 0.0, "losses": [], "loss_sum": 0.0,
                "runs": []}
    found = checkpoint.latest(args.out)
    if found:
        man, ck = checkpoint.load(found)  # on the CPU: the RNG states must stay there
        check_resume(man, cfg, plan, args.plan_steps is None)
        model.load_state_dict(ck["model"])
        tr.opt.load_state_dict(ck["opt"])
        windows.load_state_dict(ck["data"])
        torch.set_rng_state(ck["rng"]["torch"])
        if dev == "cuda" and ck["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        plan, progress = ck["plan"], ck["progress"]
        say(f"resumed {found} at step {progress['step']} of {plan['total_steps']}")
        if corpus.sharded and ck["data"]["shards"] != corpus.shards:
            say(f"shards now {corpus.shards} (were {ck['data']['shards']}): the windows from here "
                "on are drawn from these")
    if ranks.world > 1 and plan["total_steps"] is None:
        raise checkpoint.CheckpointError("several processes need the plan in steps (--plan-steps)")
    say(describe(cfg, model) + (f", {sum(p.numel() for p in tr.params) / 1e6:.2f}M trained"
                                if args.freeze else "")
        + (f", {ranks.world} processes" if ranks.world > 1 else "")
        + (f", FMA attention: {tr.kernel}" if tr.kernel != "gather" else "")
        + (", CUDA graphs" if tr.graphs else ""))
    say(f"{len(corpus.tokens) / 1e6:.1f}M training tokens"
        + (f" in {len(corpus.shards)} shards: {' '.join(corpus.shards)}" if corpus.sharded else ""))
    progress["runs"].append({"from_step": progress["step"], "shards": corpus.shards})

    def save():
        sync(dev)
        ranks.check_same(tr.params)
        ranks.average([loss_sum])  # the partial sum of a log interval, as one process would have
        if ranks.rank:
            return None
        progress["loss_sum"] = float(loss_sum)
        meta = {"step": progress["step"], "tokens": progress["tokens"], "config": cfg.__dict__,
                "plan": plan}
        state = {"model": model.state_dict(), "opt": tr.opt.state_dict(), "data": windows.state_dict(),
                 "rng": {"torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state_all() if dev == "cuda" else None},
                 "plan": plan, "progress": progress}
        return checkpoint.save(args.out, state, meta)

    budget = args.minutes * 60 - 30  # leave time to save
    t_run = t_log = time.time()
    loss_sum = torch.tensor(progress["loss_sum"], device=dev)
    steps_since_log = progress["step"] % args.log_every
    run_steps = 0
    while plan["total_steps"] is None or progress["step"] < plan["total_steps"]:
        step = progress["step"]
        lr = lr_at(step, plan["total_steps"] or 10**9, plan["lr"], plan["warmup"])
        x, y = to_device(ranks.share(windows.batch_at(step)), dev)
        loss, gnorm = tr.step(x, y, lr)
        loss_sum += loss
        progress["step"] += 1
        progress["tokens"] += x.numel() * ranks.world
        steps_since_log += 1
        run_steps += 1
        if progress["step"] % args.log_every == 0:
            ranks.average([loss_sum])
            mean = loss_sum.item() / steps_since_log  # waits for the GPU: once per log_every steps
            dt = time.time() - t_log
            progress["losses"].append([progress["step"], mean])
            say(f"step {progress['step']} loss {mean:.4f} gnorm {gnorm.item():.2f} lr {lr:.2e} "
                f"{steps_since_log * x.numel() * ranks.world / dt:.0f} tok/s")
            loss_sum.zero_()
            steps_since_log, t_log = 0, time.time()
        if plan["total_steps"] is None and run_steps in (10, 30):
            sync(dev)
            if run_steps == 10:
                t_mark = time.time()
            else:
                # Plan from the speed after warm-up: the time already spent counts against it.
                per_step = (time.time() - t_mark) / 20
                remaining = args.plan_minutes * 60 - (time.time() - t_run)
                plan["total_steps"] = progress["step"] + int(remaining / per_step)
                say(f"plan: {plan['total_steps']} steps ({per_step:.3f} s/step)")
        over = time.time() - t_run > budget
        if ranks.world > 1:  # the processes stop together, deciding where they meet anyway
            over = progress["step"] % args.log_every == 0 and ranks.any(over)
        if over or progress["step"] == args.stop_at:
            break
    progress["train_seconds"] += time.time() - t_run
    folder = save()
    say(f"stopped at step {progress['step']}, {progress['tokens'] / 1e6:.1f}M tokens, "
        f"{progress['train_seconds']:.0f} s of training; checkpoint {folder}")
    done = plan["total_steps"] is not None and progress["step"] >= plan["total_steps"]
    if not done and args.final:
        say(f"final run: exporting at step {progress['step']} of {plan['total_steps']}")
    ranks.close()
    if ranks.rank:
        return
    if done or args.final:
        save_hf(model, os.path.join(args.out, "hf"), os.path.join(args.data, "tokenizer.model"),
                dtype=torch.bfloat16, llama=args.llama)
        with open(os.path.join(args.out, "done.json"), "w") as f:
            json.dump({k: progress[k] for k in ("step", "tokens", "train_seconds")}
                      | {"total_steps": plan["total_steps"]}, f)
        say(f"exported {args.out}/hf")
    say(f"run took {time.time() - t_start:.0f} s")


def check_resume(man, cfg, plan, steps_from_checkpoint):
    """Refuses, naming the field, a checkpoint of another model or plan."""
    theirs = FmaConfig(**man["config"]).__dict__
    diff = [k for k in cfg.__dict__ if k not in ("bos_token_id", "eos_token_id")
            and theirs.get(k) != cfg.__dict__[k]]
    if diff:
        raise checkpoint.CheckpointError(
            "the checkpoint is of another model: " + ", ".join(
                f"{k} {theirs.get(k)!r} there, {cfg.__dict__[k]!r} here" for k in diff))
    diff = [k for k in plan if not (k == "total_steps" and steps_from_checkpoint)
            and man["plan"].get(k) != plan[k]]
    if diff:
        raise checkpoint.CheckpointError(
            "the checkpoint follows another plan: " + ", ".join(
                f"{k} {man['plan'].get(k)!r} there, {plan[k]!r} here" for k in diff)
            + " (resume with the same options, or train into another --out)")


if __name__ == "__main__":
    try:
        main()
    except (checkpoint.CheckpointError, CorpusError) as e:
        sys.exit(f"train.py: {e}")
