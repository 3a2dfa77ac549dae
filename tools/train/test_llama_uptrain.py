#!/usr/bin/env python3
"""FMA uptraining of Llama-family checkpoints, on the CPU at toy size: the Llama folder round trip,
FMA conversion in PyTorch (groupedconv starts as avgpool), and the whole GPU script
llama_uptrain_gpu.sh (TINY=1 DEVICE=cpu) on a synthetic corpus, the engine included.
usage: test_llama_uptrain.py BUILD_DIR"""
import json
import os
import re
import subprocess
import sys
import tempfile
import unittest

import numpy as np
import torch

from fma_model import FmaConfig, FmaModel, load_hf, read_safetensors, save_hf
from train import llama_config

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TOKENIZER = os.path.join(ROOT, "tests", "data", "tiny-spm.model")
BUILD = None


def text(*path):
    with open(os.path.join(*path)) as f:
        return f.read()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def random_llama(folder):
    torch.manual_seed(2)
    cfg = llama_config(tiny=True, context=64)
    model = FmaModel(cfg)
    with torch.no_grad():  # weights of order one, so that the attention's pattern matters
        for name, prm in model.named_parameters():
            if prm.dim() >= 2:
                prm.copy_(torch.randn_like(prm) / (prm.shape[1] ** 0.5 if "embed" not in name else 1))
    save_hf(model, folder, TOKENIZER, llama=True)
    return model


class LlamaFolders(unittest.TestCase):
    def test_llama_folder_round_trip(self):
        with tempfile.TemporaryDirectory() as tmp:
            model = random_llama(tmp)
            cfg = json.loads(text(tmp, "config.json"))
            self.assertEqual(cfg["architectures"], ["LlamaForCausalLM"])
            self.assertFalse([k for k in cfg if k.startswith("fma_")])
            back, bcfg = load_hf(tmp)
            self.assertFalse(bcfg.fma_enabled)
            self.assertFalse(bcfg.tie_word_embeddings)
            ids = torch.randint(3, 400, (2, 40))
            self.assertLess(rel(back(ids), model(ids)), 1e-6)

    def test_transformers_defaults_and_linear_rope_scaling(self):
        cfg = FmaConfig.from_json(json.dumps({
            "architectures": ["LlamaForCausalLM"], "vocab_size": 50, "hidden_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 48,
            "max_position_embeddings": 64, "rope_scaling": {"type": "linear", "factor": 4.0}}))
        self.assertEqual((cfg.num_key_value_heads, cfg.head_dim, cfg.fma_enabled), (4, 8, False))
        self.assertFalse(cfg.tie_word_embeddings)
        self.assertEqual(cfg.rope_factor, 4.0)
        with self.assertRaises(ValueError):
            _ = FmaConfig(rope_scaling={"type": "dynamic", "factor": 2.0}).rope_factor

    def test_groupedconv_starts_as_avgpool(self):
        with tempfile.TemporaryDirectory() as tmp:
            exact = random_llama(tmp)
            opts = dict(block_size=8, rank=2)
            avg, _ = load_hf(tmp, fma=dict(downsampling="avgpool", **opts))
            conv, ccfg = load_hf(tmp, fma=dict(downsampling="groupedconv", **opts))
            self.assertEqual(ccfg.levels, 2)
            ids = torch.randint(3, 400, (2, 150))
            self.assertLess(rel(conv(ids), avg(ids)), 1e-5)
            self.assertGreater(rel(conv(ids), exact(ids)), 1e-3)  # past 2m the summaries count


def synthetic_corpus(folder):
    """Random ids with some repetition, in prepare_corpus.py's layout."""
    rng = np.random.default_rng(0)
    os.makedirs(folder)
    base = rng.integers(3, 400, 5000)
    for split, n in (("train", 20000), ("val", 600)):
        ids = np.concatenate([base[rng.integers(0, 4000):][:100] for _ in range(n // 100)])
        ids.astype(np.uint16).tofile(os.path.join(folder, f"{split}.bin"))
    with open(os.path.join(folder, "val_docs.json"), "w") as f:
        json.dump([{"start": 0, "length": 600}], f)
    with open(TOKENIZER, "rb") as src, open(os.path.join(folder, "tokenizer.model"), "wb") as dst:
        dst.write(src.read())


class GpuScriptAtToySize(unittest.TestCase):
    def test_pipeline(self):
        with tempfile.TemporaryDirectory() as tmp:
            data, out, work = (os.path.join(tmp, d) for d in ("data", "out", "work"))
            synthetic_corpus(data)
            env = dict(os.environ, TINY="1", DEVICE="cpu", WORK=work,
                       MULTIPOLE_BIN=os.path.join(BUILD, "tools"),
                       PATH=os.path.dirname(sys.executable) + ":" + os.environ["PATH"])
            subprocess.run(["bash", "tools/train/llama_uptrain_gpu.sh", data, out], cwd=ROOT, env=env,
                           check=True, stdout=subprocess.DEVNULL)
            table = text(out, "results.md").splitlines()
            self.assertEqual(len(table), 6, table)
            for k in ("exact", "avgpool", "frozen", "full"):
                ev = json.loads(text(out, f"eval_{k}.json"))
                self.assertTrue(all(np.isfinite(ev[f"ppl_ctx{c}"]) for c in (32, 64)), k)
            # The frozen run moved the summary weights only; the full run moved the rest too.
            llama = read_safetensors(os.path.join(work, "llama", "hf"))
            frozen = read_safetensors(os.path.join(work, "frozen", "hf"))
            full = read_safetensors(os.path.join(work, "full", "hf"))
            self.assertTrue(all(torch.equal(llama[k], frozen[k]) for k in llama))
            self.assertFalse(all(torch.equal(llama[k], full[k]) for k in llama))
            span = frozen["model.layers.0.self_attn.fma.k_down.0.weight"]  # started as 1/4 or 0
            self.assertGreater((span - torch.where(span > 0.125, 0.25, 0.0)).abs().max().item(), 0)
            # The engine converted the Llama folder three ways and the uptrained one, and scores
            # each as PyTorch does (fp32 here).
            engine = text(out, "engine.txt").splitlines()
            self.assertEqual(len(engine), 4, engine)
            for line in engine:
                diff = float(re.search(r"relative difference ([0-9.e+-]+)", line).group(1))
                self.assertLess(diff, 1e-4, line)


if __name__ == "__main__":
    BUILD = os.path.abspath(sys.argv.pop(1))
    unittest.main()
