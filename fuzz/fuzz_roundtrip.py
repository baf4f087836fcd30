"""Fuzz harness: fuzzer-chosen tensors and options must survive ``dumps`` -> ``loads`` exactly.

The input bytes drive a :class:`_harness.DataProvider` that picks the tensors (shapes from
0-d to 4-d, densities from 0 to 1, position patterns, signs, scales from 0 to the float32
maximum, the four ternary dtypes, dense records of the twelve numpy dtypes), the metadata
(nested JSON with reserved keys) and the writer options (positions codec, zstd level,
alignment, format version 1.0 to 1.7), and whether some tensors repeat another's positions and
signs (a twin pack's twins, spec 5.14). Contract, for every input:

* ``dumps`` accepts it (every generated input is valid), twice with the same bytes;
* ``loads``, ``iter_stream`` and ``open_file`` give back exactly the input and metadata;
* re-encoding what was read with the same options gives identical bytes (one canonical
  encoding, spec 8).

Any exception is a crash. Run ``python fuzz/fuzz_roundtrip.py -help=1`` or see fuzz/README.md.
"""

from __future__ import annotations

import io
import itertools
import math
import sys
from typing import Any

import _harness
import numpy as np

with _harness.instrumented(__name__):
    import compeft_format as cf
    from compeft_format import TernaryTensor

HARNESS = "fuzz_roundtrip"
TERNARY_DTYPES = ("F32", "F16", "BF16", "F64")
DENSE_DTYPES = (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8,
                np.uint64, np.uint32, np.uint16, np.uint8, np.bool_)
ZSTD_LEVELS = (None, 3, -7, -1, 1, 9, 19, 22)
#: Format versions a writer can write (spec 10): the default first, so that corpus inputs
#: from before this choice existed (whose bytes end before it) keep their meaning.
VERSIONS = ("1.7", "1.6", "1.5", "1.4", "1.3", "1.2", "1.1", "1.0")
SCALES = (0.0, 1.0, 0.0125, 1e-45, 1.1754942e-38, 3.4028235e38, 65504.0, 1e-8)
DENSITIES = (0.0, 1.0, 0.5, 0.001, 0.01, 0.05, 0.1, 0.3, 0.9)
SIZE_FACTORS = (1, 1, 3, 64, 1000, 8191)  #: widen the last dimension: golomb's M grows
MAX_NUMEL = 1 << 20  #: elements per tensor: keeps an execution in milliseconds
#: The decode budget (spec 9.3) is a heuristic that valid files can exceed: a tensor at
#: density 0.7 whose positions compress to nothing decodes to ~72x the file size, above the
#: default 64x (found by this harness). Round trips are about values, so they read with room.
LIMITS = cf.ReadLimits(max_decoded_bytes=1 << 31)


def _shape(p: _harness.DataProvider, max_dim: int) -> tuple[int, ...]:
    ndim = p.int_in_range(0, 4)
    dims = [p.int_in_range(0, max_dim) for _ in range(ndim)]
    if dims:  # widen the last dimension, up to MAX_NUMEL elements in all
        dims[-1] = min(dims[-1] * p.pick(SIZE_FACTORS), MAX_NUMEL // max(1, math.prod(dims[:-1])))
    return tuple(dims)


def _ternary(p: _harness.DataProvider) -> TernaryTensor:
    shape = _shape(p, 9)
    numel = int(np.prod(shape, dtype=np.int64))
    density = p.probability() if p.bool() else p.pick(DENSITIES)
    nnz = min(numel, round(density * numel))
    rng = np.random.default_rng(p.int_in_range(0, 2**32 - 1))
    pattern = p.int_in_range(0, 3)
    if pattern == 0:  # at random
        idx = np.sort(rng.choice(numel, nnz, replace=False)) if nnz else np.empty(0, np.int64)
    elif pattern == 1:  # a run at the start: gaps of 0
        idx = np.arange(nnz)
    elif pattern == 2:  # a run at the end: one long first gap
        idx = np.arange(numel - nnz, numel)
    else:  # evenly spread: every gap equal
        idx = np.unique(np.linspace(0, numel - 1, nnz).astype(np.int64)) if nnz else []
    n = len(idx)
    sign_mode = p.int_in_range(0, 2)
    signs = rng.random(n) < 0.5 if sign_mode == 0 else np.full(n, sign_mode == 1)
    scale = p.pick(SCALES) if p.bool() else abs(p.float32())
    if not np.isfinite(scale):
        scale = 2.0
    return TernaryTensor(shape, idx, signs, scale, p.pick(TERNARY_DTYPES))


def _dense(p: _harness.DataProvider) -> np.ndarray:
    shape = _shape(p, 6)
    dtype = np.dtype(p.pick(DENSE_DTYPES))
    numel = int(np.prod(shape, dtype=np.int64))
    rng = np.random.default_rng(p.int_in_range(0, 2**32 - 1))
    if p.bool():  # compressible: zstd will be kept
        raw = np.repeat(rng.integers(0, 256, 4, dtype=np.uint8), -(-numel * dtype.itemsize // 4))
    else:
        raw = rng.integers(0, 256, numel * dtype.itemsize, dtype=np.uint8)
    raw = raw[: numel * dtype.itemsize]
    if dtype == np.bool_:
        raw = raw & 1  # spec 6.5: BOOL bytes are 0 or 1
    return np.frombuffer(raw.tobytes(), dtype=dtype).reshape(shape)  # NaN payloads included


def _json(p: _harness.DataProvider, depth: int) -> Any:
    kind = p.int_in_range(0, 7 if depth else 5)
    if kind == 0:
        return None
    if kind == 1:
        return p.bool()
    if kind == 2:
        return p.int_in_range(-(2**53 - 1), 2**53 - 1)  # spec 5.2 (R-META-12)
    if kind == 3:
        value = p.float32()
        return value if np.isfinite(value) else 0.5  # JSON has no NaN/Infinity (spec 5.2)
    if kind in (4, 5):
        return p.text(8)
    if kind == 6:
        return [_json(p, depth - 1) for _ in range(p.int_in_range(0, 3))]
    return {p.text(6): _json(p, depth - 1) for _ in range(p.int_in_range(0, 3))}


def _metadata(p: _harness.DataProvider) -> dict[str, Any] | None:
    if not p.bool():
        return None
    meta = {p.text(10): _json(p, 3) for _ in range(p.int_in_range(0, 4))}
    if p.bool():
        meta["compeft.producer"] = p.text(12)
    if p.bool():
        meta["compeft.base"] = {"name": p.text(8), "hashes": {p.text(4): p.text(8)}}
    meta.pop("compeft.compression", None)  # must be an object; _json may give anything
    if "compeft.base" in meta and not isinstance(meta["compeft.base"], dict):
        del meta["compeft.base"]
    if not isinstance(meta.get("compeft.producer", ""), str):
        del meta["compeft.producer"]
    return meta


def generate(data: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return ``(tensors, dumps keyword arguments)`` decoded from fuzzer bytes."""
    p = _harness.DataProvider(data)
    options = {
        "positions": p.pick(("auto", "bitmask", "golomb")),
        "zstd_level": p.pick(ZSTD_LEVELS),
        "alignment": 1 << p.pick((3, 0, 1, 2, 3, 6, 12)),
        "metadata": _metadata(p),
    }
    tensors: dict[str, Any] = {}
    for i in range(p.int_in_range(0, 5)):
        name = p.text(12) or f"t{i}"
        if name in tensors:
            name = f"{name}#{i}"
        tensors[name] = _dense(p) if p.int_in_range(0, 3) == 3 else _ternary(p)
    options["version"] = p.pick(VERSIONS)  # see VERSIONS
    if p.bool():  # after the version, so older inputs keep their meaning: twins (spec 5.14)
        ternary = [n for n, t in tensors.items() if isinstance(t, TernaryTensor)]
        for a, b in itertools.pairwise(ternary):
            src, own = tensors[a], tensors[b]  # b: a's positions and signs, its own shape
            tensors[b] = TernaryTensor((src.numel,), src.indices, src.signs, own.scale,
                                       own.dtype)
    return tensors, options


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, TernaryTensor):
        return isinstance(b, TernaryTensor) and a == b
    return (isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
            and a.tobytes() == b.tobytes())


def _check_equal(what: str, got: dict[str, Any], want: dict[str, Any]) -> None:
    assert sorted(got) == sorted(want), f"{what}: names {sorted(got)} != {sorted(want)}"
    for name in want:
        assert _same(got[name], want[name]), f"{what}: tensor {name!r} differs"


def test_one_input(data: bytes) -> None:
    """The fuzz target."""
    tensors, options = generate(data)
    encoded = cf.dumps(tensors, **options)
    assert cf.dumps(tensors, **options) == encoded, "dumps is not deterministic"
    back = cf.loads(encoded, limits=LIMITS)
    _check_equal("loads", back, tensors)
    _check_equal("iter_stream", dict(cf.iter_stream(io.BytesIO(encoded), limits=LIMITS)),
                 tensors)
    with cf.open_file(encoded, limits=LIMITS) as f:
        _check_equal("open_file", {k: f.get(k) for k in f}, tensors)
        meta = f.metadata()
    assert meta == (options["metadata"] or {}), "metadata differs"
    again = cf.dumps(back, **{**options, "metadata": meta})
    assert again == encoded, "re-encoding what was read changed the bytes"


if __name__ == "__main__":
    _harness.main(test_one_input, HARNESS, sys.argv)
