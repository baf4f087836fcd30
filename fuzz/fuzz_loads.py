"""Fuzz harness: arbitrary bytes through every reader of ``compeft_format``.

Contract: for any input, ``loads``, ``open_file`` (+ ``info``/``get`` of every key,
``file_info``) and ``iter_stream`` on a non-seekable stream either return or raise a
:class:`~compeft_format.CompeftError` subclass. Anything else (IndexError, a numpy error,
MemoryError, an assertion below) is a crash. On top of that, differential checks:

* when ``loads`` accepts a file, ``iter_stream`` and ``open_file`` accept it too and give
  equal values (they check a subset of what ``loads`` checks);
* every decoded ternary tensor satisfies the ``TernaryTensor`` invariants (indices strictly
  increasing and below numel, one sign per nonzero, finite non-negative scale), and dense
  values have the declared shape;
* what was decoded re-encodes and decodes to the same values.

Each input is also tried with its checksums re-computed (:func:`_craft.fix_checksums`): a
random mutation almost always breaks a CRC-32, and the fuzzer would never get past it to the
decoders otherwise.

Run ``python fuzz/fuzz_loads.py -help=1`` for libFuzzer flags, or see fuzz/README.md.
"""

from __future__ import annotations

import io
import math
import sys

import _craft
import _harness
import numpy as np

with _harness.instrumented(__name__):
    import compeft_format as cf
    from compeft_format import CompeftError, EncodeError, TernaryTensor

HARNESS = "fuzz_loads"
MAX_DENSE_NUMEL = 1 << 22  #: ``to_numpy`` is called only below this (the caller's choice)


class Pipe(io.RawIOBase):
    """A read-only, non-seekable stream over bytes, like a pipe or a socket."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n is None or n < 0 else self._pos + n
        out = bytes(self._data[self._pos : end])
        self._pos += len(out)
        return out


def _check_value(name: str, value: object) -> None:
    """Assert the invariants a decoded value must hold, then densify small ternary tensors."""
    if isinstance(value, TernaryTensor):
        assert value.signs.size == value.indices.size == value.nnz, name
        assert math.isfinite(value.scale), name
        assert math.copysign(1.0, value.scale) > 0, name
        try:
            value._validate()  # indices in range and strictly increasing
        except EncodeError as exc:  # a CompeftError, but here it means the decoder is wrong
            raise AssertionError(f"decoded tensor {name!r} is invalid: {exc}") from None
        if value.numel <= MAX_DENSE_NUMEL:
            dense = value.to_numpy()
            assert dense.shape == value.shape, name
            assert int(np.count_nonzero(dense)) <= value.nnz, name  # scale may be 0
    else:
        assert isinstance(value, np.ndarray), (name, type(value))


def _same(a: object, b: object) -> bool:
    """Value equality; dense arrays compare dtype, shape and bytes (NaN-safe)."""
    if isinstance(a, TernaryTensor) or isinstance(b, TernaryTensor):
        return a == b
    assert isinstance(a, np.ndarray)
    assert isinstance(b, np.ndarray)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _same_dict(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)


def check(data: bytes) -> None:
    """Run every reader on ``data``; only CompeftError may escape from the package."""
    try:
        whole = cf.loads(data)
    except CompeftError:
        whole = None
    if whole is not None:
        for name, value in whole.items():
            _check_value(name, value)

    streamed: dict | None = {}
    try:
        for name, value in cf.iter_stream(Pipe(data)):
            _check_value(name, value)
            streamed[name] = value
    except CompeftError:
        streamed = None

    random_access: dict | None = {}
    raw: dict = {}
    meta: dict = {}
    numel: int | None = 0  # of every tensor, when every record header could be read
    try:
        with cf.open_file(data) as f:
            meta = f.metadata()
            for name in f:
                try:
                    info = f.info(name)
                except CompeftError:
                    random_access = numel = None
                    continue  # the other records may still decode
                info.to_dict()
                numel = None if numel is None else numel + info.numel
                try:
                    value = f.get(name)
                    raw[name] = f.get_raw(name)
                except CompeftError:
                    random_access = None
                    continue
                assert info.shape == getattr(value, "shape", None), name
                _check_value(name, value)
                if random_access is not None:
                    random_access[name] = value
            f.file_info().to_dict()
    except CompeftError:
        random_access = None
        numel = None

    # dense=True decodes ternary records straight to arrays, through other code paths (the
    # codecs' chunked positions): it must accept exactly what loads accepts, with the values
    # of to_numpy. Only where the dense arrays are small: their size is the caller's choice.
    if numel is not None and numel <= MAX_DENSE_NUMEL:
        try:
            dense = cf.loads(data, dense=True)
        except CompeftError:
            dense = None
        assert (dense is None) == (whole is None), "dense=True and loads disagree on validity"
        if whole is not None:
            assert dense is not None
            want = {k: v.to_numpy() if isinstance(v, TernaryTensor) else v
                    for k, v in whole.items()}
            assert _same_dict(want, dense), "dense=True values differ from to_numpy()"

    if whole is None:
        return
    # loads checks every byte; the other readers check a subset and must agree with it
    assert streamed is not None, "iter_stream rejects a file loads accepts"
    assert _same_dict(whole, streamed), "iter_stream disagrees"
    assert random_access is not None, "open_file rejects a file loads accepts"
    assert _same_dict(whole, random_access), "open_file disagrees"
    # what was decoded encodes again (dense BF16/F8 come back widened, so leave them out)
    again = {k: (v if isinstance(v, TernaryTensor) else v[0]) for k, v in raw.items()
             if isinstance(v, TernaryTensor) or v[1] not in ("BF16", "F8_E4M3", "F8_E5M2")}
    redone = cf.loads(cf.dumps(again, metadata=meta))
    assert _same_dict({k: whole[k] for k in again}, redone), "re-encoding changed a value"


def test_one_input(data: bytes) -> None:
    """The fuzz target: the input as given, then with its checksums made right."""
    check(data)
    fixed = _craft.fix_checksums(data)
    if fixed is not None and fixed != data:
        check(fixed)


if __name__ == "__main__":
    _harness.main(test_one_input, HARNESS, sys.argv)
