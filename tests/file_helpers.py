"""Reading a compeft file every way the package can, for tests of the container's records."""

from __future__ import annotations

import importlib.util
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


def refused_below(data: bytes, minor: int, message: str) -> None:
    """``data`` with its Version_Minor set to ``minor`` (:func:`with_minor`) is refused on
    every read path with an error matching ``message``: a reader of that minor does not know
    the parts the file holds (spec 10.1)."""
    old = with_minor(data, minor)
    for read in READERS.values():
        with pytest.raises(CompeftError, match=message):
            read(old)


def check_writer_streams_like_dumps(tensors: dict[str, Any], version: str,
                                    metadata: dict[str, Any] | None = None) -> None:
    """A :class:`~compeft_format.Writer` fed ``tensors`` one by one writes the bytes of
    ``dumps``, and the sizes it reports are ``inspect``'s, within the file."""
    from compeft_format import Writer, dumps

    buf = io.BytesIO()
    with Writer(buf, metadata=metadata, version=version) as w:
        for name in sorted(tensors):
            w.write(name, tensors[name])
    assert buf.getvalue() == dumps(tensors, metadata=metadata, version=version)
    assert sum(w.sizes.values()) <= len(buf.getvalue())
    with open_file(buf.getvalue()) as f:
        assert w.sizes == {n: f.info(n).record_size for n in f}


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


def three_members() -> dict[str, TernaryTensor]:
    """Three small tensors, one pack: the file whose every cut and bit flip the format tests
    refuse."""
    return {"a": random_ternary((64,), 0.2, 1, 0.5),
            "ab": random_ternary((40,), 0.3, 2, 0.5, "BF16"),
            "b": random_ternary((16,), 0.25, 3, 0.75)}


def mixed_tensors() -> dict[str, Any]:
    """Pack members of every sort (small vectors, all zero, a scalar, one of some 5 KiB)
    around a dense record and a ternary record too big to pack."""
    return {**ia3_like(2), "m.dense": np.arange(6, dtype=np.float32),
            "m.zero": TernaryTensor.zeros((3, 3)),
            "m.scalar": TernaryTensor((), [0], [True], 0.5, "BF16"),
            # a member of some 5 KiB: its streams are moved with numpy, not as one int
            "m.wide": random_ternary((2**18,), 0.02, 5, 0.25),
            "z.big": random_ternary((2**19 + 1,), 0.0001, 7, 0.5)}


def check_reads_back_like_1_0(tensors: dict[str, Any], members: Iterable[str], version: str,
                              kind: int, positions: str, alignment: int) -> None:
    """``tensors`` written in ``version`` (with a record of ``kind``) read back on every path,
    in the independent reader too, like the 1.0 file of the same content; ``members`` (pack
    members) each asked for first, in reverse order, dense and as torch tensors; and what
    was read writes the same bytes again."""
    import sys

    from spec_helpers import ROOT
    sys.path.insert(0, str(ROOT / "spec" / "tools"))
    import reference_reader as rr

    from compeft_format import dumps

    opts = {"positions": positions, "alignment": alignment}
    new, old = dumps(tensors, version=version, **opts), dumps(tensors, version="1.0", **opts)
    assert new[9] == int(version.split(".")[1])  # Version_Minor (spec 5.1)
    assert kind in [new[o] for o in sorted({i.offset for i in open_file(new).file_info().tensors})]
    want = loads(old)
    for name, read in READERS.items():
        got = read(new)
        assert list(got) == list(want), name
        for k, v in want.items():
            assert v == got[k] if isinstance(v, TernaryTensor) else np.array_equal(v, got[k])
    with open_file(new) as f:  # members asked for in reverse order, dense, before any other
        for k in reversed(list(members)):
            assert np.array_equal(f.get(k, dense=True), want[k].to_numpy())
    if importlib.util.find_spec("torch") is not None:  # the rest holds without torch too
        import torch
        with open_file(new, framework="torch") as f:
            for k in members:
                assert torch.equal(f.get(k), torch.from_numpy(want[k].to_numpy()))
    assert rr.read_stream(new) == rr.read_random(new)
    assert [t["name"] for t in rr.read_stream(new)["tensors"]] == list(want)
    assert dumps(loads(new), version=version, **opts) == new

