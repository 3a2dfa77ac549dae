#!/usr/bin/env python3
"""The vectorised FMA of fma_model.py against its per-query version, on random inputs, for every
downsampling kind, with grouped-query heads, sequence lengths that are not multiples of m, and
past the trained length. float64 on the CPU: 1e-10 relative."""
import itertools
import unittest

import torch

from fma_model import FmaConfig, FmaModel, Downsample, fma_attention, fma_attention_slow
from train import model_config, param_groups


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


class FastVsSlow(unittest.TestCase):
    def test_attention(self):
        torch.manual_seed(0)
        for kind, scale, (n, m, p), heads, T in itertools.product(
                ["groupedconv", "conv", "avgpool"], [True, False], [(64, 8, 2), (128, 16, 4)],
                [(4, 2), (2, 2)], [37, 200]):
            cfg = FmaConfig(head_dim=8, num_attention_heads=heads[0], num_key_value_heads=heads[1],
                            max_position_embeddings=n, fma_block_size=m, fma_rank=p,
                            fma_downsampling=kind, fma_scale_attn=scale)
            kd, vd = Downsample(cfg).double(), Downsample(cfg).double()
            for conv in list(kd) + list(vd):  # make the summaries matter
                torch.nn.init.normal_(conv.weight, std=0.3)
                torch.nn.init.normal_(conv.bias, std=0.3)
            q = torch.randn(2, heads[0], T, 8, dtype=torch.float64)
            k = torch.randn(2, heads[1], T, 8, dtype=torch.float64)
            v = torch.randn(2, heads[1], T, 8, dtype=torch.float64)
            fast = fma_attention(cfg, q, k, v, kd, vd)
            slow = fma_attention_slow(cfg, q, k, v, kd, vd)
            self.assertLess(rel(fast, slow), 1e-10, (kind, scale, n, m, p, heads, T))

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


class OptimiserGroups(unittest.TestCase):
    def test_summary_weights_learn_in_proportion_to_their_size(self):
        cfg = model_config(exact=False, tiny=True)
        model = FmaModel(cfg)
        groups = param_groups(model, cfg)
        grouped = [id(p) for g in groups for p in g["params"]]
        self.assertEqual(sorted(grouped), sorted(id(p) for p in model.parameters()))
        setting = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
        for name, prm in model.named_parameters():
            if ".fma." in name and name.endswith(".weight"):
                w = prm.shape[-1]  # the group size of its level
                self.assertEqual(setting[id(prm)], (cfg.fma_block_size / w, 0.0), name)
            else:
                self.assertEqual(setting[id(prm)], (1.0, 0.1 if prm.dim() >= 2 else 0.0), name)
        levels = {cfg.fma_block_size / cfg.group_size(l) for l in range(1, cfg.levels + 1)}
        self.assertEqual({s for s, _ in setting.values()}, levels | {1.0})
        self.assertEqual(len(levels), cfg.levels)


if __name__ == "__main__":
    unittest.main()
