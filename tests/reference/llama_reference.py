#!/usr/bin/env python3
"""An independent float64 PyTorch forward of a Hugging Face LlamaForCausalLM / MistralForCausalLM
folder, written after transformers' modeling_llama.py (which cannot be installed here): rotate-half
RoPE with inv_freq / factor for linear rope_scaling, repeat_kv for grouped-query heads, causal
softmax attention, SwiGLU MLP, RMSNorm, tied or untied head.

usage: llama_reference.py HF_DIR IDS_FILE  -> per-token NLL (nats) of ids[1:] as a JSON array
"""
import json
import math
import os
import sys

import torch

from fma_reference import load_safetensors

class Llama:
    def __init__(self, folder):
        self.cfg = json.load(open(os.path.join(folder, "config.json")))
        self.w = {k: torch.from_numpy(v) for k, v in load_safetensors(folder).items()}

    def rotary(self, T, dim):
        cfg = self.cfg
        scaling = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}  # transformers 5, 4
        theta = scaling.get("rope_theta", cfg.get("rope_theta", 10000.0))
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        if scaling.get("rope_type", scaling.get("type")) == "linear":
            inv_freq = inv_freq / scaling["factor"]
        freqs = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    @staticmethod
    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat([-x2, x1], dim=-1)

    def rms_norm(self, x, weight):
        var = x.pow(2).mean(-1, keepdim=True)
        return weight * (x * torch.rsqrt(var + self.cfg["rms_norm_eps"]))

    def logits(self, ids):
        cfg, w = self.cfg, self.w
        H = cfg["num_attention_heads"]
        KV = cfg.get("num_key_value_heads", H)
        d = cfg.get("head_dim") or cfg["hidden_size"] // H
        T = len(ids)
        cos, sin = self.rotary(T, d)
        mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
        x = w["model.embed_tokens.weight"][torch.tensor(ids)]
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = self.rms_norm(x, w[p + "input_layernorm.weight"])
            q = (h @ w[p + "self_attn.q_proj.weight"].T).view(T, H, d).transpose(0, 1)
            k = (h @ w[p + "self_attn.k_proj.weight"].T).view(T, KV, d).transpose(0, 1)
            v = (h @ w[p + "self_attn.v_proj.weight"].T).view(T, KV, d).transpose(0, 1)
            q = q * cos + self.rotate_half(q) * sin
            k = k * cos + self.rotate_half(k) * sin
            k = k.repeat_interleave(H // KV, dim=0)  # repeat_kv
            v = v.repeat_interleave(H // KV, dim=0)
            att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d) + mask, dim=-1) @ v
            x = x + att.transpose(0, 1).reshape(T, H * d) @ w[p + "self_attn.o_proj.weight"].T
            h = self.rms_norm(x, w[p + "post_attention_layernorm.weight"])
            gate = h @ w[p + "mlp.gate_proj.weight"].T
            up = h @ w[p + "mlp.up_proj.weight"].T
            x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
        x = self.rms_norm(x, w["model.norm.weight"])
        head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
        return x @ head.T


def main():
    folder, ids_path = sys.argv[1], sys.argv[2]
    ids = [int(t) for t in open(ids_path).read().split()]
    logits = Llama(folder).logits(ids)
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
    print(json.dumps(nll.tolist()))


if __name__ == "__main__":
    main()
