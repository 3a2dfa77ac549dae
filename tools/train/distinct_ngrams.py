#!/usr/bin/env python3
"""Distinct n-grams of a text's first W words (split at white space): distinct / total, the
repetition measure of issue 12's samples (4-grams over 400 words).
usage: distinct_ngrams.py FILE [--words 400] [--n 4]"""
import argparse


def distinct(words, n):
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--words", type=int, default=400)
    ap.add_argument("--n", type=int, default=4)
    args = ap.parse_args()
    with open(args.file, encoding="utf-8", errors="replace") as f:
        words = f.read().split()[:args.words]
    print(f"{len(words)} words, distinct {args.n}-grams {distinct(words, args.n):.3f}")


if __name__ == "__main__":
    main()
