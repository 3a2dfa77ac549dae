#!/usr/bin/env python3
"""Distinct n-grams of a text's first W words (split at white space): distinct / total, the
repetition measure of issue 12's samples (4-grams over 400 words). With --windows, the same over
every run of W consecutive words of the file: how often a text (a corpus, say) repeats itself by
that yardstick.
usage: distinct_ngrams.py FILE [--words 400] [--n 4] [--windows]"""
import argparse
import re
import statistics


def distinct(words, n):
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def kept_runs(text, threshold, words=400, n=4):
    """The text without its repetitive stretches: cut into windows of `words` consecutive words
    (a last window of under a quarter of that goes with the one before), the windows whose
    distinct n-gram share is below `threshold` are dropped and the runs of kept windows returned,
    each from its first word to its last. A text with nothing dropped comes back whole, as is."""
    spans = [m.span() for m in re.finditer(r"\S+", text)]
    starts = list(range(0, len(spans), words))
    if len(starts) > 1 and len(spans) - starts[-1] < words // 4:
        starts.pop()
    keep = []
    for i, a in enumerate(starts):
        b = starts[i + 1] if i + 1 < len(starts) else len(spans)
        # A window too short for one n-gram (NaN) is kept.
        keep.append(not distinct([text[x:y] for x, y in spans[a:b]], n) < threshold)
    if all(keep):
        return [text]
    runs, first = [], None
    for i, k in enumerate(keep + [False]):
        if k and first is None:
            first = i
        elif not k and first is not None:
            last = (starts[i] if i < len(starts) else len(spans)) - 1
            runs.append(text[spans[starts[first]][0]:spans[last][1]])
            first = None
    return runs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--words", type=int, default=400)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--windows", action="store_true")
    args = ap.parse_args()
    with open(args.file, encoding="utf-8", errors="replace") as f:
        words = f.read().split()
    W = args.words
    if not args.windows:
        print(f"{len(words[:W])} words, distinct {args.n}-grams {distinct(words[:W], args.n):.3f}")
        return
    r = [distinct(words[a:a + W], args.n) for a in range(0, len(words) - W + 1, W)]
    below = lambda t: sum(x < t for x in r) / len(r)  # noqa: E731
    print(f"{len(r)} windows of {W} words: distinct {args.n}-grams below 0.9 in {below(0.9):.1%}, "
          f"below 0.7 in {below(0.7):.1%}, median {statistics.median(r):.3f}")


if __name__ == "__main__":
    main()
