#!/usr/bin/env python3
"""A Multipole GGUF model stored in f32 (multipole-convert MODEL.gguf F32.gguf --dtype f32) as the
Hugging Face folder train.py exports (save_hf): its weights for PyTorch, e.g. evaluate.py's parity
sample of a model whose bf16 weights did not come back from the GPU machine (Q8_0 weights, made
f32 by the converter, are exactly what the engine computes with).
usage: gguf_to_hf.py F32.gguf OUT_DIR (config.json and tokenizer.model from the file's metadata)"""
import os
import re
import sys
import tempfile

import numpy as np
import torch

from fma_model import FmaConfig, FmaModel, save_hf
from gguf_meta import read_gguf

F32 = 0  # GGUF tensor type

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
    """(metadata key -> value, name -> float32 array in the Hugging Face shape)."""
    data, kv, infos = read_gguf(path)
    for name, _, kind, _ in infos:
        if kind != F32:
            raise SystemExit(f"{path}: tensor '{name}' is not f32: convert with --dtype f32 first")
    return kv, {name: np.frombuffer(data, np.float32, int(np.prod(dims)), at).reshape(dims)
                for name, dims, _, at in infos}


def config_of(kv):
    """The FmaConfig that engine/src/config.cpp's config_to_gguf wrote as metadata."""
    a = kv["general.architecture"]
    if a != "fma":
        raise SystemExit(f"general.architecture is '{a}', not 'fma'")
    factor = kv[f"{a}.rope.scaling.factor"]
    return FmaConfig(
        vocab_size=kv[f"{a}.vocab_size"], hidden_size=kv[f"{a}.embedding_length"],
        num_hidden_layers=kv[f"{a}.block_count"], num_attention_heads=kv[f"{a}.attention.head_count"],
        num_key_value_heads=kv[f"{a}.attention.head_count_kv"],
        head_dim=kv[f"{a}.attention.key_length"], intermediate_size=kv[f"{a}.feed_forward_length"],
        rms_norm_eps=kv[f"{a}.attention.layer_norm_rms_epsilon"], rope_theta=kv[f"{a}.rope.freq_base"],
        rope_scaling={"type": "linear", "factor": factor}
        if kv[f"{a}.rope.scaling.type"] == "linear" else None,
        tie_word_embeddings=kv[f"{a}.tie_word_embeddings"],
        max_position_embeddings=kv[f"{a}.context_length"], fma_enabled=kv[f"{a}.enabled"],
        fma_block_size=kv[f"{a}.block_size"], fma_rank=kv[f"{a}.rank"],
        fma_ranks=kv.get(f"{a}.ranks"), fma_downsampling=kv[f"{a}.downsampling"],
        fma_scale_attn=kv[f"{a}.scale_attn"], fma_rotary_summaries=kv[f"{a}.rotary_summaries"],
        bos_token_id=kv["tokenizer.ggml.bos_token_id"], eos_token_id=kv["tokenizer.ggml.eos_token_id"])


def main():
    gguf, out = sys.argv[1:3]
    kv, tensors = read_gguf_f32(gguf)
    model = FmaModel(config_of(kv))
    want = model.state_dict()
    state = {}
    for name, array in tensors.items():
        hf = hf_name(name)
        if hf not in want or tuple(want[hf].shape) != array.shape:
            raise SystemExit(f"tensor '{name}' ({array.shape}) does not fit the file's config")
        state[hf] = torch.from_numpy(array.copy())
    model.load_state_dict(state)  # strict: a tensor the file lacks is named
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = os.path.join(tmp, "tokenizer.model")
        with open(tokenizer, "wb") as f:
            f.write(kv["tokenizer.sentencepiece.model"])
        save_hf(model, out, tokenizer)
    print(f"wrote {out}: {len(state)} tensors, float32")


if __name__ == "__main__":
    main()
