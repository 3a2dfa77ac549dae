#!/usr/bin/env python3
"""An independent float64 NumPy implementation of DESIGN.md sections 1 and 3.

Reads a Hugging Face style FMA checkpoint folder and a file of token ids, and prints the
per-token negative log-likelihoods (nats, token 1..T-1 from its prefix) as a JSON array.
A Llama-family folder (no fma_* keys) runs exact attention, or FMA with multipole-convert's options
`--fma avgpool|groupedconv --block-size M --rank P --trained-length N` (groupedconv with the
weights the conversion gives it: each summary the mean of its w/p tokens).
Each query's key list is built explicitly from the rules of section 1, and the summaries are
computed from the whole sequence: no cache, no chunks. This is what the engine is checked against.
"""
import json
import os
import struct
import sys

import numpy as np


def load_safetensors(folder):
    index = os.path.join(folder, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) \
        else ["model.safetensors"]
    out = {}
    for name in files:
        raw = open(os.path.join(folder, name), "rb").read()
        (hlen,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + hlen])
        base = 8 + hlen
        for key, info in header.items():
            if key == "__metadata__":
                continue
            b, e = info["data_offsets"]
            buf = raw[base + b:base + e]
            if info["dtype"] == "F32":
                arr = np.frombuffer(buf, dtype="<f4")
            elif info["dtype"] == "F16":
                arr = np.frombuffer(buf, dtype="<f2")
            elif info["dtype"] == "BF16":
                arr = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                raise ValueError(info["dtype"])
            out[key] = arr.astype(np.float64).reshape(info["shape"])
    return out


def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, theta, factor):  # x: [T, heads, d], position t / factor for row t; rotate-half
    T, _, d = x.shape
    inv = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = (np.arange(T, dtype=np.float64) / factor)[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def group_summaries(X, w, p, kind, W=None, b=None, rotary=False):
    """X: [T, d] keys or values of one head. Returns {g: [p, d]} for every complete group.
    rotary (groupedconv keys with fma_rotary_summaries): W [d/2*p, 2, w] holds per RoPE pair j
    and summary r one complex weight a + ib per tap; the pair (x_j, x_{j+d/2}) is the complex
    number x_j + i x_{j+d/2}; no bias."""
    T, d = X.shape
    out = {}
    for g in range(T // w):
        G = X[g * w:(g + 1) * w]  # [w, d]
        if rotary:
            z = G[:, :d // 2] + 1j * G[:, d // 2:]  # [w, d/2]
            u = W[:, 0, :] + 1j * W[:, 1, :]  # [d/2*p, w], row j*p + r
            s = np.array([[np.dot(u[j * p + r], z[:, j]) for j in range(d // 2)] for r in range(p)])
            out[g] = np.concatenate([s.real, s.imag], axis=1)
            continue
        if kind == "avgpool":
            s = np.stack([G[r * (w // p):(r + 1) * (w // p)].mean(axis=0) for r in range(p)])
        else:
            conv = np.zeros(d * p)
            for oc in range(d * p):
                if kind == "groupedconv":
                    conv[oc] = b[oc] + np.dot(W[oc, 0, :], G[:, oc // p])
                else:  # conv: all input channels
                    conv[oc] = b[oc] + np.sum(W[oc] * G.T)
            s = np.array([[conv[c * p + r] for c in range(d)] for r in range(p)])
        out[g] = s
    return out


def attention(cfg, q, k, v, down):
    """q: [T, H, d], k/v: [T, KV, d] (rotated). down: level -> (Wk, bk, Wv, bv)."""
    T, H, d = q.shape
    KV = k.shape[1]
    out = np.zeros_like(q)
    fma = cfg["fma_enabled"]
    m = cfg.get("fma_block_size", 0)
    n = cfg["max_position_embeddings"]
    kind = cfg.get("fma_downsampling", "groupedconv")
    scale_attn = cfg.get("fma_scale_attn", True)
    rotary = cfg.get("fma_rotary_summaries", False) and kind == "groupedconv"
    L = int(round(np.log2(n // m))) - 1 if fma else 0
    ranks = cfg.get("fma_ranks") or [cfg.get("fma_rank", 0)] * L  # p_l, index level-1
    for kvh in range(KV):
        sums = {}
        for lvl in range(1, L + 1):
            w, p = m * 2 ** (lvl - 1), ranks[lvl - 1]
            Wk, bk, Wv, bv = down.get(lvl, (None, None, None, None))
            sums[lvl] = (group_summaries(k[:, kvh], w, p, kind, Wk, bk, rotary),
                         group_summaries(v[:, kvh], w, p, kind, Wv, bv))
        for h in range(kvh * (H // KV), (kvh + 1) * (H // KV)):
            for i in range(T):
                keys, vals, bonus = [], [], []
                lo = max(0, (i // m - 1) * m) if fma else 0
                for j in range(lo, i + 1):
                    keys.append(k[j, kvh]); vals.append(v[j, kvh]); bonus.append(0.0)
                for lvl in range(1, L + 1):
                    w, p = m * 2 ** (lvl - 1), ranks[lvl - 1]
                    B, half = i // (2 * w), (i % (2 * w)) // w
                    groups = ([2 * B - 2] if B >= 1 else []) + ([2 * B - 1] if B >= 1 and half == 1 else [])
                    for g in groups:
                        assert (g + 1) * w <= i
                        for r in range(p):
                            keys.append(sums[lvl][0][g][r]); vals.append(sums[lvl][1][g][r])
                            bonus.append(np.log(w / p) if scale_attn else 0.0)
                s = np.array(keys) @ q[i, h] / np.sqrt(d) + np.array(bonus)
                s = np.exp(s - s.max())
                out[i, h] = (s / s.sum()) @ np.array(vals)
    return out


def averaging_conv(w, p, d):
    """The groupedconv weights [d*p, 1, w] and bias whose summary r is the mean of span r."""
    W = np.zeros((d * p, 1, w))
    for oc in range(d * p):
        r = oc % p
        W[oc, 0, r * (w // p):(r + 1) * (w // p)] = p / w
    return W, np.zeros(d * p)


def with_fma(cfg, t, args):
    """Applies multipole-convert's --fma options to a config without FMA."""
    opts = dict(zip(args[::2], args[1::2]))
    kind = opts["--fma"]
    cfg.update({"fma_enabled": True, "fma_downsampling": kind,
                "fma_block_size": int(opts.get("--block-size", 64)),
                "fma_rank": int(opts.get("--rank", 4))})
    if "--trained-length" in opts:
        cfg["max_position_embeddings"] = int(opts["--trained-length"])
    m, p, d = cfg["fma_block_size"], cfg["fma_rank"], cfg["head_dim"]
    levels = int(round(np.log2(cfg["max_position_embeddings"] // m))) - 1
    for li in range(cfg["num_hidden_layers"] if kind == "groupedconv" else 0):
        for lvl in range(levels):
            W, b = averaging_conv(m * 2 ** lvl, p, d)
            for which in ("k", "v"):
                base = f"model.layers.{li}.self_attn.fma.{which}_down.{lvl}"
                t[base + ".weight"], t[base + ".bias"] = W, b


def main():
    folder, ids_path = sys.argv[1], sys.argv[2]
    cfg = json.load(open(os.path.join(folder, "config.json")))
    t = load_safetensors(folder)
    ids = [int(x) for x in open(ids_path).read().split()]
    H = cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads", H)
    cfg["head_dim"] = d = cfg.get("head_dim") or cfg["hidden_size"] // H
    cfg.setdefault("fma_enabled", "fma_block_size" in cfg)
    if len(sys.argv) > 3:
        with_fma(cfg, t, sys.argv[3:])
    eps, theta = cfg["rms_norm_eps"], cfg.get("rope_theta", 10000.0)
    scaling = cfg.get("rope_scaling") or {}
    factor = scaling["factor"] if scaling.get("rope_type", scaling.get("type")) == "linear" else 1.0
    x = t["model.embed_tokens.weight"][ids]
    T = len(ids)
    for li in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{li}."
        hdn = rmsnorm(x, t[pre + "input_layernorm.weight"], eps)
        q = rope((hdn @ t[pre + "self_attn.q_proj.weight"].T).reshape(T, H, d), theta, factor)
        k = rope((hdn @ t[pre + "self_attn.k_proj.weight"].T).reshape(T, KV, d), theta, factor)
        v = (hdn @ t[pre + "self_attn.v_proj.weight"].T).reshape(T, KV, d)
        down = {}
        lvl = 0
        while pre + f"self_attn.fma.k_down.{lvl}.weight" in t:
            f = pre + "self_attn.fma."
            down[lvl + 1] = (t[f + f"k_down.{lvl}.weight"], t.get(f + f"k_down.{lvl}.bias"),
                             t[f + f"v_down.{lvl}.weight"], t[f + f"v_down.{lvl}.bias"])
            lvl += 1
        a = attention(cfg, q, k, v, down).reshape(T, H * d)
        x = x + a @ t[pre + "self_attn.o_proj.weight"].T
        hdn = rmsnorm(x, t[pre + "post_attention_layernorm.weight"], eps)
        g = hdn @ t[pre + "mlp.gate_proj.weight"].T
        u = hdn @ t[pre + "mlp.up_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ t[pre + "mlp.down_proj.weight"].T
    x = rmsnorm(x, t["model.norm.weight"], eps)
    head = t["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else t["lm_head.weight"]
    logits = x @ head.T
    mx = logits.max(axis=-1, keepdims=True)
    lse = (mx + np.log(np.exp(logits - mx).sum(axis=-1, keepdims=True)))[:, 0]
    nll = [float(lse[i] - logits[i, ids[i + 1]]) for i in range(T - 1)]
    print(json.dumps(nll))


if __name__ == "__main__":
    main()
