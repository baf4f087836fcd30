"""Block codecs (spec 6) and the zstd stage (spec 7), one section per codec.

Each codec is pinned three ways: explicit byte tables (hand-computed, so a change of layout
shows up as a diff of bytes), every decode error with its exact class and message, and a
slow, obviously-correct reference written with ``bitarray`` that is cross-checked against
the fast numpy path on hypothesis inputs, in both directions.
"""

from __future__ import annotations

import inspect
import math
import struct
from typing import Any

import numpy as np
import pytest
import zstandard
from bitarray import bitarray
from bitarray.util import ba2int, int2ba
from hypothesis import example, given
from hypothesis import strategies as st
from strategies import st_dense_arrays, st_shapes, st_ternary_tensors, tiny_chunks

from compeft_format import _spec as S
from compeft_format.codecs import (
    ZSTD,
    BitmaskCodec,
    BlockCodec,
    BlockContext,
    DenseCodec,
    GolombCodec,
    PositionsCodec,
    ScaleCodec,
    SignsCodec,
    ZstdStage,
    get_codec,
    golomb,
    registered_codecs,
)
from compeft_format.codecs.zstd_stage import frame_end
from compeft_format.dtypes import storage_dtype
from compeft_format.errors import CorruptDataError, UnsupportedFeatureError

BITMASK, GOLOMB, SIGNS, SCALE, DENSE = (
    BitmaskCodec(), GolombCodec(), SignsCodec(), ScaleCodec(), DenseCodec()
)
WHERE = "tensor 't': byte 100: "  # the prefix every block error carries (ctx below)


def ctx(numel: int, nnz: int = 0, dtype: str = "F32", shape: tuple[int, ...] | None = None,
        ) -> BlockContext:
    """A block context named 't' at offset 100, so messages are predictable."""
    return BlockContext("t", numel, nnz, dtype, (numel,) if shape is None else shape, 100)


def mv(data: bytes) -> memoryview:
    return memoryview(data)


def raises_exactly(cls: type[Exception], message: str, fn: Any, *args: Any) -> None:
    """Assert that ``fn(*args)`` raises exactly ``cls`` (not a subclass) with ``str == message``."""
    with pytest.raises(cls) as info:
        fn(*args)
    assert type(info.value) is cls
    assert str(info.value) == message


st_1d_tensors = st_ternary_tensors(shapes=st_shapes(min_dims=1, max_dims=1, max_side=300))


# ---------------------------------------------------------------------------------------------
# bitarray references: slow and obviously correct, one element or code at a time
# ---------------------------------------------------------------------------------------------


def ref_bits_encode(bits: list[bool]) -> bytes:
    """Bits LSB-first, zero padding (spec 2.2)."""
    return bitarray(bits, endian="little").tobytes()


def ref_bits_decode(payload: bytes, count: int) -> list[bool] | None:
    """``count`` bits, or None when the size or the zero-padding rule is broken."""
    if len(payload) != (count + 7) // 8:
        return None
    a = bitarray(endian="little")
    a.frombytes(payload)
    if a[count:].any():
        return None
    return a[:count].tolist()


def ref_bitmask_encode(indices: list[int], numel: int) -> bytes:
    a = bitarray(numel, endian="little")
    a.setall(0)
    for i in indices:
        a[i] = 1
    return a.tobytes()


def ref_bitmask_decode(payload: bytes, param: int, numel: int, nnz: int) -> list[int] | None:
    bits = ref_bits_decode(payload, numel) if param == 0 else None
    if bits is None:
        return None
    indices = [i for i, bit in enumerate(bits) if bit]
    return indices if len(indices) == nnz else None


def ref_golomb_encode(indices: list[int], m: int) -> bytes:
    """The split layout of spec 6.2.1, built code by code.

    Gap ``g`` (zeros since the previous nonzero) -> ``q, r = divmod(g, m)``; ``r`` takes a
    truncated binary code: ``b - 1`` bits when ``r < u``, else ``r + u`` in ``b`` bits.
    Stream = plane 0 .. plane b-2 (bit j of each code's top part) | the low bits of the long
    codes | q zeros and a one per code.
    """
    b = (m - 1).bit_length()
    u = (1 << b) - m
    w = max(b - 1, 0)
    planes = [bitarray(endian="little") for _ in range(w)]
    ext = bitarray(endian="little")
    unary = bitarray(endian="little")
    prev = -1
    for i in indices:
        q, r = divmod(i - prev - 1, m)
        prev = i
        if b == 0:  # M = 1: no remainder bits at all
            top = 0
        elif r < u:
            top = r
        else:
            top, low = divmod(r + u, 2)
            ext.append(low)
        for j in range(w):
            planes[j].append((top >> j) & 1)
        unary.extend([0] * q)
        unary.append(1)
    stream = bitarray(endian="little")
    for plane in planes:
        stream += plane
    return (stream + ext + unary).tobytes()


class _End(Exception):
    pass


def ref_golomb_decode(payload: bytes, m: int, numel: int, nnz: int) -> list[int] | None:
    """Positions, or None where spec 6.2 says the block is invalid."""
    if not 1 <= m <= max(1, numel):
        return None
    if nnz == 0:
        return [] if m == 1 and not payload else None
    b = (m - 1).bit_length()
    u = (1 << b) - m
    w = max(b - 1, 0)
    a = bitarray(endian="little")
    a.frombytes(payload)
    pos = 0

    def take() -> int:
        nonlocal pos
        if pos >= len(a):
            raise _End
        pos += 1
        return a[pos - 1]

    try:
        tops = [0] * nnz
        for j in range(w):
            for k in range(nnz):
                tops[k] |= take() << j
        rems = [((t << 1) | take()) - u if b >= 1 and t >= u else t for t in tops]
        out, prev = [], -1
        for r in rems:
            q = 0
            while not take():
                q += 1
            prev += q * m + r + 1
            out.append(prev)
    except _End:
        return None
    if a[pos:].any() or (pos + 7) // 8 != len(payload) or out[-1] >= numel:
        return None
    return out


def ref_scale_encode(x: float) -> bytes:
    """IEEE 754 binary32 bits from ``math.frexp`` (``x`` is exact in float32, not negative)."""
    if x == 0.0:
        bits = 0
    else:
        frac, exp = math.frexp(x)  # x = frac * 2**exp, 0.5 <= frac < 1
        if exp - 1 >= -126:
            bits = (exp - 1 + 127) << 23 | int((2 * frac - 1) * 2**23)
        else:
            bits = int(x * 2**149)  # subnormal: a multiple of 2**-149
    return int2ba(bits, 32, endian="little").tobytes()


def ref_scale_decode(payload: bytes, param: int) -> float | None:
    if param != 0 or len(payload) != 4:
        return None
    a = bitarray(endian="little")
    a.frombytes(payload)
    bits = ba2int(a)
    sign, exp, man = bits >> 31, (bits >> 23) & 0xFF, bits & (2**23 - 1)
    if exp == 0xFF or sign:  # infinities and NaNs; a sign bit (so -0.0 too)
        return None
    return man * 2.0**-149 if exp == 0 else (2**23 + man) * 2.0 ** (exp - 150)


def ref_dense_encode(storage: np.ndarray, dtype: str) -> bytes:
    size = S.ITEMSIZE[dtype]
    a = bitarray(endian="little")
    for v in storage.reshape(-1).view(f"u{size}").tolist():
        a += int2ba(v, 8 * size, endian="little")
    return a.tobytes()


def ref_dense_decode(payload: bytes, param: int, dtype: str, shape: tuple[int, ...],
                     ) -> np.ndarray | None:
    size = S.ITEMSIZE[dtype]
    if param != 0 or len(payload) != size * math.prod(shape):
        return None
    values = []
    for k in range(0, len(payload), size):
        a = bitarray(endian="little")
        a.frombytes(payload[k : k + size])
        values.append(ba2int(a) if size > 1 or a.any() else 0)
    if dtype == "BOOL" and any(v > 1 for v in values):
        return None
    return np.array(values, dtype=f"<u{size}").view(storage_dtype(dtype)).reshape(shape)


def ref_zstd_frame_header(frame: bytes) -> tuple[int | None, bool, int]:
    """Return (Frame_Content_Size or None, Content_Checksum_flag, Dictionary_ID_flag).

    RFC 8878 3.1.1.1: the descriptor byte after the magic holds, from bit 7 down,
    FCS_Field_Size flag (2 bits), Single_Segment (1), unused, reserved, Checksum (1), Dict_ID (2).
    """
    assert frame[:4] == b"\x28\xb5\x2f\xfd"
    fhd = bitarray(endian="little")
    fhd.frombytes(frame[4:5])
    fcs_flag, single, checksum, dict_flag = ba2int(fhd[6:8]), fhd[5], fhd[2], ba2int(fhd[0:2])
    at = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if size == 0:
        return None, bool(checksum), dict_flag
    a = bitarray(endian="little")
    a.frombytes(frame[at : at + size])
    return ba2int(a) + (256 if size == 2 else 0), bool(checksum), dict_flag


def fast_or_none(codec: BlockCodec, payload: bytes, param: int, c: BlockContext) -> Any:
    """The fast decode, with a CorruptDataError (the only error allowed) mapped to None."""
    try:
        return codec.decode(mv(payload), param, c)
    except CorruptDataError as exc:
        where = (exc.tensor, exc.offset)
    assert where == ("t", 100)  # every block error names the tensor and the block's offset
    return None


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def _all_subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _all_subclasses(sub)
    return out


def test_every_block_codec_is_registered_under_its_spec_id() -> None:
    registry = registered_codecs()
    assert {bt: type(c) for bt, c in registry.items()} == {
        S.BLOCK_BITMASK: BitmaskCodec,
        S.BLOCK_GOLOMB: GolombCodec,
        S.BLOCK_SIGNS: SignsCodec,
        S.BLOCK_SCALE: ScaleCodec,
        S.BLOCK_DENSE: DenseCodec,
    }
    concrete = {c for c in _all_subclasses(BlockCodec) if not inspect.isabstract(c)}
    assert concrete == set(registry_types := {type(c) for c in registry.values()})
    assert PositionsCodec in _all_subclasses(BlockCodec) - registry_types  # abstract: no id
    for cls in concrete:
        assert type(registry[cls.block_type]) is cls
        assert get_codec(cls.block_type) is registry[cls.block_type]
        assert not cls.block_type & S.BLOCK_OPTIONAL_BIT  # every known block is required
    assert {c.name: c.role for c in registry.values()} == {
        "bitmask": "positions", "golomb": "positions", "signs": "signs", "scale": "scale",
        "dense": "dense",
    }


def test_no_registration_hook_that_reader_and_writer_would_ignore() -> None:
    """The block types are the spec's: a codec registered at run time was never read or
    written (the container's record rules name the known blocks), so there is no hook."""
    from compeft_format import codecs
    from compeft_format.codecs import base

    assert not hasattr(codecs, "register_codec")
    assert not hasattr(base, "register_codec")
    assert type(get_codec(S.BLOCK_BITMASK)) is BitmaskCodec


def test_unknown_block_type() -> None:
    raises_exactly(UnsupportedFeatureError, "unknown block type 0x7f", get_codec, 0x7F)
    raises_exactly(UnsupportedFeatureError, WHERE + "unknown block type 0x99", get_codec, 0x99,
                   ctx(1))


def test_registry_is_a_copy() -> None:
    copy = registered_codecs()
    copy.clear()
    assert len(registered_codecs()) == 5


# ---------------------------------------------------------------------------------------------
# Bitmask (spec 6.1)
# ---------------------------------------------------------------------------------------------

BITMASK_TABLE = [  # numel, indices, payload
    (0, [], b""),
    (1, [], b"\x00"),
    (1, [0], b"\x01"),
    (8, list(range(8)), b"\xff"),
    (9, [8], b"\x00\x01"),
    (10, [0, 2, 9], b"\x05\x02"),
    (16, [7, 8], b"\x80\x01"),
    (17, [16], b"\x00\x00\x01"),
    (17, [1, 3, 5, 15], b"\x2a\x80\x00"),
]


@pytest.mark.parametrize(("numel", "indices", "payload"), BITMASK_TABLE)
def test_bitmask_table(numel: int, indices: list[int], payload: bytes) -> None:
    c = ctx(numel, len(indices))
    assert BITMASK.encode(np.array(indices, dtype=np.int64), c) == (0, payload)
    assert BITMASK.encoded_size(np.array(indices), c) == (0, len(payload))
    assert BITMASK.decode(mv(payload), 0, c).tolist() == indices


@pytest.mark.parametrize("numel", range(1, 18))
def test_bitmask_every_leftover_bit_count(numel: int) -> None:
    """Sizes 1..17 cover every count of padding bits; each padding bit must be zero."""
    indices = list(range(0, numel, 2))
    c = ctx(numel, len(indices))
    _, payload = BITMASK.encode(np.array(indices), c)
    assert len(payload) == (numel + 7) // 8 == BITMASK.max_decoded_size(0, c)
    assert payload == ref_bitmask_encode(indices, numel)
    assert BITMASK.decode(mv(payload), 0, c).tolist() == indices
    for bit in range(numel, 8 * len(payload)):
        bad = bytearray(payload)
        bad[-1] |= 1 << (bit % 8)
        raises_exactly(CorruptDataError, f"{WHERE}bitmask block: padding bits must be zero "
                       f"(last byte 0x{bad[-1]:02x})", BITMASK.decode, mv(bytes(bad)), 0, c)
    for size in (len(payload) - 1, len(payload) + 1):
        raises_exactly(CorruptDataError, f"{WHERE}bitmask block: {size} bytes, {numel} bits need "
                       f"exactly {len(payload)}", BITMASK.decode, mv(bytes(size)), 0, c)


def test_bitmask_errors() -> None:
    raises_exactly(CorruptDataError, WHERE + "bitmask block: param must be 0, got 1",
                   BITMASK.decode, mv(b"\x01"), 1, ctx(8, 1))
    raises_exactly(CorruptDataError, WHERE + "bitmask block: 1 bits set, nnz is 2",
                   BITMASK.decode, mv(b"\x01"), 0, ctx(8, 2))
    raises_exactly(CorruptDataError, WHERE + "bitmask block: 2 bits set, nnz is 1",
                   BITMASK.decode, mv(b"\x03"), 0, ctx(8, 1))
    raises_exactly(CorruptDataError, WHERE + "bitmask block: 1 bytes, 0 bits need exactly 0",
                   BITMASK.decode, mv(b"\x00"), 0, ctx(0, 0))


@given(st_1d_tensors)
def test_bitmask_matches_reference(t: Any) -> None:
    c = ctx(t.numel, t.nnz)
    param, payload = BITMASK.encode(t.indices, c)
    assert (param, payload) == (0, ref_bitmask_encode(t.indices.tolist(), t.numel))
    assert ref_bitmask_decode(payload, 0, t.numel, t.nnz) == t.indices.tolist()
    assert BITMASK.decode(mv(payload), 0, c).tolist() == t.indices.tolist()


@given(st.integers(0, 24), st.integers(0, 25), st.integers(0, 1), st.binary(max_size=4))
@example(numel=9, nnz=1, param=0, payload=b"\x00\x01")
def test_bitmask_decode_agrees_with_reference_on_any_bytes(numel: int, nnz: int, param: int,
                                                           payload: bytes) -> None:
    fast = fast_or_none(BITMASK, payload, param, ctx(numel, nnz))
    ref = ref_bitmask_decode(payload, param, numel, nnz)
    assert (None if fast is None else fast.tolist()) == ref


# ---------------------------------------------------------------------------------------------
# Golomb (spec 6.2)
# ---------------------------------------------------------------------------------------------

GOLOMB_ENCODE_TABLE = [  # numel, indices, M chosen by the encoder, payload
    (0, [], 1, b""),
    (7, [], 1, b""),
    (1, [0], 1, b"\x01"),
    (5, [0, 1, 4], 1, b"\x13"),  # M = 1: unary only, 1 | 1 | 001
    (16, [2, 3, 11], 2, b"\x34\x02"),  # M = 2: no planes, ext 0 0 1, unary 01 1 0001
    (20, [0, 2, 6, 19], 3, b"\x62\x21"),  # truncated binary: r = 0 short, r = 1 long
    (20, [2], 13, b"\x0a"),  # b = 4, u = 3: r = 2 short, 3 plane bits 0 1 0
    (32, [5, 6, 31], 6, b"\xc9\x21"),
    (40, [4, 8, 9, 39], 6, b"\xb9\x3e\x04"),
    (64, [63], 43, b"\x54"),  # q = 1, r = 20 < u = 21: short
    (1000, [5, 600], 345, b"\x11\xa2\x0a"),  # 8 planes; the second code is long, ext 0
]

GOLOMB_DECODE_TABLE = [  # numel, M (not the encoder's choice), payload, indices
    (20, 3, b"\x07", [2]),  # r = 2: long, r + u = 3 -> plane 1, ext 1
    (32, 4, b"\x88\x81", [5, 6, 31]),  # M = 4 is Rice k = 2: every code long
    (40, 5, b"\xbb\x3d\x08", [4, 8, 9, 39]),  # b = 3, u = 3: r = 4 -> 7: plane 3, ext 1
]


@pytest.mark.parametrize(("numel", "indices", "m", "payload"), GOLOMB_ENCODE_TABLE)
def test_golomb_encode_table(numel: int, indices: list[int], m: int, payload: bytes) -> None:
    c = ctx(numel, len(indices))
    assert GOLOMB.encode(np.array(indices, dtype=np.int64), c) == (m, payload)
    assert GOLOMB.encoded_size(np.array(indices, dtype=np.int64), c) == (m, len(payload))
    assert GOLOMB.decode(mv(payload), m, c).tolist() == indices


@pytest.mark.parametrize(("numel", "m", "payload", "indices"), GOLOMB_DECODE_TABLE)
def test_golomb_decode_table(numel: int, m: int, payload: bytes, indices: list[int]) -> None:
    c = ctx(numel, len(indices))
    assert GOLOMB.decode(mv(payload), m, c).tolist() == indices
    assert ref_golomb_encode(indices, m) == payload


def test_golomb_rice_top_code() -> None:
    """M = 8 (b = 3, u = 0): r = 7 -> planes hold 7 >> 1 = 3 (bits 1, 1), ext 1, unary 1."""
    c = ctx(8, 1)
    assert GOLOMB.decode(mv(b"\x0f"), 8, c).tolist() == [7]
    assert ref_golomb_encode([7], 8) == b"\x0f"


@pytest.mark.parametrize("bits", range(1, 18))
def test_golomb_every_leftover_bit_count(bits: int) -> None:
    """A stream of 1..17 bits (M = 1, one code ending at bit ``bits - 1``); padding is zero."""
    numel, indices = bits, [bits - 1]
    payload = ref_golomb_encode(indices, 1)
    assert len(payload) == (bits + 7) // 8
    c = ctx(numel, 1)
    assert GOLOMB.decode(mv(payload), 1, c).tolist() == indices
    for bit in range(bits, 8 * len(payload)):  # a padding bit reads as an extra code
        bad = bytearray(payload)
        bad[-1] |= 1 << (bit % 8)
        raises_exactly(CorruptDataError, WHERE + "golomb block: 2 unary codes, nnz is 1",
                       GOLOMB.decode, mv(bytes(bad)), 1, c)
    n = len(payload)
    raises_exactly(CorruptDataError, f"{WHERE}golomb block: stream ends at byte {n}, block has "
                   f"{n + 1}", GOLOMB.decode, mv(payload + b"\x00"), 1, c)
    # the encoder's own choice for a full tensor of this size: M = 1, all ones
    full = ctx(bits, bits)
    m, dense_payload = GOLOMB.encode(np.arange(bits), full)
    assert (m, dense_payload) == (1, ref_bits_encode([True] * bits))


GOLOMB_ERRORS = [  # numel, nnz, M, payload, message
    (16, 1, 0, b"\x01", "parameter M = 0 outside [1, 16]"),
    (16, 1, 17, b"\x01", "parameter M = 17 outside [1, 16]"),
    (0, 0, 2, b"", "parameter M = 2 outside [1, 1]"),
    (4, 0, 1, b"\x00", "nnz is 0 but M = 1 and 1 bytes"),
    (4, 0, 2, b"", "nnz is 0 but M = 2 and 0 bytes"),
    (16, 9, 1, b"\xff", "1 bytes cannot hold 9 codes with M = 1"),
    (64, 2, 40, b"\x01", "1 bytes cannot hold 2 codes with M = 40"),
    (16, 8, 2, b"\xff", "1 bytes too short for the codes"),
    (16, 2, 1, b"\x01", "1 unary codes, nnz is 2"),
    (16, 1, 1, b"\x00", "0 unary codes, nnz is 1"),
    (16, 1, 1, b"\x01\x00", "stream ends at byte 1, block has 2"),
    (4, 1, 1, b"\x10", "positions run to 4, numel is 4"),
    (4, 2, 2, b"\x15", "positions run to 4, numel is 4"),  # gaps 1, 2: positions 1, 4
]


@pytest.mark.parametrize(("numel", "nnz", "m", "payload", "message"), GOLOMB_ERRORS)
def test_golomb_errors(numel: int, nnz: int, m: int, payload: bytes, message: str) -> None:
    raises_exactly(CorruptDataError, f"{WHERE}golomb block: {message}", GOLOMB.decode,
                   mv(payload), m, ctx(numel, nnz))
    assert ref_golomb_decode(payload, m, numel, nnz) is None


@given(st_1d_tensors)
def test_golomb_encoder_matches_reference(t: Any) -> None:
    c = ctx(t.numel, t.nnz)
    indices = t.indices.tolist()
    m, payload = GOLOMB.encode(t.indices.copy(), c)
    assert payload == ref_golomb_encode(indices, m)
    assert GOLOMB.encoded_size(t.indices, c) == (m, len(payload))
    assert len(payload) <= GOLOMB.max_decoded_size(m, c)
    assert ref_golomb_decode(payload, m, t.numel, t.nnz) == indices
    assert t.indices.tolist() == indices  # encode must not modify its input


@given(st_1d_tensors, st.data())
def test_golomb_decoder_reads_reference_streams_for_any_m(t: Any, data: st.DataObject) -> None:
    """The decoder reads every valid M, not just the encoder's choice."""
    if t.nnz == 0:
        m = 1
    else:
        edges = [m for m in (1, 2, 3, t.numel) if m <= t.numel]
        m = data.draw(st.integers(1, t.numel) | st.sampled_from(edges))
    payload = ref_golomb_encode(t.indices.tolist(), m)
    c = ctx(t.numel, t.nnz)
    assert GOLOMB.decode(mv(payload), m, c).tolist() == t.indices.tolist()
    assert len(payload) <= GOLOMB.max_decoded_size(m, c)


@st.composite
def st_golomb_inputs(draw: st.DrawFn) -> tuple[int, int, int, bytes]:
    """(numel, nnz, M, payload): arbitrary bytes, or a valid stream with one small defect."""
    numel = draw(st.integers(0, 40))
    if draw(st.booleans()):
        return (numel, draw(st.integers(0, numel + 1)), draw(st.integers(0, numel + 2)),
                draw(st.binary(max_size=8)))
    indices = sorted(draw(st.sets(st.integers(0, max(0, numel - 1)), max_size=numel)))
    m = draw(st.integers(1, max(1, numel)))
    payload = bytearray(ref_golomb_encode(indices, m) if indices else b"")
    defect = draw(st.sampled_from(["none", "flip", "append", "drop", "nnz", "m"]))
    nnz = len(indices)
    if defect == "flip" and payload:
        bit = draw(st.integers(0, 8 * len(payload) - 1))
        payload[bit // 8] ^= 1 << (bit % 8)
    elif defect == "append":
        payload += draw(st.binary(min_size=1, max_size=2))
    elif defect == "drop" and payload:
        payload = payload[:-1]
    elif defect == "nnz":
        nnz = draw(st.integers(0, numel + 1))
    elif defect == "m":
        m = draw(st.integers(0, numel + 2))
    return numel, nnz, m, bytes(payload)


@st.composite
def st_golomb_inputs_huge(draw: st.DrawFn) -> tuple[int, int, int, bytes]:
    """(numel, nnz, M, payload) with numel up to max_numel: big gaps, big M, 64-bit paths."""
    numel = draw(st.integers(1, S.DEFAULT_LIMITS.max_numel))
    indices = sorted(draw(st.sets(st.integers(0, numel - 1), max_size=6)))
    if not indices or draw(st.booleans()):
        m = draw(st.integers(1, numel) | st.sampled_from([0, 1, 2, numel, numel + 1]))
        return numel, draw(st.integers(0, 6)), m, draw(st.binary(max_size=40))
    m = draw(st.integers(short_unary_m(indices), numel))
    payload = bytearray(ref_golomb_encode(indices, m))
    if draw(st.booleans()):
        bit = draw(st.integers(0, 8 * len(payload) - 1))
        payload[bit // 8] ^= 1 << (bit % 8)
    return numel, len(indices), m, bytes(payload)


def short_unary_m(indices: list[int]) -> int:
    """The least M for which no code of ``indices`` has more than 2048 unary zeros."""
    gaps = np.diff(np.array([-1, *indices], dtype=object)) - 1
    return max(1, -(-int(max(gaps, default=0)) // 2048))


@given(st_golomb_inputs() | st_golomb_inputs_huge())
@example((16, 3, 2, b"\x34\x02"))
@example((8, 8, 1, b"\xff"))
def test_golomb_decode_agrees_with_reference_on_any_bytes(args: tuple) -> None:
    numel, nnz, m, payload = args
    fast = fast_or_none(GOLOMB, payload, m, ctx(numel, nnz))
    ref = ref_golomb_decode(payload, m, numel, nnz)
    assert (None if fast is None else fast.tolist()) == ref


@given(st.integers(1, S.DEFAULT_LIMITS.max_numel), st.data())
@example(2**48, None)
def test_golomb_huge_numel_matches_reference(numel: int, data: st.DataObject | None) -> None:
    """Up to max_numel elements: gaps and M far beyond 32 bits, unary parts kept short."""
    if data is None:  # the extremes: first and last position of the largest tensor
        indices = [0, numel - 1]
    else:
        indices = sorted(data.draw(st.sets(st.integers(0, numel - 1), max_size=12)))
    c = ctx(numel, len(indices))
    m, payload = GOLOMB.encode(np.array(indices, dtype=np.int64), c)
    assert payload == ref_golomb_encode(indices, m)
    assert GOLOMB.decode(mv(payload), m, c).tolist() == indices
    if indices and data is not None:
        m2 = data.draw(st.integers(short_unary_m(indices), numel))
        payload2 = ref_golomb_encode(indices, m2)
        assert GOLOMB.decode(mv(payload2), m2, c).tolist() == indices


def chunks_of(codec: Any, payload: bytes, param: int, c: BlockContext) -> list[int]:
    """The positions a codec yields chunk by chunk; each chunk starts where the last ended."""
    out: list[int] = []
    for k0, pos in codec.positions(mv(payload), param, c):
        assert k0 == len(out)
        out += pos.tolist()
    return out


@given(st_1d_tensors, st_golomb_inputs() | st_golomb_inputs_huge())
def test_chunked_paths_match_reference_at_every_boundary(t: Any, args: tuple) -> None:
    """With chunks of one byte and spans of a few elements, every cut is crossed."""
    indices = t.indices.tolist()
    c = ctx(t.numel, t.nnz)
    with tiny_chunks(sample=True):
        _, mask = BITMASK.encode(t.indices, c)
        assert mask == ref_bitmask_encode(indices, t.numel)
        assert chunks_of(BITMASK, mask, 0, c) == indices == BITMASK.decode(mv(mask), 0, c).tolist()
        m, payload = GOLOMB.encode(t.indices, c)
        assert payload == ref_golomb_encode(indices, m)
        gaps = np.diff(t.indices, prepend=-1) - 1
        assert m == golomb.choose_parameter(gaps, t.numel)  # the sampled choice, stride > 1
        assert chunks_of(GOLOMB, payload, m, c) == indices
        assert GOLOMB.decode(mv(payload), m, c).tolist() == indices
        numel, nnz, m2, raw = args
        fast = fast_or_none(GOLOMB, raw, m2, ctx(numel, nnz))
        assert (None if fast is None else fast.tolist()) == ref_golomb_decode(raw, m2, numel, nnz)


# ---------------------------------------------------------------------------------------------
# Signs (spec 6.3)
# ---------------------------------------------------------------------------------------------

SIGNS_TABLE = [  # signs (True = negative), payload
    ([], b""),
    ([False], b"\x00"),
    ([True], b"\x01"),
    ([True, False, True], b"\x05"),
    ([True] * 8, b"\xff"),
    ([True] * 9, b"\xff\x01"),
    ([False] * 8 + [True], b"\x00\x01"),
    ([False] * 15 + [True, True], b"\x00\x80\x01"),
]


@pytest.mark.parametrize(("signs", "payload"), SIGNS_TABLE)
def test_signs_table(signs: list[bool], payload: bytes) -> None:
    c = ctx(32, len(signs))
    assert SIGNS.encode(np.array(signs, dtype=bool), c) == (0, payload)
    assert SIGNS.decode(mv(payload), 0, c).tolist() == signs


@pytest.mark.parametrize("nnz", range(1, 18))
def test_signs_every_leftover_bit_count(nnz: int) -> None:
    signs = [k % 3 == 0 for k in range(nnz)]
    c = ctx(64, nnz)
    _, payload = SIGNS.encode(np.array(signs), c)
    assert payload == ref_bits_encode(signs)
    assert len(payload) == SIGNS.max_decoded_size(0, c) == (nnz + 7) // 8
    for bit in range(nnz, 8 * len(payload)):
        bad = bytearray(payload)
        bad[-1] |= 1 << (bit % 8)
        raises_exactly(CorruptDataError, f"{WHERE}signs block: padding bits must be zero "
                       f"(last byte 0x{bad[-1]:02x})", SIGNS.decode, mv(bytes(bad)), 0, c)
    raises_exactly(CorruptDataError, f"{WHERE}signs block: {len(payload) + 1} bytes, {nnz} bits "
                   f"need exactly {len(payload)}", SIGNS.decode, mv(payload + b"\x00"), 0, c)


def test_signs_errors() -> None:
    raises_exactly(CorruptDataError, WHERE + "signs block: param must be 0, got 3",
                   SIGNS.decode, mv(b"\x01"), 3, ctx(8, 1))
    raises_exactly(CorruptDataError, WHERE + "signs block: 0 bytes, 3 bits need exactly 1",
                   SIGNS.decode, mv(b""), 0, ctx(8, 3))


@given(st.lists(st.booleans(), max_size=40))
def test_signs_match_reference(signs: list[bool]) -> None:
    c = ctx(64, len(signs))
    _, payload = SIGNS.encode(np.array(signs, dtype=bool), c)
    assert payload == ref_bits_encode(signs)
    assert ref_bits_decode(payload, len(signs)) == signs


@given(st.integers(0, 20), st.binary(max_size=4), st.integers(0, 1))
def test_signs_decode_agrees_with_reference_on_any_bytes(nnz: int, payload: bytes,
                                                         param: int) -> None:
    fast = fast_or_none(SIGNS, payload, param, ctx(64, nnz))
    ref = ref_bits_decode(payload, nnz) if param == 0 else None
    assert (None if fast is None else fast.tolist()) == ref


# ---------------------------------------------------------------------------------------------
# Scale (spec 6.4)
# ---------------------------------------------------------------------------------------------

_F32_MAX = float(np.finfo(np.float32).max)
SCALE_TABLE = [  # scale, payload
    (0.0, b"\x00\x00\x00\x00"),
    (1.0, b"\x00\x00\x80\x3f"),
    (0.5, b"\x00\x00\x00\x3f"),
    (2.0, b"\x00\x00\x00\x40"),
    (65504.0, b"\x00\xe0\x7f\x47"),
    (2.0**-149, b"\x01\x00\x00\x00"),
    (2.0**-126, b"\x00\x00\x80\x00"),
    (_F32_MAX, b"\xff\xff\x7f\x7f"),
]


@pytest.mark.parametrize(("scale", "payload"), SCALE_TABLE)
def test_scale_table(scale: float, payload: bytes) -> None:
    assert SCALE.encode(scale, ctx(4, 1)) == (S.SCALE_F32, payload)
    assert SCALE.decode(mv(payload), 0, ctx(4, 1)) == scale
    assert ref_scale_encode(scale) == payload
    assert SCALE.max_decoded_size(0, ctx(4, 1)) == 4


@pytest.mark.parametrize(("payload", "shown"), [
    (b"\x00\x00\xc0\x7f", "nan"),
    (b"\x00\x00\x80\x7f", "inf"),
    (b"\x00\x00\x80\xff", "-inf"),
    (b"\x00\x00\x00\x80", "-0.0"),
    (b"\x00\x00\x80\xbf", "-1.0"),
    (b"\x01\x00\x00\x80", "-1.401298464324817e-45"),
])
def test_scale_rejects_non_finite_and_negative(payload: bytes, shown: str) -> None:
    raises_exactly(CorruptDataError, f"{WHERE}scale block: scale must be finite and "
                   f"non-negative, got {shown}", SCALE.decode, mv(payload), 0, ctx(4, 1))


def test_scale_errors() -> None:
    # a nonzero Param is a scale dtype of a later version: unsupported, not corrupt
    raises_exactly(UnsupportedFeatureError, WHERE + "scale block: scale dtype 1 is unknown",
                   SCALE.decode, mv(b"\x00\x00\x80\x3f"), 1, ctx(4, 1))
    for size in (0, 3, 5, 8):
        raises_exactly(CorruptDataError, f"{WHERE}scale block: {size} bytes, a float32 scale "
                       "needs 4", SCALE.decode, mv(bytes(size)), 0, ctx(4, 1))


@given(st.floats(0.0, _F32_MAX, width=32))
def test_scale_matches_reference(scale: float) -> None:
    scale = abs(scale)
    _, payload = SCALE.encode(scale, ctx(1, 1))
    assert payload == ref_scale_encode(scale)
    assert ref_scale_decode(payload, 0) == scale == SCALE.decode(mv(payload), 0, ctx(1, 1))


@given(st.binary(min_size=3, max_size=5) | st.binary(min_size=4, max_size=4))
def test_scale_decode_agrees_with_reference_on_any_bytes(payload: bytes) -> None:
    fast = fast_or_none(SCALE, payload, 0, ctx(1, 1))
    ref = ref_scale_decode(payload, 0)
    assert fast == ref
    if ref is not None:
        assert struct.pack("<f", fast) == payload  # the value keeps every bit


# ---------------------------------------------------------------------------------------------
# Dense (spec 6.5)
# ---------------------------------------------------------------------------------------------

DENSE_TABLE = [  # dtype, storage array, payload
    ("I16", np.array([1, 2], np.int16), b"\x01\x00\x02\x00"),
    ("I8", np.array([[1, 2], [3, -1]], np.int8), b"\x01\x02\x03\xff"),  # C order
    ("U16", np.array([0x1234], np.uint16), b"\x34\x12"),
    ("I32", np.array([-2], np.int32), b"\xfe\xff\xff\xff"),
    ("U32", np.array([0x01020304], np.uint32), b"\x04\x03\x02\x01"),
    ("I64", np.array([-1], np.int64), b"\xff" * 8),
    ("U64", np.array([2**63], np.uint64), b"\x00" * 7 + b"\x80"),
    ("U8", np.array([0, 255], np.uint8), b"\x00\xff"),
    ("BOOL", np.array([True, False, True]), b"\x01\x00\x01"),
    ("F16", np.array([1.0, -2.0], np.float16), b"\x00\x3c\x00\xc0"),
    ("F32", np.array([1.0], np.float32), b"\x00\x00\x80\x3f"),
    ("F64", np.array([1.0], np.float64), b"\x00\x00\x00\x00\x00\x00\xf0\x3f"),
    ("BF16", np.array([0x3F80, 0xC000], np.uint16), b"\x80\x3f\x00\xc0"),  # raw bits: 1, -2
    ("F8_E4M3", np.array([0x38, 0xFF], np.uint8), b"\x38\xff"),
    ("F8_E5M2", np.array([0x3C], np.uint8), b"\x3c"),
    ("F32", np.zeros((0, 3), np.float32), b""),
    ("F64", np.array(2.0), b"\x00\x00\x00\x00\x00\x00\x00\x40"),  # 0-d
]


@pytest.mark.parametrize(("dtype", "storage", "payload"), DENSE_TABLE)
def test_dense_table(dtype: str, storage: np.ndarray, payload: bytes) -> None:
    c = ctx(storage.size, 0, dtype, storage.shape)
    assert DENSE.encode(storage, c) == (0, payload)
    out = DENSE.decode(mv(payload), 0, c)
    assert out.dtype == storage_dtype(dtype)
    assert out.shape == storage.shape
    assert out.tobytes() == payload
    assert DENSE.max_decoded_size(0, c) == len(payload)


def test_dense_errors() -> None:
    raises_exactly(CorruptDataError, WHERE + "dense block: param must be 0, got 2",
                   DENSE.decode, mv(b"\x01\x00"), 2, ctx(1, 0, "I16", (1,)))
    raises_exactly(CorruptDataError, WHERE + "dense block: 3 bytes, I16[2] needs 4",
                   DENSE.decode, mv(b"\x01\x00\x02"), 0, ctx(2, 0, "I16", (2,)))
    raises_exactly(CorruptDataError, WHERE + "dense block: 1 bytes, F64[] needs 8",
                   DENSE.decode, mv(b"\x00"), 0, ctx(1, 0, "F64", ()))
    for bad in (b"\x02", b"\x00\xff"):
        raises_exactly(CorruptDataError, WHERE + "dense block: BOOL bytes must be 0 or 1",
                       DENSE.decode, mv(bad), 0, ctx(len(bad), 0, "BOOL", (len(bad),)))


@given(st_dense_arrays())
def test_dense_matches_reference(value: tuple[Any, np.ndarray, str]) -> None:
    _, storage, dtype = value
    c = ctx(storage.size, 0, dtype, storage.shape)
    param, payload = DENSE.encode(storage, c)
    assert (param, payload) == (0, ref_dense_encode(storage, dtype))
    ref = ref_dense_decode(payload, 0, dtype, storage.shape)
    fast = DENSE.decode(mv(payload), 0, c)
    assert ref is not None
    assert fast.tobytes() == ref.tobytes() == storage.tobytes()
    assert fast.shape == ref.shape == storage.shape


@given(st.sampled_from([name for name, _ in S.DTYPES.values()]), st.binary(max_size=17),
       st.integers(0, 4))
def test_dense_decode_agrees_with_reference_on_any_bytes(dtype: str, payload: bytes,
                                                         n: int) -> None:
    c = ctx(n, 0, dtype, (n,))
    fast = fast_or_none(DENSE, payload, 0, c)
    ref = ref_dense_decode(payload, 0, dtype, (n,))
    assert (fast is None) == (ref is None)
    if ref is not None:
        assert fast.tobytes() == ref.tobytes()


# ---------------------------------------------------------------------------------------------
# zstd stage (spec 7)
# ---------------------------------------------------------------------------------------------


def test_zstd_stage_registry_and_identity() -> None:
    assert isinstance(ZSTD, ZstdStage)
    assert (ZSTD.stage_id, ZSTD.name) == (S.STAGE_ZSTD, "zstd")


@pytest.mark.parametrize("data", [b"", b"a", b"\x00" * 1000, bytes(range(256)) * 3])
@pytest.mark.parametrize("level", [-7, 1, 3, 22])
def test_zstd_frame_declares_its_size_and_nothing_else(data: bytes, level: int) -> None:
    frame = ZSTD.encode(data, level)
    size, checksum, dict_flag = ref_zstd_frame_header(frame)
    assert (size, checksum, dict_flag) == (len(data), False, 0)  # spec 7.1
    assert ZSTD.decode(frame, len(data), ctx(1)) == data
    # the reference decoder of the library, streaming, agrees
    assert zstandard.ZstdDecompressor().decompressobj().decompress(frame) == data


@given(st.binary(max_size=300), st.sampled_from([1, 3]))
def test_zstd_round_trip(data: bytes, level: int) -> None:
    frame = ZSTD.encode(data, level)
    assert ref_zstd_frame_header(frame)[0] == len(data)
    assert ZSTD.decode(memoryview(frame), len(data), ctx(1)) == data


def _frame(data: bytes, **kw: Any) -> bytes:
    return zstandard.ZstdCompressor(**kw).compress(data)


def test_zstd_errors() -> None:
    hello = _frame(b"hello", write_content_size=True)
    empty = _frame(b"", write_content_size=True)
    cases = [  # frame, declared decoded size, message
        (hello, 4, "frame declares 5 bytes, block declares 4"),
        (hello, 6, "frame declares 5 bytes, block declares 6"),
        (_frame(b"hello", write_content_size=False), 5, "frame declares -1 bytes, block "
         "declares 5"),
        (b"abcdefgh", 5, "bad frame header (error when determining content size)"),
        (b"", 5, "bad frame header (error when determining content size)"),
        (hello + b"x", 5, "compressed input contains 1 bytes of unused data, which is "
         "disallowed"),
        (hello + hello, 5, f"compressed input contains {len(hello)} bytes of unused data, "
         "which is disallowed"),
        (hello[:-1], 5, "decompression error: did not decompress full frame"),
        # python-zstandard answers b"" for a frame declaring 0 bytes without reading on
        (empty + b"junk", 0, "compressed input contains 4 bytes of unused data, which is "
         "disallowed"),
        (empty + empty, 0, f"compressed input contains {len(empty)} bytes of unused data, "
         "which is disallowed"),
        (empty[:-1], 0, "decompression error: did not decompress full frame"),
        (b"\x50\x2a\x4d\x18\x04\x00\x00\x00abcd", 0, "a skippable frame is not a zstd frame"),
    ]
    for frame, size, message in cases:
        raises_exactly(CorruptDataError, f"{WHERE}zstd stage: {message}", ZSTD.decode, frame,
                       size, ctx(1))
    assert ZSTD.decode(empty, 0, ctx(1)) == b""
    with pytest.raises(ValueError, match="frame declares 5 bytes, block declares 4"):
        ZSTD.decode(hello, 4, None)  # no context: a plain error for direct callers


def test_zstd_messages_are_the_specs_whatever_the_library_says(monkeypatch) -> None:
    """R-ZST-4 is found from the frame's block headers: the library's wording plays no part."""
    hello = _frame(b"hello" * 30, write_content_size=True)

    class Stub:  # a decompressor that fails with some other wording
        def decompress(self, *a: Any, **k: Any) -> bytes:
            raise zstandard.ZstdError("a message of another library version")

    stage = ZstdStage()
    monkeypatch.setattr(stage, "_decompressor", Stub)
    for frame, message in [
        (hello + b"xy", "compressed input contains 2 bytes of unused data, which is disallowed"),
        (hello[:-1], "decompression error: did not decompress full frame"),
        (hello, "a message of another library version"),  # R-ZST-5: the library's detail
    ]:
        raises_exactly(CorruptDataError, f"{WHERE}zstd stage: {message}", stage.decode, frame,
                       150, ctx(1))


@pytest.mark.parametrize("kw", [{}, {"write_checksum": True}, {"level": 19},
                                {"write_content_size": False}])
@pytest.mark.parametrize("data", [b"", b"a", b"\x00" * 300_000, bytes(range(256)) * 2000,
                                  np.random.default_rng(0).bytes(200_000)])
def test_frame_end_agrees_with_libzstd(kw: dict, data: bytes) -> None:
    """frame_end walks raw, RLE and compressed blocks, several of them, and the checksum."""
    frame = _frame(data, **kw)
    assert frame_end(frame) == len(frame)
    dobj = zstandard.ZstdDecompressor().decompressobj()
    dobj.decompress(frame + b"tail")
    assert frame_end(frame + b"tail") == len(frame) == len(frame) + 4 - len(dobj.unused_data)
    for cut in (1, 2, 4):
        if len(frame) - cut > 6:
            assert frame_end(frame[:-cut]) > len(frame) - cut


def test_zstd_corrupt_content() -> None:
    data = bytes(range(200)) * 5
    frame = bytearray(ZSTD.encode(data, 3))
    frame[-2] ^= 0xFF
    with pytest.raises(CorruptDataError) as info:
        ZSTD.decode(bytes(frame), len(data), ctx(1))
    assert str(info.value).startswith(WHERE + "zstd stage: ")
