"""The member table of a column pack (spec 5.9, format 1.2): one column per field.

The same columns, with scales added, make a compact pack's table (spec 5.10, 1.3), and with
column 10 counted in bits, a bit pack's (spec 5.11, 1.4).

A 1.1 pack (spec 5.8) stores each member's fields side by side; a column pack stores all
members' values of one field, then the next field, which zstd compresses about a third
better on adapters, and it codes two fields from the member's own counts: ``Param`` as a
zigzag difference from a predicted golomb parameter, ``Positions_Size`` as a zigzag
difference from a predicted size. The record around the table, its data area and its checks
are those of a 1.1 pack (:mod:`compeft_format.layout`).

>>> m = [Member(b"a.w", "F32", (8,), 1, 0x01, 0, 1), Member(b"b.w", "F32", (64,), 2, 0x02, 23, 2)]
>>> column_table(m).hex(" ")
'03 00 00 03 62 2e 77 01 01 01 01 08 40 01 02 01 02 00 02 00 00'
>>> read_column_table(BufferSource(column_table(m)), 2, "a.w", ReadLimits()) == m
True
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from . import _spec as S
from ._io import BufferSource, encode_varint
from ._spec import ReadLimits
from .errors import CorruptDataError, LimitExceededError

__all__ = [
    "COLUMN10",
    "Member",
    "column_table",
    "common_prefix",
    "compact_table",
    "decode_name",
    "member_name",
    "predicted_bits",
    "predicted_param",
    "predicted_size",
    "read_column_table",
    "read_scale_columns",
    "read_tight_scale_columns",
    "tight_scale_columns",
    "unzigzag",
    "zigzag",
]


@dataclass(frozen=True)
class Member:
    """The table fields of one pack member (spec 5.8), as a row."""

    name: bytes
    dtype: str
    shape: tuple[int, ...]
    nnz: int
    ptype: int  #: Positions_Type: 0x01 bitmask, 0x02 golomb
    param: int
    psize: int  #: Positions_Size; in a bit pack (spec 5.11) Positions_Bits
    #: Twin_Back (spec 5.14, a twin pack): j >= 1 for a twin of the member j places before
    #: it, whose nnz, ptype and param it has and whose streams it reads; 0 for any other
    twin: int = 0


def zigzag(d: int) -> int:
    """Spec 5.9: 0, -1, 1, -2, ... as 0, 1, 2, 3, ...

    >>> [zigzag(d) for d in (0, -1, 1, -2)]
    [0, 1, 2, 3]
    """
    return 2 * d if d >= 0 else -2 * d - 1


def unzigzag(z: int) -> int:
    """The inverse of :func:`zigzag`.

    >>> [unzigzag(z) for z in range(4)]
    [0, -1, 1, -2]
    """
    return z // 2 if z % 2 == 0 else -(z + 1) // 2


def predicted_param(ptype: int, numel: int, nnz: int) -> int:
    """Spec 5.9: the predicted ``Param``, ``ln 2 * N / n + 0.17`` in 16-bit fixed point.

    Exact integer arithmetic, so that every decoder derives the same value; it equals the
    encoder's Gallager-Van Voorhis start (spec 6.2.3) for 99 % of the (n, N) pairs tested,
    and is 1 off for the others.

    >>> predicted_param(0x02, 3072, 31), predicted_param(0x02, 8, 0), predicted_param(0x01, 8, 3)
    (68, 1, 0)
    """
    if ptype != S.BLOCK_GOLOMB:
        return 0  # spec 6.1: a bitmask's Param is 0
    if nnz == 0:
        return 1
    return max(1, min(numel, (45426 * numel + 11000 * nnz) // (65536 * nnz)))


def predicted_bits(ptype: int, param: int, numel: int, nnz: int) -> int:
    """Spec 5.11: the predicted length in bits of a member's positions stream.

    A bitmask's exact length; for golomb the stream length of spec 6.2.1 with the long codes
    and the unary part estimated for remainders spread evenly over ``[0, M)``, in exact
    integers.

    >>> predicted_bits(0x01, 0, 10, 3), predicted_bits(0x02, 23, 64, 2)
    (10, 12)
    """
    if ptype == S.BLOCK_BITMASK:
        return numel
    if nnz == 0:
        return 0
    m = max(1, param)
    b = (m - 1).bit_length()  # spec 6.2: b = ceil(log2 M), u = 2^b - M, w = max(b - 1, 0)
    u, w = (1 << b) - m, max(b - 1, 0)
    long_codes = nnz * (m - u) // m if b else 0
    unary = max(0, (numel - nnz - nnz * (m - 1) // 2) // m)
    return w * nnz + long_codes + unary + nnz


def predicted_size(ptype: int, param: int, numel: int, nnz: int) -> int:
    """Spec 5.9: the predicted size in bytes of a member's positions payload: the predicted
    length in bits (:func:`predicted_bits`) rounded up.

    >>> predicted_size(0x01, 0, 10, 3), predicted_size(0x02, 23, 64, 2)
    (2, 2)
    """
    return (predicted_bits(ptype, param, numel, nnz) + 7) // 8


def common_prefix(a: bytes, b: bytes) -> int:
    """The length of the longest common prefix of two names (their front coding, spec 5.8).

    >>> common_prefix(b"layer.0.q", b"layer.0.v")
    8
    """
    # byte by byte is the point here: names are front-coded as bytes, not path components
    return len(os.path.commonprefix([a, b]))  # noqa: RUF071


#: what column 10 of a member table holds: ``Positions_Size`` (spec 5.9), ``Positions_Bits``
#: (a bit pack, 5.11), or nothing (a lean pack, 5.12: each length is read from the stream)
COLUMN10 = ("bytes", "bits", "none")


def column_table(members: Sequence[Member], first_prev: bytes | None = None,
                 column10: str = "bytes", twins: bool = False) -> bytes:
    """The decoded member table of a column pack (spec 5.9) named after its first member.

    ``first_prev``: what the first name is coded against; by default the pack's ``Name``,
    which is the first name itself (spec 5.9); a compact pack's is empty (spec 5.10).
    ``column10``: see :data:`COLUMN10`; with ``"bits"`` the members' ``psize`` is
    ``Positions_Bits``, coded from the predicted bits (a bit pack, spec 5.11). ``twins``: a
    twin pack's (spec 5.14): each member's ``Twin_Back`` after the dimensions, and columns 7
    to 10 for the members that are not twins only.
    """
    predict = predicted_bits if column10 == "bits" else predicted_size
    prev = members[0].name if first_prev is None else first_prev
    prefixes, lengths, suffixes = bytearray(), bytearray(), bytearray()
    for m in members:
        shared = common_prefix(prev, m.name)
        prefixes += encode_varint(shared)
        lengths += encode_varint(len(m.name) - shared)
        suffixes += m.name[shared:]
        prev = m.name
    out = prefixes + lengths + suffixes
    out += bytes(S.DTYPE_CODES[m.dtype] for m in members)
    out += bytes(len(m.shape) for m in members)
    out += b"".join(encode_varint(d) for m in members for d in m.shape)
    if twins:  # spec 5.14: a twin's nnz, type and param are its source's
        out += b"".join(encode_varint(m.twin) for m in members)
    members = [m for m in members if not m.twin]
    out += b"".join(encode_varint(m.nnz) for m in members)
    out += bytes(m.ptype for m in members)
    for m in members:
        q = predicted_param(m.ptype, math.prod(m.shape), m.nnz)
        out += encode_varint(zigzag(m.param - q))
    for m in members if column10 != "none" else ():
        out += encode_varint(zigzag(m.psize - predict(m.ptype, m.param, math.prod(m.shape),
                                                      m.nnz)))
    return bytes(out)


def compact_table(members: Sequence[Member], scales: Sequence[bytes], column10: str = "bytes",
                  tight: bool = False, twins: bool = False) -> bytes:
    """The decoded member table of a compact pack (spec 5.10, format 1.3); with ``column10``
    ``"bits"`` of a bit pack (spec 5.11, 1.4: the members' ``psize`` is ``Positions_Bits``),
    with ``"none"`` of a lean pack (spec 5.12, 1.5: no column 10); with ``tight`` too, of a
    tight pack (spec 5.13, 1.6: columns 11 and 12 coded as :func:`tight_scale_columns`);
    with ``twins`` too, of a twin pack (spec 5.14, 1.7: the ``Twin_Back`` column).

    The columns of a column pack with the first name stored in full (a compact pack has no
    ``Name`` of its own), then column 11, each member's ``Scale_Ref`` (the scales numbered in
    order of first use), and column 12, each distinct scale once (binary32, 4 bytes each).

    >>> m = [Member(b"a.w", "F32", (8,), 1, 0x01, 0, 1),
    ...      Member(b"b.w", "F32", (64,), 2, 0x02, 23, 2)]
    >>> one = bytes.fromhex("0000803f")  # 1.0
    >>> compact_table(m, [one, one]).hex(" ")
    '00 00 03 03 61 2e 77 62 2e 77 01 01 01 01 08 40 01 02 01 02 00 02 00 00 00 00 00 00 80 3f'
    """
    out = bytearray(column_table(members, b"", column10, twins))
    if tight:
        return bytes(out) + tight_scale_columns(scales)
    refs: dict[bytes, int] = {}
    for scale in scales:
        out += encode_varint(refs.setdefault(bytes(scale), len(refs)))
    return bytes(out) + b"".join(refs)


def tight_scale_columns(scales: Sequence[bytes]) -> bytes:
    """Columns 11 and 12 of a tight pack's table (spec 5.13, 1.6) for the members' scales.

    Column 11 gives each member ``Scale_Back``: 0 for a scale no member before it has (the
    next of column 12), else how many members back the nearest one with the same scale is.
    Column 12 holds the distinct scales in byte planes: every scale's most significant byte
    (sign and exponent), then every scale's next byte, down to the least significant. Alike
    layers give repeating distances, and scales of one magnitude share their top byte, which
    zstd then stores once instead of once per scale.

    >>> half, one = bytes.fromhex("0000003f"), bytes.fromhex("0000803f")  # 0.5, 1.0
    >>> tight_scale_columns([half, one, half, one, one]).hex(" ")
    '00 00 02 02 01 3f 3f 00 80 00 00 00 00'
    """
    last: dict[bytes, int] = {}
    backs, distinct = bytearray(), []
    for k, scale in enumerate(map(bytes, scales)):
        backs += encode_varint(k - last[scale] if scale in last else 0)
        if scale not in last:
            distinct.append(scale)
        last[scale] = k
    return bytes(backs) + bytes(s[3 - i] for i in range(4) for s in distinct)


def read_scale_columns(t: BufferSource, names: Sequence[str]) -> list[bytes]:
    """Columns 11 and 12 of a compact pack's table (spec 5.10): each member's scale bytes.

    A member's ``Scale_Ref`` is at most the number of scales referenced before it
    (R-PACK-12): the scales are stored once each, in order of first use.

    >>> import struct
    >>> t = BufferSource(memoryview(bytes([0, 1, 0]) + struct.pack("<ff", 0.5, 2.0)))
    >>> [struct.unpack("<f", s)[0] for s in read_scale_columns(t, ["a", "b", "c"])]
    [0.5, 2.0, 0.5]
    """
    refs, distinct = [], 0
    for name in names:
        t.tensor = name
        at = t.pos
        ref = t.varint("scale ref")
        if ref > distinct:
            raise CorruptDataError(f"scale ref {ref} skips ahead: {distinct} scales are "
                                   "referenced before it", tensor=name, offset=at)
        distinct += ref == distinct
        refs.append(ref)
    scales = [bytes(t.read(4, "scale")) for _ in range(distinct)]
    return [scales[r] for r in refs]


def read_tight_scale_columns(t: BufferSource, names: Sequence[str]) -> list[bytes]:
    """Columns 11 and 12 of a tight pack's table (spec 5.13, 1.6): each member's scale bytes.

    A member's ``Scale_Back`` reaches at most its own index back, to the first member
    (R-TPK-1).

    >>> t = BufferSource(memoryview(bytes.fromhex("00 00 02 02 01 3f 3f 00 80 00 00 00 00")))
    >>> [s.hex() for s in read_tight_scale_columns(t, ["a", "b", "c", "d", "e"])]
    ['0000003f', '0000803f', '0000003f', '0000803f', '0000803f']
    """
    refs: list[int] = []
    distinct = 0
    for k, name in enumerate(names):
        t.tensor = name
        at = t.pos
        back = t.varint("scale back")
        if back > k:
            raise CorruptDataError(f"scale back {back} reaches before the first member "
                                   f"(member {k})", tensor=name, offset=at)
        refs.append(refs[k - back] if back else distinct)
        distinct += not back
    planes = bytes(t.read(4 * distinct, "scales"))
    scales = [bytes(planes[(3 - i) * distinct + d] for i in range(4)) for d in range(distinct)]
    return [scales[r] for r in refs]


def decode_name(raw: bytes, what: str, at: int) -> str:
    """A tensor name's bytes as text: UTF-8 (spec R-NAME-2) without NUL (R-NAME-3).

    >>> decode_name(b"a.w", "tensor", 0)
    'a.w'
    """
    try:
        name = raw.decode("utf-8", "strict")
    except UnicodeDecodeError:
        raise CorruptDataError(f"{what} name is not valid UTF-8: {raw[:40]!r}",
                               offset=at) from None
    if "\x00" in name:
        raise CorruptDataError(f"{what} name contains NUL: {name[:40]!r}", offset=at)
    return name


def member_name(raw: bytes, at: int, first: bool, prev: bytes, pack: str | None) -> str:
    """Check a pack member's whole name (spec 5.8: R-NAME-2, R-NAME-3, R-PACK-5, R-PACK-7).

    ``pack`` is None for a compact pack (spec 5.10), whose first name is not the record's.
    """
    name = decode_name(raw, "member", at)
    if first and pack is not None and raw != prev:
        raise CorruptDataError(f"the first member is named {name!r}, the pack {pack!r}",
                               tensor=pack, offset=at)
    if (not first or pack is None) and raw <= prev:
        raise CorruptDataError(f"pack member names must increase; {name!r} follows "
                               f"{prev.decode()!r}", tensor=name, offset=at)
    return name


def read_column_table(t: BufferSource, count: int, pack: str | None, limits: ReadLimits,
                      column10: str = "bytes", twins: bool = False) -> list[Member]:
    """Read the columns of a decoded member table (spec 8.1 step 8b), checking each value.

    ``t`` holds the table (its ``base`` the table's offset, for messages); it is left after
    the last column, and the caller checks that nothing follows (R-PACK-3). ``pack`` is the
    record's name, or None for a compact pack (spec 5.10): its first name is coded against
    the empty name. ``column10``: see :data:`COLUMN10` (without it, a member's ``psize`` is
    -1: unknown until its stream is read). ``twins``: a twin pack's table (spec 5.14), with
    a ``Twin_Back`` column (R-TWN-1) after the dimensions; a twin gets its source's nnz,
    type and param.
    """
    predict = predicted_bits if column10 == "bits" else predicted_size
    t.tensor = pack
    prefixes = [t.varint("prefix length") for _ in range(count)]
    lengths = [(t.pos, t.varint("suffix length")) for _ in range(count)]
    names: list[str] = []
    prev = b"" if pack is None else pack.encode()
    raws = []
    for i in range(count):
        shared, (at, n) = prefixes[i], lengths[i]
        if shared > len(prev):
            raise CorruptDataError(f"pack member prefix length {shared} exceeds the previous "
                                   f"name's {len(prev)} bytes", tensor=pack, offset=at)
        if not 1 <= shared + n <= limits.max_name_length:
            raise LimitExceededError(f"member name length {shared + n} outside [1, "
                                     f"{limits.max_name_length}]", tensor=pack, offset=at)
        at = t.pos
        raw = prev[:shared] + bytes(t.read(n, "member name"))
        names.append(member_name(raw, at, i == 0, prev, pack))
        raws.append(raw)
        prev = raw
    dtypes = []
    for name in names:
        t.tensor = name
        code = t.u8("dtype")
        if code not in S.DTYPES:
            raise CorruptDataError(f"unknown dtype code 0x{code:02x}", tensor=name,
                                   offset=t.pos - 1)
        dtype = S.DTYPES[code][0]
        if dtype not in S.TERNARY_DTYPES:
            raise CorruptDataError(f"a ternary record cannot stand for {dtype}", tensor=name,
                                   offset=t.pos - 1)
        dtypes.append(dtype)
    ndims = []
    for name in names:
        t.tensor = name
        ndim = t.u8("ndim")
        if ndim > limits.max_ndim:
            raise LimitExceededError(f"{ndim} dimensions; limit {limits.max_ndim}", tensor=name,
                                     offset=t.pos - 1)
        ndims.append(ndim)
    shapes = []
    for name, ndim in zip(names, ndims, strict=True):
        t.tensor = name
        at = t.pos
        shape = tuple(t.varint("dimension") for _ in range(ndim))
        numel = math.prod(shape)
        extent = math.prod(d for d in shape if d)  # as a record's shape (spec 5.4.3)
        if numel > limits.max_numel:
            raise LimitExceededError(f"shape {list(shape)} has {numel} elements; limit "
                                     f"{limits.max_numel}", tensor=name, offset=at)
        if extent > limits.max_numel:
            raise LimitExceededError(f"shape {list(shape)}: its nonzero dimensions multiply "
                                     f"to {extent}; limit {limits.max_numel}", tensor=name,
                                     offset=at)
        shapes.append(shape)
    backs = _read_twin_backs(t, names, shapes) if twins else [0] * count
    # columns 7 to 10 hold the members that are not twins (spec 5.14); the twins' are filled in
    names = [n for n, j in zip(names, backs, strict=True) if not j]
    shapes, all_shapes = [s for s, j in zip(shapes, backs, strict=True) if not j], shapes
    nnzs = []
    for name, shape in zip(names, shapes, strict=True):
        t.tensor = name
        at = t.pos
        nnz = t.varint("nnz")
        if nnz > math.prod(shape):
            raise CorruptDataError(f"nnz {nnz} exceeds numel {math.prod(shape)}", tensor=name,
                                   offset=at)
        nnzs.append(nnz)
    ptypes = []
    for name in names:
        t.tensor = name
        ptype = t.u8("positions type")
        if ptype not in (S.BLOCK_BITMASK, S.BLOCK_GOLOMB):
            raise CorruptDataError(f"pack member positions type 0x{ptype:02x} is not bitmask "
                                   "or golomb", tensor=name, offset=t.pos - 1)
        ptypes.append(ptype)
    params = []
    for i, name in enumerate(names):
        t.tensor = name
        at = t.pos
        q = predicted_param(ptypes[i], math.prod(shapes[i]), nnzs[i])
        d = unzigzag(t.varint("param delta"))
        if q + d < 0:
            raise CorruptDataError(f"pack member param {q} + {d} is negative", tensor=name,
                                   offset=at)
        params.append(q + d)
    members: list[Member] = []
    for i, name in enumerate(names):
        if column10 == "none":
            members.append(Member(b"", "", (), nnzs[i], ptypes[i], params[i], -1))
            continue
        t.tensor = name
        at = t.pos
        s = predict(ptypes[i], params[i], math.prod(shapes[i]), nnzs[i])
        e = unzigzag(t.varint("size delta"))
        if s + e < 0:
            raise CorruptDataError(f"pack member positions size {s} + {e} is negative",
                                   tensor=name, offset=at)
        members.append(Member(b"", "", (), nnzs[i], ptypes[i], params[i], s + e))
    t.tensor = pack
    rows, own = [], iter(members)
    for k, back in enumerate(backs):
        m = rows[k - back] if back else next(own)
        rows.append(Member(raws[k], dtypes[k], all_shapes[k], m.nnz, m.ptype, m.param, m.psize,
                           back))
    return rows


def _read_twin_backs(t: BufferSource, names: Sequence[str], shapes: Sequence[tuple[int, ...]],
                     ) -> list[int]:
    """The ``Twin_Back`` column of a twin pack's table (spec 5.14), each value checked as it
    is read (R-TWN-1): it reaches a member before, which is not a twin itself and has as
    many elements."""
    backs: list[int] = []
    for k, name in enumerate(names):
        t.tensor = name
        at = t.pos
        back = t.varint("twin back")
        if back:
            problem = ""
            if back > k:
                problem = f"twin back {back} reaches before the first member (member {k})"
            elif backs[k - back]:
                problem = f"its source {names[k - back]!r} ({back} back) is a twin itself"
            elif math.prod(shapes[k]) != math.prod(shapes[k - back]):
                problem = (f"its source {names[k - back]!r} ({back} back) has "
                           f"{math.prod(shapes[k - back])} elements, the twin "
                           f"{math.prod(shapes[k])}")
            if problem:
                raise CorruptDataError(f"twin pack member: {problem}", tensor=name, offset=at)
        backs.append(back)
    return backs
