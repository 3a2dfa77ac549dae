#!/usr/bin/env python3
"""The proxy runs' verdict (docs/MODEL.md, "Content-chosen summaries"): evaluate.py's JSON of
each model, one markdown row each: perplexity at contexts 512 and 8192, and the context gain on
the same text (evaluate.py's by_position_same_text: the same tokens scored with 512-1k tokens
before them and with 4k-8k), the issue's measure of whether the far field is used.

usage: proxy_table.py NAME=EVAL.json [NAME=EVAL.json ...]
"""
import json
import sys


def context_gain(res):
    """Relative perplexity drop on the same text from 512-1k tokens of context to 4k-8k."""
    b = res["ppl_by_position_same_text"]
    return 1.0 - b["4096-8192"] / b["512-1024"]


def table(rows):
    """rows: [(name, evaluate.py's result)] -> the markdown table's lines."""
    out = ["| model | ppl, context 512 | ppl, context 8192 | same text, 512-1k | same text, 4k-8k "
           "| context gain |", "|---|---|---|---|---|---|"]
    for name, res in rows:
        b = res["ppl_by_position_same_text"]
        out.append(f"| {name} | {res['ppl_ctx512']:.3f} | {res['ppl_ctx8192']:.3f} | "
                   f"{b['512-1024']:.3f} | {b['4096-8192']:.3f} | {100 * context_gain(res):.2f} % |")
    return out


def main(argv):
    if not argv or any("=" not in a for a in argv):
        raise SystemExit(__doc__)
    rows = []
    for arg in argv:
        name, path = arg.split("=", 1)
        with open(path) as f:
            rows.append((name, json.load(f)))
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main(sys.argv[1:])
