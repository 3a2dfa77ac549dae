"""The trainer's token streams, in either corpus format, and the training windows drawn from them.

Sharded (docs/DATA.md): DIR/shards.json lists xz-compressed little-endian uint16 token streams of
whole documents (BOS ids EOS), at most 20 MiB each. Only some shards travel to the GPU machine in
one command, so the training stream is the shards present in DIR, each verified against its
sha256 and decompressed into memory, concatenated in shards.json's order. Window starts for a step
are drawn from (seed, step, the list of shards): a resumed run draws what an uninterrupted one
would, with nothing but the step to remember.

Legacy (prepare_corpus.py's first corpus, the shipped model's recipe): DIR/train.bin and val.bin.
Its windows come from one sequential generator seeded once, as the shipped model's did; its state
goes into the checkpoint.

usage: corpus.py fake DIR [--shards N] [--docs-per-shard D] [--vocab V] [--seed S]
       (writes a small sharded corpus of random documents, for tests)
"""
import argparse
import hashlib
import json
import lzma
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

MAX_SHARD_BYTES = 20 * 2**20  # a shard must travel in a 64 MiB tree


class CorpusError(Exception):
    pass


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_stream(folder, entry):
    """One shards.json entry's tokens (uint16), its file checked against sha256 and token count."""
    path = os.path.join(folder, entry["file"])
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise CorpusError(f"{path}: sha256 {digest} does not match shards.json's {entry['sha256']} "
                          "(a damaged or foreign shard)")
    with open(path, "rb") as f:
        raw = lzma.decompress(f.read())
    if len(raw) % 2:
        raise CorpusError(f"{path}: {len(raw)} bytes decompressed, not whole uint16 tokens")
    ids = np.frombuffer(raw, dtype="<u2")
    if "tokens" in entry and len(ids) != entry["tokens"]:
        raise CorpusError(f"{path}: {len(ids)} tokens, shards.json says {entry['tokens']}")
    return ids


def load_manifest(folder):
    path = os.path.join(folder, "shards.json")
    try:
        with open(path) as f:
            man = json.load(f)
    except ValueError as e:
        raise CorpusError(f"{path} is not valid JSON: {e}") from None
    for key in ("vocab", "bos", "eos", "shards"):
        if key not in man:
            raise CorpusError(f"{path}: missing key '{key}'")
    return man


class Corpus:
    """tokens: the training stream (uint16); shards: the names of the shards in it (None: legacy);
    key: the integer that, with seed and step, fixes every window."""

    def __init__(self, folder, vocab=None):
        self.folder = folder
        if os.path.exists(os.path.join(folder, "shards.json")):
            man = load_manifest(folder)
            present = [e for e in man["shards"] if os.path.exists(os.path.join(folder, e["file"]))]
            if not present:
                raise CorpusError(f"{folder}: none of the {len(man['shards'])} shards of shards.json "
                                  "is present")
            with ThreadPoolExecutor(min(16, len(present))) as pool:  # lzma and sha256 let go of the GIL
                streams = list(pool.map(lambda e: read_stream(folder, e), present))
            self.tokens = np.concatenate(streams)
            self.shards = [e["file"] for e in present]
            digest = hashlib.sha256("\n".join(e["sha256"] for e in present).encode()).hexdigest()
            self.key = int(digest[:16], 16)
            self.vocab, self.bos, self.eos = man["vocab"], man["bos"], man["eos"]
        else:
            path = os.path.join(folder, "train.bin")
            if not os.path.exists(path):
                raise CorpusError(f"{folder}: neither shards.json nor train.bin")
            self.tokens = np.fromfile(path, dtype="<u2")
            self.shards, self.key, self.vocab = None, None, vocab
        if vocab is not None and self.vocab != vocab:
            raise CorpusError(f"{folder}: vocabulary {self.vocab}, the model's is {vocab}")
        if self.vocab is not None and len(self.tokens) and int(self.tokens.max()) >= self.vocab:
            raise CorpusError(f"{folder}: token id {int(self.tokens.max())} >= vocabulary {self.vocab}")

    @property
    def sharded(self):
        return self.shards is not None


class Windows:
    """Window starts per step: [batch] offsets into corpus.tokens, each window n + 1 tokens."""

    def __init__(self, corpus: Corpus, seed, batch, n):
        if len(corpus.tokens) < n + 2:
            raise CorpusError(f"{corpus.folder}: {len(corpus.tokens)} tokens, fewer than a window "
                              f"of {n + 1}")
        self.corpus, self.seed, self.batch, self.n = corpus, seed, batch, n
        self.high = len(corpus.tokens) - n - 1
        # Legacy: one generator for the whole run, drawn from step by step (the shipped recipe).
        self.rng = None if corpus.sharded else np.random.default_rng(seed)
        self.next_step = 0

    def starts(self, step):
        if self.rng is None:
            return np.random.default_rng([self.seed, step, self.corpus.key]).integers(
                0, self.high, self.batch)
        assert step == self.next_step, "legacy windows are drawn in order"
        self.next_step += 1
        return self.rng.integers(0, self.high, self.batch)

    def batch_at(self, step):
        """[batch, n + 1] int64 tokens of the step's windows."""
        idx = self.starts(step)[:, None] + np.arange(self.n + 1)
        return self.corpus.tokens[idx].astype(np.int64)

    def state_dict(self):  # the data cursor
        return {"next_step": self.next_step, "shards": self.corpus.shards,
                "rng": None if self.rng is None else self.rng.bit_generator.state}

    def load_state_dict(self, st):
        self.next_step = st["next_step"]
        if self.rng is not None:
            self.rng.bit_generator.state = st["rng"]


def load_val(folder):
    """The validation stream (uint16) and its documents (val_docs.json), in either format."""
    if os.path.exists(os.path.join(folder, "shards.json")):
        val = read_stream(folder, load_manifest(folder)["val"])
    else:
        val = np.fromfile(os.path.join(folder, "val.bin"), dtype="<u2")
    with open(os.path.join(folder, "val_docs.json")) as f:
        return val, json.load(f)


def write_stream(folder, name, docs, bos, eos):
    """Writes docs (lists of ids) as one xz stream BOS ids EOS ...; returns its shards.json entry."""
    ids = np.concatenate([np.concatenate([[bos], d, [eos]]) for d in docs]).astype("<u2")
    blob = lzma.compress(ids.tobytes(), preset=6)
    assert len(blob) <= MAX_SHARD_BYTES, (name, len(blob))
    with open(os.path.join(folder, name), "wb") as f:
        f.write(blob)
    return {"file": name, "tokens": int(len(ids)), "docs": len(docs),
            "sha256": hashlib.sha256(blob).hexdigest()}


def make_fake(folder, shards=3, docs_per_shard=20, vocab=512, seed=0, bos=1, eos=2):
    """A small sharded corpus in the real format: random documents (30-400 ids, some repeated
    phrases so a model can learn something), a validation stream with val_docs.json, and an
    outside set."""
    rng = np.random.default_rng(seed)
    phrases = [rng.integers(3, vocab, rng.integers(3, 12)) for _ in range(50)]

    def doc():
        parts, size = [], rng.integers(30, 400)
        while sum(len(p) for p in parts) < size:
            parts.append(phrases[rng.integers(len(phrases))] if rng.random() < 0.5
                         else rng.integers(3, vocab, rng.integers(1, 8)))
        return np.concatenate(parts)

    os.makedirs(folder, exist_ok=True)
    man = {"vocab": vocab, "bos": bos, "eos": eos,
           "shards": [write_stream(folder, f"train-{i:03d}.u16.xz",
                                   [doc() for _ in range(docs_per_shard)], bos, eos)
                      for i in range(shards)]}
    val_docs = [doc() for _ in range(max(2, docs_per_shard // 4))]
    man["val"] = write_stream(folder, "val.u16.xz", val_docs, bos, eos)
    man["outside"] = write_stream(folder, "outside.u16.xz", [doc() for _ in range(2)], bos, eos)
    starts = np.cumsum([0] + [len(d) + 2 for d in val_docs])
    with open(os.path.join(folder, "val_docs.json"), "w") as f:
        json.dump([{"source": "fake", "start": int(s), "length": len(d) + 2}
                   for s, d in zip(starts, val_docs)], f)
    with open(os.path.join(folder, "shards.json"), "w") as f:
        json.dump(man, f, indent=1)
    return man


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["fake"])
    ap.add_argument("dir")
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--docs-per-shard", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    make_fake(a.dir, a.shards, a.docs_per_shard, a.vocab, a.seed)
    print(f"{a.dir}: {a.shards} shards of {a.docs_per_shard} documents, vocabulary {a.vocab}")


if __name__ == "__main__":
    main()
