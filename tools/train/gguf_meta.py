"""A GGUF file's metadata and tensor directory (the GGUF spec), without PyTorch: shared by
gguf_to_hf.py (weights for the trainer) and prepare_corpus.py (the tokenizer a model embeds)."""
import struct

import numpy as np

# Metadata value types and their struct formats; 8 string, 9 array
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_gguf(path):
    """(the file's bytes, metadata key -> value, [(tensor name, dims outermost first, type, byte
    offset of its data in the file)]). An array of UINT8 (the tokenizer model) is bytes."""
    data = open(path, "rb").read()
    if data[:4] != b"GGUF":
        raise SystemExit(f"{path}: not a GGUF file")
    at = 8
    n_tensors, n_kv = struct.unpack_from("<QQ", data, at)
    at += 16

    def string():
        nonlocal at
        (n,) = struct.unpack_from("<Q", data, at)
        at += 8 + n
        return data[at - n:at].decode()

    def value(kind):
        nonlocal at
        if kind == 8:
            return string()
        if kind == 9:
            elem, n = struct.unpack_from("<IQ", data, at)
            at += 12
            if elem == 0:
                at += n
                return data[at - n:at]
            return [value(elem) for _ in range(n)]
        fmt = "<" + SCALARS[kind]
        at += struct.calcsize(fmt)
        v = struct.unpack_from(fmt, data, at - struct.calcsize(fmt))[0]
        return float(str(np.float32(v))) if kind == 6 else v  # 1e-05, not 9.99999974e-06

    kv = {}
    for _ in range(n_kv):
        key = string()
        (kind,) = struct.unpack_from("<I", data, at)
        at += 4
        kv[key] = value(kind)
    infos = []
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = struct.unpack_from("<I", data, at)
        dims = struct.unpack_from(f"<{n_dims}Q", data, at + 4)  # innermost first
        kind, offset = struct.unpack_from("<IQ", data, at + 4 + 8 * n_dims)
        at += 4 + 8 * n_dims + 12
        infos.append((name, tuple(reversed(dims)), kind, offset))
    alignment = kv.get("general.alignment", 32)
    base = (at + alignment - 1) // alignment * alignment
    return data, kv, [(name, dims, kind, base + offset) for name, dims, kind, offset in infos]
