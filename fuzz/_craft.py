"""Build compeft files byte by byte, independently of the package, with valid checksums.

Hostile-input tests and the fuzz harnesses need files that are wrong in exactly one way:
a huge declared size, a bad name, a zstd bomb. Those bytes must still carry *correct*
CRC-32s, or the reader stops at the first checksum and the rule under test is never reached.
This module therefore spells the layout of docs/DESIGN.md (spec 5) again, in plain ``struct``
and ``zlib`` code, without importing ``compeft_format``: a bug shared by the writer and the
reader cannot hide here, and atheris can instrument the package without this module.

Two tools:

* :func:`build_file` / :func:`record` / :func:`block`: assemble a file from parts.
* :func:`fix_checksums`: re-compute every CRC (header, each record's data and header, index)
  and the trailer's index offset of a file that was mutated in place. It never raises.

>>> data = build_file([record(b"a", dtype=1, shape=(4,), nnz=0,
...                          blocks=[block(2, param=1), block(3), block(4, payload=bytes(4))])])
>>> data[:8], data[-4:]
(b'\\x89CPFT\\r\\n\\x1a', b'CPFE')
>>> fix_checksums(data) == data
True
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

MAGIC = b"\x89CPFT\r\n\x1a"
TAIL_MAGIC = b"CPFE"
KIND_TERNARY, KIND_DENSE, KIND_END = 0x01, 0x02, 0x00
BITMASK, GOLOMB, SIGNS, SCALE, DENSE = 0x01, 0x02, 0x03, 0x04, 0x05
STAGE_NONE, STAGE_ZSTD = 0x00, 0x01
F32, F16, BF16, F64, U8 = 0x01, 0x02, 0x03, 0x04, 0x09

__all__ = [
    "BF16",
    "BITMASK",
    "DENSE",
    "F16",
    "F32",
    "F64",
    "GOLOMB",
    "KIND_DENSE",
    "KIND_END",
    "KIND_TERNARY",
    "MAGIC",
    "SCALE",
    "SIGNS",
    "STAGE_NONE",
    "STAGE_ZSTD",
    "TAIL_MAGIC",
    "U8",
    "Block",
    "Record",
    "block",
    "build_file",
    "crc",
    "file_header",
    "fix_checksums",
    "read_varint",
    "record",
    "varint",
]


def crc(*parts: bytes | bytearray | memoryview) -> int:
    """CRC-32 (zlib) over the concatenation of ``parts``."""
    value = 0
    for p in parts:
        value = zlib.crc32(p, value)
    return value


def varint(value: int) -> bytes:
    """Unsigned LEB128; any value >= 0 (the 2**63 bound is the reader's to enforce)."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def read_varint(buf: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    """Return ``(value, next_pos)`` for a LEB128 VarInt at ``pos``, or None if it runs out."""
    value = 0
    for i in range(10):
        if pos + i >= len(buf):
            return None
        byte = buf[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos + i + 1
    return None


def _pad(n: int, alignment: int) -> int:
    return -n % alignment


@dataclass
class Block:
    """One block: descriptor fields plus the stored bytes (``decoded`` only with a stage)."""

    btype: int
    stage: int = STAGE_NONE
    param: int = 0
    payload: bytes = b""
    decoded: int | None = None
    stored_size: int | None = None  #: override the declared Stored_Size (default: the payload's)

    def descriptor(self) -> bytes:
        stored = len(self.payload) if self.stored_size is None else self.stored_size
        out = bytes([self.btype, self.stage]) + varint(self.param) + varint(stored)
        if self.stage != STAGE_NONE:
            out += varint(len(self.payload) if self.decoded is None else self.decoded)
        return out


def block(btype: int, *, stage: int = STAGE_NONE, param: int = 0, payload: bytes = b"",
          decoded: int | None = None, stored_size: int | None = None) -> Block:
    """Shorthand for :class:`Block`."""
    return Block(btype, stage, param, payload, decoded, stored_size)


@dataclass
class Record:
    """One record. ``body`` replaces the generated body fields when given (raw crafting)."""

    name: bytes
    kind: int = KIND_TERNARY
    dtype: int = F32
    shape: Sequence[int] = (1,)
    nnz: int | None = 0
    blocks: list[Block] = field(default_factory=list)
    body: bytes | None = None
    data_size: int | None = None  #: override the declared Data_Size
    index_name: bytes | None = None  #: the name the index lists (default: ``name``)

    def body_fields(self) -> bytes:
        if self.body is not None:
            return self.body
        out = varint(len(self.name)) + self.name
        if self.kind in (KIND_TERNARY, KIND_DENSE):
            out += bytes([self.dtype, len(self.shape)]) + b"".join(varint(d) for d in self.shape)
            if self.kind == KIND_TERNARY:
                out += varint(self.nnz or 0)
            out += bytes([len(self.blocks)]) + b"".join(b.descriptor() for b in self.blocks)
        return out

    def encode(self, offset: int, alignment: int) -> bytes:
        """Return the record's bytes when it starts at ``offset`` (which is aligned)."""
        data = bytearray()
        for b in self.blocks:
            data += b.payload + bytes(_pad(len(b.payload), alignment))
        body = self.body_fields()
        size = len(data) if self.data_size is None else self.data_size
        head = (bytes([self.kind]) + varint(len(body) + 8) + varint(size) + body
                + struct.pack("<I", crc(data)))
        head += struct.pack("<I", crc(head))
        return head + bytes(_pad(offset + len(head), alignment)) + bytes(data)


def record(name: bytes, **kw) -> Record:
    """Shorthand for :class:`Record`."""
    return Record(name, **kw)


def file_header(metadata: bytes = b"", *, alignment_log2: int = 3, major: int = 1,
                minor: int = 0, flags: int = 0, metadata_size: int | None = None) -> bytes:
    """File_Header + Metadata + Header_Checksum + zero padding (spec 5.1)."""
    size = len(metadata) if metadata_size is None else metadata_size
    head = struct.pack("<8sBBBBI", MAGIC, major, minor, alignment_log2, flags, size) + metadata
    head += struct.pack("<I", crc(head))
    return head + bytes(_pad(len(head), 1 << min(alignment_log2, 12)))


def build_file(records: Sequence[Record] = (), metadata: bytes = b"", *,
               alignment_log2: int = 3, index_count: int | None = None,
               index_extra: bytes = b"", **header_kw) -> bytes:
    """Assemble a whole file: header, ``records`` in the given order, index, trailer.

    ``index_count`` overrides the declared Tensor_Count; ``index_extra`` is appended to the
    index entries (both still covered by a correct Index_Checksum).
    """
    out = bytearray(file_header(metadata, alignment_log2=alignment_log2, **header_kw))
    alignment = 1 << min(alignment_log2, 12)
    entries = []
    for r in records:
        entries.append((r.index_name if r.index_name is not None else r.name, len(out)))
        out += r.encode(len(out), alignment)
    index_at = len(out)
    count = len(entries) if index_count is None else index_count
    index = bytearray([KIND_END]) + varint(count)
    for name, off in entries:
        index += varint(len(name)) + name + varint(off)
    index += index_extra
    out += index + struct.pack("<QI4s", index_at, crc(index), TAIL_MAGIC)
    return bytes(out)


def fix_checksums(data: bytes | bytearray) -> bytes | None:
    """Return ``data`` with every CRC and the trailer's Index_Offset re-computed.

    The walk trusts the declared lengths (it is meant for files mutated in place). Where a
    structure runs past the end, the CRCs found so far are kept and the walk stops. Returns
    None when not even the file header is there. Never raises.
    """
    buf = bytearray(data)
    if len(buf) < 20 or buf[:8] != MAGIC:
        return None
    meta_end = 16 + int.from_bytes(buf[12:16], "little")
    if meta_end + 4 > len(buf):
        return None
    buf[meta_end : meta_end + 4] = struct.pack("<I", crc(buf[:meta_end]))
    alignment = 1 << buf[10] if buf[10] <= 12 else 1
    pos = meta_end + 4
    pos += _pad(pos, alignment)
    while pos < len(buf) and buf[pos] != KIND_END:
        head_len = read_varint(buf, pos + 1)
        if head_len is None:
            return bytes(buf)
        data_size = read_varint(buf, head_len[1])
        if data_size is None or head_len[0] < 8:
            return bytes(buf)
        fields_end = data_size[1] + head_len[0] - 8
        header_end = fields_end + 8
        data_start = header_end + _pad(header_end, alignment)
        data_end = data_start + data_size[0]
        if data_end > len(buf):
            return bytes(buf)
        buf[fields_end : fields_end + 4] = struct.pack("<I", crc(buf[data_start:data_end]))
        buf[fields_end + 4 : header_end] = struct.pack("<I", crc(buf[pos : fields_end + 4]))
        pos = data_end
    if pos + 1 + 16 <= len(buf):
        index = buf[pos : len(buf) - 16]
        buf[len(buf) - 16 : len(buf) - 4] = struct.pack("<QI", pos, crc(index))
    return bytes(buf)
