"""The file layout of spec 5: the only module that knows where things sit in a file.

Layout (spec 4)::

    File_Header | Metadata | Header_Checksum | pad | Record* | Index | Trailer

Each record is a self-describing header followed by an aligned data area holding its blocks,
so a reader can decode a pipe record by record (:func:`iter_stream`); the index and the
fixed-size trailer at the end give random access (:func:`open_file`).
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import math
import mmap
import os
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

try:  # POSIX: a lock tells a stale temporary file from one being written (atomic_write)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

from . import _spec as S
from . import dtypes as _dt
from ._alloc import fresh_zeros, writing
from ._io import BufferSource, Source, StreamSource, encode_varint
from .codecs import ZSTD, BlockContext, ZstdStage, get_codec
from .codecs._bits import scatter_signed
from .codecs.bitmask import BitmaskCodec
from .codecs.dense import DenseCodec
from .codecs.golomb import GolombCodec
from .codecs.scale import ScaleCodec
from .codecs.signs import SignsCodec
from .errors import (
    BadMagicError,
    ChecksumError,
    CorruptDataError,
    EncodeError,
    LimitExceededError,
    TruncatedError,
    UnsupportedFeatureError,
    UnsupportedVersionError,
)
from .tensor import TernaryTensor, dense_output, dense_values

__all__ = [
    "BlockInfo",
    "CompeftReader",
    "FileInfo",
    "TensorInfo",
    "Writer",
    "dumps",
    "inspect",
    "iter_stream",
    "load_file",
    "loads",
    "open_file",
    "save_file",
]

POSITIONS_CHOICES = ("auto", "bitmask", "golomb")
_BITMASK, _GOLOMB, _SIGNS, _SCALE, _DENSE = (
    BitmaskCodec(), GolombCodec(), SignsCodec(), ScaleCodec(), DenseCodec()
)
_MAX_RECORD_HEADER = 1 << 16  # spec 9.2: a record header above 64 KiB is rejected


def _crc(*parts: bytes | memoryview) -> int:
    """CRC-32 (ISO-HDLC, as zlib) over the concatenation of ``parts`` (spec 2.4)."""
    value = 0
    for p in parts:
        value = zlib.crc32(p, value)
    return value


def _align(offset: int, alignment: int) -> int:
    return -(-offset // alignment) * alignment


# ---------------------------------------------------------------------------------------------
# Info records
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockInfo:
    """One block of a record, as described by its Block_Descriptor (spec 5.5)."""

    codec: str  #: "bitmask", "golomb", "signs", "scale", "dense" (or "0x.." when unknown)
    block_type: int
    stage: str  #: "none" or "zstd"
    param: int
    stored_size: int
    decoded_size: int
    offset: int  #: absolute offset of the stored bytes


@dataclass(frozen=True)
class TensorInfo:
    """What a record header says about one tensor, without decoding its data."""

    name: str
    kind: str  #: "ternary" or "dense"
    dtype: str
    shape: tuple[int, ...]
    nnz: int | None
    blocks: tuple[BlockInfo, ...]
    offset: int  #: absolute offset of the record
    record_size: int  #: header plus data area, in bytes

    @property
    def numel(self) -> int:
        """Number of elements of the dense tensor."""
        return math.prod(self.shape)

    @property
    def density(self) -> float | None:
        """``nnz / numel`` for a ternary record."""
        if self.nnz is None:
            return None
        return self.nnz / self.numel if self.numel else 0.0

    @property
    def dense_size(self) -> int:
        """Bytes the tensor takes dense, in its dtype."""
        return self.numel * S.ITEMSIZE[self.dtype]

    @property
    def bits_per_element(self) -> float:
        """Record bytes (header, blocks and padding) times 8 over ``numel``."""
        return 8 * self.record_size / self.numel if self.numel else 0.0

    @property
    def codecs(self) -> str:
        """The blocks as ``codec[+zstd]`` joined by commas, e.g. ``"golomb,signs,scale"``."""
        return ",".join(b.codec + ("+zstd" if b.stage == "zstd" else "") for b in self.blocks)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict."""
        return {
            "name": self.name, "kind": self.kind, "dtype": self.dtype, "shape": list(self.shape),
            "numel": self.numel, "nnz": self.nnz, "density": self.density,
            "record_bytes": self.record_size, "dense_bytes": self.dense_size,
            "bits_per_element": self.bits_per_element, "codecs": self.codecs,
            "blocks": [b.__dict__ for b in self.blocks],
        }


@dataclass(frozen=True)
class FileInfo:
    """The header, metadata and per-tensor layout of a file (see :func:`inspect`)."""

    version: tuple[int, int]
    alignment: int
    metadata: dict[str, Any]
    file_size: int
    tensors: tuple[TensorInfo, ...]

    @property
    def dense_size(self) -> int:
        """Bytes of all tensors stored dense in their dtypes."""
        return sum(t.dense_size for t in self.tensors)

    @property
    def numel(self) -> int:
        """Elements of all tensors."""
        return sum(t.numel for t in self.tensors)

    @property
    def ratio(self) -> float:
        """Dense size over file size."""
        return self.dense_size / self.file_size if self.file_size else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict."""
        return {
            "version": f"{self.version[0]}.{self.version[1]}", "alignment": self.alignment,
            "metadata": self.metadata, "file_bytes": self.file_size,
            "dense_bytes": self.dense_size, "numel": self.numel, "ratio": self.ratio,
            "bits_per_element": 8 * self.file_size / self.numel if self.numel else 0.0,
            "tensors": [t.to_dict() for t in self.tensors],
        }


# ---------------------------------------------------------------------------------------------
# Metadata (spec 5.2)
# ---------------------------------------------------------------------------------------------


def _too_deep(obj: Any, limit: int) -> bool:
    """Return True if a JSON value nests deeper than ``limit`` (a scalar is depth 0).

    Iterative, and it stops at the first container past the limit: a recursive walk raised
    RecursionError (not a CompeftError) on metadata a few hundred levels deep that json.loads
    still accepts, and never returned on a self-referencing dict given to the writer.
    """
    stack = [(obj, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth >= limit:
                return True
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children
                         if isinstance(child, (dict, list)))
    return False


def _check_reserved(meta: Mapping[str, Any], error: type[Exception]) -> None:
    """Enforce the types of the reserved keys (spec 5.2.1)."""
    def bad(key: str, want: str) -> Exception:
        return error(f"metadata key {key!r} must be {want}")

    if S.META_PRODUCER in meta and not isinstance(meta[S.META_PRODUCER], str):
        raise bad(S.META_PRODUCER, "a string")
    if S.META_COMPRESSION in meta and not isinstance(meta[S.META_COMPRESSION], dict):
        raise bad(S.META_COMPRESSION, "an object")
    if S.META_BASE in meta:
        base = meta[S.META_BASE]
        if not isinstance(base, dict):
            raise bad(S.META_BASE, "an object")
        for key in ("name", "revision"):
            if key in base and not isinstance(base[key], str):
                raise bad(f"{S.META_BASE}.{key}", "a string")
        hashes = base.get("hashes", {})
        if not isinstance(hashes, dict) or not all(isinstance(v, str) for v in hashes.values()):
            raise bad(f"{S.META_BASE}.hashes", "an object of strings")


def encode_metadata(metadata: Mapping[str, Any] | None) -> bytes:
    """Return the canonical JSON bytes of ``metadata`` (spec 5.2): sorted, compact, UTF-8."""
    if not metadata:
        return b""
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
        raise EncodeError("metadata must be a mapping with string keys")
    _check_reserved(metadata, EncodeError)
    if _too_deep(dict(metadata), S.DEFAULT_LIMITS.max_metadata_depth):
        raise EncodeError(f"metadata nests deeper than {S.DEFAULT_LIMITS.max_metadata_depth}")
    try:
        text = json.dumps(dict(metadata), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise EncodeError(f"metadata is not JSON-serialisable: {exc}") from None
    try:
        data = text.encode("utf-8", "strict")
    except UnicodeEncodeError as exc:  # a lone surrogate, e.g. read back from "\ud800"
        raise EncodeError(f"metadata is not valid Unicode: {exc}") from None
    if len(data) > S.DEFAULT_LIMITS.max_metadata_size:
        raise EncodeError(f"metadata is {len(data)} bytes; limit "
                          f"{S.DEFAULT_LIMITS.max_metadata_size}")
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key {dup!r}")
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 would sneak infinity past the NaN/Infinity rule
        raise ValueError(f"number {text} is out of range")
    return value


def decode_metadata(data: memoryview, offset: int, limits: S.ReadLimits) -> dict[str, Any]:
    """Parse and validate the Metadata bytes (spec 5.2)."""
    if not len(data):
        return {}
    try:
        text = bytes(data).decode("utf-8", "strict")
        meta = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant,
                          parse_float=_finite_float)
    except RecursionError:
        raise LimitExceededError(f"metadata nests deeper than {limits.max_metadata_depth}",
                                 offset=offset) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptDataError(f"metadata is not valid JSON: {exc}", offset=offset) from None
    if not isinstance(meta, dict):
        raise CorruptDataError(f"metadata must be a JSON object, got {type(meta).__name__}",
                               offset=offset)
    if _too_deep(meta, limits.max_metadata_depth):
        raise LimitExceededError(f"metadata nests deeper than {limits.max_metadata_depth}",
                                 offset=offset)
    _check_reserved(meta, lambda m: CorruptDataError(m, offset=offset))
    return meta


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _descriptor(block_type: int, stage: int, param: int, stored: int, decoded: int) -> bytes:
    out = bytes([block_type, stage]) + encode_varint(param) + encode_varint(stored)
    if stage != S.STAGE_NONE:
        out += encode_varint(decoded)
    return out


def _maybe_zstd(payload: bytes, level: int | None, stage: ZstdStage = ZSTD,
                ) -> tuple[int, bytes]:
    """Return ``(stage, stored)``: zstd only where it makes the block smaller (spec 7)."""
    if level is None or len(payload) < 64:
        return S.STAGE_NONE, payload
    frame = stage.encode(payload, level)
    if len(frame) < len(payload):
        return S.STAGE_ZSTD, frame
    return S.STAGE_NONE, payload


# The zstd stage of a large block runs on one worker thread while the writer's thread encodes
# the next block: zstd and most numpy loops release the GIL, so the two share the cores. The
# output is the same bytes (single-threaded zstd, same parameters); zstd's own multi-threaded
# mode would change them. The worker has its own ZstdStage: zstd compressors are not
# thread-safe.
_ZSTD_WORKER = ZstdStage()
_BACKGROUND_MIN = 1 << 20  # smaller payloads are compressed inline: the hand-off costs more
_pool: tuple[int, ThreadPoolExecutor] | None = None
_pool_lock = threading.Lock()


def _zstd_pool() -> ThreadPoolExecutor:
    """The worker, created on first use and again in a forked child (whose copy has no thread)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="compeft-zstd"))
        return _pool[1]


def _zstd_later(payload: bytes, level: int | None) -> Callable[[], tuple[int, bytes]]:
    """Start :func:`_maybe_zstd` of ``payload``; return a function that waits for its result."""
    if level is None or len(payload) < _BACKGROUND_MIN:
        result = _maybe_zstd(payload, level)
        return lambda: result
    return _zstd_pool().submit(_maybe_zstd, payload, level, _ZSTD_WORKER).result


_Block = tuple[int, int, int, bytes, int]  # block type, stage, param, stored, decoded size


def _encode_positions(t: TernaryTensor, ctx: BlockContext, positions: str,
                      level: int | None) -> Callable[[], _Block]:
    """Start encoding the positions block; return a function that finishes it.

    ``auto`` keeps the smallest raw candidate, or with zstd the smallest of both candidates
    each through zstd where that is smaller (the smaller raw one wins a tie). The bitmask is
    encoded first so that its zstd stage, the slow one, runs while the golomb stream is built.
    """
    if positions == "golomb" or t.nnz == 0:
        codecs = [_GOLOMB]  # spec 6.2.2: an empty tensor's positions are an empty golomb block
    elif positions == "bitmask":
        codecs = [_BITMASK]
    else:
        codecs = []
    jobs = []
    if codecs:
        param, payload = codecs[0].encode(t.indices, ctx)
        jobs.append((codecs[0], param, payload, _zstd_later(payload, level)))
    elif level is None:  # auto without zstd: only the smaller raw candidate is built
        g_param, g_payload = _GOLOMB.encode(t.indices, ctx)
        if _BITMASK.encoded_size(t.indices, ctx)[1] <= len(g_payload):
            b_param, b_payload = _BITMASK.encode(t.indices, ctx)
            jobs.append((_BITMASK, b_param, b_payload, _zstd_later(b_payload, None)))
        else:
            jobs.append((_GOLOMB, g_param, g_payload, _zstd_later(g_payload, None)))
    else:
        b_param, b_payload = _BITMASK.encode(t.indices, ctx)
        b_job = (_BITMASK, b_param, b_payload, _zstd_later(b_payload, level))
        g_param, g_payload = _GOLOMB.encode(t.indices, ctx)
        # golomb streams are near-incompressible, zstd's fast path: inline
        g_stage = _maybe_zstd(g_payload, level)
        g_job = (_GOLOMB, g_param, g_payload, lambda: g_stage)
        jobs = [b_job, g_job] if len(b_payload) <= len(g_payload) else [g_job, b_job]

    def finish() -> _Block:
        best = None
        for codec, param, payload, wait in jobs:
            stage, stored = wait()
            if best is None or len(stored) < len(best[3]):
                best = (codec.block_type, stage, param, stored, len(payload))
        assert best is not None
        return best

    return finish


class Writer:
    """Write a compeft file record by record (spec 4); at most one record in memory.

    Names must arrive in strictly increasing order of their UTF-8 bytes (spec 5.3), which
    :func:`dumps` and :func:`save_file` arrange by sorting.

    Parameters
    ----------
    fileobj:
        A binary file object opened for writing; it need not be seekable.
    metadata:
        A JSON-serialisable mapping (spec 5.2).
    positions:
        ``"auto"`` (the smallest per tensor), ``"golomb"`` or ``"bitmask"``.
    zstd_level:
        zstd level tried on every block (kept where smaller); ``None`` disables zstd.
    alignment:
        Block alignment in bytes, a power of two from 1 to 4096.

    Examples
    --------
    >>> import io
    >>> buf = io.BytesIO()
    >>> with Writer(buf) as w:
    ...     w.write("a", TernaryTensor((4,), [1], [True], 0.5))
    >>> len(buf.getvalue())
    101
    """

    def __init__(self, fileobj: BinaryIO, *, metadata: Mapping[str, Any] | None = None,
                 positions: str = "auto", zstd_level: int | None = S.DEFAULT_ZSTD_LEVEL,
                 alignment: int = 1 << S.DEFAULT_ALIGNMENT_LOG2) -> None:
        if positions not in POSITIONS_CHOICES:
            raise EncodeError(f"positions must be one of {POSITIONS_CHOICES}, got {positions!r}")
        if zstd_level is not None and not (isinstance(zstd_level, int) and -7 <= zstd_level <= 22):
            raise EncodeError(f"zstd level must be an integer in [-7, 22], got {zstd_level!r}")
        log2 = alignment.bit_length() - 1 if isinstance(alignment, int) and alignment > 0 else -1
        if not (S.MIN_ALIGNMENT_LOG2 <= log2 <= S.MAX_ALIGNMENT_LOG2 and alignment == 1 << log2):
            raise EncodeError(f"alignment must be a power of two in [1, 4096], got {alignment!r}")
        self._f = fileobj
        self._positions = positions
        self._level = zstd_level
        self._alignment = alignment
        self._names: list[bytes] = []
        self._offsets: list[int] = []
        self._cost = 0  # decode-budget charge of the records written so far (spec 9.3)
        self._closed = False
        meta = encode_metadata(metadata)
        header = S.FILE_HEADER.pack(S.MAGIC, S.VERSION_MAJOR, S.VERSION_MINOR, log2, 0, len(meta))
        self._pos = 0
        self._emit(header, meta, S.CHECKSUM.pack(_crc(header, meta)))
        self._pad()

    # -- low level --
    def _emit(self, *parts: bytes) -> None:
        for p in parts:
            self._f.write(p)
            self._pos += len(p)

    def _pad(self) -> None:
        n = _align(self._pos, self._alignment) - self._pos
        if n:
            self._emit(bytes(n))

    # -- records --
    def write(self, name: str, value: Any, *, dtype: str | None = None) -> None:
        """Append one tensor: a :class:`TernaryTensor`, or a numpy array / torch tensor (dense).

        ``dtype`` declares the safetensors dtype of a dense numpy storage array whose numpy
        dtype cannot say it: raw ``uint16`` bits as ``"BF16"``, ``uint8`` as ``"F8_E4M3"``.
        """
        if self._closed:
            raise ValueError("writer is closed")
        if not isinstance(name, str):
            raise TypeError(f"tensor names are str, got {type(name).__name__}")
        try:
            bname = name.encode("utf-8", "strict")
        except UnicodeEncodeError:
            raise EncodeError("name is not valid UTF-8", tensor=name) from None
        if not bname or len(bname) > S.DEFAULT_LIMITS.max_name_length or "\x00" in name:
            raise EncodeError(f"names must be 1..{S.DEFAULT_LIMITS.max_name_length} UTF-8 bytes "
                              "without NUL", tensor=name)
        if self._names and bname <= self._names[-1]:
            raise EncodeError(f"names must be unique and written in increasing order; "
                              f"{name!r} follows {self._names[-1].decode()!r}", tensor=name)
        if isinstance(value, TernaryTensor):
            kind, body_tail, blocks = self._ternary(name, value, self._level)
            dtype, shape, nnz = value.dtype, value.shape, value.nnz
        else:
            try:
                storage, dtype = _dt.to_storage(value, dtype)
            except EncodeError as exc:
                raise EncodeError(exc.message, tensor=name) from None
            shape, nnz = storage.shape, 0
            ctx = BlockContext(name, storage.size, 0, dtype, shape)
            param, payload = _DENSE.encode(storage, ctx)
            stage, stored = _maybe_zstd(payload, self._level)
            kind, body_tail = S.KIND_DENSE, b""
            blocks = [(S.BLOCK_DENSE, stage, param, stored, len(payload))]
        # spec 9.3: the file must decode within the default budget, max(64 MiB, 64 x size),
        # whoever reads it. Only zstd can break that (data that compress more than 64-fold,
        # such as all-zero tensors; without zstd a record costs under 41x its size), so a
        # record that would overdraw the budget of the file written so far goes without zstd.
        numel = math.prod(shape)
        cost = _record_cost(kind, dtype, numel, nnz, blocks)
        end = self._pos + sum(_align(len(b[3]), self._alignment) for b in blocks)
        if self._cost + cost > max(S.DECODE_BUDGET_FLOOR, S.DECODE_BUDGET_RATIO * end):
            if kind == S.KIND_TERNARY:
                blocks = self._ternary(name, value, None)[2]
            else:
                blocks = [(S.BLOCK_DENSE, S.STAGE_NONE, param, payload, len(payload))]
            cost = _record_cost(kind, dtype, numel, nnz, blocks)
        self._cost += cost
        if len(shape) > S.DEFAULT_LIMITS.max_ndim:
            raise EncodeError(f"{len(shape)} dimensions; limit {S.DEFAULT_LIMITS.max_ndim}",
                              tensor=name)
        body = (encode_varint(len(bname)) + bname + bytes([S.DTYPE_CODES[dtype], len(shape)])
                + b"".join(encode_varint(d) for d in shape) + body_tail + bytes([len(blocks)])
                + b"".join(_descriptor(t, s, p, len(st), d) for t, s, p, st, d in blocks))
        # spec 5.4: the data area starts at the next aligned offset after the header and
        # holds each block followed by zero padding to the alignment
        # (the blocks are emitted as they are, not joined: a dense record may be large)
        parts: list[bytes] = []
        for *_, stored, _d in blocks:
            parts += [stored, bytes(_align(len(stored), self._alignment) - len(stored))]
        data_size = sum(len(p) for p in parts)
        header_len = len(body) + 8  # Data_Checksum and Header_Checksum follow the body
        head = (bytes([kind]) + encode_varint(header_len) + encode_varint(data_size) + body
                + S.CHECKSUM.pack(_crc(*parts)))
        self._names.append(bname)
        self._offsets.append(self._pos)
        self._emit(head, S.CHECKSUM.pack(_crc(head)))
        self._pad()
        self._emit(*parts)

    def _ternary(self, name: str, t: TernaryTensor, level: int | None
                 ) -> tuple[int, bytes, list]:
        ctx = BlockContext(name, t.numel, t.nnz, t.dtype, t.shape)
        positions = _encode_positions(t, ctx, self._positions, level)
        param, payload = _SIGNS.encode(t.signs, ctx)  # meanwhile a worker may run zstd
        stage, stored = _maybe_zstd(payload, level)
        blocks = [positions(), (S.BLOCK_SIGNS, stage, param, stored, len(payload))]
        param, payload = _SCALE.encode(t.scale, ctx)
        blocks.append((S.BLOCK_SCALE, S.STAGE_NONE, param, payload, len(payload)))
        return S.KIND_TERNARY, encode_varint(t.nnz), blocks

    def close(self) -> None:
        """Write the index and the trailer (spec 5.6, 5.7). Idempotent."""
        if self._closed:
            return
        self._closed = True
        index_offset = self._pos
        index = bytearray([S.KIND_END]) + encode_varint(len(self._names))
        for bname, off in zip(self._names, self._offsets, strict=False):
            index += encode_varint(len(bname)) + bname + encode_varint(off)
        self._emit(bytes(index), S.TRAILER.pack(index_offset, _crc(index), S.TAIL_MAGIC))

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            self.close()


def dumps(tensors: Mapping[str, Any], *, metadata: Mapping[str, Any] | None = None,
          positions: str = "auto", zstd_level: int | None = S.DEFAULT_ZSTD_LEVEL,
          alignment: int = 1 << S.DEFAULT_ALIGNMENT_LOG2) -> bytes:
    """Return the bytes of a compeft file holding ``tensors`` (written in sorted name order).

    Values are :class:`TernaryTensor` (ternary records) or numpy arrays / torch tensors
    (dense records, stored losslessly). The same input and options always give the same bytes.

    >>> data = dumps({"w": TernaryTensor((2, 2), [3], [False], 1.0)})
    >>> loads(data)["w"].to_numpy().tolist()
    [[0.0, 0.0], [0.0, 1.0]]
    """
    buf = io.BytesIO()
    with Writer(buf, metadata=metadata, positions=positions, zstd_level=zstd_level,
                alignment=alignment) as w:
        for name in _sorted_names(tensors):
            w.write(name, tensors[name])
    return buf.getvalue()


def _sorted_names(tensors: Mapping[str, Any]) -> list[str]:
    for name in tensors:
        if not isinstance(name, str):
            raise TypeError(f"tensor names are str, got {type(name).__name__}")
    try:
        return sorted(tensors, key=lambda n: n.encode("utf-8"))
    except UnicodeEncodeError:
        raise EncodeError("a tensor name is not valid UTF-8") from None


def atomic_write(path: str | os.PathLike, write: Any) -> None:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, then rename it over ``path``.

    A crash leaves either the old file or the new one, never a mix: the temporary file
    ``.{name}.<random>.tmp`` (hidden: a dot name) is flushed and fsynced before the rename,
    and the directory after it. On an exception the temporary file is removed.

    A writer killed outright (SIGKILL, power loss) cannot remove its temporary file, so the
    next successful ``atomic_write`` to the same ``path`` removes the stale ones: siblings
    named ``.{name}.*.tmp`` last modified before this write started and, where ``fcntl``
    exists, not locked. Every writer holds an exclusive ``flock`` on its temporary file while
    it writes and the kernel drops it when the writer dies, so the temporary file of a writer
    that is still running (even a stalled one) is left alone.
    """
    path = Path(path)
    started = time.time()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "in use": see _remove_stale_temps
        mask = os.umask(0)  # mkstemp makes a private (0600) file; give the usual mode
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            if fcntl is not None:
                os.replace(tmp, path)  # before close: the lock holds until the name is gone
        if fcntl is None:
            os.replace(tmp, path)  # Windows cannot rename a file that is still open
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    _remove_stale_temps(path, started)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_temps(path: Path, before: float) -> None:
    """Remove ``.{name}.*.tmp`` beside ``path`` left by dead writers (see :func:`atomic_write`)."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):  # gone already, or not ours to remove
            if tmp.stat().st_mtime >= before:
                continue  # a writer that started after us: certainly alive
            fd = os.open(tmp, os.O_RDONLY)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a writer lives
                tmp.unlink()
            finally:
                os.close(fd)


def save_file(tensors: Mapping[str, Any], path: str | os.PathLike, *,
              metadata: Mapping[str, Any] | None = None, positions: str = "auto",
              zstd_level: int | None = S.DEFAULT_ZSTD_LEVEL,
              alignment: int = 1 << S.DEFAULT_ALIGNMENT_LOG2) -> None:
    """Write ``tensors`` to ``path`` atomically (temporary file, then rename).

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "x.compeft")
    >>> save_file({"w": TernaryTensor((3,), [0], [True], 2.0)}, p)
    >>> load_file(p)["w"].to_numpy().tolist()
    [-2.0, 0.0, 0.0]
    """
    names = _sorted_names(tensors)

    def write(f: BinaryIO) -> None:
        with Writer(f, metadata=metadata, positions=positions, zstd_level=zstd_level,
                    alignment=alignment) as w:
            for name in names:
                w.write(name, tensors[name])

    atomic_write(path, write)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _positions_cost(decoded_size: int, nnz: int) -> int:
    """Budget charge of decoding a positions payload (spec 9.3): bits, positions, signs."""
    return 8 * decoded_size + 9 * nnz


def _widening_cost(dtype: str, numel: int, framework: str) -> int:
    """Budget charge of presenting a dense record (spec 9.3): BF16/F8 widen, torch copies."""
    if framework == "torch":
        return S.ITEMSIZE[dtype] * numel
    return (8 if dtype == "BF16" else 4 if dtype.startswith("F8") else 0) * numel


def _record_cost(kind: int, dtype: str, numel: int, nnz: int, blocks: list) -> int:
    """What a numpy reader charges to its decode budget for a record (spec 9.3)."""
    cost = 0
    for btype, stage, _param, _stored, decoded in blocks:
        if stage != S.STAGE_NONE:
            cost += decoded
        if btype in (S.BLOCK_BITMASK, S.BLOCK_GOLOMB):
            cost += _positions_cost(decoded, nnz)
    if kind == S.KIND_DENSE:
        cost += _widening_cost(dtype, numel, "numpy")
    return cost


class _Budget:
    """Bytes a read call may still allocate for decoded data (spec 9.2, 11)."""

    def __init__(self, limits: S.ReadLimits, file_size: int | None) -> None:
        self.limits = limits
        self.fixed = limits.max_decoded_bytes
        self.used = 0
        self.file_size = file_size

    def charge(self, n: int, ctx: BlockContext, seen: int) -> None:
        size = self.file_size if self.file_size is not None else seen
        limit = self.fixed if self.fixed is not None else max(
            S.DECODE_BUDGET_FLOOR, S.DECODE_BUDGET_RATIO * size)
        self.used += n
        if self.used > limit:
            raise ctx.error(f"decoding needs {self.used} bytes, above the limit of {limit} "
                            "(raise ReadLimits.max_decoded_bytes)", LimitExceededError)


@dataclass
class _Header:
    version: tuple[int, int]
    alignment: int
    metadata: dict[str, Any]
    end: int  # offset of the first record (aligned)


def _read_file_header(src: Source, limits: S.ReadLimits) -> _Header:
    """Parse File_Header, Metadata and Header_Checksum (spec 5.1), and the padding after."""
    head = src.buf[: len(S.MAGIC)] if isinstance(src, BufferSource) else None
    try:
        raw = src.read(S.FILE_HEADER_SIZE, "file header")
    except TruncatedError:
        got = bytes(head) if head is not None else b""
        if head is not None and not S.MAGIC.startswith(got):
            raise BadMagicError(f"not a compeft file (magic {got!r})", offset=0) from None
        raise
    magic, major, minor, log2, flags, meta_size = S.FILE_HEADER.unpack(raw)
    if magic != S.MAGIC:  # spec 5.1
        raise BadMagicError(f"not a compeft file (magic {magic!r}, expected {S.MAGIC!r})",
                            offset=0)
    if major != S.VERSION_MAJOR:  # spec 10.1
        raise UnsupportedVersionError(
            f"format version {major}.{minor} is not supported; this reader reads "
            f"{S.VERSION_MAJOR}.x", offset=8)
    if not S.MIN_ALIGNMENT_LOG2 <= log2 <= S.MAX_ALIGNMENT_LOG2:
        raise CorruptDataError(f"Alignment_Log2 {log2} outside [0, {S.MAX_ALIGNMENT_LOG2}]",
                               offset=10)
    if flags:  # spec 5.1: every flag bit is reserved in 1.x
        raise CorruptDataError(f"reserved header flags must be zero (got 0x{flags:02x})", offset=11)
    if meta_size > limits.max_metadata_size:
        raise LimitExceededError(f"metadata is {meta_size} bytes; limit "
                                 f"{limits.max_metadata_size}", offset=12)
    meta_bytes = src.read(meta_size, "metadata")
    stored = S.CHECKSUM.unpack(src.read(S.CHECKSUM_SIZE, "header checksum"))[0]
    computed = _crc(raw, meta_bytes)
    if stored != computed:
        raise ChecksumError(f"header checksum mismatch: stored 0x{stored:08x}, computed "
                            f"0x{computed:08x}", offset=src.pos - 4)
    metadata = decode_metadata(meta_bytes, S.FILE_HEADER_SIZE, limits)
    alignment = 1 << log2
    pad_at = src.pos
    end = _align(pad_at, alignment)
    _check_zero(src.read(end - pad_at, "header padding"), pad_at, None, "header padding")
    return _Header((major, minor), alignment, metadata, end)


def _check_zero(data: memoryview, offset: int, tensor: str | None, what: str) -> None:
    """Padding bytes MUST be zero (spec 5.4)."""
    if any(data):
        i = next(i for i, b in enumerate(data) if b)
        raise CorruptDataError(f"{what}: padding byte is 0x{data[i]:02x}, must be 0x00",
                               tensor=tensor, offset=offset + i)


@dataclass
class _Record:
    kind: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    nnz: int | None
    blocks: list[tuple[int, int, int, int, int]]  # type, stage, param, stored, decoded
    data_crc: int
    offset: int
    header_end: int
    data_start: int
    data_size: int

    @property
    def end(self) -> int:
        """Offset just after the record's data area."""
        return self.data_start + self.data_size

    def info(self) -> TensorInfo:
        infos, cursor = [], self.data_start
        for btype, stage, param, stored, decoded in self.blocks:
            codec = _codec_name(btype)
            infos.append(BlockInfo(codec, btype, "zstd" if stage else "none", param, stored,
                                   decoded, cursor))
            cursor += stored + (-stored % self.alignment)
        kind = "ternary" if self.kind == S.KIND_TERNARY else "dense"
        return TensorInfo(self.name, kind, self.dtype, self.shape, self.nnz, tuple(infos),
                          self.offset, self.end - self.offset)

    alignment: int = 1


def _codec_name(btype: int) -> str:
    try:
        return get_codec(btype).name
    except UnsupportedFeatureError:
        return f"0x{btype:02x}"


def _read_name(src: Source, limits: S.ReadLimits, what: str) -> str:
    start = src.pos
    n = src.varint(f"{what} name length")
    if not 1 <= n <= limits.max_name_length:
        raise LimitExceededError(f"{what} name length {n} outside [1, {limits.max_name_length}]",
                                 offset=start)
    raw = bytes(src.read(n, f"{what} name"))
    try:
        name = raw.decode("utf-8", "strict")
    except UnicodeDecodeError:
        raise CorruptDataError(f"{what} name is not valid UTF-8: {raw[:40]!r}",
                               offset=start) from None
    if "\x00" in name:
        raise CorruptDataError(f"{what} name contains NUL: {name[:40]!r}", offset=start)
    return name


def _read_record_header(src: Source, kind: int, limits: S.ReadLimits, alignment: int) -> _Record:
    """Parse one record header after its Record_Kind byte (spec 5.3, 5.4, 5.5)."""
    offset = src.pos - 1
    header_len = src.varint("record header length")
    if not 8 <= header_len <= _MAX_RECORD_HEADER:
        raise LimitExceededError(f"record header length {header_len} outside [8, "
                                 f"{_MAX_RECORD_HEADER}]", offset=offset + 1)
    data_size_at = src.pos
    data_size = src.varint("record data size")
    # everything up to Header_Checksum is covered by it: check before trusting any field
    body_start = src.pos
    body = src.read(header_len - 4, "record header")
    stored = S.CHECKSUM.unpack(src.read(4, "record header checksum"))[0]
    prefix = bytes([kind]) + encode_varint(header_len) + encode_varint(data_size)
    computed = _crc(prefix, body)
    if stored != computed or body_start - offset != len(prefix):
        raise ChecksumError(f"record header checksum mismatch: stored 0x{stored:08x}, computed "
                            f"0x{computed:08x}", offset=src.pos - 4)
    header_end = src.pos
    data_start = _align(header_end, alignment)
    b = BufferSource(body[:-4], base=body_start)
    data_crc = S.CHECKSUM.unpack(body[-4:])[0]
    name = _read_name(b, limits, "tensor")
    b.tensor = name
    if kind not in (S.KIND_TERNARY, S.KIND_DENSE):
        return _Record(kind, name, "", (), None, [], data_crc, offset, header_end, data_start,
                       data_size, alignment)
    code = b.u8("dtype")
    if code not in S.DTYPES:
        raise CorruptDataError(f"unknown dtype code 0x{code:02x}", tensor=name, offset=b.pos - 1)
    dtype = S.DTYPES[code][0]
    if kind == S.KIND_TERNARY and dtype not in S.TERNARY_DTYPES:
        raise CorruptDataError(f"a ternary record cannot stand for {dtype}", tensor=name,
                               offset=b.pos - 1)
    ndim = b.u8("ndim")
    if ndim > limits.max_ndim:
        raise LimitExceededError(f"{ndim} dimensions; limit {limits.max_ndim}", tensor=name,
                                 offset=b.pos - 1)
    dims_at = b.pos
    shape = tuple(b.varint("dimension") for _ in range(ndim))
    numel = math.prod(shape)
    if numel > limits.max_numel:
        raise LimitExceededError(f"shape {list(shape)} has {numel} elements; limit "
                                 f"{limits.max_numel}", tensor=name, offset=dims_at)
    # an empty shape like (0, 2**62) has 0 elements, but no array library can make it
    extent = math.prod(d for d in shape if d)
    if extent > limits.max_numel:
        raise LimitExceededError(f"shape {list(shape)}: its nonzero dimensions multiply to "
                                 f"{extent}; limit {limits.max_numel}", tensor=name,
                                 offset=dims_at)
    nnz = None
    if kind == S.KIND_TERNARY:
        nnz_at = b.pos
        nnz = b.varint("nnz")
        if nnz > numel:
            raise CorruptDataError(f"nnz {nnz} exceeds numel {numel}", tensor=name, offset=nnz_at)
    count = b.u8("block count")
    blocks = []
    for _ in range(count):
        at = b.pos
        btype, stage = b.u8("block type"), b.u8("stage")
        param = b.varint("block param")
        stored_size = b.varint("stored size")
        if stage == S.STAGE_NONE:
            decoded = stored_size
        elif stage == S.STAGE_ZSTD:
            decoded = b.varint("decoded size")
        else:  # spec 7: a stage this reader does not know cannot be undone
            raise UnsupportedFeatureError(f"unknown stage 0x{stage:02x}", tensor=name,
                                          offset=at + 1)
        blocks.append((btype, stage, param, stored_size, decoded))
    if not b.at_end():
        raise CorruptDataError(f"{b.remaining} unexpected bytes at the end of the record header",
                               tensor=name, offset=b.pos)
    rec = _Record(kind, name, dtype, shape, nnz, blocks, data_crc, offset, header_end,
                  data_start, data_size, alignment)
    # spec 5.4: the data area is exactly the aligned blocks, nothing more
    expected = sum(_align(blk[3], alignment) for blk in blocks)
    if data_size != expected:
        raise CorruptDataError(f"data size {data_size} does not match the blocks' layout "
                               f"({expected})", tensor=name, offset=data_size_at)
    _check_block_set(rec)
    return rec


_ROLES = {S.BLOCK_BITMASK: "positions", S.BLOCK_GOLOMB: "positions", S.BLOCK_SIGNS: "signs",
          S.BLOCK_SCALE: "scale", S.BLOCK_DENSE: "dense"}


def _check_block_set(rec: _Record) -> None:
    """Spec 5.5: which known blocks a record holds, in what order; unknown ones by their bit."""
    roles = []
    for btype, *_ in rec.blocks:
        if btype in _ROLES:
            roles.append(_ROLES[btype])
        elif not btype & S.BLOCK_OPTIONAL_BIT:
            raise UnsupportedFeatureError(f"unknown required block type 0x{btype:02x}",
                                          tensor=rec.name, offset=rec.offset)
    want = ["positions", "signs", "scale"] if rec.kind == S.KIND_TERNARY else ["dense"]
    if roles != want:
        raise CorruptDataError(f"blocks {roles} break the rule of this record kind ({want})",
                               tensor=rec.name, offset=rec.offset)


def _decode_record(rec: _Record, data: memoryview, budget: _Budget, dense: str | None = None,
                   out: np.ndarray | None = None) -> Any:
    """Verify a record's data area and decode its blocks (spec 8).

    A ternary record gives a :class:`TernaryTensor`; with ``dense`` ("numpy" or "torch") it
    gives its dense array instead, written chunk by chunk straight from the positions and
    signs blocks (see :func:`_dense_ternary`). A dense record gives its storage array.
    """
    computed = _crc(data)
    if computed != rec.data_crc:
        raise ChecksumError(f"data checksum mismatch: stored 0x{rec.data_crc:08x}, computed "
                            f"0x{computed:08x}", tensor=rec.name, offset=rec.data_start)
    numel = math.prod(rec.shape)
    values: dict[str, Any] = {}
    cursor = 0
    for btype, stage, param, stored_size, decoded_size in rec.blocks:
        payload = data[cursor : cursor + stored_size]
        pad_end = cursor + _align(stored_size, rec.alignment)
        _check_zero(data[cursor + stored_size : pad_end], rec.data_start + cursor + stored_size,
                    rec.name, "block padding")
        ctx = BlockContext(rec.name, numel, rec.nnz or 0, rec.dtype, rec.shape,
                           rec.data_start + cursor)
        cursor = pad_end
        if btype not in _ROLES:
            continue  # spec 10.2: an unknown optional block is skipped
        codec = get_codec(btype, ctx)
        if stage == S.STAGE_ZSTD:
            bound = codec.max_decoded_size(param, ctx)
            if decoded_size > bound:  # spec 7.2: checked before anything is allocated
                raise ctx.error(f"zstd stage: decoded size {decoded_size} exceeds the "
                                f"{codec.name} block bound {bound}")
            budget.charge(decoded_size, ctx, rec.end)
            payload = memoryview(ZSTD.decode(payload, decoded_size, ctx))
        if codec.role == "positions":  # unpacked bits, then int64 indices and bool signs
            budget.charge(_positions_cost(len(payload), ctx.nnz), ctx, rec.end)
        if dense is not None and codec.role == "positions":
            values["positions"] = codec.positions(payload, param, ctx)  # checks the block now
        elif dense is not None and codec.role == "signs":
            values["signs"] = codec.packed(payload, param, ctx)
        else:
            values[codec.role] = codec.decode(payload, param, ctx)
    if rec.kind == S.KIND_DENSE:
        return values["dense"]
    if dense is not None:
        return _dense_ternary(rec, values, dense, out)
    return TernaryTensor(rec.shape, values["positions"], values["signs"], values["scale"],
                         rec.dtype, _validated=True)


def _dense_ternary(rec: _Record, values: dict[str, Any], dense: str,
                   out: np.ndarray | None) -> np.ndarray:
    """Write a ternary record's dense array from its blocks' positions and packed signs.

    The positions codec yields chunks of positions; each is written at once with its signs'
    values, so neither the int64 index array nor the bool signs of the whole tensor are
    built. The output is "numpy" values (BF16 as float32, as ``to_numpy``) or "torch"
    storage (BF16 as raw uint16 bits, as ``to_torch`` stores them).
    """
    vals = dense_values(values["scale"], rec.dtype, bf16_bits=dense == "torch")
    if out is None:
        flat, prefault = fresh_zeros(math.prod(rec.shape), vals.dtype)
    else:
        flat, prefault = dense_output(out, math.prod(rec.shape), vals.dtype), None
    with writing(prefault) as ready:
        scatter_signed(values["positions"], values["signs"], vals, flat, ready)
    return flat.reshape(rec.shape) if out is None else out


def _present(value: Any, framework: str) -> Any:
    """Return a decoded value in the caller's framework (spec-independent).

    ``value`` is a :class:`TernaryTensor` or ``(storage array, dtype)``; a ternary record
    decoded dense for numpy comes as ``(values, "F32"/"F16"/"F64")``, already values.
    """
    if framework == "torch":
        if isinstance(value, TernaryTensor):
            return value.to_torch()
        arr, dtype = value
        return _dt.to_torch(arr, dtype)
    if isinstance(value, TernaryTensor):
        return value
    arr, dtype = value
    return _dt.to_numpy_values(arr, dtype)


def _check_framework(framework: str) -> None:
    if framework not in ("numpy", "torch"):
        raise ValueError(f"framework must be 'numpy' or 'torch', got {framework!r}")


def _read_index(src: Source, limits: S.ReadLimits) -> list[tuple[str, int]]:
    """Parse the Index after its 0x00 kind byte (spec 5.6)."""
    at = src.pos
    count = src.varint("tensor count")
    if count > limits.max_tensors:
        raise LimitExceededError(f"{count} tensors; limit {limits.max_tensors}", offset=at)
    entries: list[tuple[str, int]] = []
    for _ in range(count):
        name = _read_name(src, limits, "index")
        entries.append((name, src.varint("record offset")))
    return entries


def iter_stream(fileobj: BinaryIO, *, framework: str = "numpy",
                limits: S.ReadLimits = S.DEFAULT_LIMITS, dense: bool = False,
                ) -> Iterator[tuple[str, Any]]:
    """Decode a compeft file from a stream, tensor by tensor, in file order.

    The stream need not seek (a pipe, a download). Every byte is checked: checksums,
    padding, the index against the records seen, and the end of the stream after the trailer.
    ``dense=True`` gives ternary tensors as dense numpy arrays (see :func:`loads`).

    >>> import io
    >>> data = dumps({"a": TernaryTensor((2,), [1], [False], 1.0)})
    >>> [(n, t.nnz) for n, t in iter_stream(io.BytesIO(data))]
    [('a', 1)]
    """
    _check_framework(framework)
    src: Source = fileobj if isinstance(fileobj, Source) else StreamSource(fileobj)
    yield from _walk(src, framework, limits, None, dense)


def _decode_present(rec: _Record, data: memoryview, budget: _Budget, framework: str,
                    dense: bool, out: np.ndarray | None = None) -> Any:
    """Decode one record and return it as the caller asked (framework, dense, ``out``).

    Torch always gets dense tensors, and like ``dense=True`` they are written straight from
    the blocks, without a :class:`TernaryTensor` in between.
    """
    mode = "torch" if framework == "torch" else "numpy" if dense else None
    if out is not None and mode != "numpy":
        raise ValueError("out= needs dense=True and framework='numpy'")
    if rec.kind == S.KIND_DENSE:
        # presenting a dense record allocates beyond its storage: BF16 widens to float32
        # through a uint32 temporary (8 bytes an element), F8 through a table (4); torch
        # copies the read-only storage. Charged before anything is decoded.
        numel = math.prod(rec.shape)
        cost = _widening_cost(rec.dtype, numel, framework)
        ctx = BlockContext(rec.name, numel, 0, rec.dtype, rec.shape, rec.data_start)
        budget.charge(cost, ctx, rec.end)
    value = _decode_record(rec, data, budget, mode, out)
    if isinstance(value, TernaryTensor):
        return _present(value, framework)
    if rec.kind == S.KIND_TERNARY:  # decoded dense: numpy values, or torch storage
        return _dt.to_torch(value, rec.dtype) if mode == "torch" else value
    value = _present((value, rec.dtype), framework)
    if out is not None:
        flat = dense_output(out, value.size, value.dtype)
        flat[...] = value.reshape(-1)
        return out
    return value


def _walk(src: Source, framework: str, limits: S.ReadLimits,
          file_size: int | None, dense: bool = False) -> Iterator[tuple[str, Any]]:
    header = _read_file_header(src, limits)
    budget = _Budget(limits, file_size)
    seen: list[tuple[str, int]] = []
    while True:
        src.tensor = None
        at = src.pos
        kind = src.u8("record kind")
        if kind == S.KIND_END:
            break
        if kind not in (S.KIND_TERNARY, S.KIND_DENSE) and not kind & S.KIND_OPTIONAL_BIT:
            raise UnsupportedFeatureError(f"unknown required record kind 0x{kind:02x}", offset=at)
        if len(seen) >= limits.max_tensors:
            raise LimitExceededError(f"more than {limits.max_tensors} records", offset=at)
        rec = _read_record_header(src, kind, limits, header.alignment)
        src.tensor = rec.name
        if seen and rec.name.encode() <= seen[-1][0].encode():  # spec 5.3
            raise CorruptDataError(f"record names must increase; {rec.name!r} follows "
                                   f"{seen[-1][0]!r}", tensor=rec.name, offset=at)
        seen.append((rec.name, at))
        _check_zero(src.read(rec.data_start - rec.header_end, "record padding"), rec.header_end,
                    rec.name, "record padding")
        data = src.read(rec.data_size, "record data")
        if kind not in (S.KIND_TERNARY, S.KIND_DENSE):
            if _crc(data) != rec.data_crc:
                raise ChecksumError("data checksum mismatch", tensor=rec.name,
                                    offset=rec.data_start)
            continue  # spec 10.2: an unknown optional record is skipped
        yield rec.name, _decode_present(rec, data, budget, framework, dense)
    src.tensor = None
    index_at = src.pos - 1
    src.capture = bytearray(b"\x00")
    entries = _read_index(src, limits)
    index_bytes, src.capture = bytes(src.capture), None
    if entries != seen:  # spec 5.6: the index lists every record, in order, at its offset
        raise CorruptDataError(f"index ({len(entries)} entries) does not match the "
                               f"{len(seen)} records before it", offset=index_at)
    trailer_at = src.pos
    offset, crc, tail = S.TRAILER.unpack(src.read(S.TRAILER_SIZE, "trailer"))
    if tail != S.TAIL_MAGIC:
        raise BadMagicError(f"trailer magic {tail!r}, expected {S.TAIL_MAGIC!r}",
                            offset=trailer_at + 12)
    if crc != _crc(index_bytes):
        raise ChecksumError(f"index checksum mismatch: stored 0x{crc:08x}, computed "
                            f"0x{_crc(index_bytes):08x}", offset=trailer_at + 8)
    if offset != index_at:
        raise CorruptDataError(f"trailer points at {offset}, the index is at {index_at}",
                               offset=trailer_at)
    if not src.at_end():  # spec 5.7: nothing follows the trailer
        raise CorruptDataError("bytes follow the trailer", offset=src.pos)


def loads(data: bytes | bytearray | memoryview, *, framework: str = "numpy",
          limits: S.ReadLimits = S.DEFAULT_LIMITS, dense: bool = False) -> dict[str, Any]:
    """Decode a whole file from bytes, checking every byte (spec 8).

    Values are :class:`TernaryTensor` for ternary records and numpy arrays for dense records
    (BF16/F8 widened to float32); ``framework="torch"`` gives torch tensors in the stored dtype.
    ``dense=True`` gives ternary records as dense numpy arrays too (``TernaryTensor.to_numpy``
    values), decoded straight into the array: the fastest way to dense weights.

    >>> loads(dumps({"b": np.arange(3, dtype=np.int8)}))["b"]
    array([0, 1, 2], dtype=int8)
    >>> loads(dumps({"t": TernaryTensor((3,), [1], [True], 0.5)}), dense=True)["t"]
    array([ 0. , -0.5,  0. ], dtype=float32)
    """
    _check_framework(framework)
    buf = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    return dict(_walk(BufferSource(buf), framework, limits, len(buf), dense))


def _verify_index_crc(buf: memoryview, index_at: int, crc: int) -> None:
    computed = _crc(buf[index_at : len(buf) - S.TRAILER_SIZE])
    if computed != crc:
        raise ChecksumError(f"index checksum mismatch: stored 0x{crc:08x}, computed "
                            f"0x{computed:08x}", offset=len(buf) - S.TRAILER_SIZE + 8)


# ---------------------------------------------------------------------------------------------
# Random access
# ---------------------------------------------------------------------------------------------


class CompeftReader:
    """Random access to a compeft file: reads the header, the trailer and the index only.

    Use :func:`open_file`. ``get(name)`` reads and checks only that tensor's bytes.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "x.compeft")
    >>> save_file({"a": TernaryTensor((4,), [2], [False], 1.0), "b": np.ones(2)}, p)
    >>> with open_file(p) as f:
    ...     print(f.keys(), f.info("a").codecs, f.get("b"))
    ['a', 'b'] bitmask,signs,scale [1. 1.]
    """

    def __init__(self, data: memoryview, *, framework: str = "numpy",
                 limits: S.ReadLimits = S.DEFAULT_LIMITS, closer: Any = None) -> None:
        _check_framework(framework)
        self._buf = data
        self._closer = closer
        self._framework = framework
        self._limits = limits
        src = BufferSource(data)
        self._header = _read_file_header(src, limits)
        size = len(data)
        first = self._header.end
        if size < first + 1 + S.TRAILER_SIZE:
            raise TruncatedError(f"file is {size} bytes, too short for an index and trailer",
                                 offset=size)
        index_at, crc, tail = S.TRAILER.unpack(data[size - S.TRAILER_SIZE :])
        if tail != S.TAIL_MAGIC:  # a cut file ends in the middle of something else
            raise TruncatedError(f"trailer magic {bytes(tail)!r} is not {S.TAIL_MAGIC!r}: the "
                                 "file is cut short or not complete", offset=size - 4)
        if not first <= index_at <= size - S.TRAILER_SIZE - 1:
            raise CorruptDataError(f"index offset {index_at} outside [{first}, "
                                   f"{size - S.TRAILER_SIZE - 1}]", offset=size - S.TRAILER_SIZE)
        if size - S.TRAILER_SIZE - index_at > limits.max_index_size:
            raise LimitExceededError(f"index is {size - S.TRAILER_SIZE - index_at} bytes; limit "
                                     f"{limits.max_index_size}", offset=index_at)
        _verify_index_crc(data, index_at, crc)
        isrc = BufferSource(data[index_at : size - S.TRAILER_SIZE], base=index_at)
        if isrc.u8("index kind") != S.KIND_END:
            raise CorruptDataError("index does not start with kind 0x00", offset=index_at)
        entries = _read_index(isrc, limits)
        if not isrc.at_end():
            raise CorruptDataError(f"{isrc.remaining} bytes after the index entries",
                                   offset=isrc.pos)
        self._entries: dict[str, tuple[int, int]] = {}
        prev_name, prev_off = None, None
        for name, off in entries:
            if prev_name is not None and name.encode() <= prev_name.encode():
                raise CorruptDataError(f"index names must increase; {name!r} follows "
                                       f"{prev_name!r}", offset=index_at)
            if (off <= prev_off) if prev_off is not None else off != first:
                raise CorruptDataError(f"index offset {off} of {name!r} breaks the record order",
                                       tensor=name, offset=index_at)
            if off >= index_at:
                raise CorruptDataError(f"record offset {off} is past the index", tensor=name,
                                       offset=index_at)
            prev_name, prev_off = name, off
        if not entries and index_at != first:
            raise CorruptDataError(f"{index_at - first} bytes between the header and an empty "
                                   "index", offset=first)
        ends = [off for _, off in entries[1:]] + [index_at]
        for (name, off), end in zip(entries, ends, strict=False):
            kind = data[off]
            if kind not in (S.KIND_TERNARY, S.KIND_DENSE) and kind & S.KIND_OPTIONAL_BIT:
                # spec 10.2: an unknown optional record is skipped, as loads does. Its header
                # checksum covers the kind byte: checked first, one flipped bit 7 cannot turn
                # a tensor into a record that is silently left out
                src = BufferSource(data[off:end], base=off)
                src.tensor = name
                src.u8("record kind")
                _read_record_header(src, kind, limits, self._header.alignment)
                continue
            self._entries[name] = (off, end)
        self._closed = False

    # -- mapping-like API --
    def keys(self) -> list[str]:
        """Tensor names, in file (sorted) order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def metadata(self) -> dict[str, Any]:
        """The file's metadata object (empty when none)."""
        return self._header.metadata

    @property
    def alignment(self) -> int:
        """The file's block alignment in bytes."""
        return self._header.alignment

    @property
    def version(self) -> tuple[int, int]:
        """The file's (major, minor) version."""
        return self._header.version

    def _record(self, name: str) -> _Record:
        self._check_open()
        try:
            off, end = self._entries[name]
        except KeyError:
            raise KeyError(name) from None
        src = BufferSource(self._buf[off:end], base=off)
        src.tensor = name
        kind = src.u8("record kind")
        if kind not in (S.KIND_TERNARY, S.KIND_DENSE) and not kind & S.KIND_OPTIONAL_BIT:
            raise UnsupportedFeatureError(f"unknown required record kind 0x{kind:02x}",
                                          tensor=name, offset=off)
        rec = _read_record_header(src, kind, self._limits, self._header.alignment)
        if rec.name != name:
            raise CorruptDataError(f"record at {off} is named {rec.name!r}, the index says "
                                   f"{name!r}", tensor=name, offset=off)
        if rec.end != end:  # spec 5.3: records tile the file
            raise CorruptDataError(f"record ends at {rec.end}, the next starts at {end}",
                                   tensor=name, offset=off)
        _check_zero(self._buf[rec.header_end : rec.data_start], rec.header_end, name,
                    "record padding")
        return rec

    def info(self, name: str) -> TensorInfo:
        """Shape, dtype, nnz, blocks and sizes of one tensor, without decoding its data."""
        return self._record(name).info()

    def get(self, name: str, *, framework: str | None = None, dense: bool = False,
            out: np.ndarray | None = None) -> Any:
        """Decode one tensor, reading only its bytes.

        ``dense=True`` returns a ternary tensor as its dense numpy array, decoded straight
        from the file (no index array in between); ``out``, a C-contiguous array of the
        right size and dtype (float32 for BF16), then receives it and is returned.
        The dense array is not counted in ``ReadLimits.max_decoded_bytes`` (its size,
        ``info(name).numel`` elements, is known before decoding).
        """
        rec = self._record(name)
        fw = framework or self._framework
        _check_framework(fw)
        if rec.kind not in (S.KIND_TERNARY, S.KIND_DENSE):
            raise UnsupportedFeatureError(f"record kind 0x{rec.kind:02x} has no tensor",
                                          tensor=name)
        data = self._buf[rec.data_start : rec.end]
        return _decode_present(rec, data, _Budget(self._limits, len(self._buf)), fw, dense, out)

    def get_raw(self, name: str) -> tuple[np.ndarray, str] | TernaryTensor:
        """Return a dense record as ``(storage_array, dtype)`` (BF16 as raw uint16 bits)."""
        rec = self._record(name)
        data = self._buf[rec.data_start : rec.end]
        value = _decode_record(rec, data, _Budget(self._limits, len(self._buf)))
        return (value, rec.dtype) if isinstance(value, np.ndarray) else value

    def __getitem__(self, name: str) -> Any:
        return self.get(name)

    def items(self) -> Iterator[tuple[str, Any]]:
        """Yield ``(name, value)`` in file order, decoding one tensor at a time."""
        for name in self._entries:
            yield name, self.get(name)

    def file_info(self) -> FileInfo:
        """The whole file's :class:`FileInfo`."""
        return FileInfo(self._header.version, self._header.alignment, self._header.metadata,
                        len(self._buf), tuple(self.info(n) for n in self._entries))

    # -- lifetime --
    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("reader is closed")

    def close(self) -> None:
        """Release the file. Arrays already returned stay valid."""
        if self._closed:
            return
        self._closed = True
        self._buf = memoryview(b"")
        if self._closer is not None:
            # arrays may still view the map; it then closes when they are gone
            with contextlib.suppress(BufferError):
                self._closer()

    def __enter__(self) -> CompeftReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_file(path: str | os.PathLike | bytes | bytearray | memoryview, *,
              framework: str = "numpy", limits: S.ReadLimits = S.DEFAULT_LIMITS) -> CompeftReader:
    """Open a file (memory-mapped) or a bytes object for random access; see CompeftReader."""
    if isinstance(path, (bytes, bytearray, memoryview)):
        return CompeftReader(memoryview(path).cast("B"), framework=framework, limits=limits)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise TruncatedError("file header: need 16 bytes, 0 available", offset=0)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return CompeftReader(memoryview(mm), framework=framework, limits=limits, closer=mm.close)
    except BaseException:
        with contextlib.suppress(BufferError):
            mm.close()
        raise


def load_file(path: str | os.PathLike, *, framework: str = "numpy",
              limits: S.ReadLimits = S.DEFAULT_LIMITS, dense: bool = False) -> dict[str, Any]:
    """Read and check a whole file; like :func:`loads` on its bytes."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return loads(b"", framework=framework, limits=limits, dense=dense)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(mm)
    result = loads(view, framework=framework, limits=limits, dense=dense)
    return result


def inspect(source: str | os.PathLike | bytes | bytearray | memoryview, *,
            limits: S.ReadLimits = S.DEFAULT_LIMITS) -> FileInfo:
    """Return the header, metadata and per-tensor layout without decoding any data.

    >>> info = inspect(dumps({"w": TernaryTensor((1000,), [5, 600], [0, 1], 0.1)}))
    >>> info.tensors[0].codecs, info.tensors[0].nnz
    ('golomb,signs,scale', 2)
    """
    with open_file(source, limits=limits) as f:
        return f.file_info()


__all__ += ["atomic_write", "decode_metadata", "encode_metadata"]
