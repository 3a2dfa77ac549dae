#!/usr/bin/env python3
"""Golden fixtures from Hugging Face transformers itself, where it is installed (the GPU machine
may have it; this one cannot): a random-weight LlamaForCausalLM (2 KV heads for 4, untied head,
linear rope scaling x2) and MistralForCausalLM (1 KV head, tied head, rope_theta 1e6), written by
save_pretrained, with the float64 logits transformers computes for a fixed sequence past
max_position_embeddings, in tests/data/golden's layout (config.json, model.safetensors,
tokenizer.model, tokens.json, logits.f32): copied to tests/data/golden-llama and golden-mistral,
test_golden.cpp checks the engine against them. Also prints how far tests/reference/
llama_reference.py (the PyTorch forward the CI cross-checks use) is from transformers.
usage: make_llama_golden.py OUT_DIR TOKENIZER_MODEL"""
import json
import os
import shutil
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "reference"))
from llama_reference import Llama  # noqa: E402


def make(kind, folder, tokenizer):
    import transformers
    common = dict(vocab_size=400, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False,
                                       rope_scaling={"type": "linear", "factor": 2.0})
        cls = transformers.LlamaForCausalLM
    else:
        cfg = transformers.MistralConfig(**common, num_key_value_heads=1, tie_word_embeddings=True,
                                         rope_theta=1e6, sliding_window=None)
        cls = transformers.MistralForCausalLM
    torch.manual_seed(7)
    model = cls(cfg)
    with torch.no_grad():  # weights of order one, so that every part moves the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / (1 if "embed" in name else p.shape[1] ** 0.5))
    model.save_pretrained(folder, safe_serialization=True)
    shutil.copy(tokenizer, os.path.join(folder, "tokenizer.model"))
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 400, (1, 3 * 64 + 5), generator=g)
    with torch.no_grad():
        logits = model.double().eval()(ids).logits[0]
    json.dump({"tokens": ids[0].tolist(), "vocab": 400}, open(os.path.join(folder, "tokens.json"), "w"))
    logits.float().numpy().astype("<f4").tofile(os.path.join(folder, "logits.f32"))
    ours = Llama(folder).logits(ids[0].tolist())
    diff = ((ours - logits).norm() / logits.norm()).item()
    print(f"{kind}: transformers {transformers.__version__}, {ids.shape[1]} tokens; "
          f"llama_reference.py vs transformers: relative difference {diff:.2e}")
    return diff


def main():
    out, tokenizer = sys.argv[1], sys.argv[2]
    worst = max(make(kind, os.path.join(out, f"golden-{kind}"), tokenizer)
                for kind in ("llama", "mistral"))
    sys.exit(0 if worst < 1e-6 else 1)


if __name__ == "__main__":
    main()
