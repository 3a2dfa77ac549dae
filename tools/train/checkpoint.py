"""Training checkpoints in parts: the state (weights, AdamW, step, RNG states, data cursor, plan) as
one torch.save stream cut into parts of at most 15 MiB, with manifest.json naming each part's size
and sha256, so a checkpoint comes back from the GPU machine over several commands (at most 8 files
of 16 MiB each) and travels there again in later sessions.

OUT/ckpt-STEP/ is written under a temporary name and renamed whole, then OUT/latest (the name of
the newest) is replaced atomically, then older checkpoints are removed: a run killed at any point
leaves the previous checkpoint or the new one, whole. Loading checks every part and refuses, naming
the part, anything missing, truncated or altered.

usage: checkpoint.py verify DIR            (a checkpoint folder: complete and intact?)
       checkpoint.py outbox BATCH DEST SRC...  (copy batch BATCH of SRC's files into DEST)
"""
import argparse
import hashlib
import io
import json
import os
import shutil
import sys

import torch

PART_BYTES = 15 * 2**20
FORMAT = "multipole-train-checkpoint"


class CheckpointError(Exception):
    pass


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save(out, state, meta):
    """Writes state (anything torch.save takes) as OUT/ckpt-STEP with meta (JSON: step, config,
    plan) in its manifest; returns the folder."""
    buf = io.BytesIO()
    torch.save(state, buf)
    raw = buf.getbuffer()
    name = f"ckpt-{meta['step']:07d}"
    final, tmp = os.path.join(out, name), os.path.join(out, name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    parts = []
    for i, off in enumerate(range(0, max(1, len(raw)), PART_BYTES)):
        chunk = raw[off:off + PART_BYTES]
        parts.append({"file": f"part-{i:03d}", "bytes": len(chunk),
                      "sha256": hashlib.sha256(chunk).hexdigest()})
        _write(os.path.join(tmp, parts[-1]["file"]), chunk)
    manifest = {"format": FORMAT, "version": 1, **meta, "bytes": len(raw), "parts": parts}
    _write(os.path.join(tmp, "manifest.json"), json.dumps(manifest, indent=1).encode())
    shutil.rmtree(final, ignore_errors=True)  # a checkpoint of this step from an earlier attempt
    os.replace(tmp, final)
    _write(os.path.join(out, "latest.tmp"), name.encode())
    os.replace(os.path.join(out, "latest.tmp"), os.path.join(out, "latest"))
    for old in os.listdir(out):
        if old.startswith("ckpt-") and old != name:
            shutil.rmtree(os.path.join(out, old), ignore_errors=True)
    return final


def latest(out):
    """The newest checkpoint folder in OUT, or None."""
    path = os.path.join(out, "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        folder = os.path.join(out, f.read().strip())
    if not os.path.isdir(folder):
        raise CheckpointError(f"{path} names {folder}, which does not exist")
    return folder


def read_manifest(folder):
    path = os.path.join(folder, "manifest.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{folder}: no manifest.json (not a checkpoint)")
    try:
        with open(path) as f:
            man = json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if man.get("format") != FORMAT or man.get("version") != 1:
        raise CheckpointError(f"{path}: format {man.get('format')} version {man.get('version')}, "
                              f"expected {FORMAT} version 1")
    return man


def problems(folder):
    """What is wrong with the checkpoint in folder, one line per part ([] when it is whole)."""
    man = read_manifest(folder)
    out = []
    for p in man["parts"]:
        path = os.path.join(folder, p["file"])
        if not os.path.exists(path):
            out.append(f"{p['file']} is missing")
            continue
        size = os.path.getsize(path)
        if size != p["bytes"]:
            out.append(f"{p['file']} has {size} bytes, the manifest says {p['bytes']}")
            continue
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != p["sha256"]:
            out.append(f"{p['file']} has sha256 {digest}, the manifest says {p['sha256']} "
                       "(damaged, or a part of another checkpoint)")
    return out


def load(folder):
    """(manifest, state) of a whole, intact checkpoint, on the CPU; CheckpointError naming what
    is not."""
    man = read_manifest(folder)
    bad = problems(folder)
    if bad:
        raise CheckpointError(f"checkpoint {folder} (step {man.get('step')}) is not whole: "
                              + "; ".join(bad))
    raw = bytearray()
    for p in man["parts"]:
        with open(os.path.join(folder, p["file"]), "rb") as f:
            raw += f.read()
    return man, torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False)


def batches(files, max_files=8, max_bytes=60 * 2**20):
    """files cut, in order, into batches that one GPU command can bring back: at most 8 files and
    64 MiB (60 here, leaving room for logs)."""
    out, cur, size = [], [], 0
    for f in files:
        b = os.path.getsize(f)
        if cur and (len(cur) == max_files or size + b > max_bytes):
            out.append(cur)
            cur, size = [], 0
        cur.append(f)
        size += b
    return out + ([cur] if cur else [])


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify")
    v.add_argument("dir")
    o = sub.add_parser("outbox")
    o.add_argument("batch", type=int)
    o.add_argument("dest")
    o.add_argument("src", nargs="+", help="folders whose files, in name order, form the outbox")
    o.add_argument("--reserve", type=int, default=0, help="files of DEST already taken")
    a = ap.parse_args()
    if a.command == "verify":
        man = read_manifest(a.dir)
        bad = problems(a.dir)
        print(f"{a.dir}: step {man['step']}, {len(man['parts'])} parts, {man['bytes']} bytes: "
              + ("whole" if not bad else "; ".join(bad)))
        sys.exit(1 if bad else 0)
    files = [os.path.join(s, f) for s in a.src for f in sorted(os.listdir(s))
             if os.path.isfile(os.path.join(s, f))]
    groups = batches(files, max_files=8 - a.reserve)
    if not 0 <= a.batch < len(groups):
        sys.exit(f"outbox: batch {a.batch} of {len(groups)} (0 .. {len(groups) - 1})")
    for f in groups[a.batch]:
        # DEST/<source folder's name>/<file>: two levels, as the device tool brings back
        d = os.path.join(a.dest, os.path.basename(os.path.dirname(f)))
        os.makedirs(d, exist_ok=True)
        shutil.copy(f, d)
    print(f"outbox: batch {a.batch} of {len(groups)} ({len(groups[a.batch])} files)")


if __name__ == "__main__":
    main()
