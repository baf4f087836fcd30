"""A field-level model of a compeft 1.0 file, for building test vectors (spec/FORMAT.md §5).

:func:`parse` turns a valid file into a :class:`File`; :func:`serialize` turns a
:class:`File` back into bytes, computing every length, offset, padding and CRC-32 that is not
overridden. An invalid vector is a valid file parsed, changed in one field, and serialized:
the checksums come out right unless the vector is about a checksum, so a reader reaches the
rule the vector is meant to break rather than stopping at a CRC.

This module knows the layout only from the spec; it imports nothing from ``compeft_format``.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

MAGIC = b"\x89CPFT\r\n\x1a"
TAIL_MAGIC = b"CPFE"
FILE_HEADER = struct.Struct("<8sBBBBI")
TRAILER = struct.Struct("<QI4s")
U32 = struct.Struct("<I")
STAGE_NONE = 0


def crc32(*parts: bytes) -> int:
    """CRC-32/ISO-HDLC over the concatenation of ``parts`` (spec §2.4)."""
    value = 0
    for p in parts:
        value = zlib.crc32(p, value)
    return value


def varint(value: int) -> bytes:
    """Minimal unsigned LEB128 of any non-negative int (no upper bound: vectors need big ones)."""
    if value < 0:
        raise ValueError("varint of a negative value")
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def align(offset: int, alignment: int) -> int:
    """Round ``offset`` up to a multiple of ``alignment``."""
    return -(-offset // alignment) * alignment


def padding(n: int, first: int = 0) -> bytes:
    """Return ``n`` padding bytes: zeros, the first replaced by ``first`` (a broken pad)."""
    if first and not n:
        raise ValueError("no padding here to break")
    return bytes([first]) + bytes(n - 1) if n else b""


@dataclass
class Block:
    """One Block_Descriptor and the stored bytes it describes (spec §5.5)."""

    type: int
    stage: int
    param: int
    stored: bytes
    decoded_size: int
    stored_size: int | None = None  #: override of the descriptor's Stored_Size
    pad_byte: int = 0  #: the first padding byte after the stored bytes (others stay 0)

    def descriptor(self) -> bytes:
        """Return the Block_Descriptor bytes."""
        size = len(self.stored) if self.stored_size is None else self.stored_size
        out = bytes([self.type, self.stage]) + varint(self.param) + varint(size)
        if self.stage != STAGE_NONE:
            out += varint(self.decoded_size)
        return out


@dataclass
class Record:
    """One record (spec §5.3, §5.4): its header fields and its blocks.

    ``None`` in an override field means "compute it as a valid writer would".
    """

    kind: int
    name: bytes
    dtype: int = 0x01
    dims: list[int] = field(default_factory=list)
    nnz: int | None = None
    blocks: list[Block] = field(default_factory=list)
    body: bytes | None = None  #: replaces Name_Length .. the last Block_Descriptor
    body_extra: bytes = b""  #: appended after the last Block_Descriptor
    header_length: int | None = None
    header_length_raw: bytes | None = None  #: replaces the Header_Length VarInt bytes
    data_size: int | None = None
    data_size_raw: bytes | None = None  #: replaces the Data_Size VarInt bytes
    data_crc: int | None = None
    header_crc: int | None = None
    pad_byte: int = 0  #: the first byte of the record padding (header end to data area)
    data: bytes | None = None  #: replaces the whole data area
    after: bytes = b""  #: bytes after the data area, before the next record (a hole)

    def build_body(self) -> bytes:
        """Return Name_Length .. the last Block_Descriptor (plus ``body_extra``)."""
        if self.body is not None:
            return self.body + self.body_extra
        out = varint(len(self.name)) + self.name + bytes([self.dtype, len(self.dims)])
        out += b"".join(varint(d) for d in self.dims)
        if self.nnz is not None:
            out += varint(self.nnz)
        out += bytes([len(self.blocks)]) + b"".join(b.descriptor() for b in self.blocks)
        return out + self.body_extra

    def build_data(self, alignment: int) -> bytes:
        """Return the data area: each block's stored bytes, then its padding."""
        if self.data is not None:
            return self.data
        out = bytearray()
        for b in self.blocks:
            out += b.stored + padding(align(len(b.stored), alignment) - len(b.stored), b.pad_byte)
        return bytes(out)


@dataclass
class File:
    """A whole file (spec §4); see :class:`Record` for the meaning of ``None`` overrides."""

    records: list[Record] = field(default_factory=list)
    magic: bytes = MAGIC
    major: int = 1
    minor: int = 0
    log2: int = 3
    flags: int = 0
    metadata: bytes = b""
    metadata_size: int | None = None
    header_crc: int | None = None
    header_pad_byte: int = 0  #: the first byte of the header padding
    index: bytes | None = None  #: replaces the whole Index, its 0x00 byte included
    index_count: int | None = None
    index_entries: list[tuple[bytes, int]] | None = None
    index_offset: int | None = None
    index_crc: int | None = None
    tail: bytes = TAIL_MAGIC
    trailing: bytes = b""

    @property
    def alignment(self) -> int:
        """The alignment the layout is built with (8 when the header's value is out of range)."""
        return 1 << self.log2 if self.log2 <= 12 else 8

    def serialize(self) -> bytes:
        """Return the file's bytes."""
        return serialize(self)


def serialize(f: File) -> bytes:
    """Return the bytes of ``f``: every field not overridden is computed as a writer would."""
    size = len(f.metadata) if f.metadata_size is None else f.metadata_size
    head = FILE_HEADER.pack(f.magic, f.major, f.minor, f.log2, f.flags, size) + f.metadata
    out = bytearray(head)
    out += U32.pack(crc32(head) if f.header_crc is None else f.header_crc)
    a = f.alignment
    out += padding(align(len(out), a) - len(out), f.header_pad_byte)
    offsets = []
    for r in f.records:
        offsets.append(len(out))
        body = r.build_body()
        data = r.build_data(a)
        hl = len(body) + 8 if r.header_length is None else r.header_length
        ds = len(data) if r.data_size is None else r.data_size
        rec = bytes([r.kind])
        rec += varint(hl) if r.header_length_raw is None else r.header_length_raw
        rec += varint(ds) if r.data_size_raw is None else r.data_size_raw
        rec += body + U32.pack(crc32(data) if r.data_crc is None else r.data_crc)
        rec += U32.pack(crc32(rec) if r.header_crc is None else r.header_crc)
        out += rec
        out += padding(align(len(out), a) - len(out), r.pad_byte)
        out += data + r.after
    index_at = len(out)
    if f.index is None:
        entries = f.index_entries
        if entries is None:
            entries = [(r.name, off) for r, off in zip(f.records, offsets, strict=True)]
        count = len(entries) if f.index_count is None else f.index_count
        index = b"\x00" + varint(count)
        index += b"".join(varint(len(n)) + n + varint(o) for n, o in entries)
    else:
        index = f.index
    out += index
    out += TRAILER.pack(index_at if f.index_offset is None else f.index_offset,
                        crc32(index) if f.index_crc is None else f.index_crc, f.tail)
    return bytes(out + f.trailing)


class _Cursor:
    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data, self.pos = data, pos

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        if len(out) != n:
            raise ValueError("parse: unexpected end (only valid files are parsed)")
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            b = self.u8()
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value


def parse(data: bytes) -> File:
    """Return the :class:`File` of a *valid* file, so that ``serialize(parse(d)) == d``."""
    c = _Cursor(data)
    magic, major, minor, log2, flags, msize = FILE_HEADER.unpack(c.take(FILE_HEADER.size))
    f = File(magic=magic, major=major, minor=minor, log2=log2, flags=flags,
             metadata=c.take(msize))
    c.take(4)
    c.pos = align(c.pos, f.alignment)
    while True:
        kind = c.u8()
        if kind == 0:
            break
        c.varint()  # Header_Length
        c.varint()  # Data_Size
        name = c.take(c.varint())
        if kind not in (1, 2):
            raise ValueError("parse: only records of kind 1 and 2 are modelled")
        rec = Record(kind, name, dtype=c.u8())
        rec.dims = [c.varint() for _ in range(c.u8())]
        if kind == 1:
            rec.nnz = c.varint()
        descs = []
        for _ in range(c.u8()):
            btype, stage, param, stored = c.u8(), c.u8(), c.varint(), c.varint()
            decoded = c.varint() if stage != STAGE_NONE else stored
            descs.append((btype, stage, param, stored, decoded))
        c.take(8)  # Data_Checksum, Header_Checksum
        c.pos = align(c.pos, f.alignment)
        for btype, stage, param, stored, decoded in descs:
            rec.blocks.append(Block(btype, stage, param, c.take(stored), decoded))
            c.pos = align(c.pos, f.alignment)
        f.records.append(rec)
    if serialize(f) != data:
        raise ValueError("parse: the file does not serialize back to the same bytes")
    return f
