"""Writing compeft files (spec 4, 5; the encoder's choices: Appendix D).

:class:`Writer` streams a file record by record: it chooses each tensor's codecs, gathers
small ternary tensors into packs (spec 5.8) and keeps every file within the default decode
budget (spec 9.3). The bytes of each structure come from :mod:`.layout`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
from collections.abc import Mapping
from typing import Any, BinaryIO

from . import _spec as S
from . import dtypes as _dt
from ._io import encode_varint
from .budget import positions_cost, record_cost
from .codecs import NAMES_ZSTD, BlockContext
from .codecs.dense import DenseCodec
from .codecs.scale import ScaleCodec
from .codecs.signs import SignsCodec
from .encode import POSITIONS_CHOICES, encode_positions, maybe_zstd
from .errors import EncodeError
from .fsio import atomic_write
from .layout import (
    MAX_RECORD_HEADER,
    RECORD_OVERHEAD,
    PackMember,
    align,
    bit_pack_data,
    crc32,
    descriptor,
    pack_table,
    pack_trailer,
    positions_bits,
)
from .metadata import encode_metadata, stage_metadata
from .packtable import Member, column_table, compact_table
from .tensor import TernaryTensor

__all__ = ["Writer", "dumps", "file_alignment", "parse_version", "save_file"]

_SIGNS, _SCALE, _DENSE = SignsCodec(), ScaleCodec(), DenseCodec()


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
        ``"1.7"`` (the default) gathers ternary tensors of at most 2^19 elements into twin
        pack records (spec 5.14: each distinct scale and the first name stored once, names
        compressed with the name dictionary, the members' bit streams one after the other,
        their lengths not stored, the scales coded by distance and in byte planes, a member
        whose streams an earlier member of the pack has stored as its twin; no name in their
        index entries) and compresses the metadata (spec 5.2), the table and metadata frames
        stored without the zstd magic number or a decoded size in front (spec 7.1), and ends
        the file with the 12-byte trailer (spec 5.7); ``"1.6"`` writes the tight packs of
        spec 5.13 with the 16-byte trailer, for 1.6 readers; ``"1.5"`` writes
        the lean packs of spec 5.12, for 1.5 readers; ``"1.4"`` the bit packs of spec 5.11
        (lengths stored), for 1.4 readers; ``"1.3"`` the compact packs of spec 5.10, for 1.3
        readers; ``"1.2"`` the column packs of spec 5.9, for 1.2 readers; ``"1.1"`` the packs
        of spec 5.8 and plain metadata, for 1.1 readers; ``"1.0"`` one record per tensor, for
        1.0 readers.

    Examples
    --------
    >>> import io
    >>> buf = io.BytesIO()
    >>> with Writer(buf) as w:
    ...     w.write("a", TernaryTensor((4,), [1], [True], 0.5))
    >>> len(buf.getvalue())
    80
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
        version = parse_version(version)
        self._f = fileobj
        self._positions = positions
        self._level = zstd_level
        self._alignment = alignment
        self._packing = version >= (1, 1)  # spec 5.8: small ternary tensors go into packs
        self._pack_kind = S.PACK_KIND_SINCE.get(version[1])  # the version's newest pack kind
        self._columns = version >= (1, 2)  # spec 5.9: ... whose member table is in columns
        self._compact = version >= (1, 3)  # spec 5.10: ... with the scales in the table
        self._bits = version >= (1, 4)  # spec 5.11, 5.6: ... bit after bit, named by the table
        self._lean = version >= (1, 5)  # spec 5.12: ... with no lengths in the table
        self._tight = version >= (1, 6)  # spec 5.13, 7.1: ... scales tighter, bare frames
        self._twins = version >= (1, 7)  # spec 5.14: ... a member may read another's streams
        self._names: list[bytes] = []  # record names and offsets, for the index
        self._offsets: list[int] = []
        self._last = b""  # the last tensor name written, in a record or a pack
        self._pack: list[PackMember] = []
        self._pack_data = self._pack_table = 0  # bytes of the pending pack's data and table
        self._pack_cost = 0  # decode-budget charge of the pending pack's members (spec 9.3)
        self._pack_bits = 0  # bits of the pending bit pack's streams (spec 5.11)
        #: (numel, nnz, positions type, param, positions, signs) -> index in the pending pack
        #: of the first member with those streams (spec 5.14: later ones are its twins)
        self._streams: dict[tuple[int, int, int, int, bytes, bytes], int] = {}
        #: name -> bytes the tensor takes in the file, as ``TensorInfo.record_size``: its
        #: whole record, or for a pack member its data (the pack's header is shared)
        self.sizes: dict[str, int] = {}
        self._cost = 0  # decode-budget charge of the records written so far (spec 9.3)
        self._closed = False
        meta, flags = encode_metadata(metadata), 0
        if self._columns:  # spec 5.2: 1.2 compresses the metadata where that pays
            flags, meta = stage_metadata(meta, zstd_level, bare=self._tight,
                                         sized=not self._twins)  # spec 5.2 (1.7): unsized
        if self._twins:  # spec 5.1, 5.7 (1.7): the 12-byte trailer
            flags |= S.FLAG_SHORT_TRAILER
        header = S.FILE_HEADER.pack(S.MAGIC, *version, log2, flags, len(meta))
        self._pos = 0
        self._emit(header, meta, S.CHECKSUM.pack(crc32(header, meta)))
        self._pad()

    # -- low level --
    def _emit(self, *parts: bytes) -> None:
        for p in parts:
            self._f.write(p)
            self._pos += len(p)

    def _pad(self) -> None:
        n = align(self._pos, self._alignment) - self._pos
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
            self._check_shape(name, value.shape)
            member = self._member(bname, value)
            if isinstance(member, PackMember):
                self.sizes[name] = self._add_member(member)
                self._last = bname
                return
            encoded = member  # a record is smaller: its blocks are already encoded
        else:
            encoded = None
        self._flush_pack()
        self._last = bname
        if isinstance(value, TernaryTensor):
            self._check_shape(name, value.shape)
            kind, body_tail, blocks = encoded or self._ternary(name, value, self._level)
            dtype, shape, nnz = value.dtype, value.shape, value.nnz
        else:
            try:
                storage, dtype = _dt.to_storage(value, dtype)
            except EncodeError as exc:
                raise EncodeError(exc.message, tensor=name) from None
            shape, nnz = storage.shape, 0
            self._check_shape(name, shape)
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
        end = self._pos + sum(align(len(b[3]), self._alignment) for b in blocks)
        if self._cost + cost > max(S.DECODE_BUDGET_FLOOR, S.DECODE_BUDGET_RATIO * end):
            if kind == S.KIND_TERNARY:
                blocks = self._ternary(name, value, None)[2]
            else:
                blocks = [(S.BLOCK_DENSE, S.STAGE_NONE, param, payload, len(payload))]
            cost = record_cost(kind, dtype, numel, nnz, blocks)
        self._cost += cost  # the last check that can reject the tensor is above
        body = (encode_varint(len(bname)) + bname + bytes([S.DTYPE_CODES[dtype], len(shape)])
                + b"".join(encode_varint(d) for d in shape) + body_tail + bytes([len(blocks)])
                + b"".join(descriptor(t, s, p, len(st), d) for t, s, p, st, d in blocks))
        # spec 5.4: the data area starts at the next aligned offset after the header and
        # holds each block followed by zero padding to the alignment
        # (the blocks are emitted as they are, not joined: a dense record may be large)
        parts: list[bytes] = []
        for *_, stored, _d in blocks:
            parts += [stored, bytes(align(len(stored), self._alignment) - len(stored))]
        data_size = sum(len(p) for p in parts)
        header_len = len(body) + 8  # Data_Checksum and Header_Checksum follow the body
        head = (bytes([kind]) + encode_varint(header_len) + encode_varint(data_size) + body
                + S.CHECKSUM.pack(crc32(*parts)))
        self._names.append(bname)
        self._offsets.append(self._pos)
        self._emit(head, S.CHECKSUM.pack(crc32(head)))
        self._pad()
        self._emit(*parts)
        self.sizes[name] = self._pos - self._offsets[-1]

    @staticmethod
    def _check_shape(name: str, shape: tuple[int, ...]) -> None:
        """Reject a rank or an element count above the default limits (a file that default
        decoders refuse, spec 9.2), before anything is encoded or charged."""
        if len(shape) > S.DEFAULT_LIMITS.max_ndim:
            raise EncodeError(f"{len(shape)} dimensions; limit {S.DEFAULT_LIMITS.max_ndim}",
                              tensor=name)
        numel = math.prod(shape)
        if numel > S.DEFAULT_LIMITS.max_numel:  # spec 5.4.3 (R-BODY-4)
            raise EncodeError(f"{numel} elements; limit {S.DEFAULT_LIMITS.max_numel} "
                              "(2**48)", tensor=name)

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

    def _member(self, bname: bytes, t: TernaryTensor) -> PackMember | tuple[int, bytes, list]:
        """Encode a small ternary tensor as a pack member (spec 5.8), or as a record.

        Members have no zstd stage. Positions that zstd shrinks (runs, not scattered
        nonzeros) can make a record of their own smaller despite its header: then the
        record's ``(kind, body tail, blocks)``, as :meth:`_ternary` gives them.
        """
        ctx = BlockContext(bname.decode(), t.numel, t.nnz, t.dtype, t.shape)
        btype, _stage, param, positions, _d = encode_positions(t, ctx, self._positions, None)()
        signs = _SIGNS.encode(t.signs, ctx)[1]
        scale = _SCALE.encode(t.scale, ctx)[1]
        member = PackMember(bname, (positions, signs, scale),
                         positions_cost(len(positions), t.nnz),
                         Member(bname, t.dtype, t.shape, t.nnz, btype, param, len(positions)))
        if self._level is not None and member.size > RECORD_OVERHEAD:
            record = self._ternary(bname.decode(), t, self._level)
            as_record = (sum(align(len(b[3]), self._alignment) for b in record[2])
                         + 2 * len(bname) + RECORD_OVERHEAD)
            if as_record < member.size:
                return record
        return member

    def _add_member(self, member: PackMember) -> int:
        """Put a member into the pending pack, writing the pack first if it is full."""
        if self._bits:  # spec 5.11: its table entry gives Positions_Bits, found once here
            f = member.fields
            member.fields = dataclasses.replace(
                f, psize=positions_bits(f.ptype, member.parts[0], math.prod(f.shape)))
        entry = len(pack_table([member], b""))  # an upper bound: front coding only shortens it
        if self._compact:  # spec 5.10: at most a 3-byte Scale_Ref and a 4-byte scale more
            entry += 7
        if self._pack and (self._pack_data + member.size > S.PACK_DATA_TARGET
                           or self._pack_table + entry > S.PACK_TABLE_TARGET):
            self._flush_pack()
        member = self._as_twin(member)
        self._pack.append(member)
        self._pack_data += member.size
        self._pack_table += entry
        self._pack_cost += member.cost
        if self._bits:  # spec 5.11: its bits, rounded up to bytes (as TensorInfo.record_size)
            f = member.fields
            bits = 0 if f.twin else f.psize + f.nnz  # a twin (spec 5.14) adds none
            self._pack_bits += bits
            return -(-bits // 8)
        return member.compact_size if self._compact else member.size

    def _as_twin(self, member: PackMember) -> PackMember:
        """The member as a twin (spec 5.14) of the first one of the pending pack with the same
        streams and element count, or as it is.

        A twin adds a decoding to the decode budget (spec 9.3) but no bytes to the file, so it
        is made only while the charges of everything written and pending, with it, stay
        within 64 times the bytes written and pending: without the budget's 64 MiB floor,
        which a file's last members could not make up for if twins used it (each member that
        follows, stored without zstd, is charged less than 41 times its bytes).
        """
        f = member.fields
        if not self._twins or not f.nnz:  # an empty member's streams take no bits anyway
            return member
        key = (math.prod(f.shape), f.nnz, f.ptype, f.param, member.parts[0], member.parts[1])
        source = self._streams.setdefault(key, len(self._pack))
        charged = self._cost + self._pack_cost + member.cost
        at_least = self._pos + self._pack_bits // 8  # bytes the file will have at least
        if source == len(self._pack) or charged > S.DECODE_BUDGET_RATIO * at_least:
            return member
        twin = dataclasses.replace(f, twin=len(self._pack) - source)
        return PackMember(member.name, (b"", b"", member.parts[2]), member.cost, twin)

    def flush(self) -> None:
        """Write the tensors waiting in a pack now, so that a reader of the stream gets them.

        A 1.1 to 1.7 writer gathers small ternary tensors into a pack (spec 5.8 to 5.14) and
        writes it when it is full, when a tensor that is not packed comes, or at
        :meth:`close`; at most about 1 MiB waits. The file stays valid: the next tensors start
        a new pack.
        """
        if self._closed:
            raise ValueError("writer is closed")
        self._flush_pack()
        with contextlib.suppress(AttributeError, OSError):
            self._f.flush()

    def _flush_pack(self) -> None:
        """Write the pending pack as one record (spec 5.8 to 5.13, by version)."""
        if not self._pack:
            return
        members, self._pack = self._pack, []
        self._pack_data = self._pack_table = self._pack_cost = self._pack_bits = 0
        self._streams = {}
        level = None if self._level is None else S.SMALL_ZSTD_LEVEL  # Appendix D 6
        if self._bits:  # spec 5.11: Positions_Bits in the table (5.12: not), bit after bit
            column10 = "none" if self._lean else "bits"
            fields = [m.fields for m in members]  # psize: Positions_Bits (_add_member)
            streams = [s for m in members if not m.fields.twin  # spec 5.14: a twin has none
                       for s in ((m.parts[0], m.fields.psize), (m.parts[1], m.fields.nnz))]
            table = compact_table(fields, [m.parts[2] for m in members], column10,
                                  tight=self._tight, twins=self._twins)
            data = bit_pack_data(streams)
        elif self._compact:  # spec 5.10: scales in the table
            table = compact_table([m.fields for m in members], [m.parts[2] for m in members])
            data = b"".join(m.parts[0] + m.parts[1] for m in members)
        if self._compact:  # spec 5.10: names through their dictionary
            stage, stored = maybe_zstd(table, level, NAMES_ZSTD, bare=self._tight)
            stage = S.STAGE_ZSTD_NAMES if stage == S.STAGE_ZSTD else stage
        else:
            if self._columns:  # spec 5.9; a small table, compressed hard
                table = column_table([m.fields for m in members])
            else:
                table, level = pack_table(members), self._level
            stage, stored = maybe_zstd(table, level)
            data = b"".join(part for m in members for part in m.parts)
        end = self._pos + len(data) + 64  # about where the data area ends (spec 9.3)
        cost = sum(m.cost for m in members)
        table_cost = len(table) if stage != S.STAGE_NONE else 0
        if (stage != S.STAGE_NONE and self._cost + cost + table_cost
                > max(S.DECODE_BUDGET_FLOOR, S.DECODE_BUDGET_RATIO * end)):
            stage, stored, table_cost = S.STAGE_NONE, table, 0
        self._cost += cost + table_cost
        first = members[0].name
        # spec 5.10: a compact pack has no Name of its own; the first member's is in the table
        body = b"" if self._compact else encode_varint(len(first)) + first
        sized = stage != S.STAGE_NONE and not self._twins  # spec 5.14: the frame says it
        body += (encode_varint(len(members)) + bytes([stage]) + encode_varint(len(stored))
                 + (encode_varint(len(table)) if sized else b"") + stored)
        pad = bytes(align(len(data), self._alignment) - len(data))
        if len(body) + 8 > MAX_RECORD_HEADER:  # cannot happen with PACK_TABLE_TARGET
            raise EncodeError(f"pack header of {len(body) + 8} bytes", tensor=first.decode())
        head = (bytes([self._pack_kind]) + encode_varint(len(body) + 8)
                + encode_varint(len(data) + len(pad)) + body + S.CHECKSUM.pack(crc32(data, pad)))
        self._names.append(b"" if self._bits else first)  # spec 5.6: 1.4 names it by its table
        self._offsets.append(self._pos)
        self._emit(head, S.CHECKSUM.pack(crc32(head)))
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
        if len(index) > S.DEFAULT_LIMITS.max_index_size:  # spec 9.2: what readers accept
            raise EncodeError(f"index of {len(index)} bytes; limit "
                              f"{S.DEFAULT_LIMITS.max_index_size}")
        self._emit(bytes(index), pack_trailer(self._twins, index_offset, bytes(index)))

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

    >>> from compeft_format import loads
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


def file_alignment(dense: bool) -> int:
    """The alignment ``compress_file`` writes (Appendix D 2): 8 bytes when the file holds a
    dense record, which a reader may view in place, else 1, which saves every padding byte
    (ternary payloads are decoded, never viewed in place).

    >>> file_alignment(True), file_alignment(False)
    (8, 1)
    """
    return 1 << S.DEFAULT_ALIGNMENT_LOG2 if dense else 1


def parse_version(version: tuple[int, int] | str | None) -> tuple[int, int]:
    """A format version an encoder can write, as ``(major, minor)`` (spec 10.1); None: the
    default, the newest.

    >>> parse_version("1.2"), parse_version((1, 3)), parse_version(None)
    ((1, 2), (1, 3), (1, 7))
    """
    if version is None:
        return S.VERSION_MAJOR, S.VERSION_MINOR
    given = version
    if isinstance(version, str):
        major, _, minor = version.partition(".")
        version = (int(major), int(minor)) if major.isdigit() and minor.isdigit() else (-1, -1)
    version = tuple(version)
    if version not in S.VERSIONS:
        raise EncodeError(f"version must be one of {[f'{a}.{b}' for a, b in S.VERSIONS]}, "
                          f"got {given!r}")
    return version


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
    >>> from compeft_format import load_file
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
