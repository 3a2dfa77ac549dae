#!/usr/bin/env python3
"""Tests of prepare_corpus2.py's parts on fresh random inputs: shard packing, the dictd and R data
readers, the code filters and the prose measure."""
import gzip
import hashlib
import json
import lzma
import os
import random
import string
import struct
import sys
import tempfile
import unittest
import zlib

import sentencepiece as spm
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import distinct_ngrams  # noqa: E402
import prepare_corpus2 as pc  # noqa: E402

rng = random.Random()


def slurp(path, mode="r"):
    with open(path, mode) as f:
        return f.read()


def sentence(lo, hi):
    return f"{word().capitalize()} {' '.join(word() for _ in range(rng.randint(lo, hi)))}."


def word(n=None):
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n or rng.randint(2, 9)))


class Pack(unittest.TestCase):
    def test_whole_documents_in_order_within_the_room(self):
        for _ in range(50):
            room = rng.randint(50, 500)
            docs = [(f"d{i}", rng.randint(3, 2 * room)) for i in range(rng.randint(1, 200))]
            shards, truncated = pc.pack(docs, room)
            self.assertEqual([n for s in shards for n in s], [n for n, _ in docs])
            length = {n: min(t, room) for n, t in docs}
            self.assertEqual(truncated, [(n, t, room) for n, t in docs if t > room])
            for i, s in enumerate(shards):
                self.assertLessEqual(sum(length[n] for n in s), room)
                if i + 1 < len(shards):  # closed only because the next document did not fit
                    self.assertGreater(sum(length[n] for n in s) + length[shards[i + 1][0]], room)


class Readers(unittest.TestCase):
    def test_dictd_entries_grouped_by_first_letter(self):
        b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

        def enc(n):
            s = ""
            while True:
                s = b64[n % 64] + s
                n //= 64
                if not n:
                    return s
        heads = sorted({word() for _ in range(300)})
        body, index, entries = b"", [], {}
        for h in heads:
            e = f"{h}\n  {' '.join(word() for _ in range(rng.randint(3, 40)))}".encode()
            index.append(f"{h}\t{enc(len(body))}\t{enc(len(e))}")
            entries[h] = e.decode()
            body += e + b"\n"
        with tempfile.TemporaryDirectory() as d:
            with gzip.open(f"{d}/x.dict.dz", "wb") as f:
                f.write(body)
            with open(f"{d}/x.index", "w") as f:
                f.write("00databaseinfo\tA\tB\n" + "\n".join(index) + "\n")
            docs = dict(pc.dict_entries(f"{d}/x.index"))
        letters = sorted({h[0].upper() for h in heads})
        self.assertEqual(sorted(k.rsplit("#", 1)[1] for k in docs), letters)
        for key, text in docs.items():
            mine = [entries[h] for h in heads if h[0].upper() == key.rsplit("#", 1)[1]]
            self.assertEqual(text, "\n\n".join(mine))

    def test_r_character_vectors(self):
        novels = [[" ".join(word() for _ in range(rng.randint(0, 12))) for _ in range(rng.randint(1, 60))]
                  for _ in range(3)]
        blob = b""
        for lines in novels:
            lines[0] = word().upper() + " " + word().upper()
            obj = b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"
            obj += struct.pack(">ii", 16, len(lines))
            for line in lines:
                raw = line.encode()
                obj += struct.pack(">ii", 0x40009, len(raw)) + raw
            blob += struct.pack(">I", len(obj)) + zlib.compress(obj)
        with tempfile.TemporaryDirectory() as d:
            os.makedirs(f"{d}/data")
            with open(f"{d}/data/Rdata.rdb", "wb") as f:
                f.write(blob)
            got = list(pc.austen_novels(d))
        self.assertEqual([t for _, t in got], ["\n".join(lines) for lines in novels])
        self.assertEqual(len({p for p, _ in got}), 3)


class Sample(unittest.TestCase):
    def test_sampled_files_split_like_the_others(self):
        """A source's sample and the validation split are independent draws: about 3 % of the
        sampled files go to validation (the same hash for both sent 3 in 4 there)."""
        with tempfile.TemporaryDirectory() as raw:
            names = {f"{raw}/tree/{d}/{word(12)}.c" for d in ("core", "drivers") for _ in range(2500)}
            for n in names:
                os.makedirs(os.path.dirname(n), exist_ok=True)
                open(n, "w").close()
            src = {"globs": [f"{raw}/tree/**/*.c"], "raw": raw, "sample": (r"/drivers/", 20)}
            kept = pc.files(src)
        core = [p for p in kept if "/core/" in p]
        drivers = [p for p in kept if "/drivers/" in p]
        self.assertEqual(len(core), len([n for n in names if "/core/" in n]))
        self.assertTrue(350 < len(drivers) < 650, len(drivers))
        val = [p for p in drivers if pc.hashed(os.path.relpath(p, raw)) < pc.VAL_PERCENT]
        self.assertLess(len(val), 0.08 * len(drivers))


class Filters(unittest.TestCase):
    def code(self, lines):
        return "\n".join(lines) + "\n"

    def test_code_rejection(self):
        names = [word() for _ in range(80)]
        plain = self.code([f"static int {n}(int {word()}) {{ return {rng.randint(0, 99)}; }}" for n in names])
        self.assertIsNone(pc.code_rejection(plain))
        self.assertEqual(pc.code_rejection("/* This file is automatically generated. */\n" + plain),
                         "generated")
        self.assertEqual(pc.code_rejection(plain + "var " + ";".join(f"{n}=1" for n in names * 30)),
                         "minified")
        table = self.code([", ".join(f"0x{rng.randrange(1 << 32):08x}" for _ in range(8)) + ","
                           for _ in range(100)])
        self.assertEqual(pc.code_rejection("static const u32 t[] = {\n" + table + "};\n"), "data table")
        regs = self.code([f"#define {n.upper()}_{i} 0x{rng.randrange(1 << 16):x}" for i in range(3000)
                          for n in names[:1]])
        self.assertEqual(pc.code_rejection(regs), "generated")

    def test_prose_share_separates_sentences_from_code(self):
        prose = " ".join(sentence(4, 15) for _ in range(100))
        code = "\n".join(f"{word()}_{word()}->{word()} = {word()}({rng.randint(0, 9)}, &{word()}[i]);"
                         for _ in range(100))
        self.assertGreater(pc.prose_share(prose), 0.9)
        self.assertLess(pc.prose_share(code), 0.1)
        self.assertTrue(0.5 < pc.prose_share(prose + "\n" + code) < 0.9)


class InfoFiles(unittest.TestCase):
    def test_nodes_without_their_headers_and_the_tag_table(self):
        nodes = [" ".join(sentence(3, 9) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(2, 9))]
        info = "This is x.info, produced by makeinfo.\n"
        for i, n in enumerate(nodes):
            info += f"\x1f\nFile: x.info,  Node: N{i},  Next: N{i + 1},  Up: Top\n\n{n}\n"
        info += "\x1f\nTag Table:\n" + "".join(f"Node: N{i}\x7f{100 * i}\n" for i in range(len(nodes)))
        info += "\x1f\nEnd Tag Table\n"
        with tempfile.TemporaryDirectory() as d:
            with gzip.open(f"{d}/x.info.gz", "wt") as f:
                f.write(info)
            text = pc.info_text(f"{d}/x.info.gz")
        self.assertEqual(text.split(), ("This is x.info, produced by makeinfo. " + " ".join(nodes)).split())


class RepetitionCut(unittest.TestCase):
    """distinct_ngrams.kept_runs against a reference that cuts the word list window by window."""

    def text(self):
        parts = []
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.6:
                parts.append(" ".join(word() for _ in range(rng.randint(1, 900))))
            else:  # a loop: a short phrase again and again, as in tables and option lists
                phrase = " ".join(word() for _ in range(rng.randint(1, 6)))
                parts.append(" ".join([phrase] * rng.randint(1, 200)))
        return rng.choice([" ", "\n", "  \n\t"]).join(parts)

    def test_runs_are_the_kept_windows_words(self):
        for _ in range(200):
            text, threshold, size = self.text(), rng.choice([0.6, 0.8, 0.9]), rng.choice([40, 400])
            words = text.split()
            starts = list(range(0, len(words), size))
            if len(starts) > 1 and len(words) - starts[-1] < size // 4:
                starts.pop()
            ends = starts[1:] + [len(words)]
            keep = [not distinct_ngrams.distinct(words[a:b], 4) < threshold
                    for a, b in zip(starts, ends)]
            runs = pc.kept_runs(text, threshold, size)
            if all(keep):
                self.assertIs(runs[0], text)
                continue
            expected, run = [], []
            for (a, b), k in zip(zip(starts, ends), keep):
                if k:
                    run += words[a:b]
                elif run:
                    expected.append(run)
                    run = []
            expected += [run] if run else []
            self.assertEqual([r.split() for r in runs], expected)
            for r in runs:
                self.assertIn(r, text)  # verbatim, line breaks and spacing kept

    def test_build_cuts_training_documents_only(self):
        loop = " ".join(["alpha beta gamma delta"] * 150)
        names = [f"d/{i}" for i in range(400)]
        val = [n for n in names if pc.hashed(n) < pc.VAL_PERCENT][:3]
        train = [n for n in names if pc.hashed(n) >= pc.VAL_PERCENT][:30]
        # A run whose own path hashes into validation stays in training with its document.
        train += [next(n for n in names if n not in train and
                       pc.hashed(n) >= pc.VAL_PERCENT > pc.hashed(n + "#1"))]
        docs = {n: " ".join(sentence(3, 12) for _ in range(80)) + "\n" + loop + "\n" +
                " ".join(sentence(3, 12) for _ in range(80)) for n in val + train}
        docs[train[0]] = loop  # nothing of it kept
        srcs = {"prose": {"packages": "p", "licence": "test", "kind": "text"}}
        with tempfile.TemporaryDirectory() as out:
            os.makedirs(f"{out}/docs")
            with open(f"{out}/docs/prose.jsonl", "w") as f:
                for path, text in docs.items():
                    f.write(json.dumps({"path": path, "text": pc.clean(text)}) + "\n")
            pc.build(srcs, {"prose": {"dropped": {}}}, out, vocabs=(400,), shard_bytes=400_000,
                     cut_below=0.8)
            sp = spm.SentencePieceProcessor(model_file=f"{out}/tokenizer.model")
            manifest = json.loads(slurp(f"{out}/shards.json"))
            stats = json.loads(slurp(f"{out}/stats.json"))

            def texts(entry):
                ids = list(memoryview(lzma.decompress(slurp(f"{out}/{entry['file']}", "rb"))).cast("H"))
                bounds = [-1] + [i for i, t in enumerate(ids) if t == 2]
                return [sp.decode(ids[a + 2:b]) for a, b in zip(bounds, bounds[1:])]
            trained = [t for e in manifest["shards"] for t in texts(e)]
            self.assertEqual(len(trained), 2 * len(train) - 2)  # the text before the loop and after
            # A window kept at 0.8 holds at most about 80 words of the loop: 20 of its phrases.
            self.assertTrue(all(t.count("alpha beta gamma delta") <= 21 for t in trained))
            self.assertEqual(sorted(texts(manifest["val"])), sorted(pc.clean(docs[n]) for n in val))
            cut = sum(len(pc.clean(docs[n])) for n in train) - sum(map(len, trained))
            self.assertEqual(stats["sources"]["prose"]["repetitive_chars_cut"], cut)
            self.assertGreater(cut, len(loop) * len(train) * 0.9)


class Build(unittest.TestCase):
    """The whole build after extraction on small random sources: every document comes back whole
    (or truncated to a shard's room) from the xz shards, in the format shards.json describes."""

    def test_shards_hold_every_document(self):
        docs = {"prose": [], "code": [], "novels": []}
        for i in range(160):
            docs["prose"].append((f"p/{i}", " ".join(sentence(3, 12) for _ in range(rng.randint(5, 60)))))
            docs["code"].append((f"c/{i}", "\n".join(f"{word()}_{word()}({rng.randint(0, 99)}, &{word()});"
                                                     for _ in range(rng.randint(5, 60)))))
        docs["prose"].append(("p/long", " ".join(word() for _ in range(30000))))
        docs["code"].append(("c/copy", docs["prose"][0][1]))  # an exact duplicate: dropped
        docs["novels"] = [(f"n/{i}", " ".join(word() for _ in range(500))) for i in range(3)]
        srcs = {n: {"packages": n, "licence": "test", "kind": "text", "outside": n == "novels"} for n in docs}
        with tempfile.TemporaryDirectory() as out:
            os.makedirs(f"{out}/docs")
            for n, ds in docs.items():
                with open(f"{out}/docs/{n}.jsonl", "w") as f:
                    for path, text in ds:
                        f.write(json.dumps({"path": path, "text": pc.clean(text)}) + "\n")
            pc.build(srcs, {n: {"dropped": {}} for n in docs}, out, vocabs=(400, 500), shard_bytes=40_000)
            manifest = json.loads(slurp(f"{out}/shards.json"))
            stats = json.loads(slurp(f"{out}/stats.json"))
            sp = spm.SentencePieceProcessor(model_file=f"{out}/tokenizer.model")
            self.assertEqual((manifest["vocab"], manifest["bos"], manifest["eos"]), (500, 1, 2))
            seen = []
            for entry in manifest["shards"] + [manifest["val"], manifest["outside"]]:
                blob = slurp(f"{out}/{entry['file']}", "rb")
                self.assertLessEqual(len(blob), 40_000)
                self.assertEqual(hashlib.sha256(blob).hexdigest(), entry["sha256"])
                ids = list(memoryview(lzma.decompress(blob)).cast("H"))
                self.assertEqual(len(ids), entry["tokens"])
                self.assertEqual((ids[0], ids[-1]), (1, 2))
                bounds = [i for i, t in enumerate(ids) if t == 2]
                self.assertEqual(len(bounds), entry["docs"])
                start = 0
                for end in bounds:
                    self.assertEqual(ids[start], 1)
                    seen.append(sp.decode(ids[start + 1:end]))
                    start = end + 1
            texts = {pc.clean(t) for ds in docs.values() for _, t in ds}
            self.assertEqual(len(seen), len(texts))
            whole = [t for t in seen if t in texts]
            self.assertEqual(len(seen) - len(whole), len(stats["truncated"]))
            self.assertEqual([t["path"] for t in stats["truncated"]], ["p/long"])
            self.assertGreater(len(manifest["shards"]), 1)
            outside = slurp(f"{out}/outside.txt").split("\f")
            self.assertEqual(sorted(outside), sorted(pc.clean(t) for _, t in docs["novels"]))
            self.assertEqual(stats["sources"]["prose"]["kind"], "prose")
            self.assertEqual(stats["sources"]["code"]["kind"], "code")
            offsets = json.loads(slurp(f"{out}/val_docs.json"))
            self.assertEqual(sum(o["length"] for o in offsets), manifest["val"]["tokens"])


if __name__ == "__main__":
    unittest.main()
