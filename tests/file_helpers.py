"""Reading a compeft file every way the package can, for tests of the container's records."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from compeft_format import iter_stream, loads, open_file
from compeft_format.errors import CompeftError


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
