"""The file layout of spec 5: the only module that knows where things sit in a file.

Layout (spec 4)::

    File_Header | Metadata | Header_Checksum | pad | Record* | Index | Trailer

Each record is a self-describing header followed by an aligned data area holding its blocks,
so a reader can decode a pipe record by record (:func:`iter_stream`); the index and the
fixed-size trailer at the end give random access (:func:`open_file`).
"""

from __future__ import annotations

import contextlib
import io
import math
import mmap
import os
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from . import _spec as S
from . import dtypes as _dt
from ._io import BufferSource, Source, StreamSource, encode_varint
from .budget import Budget, positions_cost, record_cost, widening_cost
from .codecs import ZSTD, BlockContext, get_codec, torch_decode
from .codecs.dense import DenseCodec
from .codecs.scale import ScaleCodec
from .codecs.signs import SignsCodec
from .encode import POSITIONS_CHOICES, encode_positions, maybe_zstd
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
from .fsio import atomic_write
from .info import BlockInfo, FileInfo, TensorInfo
from .metadata import decode_metadata, encode_metadata
from .present import check_framework, dense_ternary, present
from .tensor import TernaryTensor, check_dense_bytes, dense_output

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

_SIGNS, _SCALE, _DENSE = SignsCodec(), ScaleCodec(), DenseCodec()
_MAX_RECORD_HEADER = 1 << 16  # spec 9.2: a record header above 64 KiB is rejected
# what a ternary record costs beyond its blocks and two copies of its name (header fields,
# descriptors, checksums, index entry), for the writer's pack-or-record choice (Appendix D)
_RECORD_OVERHEAD = 32


def _crc(*parts: bytes | memoryview) -> int:
    """CRC-32 (ISO-HDLC, as zlib) over the concatenation of ``parts`` (spec 2.4)."""
    value = 0
    for p in parts:
        value = zlib.crc32(p, value)
    return value


def _align(offset: int, alignment: int) -> int:
    return -(-offset // alignment) * alignment


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _descriptor(block_type: int, stage: int, param: int, stored: int, decoded: int) -> bytes:
    out = bytes([block_type, stage]) + encode_varint(param) + encode_varint(stored)
    if stage != S.STAGE_NONE:
        out += encode_varint(decoded)
    return out


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
    version:
        ``"1.1"`` (the default) gathers ternary tensors of at most 2^19 elements into pack
        records (spec 5.8); ``"1.0"`` writes one record per tensor, for 1.0 readers.

    Examples
    --------
    >>> import io
    >>> buf = io.BytesIO()
    >>> with Writer(buf) as w:
    ...     w.write("a", TernaryTensor((4,), [1], [True], 0.5))
    >>> len(buf.getvalue())
    85
    """

    def __init__(self, fileobj: BinaryIO, *, metadata: Mapping[str, Any] | None = None,
                 positions: str = "auto", zstd_level: int | None = S.DEFAULT_ZSTD_LEVEL,
                 alignment: int = 1 << S.DEFAULT_ALIGNMENT_LOG2,
                 version: tuple[int, int] | str = (S.VERSION_MAJOR, S.VERSION_MINOR)) -> None:
        if positions not in POSITIONS_CHOICES:
            raise EncodeError(f"positions must be one of {POSITIONS_CHOICES}, got {positions!r}")
        if zstd_level is not None and not (isinstance(zstd_level, int) and -7 <= zstd_level <= 22):
            raise EncodeError(f"zstd level must be an integer in [-7, 22], got {zstd_level!r}")
        log2 = alignment.bit_length() - 1 if isinstance(alignment, int) and alignment > 0 else -1
        if not (S.MIN_ALIGNMENT_LOG2 <= log2 <= S.MAX_ALIGNMENT_LOG2 and alignment == 1 << log2):
            raise EncodeError(f"alignment must be a power of two in [1, 4096], got {alignment!r}")
        version = _parse_version(version)
        self._f = fileobj
        self._positions = positions
        self._level = zstd_level
        self._alignment = alignment
        self._packing = version >= (1, 1)  # spec 5.8: small ternary tensors go into packs
        self._names: list[bytes] = []  # record names and offsets, for the index
        self._offsets: list[int] = []
        self._last = b""  # the last tensor name written, in a record or a pack
        self._pack: list[_Member] = []
        self._pack_data = self._pack_table = 0  # bytes of the pending pack's data and table
        #: name -> bytes the tensor takes in the file, as ``TensorInfo.record_size``: its
        #: whole record, or for a pack member its data (the pack's header is shared)
        self.sizes: dict[str, int] = {}
        self._cost = 0  # decode-budget charge of the records written so far (spec 9.3)
        self._closed = False
        meta = encode_metadata(metadata)
        header = S.FILE_HEADER.pack(S.MAGIC, *version, log2, 0, len(meta))
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
        if self._last and bname <= self._last:
            raise EncodeError(f"names must be unique and written in increasing order; "
                              f"{name!r} follows {self._last.decode()!r}", tensor=name)
        if (self._packing and isinstance(value, TernaryTensor)
                and value.numel <= S.PACK_MEMBER_MAX_NUMEL):
            self._check_ndim(name, value.shape)
            member = self._member(bname, value)
            if isinstance(member, _Member):
                self.sizes[name] = self._add_member(member)
                self._last = bname
                return
            encoded = member  # a record is smaller: its blocks are already encoded
        else:
            encoded = None
        self._flush_pack()
        self._last = bname
        if isinstance(value, TernaryTensor):
            self._check_ndim(name, value.shape)
            kind, body_tail, blocks = encoded or self._ternary(name, value, self._level)
            dtype, shape, nnz = value.dtype, value.shape, value.nnz
        else:
            try:
                storage, dtype = _dt.to_storage(value, dtype)
            except EncodeError as exc:
                raise EncodeError(exc.message, tensor=name) from None
            shape, nnz = storage.shape, 0
            self._check_ndim(name, shape)
            ctx = BlockContext(name, storage.size, 0, dtype, shape)
            param, payload = _DENSE.encode(storage, ctx)
            stage, stored = maybe_zstd(payload, self._level)
            kind, body_tail = S.KIND_DENSE, b""
            blocks = [(S.BLOCK_DENSE, stage, param, stored, len(payload))]
        # spec 9.3: the file must decode within the default budget, max(64 MiB, 64 x size),
        # whoever reads it. Only zstd can break that (data that compress more than 64-fold,
        # such as all-zero tensors; without zstd a record costs under 41x its size), so a
        # record that would overdraw the budget of the file written so far goes without zstd.
        numel = math.prod(shape)
        cost = record_cost(kind, dtype, numel, nnz, blocks)
        end = self._pos + sum(_align(len(b[3]), self._alignment) for b in blocks)
        if self._cost + cost > max(S.DECODE_BUDGET_FLOOR, S.DECODE_BUDGET_RATIO * end):
            if kind == S.KIND_TERNARY:
                blocks = self._ternary(name, value, None)[2]
            else:
                blocks = [(S.BLOCK_DENSE, S.STAGE_NONE, param, payload, len(payload))]
            cost = record_cost(kind, dtype, numel, nnz, blocks)
        self._cost += cost  # the last check that can reject the tensor is above
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
        self.sizes[name] = self._pos - self._offsets[-1]

    @staticmethod
    def _check_ndim(name: str, shape: tuple[int, ...]) -> None:
        """Reject a rank above the default limit, before anything is encoded or charged."""
        if len(shape) > S.DEFAULT_LIMITS.max_ndim:
            raise EncodeError(f"{len(shape)} dimensions; limit {S.DEFAULT_LIMITS.max_ndim}",
                              tensor=name)

    def _ternary(self, name: str, t: TernaryTensor, level: int | None
                 ) -> tuple[int, bytes, list]:
        ctx = BlockContext(name, t.numel, t.nnz, t.dtype, t.shape)
        positions = encode_positions(t, ctx, self._positions, level)
        param, payload = _SIGNS.encode(t.signs, ctx)  # meanwhile a worker may run zstd
        stage, stored = maybe_zstd(payload, level)
        blocks = [positions(), (S.BLOCK_SIGNS, stage, param, stored, len(payload))]
        param, payload = _SCALE.encode(t.scale, ctx)
        blocks.append((S.BLOCK_SCALE, S.STAGE_NONE, param, payload, len(payload)))
        return S.KIND_TERNARY, encode_varint(t.nnz), blocks

    def _member(self, bname: bytes, t: TernaryTensor) -> _Member | tuple[int, bytes, list]:
        """Encode a small ternary tensor as a pack member (spec 5.8), or as a record.

        Members have no zstd stage. Positions that zstd shrinks (runs, not scattered
        nonzeros) can make a record of their own smaller despite its header: then the
        record's ``(kind, body tail, blocks)``, as :meth:`_ternary` gives them.
        """
        ctx = BlockContext(bname.decode(), t.numel, t.nnz, t.dtype, t.shape)
        btype, _stage, param, positions, _d = encode_positions(t, ctx, self._positions, None)()
        signs = _SIGNS.encode(t.signs, ctx)[1]
        scale = _SCALE.encode(t.scale, ctx)[1]
        tail = (bytes([S.DTYPE_CODES[t.dtype], len(t.shape)])
                + b"".join(encode_varint(d) for d in t.shape) + encode_varint(t.nnz)
                + bytes([btype]) + encode_varint(param) + encode_varint(len(positions)))
        member = _Member(bname, tail, (positions, signs, scale),
                         positions_cost(len(positions), t.nnz))
        if self._level is not None and member.size > _RECORD_OVERHEAD:
            record = self._ternary(bname.decode(), t, self._level)
            as_record = (sum(_align(len(b[3]), self._alignment) for b in record[2])
                         + 2 * len(bname) + _RECORD_OVERHEAD)
            if as_record < member.size:
                return record
        return member

    def _add_member(self, member: _Member) -> int:
        """Put a member into the pending pack, writing the pack first if it is full."""
        entry = len(_table([member], b""))  # an upper bound: front coding only shortens it
        if self._pack and (self._pack_data + member.size > S.PACK_DATA_TARGET
                           or self._pack_table + entry > S.PACK_TABLE_TARGET):
            self._flush_pack()
        self._pack.append(member)
        self._pack_data += member.size
        self._pack_table += entry
        return member.size

    def flush(self) -> None:
        """Write the tensors waiting in a pack now, so that a reader of the stream gets them.

        A 1.1 writer gathers small ternary tensors into a pack (spec 5.8) and writes it when
        it is full, when a tensor that is not packed comes, or at :meth:`close`; at most
        about 1 MiB waits. The file stays valid: the next tensors start a new pack.
        """
        if self._closed:
            raise ValueError("writer is closed")
        self._flush_pack()
        with contextlib.suppress(AttributeError, OSError):
            self._f.flush()

    def _flush_pack(self) -> None:
        """Write the pending pack as one record (spec 5.8)."""
        if not self._pack:
            return
        members, self._pack = self._pack, []
        self._pack_data = self._pack_table = 0
        table = _table(members)
        stage, stored = maybe_zstd(table, self._level)
        data = b"".join(part for m in members for part in m.parts)
        end = self._pos + len(data) + 64  # about where the data area ends (spec 9.3)
        cost = sum(m.cost for m in members)
        table_cost = len(table) if stage == S.STAGE_ZSTD else 0
        if (stage == S.STAGE_ZSTD and self._cost + cost + table_cost
                > max(S.DECODE_BUDGET_FLOOR, S.DECODE_BUDGET_RATIO * end)):
            stage, stored, table_cost = S.STAGE_NONE, table, 0
        self._cost += cost + table_cost
        first = members[0].name
        body = (encode_varint(len(first)) + first + encode_varint(len(members)) + bytes([stage])
                + encode_varint(len(stored))
                + (encode_varint(len(table)) if stage == S.STAGE_ZSTD else b"") + stored)
        pad = bytes(_align(len(data), self._alignment) - len(data))
        if len(body) + 8 > _MAX_RECORD_HEADER:  # cannot happen with PACK_TABLE_TARGET
            raise EncodeError(f"pack header of {len(body) + 8} bytes", tensor=first.decode())
        head = (bytes([S.KIND_PACK]) + encode_varint(len(body) + 8)
                + encode_varint(len(data) + len(pad)) + body + S.CHECKSUM.pack(_crc(data, pad)))
        self._names.append(first)
        self._offsets.append(self._pos)
        self._emit(head, S.CHECKSUM.pack(_crc(head)))
        self._pad()
        self._emit(data, pad)

    def close(self) -> None:
        """Write the index and the trailer (spec 5.6, 5.7). Idempotent."""
        if self._closed:
            return
        self._flush_pack()
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
          alignment: int = 1 << S.DEFAULT_ALIGNMENT_LOG2,
          version: tuple[int, int] | str = (S.VERSION_MAJOR, S.VERSION_MINOR)) -> bytes:
    """Return the bytes of a compeft file holding ``tensors`` (written in sorted name order).

    Values are :class:`TernaryTensor` (ternary records) or numpy arrays / torch tensors
    (dense records, stored losslessly). The same input and options always give the same bytes.

    >>> data = dumps({"w": TernaryTensor((2, 2), [3], [False], 1.0)})
    >>> loads(data)["w"].to_numpy().tolist()
    [[0.0, 0.0], [0.0, 1.0]]
    """
    buf = io.BytesIO()
    with Writer(buf, metadata=metadata, positions=positions, zstd_level=zstd_level,
                alignment=alignment, version=version) as w:
        for name in _sorted_names(tensors):
            w.write(name, tensors[name])
    return buf.getvalue()


def _parse_version(version: tuple[int, int] | str) -> tuple[int, int]:
    if isinstance(version, str):
        major, _, minor = version.partition(".")
        version = (int(major), int(minor)) if major.isdigit() and minor.isdigit() else (-1, -1)
    version = tuple(version)
    if version not in S.VERSIONS:
        raise EncodeError(f"version must be one of {[f'{a}.{b}' for a, b in S.VERSIONS]}, "
                          f"got {version!r}")
    return version


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _table(members: list[_Member], prev: bytes | None = None) -> bytes:
    """The member table of a pack (spec 5.8): names front-coded, then the fixed fields.

    The first name is coded against the record's name, which is the same (``prev``
    defaults to it): a pack stores each name once, and its first in the index too.
    """
    out = bytearray()
    prev = members[0].name if prev is None else prev
    for m in members:
        shared = _common_prefix(prev, m.name)
        out += encode_varint(shared) + encode_varint(len(m.name) - shared) + m.name[shared:]
        out += m.tail
        prev = m.name
    return bytes(out)


@dataclass
class _Member:
    """A tensor waiting in a pack: its name, its member-table fields after the name, its data."""

    name: bytes
    tail: bytes
    parts: tuple[bytes, bytes, bytes]  # positions, signs, scale
    cost: int  # decode-budget charge (spec 9.3)

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.parts)


def _sorted_names(tensors: Mapping[str, Any]) -> list[str]:
    for name in tensors:
        if not isinstance(name, str):
            raise TypeError(f"tensor names are str, got {type(name).__name__}")
    try:
        return sorted(tensors, key=lambda n: n.encode("utf-8"))
    except UnicodeEncodeError:
        raise EncodeError("a tensor name is not valid UTF-8") from None


def save_file(tensors: Mapping[str, Any], path: str | os.PathLike, *,
              metadata: Mapping[str, Any] | None = None, positions: str = "auto",
              zstd_level: int | None = S.DEFAULT_ZSTD_LEVEL,
              alignment: int = 1 << S.DEFAULT_ALIGNMENT_LOG2,
              version: tuple[int, int] | str = (S.VERSION_MAJOR, S.VERSION_MINOR)) -> None:
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
                    alignment=alignment, version=version) as w:
            for name in names:
                w.write(name, tensors[name])

    atomic_write(path, write)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


@dataclass
class _Header:
    version: tuple[int, int]
    alignment: int
    metadata: dict[str, Any]
    end: int  # offset of the first record (aligned)

    @property
    def kinds(self) -> tuple[int, ...]:
        """The record kinds of this file's version (spec 5.3: packs from 1.1)."""
        if self.version[1] >= 1:
            return (S.KIND_TERNARY, S.KIND_DENSE, S.KIND_PACK)
        return (S.KIND_TERNARY, S.KIND_DENSE)


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
    alignment: int = 1
    members: tuple[_Record, ...] = ()  # a pack's tensors (spec 5.8), data_start absolute
    in_pack: bool = False  # a member of a pack: no checksum, no alignment of its own

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
        # a pack member's share of the file is its data (the pack's header is shared)
        size = self.data_size if self.in_pack else self.end - self.offset
        return TensorInfo(self.name, kind, self.dtype, self.shape, self.nnz, tuple(infos),
                          self.offset, size)


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
    if kind == S.KIND_PACK:
        return _read_pack(b, name, limits, _Record(
            kind, name, "", (), None, [], data_crc, offset, header_end, data_start, data_size,
            alignment), data_size_at)
    if kind not in (S.KIND_TERNARY, S.KIND_DENSE):
        return _Record(kind, name, "", (), None, [], data_crc, offset, header_end, data_start,
                       data_size, alignment)
    dtype, shape, nnz = _read_tensor_fields(b, kind, name, limits)
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


def _read_tensor_fields(b: BufferSource, kind: int, name: str, limits: S.ReadLimits,
                        ) -> tuple[str, tuple[int, ...], int | None]:
    """Dtype, Ndim, Dims and (ternary) Nnz of a record body or a pack member (spec 5.4)."""
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
    return dtype, shape, nnz


def _read_pack(b: BufferSource, name: str, limits: S.ReadLimits, rec: _Record,
               data_size_at: int) -> _Record:
    """The rest of a pack record's body: its member table (spec 5.8)."""
    at = b.pos
    count = b.varint("member count")
    if count < 1:
        raise CorruptDataError("a pack holds at least one member", tensor=name, offset=at)
    stage_at = b.pos
    stage = b.u8("table stage")
    stored = b.varint("table stored size")
    if stage not in (S.STAGE_NONE, S.STAGE_ZSTD):
        raise UnsupportedFeatureError(f"unknown stage 0x{stage:02x}", tensor=name,
                                      offset=stage_at)
    decoded = b.varint("table decoded size") if stage == S.STAGE_ZSTD else stored
    if decoded > S.PACK_TABLE_MAX:
        raise CorruptDataError(f"pack table: decoded size {decoded} exceeds "
                               f"{S.PACK_TABLE_MAX}", tensor=name, offset=stage_at + 1)
    table_at = b.pos
    table = b.read(stored, "pack table")
    if not b.at_end():
        raise CorruptDataError(f"{b.remaining} unexpected bytes at the end of the record header",
                               tensor=name, offset=b.pos)
    if stage == S.STAGE_ZSTD:
        ctx = BlockContext(name, 0, 0, "F32", (), table_at)
        table = memoryview(ZSTD.decode(table, decoded, ctx))
    t = BufferSource(table, base=table_at)
    t.tensor = name
    members, prev, cursor = [], name.encode(), 0  # the first name is coded against Name
    for _ in range(count):
        at = t.pos
        shared = t.varint("prefix length")
        if shared > len(prev):
            raise CorruptDataError(f"pack member prefix length {shared} exceeds the previous "
                                   f"name's {len(prev)} bytes", tensor=name, offset=at)
        suffix_at = t.pos
        n = t.varint("suffix length")
        if not 1 <= shared + n <= limits.max_name_length:
            raise LimitExceededError(f"member name length {shared + n} outside [1, "
                                     f"{limits.max_name_length}]", tensor=name, offset=suffix_at)
        raw = prev[:shared] + bytes(t.read(n, "member name"))
        try:
            mname = raw.decode("utf-8", "strict")
        except UnicodeDecodeError:
            raise CorruptDataError(f"member name is not valid UTF-8: {raw[:40]!r}",
                                   offset=at) from None
        if "\x00" in mname:
            raise CorruptDataError(f"member name contains NUL: {mname[:40]!r}", offset=at)
        if not members and raw != prev:
            raise CorruptDataError(f"the first member is named {mname!r}, the pack {name!r}",
                                   tensor=name, offset=at)
        if members and raw <= prev:
            raise CorruptDataError(f"pack member names must increase; {mname!r} follows "
                                   f"{prev.decode()!r}", tensor=mname, offset=at)
        t.tensor = mname
        dtype, shape, nnz = _read_tensor_fields(t, S.KIND_TERNARY, mname, limits)
        assert nnz is not None
        ptype_at = t.pos
        ptype = t.u8("positions type")
        if ptype not in (S.BLOCK_BITMASK, S.BLOCK_GOLOMB):
            raise CorruptDataError(f"pack member positions type 0x{ptype:02x} is not bitmask "
                                   "or golomb", tensor=mname, offset=ptype_at)
        param = t.varint("positions param")
        psize = t.varint("positions size")
        ssize = -(-nnz // 8)
        blocks = [(ptype, S.STAGE_NONE, param, psize, psize),
                  (S.BLOCK_SIGNS, S.STAGE_NONE, 0, ssize, ssize),
                  (S.BLOCK_SCALE, S.STAGE_NONE, S.SCALE_F32, 4, 4)]
        size = psize + ssize + 4
        members.append(_Record(S.KIND_TERNARY, mname, dtype, shape, nnz, blocks, 0, rec.offset,
                               rec.header_end, rec.data_start + cursor, size, in_pack=True))
        cursor += size
        prev = raw
    if not t.at_end():
        raise CorruptDataError(f"{t.remaining} unexpected bytes at the end of the pack table",
                               tensor=name, offset=t.pos)
    if rec.data_size != _align(cursor, rec.alignment):
        raise CorruptDataError(f"data size {rec.data_size} does not match the pack's members "
                               f"({_align(cursor, rec.alignment)})", tensor=name,
                               offset=data_size_at)
    rec.members = tuple(members)
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


def _check_data_crc(rec: _Record, data: memoryview, tensor: str | None = None) -> None:
    """Data_Checksum of a record (spec 5.3, R-REC-9); ``tensor``: the pack member asked for."""
    computed = _crc(data)
    if computed != rec.data_crc:
        where = ""
        if rec.members:  # one checksum covers them all: say which tensors may be damaged
            where = (f" (a pack of {len(rec.members)} tensors, {rec.members[0].name!r} to "
                     f"{rec.members[-1].name!r})")
        raise ChecksumError(f"data checksum mismatch: stored 0x{rec.data_crc:08x}, computed "
                            f"0x{computed:08x}{where}", tensor=tensor or rec.name,
                            offset=rec.data_start)


def _decode_record(rec: _Record, data: memoryview, budget: Budget, dense: str | None = None,
                   out: np.ndarray | None = None, device: Any = None) -> Any:
    """Verify a record's data area and decode its blocks (spec 8).

    A ternary record gives a :class:`TernaryTensor`; with ``dense`` ("numpy" or "torch") it
    gives its dense array instead, written chunk by chunk straight from the positions and
    signs blocks (see :func:`dense_ternary`). A dense record gives its storage array.
    With a torch ``device``, the payloads are decoded there (:mod:`.codecs.torch_decode`).
    """
    if not rec.in_pack:  # a pack's checksum covers all its members: checked by the caller
        _check_data_crc(rec, data)
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
            budget.charge(positions_cost(len(payload), ctx.nnz), ctx, rec.end)
        if device is not None and codec.role != "scale":
            values[codec.role] = torch_decode.decode_block(codec, payload, param, ctx, device)
        elif dense is not None and codec.role == "positions":
            values["positions"] = codec.positions(payload, param, ctx)  # checks the block now
        elif dense is not None and codec.role == "signs":
            values["signs"] = codec.packed(payload, param, ctx)
        else:
            values[codec.role] = codec.decode(payload, param, ctx)
    if rec.kind == S.KIND_DENSE:
        return values["dense"]
    if device is not None:
        return torch_decode.DeviceTernary(values["positions"], values["signs"], values["scale"],
                                          rec.dtype, rec.shape)
    if dense is not None:
        return dense_ternary(rec.shape, rec.dtype, values, dense, out, nnz=rec.nnz,
                             limits=budget.limits, name=rec.name)
    return TernaryTensor(rec.shape, values["positions"], values["signs"], values["scale"],
                         rec.dtype, _validated=True)



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
    check_framework(framework)
    src: Source = fileobj if isinstance(fileobj, Source) else StreamSource(fileobj)
    yield from _walk(src, framework, limits, None, dense)


def _decode_present(rec: _Record, data: memoryview, budget: Budget, framework: str,
                    dense: bool, out: np.ndarray | None = None, device: Any = None) -> Any:
    """Decode one record and return it as the caller asked (framework, dense, ``out``).

    Torch always gets dense tensors, and like ``dense=True`` they are written straight from
    the blocks, without a :class:`TernaryTensor` in between.
    """
    if device is not None:  # torch tensors on that device
        if out is not None:
            raise ValueError("out= cannot be given with device=")
        framework = "torch"
        if not torch_decode.on_device(device):  # the CPU: the numpy decoders, faster there
            device = None
    mode = "torch" if framework == "torch" else "numpy" if dense else None
    if out is not None and mode != "numpy":
        raise ValueError("out= needs dense=True and framework='numpy'")
    if rec.kind == S.KIND_DENSE:
        # presenting a dense record allocates beyond its storage: BF16 widens to float32
        # through a uint32 temporary (8 bytes an element), F8 through a table (4); torch
        # copies the read-only storage. Charged before anything is decoded.
        numel = math.prod(rec.shape)
        cost = widening_cost(rec.dtype, numel, framework)
        ctx = BlockContext(rec.name, numel, 0, rec.dtype, rec.shape, rec.data_start)
        budget.charge(cost, ctx, rec.end)
    if device is not None:  # spec 9.4: the dense output is bounded before it is allocated
        check_dense_bytes(rec.shape, _dt.storage_dtype(rec.dtype), budget.limits, rec.name)
        return torch_decode.dense(_decode_record(rec, data, budget, device=device))
    value = _decode_record(rec, data, budget, mode, out)
    if isinstance(value, TernaryTensor):
        return present(value, framework)
    if rec.kind == S.KIND_TERNARY:  # decoded dense: numpy values, or torch storage
        return _dt.to_torch(value, rec.dtype) if mode == "torch" else value
    value = present((value, rec.dtype), framework)
    if out is not None:
        flat = dense_output(out, value.size, value.dtype)
        flat[...] = value.reshape(-1)
        return out
    return value


def _decode_pack(rec: _Record, data: memoryview, budget: Budget, framework: str,
                 dense: bool, device: Any = None) -> Iterator[tuple[str, Any]]:
    """Check a pack's data area, then decode its members in order (spec 5.8)."""
    _check_data_crc(rec, data)
    used = rec.members[-1].end - rec.data_start
    _check_zero(data[used:], rec.data_start + used, rec.name, "block padding")
    for m in rec.members:
        lo = m.data_start - rec.data_start
        yield m.name, _decode_present(m, data[lo : lo + m.data_size], budget, framework, dense,
                                      device=device)


def _walk(src: Source, framework: str, limits: S.ReadLimits,
          file_size: int | None, dense: bool = False, device: Any = None,
          ) -> Iterator[tuple[str, Any]]:
    header = _read_file_header(src, limits)
    budget = Budget(limits, file_size)
    seen: list[tuple[str, int]] = []
    last = ""  # the last tensor name: a record's, or a pack's last member's
    while True:
        src.tensor = None
        at = src.pos
        kind = src.u8("record kind")
        if kind == S.KIND_END:
            break
        if kind not in header.kinds and not kind & S.KIND_OPTIONAL_BIT:
            raise UnsupportedFeatureError(f"unknown required record kind 0x{kind:02x}", offset=at)
        if len(seen) >= limits.max_tensors:
            raise LimitExceededError(f"more than {limits.max_tensors} records", offset=at)
        rec = _read_record_header(src, kind, limits, header.alignment)
        src.tensor = rec.name
        if last and rec.name.encode() <= last.encode():  # spec 5.3
            raise CorruptDataError(f"record names must increase; {rec.name!r} follows "
                                   f"{last!r}", tensor=rec.name, offset=at)
        seen.append((rec.name, at))
        last = rec.members[-1].name if rec.members else rec.name
        _check_zero(src.read(rec.data_start - rec.header_end, "record padding"), rec.header_end,
                    rec.name, "record padding")
        data = src.read(rec.data_size, "record data")
        if kind not in header.kinds:
            if _crc(data) != rec.data_crc:
                raise ChecksumError("data checksum mismatch", tensor=rec.name,
                                    offset=rec.data_start)
            continue  # spec 10.2: an unknown optional record is skipped
        if kind == S.KIND_PACK:
            yield from _decode_pack(rec, data, budget, framework, dense, device)
            continue
        yield rec.name, _decode_present(rec, data, budget, framework, dense, device=device)
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
          limits: S.ReadLimits = S.DEFAULT_LIMITS, dense: bool = False,
          device: Any = None) -> dict[str, Any]:
    """Decode a whole file from bytes, checking every byte (spec 8).

    Values are :class:`TernaryTensor` for ternary records and numpy arrays for dense records
    (BF16/F8 widened to float32); ``framework="torch"`` gives torch tensors in the stored dtype.
    ``dense=True`` gives ternary records as dense numpy arrays too (``TernaryTensor.to_numpy``
    values), decoded straight into the array: the fastest way to dense weights.
    ``device`` (a torch device, e.g. ``"cuda"``) gives torch tensors on it: the compressed
    blocks are copied there and decoded with torch operations (on the CPU, the numpy
    decoders), bit-identical to the CPU decoding.

    >>> loads(dumps({"b": np.arange(3, dtype=np.int8)}))["b"]
    array([0, 1, 2], dtype=int8)
    >>> loads(dumps({"t": TernaryTensor((3,), [1], [True], 0.5)}), dense=True)["t"]
    array([ 0. , -0.5,  0. ], dtype=float32)
    """
    check_framework(framework)
    buf = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    return dict(_walk(BufferSource(buf), framework, limits, len(buf), dense, device))


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
        check_framework(framework)
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
        self._members: dict[str, _Record] = {}  # pack members by name (spec 5.8)
        self._packs: dict[int, _Record] = {}  # packs by offset
        self._checked: set[int] = set()  # packs whose data area was verified
        self._closed = False
        ends = [off for _, off in entries[1:]] + [index_at]
        for i, ((name, off), end) in enumerate(zip(entries, ends, strict=False)):
            kind = data[off]
            if kind == S.KIND_PACK and kind in self._header.kinds:
                # the member tables are read now: they hold the names of the tensors
                pack = self._read_at(name, off, end)
                after = entries[i + 1][0] if i + 1 < len(entries) else None
                last = pack.members[-1].name
                if after is not None and last.encode() >= after.encode():
                    raise CorruptDataError(f"pack member {last!r} is not below the next record "
                                           f"{after!r}", tensor=name, offset=off)
                self._packs[off] = pack
                for m in pack.members:
                    self._entries[m.name] = (off, end)
                    self._members[m.name] = m
                continue
            if kind not in self._header.kinds and kind & S.KIND_OPTIONAL_BIT:
                # spec 10.2: an unknown optional record is skipped, as loads does. Its header
                # checksum covers the kind byte: checked first, one flipped bit 7 cannot turn
                # a tensor into a record that is silently left out
                src = BufferSource(data[off:end], base=off)
                src.tensor = name
                src.u8("record kind")
                _read_record_header(src, kind, limits, self._header.alignment)
                continue
            self._entries[name] = (off, end)

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
        if name in self._members:
            return self._members[name]
        return self._read_at(name, off, end)

    def _data(self, rec: _Record) -> memoryview:
        """The data area of a record, or of a pack member once its pack is verified."""
        if rec.in_pack:
            pack = self._packs[rec.offset]
            if rec.offset not in self._checked:
                data = self._buf[pack.data_start : pack.end]
                _check_data_crc(pack, data, rec.name)
                used = pack.members[-1].end
                _check_zero(self._buf[used : pack.end], used, pack.name, "block padding")
                self._checked.add(rec.offset)
        return self._buf[rec.data_start : rec.end]

    def _read_at(self, name: str, off: int, end: int) -> _Record:
        src = BufferSource(self._buf[off:end], base=off)
        src.tensor = name
        kind = src.u8("record kind")
        if kind not in self._header.kinds and not kind & S.KIND_OPTIONAL_BIT:
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
            out: np.ndarray | None = None, device: Any = None) -> Any:
        """Decode one tensor, reading only its bytes.

        ``dense=True`` returns a ternary tensor as its dense numpy array, decoded straight
        from the file (no index array in between); ``out``, a C-contiguous array of the
        right size and dtype (float32 for BF16), then receives it and is returned.
        The dense array is not counted in ``ReadLimits.max_decoded_bytes`` (its size,
        ``info(name).numel`` elements, is known before decoding).
        ``device`` (a torch device) gives a torch tensor decoded on it (see :func:`loads`).
        """
        rec = self._record(name)
        fw = framework or self._framework
        check_framework(fw)
        if rec.kind not in (S.KIND_TERNARY, S.KIND_DENSE):
            raise UnsupportedFeatureError(f"record kind 0x{rec.kind:02x} has no tensor",
                                          tensor=name)
        data = self._data(rec)
        return _decode_present(rec, data, Budget(self._limits, len(self._buf)), fw, dense, out,
                               device)

    def get_raw(self, name: str, *, device: Any = None) -> Any:
        """Return a dense record as ``(storage_array, dtype)`` (BF16 as raw uint16 bits), a
        ternary record as a :class:`TernaryTensor`.

        With a torch ``device``: a dense record's tensor, and a ternary record's positions
        and signs on it, as a :class:`~.codecs.torch_decode.DeviceTernary` (nothing dense).
        """
        rec = self._record(name)
        data = self._data(rec)
        budget = Budget(self._limits, len(self._buf))
        if device is not None and torch_decode.on_device(device):
            return _decode_record(rec, data, budget, device=device)
        value = _decode_record(rec, data, budget)
        value = (value, rec.dtype) if isinstance(value, np.ndarray) else value
        return value if device is None else torch_decode.from_host(value, device)

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
              limits: S.ReadLimits = S.DEFAULT_LIMITS, dense: bool = False,
              device: Any = None) -> dict[str, Any]:
    """Read and check a whole file; like :func:`loads` on its bytes (``device`` too).

    The arrays returned are the caller's, as safetensors' ``load_file`` gives them: writeable,
    and in memory of their own, not views of the file, which is closed on return (it can be
    replaced, truncated or removed meanwhile). Read-only zero-copy views of a memory-mapped
    file are what :func:`open_file` gives.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "x.compeft")
    >>> save_file({"b": np.zeros(3, np.float32)}, p)
    >>> b = load_file(p)["b"]; b += 1; os.remove(p); b
    array([1., 1., 1.], dtype=float32)
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buf = bytearray(size)  # private and writeable: dense records are views of it
        view = memoryview(buf)
        got = 0
        while got < size:  # a file cut meanwhile reads short and fails as truncated
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
    result = loads(view[:got], framework=framework, limits=limits, dense=dense,
                   device=device)
    for name, value in result.items():
        if isinstance(value, np.ndarray) and not value.flags.writeable:
            result[name] = value.copy()  # a zstd frame decodes to immutable bytes
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
