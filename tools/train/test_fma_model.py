#!/usr/bin/env python3
"""The vectorised FMA of fma_model.py against its per-query version, on random inputs, for every
downsampling kind, with grouped-query heads, sequence lengths that are not multiples of m, and
past the trained length. float64 on the CPU: 1e-10 relative. Rotary key summaries: the outputs
do not change when the RoPE positions are shifted."""
import itertools
import os
import tempfile
import unittest

import torch

from fma_model import (AttnPool, FmaConfig, FmaModel, Downsample, apply_rope, flex_attention_available,
                       fma_attention, fma_attention_flash, fma_attention_flex, fma_attention_slow,
                       init_summaries_as_avgpool, level_pair, load_hf, rope_tables, save_hf)
from train import model_config, param_groups


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def randomize(down):
    """Random summary weights, so that the summaries matter (attnpool: queries that choose)."""
    for level in down:
        if isinstance(level, AttnPool):
            torch.nn.init.normal_(level.query, std=1.0)
            torch.nn.init.normal_(level.bias, std=1.0)
            continue
        torch.nn.init.normal_(level.weight, std=0.3)
        if getattr(level, "bias", None) is not None:
            torch.nn.init.normal_(level.bias, std=0.3)
    return down


def random_downsample(cfg, keys):
    return randomize(Downsample(cfg, keys).double())


class Summaries(unittest.TestCase):
    def test_against_convolution(self):
        """Downsample's batched products over channels against PyTorch's own convolution
        (groupedconv, conv), complex arithmetic (rotary) and a mean (avgpool) per group, float64,
        every level, with a tail shorter than a group."""
        torch.manual_seed(8)
        F = torch.nn.functional
        for kind, rotary in [("groupedconv", False), ("conv", False), ("groupedconv", True),
                             ("avgpool", False)]:
            cfg = FmaConfig(head_dim=8, max_position_embeddings=128, fma_block_size=8,
                            fma_ranks=[2, 4, 1], fma_downsampling=kind, fma_rotary_summaries=rotary)
            down = random_downsample(cfg, keys=True)
            x = torch.randn(3, 150, 8, dtype=torch.float64)
            for level in range(1, cfg.levels + 1):
                w, p, G = cfg.group_size(level), cfg.rank(level), 150 // cfg.group_size(level)
                got = down(x, level)
                groups = x[:, :G * w].reshape(3, G, w, 8)
                if kind == "avgpool":
                    ref = groups.reshape(3, G, p, w // p, 8).mean(3)
                elif rotary:
                    z = torch.complex(groups[..., :4], groups[..., 4:])  # [N, G, w, pairs]
                    W = down[level - 1].weight.view(4, p, 2, w)
                    s = torch.einsum("ngtj,jrt->ngrj", z, torch.complex(W[:, :, 0], W[:, :, 1]))
                    ref = torch.cat([s.real, s.imag], -1)
                else:
                    conv = down[level - 1]
                    out = F.conv1d(x.transpose(1, 2), conv.weight, conv.bias, stride=w,
                                   groups=conv.groups)[..., :G]  # [N, d p, G]: channel c p + r
                    ref = out.view(3, 8, p, G).permute(0, 3, 2, 1)
                self.assertEqual(tuple(got.shape), (3, G, p, 8))
                self.assertLess(rel(got, ref), 1e-12, (kind, rotary, level))


class AttnPoolSummaries(unittest.TestCase):
    def test_against_a_loop(self):
        """attnpool's summaries (level_pair) against each group's weights computed one by one:
        softmax over the group of query_r . v_t / sqrt(d) + bias_r[t], the keys and the values
        averaged with them; float64, every level, a tail shorter than a group."""
        torch.manual_seed(9)
        cfg = FmaConfig(head_dim=8, max_position_embeddings=128, fma_block_size=8,
                        fma_ranks=[2, 4, 1], fma_downsampling="attnpool")
        kd, vd = random_downsample(cfg, True), random_downsample(cfg, False)
        self.assertEqual(len(kd), 0)
        k, v = (torch.randn(3, 150, 8, dtype=torch.float64) for _ in range(2))
        kt, vt = Downsample.channels_first(k), Downsample.channels_first(v)
        for level in range(1, cfg.levels + 1):
            w, p, G = cfg.group_size(level), cfg.rank(level), 150 // cfg.group_size(level)
            Ks, Vs = level_pair(kd, vd, kt, vt, level)
            self.assertEqual(tuple(Ks.shape), (3, G, p, 8))
            pool = vd[level - 1]
            for n, g, r in itertools.product(range(3), range(G), range(p)):
                toks = slice(g * w, (g + 1) * w)
                scores = torch.stack([pool.query[r] @ v[n, t] / 8 ** 0.5 + pool.bias[r, t - g * w]
                                      for t in range(g * w, (g + 1) * w)])
                a = scores.softmax(0)
                self.assertLess(rel(Ks[n, g, r], a @ k[n, toks]), 1e-12, (level, n, g, r))
                self.assertLess(rel(Vs[n, g, r], a @ v[n, toks]), 1e-12, (level, n, g, r))

    def test_starts_near_the_means_of_its_parts_and_learns(self):
        """At its start rank r weighs the r-th part of its group e^4 times the rest; one step of
        a model's loss reaches every query and bias."""
        pool = AttnPool(8, 4, 32).double()
        a = pool.weights(torch.randn(8, 5, 32, dtype=torch.float64))
        self.assertLess((a[:, 1, 8] / a[:, 1, 0] - torch.e ** 4).abs().max().item(), 1e-9)
        self.assertLess((a[:, 1, 8] - a[:, 1, 15]).abs().max().item(), 1e-15)
        cfg = FmaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, intermediate_size=48,
                        max_position_embeddings=64, fma_block_size=8, fma_rank=2,
                        fma_downsampling="attnpool")
        model = FmaModel(cfg).double()
        ids = torch.randint(3, 50, (2, 150))
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
        for name, prm in model.named_parameters():
            if ".fma." in name:
                self.assertGreater(prm.grad.abs().max().item(), 0.0, name)
        # A Hugging Face folder (what evaluate.py reads) keeps the kind and the weights.
        with tempfile.TemporaryDirectory() as d:
            tok = os.path.join(d, "tokenizer")
            with open(tok, "wb") as f:
                f.write(b"-")
            save_hf(model, os.path.join(d, "hf"), tok)
            loaded, loaded_cfg = load_hf(os.path.join(d, "hf"))
        self.assertEqual(loaded_cfg.fma_downsampling, "attnpool")
        self.assertLess(rel(loaded.double()(ids), model(ids)), 1e-6)


class FastVsSlow(unittest.TestCase):
    def test_attention(self):
        torch.manual_seed(0)
        for (kind, rotary), scale, (n, m, p), heads, T in itertools.product(
                [("groupedconv", False), ("conv", False), ("avgpool", False),
                 ("groupedconv", True), ("attnpool", False)], [True, False], [(64, 8, 2), (128, 16, 4)],
                [(4, 2), (2, 2)], [37, 200]):
            cfg = FmaConfig(head_dim=8, num_attention_heads=heads[0], num_key_value_heads=heads[1],
                            max_position_embeddings=n, fma_block_size=m, fma_rank=p,
                            fma_downsampling=kind, fma_scale_attn=scale,
                            fma_rotary_summaries=rotary)
            kd, vd = random_downsample(cfg, True), random_downsample(cfg, False)
            q = torch.randn(2, heads[0], T, 8, dtype=torch.float64)
            k = torch.randn(2, heads[1], T, 8, dtype=torch.float64)
            v = torch.randn(2, heads[1], T, 8, dtype=torch.float64)
            fast = fma_attention(cfg, q, k, v, kd, vd)
            slow = fma_attention_slow(cfg, q, k, v, kd, vd)
            self.assertLess(rel(fast, slow), 1e-10, (kind, scale, n, m, p, heads, T))

    def test_flash_layout(self):
        """fma_attention_flash (one causal attention call a block) against fma_attention, outputs
        and every gradient (q, k, v, the summary weights), float64: every kind, per-level ranks,
        grouped-query heads, lengths that are and are not multiples of m, past the trained length
        (the PyTorch here has no SDPA: the same causal softmax written out; the GPU's
        FlashAttention call is checked by FlashOnTheGpu)."""
        torch.manual_seed(8)
        for (kind, rotary), scale, ranks, heads, T in itertools.product(
                [("groupedconv", True), ("avgpool", False), ("conv", False), ("attnpool", False)],
                [True, False], [[2, 4], [4, 4]], [(4, 2), (2, 2)], [37, 150]):
            cfg = FmaConfig(head_dim=8, num_attention_heads=heads[0], num_key_value_heads=heads[1],
                            max_position_embeddings=64, fma_block_size=8, fma_ranks=ranks,
                            fma_downsampling=kind, fma_scale_attn=scale, fma_rotary_summaries=rotary)
            kd, vd = random_downsample(cfg, True), random_downsample(cfg, False)
            q = torch.randn(2, heads[0], T, 8, dtype=torch.float64)
            k, v = (torch.randn(2, heads[1], T, 8, dtype=torch.float64) for _ in range(2))
            g = torch.randn(2, heads[0], T, 8, dtype=torch.float64)
            results = []
            for f in (fma_attention, fma_attention_flash):
                kd.zero_grad()
                vd.zero_grad()
                leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
                out = f(cfg, *leaves, kd, vd)
                (out * g).sum().backward()
                results.append([out] + [t.grad for t in leaves]
                               + [p.grad.clone() for p in (*kd.parameters(), *vd.parameters())])
            for i, (want, got) in enumerate(zip(*results)):
                self.assertLess(rel(got, want), 1e-10, (kind, scale, ranks, heads, T, i))

    def test_per_level_ranks(self):
        torch.manual_seed(5)
        for kind, rotary, ranks in [("groupedconv", False, [2, 4]), ("groupedconv", True, [1, 3]),
                                    ("avgpool", False, [4, 2]), ("conv", False, [2, 1]),
                                    ("attnpool", False, [1, 4])]:
            cfg = FmaConfig(head_dim=8, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=64, fma_block_size=8, fma_ranks=ranks,
                            fma_downsampling=kind, fma_rotary_summaries=rotary)
            self.assertEqual(cfg.fma_rank, max(ranks))
            kd, vd = random_downsample(cfg, True), random_downsample(cfg, False)
            q = torch.randn(2, 4, 150, 8, dtype=torch.float64)
            k = torch.randn(2, 2, 150, 8, dtype=torch.float64)
            v = torch.randn(2, 2, 150, 8, dtype=torch.float64)
            fast = fma_attention(cfg, q, k, v, kd, vd)
            self.assertLess(rel(fast, fma_attention_slow(cfg, q, k, v, kd, vd)), 1e-10, (kind, ranks))
            # Each level's rank counts: the same model with rank p everywhere differs.
            if kind == "avgpool":
                uniform = FmaConfig(**{**cfg.__dict__, "fma_ranks": None})
                pooled = Downsample(uniform)  # avgpool: no weights
                self.assertGreater(rel(fma_attention(uniform, q, k, v, pooled, pooled), fast), 1e-3)

    def test_attention_mass(self):
        """attention_mass.py's hook: the output unchanged, each query's probability split over
        the fine keys and the levels (summing to 1), none on summaries before any exist."""
        torch.manual_seed(6)
        cfg = FmaConfig(head_dim=8, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=64, fma_block_size=8, fma_ranks=[2, 4])
        kd, vd = random_downsample(cfg, True), random_downsample(cfg, False)
        q = torch.randn(2, 4, 150, 8, dtype=torch.float64)
        k = torch.randn(2, 2, 150, 8, dtype=torch.float64)
        v = torch.randn(2, 2, 150, 8, dtype=torch.float64)
        mass = []
        out = fma_attention(cfg, q, k, v, kd, vd, mass)
        self.assertLess(rel(out, fma_attention(cfg, q, k, v, kd, vd)), 1e-12)
        (m,) = mass
        self.assertEqual(tuple(m.shape), (2, 4, 150, 1 + cfg.levels))
        self.assertLess((m.sum(-1) - 1).abs().max().item(), 1e-12)
        self.assertLess((m[:, :, :16, 0] - 1).abs().max().item(), 1e-12)  # 2 w of level 1
        self.assertGreater(m[:, :, 16:, 1:].sum().item(), 1.0)

    def test_model_fast_equals_slow_and_short_context_equals_exact(self):
        torch.manual_seed(1)
        cfg = FmaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, intermediate_size=48,
                        max_position_embeddings=64, fma_block_size=8, fma_rank=2)
        model = FmaModel(cfg).double()
        ids = torch.randint(3, 50, (2, 150))
        self.assertLess(rel(model(ids), model(ids, slow=True)), 1e-10)
        exact = FmaModel(FmaConfig(**{**cfg.__dict__, "fma_enabled": False})).double()
        exact.load_state_dict(model.state_dict(), strict=False)
        short = ids[:, :16]  # 2m tokens: FMA is exact attention
        self.assertLess(rel(model(short), exact(short)), 1e-10)
        self.assertGreater(rel(model(ids), exact(ids)), 1e-4)


class OnTheGpu:
    """A training attention kernel (ATTENTION) against fma_attention on fresh random inputs:
    outputs and every gradient (q, k, v, the summary weights), float32 eager (1e-5) and bf16
    compiled as in training (2e-2), at lengths that are and are not multiples of m and past the
    trained length."""
    ATTENTION = None

    def setUp(self):
        torch.manual_seed(7)
        self.cfg = FmaConfig(head_dim=64, num_attention_heads=8, num_key_value_heads=4,
                             max_position_embeddings=1024, fma_block_size=64, fma_ranks=[2, 2, 4],
                             fma_rotary_summaries=True)
        self.kd = random_downsample(self.cfg, True).float().cuda()
        self.vd = random_downsample(self.cfg, False).float().cuda()

    def run_both(self, T, dtype, attention):
        q = torch.randn(2, 8, T, 64, device="cuda")
        k, v = (torch.randn(2, 4, T, 64, device="cuda") for _ in range(2))
        g = torch.randn(2, 8, T, 64, device="cuda")
        results = []
        for f, dtype in ((fma_attention, torch.float32), (attention, dtype)):  # reference: fp32
            for t in (*self.kd.parameters(), *self.vd.parameters()):
                t.grad = None
            leaves = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
            with torch.autocast("cuda", torch.bfloat16, enabled=dtype == torch.bfloat16):
                out = f(self.cfg, *leaves, self.kd, self.vd)
            (out.float() * g).sum().backward()
            grads = [t.grad.float() for t in leaves] + [p.grad.clone() for p in
                                                         (*self.kd.parameters(), *self.vd.parameters())]
            results.append([out.float()] + grads)
        return results

    def test_float32_eager(self):
        name = self.ATTENTION.__name__
        for T in (1024, 1000, 2048 + 64):
            ref, got = self.run_both(T, torch.float32, self.ATTENTION)
            errs = [rel(a, b) for a, b in zip(got, ref)]
            print(f"{name}, float32, T {T}: largest relative error (output, gradients) {max(errs):.1e}")
            self.assertLess(max(errs), 1e-5, (T, errs))

    def test_bf16_compiled(self):
        name = self.ATTENTION.__name__
        ref, got = self.run_both(2048, torch.bfloat16, torch.compile(self.ATTENTION))
        errs = [rel(a, b) for a, b in zip(got, ref)]
        print(f"{name}, bf16 compiled: relative errors (output, gradients) {[f'{e:.1e}' for e in errs]}")
        self.assertLess(max(errs), 2e-2, errs)


@unittest.skipUnless(torch.cuda.is_available() and flex_attention_available(),
                     "FlexAttention: a GPU and PyTorch >= 2.5")
class FlexOnTheGpu(OnTheGpu, unittest.TestCase):
    ATTENTION = staticmethod(fma_attention_flex)


@unittest.skipUnless(torch.cuda.is_available()
                     and hasattr(torch.nn.functional, "scaled_dot_product_attention"),
                     "SDPA's FlashAttention: a GPU and PyTorch >= 2.1")
class FlashOnTheGpu(OnTheGpu, unittest.TestCase):
    ATTENTION = staticmethod(fma_attention_flash)


class RotarySummaries(unittest.TestCase):
    def outputs(self, cfg, kd, vd, q, k, v, start):
        cos, sin = rope_tables(q.shape[2], cfg.head_dim, cfg.rope_theta, "cpu", offset=start)
        return fma_attention(cfg, apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, kd, vd)

    def test_outputs_depend_on_relative_positions_only(self):
        """RoPE positions start at k instead of 0 (the hierarchy stays): rotary and avgpool
        summaries give the same outputs (float64: 1e-9, the rounding of angles near 1e6),
        per-channel groupedconv ones do not."""
        torch.manual_seed(3)
        for kind, rotary, invariant in [("groupedconv", True, True), ("avgpool", True, True),
                                        ("avgpool", False, True), ("groupedconv", False, False),
                                        ("attnpool", False, True)]:
            cfg = FmaConfig(head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=64, fma_block_size=8, fma_rank=2,
                            fma_downsampling=kind, fma_rotary_summaries=rotary)
            kd, vd = random_downsample(cfg, True), random_downsample(cfg, False)
            T = 3 * 64 + 5
            q = torch.randn(2, 4, T, 16, dtype=torch.float64)
            k = torch.randn(2, 2, T, 16, dtype=torch.float64)
            v = torch.randn(2, 2, T, 16, dtype=torch.float64)
            ref = self.outputs(cfg, kd, vd, q, k, v, 0)
            errs = [rel(self.outputs(cfg, kd, vd, q, k, v, s), ref) for s in (1, 37, 4099, 1000003)]
            if invariant:
                self.assertLess(max(errs), 1e-9, (kind, rotary, errs))
            else:
                self.assertGreater(max(errs), 1e-2, (kind, rotary, errs))

    def test_whole_sequence_shift(self):
        """The whole sequence after k other tokens (RoPE and the hierarchy move together). With k
        a multiple of n/2, the hierarchy's period (2 w_L, which every level's 2 w_l divides),
        every token keeps its place in every block and group, and a query at i >= n/2 sees only
        tokens from (i // (n/2) - 1) n/2 on: layer l's outputs do not change from i = l n/2 on,
        nor the logits from layers n/2 on, with rotary or avgpool summaries (float64: 1e-10);
        per-channel groupedconv ones move with k, and k = m moves the groups (> 1e-4)."""
        torch.manual_seed(4)
        n, layers = 64, 2
        half = n // 2
        for kind, rotary, shifts, invariant in [
                ("groupedconv", True, (half, 3 * half, 128 * half), True),
                ("avgpool", False, (half, 3 * half), True),
                ("attnpool", False, (half, 3 * half), True),
                ("groupedconv", False, (half, 3 * half), False),
                ("groupedconv", True, (8,), False)]:  # k = m: not a multiple of n/2
            cfg = FmaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            intermediate_size=48, max_position_embeddings=n, fma_block_size=8,
                            fma_rank=2, fma_downsampling=kind, fma_rotary_summaries=rotary)
            model = FmaModel(cfg).double()
            for layer in model.model.layers:  # make the summaries matter
                for down in (layer.self_attn.fma.k_down, layer.self_attn.fma.v_down):
                    randomize(down)
            ids = torch.randint(3, 50, (1, 3 * n + 5))
            from_ = layers * half
            ref = model(ids)[:, from_:]
            errs = [rel(model(torch.cat([torch.randint(3, 50, (1, k)), ids], 1))[:, k + from_:], ref)
                    for k in shifts]
            if invariant:
                self.assertLess(max(errs), 1e-10, (kind, rotary, shifts, errs))
            else:
                self.assertGreater(min(errs), 1e-4, (kind, rotary, shifts, errs))
            print(f"{kind}{' rotary' if rotary else ''}, shifts {shifts}: "
                  f"largest relative change of the logits {max(errs):.1e}")

    def test_starts_as_avgpool(self):
        cfg = FmaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=16, intermediate_size=48,
                        max_position_embeddings=64, fma_block_size=8, fma_rank=2,
                        fma_rotary_summaries=True)
        model = FmaModel(cfg).double()
        init_summaries_as_avgpool(model)
        pooled = FmaModel(FmaConfig(**{**cfg.__dict__, "fma_downsampling": "avgpool"})).double()
        pooled.load_state_dict(model.state_dict(), strict=False)
        ids = torch.randint(3, 50, (1, 150))
        self.assertLess(rel(model(ids), pooled(ids)), 1e-12)


class OptimiserGroups(unittest.TestCase):
    def test_summary_weights_learn_in_proportion_to_their_size(self):
        cfg = model_config(exact=False, size="tiny")
        model = FmaModel(cfg)
        groups = param_groups(model, cfg)
        grouped = [id(p) for g in groups for p in g["params"]]
        self.assertEqual(sorted(grouped), sorted(id(p) for p in model.parameters()))
        setting = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
        for name, prm in model.named_parameters():
            if ".fma." in name and name.endswith(".weight"):
                w = prm.shape[-1]  # the group size of its level
                self.assertEqual(setting[id(prm)], (cfg.fma_block_size / w, 0.0), name)
            elif ".fma." in name:
                self.assertEqual(setting[id(prm)], (1.0, 0.0), name)
            else:
                self.assertEqual(setting[id(prm)], (1.0, 0.1 if prm.dim() >= 2 else 0.0), name)
        levels = {cfg.fma_block_size / cfg.group_size(l) for l in range(1, cfg.levels + 1)}
        self.assertEqual({s for s, _ in setting.values()}, levels | {1.0})
        self.assertEqual(len(levels), cfg.levels)


if __name__ == "__main__":
    unittest.main()
