#!/usr/bin/env python3
"""Writes the golden fixture that ties the PyTorch reference to the engine: a tiny random model
exported by save_hf and the float64 logits PyTorch computes for a fixed token sequence past the
trained length. usage: make_golden.py OUT_DIR TOKENIZER_MODEL"""
import json
import os
import sys

import torch

from fma_model import FmaConfig, FmaModel, save_hf


def main():
    out, tok = sys.argv[1], sys.argv[2]
    torch.manual_seed(1234)
    cfg = FmaConfig(vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, intermediate_size=48,
                    max_position_embeddings=64, fma_block_size=8, fma_rank=2,
                    tie_word_embeddings=False)
    model = FmaModel(cfg).double()
    with torch.no_grad():  # weights of order one, so that every part moves the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.dim() >= 2:
                p.copy_(torch.randn_like(p) / (p[0].numel() ** 0.5 if "embed" not in name else 1))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    save_hf(model, out, tok)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 400, (1, 3 * 64 + 5), generator=g)
    with torch.no_grad():
        logits = model(ids)[0]
    json.dump({"tokens": ids[0].tolist(), "vocab": 400}, open(os.path.join(out, "tokens.json"), "w"))
    logits.float().numpy().astype("<f4").tofile(os.path.join(out, "logits.f32"))
    print(f"wrote {out}: {ids.shape[1]} tokens, logits {tuple(logits.shape)}")


if __name__ == "__main__":
    main()
