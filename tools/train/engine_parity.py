#!/usr/bin/env python3
"""Compares the engine's per-token NLL (multipole-perplexity) with PyTorch's parity sample from
evaluate.py, for the same model. usage: engine_parity.py EVAL.json MODEL.gguf BUILD_DIR
(BUILD_DIR: a build folder, or a folder holding the multipole-perplexity binary itself)"""
import json
import math
import os
import subprocess
import sys
import tempfile


def main():
    res, gguf, build = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
    par = res["parity"]
    with tempfile.TemporaryDirectory() as tmp:
        with open(f"{tmp}/ids.txt", "w") as f:
            f.write(" ".join(map(str, par["tokens"])))
        tool = f"{build}/tools/multipole-perplexity"
        if not os.path.exists(tool):
            tool = f"{build}/multipole-perplexity"
        subprocess.run([tool, "--model", gguf, "--ids", "--ctx",
                        str(par["ctx"]), "--nll-out", f"{tmp}/nll.json", f"{tmp}/ids.txt"], check=True)
        eng = json.load(open(f"{tmp}/nll.json"))
    ref = par["nll"]
    assert len(eng) == len(ref), (len(eng), len(ref))
    p_eng, p_ref = math.exp(sum(eng) / len(eng)), math.exp(sum(ref) / len(ref))
    worst = max(abs(a - b) for a, b in zip(eng, ref))
    rel = abs(p_eng - p_ref) / p_ref
    print(f"{len(eng)} tokens: perplexity engine {p_eng:.4f}, PyTorch {p_ref:.4f}, "
          f"relative difference {rel:.2e}; max per-token |NLL difference| {worst:.2e}")
    sys.exit(0 if rel <= 1e-3 else 1)


if __name__ == "__main__":
    main()
