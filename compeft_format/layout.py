"""The file layout of spec 5: the only module that knows where things sit in a file.

Layout (spec 4)::

    File_Header | Metadata | Header_Checksum | pad | Record* | Index | Trailer

Each record is a self-describing header followed by an aligned data area holding its blocks.
This module parses every structure (the file header, record headers, pack member tables, the
index) and builds the pieces the writer assembles (block descriptors, pack tables); it
checks every rule that is about bytes and offsets. :mod:`.writer` decides what to write,
:mod:`.reader` decodes and presents tensors; neither parses bytes itself.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _spec as S
from ._io import BufferSource, Source, encode_varint
from .budget import Budget
from .codecs import NAMES_ZSTD, ZSTD, BlockContext, get_codec
from .codecs._bits import concat_bits, packed_slice
from .codecs.golomb import stream_bits as golomb_stream_bits
from .errors import (
    BadMagicError,
    ChecksumError,
    CorruptDataError,
    LimitExceededError,
    TruncatedError,
    UnsupportedFeatureError,
    UnsupportedVersionError,
)
from .info import BlockInfo, TensorInfo
from .metadata import decode_metadata, unstage_metadata
from .packtable import (
    Member,
    common_prefix,
    decode_name,
    member_name,
    read_column_table,
    read_scale_columns,
    read_tight_scale_columns,
)

__all__ = [
    "BLOCK_ROLES",
    "MAX_RECORD_HEADER",
    "PACK_KINDS",
    "RECORD_OVERHEAD",
    "TABLE_NAMED_KINDS",
    "Header",
    "PackMember",
    "Record",
    "align",
    "check_data_crc",
    "check_pack_data",
    "check_zero",
    "crc32",
    "descriptor",
    "member_payloads",
    "pack_table",
    "read_file_header",
    "read_index",
    "read_record_header",
    "verify_index_crc",
]


MAX_RECORD_HEADER = 1 << 16  # spec 9.2: a record header above 64 KiB is rejected
# what a ternary record costs beyond its blocks and two copies of its name (header fields,
# descriptors, checksums, index entry), for the writer's pack-or-record choice (Appendix D)
RECORD_OVERHEAD = 32


def crc32(*parts: bytes | memoryview) -> int:
    """CRC-32 (ISO-HDLC, as zlib) over the concatenation of ``parts`` (spec 2.4)."""
    value = 0
    for p in parts:
        value = zlib.crc32(p, value)
    return value


def align(offset: int, alignment: int) -> int:
    return -(-offset // alignment) * alignment


def descriptor(block_type: int, stage: int, param: int, stored: int, decoded: int) -> bytes:
    out = bytes([block_type, stage]) + encode_varint(param) + encode_varint(stored)
    if stage != S.STAGE_NONE:
        out += encode_varint(decoded)
    return out


def pack_table(members: list[PackMember], prev: bytes | None = None) -> bytes:
    """The member table of a 1.1 pack (spec 5.8): names front-coded, then the fixed fields.

    The first name is coded against the record's name, which is the same (``prev``
    defaults to it): a pack stores each name once, and its first in the index too. (A 1.2
    column pack's table is :func:`~compeft_format.packtable.column_table`.)
    """
    out = bytearray()
    prev = members[0].name if prev is None else prev
    for m in members:
        f = m.fields
        shared = common_prefix(prev, m.name)
        out += encode_varint(shared) + encode_varint(len(m.name) - shared) + m.name[shared:]
        out += bytes([S.DTYPE_CODES[f.dtype], len(f.shape)])
        out += b"".join(encode_varint(d) for d in f.shape) + encode_varint(f.nnz)
        out += bytes([f.ptype]) + encode_varint(f.param) + encode_varint(f.psize)
        prev = m.name
    return bytes(out)


@dataclass
class PackMember:
    """A tensor waiting in a pack: its name, its data, and its member-table fields."""

    name: bytes
    parts: tuple[bytes, bytes, bytes]  # positions, signs, scale
    cost: int  # decode-budget charge (spec 9.3)
    fields: Member  # the table fields, for any kind of pack (spec 5.8, 5.9, 5.10)

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.parts)

    @property
    def compact_size(self) -> int:
        """Bytes in a compact pack's data area (spec 5.10: the scale is in the table)."""
        return len(self.parts[0]) + len(self.parts[1])


@dataclass
class Header:
    version: tuple[int, int]
    alignment: int
    metadata: dict[str, Any]
    end: int  # offset of the first record (aligned)
    flags: int = 0  # spec 5.1 Flags

    @property
    def short_trailer(self) -> bool:
        """Whether the file ends in the 12-byte trailer (spec 5.7, ``Flags`` bit 3, 1.7)."""
        return bool(self.flags & S.FLAG_SHORT_TRAILER)

    @property
    def trailer_size(self) -> int:
        """The trailer's size (spec 5.7): 16 bytes, 12 with :attr:`short_trailer`."""
        return S.SHORT_TRAILER.size if self.short_trailer else S.TRAILER_SIZE

    @property
    def kinds(self) -> tuple[int, ...]:
        """The record kinds of this file's version (spec 5.3: packs from 1.1, 5.9 from 1.2,
        5.10 from 1.3, 5.11 from 1.4, 5.12 from 1.5, 5.13 from 1.6, 5.14 from 1.7)."""
        packs = [kind for since, kind in S.PACK_KIND_SINCE.items() if self.version[1] >= since]
        return (S.KIND_TERNARY, S.KIND_DENSE, *packs)

    @property
    def nameless_index(self) -> bool:
        """Whether a compact, bit, lean, tight or twin pack's index entry may have no name (spec
        5.6, 1.4)."""
        return self.version[1] >= S.NAMELESS_INDEX_MINOR


def read_file_header(src: Source, limits: S.ReadLimits, budget: Budget) -> Header:
    """Parse File_Header, Metadata and Header_Checksum (spec 5.1), and the padding after.

    Compressed metadata (1.2) is charged to ``budget`` (spec 9.3): a sequential decoding's,
    or the opening's for random access.
    """
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
    known = S.FLAG_METADATA_ZSTD | (S.FLAG_METADATA_BARE if minor >= S.BARE_FRAMES_MINOR else 0)
    if minor >= S.FLAGS_1_7_MINOR:
        known |= S.FLAG_METADATA_UNSIZED | S.FLAG_SHORT_TRAILER
    if flags & ~known or (flags and minor < 2):  # spec 5.1: reserved bits (R-HDR-4)
        raise CorruptDataError(f"reserved header flags must be zero (got 0x{flags:02x})", offset=11)
    if flags & S.FLAG_METADATA_BARE and not flags & S.FLAG_METADATA_ZSTD:  # spec 5.1 (1.6)
        raise CorruptDataError("header flag bit 1 (bare metadata frame) is set without bit 0 "
                               "(compressed metadata)", offset=11)
    if flags & S.FLAG_METADATA_UNSIZED and not flags & S.FLAG_METADATA_BARE:  # spec 5.1 (1.7)
        raise CorruptDataError("header flag bit 2 (unsized metadata frame) is set without "
                               "bit 1 (bare metadata frame)", offset=11)
    if meta_size > limits.max_metadata_size:
        raise LimitExceededError(f"metadata is {meta_size} bytes; limit "
                                 f"{limits.max_metadata_size}", offset=12)
    meta_bytes = src.read(meta_size, "metadata")
    stored = S.CHECKSUM.unpack(src.read(S.CHECKSUM_SIZE, "header checksum"))[0]
    computed = crc32(raw, meta_bytes)
    if stored != computed:
        raise ChecksumError(f"header checksum mismatch: stored 0x{stored:08x}, computed "
                            f"0x{computed:08x}", offset=src.pos - 4)
    if flags & S.FLAG_METADATA_ZSTD:  # spec 5.2, 8.1 step 3a
        meta_bytes = unstage_metadata(meta_bytes, S.FILE_HEADER_SIZE, limits,
                                      lambda n, ctx: budget.charge(n, ctx, src.pos),
                                      bool(flags & S.FLAG_METADATA_BARE),
                                      sized=not flags & S.FLAG_METADATA_UNSIZED)
    metadata = decode_metadata(meta_bytes, S.FILE_HEADER_SIZE, limits)
    alignment = 1 << log2
    pad_at = src.pos
    end = align(pad_at, alignment)
    check_zero(src.read(end - pad_at, "header padding"), pad_at, None, "header padding")
    return Header((major, minor), alignment, metadata, end, flags)


def check_zero(data: memoryview, offset: int, tensor: str | None, what: str) -> None:
    """Padding bytes MUST be zero (spec 5.4)."""
    if any(data):
        i = next(i for i, b in enumerate(data) if b)
        raise CorruptDataError(f"{what}: padding byte is 0x{data[i]:02x}, must be 0x00",
                               tensor=tensor, offset=offset + i)


@dataclass
class Record:
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
    members: tuple[Record, ...] = ()  # a pack's tensors (spec 5.8), data_start absolute
    used_bits: int = 0  # a pack's: the bits of its data area its members use
    in_pack: bool = False  # a member of a pack: no checksum, no alignment of its own
    #: a compact pack member's scale (spec 5.10): its 4 bytes and the table's offset
    table_scale: tuple[bytes, int] | None = None
    #: a bit pack member (spec 5.11): its first bit within the byte at ``data_start`` (0 to
    #: 7) and its ``Positions_Bits``; its signs follow, ``nnz`` bits
    bit_span: tuple[int, int] | None = None
    #: a twin pack member that is a twin (spec 5.14): its source, the member of the same pack
    #: whose streams it reads; None for any other record
    twin: Record | None = None

    @property
    def end(self) -> int:
        """Offset just after the record's data area."""
        return self.data_start + self.data_size

    def info(self) -> TensorInfo:
        infos, cursor = [], self.data_start
        if self.bit_span is not None:  # spec 5.11: two streams, bit after bit
            first, pbits = self.bit_span
            for (btype, _, param, stored, _), at, bits in zip(
                    self.blocks, (first, first + pbits), (pbits, self.nnz or 0), strict=False):
                infos.append(BlockInfo(_codec_name(btype), btype, "none", param, stored,
                                       stored, self.data_start + (at >> 3), bits, at & 7))
        for btype, stage, param, stored, decoded in self.blocks[2 * (self.bit_span
                                                                     is not None):]:
            codec = _codec_name(btype)
            infos.append(BlockInfo(codec, btype, "zstd" if stage else "none", param, stored,
                                   decoded, cursor))
            cursor += stored + (-stored % self.alignment)
        if self.table_scale is not None:  # in the pack's member table, not the data area
            infos.append(BlockInfo("scale", S.BLOCK_SCALE, "table", S.SCALE_F32, 4, 4,
                                   self.table_scale[1]))
        kind = "ternary" if self.kind == S.KIND_TERNARY else "dense"
        # a pack member's share of the file is its data (the pack's header is shared)
        size = self.data_size if self.in_pack else self.end - self.offset
        if self.bit_span is not None:  # spec 5.11: its bits, rounded up to bytes
            size = -(-(self.bit_span[1] + (self.nnz or 0)) // 8)
        if self.twin is not None:  # spec 5.14: its streams are its source's; it adds none
            size = 0
        return TensorInfo(self.name, kind, self.dtype, self.shape, self.nnz, tuple(infos),
                          self.offset, size, None if self.twin is None else self.twin.name)


def _codec_name(btype: int) -> str:
    try:
        return get_codec(btype).name
    except UnsupportedFeatureError:
        return f"0x{btype:02x}"


def _read_name(src: Source, limits: S.ReadLimits, what: str, empty: bool = False) -> str:
    start = src.pos
    n = src.varint(f"{what} name length")
    if empty and n == 0:  # spec 5.6 (1.4): a compact or bit pack's index entry
        return ""
    if not 1 <= n <= limits.max_name_length:
        raise LimitExceededError(f"{what} name length {n} outside [1, {limits.max_name_length}]",
                                 offset=start)
    return decode_name(bytes(src.read(n, f"{what} name")), what, start)


def read_record_header(src: Source, kind: int, limits: S.ReadLimits, alignment: int) -> Record:
    """Parse one record header after its Record_Kind byte (spec 5.3, 5.4, 5.5)."""
    offset = src.pos - 1
    header_len = src.varint("record header length")
    if not 8 <= header_len <= MAX_RECORD_HEADER:
        raise LimitExceededError(f"record header length {header_len} outside [8, "
                                 f"{MAX_RECORD_HEADER}]", offset=offset + 1)
    data_size_at = src.pos
    data_size = src.varint("record data size")
    # everything up to Header_Checksum is covered by it: check before trusting any field
    body_start = src.pos
    body = src.read(header_len - 4, "record header")
    stored = S.CHECKSUM.unpack(src.read(4, "record header checksum"))[0]
    prefix = bytes([kind]) + encode_varint(header_len) + encode_varint(data_size)
    computed = crc32(prefix, body)
    if stored != computed or body_start - offset != len(prefix):
        raise ChecksumError(f"record header checksum mismatch: stored 0x{stored:08x}, computed "
                            f"0x{computed:08x}", offset=src.pos - 4)
    header_end = src.pos
    data_start = align(header_end, alignment)
    b = BufferSource(body[:-4], base=body_start)
    data_crc = S.CHECKSUM.unpack(body[-4:])[0]
    if kind in TABLE_NAMED_KINDS:  # spec 5.10 to 5.14: no Name; the first member's is its name
        return _read_pack(b, "", limits, Record(
            kind, "", "", (), None, [], data_crc, offset, header_end, data_start, data_size,
            alignment), data_size_at)
    name = _read_name(b, limits, "tensor")
    b.tensor = name
    if kind in PACK_KINDS:
        return _read_pack(b, name, limits, Record(
            kind, name, "", (), None, [], data_crc, offset, header_end, data_start, data_size,
            alignment), data_size_at)
    if kind not in (S.KIND_TERNARY, S.KIND_DENSE):
        return Record(kind, name, "", (), None, [], data_crc, offset, header_end, data_start,
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
    rec = Record(kind, name, dtype, shape, nnz, blocks, data_crc, offset, header_end,
                  data_start, data_size, alignment)
    # spec 5.4: the data area is exactly the aligned blocks, nothing more
    expected = sum(align(blk[3], alignment) for blk in blocks)
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


def _read_pack(b: BufferSource, name: str, limits: S.ReadLimits, rec: Record,
               data_size_at: int) -> Record:
    """The rest of a pack record's body: its member table (spec 5.8 to 5.14).

    A compact, bit, lean, tight or twin pack (spec 5.10 to 5.14) comes with ``name`` empty: its
    name is its first member's. A lean, tight or twin pack's members are placed only once its
    data area is read (:func:`check_pack_data`): until then their ``bit_span`` is None and
    ``used_bits`` -1.
    """
    compact = rec.kind in TABLE_NAMED_KINDS
    lean = rec.kind in (S.KIND_LEAN_PACK, S.KIND_TIGHT_PACK, S.KIND_TWIN_PACK)
    bits = lean or rec.kind == S.KIND_BIT_PACK
    tight = rec.kind in (S.KIND_TIGHT_PACK, S.KIND_TWIN_PACK)
    twins = rec.kind == S.KIND_TWIN_PACK
    at = b.pos
    count = b.varint("member count")
    if count < 1:
        raise CorruptDataError("a pack holds at least one member", tensor=name or None,
                               offset=at)
    stage_at = b.pos
    stage = b.u8("table stage")
    stored = b.varint("table stored size")
    stages = (S.STAGE_NONE, S.STAGE_ZSTD) + (S.STAGE_ZSTD_NAMES,) * compact
    if stage not in stages:
        raise UnsupportedFeatureError(f"unknown stage 0x{stage:02x}", tensor=name or None,
                                      offset=stage_at)
    # spec 5.14 (1.7): a twin pack's table frame gives its decoded size itself
    sized = stage != S.STAGE_NONE and not twins
    decoded = b.varint("table decoded size") if sized else stored
    if sized:
        _check_table_size(decoded, name, stage_at + 1)
    table_at = b.pos
    table = b.read(stored, "pack table")
    if not b.at_end():
        raise CorruptDataError(f"{b.remaining} unexpected bytes at the end of the record header",
                               tensor=name or None, offset=b.pos)
    if stage != S.STAGE_NONE:
        ctx = BlockContext(name or None, 0, 0, "F32", (), table_at)
        zstd = NAMES_ZSTD if stage == S.STAGE_ZSTD_NAMES else ZSTD
        if not sized:
            decoded = zstd.declared_size(table, ctx, bare=tight)
            _check_table_size(decoded, name, table_at)
        table = memoryview(zstd.decode(table, decoded, ctx, bare=tight))  # spec 5.13
    t = BufferSource(table, base=table_at)
    if compact:
        fields = read_column_table(t, count, None, limits,
                                   "none" if lean else "bits" if bits else "bytes", twins)
    elif rec.kind == S.KIND_COLUMN_PACK:
        fields = read_column_table(t, count, name, limits)
    else:
        fields = _read_row_table(t, count, name, limits)
    names = [f.name.decode() for f in fields]  # checked UTF-8 by the table's reader
    scales: list[bytes | None] = [None] * count
    if compact:
        name = rec.name = names[0]
        scales = list((read_tight_scale_columns if tight else read_scale_columns)(t, names))
    members, cursor = [], 0  # cursor: bytes into the data area; bits in a bit pack
    for f, mname, scale in zip(fields, names, scales, strict=True):
        ssize = -(-f.nnz // 8)
        blocks = [(f.ptype, S.STAGE_NONE, f.param, f.psize, f.psize),
                  (S.BLOCK_SIGNS, S.STAGE_NONE, 0, ssize, ssize)]
        if scale is None:  # spec 5.8: the scale follows the signs in the data area
            blocks.append((S.BLOCK_SCALE, S.STAGE_NONE, S.SCALE_F32, 4, 4))
        m = Record(S.KIND_TERNARY, mname, f.dtype, f.shape, f.nnz, blocks, 0, rec.offset,
                   rec.header_end, rec.data_start + cursor, sum(blk[3] for blk in blocks),
                   in_pack=True, table_scale=None if scale is None else (scale, table_at),
                   twin=members[-f.twin] if f.twin else None)
        members.append(m)
        if lean:
            continue
        if bits:
            cursor = _place_bits(m, rec.data_start, cursor, f.psize)
        else:
            cursor += m.data_size
    t.tensor = name
    if not t.at_end():
        raise CorruptDataError(f"{t.remaining} unexpected bytes at the end of the pack table",
                               tensor=name, offset=t.pos)
    rec.members = tuple(members)
    if lean:  # spec 5.12 to 5.14: the members' lengths are in their streams
        rec.used_bits = -1
        return rec
    used = -(-cursor // 8) if bits else cursor
    if rec.data_size != align(used, rec.alignment):
        raise CorruptDataError(f"data size {rec.data_size} does not match the pack's members "
                               f"({align(used, rec.alignment)})", tensor=name,
                               offset=data_size_at)
    rec.used_bits = cursor if bits else 8 * cursor
    return rec


def _check_table_size(decoded: int, name: str, at: int) -> None:
    """R-PACK-2: a member table decodes to at most 1 MiB, checked before decompressing."""
    if decoded > S.PACK_TABLE_MAX:
        raise CorruptDataError(f"pack table: decoded size {decoded} exceeds "
                               f"{S.PACK_TABLE_MAX}", tensor=name or None, offset=at)


def _place_bits(m: Record, data_start: int, cursor: int, pbits: int) -> int:
    """Place a bit, lean, tight or twin pack member (spec 5.11 to 5.14) whose positions stream of
    ``pbits`` bits starts at bit ``cursor`` of its pack's data area; return the bit after
    its signs."""
    nnz = m.nnz or 0
    psize, ssize = -(-pbits // 8), -(-nnz // 8)  # its payloads, moved to a byte boundary
    m.blocks = [(m.blocks[0][0], S.STAGE_NONE, m.blocks[0][2], psize, psize),
                (S.BLOCK_SIGNS, S.STAGE_NONE, 0, ssize, ssize)]
    m.data_start = data_start + (cursor >> 3)  # the bytes that hold its bits
    m.data_size = -(-(cursor + pbits + nnz) // 8) - (cursor >> 3)
    m.bit_span = (cursor & 7, pbits)
    return cursor + pbits + nnz


def place_lean_members(pack: Record, data: memoryview) -> None:
    """Find where each member of a lean, tight or twin pack (spec 5.12 to 5.14) starts by
    reading the streams before it: a bitmask stream is ``numel`` bits, a golomb stream ends
    with its last code's one bit (:func:`~compeft_format.codecs.golomb.stream_bits`); a twin
    (5.14) takes no bits and is placed on its source's streams. R-LPK-1: each member's
    streams lie in the data area; R-PACK-8: the data area is exactly what they take,
    aligned."""
    buf = np.frombuffer(data, dtype=np.uint8)
    end, cursor = 8 * len(data), 0
    for m in pack.members:
        if m.twin is not None:  # spec 5.14: no streams of its own; it reads its source's
            src = m.twin
            m.blocks, m.data_start, m.data_size = list(src.blocks), src.data_start, src.data_size
            m.bit_span = src.bit_span
            continue
        ptype, _, param, _, _ = m.blocks[0]
        numel, nnz = math.prod(m.shape), m.nnz or 0
        pbits = numel if ptype == S.BLOCK_BITMASK else golomb_stream_bits(
            buf, cursor, nnz, max(1, param), numel, end)
        if pbits is None:
            bound = nnz + max(numel - nnz, 0) // max(1, param)
            problem = (f"its golomb stream does not end within the data area and the "
                       f"{bound} unary bits it may take")
        elif cursor + pbits + nnz > end:
            problem = f"its {'signs' if pbits <= end - cursor else 'bitmask'} stream runs " \
                      "past the data area"
        else:
            cursor = _place_bits(m, pack.data_start, cursor, pbits)
            continue
        kind = {S.KIND_TIGHT_PACK: "tight", S.KIND_TWIN_PACK: "twin"}.get(pack.kind, "lean")
        raise CorruptDataError(f"{kind} pack member: {problem} ({end - cursor} bits left)",
                               tensor=m.name, offset=pack.data_start + (cursor >> 3))
    want = align(-(-cursor // 8), pack.alignment)
    if pack.data_size != want:
        raise CorruptDataError(f"data size {pack.data_size} does not match the pack's members "
                               f"({want})", tensor=pack.name, offset=pack.data_start)
    pack.used_bits = cursor


def _read_row_table(t: BufferSource, count: int, name: str, limits: S.ReadLimits,
                    ) -> list[Member]:
    """The entries of a 1.1 pack's member table (spec 5.8, 8.1 step 8a), checked in order."""
    t.tensor = name
    members: list[Member] = []
    prev = name.encode()  # the first name is coded against the pack's Name
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
        mname = member_name(raw, at, not members, prev, name)
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
        members.append(Member(raw, dtype, shape, nnz, ptype, param, psize))
        prev = raw
    t.tensor = name
    return members


#: the record kinds that hold pack members: 1.1 packs (spec 5.8), column packs (5.9),
#: compact packs (5.10), bit packs (5.11), lean packs (5.12), tight packs (5.13) and twin
#: packs (5.14)
PACK_KINDS = (S.KIND_PACK, S.KIND_COLUMN_PACK, S.KIND_COMPACT_PACK, S.KIND_BIT_PACK,
              S.KIND_LEAN_PACK, S.KIND_TIGHT_PACK, S.KIND_TWIN_PACK)
#: the packs with no Name in their body: their name is their first member's (spec 5.10)
TABLE_NAMED_KINDS = (S.KIND_COMPACT_PACK, S.KIND_BIT_PACK, S.KIND_LEAN_PACK, S.KIND_TIGHT_PACK,
                     S.KIND_TWIN_PACK)
BLOCK_ROLES = {S.BLOCK_BITMASK: "positions", S.BLOCK_GOLOMB: "positions", S.BLOCK_SIGNS: "signs",
          S.BLOCK_SCALE: "scale", S.BLOCK_DENSE: "dense"}


def _check_block_set(rec: Record) -> None:
    """Spec 5.5: which known blocks a record holds, in what order; unknown ones by their bit."""
    roles = []
    for btype, *_ in rec.blocks:
        if btype in BLOCK_ROLES:
            roles.append(BLOCK_ROLES[btype])
        elif not btype & S.BLOCK_OPTIONAL_BIT:
            raise UnsupportedFeatureError(f"unknown required block type 0x{btype:02x}",
                                          tensor=rec.name, offset=rec.offset)
    want = ["positions", "signs", "scale"] if rec.kind == S.KIND_TERNARY else ["dense"]
    if roles != want:
        raise CorruptDataError(f"blocks {roles} break the rule of this record kind ({want})",
                               tensor=rec.name, offset=rec.offset)


def check_data_crc(rec: Record, data: memoryview, tensor: str | None = None) -> None:
    """Data_Checksum of a record (spec 5.3, R-REC-9); ``tensor``: the pack member asked for."""
    computed = crc32(data)
    if computed != rec.data_crc:
        where = ""
        if rec.members:  # one checksum covers them all: say which tensors may be damaged
            where = (f" (a pack of {len(rec.members)} tensors, {rec.members[0].name!r} to "
                     f"{rec.members[-1].name!r})")
        raise ChecksumError(f"data checksum mismatch: stored 0x{rec.data_crc:08x}, computed "
                            f"0x{computed:08x}{where}", tensor=tensor or rec.name,
                            offset=rec.data_start)


def positions_bits(ptype: int, payload: bytes, numel: int) -> int:
    """The length in bits of a positions payload's stream (spec 5.11): ``numel`` for a
    bitmask, up to and with the last one bit for golomb (0 for an empty block).

    >>> positions_bits(0x02, bytes([0b1011, 0b10]), 64), positions_bits(0x01, b"\x01", 5)
    (10, 5)
    """
    if ptype == S.BLOCK_BITMASK:
        return numel
    body = payload.rstrip(b"\x00")
    return 8 * (len(body) - 1) + body[-1].bit_length() if body else 0


def bit_pack_data(streams: list[tuple[bytes, int]]) -> bytes:
    """A bit pack's data area before its alignment padding (spec 5.11): the ``(payload,
    bits)`` streams one after the other, bit after bit.

    >>> bit_pack_data([(b"\x01", 1), (b"\x03", 2)]).hex()
    '07'
    """
    return concat_bits((np.frombuffer(p, dtype=np.uint8), n) for p, n in streams)


def read_index(src: Source, limits: S.ReadLimits, nameless: bool = False,
               ) -> list[tuple[str, int]]:
    """Parse the Index after its 0x00 kind byte (spec 5.6).

    ``nameless``: the file is 1.4 or later, where a compact, bit, lean, tight or twin pack's entry
    may have no name (``Name_Length`` 0, given as ``""``).
    """
    at = src.pos
    count = src.varint("tensor count")
    if count > limits.max_tensors:
        raise LimitExceededError(f"{count} tensors; limit {limits.max_tensors}", offset=at)
    entries: list[tuple[str, int]] = []
    for _ in range(count):
        name = _read_name(src, limits, "index", nameless)
        entries.append((name, src.varint("record offset")))
    return entries


def check_pack_data(pack: Record, data: memoryview, tensor: str | None = None) -> None:
    """Check a pack's whole data area: its checksum (R-REC-9), then the padding after its last
    member (R-BLK-4): in a bit pack (spec 5.11) from the bit after the last member's last."""
    check_data_crc(pack, data, tensor)
    if pack.used_bits < 0:  # a lean, tight or twin pack (spec 5.12 to 5.14): placed now
        place_lean_members(pack, data)
    used = pack.used_bits >> 3
    tail = pack.used_bits & 7
    if tail and data[used] >> tail:
        raise CorruptDataError(f"block padding: padding bits of byte 0x{data[used]:02x} after "
                               f"bit {tail} must be 0", tensor=pack.name,
                               offset=pack.data_start + used)
    used += tail > 0
    check_zero(data[used:], pack.data_start + used, pack.name, "block padding")


def member_payloads(rec: Record, span: memoryview) -> memoryview:
    """The data a pack member's blocks read: ``span``, the bytes that hold it, or for a bit
    pack member (spec 5.11) its two streams, each moved to a byte boundary and zero padded.

    R-BPK-1 is checked first: a bitmask stream is ``numel`` bits long, a golomb stream ends
    with the one bit of its last code (0 bits when there is none).
    """
    if rec.bit_span is None:
        return span
    first, pbits = rec.bit_span
    nnz, numel = rec.nnz or 0, math.prod(rec.shape)
    buf = np.frombuffer(span, dtype=np.uint8)
    ptype = rec.blocks[0][0]
    if ptype == S.BLOCK_BITMASK and pbits != numel:
        problem = f"bitmask stream of {pbits} bits, numel is {numel}"
    elif ptype == S.BLOCK_GOLOMB and nnz == 0 and pbits:
        problem = f"golomb stream of {pbits} bits, nnz is 0"
    elif ptype == S.BLOCK_GOLOMB and nnz and not (
            pbits and buf[(first + pbits - 1) >> 3] >> ((first + pbits - 1) & 7) & 1):
        problem = f"golomb stream of {pbits} bits does not end with a one bit"
    else:
        problem = ""
    if problem:
        raise CorruptDataError(f"bit pack member: {problem}", tensor=rec.name,
                               offset=rec.data_start + ((first + pbits) >> 3))
    if len(span) <= _SMALL_SPAN:  # one Python int: numpy costs microseconds a call here
        x = int.from_bytes(span, "little") >> first
        return memoryview((x & ((1 << pbits) - 1)).to_bytes(-(-pbits // 8), "little")
                          + ((x >> pbits) & ((1 << nnz) - 1)).to_bytes(-(-nnz // 8), "little"))
    positions = packed_slice(buf, first, pbits)
    signs = packed_slice(buf, first + pbits, nnz)
    return memoryview(positions.tobytes() + signs.tobytes())


_SMALL_SPAN = 4096  # bytes: up to this, member_payloads shifts a Python int (faster there)


def verify_index_crc(buf: memoryview, index_at: int, crc: int,
                     trailer: int = S.TRAILER_SIZE) -> None:
    """R-TRL-3: ``Index_Checksum`` is the CRC-32 of the bytes from the index to the
    ``trailer``-byte trailer."""
    computed = crc32(buf[index_at : len(buf) - trailer])
    if computed != crc:
        raise ChecksumError(f"index checksum mismatch: stored 0x{crc:08x}, computed "
                            f"0x{computed:08x}", offset=len(buf) - 8)


def pack_trailer(short: bool, index_at: int, index: bytes) -> bytes:
    """The trailer after ``index``, which starts at ``index_at`` (spec 5.7): ``Index_Offset``
    (8 bytes), or ``short`` (``Flags`` bit 3, 1.7) ``Index_Size`` (4), then
    ``Index_Checksum`` and ``Tail_Magic``.

    >>> pack_trailer(True, 100, bytes(2)).hex(" ")
    '02 00 00 00 ff 12 d9 41 43 50 46 45'
    """
    if not short:
        return S.TRAILER.pack(index_at, crc32(index), S.TAIL_MAGIC)
    return S.SHORT_TRAILER.pack(len(index), crc32(index), S.TAIL_MAGIC)


def unpack_trailer(short: bool, raw: bytes | memoryview, trailer_at: int,
                   ) -> tuple[int, int, bytes]:
    """``(index offset, Index_Checksum, Tail_Magic)`` of the trailer ``raw`` at ``trailer_at``
    (spec 5.7); a ``short`` one's offset is ``trailer_at - Index_Size`` (negative for a size
    that reaches before the file: R-TRL-5 rejects it).

    >>> unpack_trailer(True, pack_trailer(True, 100, bytes(2)), 102)[0]
    100
    """
    if not short:
        offset, crc, tail = S.TRAILER.unpack(raw)
        return offset, crc, bytes(tail)
    size, crc, tail = S.SHORT_TRAILER.unpack(raw)
    return trailer_at - size, crc, bytes(tail)
