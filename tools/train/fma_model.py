"""PyTorch reference of the Multipole FMA model (DESIGN.md sections 1 and 3).

`FmaModel` is the Llama-style decoder with causal Fast Multipole Attention; `fma_attention` is the
vectorised attention used for training (per fine block: the 2m fine keys plus the per-level
summaries, one softmax), `fma_attention_flex` the same as one FlexAttention call (opt-in, GPU),
`fma_attention_slow` the per-query version they are tested against.
Runs on PyTorch 1.13 (CPU, for the tests here) and 2.x (GPU, with SDPA).
"""
import importlib.util
import json
import math
import os
import struct
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class FmaConfig:
    vocab_size: int = 8192
    hidden_size: int = 512
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 64
    intermediate_size: int = 1344
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # Hugging Face's; only {"type": "linear", "factor": f}
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 8192  # n
    fma_enabled: bool = True
    fma_block_size: int = 64  # m
    fma_rank: int = 2  # p; with fma_ranks their largest
    fma_ranks: Optional[list] = None  # per coarse level (index level-1); None: fma_rank everywhere
    fma_downsampling: str = "groupedconv"
    fma_scale_attn: bool = True
    fma_rotary_summaries: bool = False  # key summaries rotate with their keys (docs/MODEL.md)
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self):
        if self.fma_ranks:
            assert len(self.fma_ranks) == self.levels, ("fma_ranks: one per level", self.levels)
            self.fma_rank = max(self.fma_ranks)

    def rank(self, level):  # p_l, level 1..L
        return self.fma_ranks[level - 1] if self.fma_ranks else self.fma_rank

    @property
    def levels(self):
        if not self.fma_enabled:
            return 0
        return int(round(math.log2(self.max_position_embeddings // self.fma_block_size))) - 1

    def group_size(self, level):  # level 1..L
        return self.fma_block_size * 2 ** (level - 1)

    @property
    def rope_factor(self):  # positions are divided by it
        s = self.rope_scaling or {}
        kind = s.get("rope_type", s.get("type", "default"))
        if kind not in ("default", "linear"):
            raise ValueError(f"rope_scaling {kind} is not supported (only linear)")
        return s["factor"] if kind == "linear" else 1.0

    def to_hf_json(self, llama=False):
        """Our FmaForCausalLM config, or with llama=True (exact attention only) the config of a
        Hugging Face LlamaForCausalLM, as a pretrained checkpoint from elsewhere would have."""
        d = asdict(self)
        if not llama:
            d.update({"architectures": ["FmaForCausalLM"], "model_type": "fma"})
            return json.dumps(d, indent=2)
        assert not self.fma_enabled, "a Llama checkpoint has no FMA"
        d = {k: v for k, v in d.items() if not k.startswith("fma_")}
        d.update({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                  "attention_bias": False})
        return json.dumps(d, indent=2)

    @staticmethod
    def from_json(text):
        """Our config or a Llama-family one (no fma_* keys: exact attention; transformers'
        defaults for the keys it may leave out)."""
        d = json.loads(text)
        d.setdefault("fma_enabled", "fma_block_size" in d)
        d.setdefault("num_key_value_heads", d["num_attention_heads"])
        d.setdefault("tie_word_embeddings", False)
        if not d.get("head_dim"):
            d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        fields = FmaConfig.__dataclass_fields__
        return FmaConfig(**{k: v for k, v in d.items() if k in fields})

    def with_fma(self, downsampling, block_size, rank, trained_length=None,
                 rotary_summaries=False):
        """This exact-attention config turned into FMA, as multipole-convert --fma does."""
        assert not self.fma_enabled, "the checkpoint already has FMA"
        n = trained_length or self.max_position_embeddings
        assert block_size % rank == 0 and n % block_size == 0 and n // block_size >= 4 \
            and (n // block_size) & (n // block_size - 1) == 0, (block_size, rank, n)
        return replace(self, fma_enabled=True, fma_downsampling=downsampling,
                       fma_block_size=block_size, fma_rank=rank, max_position_embeddings=n,
                       fma_rotary_summaries=rotary_summaries)

    def rotary_keys(self):
        """Whether the key summaries are rotary groupedconv ones (RotaryConv)."""
        assert not (self.fma_rotary_summaries and self.fma_downsampling == "conv"), \
            "fma_rotary_summaries needs groupedconv or avgpool"
        return self.fma_rotary_summaries and self.fma_downsampling == "groupedconv"


class RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(T, d, theta, device, offset=0, factor=1.0):
    """cos/sin [T, d/2], angles in float64 (as the engine computes them), position t / factor."""
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
    pos = torch.arange(offset, offset + T, dtype=torch.float64, device=device) / factor
    ang = pos[:, None] * inv[None]
    return torch.cos(ang), torch.sin(ang)


def apply_rope(x, cos, sin):  # x [..., T, d], rotate-half (Hugging Face convention)
    half = x.shape[-1] // 2
    acc = torch.promote_types(x.dtype, torch.float32)
    cos, sin = cos.to(acc), sin.to(acc)
    x1, x2 = x[..., :half].to(acc), x[..., half:].to(acc)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class RotaryConv(nn.Module):
    """A level's rotary key summaries: per RoPE pair j (channels j, j + d/2, read as the complex
    number x_j + i x_{j+d/2}), summary r and tap t one complex weight a + ib, stored as
    weight[j*p + r] = [a[t], b[t]]; no bias. Summary r of pair j = sum_t (a + ib)(x_j + i x_{j+d/2})
    commutes with RoPE's rotation of the pair, so it rotates as its keys do."""

    def __init__(self, d, p, w):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d // 2 * p, 2, w))


class AttnPool(nn.Module):
    """A level's content-chosen summaries (fma_downsampling "attnpool"; the trainer's alone for
    now: the engine reads no such checkpoint, docs/MODEL.md). Summary r of a group is the
    weighted mean of its w keys and, with the same weights, of its w values, the weights
    softmax_t(query_r . v_t / sqrt(d) + bias_r[t]): chosen by the values' content (not rotated, so
    that a summary of rotated keys rotates as they do: scores depend on relative positions only)
    and by the token's place in the group. It starts near avgpool's p means (query 0; bias 0 in
    the r-th part of the group, -4 elsewhere) and can learn to keep what a query will look for."""

    def __init__(self, d, p, w):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(p, d))
        bias = torch.full((p, w), -4.0)
        for r in range(p):
            bias[r, r * w // p:(r + 1) * w // p] = 0.0
        self.bias = nn.Parameter(bias)

    def weights(self, V):
        """V [d, N G, w] (a level's groups of values, channels first) -> [N G, p, w]."""
        acc = torch.promote_types(V.dtype, torch.float32)  # softmax precision
        s = torch.einsum("rd,dnw->nrw", self.query.to(V.dtype), V) / math.sqrt(V.shape[0])
        return (s.to(acc) + self.bias.to(acc)).softmax(-1).to(V.dtype)


class Downsample(nn.ModuleList):
    """Per level, the map from a group of w keys (or values) to p summaries: item l-1 is level
    l's convolution (none for avgpool), so the weights are named <prefix>.<l-1>.weight.
    keys=True with cfg.fma_rotary_summaries: rotary ones (RotaryConv). attnpool: the values'
    module holds the levels' AttnPool, whose weights pool the keys too (level_pair)."""

    def __init__(self, cfg: FmaConfig, keys=False):
        kind, d = cfg.fma_downsampling, cfg.head_dim
        groups = [cfg.group_size(level) for level in range(1, cfg.levels + 1)]
        ranks = [cfg.rank(level) for level in range(1, cfg.levels + 1)]
        g = d if kind == "groupedconv" else 1
        self.rotary = keys and cfg.rotary_keys()
        if kind == "attnpool":
            levels = [] if keys else [AttnPool(d, p, w) for w, p in zip(groups, ranks)]
        elif kind == "avgpool":
            levels = []
        else:
            levels = [RotaryConv(d, p, w) if self.rotary else
                      nn.Conv1d(d, p * d, w, stride=w, groups=g) for w, p in zip(groups, ranks)]
        super().__init__(levels)
        self.kind, self.ranks, self.d, self.groups = kind, ranks, d, groups

    @staticmethod
    def channels_first(x):
        """x [N, T, d] -> [d, N, T], the one copy a layer's summaries need: every level's groups
        are then views [d, N G, w] and each level one batched product over channels (contracting
        views of [N, T, d] instead made a copy of the keys per product: 37 % of a compiled training
        step's device time, docs/MODEL.md)."""
        return x.permute(2, 0, 1).contiguous()

    def forward(self, x, level):
        """x [N, T, d] -> summaries of the complete groups [N, G, p, d]."""
        return self.level_summaries(self.channels_first(x), level)

    def level_summaries(self, xt, level):
        """xt [d, N, T] (channels_first) -> level's summaries of the complete groups [N, G, p, d]."""
        d, N, T = xt.shape
        w, p = self.groups[level - 1], self.ranks[level - 1]
        G = T // w
        X = (xt if G * w == T else xt[:, :, :G * w]).reshape(d, N * G, w)  # no slice to undo
        if self.kind == "avgpool":
            S = X.view(d, N * G, p, w // p).mean(3)
        elif self.rotary:  # pair j: (a + ib)(x_j + i x_{j+d/2}) = re + i im, as [x1 x2] [[a b] [-b a]]
            W = self[level - 1].weight.view(d // 2, p, 2, w).to(X.dtype)
            a, b = W[:, :, 0], W[:, :, 1]  # [d/2, p, w]
            x1, x2 = X.view(2, d // 2, N * G, w).unbind(0)
            Y = torch.baddbmm(x1 @ torch.cat([a, b], 1).mT, x2, torch.cat([-b, a], 1).mT)
            S = torch.cat([Y[..., :p], Y[..., p:]], 0)  # [d, N G, p]: re, then im
        else:  # output channel c*p + r of the convolution
            conv = self[level - 1]
            bias = conv.bias.view(d, 1, p).to(X.dtype)
            if self.kind == "groupedconv":
                S = torch.baddbmm(bias, X, conv.weight.view(d, p, w).mT.to(X.dtype))
            else:
                S = torch.einsum("ikt,crit->ckr", X, conv.weight.view(d, p, d, w).to(X.dtype)) + bias
        return S.view(d, N, G, p).permute(1, 2, 3, 0)


def present_levels(cfg: FmaConfig, T):
    """The levels whose groups some block of a T-token sequence sees (T > 2 w_l)."""
    return [level for level in range(1, cfg.levels + 1) if T > 2 * cfg.group_size(level)]


def level_pair(k_down: Downsample, v_down: Downsample, kt, vt, level):
    """kt, vt [d, N, T] (channels_first) -> the level's key and value summaries of the complete
    groups, each [N, G, p, d]."""
    if v_down.kind != "attnpool":
        return k_down.level_summaries(kt, level), v_down.level_summaries(vt, level)
    d, N, T = vt.shape
    w, p = v_down.groups[level - 1], v_down.ranks[level - 1]
    G = T // w
    K, V = (x[:, :, :G * w].reshape(d, N * G, w) for x in (kt, vt))
    a = v_down[level - 1].weights(V)  # [N G, p, w]
    return tuple(torch.einsum("nrw,dnw->nrd", a, X).view(N, G, p, d) for X in (K, V))


def summaries(cfg: FmaConfig, k, v, k_down: Downsample, v_down: Downsample):
    """k, v [B, KV, T, d] -> per present level (level, key summaries, value summaries), each
    [B, KV, G, p, d], from one channels-first copy of k and of v."""
    B, KV, T, d = k.shape
    kt, vt = (Downsample.channels_first(t.reshape(B * KV, T, d)) for t in (k, v))
    return [(level, *(x.reshape(B, KV, -1, cfg.rank(level), d)
                      for x in level_pair(k_down, v_down, kt, vt, level)))
            for level in present_levels(cfg, T)]


def _expand_kv(x, heads):  # [B, KV, ...] -> [B, H, ...] (no copy when KV = H)
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def padded_to_blocks(m, q, k, v):
    """q, k, v padded with zeros along T to a multiple of m (padded keys lie after every real
    query: never visible); returns them and the padded length."""
    pad = (-q.shape[2]) % m
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    return q, k, v, q.shape[2]


def block_summaries(cfg: FmaConfig, k, v, k_down: Downsample, v_down: Downsample, nb):
    """The summaries each of the nb fine blocks sees, per present level: keys and values [B, KV,
    nb, 2p, d] (the two groups before its level-l block pair: DESIGN.md section 1) and each
    one's score bonus [nb, 2p] (log(w/p) with fma_scale_attn, else 0; -inf where the group is not
    there)."""
    B, KV, _, d = k.shape
    m = cfg.fma_block_size
    i0 = torch.arange(nb, device=k.device) * m
    out = []
    for level, Ks, Vs in summaries(cfg, k, v, k_down, v_down):
        w, p = cfg.group_size(level), cfg.rank(level)
        Bl, h = i0 // (2 * w), (i0 % (2 * w)) // w
        idx = torch.stack([2 * Bl - 2, 2 * Bl - 1], dim=1).clamp(min=0)  # [nb, 2]
        ok = torch.stack([Bl >= 1, (Bl >= 1) & (h == 1)], dim=1)
        bonus = torch.full((nb, 2, p), math.log(w / p) if cfg.fma_scale_attn else 0.0,
                           device=k.device, dtype=torch.float64)
        out.append((Ks[:, :, idx].reshape(B, KV, nb, 2 * p, d).to(k.dtype),
                    Vs[:, :, idx].reshape(B, KV, nb, 2 * p, d).to(v.dtype),
                    bonus.masked_fill(~ok[:, :, None], float("-inf")).reshape(nb, 2 * p)))
    return out


def fma_attention(cfg: FmaConfig, q, k, v, k_down: Downsample, v_down: Downsample, mass=None):
    """q [B, H, T, d]; k, v [B, KV, T, d], rotated. Returns [B, H, T, d]. mass: a list to which
    the attention probability each query gives the fine keys and each level's summaries is
    appended, [B, H, T, 1 + levels present] (attention_mass.py)."""
    B, H, T0, d = q.shape
    KV, m = k.shape[1], cfg.fma_block_size
    q, k, v, T = padded_to_blocks(m, q, k, v)
    nb = T // m
    dev = q.device
    acc = torch.promote_types(q.dtype, torch.float32)  # softmax precision
    kb, vb = k.view(B, KV, nb, m, d), v.view(B, KV, nb, m, d)
    keys = [torch.cat([F.pad(kb, (0, 0, 0, 0, 1, 0))[:, :, :nb], kb], dim=3)]  # [B,KV,nb,2m,d]
    vals = [torch.cat([F.pad(vb, (0, 0, 0, 0, 1, 0))[:, :, :nb], vb], dim=3)]
    a = torch.arange(m, device=dev)
    s = torch.arange(2 * m, device=dev)
    b = torch.arange(nb, device=dev)
    fine_ok = torch.where(s[None, None] < m, (b[:, None, None] >= 1).expand(nb, m, 2 * m),
                          (s[None, None] - m) <= a[None, :, None])  # [nb, m, 2m]
    bias = [torch.zeros(nb, m, 2 * m, device=dev, dtype=acc).masked_fill(~fine_ok, float("-inf"))]
    for Ks, Vs, bonus in block_summaries(cfg, k, v, k_down, v_down, nb):
        keys.append(Ks)
        vals.append(Vs)
        bias.append(bonus.to(acc)[:, None].expand(nb, m, Ks.shape[3]))
    K = _expand_kv(torch.cat(keys, dim=3), H)  # [B, H, nb, S, d]
    V = _expand_kv(torch.cat(vals, dim=3), H)
    mask = torch.cat(bias, dim=2)  # [nb, m, S]
    qb = q.view(B, H, nb, m, d)
    if hasattr(F, "scaled_dot_product_attention") and mass is None:
        S = K.shape[3]
        o = F.scaled_dot_product_attention(
            qb.reshape(B * H, nb, m, d), K.reshape(B * H, nb, S, d), V.reshape(B * H, nb, S, d),
            attn_mask=mask.to(q.dtype))
        o = o.view(B, H, nb, m, d)
    else:
        probs = ((qb.to(acc) @ K.to(acc).transpose(-1, -2)) / math.sqrt(d) + mask).softmax(-1)
        o = (probs @ V.to(acc)).to(q.dtype)
        if mass is not None:
            parts = probs.split([t.shape[3] for t in keys], dim=-1)
            mass.append(torch.stack([t.sum(-1) for t in parts], -1).reshape(B, H, T, -1)[:, :, :T0])
    return o.reshape(B, H, T, d)[:, :, :T0]


# A score bias that leaves a key no weight, finite so that a row of such keys stays a number.
ABSENT_BIAS = -1.0e4


def fma_attention_flash(cfg: FmaConfig, q, k, v, k_down: Downsample, v_down: Downsample):
    """fma_attention's result as one causal attention call a fine block, which PyTorch runs as
    FlashAttention on the GPU (the gather's score mask keeps SDPA off it). Block b's keys are laid
    out as [its summaries, block b-1, block b] and its m queries come last in a sequence as long,
    so that the causal mask is FMA's fine mask (block b-1 whole, block b up to the query). The
    summaries' bonus and the keys that are not there (block -1, groups not complete) ride in one
    more channel: a query's is 1, a key's its bias times sqrt(d). The rows before the queries are
    zeros whose outputs are dropped; channels are padded to a multiple of 8."""
    B, H, T0, d = q.shape
    KV, m = k.shape[1], cfg.fma_block_size
    q, k, v, T = padded_to_blocks(m, q, k, v)
    nb, dev, dt = T // m, q.device, q.dtype
    kb, vb = k.view(B, KV, nb, m, d), v.view(B, KV, nb, m, d)
    parts = block_summaries(cfg, k, v, k_down, v_down, nb)
    S = sum(x.shape[3] for x, _, _ in parts)
    L, width = S + 2 * m, (d + 8) // 8 * 8
    fine = torch.zeros(nb, 2 * m, device=dev, dtype=torch.float64)
    fine[0, :m] = ABSENT_BIAS  # block 0 has no block before it
    bias = torch.cat([b.clamp(min=ABSENT_BIAS) for _, _, b in parts] + [fine], dim=1)  # [nb, L]

    def before(x):  # block b-1 of each block b (zeros before block 0)
        return F.pad(x, (0, 0, 0, 0, 1, 0))[:, :, :nb]

    K = torch.cat([x for x, _, _ in parts] + [before(kb), kb], dim=3)  # [B, KV, nb, L, d]
    V = torch.cat([x for _, x, _ in parts] + [before(vb), vb], dim=3)
    K = torch.cat([K, (bias * math.sqrt(d)).to(dt)[None, None, :, :, None].expand(B, KV, nb, L, 1),
                   K.new_zeros(B, KV, nb, L, width - d - 1)], dim=-1)
    V = F.pad(V, (0, width - d))
    Q = torch.cat([q.new_zeros(B, H, nb, S + m, width),
                   torch.cat([q.view(B, H, nb, m, d), q.new_ones(B, H, nb, m, 1),
                              q.new_zeros(B, H, nb, m, width - d - 1)], dim=-1)], dim=3)
    Q, K, V = (x.reshape(B * H, nb, L, width) for x in (Q, _expand_kv(K, H), _expand_kv(V, H)))
    o = exact_attention(Q, K, V, d)  # (blocks in place of heads)
    o = o.view(B, H, nb, L, width)[:, :, :, S + m:, :d]
    return o.reshape(B, H, T, d)[:, :, :T0]


_FLEX_MASKS = {}  # (cfg's FMA fields, T, device) -> (BlockMask, per-key score bonus)


def flex_attention_available():  # PyTorch >= 2.5
    try:
        return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    except ModuleNotFoundError:  # no torch.nn.attention at all
        return False


def fma_flex_mask(cfg: FmaConfig, T, device):
    """The mask of fma_attention_flex at T queries (T a multiple of m), made once and kept: its
    keys are the T fine keys, then each present level's summaries (group by group, p each), then
    padding to a multiple of 128 that no query sees. Returns (BlockMask, bonus [keys], float32)."""
    m = cfg.fma_block_size
    key = (m, cfg.levels, tuple(cfg.rank(l) for l in range(1, cfg.levels + 1)),
           cfg.fma_scale_attn, T, str(device))
    if key not in _FLEX_MASKS:
        from torch.nn.attention.flex_attention import create_block_mask
        width, group, bonus = [torch.ones(T)], [torch.full((T,), -8.0)], [torch.zeros(T)]
        for level in present_levels(cfg, T):
            w, p = cfg.group_size(level), cfg.rank(level)
            G = T // w
            width.append(torch.full((G * p,), float(w)))
            group.append(torch.arange(G).repeat_interleave(p).float())
            bonus.append(torch.full((G * p,), math.log(w / p) if cfg.fma_scale_attn else 0.0))
        pad = (-sum(t.numel() for t in width)) % 128  # group -8: never visible
        width, group, bonus = (torch.cat(t + [torch.full((pad,), f)]).to(device)
                               for t, f in ((width, 1.0), (group, -8.0), (bonus, 0.0)))
        width, group = width.long(), group.long()

        def visible(b, h, q, kv):  # DESIGN.md section 1: fine keys, then the two groups' summaries
            fine = (kv < T) & (kv <= q) & (kv >= (q // m - 1) * m)
            w, g = width[kv], group[kv]
            Bl, half = q // (2 * w), (q // w) % 2
            far = (kv >= T) & (Bl >= 1) & ((g == 2 * Bl - 2) | ((g == 2 * Bl - 1) & (half == 1)))
            return fine | far

        _FLEX_MASKS[key] = (create_block_mask(visible, None, None, T, width.numel(), device=device),
                            bonus)
    return _FLEX_MASKS[key]


def fma_attention_flex(cfg: FmaConfig, q, k, v, k_down: Downsample, v_down: Downsample):
    """fma_attention as one FlexAttention call (PyTorch >= 2.5, for training on the GPU under
    torch.compile): the queries attend the fine keys followed by all the summaries, with a block
    mask that skips the blocks no query of a tile sees, so no per-block key lists are gathered."""
    B, H, T0, d = q.shape
    KV, m = k.shape[1], cfg.fma_block_size
    from torch.nn.attention.flex_attention import flex_attention
    q, k, v, T = padded_to_blocks(m, q, k, v)
    block_mask, bonus = fma_flex_mask(cfg, T, q.device)
    keys, vals = [k], [v]
    for _, Ks, Vs in summaries(cfg, k, v, k_down, v_down):
        keys.append(Ks.reshape(B, KV, -1, d).to(k.dtype))
        vals.append(Vs.reshape(B, KV, -1, d).to(v.dtype))
    tail = bonus.numel() - sum(t.shape[2] for t in keys)
    K = F.pad(torch.cat(keys, dim=2), (0, 0, 0, tail))
    V = F.pad(torch.cat(vals, dim=2), (0, 0, 0, tail))
    o = flex_attention(q, K, V, score_mod=lambda s, b, h, qi, kv: s + bonus[kv],
                       block_mask=block_mask, enable_gqa=True)
    return o[:, :, :T0]


def fma_attention_slow(cfg: FmaConfig, q, k, v, k_down: Downsample, v_down: Downsample):
    """Per query, the explicit key list of DESIGN.md section 1. For tests only."""
    B, H, T, d = q.shape
    KV, m = k.shape[1], cfg.fma_block_size
    out = torch.zeros_like(q)
    sums = {}
    kt, vt = (Downsample.channels_first(t.reshape(B * KV, T, d)) for t in (k, v))
    for level in range(1, cfg.levels + 1):
        p = cfg.rank(level)
        if T >= cfg.group_size(level):
            sums[level] = tuple(x.reshape(B, KV, -1, p, d)
                                for x in level_pair(k_down, v_down, kt, vt, level))
    for hd in range(H):
        kvh = hd // (H // KV)
        for i in range(T):
            lo = max(0, (i // m - 1) * m) if cfg.fma_enabled else 0
            ks, vs, bonus = [k[:, kvh, lo:i + 1]], [v[:, kvh, lo:i + 1]], [0.0] * (i + 1 - lo)
            for level in range(1, cfg.levels + 1):
                w = cfg.group_size(level)
                Bl, h = i // (2 * w), (i % (2 * w)) // w
                groups = ([2 * Bl - 2] if Bl >= 1 else []) + ([2 * Bl - 1] if Bl >= 1 and h else [])
                for g in groups:
                    assert (g + 1) * w <= i
                    ks.append(sums[level][0][:, kvh, g])
                    vs.append(sums[level][1][:, kvh, g])
                    p = cfg.rank(level)
                    bonus += [math.log(w / p) if cfg.fma_scale_attn else 0.0] * p
            K, V = torch.cat(ks, dim=1), torch.cat(vs, dim=1)  # [B, S, d]
            sc = (K @ q[:, hd, i, :, None])[..., 0] / math.sqrt(d) + torch.tensor(bonus, dtype=q.dtype)
            out[:, hd, i] = (sc.softmax(-1)[:, None] @ V)[:, 0]
    return out


def exact_attention(q, k, v, d=None):
    """Causal attention, q [B, H, T, c], k and v [B, KV, T, c]; the scores divided by sqrt(d)
    (default c: d < c where channels past the head's are padding)."""
    H = q.shape[1]
    k, v = _expand_kv(k, H), _expand_kv(v, H)
    if hasattr(F, "scaled_dot_product_attention"):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                              **({} if d is None else {"scale": 1 / math.sqrt(d)}))
    T = q.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    acc = torch.promote_types(q.dtype, torch.float32)
    sc = (q.to(acc) @ k.to(acc).transpose(-1, -2)) / math.sqrt(d or q.shape[-1])
    return (sc.masked_fill(~causal, float("-inf")).softmax(-1) @ v.to(acc)).to(q.dtype)


class Fma(nn.Module):  # holds the downsampling weights: self_attn.fma.{k,v}_down.<level-1>
    def __init__(self, cfg):
        super().__init__()
        self.k_down = Downsample(cfg, keys=True)
        self.v_down = Downsample(cfg)


class Attention(nn.Module):
    def __init__(self, cfg: FmaConfig):
        super().__init__()
        self.cfg = cfg
        H, KV, d, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(D, H * d, bias=False)
        self.k_proj = nn.Linear(D, KV * d, bias=False)
        self.v_proj = nn.Linear(D, KV * d, bias=False)
        self.o_proj = nn.Linear(H * d, D, bias=False)
        if cfg.fma_enabled:
            self.fma = Fma(cfg)  # no parameters for avgpool
        self.mass = None  # a list: fma_attention appends each forward's attention mass by level
        self.kernel = "gather"  # or "flex", "flash": training's (FmaModel.use_attention)

    def forward(self, x, cos, sin, slow=False):
        cfg = self.cfg
        B, T, _ = x.shape
        H, KV, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = apply_rope(self.q_proj(x).view(B, T, H, d).transpose(1, 2), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, KV, d).transpose(1, 2), cos, sin)
        v = self.v_proj(x).view(B, T, KV, d).transpose(1, 2)
        if not cfg.fma_enabled:
            o = exact_attention(q, k, v)
        else:
            args = (cfg, q, k, v, self.fma.k_down, self.fma.v_down)
            if slow:
                o = fma_attention_slow(*args)
            elif self.kernel == "flex" and self.mass is None:
                o = fma_attention_flex(*args)
            elif self.kernel == "flash" and self.mass is None:
                o = fma_attention_flash(*args)
            else:
                o = fma_attention(*args, self.mass)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * d))


class Layer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.mlp.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.mlp.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, slow=False):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, slow)
        h = self.post_attention_layernorm(x)
        return x + self.mlp.down_proj(F.silu(self.mlp.gate_proj(h)) * self.mlp.up_proj(h))


class FmaModel(nn.Module):
    def __init__(self, cfg: FmaConfig):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(self._init)

    def use_attention(self, kernel):
        """FMA layers attend through fma_attention ("gather"), fma_attention_flex ("flex": the
        GPU, compiled) or fma_attention_flash ("flash")."""
        for layer in self.model.layers:
            layer.self_attn.kernel = kernel  # read only by FMA layers

    def _init(self, mod):
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            nn.init.normal_(mod.weight, std=0.02)
        elif isinstance(mod, nn.Conv1d):  # start as a mean over the group, plus noise
            w = mod.kernel_size[0]
            nn.init.normal_(mod.weight, mean=1.0 / w, std=0.02 / math.sqrt(w))
            nn.init.zeros_(mod.bias)
        elif isinstance(mod, RotaryConv):  # the same: real part a mean, imaginary part noise
            w = mod.weight.shape[-1]
            with torch.no_grad():
                nn.init.normal_(mod.weight, std=0.02 / math.sqrt(w))
                mod.weight[:, 0] += 1.0 / w

    def hidden(self, ids, slow=False):
        cos, sin = rope_tables(ids.shape[1], self.cfg.head_dim, self.cfg.rope_theta, ids.device,
                               factor=self.cfg.rope_factor)
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, slow)
        return self.model.norm(x)

    def head_weight(self):
        return self.model.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight

    def forward(self, ids, slow=False):
        h = self.hidden(ids, slow)
        return h @ self.head_weight().t().to(h.dtype)

    def loss(self, ids, targets):
        """Mean cross-entropy, the logits made and dropped a slice at a time to save memory."""
        h = self.hidden(ids)
        W = self.head_weight()
        total, n = 0.0, 0
        for s in range(0, h.shape[1], 2048):
            logits = (h[:, s:s + 2048] @ W.t().to(h.dtype)).float()
            t = targets[:, s:s + 2048]
            total = total + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1),
                                            reduction="sum")
            n += t.numel()
        return total / n

    def nll(self, ids):
        """Per-token NLL (nats) of ids[:, 1:] given their prefix: [B, T-1], float32."""
        h = self.hidden(ids[:, :-1])
        W = self.head_weight()
        out = []
        for s in range(0, h.shape[1], 2048):
            logits = (h[:, s:s + 2048] @ W.t().to(h.dtype)).float()
            out.append(F.cross_entropy(logits.transpose(1, 2), ids[:, 1 + s:1 + s + 2048],
                                       reduction="none"))
        return torch.cat(out, dim=1)


def init_summaries_as_avgpool(model: FmaModel):
    """Sets every summary convolution to the average pooling it generalises (summary r of a group
    of w: the mean of tokens [r w/p, (r+1) w/p)), bias 0: the model then computes what its avgpool
    twin does, as after multipole-convert --fma groupedconv."""
    cfg = model.cfg
    with torch.no_grad():
        for name, conv in model.named_modules():
            if isinstance(conv, RotaryConv):  # real part the pooling, imaginary part 0
                w, p = conv.weight.shape[-1], conv.weight.shape[0] // (cfg.head_dim // 2)
                conv.weight.zero_()
                for r in range(p):
                    conv.weight.view(-1, p, 2, w)[:, r, 0, r * (w // p):(r + 1) * (w // p)] = p / w
            if isinstance(conv, nn.Conv1d) and ".fma." in name:
                assert conv.groups == cfg.head_dim, "only groupedconv starts as avgpool"
                w, p = conv.kernel_size[0], conv.out_channels // cfg.head_dim
                weight = torch.zeros(cfg.head_dim, p, w)  # output channel c*p + r
                for r in range(p):
                    weight[:, r, r * (w // p):(r + 1) * (w // p)] = p / w
                conv.weight.copy_(weight.view(cfg.head_dim * p, 1, w))
                conv.bias.zero_()


def read_safetensors(folder):
    """name -> float32 tensor, from model.safetensors or the shards its index names."""
    index = os.path.join(folder, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) \
        else ["model.safetensors"]
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    out = {}
    for name in files:
        with open(os.path.join(folder, name), "rb") as f:
            raw = bytearray(f.read())
        hlen = int.from_bytes(raw[:8], "little")
        for key, info in json.loads(raw[8:8 + hlen]).items():
            if key != "__metadata__":
                b, e = info["data_offsets"]
                t = torch.frombuffer(raw[8 + hlen + b:8 + hlen + e], dtype=dtypes[info["dtype"]])
                out[key] = t.reshape(info["shape"]).float()
    return out


def load_hf(folder, device="cpu", fma=None):
    """A Hugging Face folder (ours or a Llama-family one) as an FmaModel. fma: keyword arguments
    of FmaConfig.with_fma, to turn an exact-attention checkpoint into FMA; groupedconv summaries
    then start as average pooling."""
    with open(os.path.join(folder, "config.json")) as f:
        cfg = FmaConfig.from_json(f.read())
    if fma:
        cfg = cfg.with_fma(**fma)
    model = FmaModel(cfg)
    sd = {k: v for k, v in read_safetensors(folder).items() if not k.endswith("rotary_emb.inv_freq")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, f"tensors the model does not have: {unexpected}"
    assert all(".fma." in k for k in missing) and (not missing or fma), f"missing: {missing}"
    if missing:
        init_summaries_as_avgpool(model)
    return model.to(device), cfg


def save_hf(model: FmaModel, folder, tokenizer_path, dtype=torch.float32, llama=False):
    """Writes the Hugging Face folder of DESIGN.md section 3 (safetensors written here), the
    tensors in float32 or bfloat16; llama=True writes an exact model as a LlamaForCausalLM."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write(model.cfg.to_hf_json(llama))
    tensors = {k: v.detach().to(dtype).cpu().contiguous() for k, v in model.state_dict().items()}
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors):
        t = tensors[name]
        bf16 = dtype == torch.bfloat16
        raw = (t.view(torch.int16) if bf16 else t).numpy().tobytes()
        header[name] = {"dtype": "BF16" if bf16 else "F32", "shape": list(t.shape),
                        "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for raw in blobs:
            f.write(raw)
    with open(tokenizer_path, "rb") as src, open(os.path.join(folder, "tokenizer.model"), "wb") as dst:
        dst.write(src.read())
