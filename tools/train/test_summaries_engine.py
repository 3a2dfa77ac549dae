#!/usr/bin/env python3
"""The trainer's rotary key summaries (fma_model.RotaryConv) and per-level ranks (fma_ranks) as
the engine reads them: random FMA models with those options, saved by save_hf, converted by
multipole-convert and scored by multipole-perplexity (CPU, fp32, in chunks of 37) past the trained
length, against the PyTorch model's own NLL in float64: 1e-4 per token, as the cross-checks.
FullModel: the same for train.py --size full (the model of issue 12 item 4) and its exact twin.
GgufToHf: gguf_to_hf.py gives back the weights multipole-convert stored (and prepare_corpus.py
its tokenizer).
usage: test_summaries_engine.py BUILD_DIR [EngineParity|GgufToHf|FullModel]"""
import json
import os
import subprocess
import sys
import tempfile
import unittest

import torch

from fma_model import FmaConfig, FmaModel, read_safetensors, save_hf
from prepare_corpus import tokenizer_bytes
from train import model_config

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(HERE, "..", "..", "tests", "data", "tiny-spm.model")
BUILD = None


class Parity(unittest.TestCase):
    def check(self, cfg=None, tokens=3 * 64 + 5, dtype=torch.float32, **options):
        torch.manual_seed(4)
        cfg = cfg or FmaConfig(vocab_size=400, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               intermediate_size=48, max_position_embeddings=64, fma_block_size=8,
                               fma_rank=2, **options)
        model = FmaModel(cfg)
        with torch.no_grad():  # weights of order one, so that the summaries' scores matter
            for name, prm in model.named_parameters():
                # (the tied head of a wide model at std 1 would give logits of std sqrt(hidden))
                fan_in = prm.shape[-1] if prm.dim() >= 2 and "embed" not in name else \
                    cfg.hidden_size / 16 if "embed" in name and cfg.hidden_size > 64 else 1
                prm.copy_((torch.randn_like(prm) / fan_in ** 0.5).to(dtype))  # as saved
        ids = torch.randint(3, 400, (1, tokens))
        with tempfile.TemporaryDirectory() as tmp:
            save_hf(model, os.path.join(tmp, "hf"), TOKENIZER, dtype=dtype)
            with open(os.path.join(tmp, "hf", "config.json")) as f:
                saved = json.load(f)
            for key, value in options.items():
                self.assertEqual(saved[key], value)
            gguf = os.path.join(tmp, "model.gguf")
            subprocess.run([os.path.join(BUILD, "tools", "multipole-convert"),
                            os.path.join(tmp, "hf"), gguf, "--dtype", "f32"], check=True,
                           capture_output=True)
            with open(os.path.join(tmp, "ids.txt"), "w") as f:
                f.write(" ".join(str(i) for i in ids[0].tolist()))
            subprocess.run([os.path.join(BUILD, "tools", "multipole-perplexity"), "--model", gguf,
                            "--ids", "--chunk", "37", "--nll-out", os.path.join(tmp, "nll.json"),
                            os.path.join(tmp, "ids.txt")], check=True, capture_output=True)
            with open(os.path.join(tmp, "nll.json")) as f:
                engine = torch.tensor(json.load(f), dtype=torch.float64)
        with torch.no_grad():
            ref = model.double().nll(ids)[0]
        self.assertEqual(engine.shape, ref.shape)
        err = (engine - ref).abs().max().item()
        print(f"{options}: {len(ref)} tokens, mean NLL {ref.mean().item():.2f}, "
              f"max |NLL engine - NLL PyTorch| = {err:.2e}")
        self.assertLess(err, 1e-4)



class EngineParity(Parity):
    def test_rotary(self):
        self.check(fma_rotary_summaries=True)

    def test_per_level_ranks(self):
        self.check(fma_ranks=[1, 4])

    def test_rotary_per_level_ranks(self):
        self.check(fma_rotary_summaries=True, fma_ranks=[4, 2])

    def test_fine_avgpool(self):
        # The content proxies' shape (MODEL.md, "Next for issue 12"): avgpool means of few tokens
        # (2 a summary at both levels here: m = 8, w = 8 and 16).
        self.check(fma_downsampling="avgpool", fma_rotary_summaries=True, fma_ranks=[4, 8])


class GgufToHf(unittest.TestCase):
    def test_round_trip(self):
        """gguf_to_hf.py gives back, bit for bit, the float32 weights that multipole-convert
        stored, the config and the tokenizer (rotary key summaries, per-level ranks, untied head,
        linear RoPE scaling)."""
        torch.manual_seed(5)
        cfg = FmaConfig(vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, intermediate_size=48,
                        max_position_embeddings=64, fma_block_size=8, fma_rank=4,
                        fma_ranks=[4, 2], fma_rotary_summaries=True, tie_word_embeddings=False,
                        rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=5000.0)
        model = FmaModel(cfg)
        with tempfile.TemporaryDirectory() as tmp:
            save_hf(model, os.path.join(tmp, "hf"), TOKENIZER)
            gguf = os.path.join(tmp, "model.gguf")
            subprocess.run([os.path.join(BUILD, "tools", "multipole-convert"),
                            os.path.join(tmp, "hf"), gguf, "--dtype", "f32"], check=True,
                           capture_output=True)
            subprocess.run([sys.executable, os.path.join(HERE, "gguf_to_hf.py"), gguf,
                            os.path.join(tmp, "back")], check=True, capture_output=True)
            back = read_safetensors(os.path.join(tmp, "back"))
            for name in ("config.json", "tokenizer.model"):
                with open(os.path.join(tmp, "hf", name), "rb") as a, \
                        open(os.path.join(tmp, "back", name), "rb") as b:
                    self.assertEqual(a.read(), b.read(), name)
            with open(os.path.join(tmp, "hf", "tokenizer.model"), "rb") as f:  # the corpus builder's
                self.assertEqual(tokenizer_bytes(gguf), f.read())
        want = model.state_dict()
        self.assertEqual(sorted(back), sorted(want))
        for name, t in want.items():
            self.assertTrue(torch.equal(back[name], t), name)


class FullModel(Parity):  # ctest train.full_model_engine (release build only: 48M parameters)
    def test_full_model_and_twin(self):
        """train.py --size full (47.6M parameters) and its exact twin, as the engine reads them:
        bf16 weights as trained, 300 tokens (levels 1 and 2 of m = 64 in use); the shipped
        model's m = 256 (ranks 2,4,4,4) over 700 tokens (its levels 1 and 2)."""
        for cfg, tokens in ((model_config(False, "full"), 300), (model_config(True, "full"), 300),
                            (model_config(False, "full", ranks=[2, 4, 4, 4], block_size=256), 700)):
            self.check(cfg, tokens=tokens, dtype=torch.bfloat16, **{
                k: getattr(cfg, k) for k in ("fma_enabled", "fma_ranks", "fma_rotary_summaries")})


if __name__ == "__main__":
    BUILD = os.path.abspath(sys.argv.pop(1))
    unittest.main()
