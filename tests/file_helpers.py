"""Reading a compeft file every way the package can, for tests of the container's records."""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pytest

from compeft_format import TernaryTensor, iter_stream, loads, open_file
from compeft_format.errors import CompeftError


def random_ternary(shape: tuple[int, ...], density: float, seed: int, scale: float,
                   dtype: str = "F32") -> TernaryTensor:
    """A ternary tensor with ``density`` of its entries (at least one) at random places."""
    rng = np.random.default_rng(seed)
    numel = math.prod(shape)
    idx = np.sort(rng.choice(numel, max(1, int(numel * density)), replace=False))
    return TernaryTensor(shape, idx, rng.random(len(idx)) < 0.5, scale, dtype)


def ia3_like(layers: int = 6) -> dict[str, TernaryTensor]:
    """Vectors of 384 and 1,536 elements at density 0.01, as a small (IA)^3 adapter's."""
    out = {}
    for i in range(layers):
        stem = f"base_model.model.encoder.layer.{i}"
        for j, (m, n) in enumerate((("attention.self.key", 384), ("attention.self.value", 384),
                                    ("output.dense", 1536))):
            out[f"{stem}.{m}.ia3_l"] = random_ternary((n,), 0.01, 10 * i + j, 0.01 * (j + 1))
    return out


def with_minor(data: bytes, minor: int) -> bytes:
    """``data`` with its Version_Minor set to ``minor`` and its header checksum made right
    again (spec 5.1), as a file of that version with the same records."""
    out = bytearray(data)
    out[9] = minor
    meta_size = struct.unpack("<I", out[12:16])[0]
    out[16 + meta_size:20 + meta_size] = struct.pack("<I", zlib.crc32(out[:16 + meta_size]))
    return bytes(out)


def kinds(data: bytes) -> list[int]:
    """Record_Kind of every record, from the index."""
    with open_file(data) as f:
        offsets = sorted({f.info(n).offset for n in f})
    return [data[o] for o in offsets]


def read_all(data: bytes) -> dict[str, Any]:
    """Every tensor through random access (the index)."""
    with open_file(data) as f:
        return {n: f.get(n) for n in f}


#: The three read paths: all at once, as a stream, by name through the index.
READERS: dict[str, Callable[[bytes], dict[str, Any]]] = {
    "loads": loads, "iter_stream": lambda d: dict(iter_stream(io.BytesIO(d))),
    "open_file": read_all}


def refuse_every_cut_and_flip(data: bytes, unchecked: Iterable[int] = ()) -> None:
    """Every cut of ``data`` and every single-bit flip (but in the bytes at ``unchecked``)
    is an error on every read path: a checksum on every byte."""
    skip = set(unchecked)
    for n in range(len(data)):
        for read in READERS.values():
            with pytest.raises(CompeftError):
                read(data[:n])
    for at in range(len(data)):
        if at in skip:
            continue
        for bit in range(8):
            bad = bytearray(data)
            bad[at] ^= 1 << bit
            for read in READERS.values():
                with pytest.raises(CompeftError):
                    read(bytes(bad))
