"""Reading compeft files (spec 8): streams, whole buffers, and random access by name.

:func:`iter_stream` and :func:`loads` walk a file front to back, checking every byte;
:class:`CompeftReader` (:func:`open_file`) reads the header, trailer and index, then only
the bytes of the tensors asked for. Parsing is :mod:`.layout`'s; this module decodes the
blocks and presents tensors (numpy, torch, dense, on a device).
"""

from __future__ import annotations

import contextlib
import io
import math
import mmap
import os
from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np

from . import _spec as S
from . import dtypes as _dt
from ._io import BufferSource, Source, StreamSource
from .budget import Budget, positions_cost, widening_cost
from .codecs import ZSTD, BlockContext, get_codec, torch_decode
from .errors import (
    BadMagicError,
    ChecksumError,
    CorruptDataError,
    LimitExceededError,
    TruncatedError,
    UnsupportedFeatureError,
)
from .info import FileInfo, TensorInfo
from .layout import (
    BLOCK_ROLES,
    PACK_KINDS,
    TABLE_NAMED_KINDS,
    Record,
    align,
    check_data_crc,
    check_pack_data,
    check_zero,
    crc32,
    member_payloads,
    read_file_header,
    read_index,
    read_record_header,
    unpack_trailer,
    verify_index_crc,
)
from .present import check_framework, dense_ternary, present
from .tensor import TernaryTensor, check_dense_bytes, dense_output

__all__ = ["CompeftReader", "inspect", "iter_stream", "load_file", "loads", "open_file"]


def _decode_record(rec: Record, data: memoryview, budget: Budget, dense: str | None = None,
                   out: np.ndarray | None = None, device: Any = None) -> Any:
    """Verify a record's data area and decode its blocks (spec 8).

    A ternary record gives a :class:`TernaryTensor`; with ``dense`` ("numpy" or "torch") it
    gives its dense array instead, written chunk by chunk straight from the positions and
    signs blocks (see :func:`dense_ternary`). A dense record gives its storage array.
    With a torch ``device``, the payloads are decoded there (:mod:`.codecs.torch_decode`).
    """
    if not rec.in_pack:  # a pack's checksum covers all its members: checked by the caller
        check_data_crc(rec, data)
    numel = math.prod(rec.shape)
    values: dict[str, Any] = {}
    cursor = 0
    for btype, stage, param, stored_size, decoded_size in rec.blocks:
        payload = data[cursor : cursor + stored_size]
        pad_end = cursor + align(stored_size, rec.alignment)
        check_zero(data[cursor + stored_size : pad_end], rec.data_start + cursor + stored_size,
                    rec.name, "block padding")
        ctx = BlockContext(rec.name, numel, rec.nnz or 0, rec.dtype, rec.shape,
                           rec.data_start + cursor)
        cursor = pad_end
        if btype not in BLOCK_ROLES:
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
    if rec.table_scale is not None:  # spec 5.10: a compact pack member's scale, in its table
        ctx = BlockContext(rec.name, numel, rec.nnz or 0, rec.dtype, rec.shape,
                           rec.table_scale[1])
        values["scale"] = get_codec(S.BLOCK_SCALE, ctx).decode(
            memoryview(rec.table_scale[0]), S.SCALE_F32, ctx)
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


def iter_stream(fileobj: BinaryIO, *, framework: str = "numpy",
                limits: S.ReadLimits = S.DEFAULT_LIMITS, dense: bool = False,
                ) -> Iterator[tuple[str, Any]]:
    """Decode a compeft file from a stream, tensor by tensor, in file order.

    The stream need not seek (a pipe, a download). Every byte is checked: checksums,
    padding, the index against the records seen, and the end of the stream after the trailer.
    ``dense=True`` gives ternary tensors as dense numpy arrays (see :func:`loads`).

    >>> from compeft_format import dumps
    >>> import io
    >>> data = dumps({"a": TernaryTensor((2,), [1], [False], 1.0)})
    >>> [(n, t.nnz) for n, t in iter_stream(io.BytesIO(data))]
    [('a', 1)]
    """
    _check_options(framework, limits)
    if not isinstance(fileobj, Source):
        if not callable(getattr(fileobj, "read", None)):
            raise TypeError(f"iter_stream takes a binary stream (with read), got "
                            f"{type(fileobj).__name__}")
        if isinstance(fileobj, io.TextIOBase):
            raise TypeError("iter_stream takes a binary stream; this one is text (open the "
                            "file with 'rb')")
    src: Source = fileobj if isinstance(fileobj, Source) else StreamSource(fileobj)
    yield from _walk(src, framework, limits, None, dense)


def _decode_present(rec: Record, data: memoryview, budget: Budget, framework: str,
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


def _decode_pack(rec: Record, data: memoryview, budget: Budget, framework: str,
                 dense: bool, device: Any = None) -> Iterator[tuple[str, Any]]:
    """Check a pack's data area, then decode its members in order (spec 5.8 to 5.14)."""
    check_pack_data(rec, data)
    for m in rec.members:
        lo = m.data_start - rec.data_start
        payloads = member_payloads(m, data[lo : lo + m.data_size])
        yield m.name, _decode_present(m, payloads, budget, framework, dense, device=device)


def _walk(src: Source, framework: str, limits: S.ReadLimits,
          file_size: int | None, dense: bool = False, device: Any = None,
          ) -> Iterator[tuple[str, Any]]:
    budget = Budget(limits, file_size)
    header = read_file_header(src, limits, budget)
    seen: list[tuple[str, int, int]] = []  # name, offset and kind of each record
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
        rec = read_record_header(src, kind, limits, header.alignment)
        src.tensor = rec.name
        if last and rec.name.encode() <= last.encode():  # spec 5.3
            raise CorruptDataError(f"record names must increase; {rec.name!r} follows "
                                   f"{last!r}", tensor=rec.name, offset=at)
        seen.append((rec.name, at, kind))
        last = rec.members[-1].name if rec.members else rec.name
        check_zero(src.read(rec.data_start - rec.header_end, "record padding"), rec.header_end,
                    rec.name, "record padding")
        data = src.read(rec.data_size, "record data")
        if kind not in header.kinds:
            if crc32(data) != rec.data_crc:
                raise ChecksumError("data checksum mismatch", tensor=rec.name,
                                    offset=rec.data_start)
            continue  # spec 10.2: an unknown optional record is skipped
        if kind in PACK_KINDS:
            yield from _decode_pack(rec, data, budget, framework, dense, device)
            continue
        yield rec.name, _decode_present(rec, data, budget, framework, dense, device=device)
    src.tensor = None
    index_at = src.pos - 1
    src.capture = bytearray(b"\x00")
    entries = read_index(src, limits, header.nameless_index)
    index_bytes, src.capture = bytes(src.capture), None
    # spec 5.6: every record, in order, at its offset, named (a 1.4 pack's name may be empty)
    nameless = header.nameless_index
    if len(entries) != len(seen) or not all(
            (name == rname or (not name and nameless and kind in TABLE_NAMED_KINDS))
            and off == at for (name, off), (rname, at, kind) in zip(entries, seen, strict=False)):
        raise CorruptDataError(f"index ({len(entries)} entries) does not match the "
                               f"{len(seen)} records before it", offset=index_at)
    trailer_at = src.pos
    size = header.trailer_size
    offset, crc, tail = unpack_trailer(header.short_trailer, src.read(size, "trailer"),
                                       trailer_at)
    if tail != S.TAIL_MAGIC:
        raise BadMagicError(f"trailer magic {tail!r}, expected {S.TAIL_MAGIC!r}",
                            offset=trailer_at + size - 4)
    if crc != crc32(index_bytes):
        raise ChecksumError(f"index checksum mismatch: stored 0x{crc:08x}, computed "
                            f"0x{crc32(index_bytes):08x}", offset=trailer_at + 8)
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

    >>> from compeft_format import dumps
    >>> loads(dumps({"b": np.arange(3, dtype=np.int8)}))["b"]
    array([0, 1, 2], dtype=int8)
    >>> loads(dumps({"t": TernaryTensor((3,), [1], [True], 0.5)}), dense=True)["t"]
    array([ 0. , -0.5,  0. ], dtype=float32)
    """
    _check_options(framework, limits)
    buf = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    return dict(_walk(BufferSource(buf), framework, limits, len(buf), dense, device))


# ---------------------------------------------------------------------------------------------
# Random access
# ---------------------------------------------------------------------------------------------


class CompeftReader:
    """Random access to a compeft file: reads the header, the trailer and the index only.

    Use :func:`open_file`. ``get(name)`` reads and checks only that tensor's bytes.

    >>> from compeft_format import save_file
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "x.compeft")
    >>> save_file({"a": TernaryTensor((4,), [2], [False], 1.0), "b": np.ones(2)}, p)
    >>> with open_file(p) as f:
    ...     print(f.keys(), f.info("a").codecs, f.get("b"))
    ['a', 'b'] bitmask,signs,scale [1. 1.]
    """

    def __init__(self, data: memoryview, *, framework: str = "numpy",
                 limits: S.ReadLimits = S.DEFAULT_LIMITS, closer: Any = None) -> None:
        _check_options(framework, limits)
        self._buf = data
        self._closer = closer
        self._framework = framework
        self._limits = limits
        src = BufferSource(data)
        self._header = read_file_header(src, limits, Budget(limits, len(data)))
        size = len(data)
        first = self._header.end
        tsize = self._header.trailer_size  # spec 5.7: 16 bytes, 12 with Flags bit 3 (1.7)
        if size < first + 1 + tsize:
            raise TruncatedError(f"file is {size} bytes, too short for an index and trailer",
                                 offset=size)
        index_at, crc, tail = unpack_trailer(self._header.short_trailer, data[size - tsize :],
                                             size - tsize)
        if tail != S.TAIL_MAGIC:  # a cut file ends in the middle of something else
            raise TruncatedError(f"trailer magic {bytes(tail)!r} is not {S.TAIL_MAGIC!r}: the "
                                 "file is cut short or not complete", offset=size - 4)
        if not first <= index_at <= size - tsize - 1:
            raise CorruptDataError(f"index offset {index_at} outside [{first}, "
                                   f"{size - tsize - 1}]", offset=size - tsize)
        if size - tsize - index_at > limits.max_index_size:
            raise LimitExceededError(f"index is {size - tsize - index_at} bytes; limit "
                                     f"{limits.max_index_size}", offset=index_at)
        verify_index_crc(data, index_at, crc, tsize)
        isrc = BufferSource(data[index_at : size - tsize], base=index_at)
        if isrc.u8("index kind") != S.KIND_END:
            raise CorruptDataError("index does not start with kind 0x00", offset=index_at)
        entries = read_index(isrc, limits, self._header.nameless_index)
        if not isrc.at_end():
            raise CorruptDataError(f"{isrc.remaining} bytes after the index entries",
                                   offset=isrc.pos)
        self._entries: dict[str, tuple[int, int]] = {}
        prev_name, prev_off = None, None
        for name, off in entries:
            if not name:  # spec 5.6 (1.4): a pack's entry, named by its table (below)
                pass
            elif prev_name is not None and name.encode() <= prev_name.encode():
                raise CorruptDataError(f"index names must increase; {name!r} follows "
                                       f"{prev_name!r}", offset=index_at)
            if (off <= prev_off) if prev_off is not None else off != first:
                raise CorruptDataError(f"index offset {off} of {name!r} breaks the record order",
                                       tensor=name, offset=index_at)
            if off >= index_at:
                raise CorruptDataError(f"record offset {off} is past the index", tensor=name,
                                       offset=index_at)
            prev_name, prev_off = name or prev_name, off
        if not entries and index_at != first:
            raise CorruptDataError(f"{index_at - first} bytes between the header and an empty "
                                   "index", offset=first)
        self._members: dict[str, Record] = {}  # pack members by name (spec 5.8)
        self._packs: dict[int, Record] = {}  # packs by offset
        self._checked: set[int] = set()  # packs whose data area was verified
        self._closed = False
        ends = [off for _, off in entries[1:]] + [index_at]
        before = ""  # the previous entry's last name: its own, or its pack's last member's
        for i, ((name, off), end) in enumerate(zip(entries, ends, strict=False)):
            kind = data[off]
            if not name and kind not in TABLE_NAMED_KINDS:  # spec 5.6 (1.4)
                raise CorruptDataError(f"index entry without a name: the record at {off} is "
                                       f"of kind 0x{kind:02x}, not a compact or bit pack",
                                       offset=index_at)
            if not name and kind not in self._header.kinds:  # its name is in what we can't read
                raise UnsupportedFeatureError(f"unknown required record kind 0x{kind:02x}",
                                              tensor=name, offset=off)
            if kind in PACK_KINDS and kind in self._header.kinds:
                # the member tables are read now: they hold the names of the tensors
                pack = self._read_at(name, off, end)
                if not name and before and pack.name.encode() <= before.encode():
                    raise CorruptDataError(f"index names must increase; {pack.name!r} follows "
                                           f"{before!r}", offset=index_at)
                name = pack.name
                after = entries[i + 1][0] if i + 1 < len(entries) else None
                last = before = pack.members[-1].name
                if after and last.encode() >= after.encode():
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
                read_record_header(src, kind, limits, self._header.alignment)
                before = name
                continue
            self._entries[name] = (off, end)
            before = name

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

    def _record(self, name: str) -> Record:
        self._check_open()
        try:
            off, end = self._entries[name]
        except KeyError:
            raise KeyError(name) from None
        if name in self._members:
            return self._members[name]
        return self._read_at(name, off, end)

    def _check_pack(self, rec: Record) -> None:
        """Verify the data area of pack member ``rec``'s pack once (its checksum and padding;
        a lean, tight or twin pack's members are placed then, spec 5.12 to 5.14)."""
        if rec.offset not in self._checked:
            pack = self._packs[rec.offset]
            check_pack_data(pack, self._buf[pack.data_start : pack.end], rec.name)
            self._checked.add(rec.offset)

    def _data(self, rec: Record) -> memoryview:
        """The data area of a record, or of a pack member once its pack is verified."""
        if rec.in_pack:
            self._check_pack(rec)
            return member_payloads(rec, self._buf[rec.data_start : rec.end])
        return self._buf[rec.data_start : rec.end]

    def _read_at(self, name: str, off: int, end: int) -> Record:
        """The record at ``off``, named ``name`` in the index ("": a 1.4 pack, spec 5.6)."""
        src = BufferSource(self._buf[off:end], base=off)
        src.tensor = name or None
        kind = src.u8("record kind")
        if kind not in self._header.kinds and not kind & S.KIND_OPTIONAL_BIT:
            raise UnsupportedFeatureError(f"unknown required record kind 0x{kind:02x}",
                                          tensor=name, offset=off)
        rec = read_record_header(src, kind, self._limits, self._header.alignment)
        if name and rec.name != name:
            raise CorruptDataError(f"record at {off} is named {rec.name!r}, the index says "
                                   f"{name!r}", tensor=name, offset=off)
        if rec.end != end:  # spec 5.3: records tile the file
            raise CorruptDataError(f"record ends at {rec.end}, the next starts at {end}",
                                   tensor=name, offset=off)
        check_zero(self._buf[rec.header_end : rec.data_start], rec.header_end, name,
                    "record padding")
        return rec

    def info(self, name: str) -> TensorInfo:
        """Shape, dtype, nnz, blocks and sizes of one tensor, without decoding its data (a
        lean, tight or twin pack's member, spec 5.12 to 5.14: its pack's data area is read and
        verified, to find where it is)."""
        rec = self._record(name)
        if rec.in_pack and self._packs[rec.offset].used_bits < 0:
            self._check_pack(rec)
        return rec.info()

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


def _check_options(framework: str, limits: object) -> None:
    """The reading options every entry point takes: a framework, and limits that are a
    :class:`~compeft_format.ReadLimits` (``None`` would fail later, as an AttributeError)."""
    check_framework(framework)
    if not isinstance(limits, S.ReadLimits):
        raise TypeError(f"limits must be a ReadLimits, got {type(limits).__name__}")


def _a_path(path: object, what: str) -> str | os.PathLike:
    """``path`` if it is a path; a TypeError otherwise (``open`` would take an int for a file
    descriptor, and close the caller's)."""
    if isinstance(path, (str, os.PathLike)):
        return path
    raise TypeError(f"{what} takes a path (str or os.PathLike) or the file's bytes, "
                    f"got {type(path).__name__}")


def open_file(path: str | os.PathLike | bytes | bytearray | memoryview, *,
              framework: str = "numpy", limits: S.ReadLimits = S.DEFAULT_LIMITS) -> CompeftReader:
    """Open a file (memory-mapped) or a bytes object for random access; see CompeftReader.

    Only the trailer, the index and the records asked for are read; the values are decoded
    on ``get`` (``framework="torch"`` for torch tensors).

    >>> import os, tempfile
    >>> from compeft_format import TernaryTensor, save_file
    >>> p = os.path.join(tempfile.mkdtemp(), "x.compeft")
    >>> save_file({"a": TernaryTensor((4,), [1, 3], [0, 1], 0.5),
    ...            "b": np.arange(3, dtype=np.float32)}, p, metadata={"task": "demo"})
    >>> with open_file(p) as f:
    ...     print(sorted(f.keys()), f.metadata()["task"], f.info("a").nnz)
    ...     print(f.get("a"))
    ...     print(f.get("a", dense=True), f.get("b"))
    ['a', 'b'] demo 2
    TernaryTensor(shape=(4,), nnz=2, scale=0.5, dtype='F32')
    [ 0.   0.5  0.  -0.5] [0. 1. 2.]
    """
    if isinstance(path, (bytes, bytearray, memoryview)):
        return CompeftReader(memoryview(path).cast("B"), framework=framework, limits=limits)
    with open(_a_path(path, "open_file"), "rb") as f:
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


def load_file(path: str | os.PathLike | bytes | bytearray | memoryview, *,
              framework: str = "numpy", limits: S.ReadLimits = S.DEFAULT_LIMITS,
              dense: bool = False, device: Any = None) -> dict[str, Any]:
    """Read and check a whole file; like :func:`loads` on its bytes (``device`` too), and
    given bytes, like :func:`loads` on them (as :func:`open_file` takes bytes for a file's).

    The arrays returned are the caller's, as safetensors' ``load_file`` gives them: writeable,
    and in memory of their own, not views of the file, which is closed on return (it can be
    replaced, truncated or removed meanwhile). Read-only zero-copy views of a memory-mapped
    file are what :func:`open_file` gives.

    >>> from compeft_format import save_file
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "x.compeft")
    >>> save_file({"b": np.zeros(3, np.float32)}, p)
    >>> b = load_file(p)["b"]; b += 1; os.remove(p); b
    array([1., 1., 1.], dtype=float32)
    """
    if isinstance(path, (bytes, bytearray, memoryview)):
        view = memoryview(bytearray(memoryview(path).cast("B")))  # private, as a file's
        got = len(view)
    else:
        with open(_a_path(path, "load_file"), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            view = memoryview(bytearray(size))  # private and writeable: dense records view it
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

    >>> from compeft_format import dumps
    >>> info = inspect(dumps({"w": TernaryTensor((1000,), [5, 600], [0, 1], 0.1)}))
    >>> info.tensors[0].codecs, info.tensors[0].nnz
    ('golomb,signs,scale', 2)
    """
    with open_file(source, limits=limits) as f:
        return f.file_info()
