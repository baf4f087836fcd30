"""Safetensors without holding the model: a validated memory-mapped reader, a streaming writer.

The `safetensors <https://github.com/huggingface/safetensors>`_ layout is::

    N (u64 little-endian) | header (N bytes of UTF-8 JSON, space padded) | data

The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the start of the data) plus an optional ``"__metadata__"`` object of
strings. The tensors tile the data exactly, without holes or overlaps.

* :class:`SafetensorsReader` maps the file and checks every rule above before handing out
  anything; :meth:`~SafetensorsReader.get` returns one tensor as a read-only numpy view of the
  map, in its *storage* type (BF16 and F8 as raw ``uint16``/``uint8`` bits, see
  :mod:`compeft_format.dtypes`), so neither torch nor a copy is needed.
  :meth:`~SafetensorsReader.release` drops the pages read so far from the process's resident
  memory (the data stays in the page cache), which keeps a pass over a model larger than
  memory at about one tensor resident.
* :class:`SafetensorsWriter` writes the header first, from the names, dtypes and shapes it is
  given, then the data tensor by tensor (in parts if wanted), so the whole model never has to
  be in memory. :func:`save_safetensors` is the one-call form, written atomically.

Both agree with the ``safetensors`` library byte for byte on what a valid file is; unlike
``safetensors.numpy.save_file``, the writer lays out non-contiguous arrays correctly.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

import numpy as np

from . import dtypes as _dt
from ._spec import ITEMSIZE
from .errors import EncodeError, FormatError, UnsupportedFeatureError

__all__ = [
    "SafetensorsError",
    "SafetensorsReader",
    "SafetensorsWriter",
    "TensorEntry",
    "WeightsReader",
    "open_safetensors",
    "save_safetensors",
]

#: The largest header the ``safetensors`` library accepts (its ``MAX_HEADER_SIZE``).
MAX_HEADER_SIZE = 100_000_000
_HEADER_SIZE = struct.Struct("<Q")
#: dtypes ``safetensors`` knows that this package cannot represent (no compeft dtype code).
_UNSUPPORTED_DTYPES = ("F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64", "E8M0")
_COMPEFT_MAGIC = b"\x89CPFT\r\n\x1a"
#: The safetensors library's ``Dtype`` enum order; it lays out data by this order, descending
#: (then by name), which keeps every tensor aligned. Following it gives byte-identical files.
_DTYPE_RANK = {d: i for i, d in enumerate((
    "BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
    "F64", "I64", "U64"))}
assert set(_DTYPE_RANK) == set(ITEMSIZE)


class SafetensorsError(FormatError):
    """The bytes are not a valid safetensors file; the message names the file and the rule.

    >>> import tempfile
    >>> from pathlib import Path
    >>> p = Path(tempfile.mkdtemp()) / "bad.safetensors"
    >>> _ = p.write_bytes(b"\\xff" * 16)
    >>> open_safetensors(p)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    compeft_format.safetensors_io.SafetensorsError: ...: header size 18446744073709551615 is ...
    """


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header.

    Attributes
    ----------
    name, dtype, shape:
        As in the header (``dtype`` in safetensors spelling, e.g. ``"BF16"``).
    offset:
        Absolute byte offset of the tensor's data in the file.
    nbytes:
        Length of the data in bytes.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _is_uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def parse_header(prefix: bytes | memoryview, file_size: int, where: str = "<bytes>"
                 ) -> tuple[dict[str, str], list[TensorEntry]]:
    """Validate a safetensors header and return ``(metadata, entries in header order)``.

    ``prefix`` holds at least the first ``8 + N`` bytes of the file; ``file_size`` is the
    length of the whole file, against which the data offsets are checked. ``where`` names the
    file in error messages.

    Raises
    ------
    SafetensorsError
        Any rule broken: sizes, JSON, field types, dtype, byte length per shape, holes or
        overlaps between tensors, data not ending at the end of the file.
    UnsupportedFeatureError
        A valid safetensors dtype that compeft cannot hold (``F8_E8M0``, ``F4``, ...).

    Examples
    --------
    >>> import json, struct
    >>> head = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
    >>> blob = struct.pack("<Q", len(head)) + head.encode() + bytes(8)
    >>> parse_header(blob, len(blob))[1][0]
    TensorEntry(name='w', dtype='F32', shape=(2,), offset=69, nbytes=8)
    """
    def bad(message: str) -> SafetensorsError:
        return SafetensorsError(f"{where}: not a valid safetensors file: {message}")

    if file_size < _HEADER_SIZE.size:
        raise bad(f"it is {file_size} bytes; the 8-byte header size alone needs more")
    (n,) = _HEADER_SIZE.unpack(bytes(prefix[:8]))
    if bytes(prefix[:8]) == _COMPEFT_MAGIC:
        raise bad("it is a compeft file (decompress it first)")
    if n > MAX_HEADER_SIZE:
        raise bad(f"header size {n} is above the {MAX_HEADER_SIZE}-byte limit")
    data_start = 8 + n
    if data_start > file_size:
        raise bad(f"header size {n} runs past the end of the file ({file_size} bytes)")
    raw = bytes(prefix[8:data_start])
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"the header is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(
            isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must be an object of strings")
    entries: list[TensorEntry] = []
    for name, info in header.items():
        def bad_t(message: str, name: str = name) -> SafetensorsError:
            return bad(f"tensor {name!r}: {message}")

        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise bad_t("needs an object with dtype, shape and data_offsets")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dtype in _UNSUPPORTED_DTYPES:
            raise UnsupportedFeatureError(f"{where}: dtype {dtype} is not supported "
                                          f"(supported: {sorted(ITEMSIZE)})", tensor=name)
        if not isinstance(dtype, str) or dtype not in ITEMSIZE:
            raise bad_t(f"unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise bad_t(f"shape must be a list of non-negative integers, got {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(_is_uint(o) for o in offs)
                or offs[0] > offs[1]):
            raise bad_t(f"data_offsets must be [begin, end] with begin <= end, got {offs!r}")
        need = math.prod(shape) * ITEMSIZE[dtype]
        if offs[1] - offs[0] != need:
            raise bad_t(f"{dtype}{shape} needs {need} bytes, data_offsets {offs} hold "
                        f"{offs[1] - offs[0]}")
        entries.append(TensorEntry(name, dtype, tuple(shape), data_start + offs[0],
                                   offs[1] - offs[0]))
    # the tensors must tile the data: no hole, no overlap, nothing after the last one
    cursor = data_start
    for e in sorted(entries, key=lambda e: (e.offset, e.nbytes)):
        if e.offset != cursor:
            what = "overlaps the tensor before it" if e.offset < cursor else "leaves a hole"
            raise bad(f"tensor {e.name!r}: data at offset {e.offset - data_start} {what} "
                      f"(expected {cursor - data_start})")
        cursor += e.nbytes
    if cursor != file_size:
        raise bad(f"the tensors end at byte {cursor} but the file has {file_size} bytes")
    return metadata, entries


_R = TypeVar("_R", bound="WeightsReader")


class WeightsReader:
    """What every reader of a weights file shares: its names as a sorted, sized container,
    and closing as a context manager.

    A subclass sets ``_names`` (a mapping whose keys are its tensor names) and defines
    ``close``; :class:`SafetensorsReader` and the readers of :mod:`compeft_format.readers`
    (pickled weights, sharded folders) are the ones.
    """

    _names: Mapping[str, Any]

    def keys(self) -> list[str]:
        """Tensor names, sorted (Python string order)."""
        return sorted(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _R) -> _R:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SafetensorsReader(WeightsReader):
    """A validated, memory-mapped safetensors file; one tensor at a time, no copies.

    Use :func:`open_safetensors` (or the class itself) as a context manager. Arrays already
    returned stay valid after :meth:`close`.

    Parameters
    ----------
    path:
        The file.

    Attributes
    ----------
    path:
        The path given.
    metadata:
        The ``__metadata__`` object (empty when absent).

    Examples
    --------
    >>> import os, tempfile, numpy as np
    >>> p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> save_safetensors({"w": np.arange(3, dtype=np.float32), "b": (np.array([16256],
    ...                   np.uint16), "BF16")}, p, metadata={"format": "pt"})
    >>> with SafetensorsReader(p) as r:
    ...     print(r.keys(), r.info("b").dtype, r.get("b"), r.values("b"), r.metadata)
    ['b', 'w'] BF16 (array([16256], dtype=uint16), 'BF16') [1.] {'format': 'pt'}
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._mm: mmap.mmap | None = None
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(_HEADER_SIZE.size)
            if len(prefix) == _HEADER_SIZE.size:  # the header, at most one byte over the limit
                prefix += f.read(min(_HEADER_SIZE.unpack(prefix)[0], MAX_HEADER_SIZE + 1))
            self.metadata, entries = parse_header(prefix, size, self.path)
            # an empty data area cannot be mapped (nor an empty file): map the whole file,
            # which is never empty here
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._size = size
        self._entries = self._names = {e.name: e for e in entries}

    # -- mapping-like access (names: WeightsReader) --------------------------------------
    def entries(self) -> list[TensorEntry]:
        """Every tensor's entry, in data (file offset) order."""
        return sorted(self._entries.values(), key=lambda e: e.offset)

    def info(self, name: str) -> TensorEntry:
        """The header entry of ``name`` (KeyError if absent)."""
        return self._entries[name]

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            raise ValueError(f"{self.path}: the reader is closed")
        return self._mm

    def raw(self, name: str) -> memoryview:
        """The tensor's data bytes, a read-only view of the map."""
        e = self._entries[name]
        return memoryview(self._map())[e.offset : e.offset + e.nbytes]

    def get(self, name: str) -> tuple[np.ndarray, str]:
        """Return ``(storage array, dtype name)``: a read-only view, BF16/F8 as raw bits."""
        e = self._entries[name]
        sdt = _dt.storage_dtype(e.dtype)
        if e.numel == 0:  # (frombuffer cannot view zero bytes at the end of the map)
            empty = np.empty(e.shape, sdt)
            empty.flags.writeable = False  # like every other tensor of the file
            return empty, e.dtype
        arr = np.frombuffer(self._map(), dtype=sdt, count=e.numel, offset=e.offset)
        return arr.reshape(e.shape), e.dtype

    def values(self, name: str) -> np.ndarray:
        """Return the tensor's numeric values: a view, or float32 for BF16/F8 (exact)."""
        arr, dtype = self.get(name)
        return _dt.to_numpy_values(arr, dtype)

    def release(self, name: str | None = None) -> None:
        """Drop the pages of ``name`` (or of the whole file) from resident memory.

        The file is read-only, so the data is read again from the page cache or the disk if
        it is used after this; nothing returned becomes invalid. A no-op where the platform
        has no ``madvise(MADV_DONTNEED)``.
        """
        mm = self._mm
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if mm is None or advice is None or not hasattr(mm, "madvise"):
            return
        if name is None:
            start, length = 0, self._size
        else:
            e = self._entries[name]
            start = e.offset - e.offset % mmap.PAGESIZE  # madvise wants a page-aligned start
            length = e.offset + e.nbytes - start
        if length > 0:
            with contextlib.suppress(OSError, ValueError):
                mm.madvise(advice, start, length)

    # -- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Release the file; arrays already returned keep the map alive until they go."""
        mm, self._mm = self._mm, None
        if mm is not None:
            with contextlib.suppress(BufferError):
                mm.close()

    def __repr__(self) -> str:
        return f"SafetensorsReader({self.path!r}, {len(self)} tensors)"


def open_safetensors(path: str | os.PathLike) -> SafetensorsReader:
    """Open and validate a safetensors file; see :class:`SafetensorsReader`.

    >>> import os, tempfile, numpy as np
    >>> p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> save_safetensors({"w": np.ones((2, 2), np.float16)}, p)
    >>> with open_safetensors(p) as r:
    ...     r.get("w")[0].shape
    (2, 2)
    """
    return SafetensorsReader(path)


def _layout(tensors: Iterable[tuple[str, str, Sequence[int]]]) -> list[tuple[str, str, tuple]]:
    """Check the declared tensors; return them in data order (largest items first)."""
    out: list[tuple[str, str, tuple[int, ...]]] = []
    seen: set[str] = set()
    for name, dtype, shape in tensors:
        if not isinstance(name, str):
            raise TypeError(f"tensor names are str, got {type(name).__name__}")
        if name == "__metadata__" or name in seen:
            raise EncodeError(f"the name {name!r} is reserved or repeated", tensor=name)
        seen.add(name)
        if dtype not in ITEMSIZE:
            raise EncodeError(f"unknown dtype {dtype!r}; known: {sorted(ITEMSIZE)}", tensor=name)
        dims = tuple(int(d) for d in shape)
        if any(d < 0 for d in dims):
            raise EncodeError(f"shape {dims} has a negative dimension", tensor=name)
        out.append((name, dtype, dims))
    # as the safetensors library does: by dtype (largest items first), then name, so that
    # every tensor of a file mapped at a page boundary is aligned for its dtype
    out.sort(key=lambda t: (-_DTYPE_RANK[t[1]], t[0]))
    return out


class SafetensorsWriter:
    """Write a safetensors file as a stream: the header first, then each tensor's data.

    The header is computed from the declared names, dtypes and shapes, so nothing has to be
    held: write each tensor (in one or more parts) in :attr:`order`, then :meth:`close`,
    which checks that every byte was written. The file object need not seek.

    Parameters
    ----------
    fileobj:
        A binary file object opened for writing.
    tensors:
        ``(name, dtype, shape)`` of every tensor; ``dtype`` in safetensors spelling.
    metadata:
        ``__metadata__``: a mapping of strings to strings, or None.

    Examples
    --------
    >>> import io, numpy as np
    >>> buf = io.BytesIO()
    >>> with SafetensorsWriter(buf, [("w", "F32", (4,)), ("n", "I8", (2,))]) as w:
    ...     w.order
    ...     w.write("w", np.zeros(2, np.float32))  # in parts: the first two elements
    ...     w.write("w", np.ones(2, np.float32))
    ...     w.write("n", np.array([1, 2], np.int8))
    ['w', 'n']
    >>> import safetensors.numpy
    >>> safetensors.numpy.load(buf.getvalue())["w"]
    array([0., 0., 1., 1.], dtype=float32)
    """

    def __init__(self, fileobj: BinaryIO, tensors: Iterable[tuple[str, str, Sequence[int]]],
                 *, metadata: Mapping[str, str] | None = None) -> None:
        layout = _layout(tensors)
        header: dict[str, Any] = {}
        if metadata:
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
                raise EncodeError("safetensors metadata must map strings to strings")
            header["__metadata__"] = dict(metadata)
        offset = 0
        self._sizes: dict[str, int] = {}
        for name, dtype, shape in layout:
            nbytes = math.prod(shape) * ITEMSIZE[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._sizes[name] = nbytes
            offset += nbytes
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        text += b" " * (-len(text) % 8)  # 8-aligned data start, as the library pads
        if len(text) > MAX_HEADER_SIZE:
            raise EncodeError(f"the header is {len(text)} bytes; safetensors allows "
                              f"{MAX_HEADER_SIZE}")
        self._f = fileobj
        self._dtypes = {name: dtype for name, dtype, _ in layout}
        self.order: list[str] = [name for name, _, _ in layout]  #: the order data must come in
        self._next = 0  # index in order of the tensor being written
        self._done = 0  # bytes of it written so far
        self._closed = False
        self._f.write(_HEADER_SIZE.pack(len(text)) + text)

    def _advance(self, to: str | None = None) -> None:
        """Move past the complete tensors (zero-size ones included) up to ``to``."""
        while (self._next < len(self.order) and self.order[self._next] != to
               and self._done == self._sizes[self.order[self._next]]):
            self._next += 1
            self._done = 0

    def write(self, name: str, data: Any) -> None:
        """Append data of tensor ``name``: the whole tensor, or its next part in C order.

        ``data`` is a numpy array or torch tensor of the declared dtype (any shape: only its
        elements in C order count); BF16/F8 also as a raw ``uint16``/``uint8`` numpy array.
        """
        if self._closed:
            raise ValueError("the writer is closed")
        self._advance(name)
        if self._next >= len(self.order) or name != self.order[self._next]:
            expected = self.order[self._next] if self._next < len(self.order) else "nothing"
            raise EncodeError(f"data comes in the order of SafetensorsWriter.order; expected "
                              f"{expected!r}", tensor=name)
        try:
            arr, _ = _dt.to_storage(data, self._dtypes[name])
        except EncodeError as exc:
            raise EncodeError(exc.message, tensor=name) from None
        raw = arr.reshape(-1).view(np.uint8)
        if self._done + raw.size > self._sizes[name]:
            raise EncodeError(f"{self._done + raw.size} bytes written, the tensor has "
                              f"{self._sizes[name]}", tensor=name)
        self._f.write(raw.data)
        self._done += raw.size

    def close(self) -> None:
        """Check that every tensor is complete. Idempotent."""
        if self._closed:
            return
        self._advance()
        if self._next < len(self.order):
            name = self.order[self._next]
            raise EncodeError(f"only {self._done} of {self._sizes[name]} bytes written",
                              tensor=name)
        self._closed = True

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is None:
            self.close()


def save_safetensors(tensors: Mapping[str, Any], path: str | os.PathLike, *,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` to a safetensors file atomically (temporary file, then rename).

    Values are numpy arrays, torch tensors, or ``(storage array, dtype name)`` pairs for data
    numpy cannot type (``(uint16 bits, "BF16")``). Non-contiguous arrays are fine.

    >>> import os, tempfile, numpy as np
    >>> p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> save_safetensors({"t": np.arange(6.0).reshape(2, 3).T}, p)  # a transposed view
    >>> open_safetensors(p).values("t").tolist()
    [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
    """
    from .fsio import atomic_write

    prepared: dict[str, tuple[np.ndarray, str]] = {}
    for name, value in tensors.items():
        try:
            if isinstance(value, tuple):
                prepared[name] = _dt.to_storage(value[0], value[1])
            else:
                prepared[name] = _dt.to_storage(value)
        except EncodeError as exc:
            raise EncodeError(exc.message, tensor=name) from None

    def write(f: BinaryIO) -> None:
        with SafetensorsWriter(f, [(n, d, a.shape) for n, (a, d) in prepared.items()],
                               metadata=metadata) as w:
            for name in w.order:
                w.write(name, prepared[name][0])

    atomic_write(path, write)
