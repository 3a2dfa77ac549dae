#!/usr/bin/env python3
"""A Multipole GGUF model stored in f32 (multipole-convert MODEL.gguf F32.gguf --dtype f32) as the
Hugging Face folder train.py exports (save_hf): its weights for PyTorch, e.g. evaluate.py's parity
sample of a model whose bf16 weights did not come back from the GPU machine (Q8_0 weights, made
f32 by the converter, are exactly what the engine computes with).
usage: gguf_to_hf.py F32.gguf CONFIG.json TOKENIZER.model OUT_DIR
(CONFIG.json: the model's Hugging Face config, as train.py wrote it)"""
import re
import struct
import sys

import numpy as np
import torch

from fma_model import FmaConfig, FmaModel, save_hf

# GGUF metadata value types (the GGUF spec) and their struct formats; 8 string, 9 array
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
F32 = 0  # tensor type

# GGUF names (engine/src/config.cpp, tensor_names and expected_tensors) -> Hugging Face names
LAYER = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
         "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
         "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
         "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
       "output.weight": "lm_head.weight"}


def hf_name(name):
    if name in TOP:
        return TOP[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if m and m.group(2) in LAYER:
        return f"model.layers.{m.group(1)}.{LAYER[m.group(2)]}.weight"
    m = re.fullmatch(r"blk\.(\d+)\.fma_([kv])_down\.(\d+)\.(weight|bias)", name)
    if m:
        return f"model.layers.{m.group(1)}.self_attn.fma.{m.group(2)}_down.{m.group(3)}.{m.group(4)}"
    raise SystemExit(f"tensor '{name}' is not one of a Multipole model")


def read_gguf_f32(path):
    """name -> float32 array in the Hugging Face shape (GGUF lists dims innermost first)."""
    data = open(path, "rb").read()
    if data[:4] != b"GGUF":
        raise SystemExit(f"{path}: not a GGUF file")
    at = 8
    n_tensors, n_kv = struct.unpack_from("<QQ", data, at)
    at += 16

    def string():
        nonlocal at
        (n,) = struct.unpack_from("<Q", data, at)
        at += 8 + n
        return data[at - n:at].decode()

    def value(kind):
        nonlocal at
        if kind == 8:
            return string()
        if kind == 9:
            elem, n = struct.unpack_from("<IQ", data, at)
            at += 12
            return [value(elem) for _ in range(n)] if elem in (8, 9) else skip(elem, n)
        fmt = "<" + SCALARS[kind]
        at += struct.calcsize(fmt)
        return struct.unpack_from(fmt, data, at - struct.calcsize(fmt))[0]

    def skip(elem, n):  # arrays of scalars (the tokenizer's bytes): not needed here
        nonlocal at
        at += n * struct.calcsize("<" + SCALARS[elem])

    alignment = 32
    for _ in range(n_kv):
        key = string()
        (kind,) = struct.unpack_from("<I", data, at)
        at += 4
        v = value(kind)
        if key == "general.alignment":
            alignment = v
    infos = []
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = struct.unpack_from("<I", data, at)
        dims = struct.unpack_from(f"<{n_dims}Q", data, at + 4)
        kind, offset = struct.unpack_from("<IQ", data, at + 4 + 8 * n_dims)
        at += 4 + 8 * n_dims + 12
        if kind != F32:
            raise SystemExit(f"{path}: tensor '{name}' is not f32: convert with --dtype f32 first")
        infos.append((name, tuple(reversed(dims)), offset))
    base = (at + alignment - 1) // alignment * alignment
    return {name: np.frombuffer(data, np.float32, int(np.prod(shape)), base + off).reshape(shape)
            for name, shape, off in infos}


def main():
    gguf, config, tokenizer, out = sys.argv[1:5]
    with open(config) as f:
        model = FmaModel(FmaConfig.from_json(f.read()))
    want = model.state_dict()
    state = {}
    for name, array in read_gguf_f32(gguf).items():
        hf = hf_name(name)
        if hf not in want or tuple(want[hf].shape) != array.shape:
            raise SystemExit(f"tensor '{name}' ({array.shape}) does not fit {config}'s model")
        state[hf] = torch.from_numpy(array.copy())
    missing = [k for k in want if k not in state and not k.endswith("rotary_emb.inv_freq")]
    if missing:
        raise SystemExit(f"{gguf} lacks {missing[:3]}")
    model.load_state_dict(state, strict=False)
    save_hf(model, out, tokenizer)
    print(f"wrote {out}: {len(state)} tensors, float32")


if __name__ == "__main__":
    main()
