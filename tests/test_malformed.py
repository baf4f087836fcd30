"""Malformed input: every truncation, every single-bit flip, every header byte, lying sizes.

The sweeps are exhaustive on small files written here (every block type, dense records, the
zstd stage, metadata) and on ``spec/vectors/valid/*.compeft`` when that folder has files.
Each case runs through all three readers: ``loads``, ``iter_stream`` (a stream that cannot
seek) and ``open_file`` followed by reading every tensor.
"""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compeft_format import (
    BadMagicError,
    ChecksumError,
    CompeftError,
    CorruptDataError,
    FormatError,
    LimitExceededError,
    ReadLimits,
    TernaryTensor,
    TruncatedError,
    UnsupportedVersionError,
    dumps,
    inspect,
    iter_stream,
    loads,
    open_file,
)
from compeft_format import _spec as S
from compeft_format._io import encode_varint as varint

VALID_VECTORS = sorted((Path(__file__).resolve().parent.parent / "spec" / "vectors" / "valid")
                       .glob("*.compeft"))


class Stream:
    """A non-seekable stream (``seek``/``tell`` raise), as a pipe or a socket."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)

    def seekable(self) -> bool:
        return False

    def seek(self, *args: Any) -> int:
        raise io.UnsupportedOperation("seek")

    def tell(self) -> int:
        raise io.UnsupportedOperation("tell")


def read_loads(data: bytes, limits: ReadLimits = S.DEFAULT_LIMITS) -> Any:
    return loads(data, limits=limits)


def read_stream(data: bytes, limits: ReadLimits = S.DEFAULT_LIMITS) -> Any:
    return list(iter_stream(Stream(data), limits=limits))  # type: ignore[arg-type]


def read_open(data: bytes, limits: ReadLimits = S.DEFAULT_LIMITS) -> Any:
    """Random access, then every tensor read: the whole file has been asked for."""
    with open_file(data, limits=limits) as f:
        return f.metadata(), {name: f.get(name) for name in f}


READERS: dict[str, Callable[..., Any]] = {
    "loads": read_loads, "iter_stream": read_stream, "open_file": read_open,
}


def dumps10(*args: Any, **kwargs: Any) -> bytes:
    """``dumps`` of a 1.0 file: one record per tensor, the layout these sweeps rebuild."""
    return dumps(*args, version="1.0", **kwargs)


def small_files() -> dict[str, bytes]:
    """Small files that together hold every block type, both record kinds, zstd and metadata."""
    alt = np.arange(0, 1200, 2)  # 600 positions: 150 bytes of bitmask, 75 of signs: zstd
    return {
        "empty": dumps10({}),
        "bitmask": dumps10({"b": TernaryTensor((2, 8), [0, 5, 9, 15], [1, 0, 0, 1], 0.5, "F16")},
                         positions="bitmask", zstd_level=None, alignment=1),
        "golomb": dumps10({"g": TernaryTensor((40,), [3, 17, 39], [0, 1, 0], 2.0, "BF16"),
                         "z": TernaryTensor((), [], [], 0.0, "F64")},
                        positions="golomb", zstd_level=None, alignment=2),
        "dense": dumps10({"d.bool": np.array([True, False, True]),
                        "d.bf16": torch.tensor([1.5], dtype=torch.bfloat16),
                        "d.i16": np.array([[-1, 2]], np.int16)}, zstd_level=None, alignment=1),
        "zstd": dumps10({"p": TernaryTensor((1200,), alt, np.zeros(600, bool), 1.0),
                       "q": np.zeros(80, np.uint8)}, positions="bitmask", zstd_level=3,
                      alignment=1),
        "metadata": dumps10({"m": TernaryTensor((3,), [2], [1], 1.0)},
                          metadata={"compeft.producer": "t", "k": [1, "é"]}, alignment=8),
    }


SMALL = small_files()
SWEEP_FILES = [pytest.param(data, id=name) for name, data in SMALL.items()] + [
    pytest.param(path.read_bytes(), id=f"vector-{path.stem}") for path in VALID_VECTORS]


def test_small_files_cover_every_block_type_zstd_and_metadata() -> None:
    seen = set()
    for data in SMALL.values():
        info = inspect(data)
        seen |= {(b.codec, b.stage) for t in info.tensors for b in t.blocks}
        seen |= {("metadata", "none")} if info.metadata else set()
        seen |= {(t.kind, "none") for t in info.tensors}
    codecs = {c for c, _ in seen}
    assert codecs >= {"bitmask", "golomb", "signs", "scale", "dense", "metadata", "ternary"}
    assert {("bitmask", "zstd"), ("signs", "zstd"), ("dense", "zstd")} <= seen
    assert sum(len(d) for d in SMALL.values()) < 1200  # keeps the exhaustive sweeps fast


def test_spec_vectors_are_swept_when_present() -> None:
    if not VALID_VECTORS:
        pytest.skip("spec/vectors/valid has no .compeft files yet")
    for path in VALID_VECTORS:
        loads(path.read_bytes())  # a sweep starts from a file every reader accepts


# ---------------------------------------------------------------------------------------------
# Truncation and bit-flip sweeps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", SWEEP_FILES)
def test_truncation_at_every_offset(data: bytes) -> None:
    for reader in READERS.values():
        reader(data)  # the whole file is valid
    failures = []
    for cut in range(len(data)):
        for name, reader in READERS.items():
            try:
                reader(data[:cut])
            except TruncatedError as exc:
                if exc.offset is None or exc.offset > cut:
                    failures.append(f"cut {cut}, {name}: offset {exc.offset} past the end")
            except Exception as exc:  # any other outcome is a failure
                failures.append(f"cut {cut}, {name}: {type(exc).__name__}: {exc}")
            else:
                failures.append(f"cut {cut}, {name}: returned data")
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("data", SWEEP_FILES)
def test_every_single_bit_flip_is_detected(data: bytes) -> None:
    """No flip of one bit anywhere is returned as data, by any reader (spec 11: every byte is
    covered by a CRC-32, is zero padding, or is a checked trailer field)."""
    failures = []
    buf = bytearray(data)
    for bit in range(8 * len(data)):
        buf[bit // 8] ^= 1 << (bit % 8)
        flipped = bytes(buf)
        buf[bit // 8] ^= 1 << (bit % 8)
        for name, reader in READERS.items():
            try:
                reader(flipped)
            except CompeftError:
                pass
            except Exception as exc:  # a crash, not a reported error
                failures.append(f"byte {bit // 8} bit {bit % 8}, {name}: "
                                f"{type(exc).__name__}: {exc}")
            else:
                failures.append(f"byte {bit // 8} bit {bit % 8}, {name}: returned data")
    assert not failures, f"{len(failures)} undetected:\n" + "\n".join(failures[:20])


# ---------------------------------------------------------------------------------------------
# All 256 values of each header byte
# ---------------------------------------------------------------------------------------------

BASE = SMALL["metadata"]  # 16-byte header, 33 bytes of metadata, alignment 8
META_SIZE = struct.unpack("<I", BASE[12:16])[0]


def with_byte(data: bytes, at: int, value: int, *, fix_crc: bool) -> bytes:
    """``data`` with byte ``at`` set; ``fix_crc`` recomputes the Header_Checksum after it."""
    out = bytearray(data)
    out[at] = value
    if fix_crc:
        end = S.FILE_HEADER_SIZE + META_SIZE
        out[end : end + 4] = struct.pack("<I", zlib.crc32(bytes(out[:end])))
    return bytes(out)


def expected_header_error(at: int, value: int, *, fix_crc: bool) -> type[Exception] | None:
    """The error of spec 8.1 steps 1-5 for header byte ``at`` set to ``value`` (None: valid)."""
    if value == BASE[at]:
        return None
    if at < 8:
        return BadMagicError
    if at == 8:
        return UnsupportedVersionError
    if at == 10 and value > S.MAX_ALIGNMENT_LOG2:
        return CorruptDataError
    if at == 11:
        return CorruptDataError
    if 12 <= at < 16:
        size = struct.unpack("<I", with_byte(BASE, at, value, fix_crc=False)[12:16])[0]
        if size > S.DEFAULT_LIMITS.max_metadata_size:
            return LimitExceededError
        if S.FILE_HEADER_SIZE + size + 4 > len(BASE):
            return TruncatedError
        return ChecksumError
    if at == 9 and fix_crc:
        return None  # spec 10.1: a 1.x decoder accepts any Version_Minor
    if at == 10:
        # another alignment moves every later structure: some check downstream fails
        return ChecksumError if not fix_crc else FormatError
    return ChecksumError  # the checksum bytes themselves, or minor without a fixed CRC


# with the checksum recomputed too, for the bytes before Metadata_Size (which, like the
# checksum itself, decides where the checksum is)
HEADER_BYTE_CASES = [pytest.param(at, False, id=f"{at}-raw") for at in range(20)] + [
    pytest.param(at, True, id=f"{at}-crc-fixed") for at in range(12)]


@pytest.mark.parametrize(("at", "fix_crc"), HEADER_BYTE_CASES)
def test_all_256_values_of_each_header_byte(at: int, fix_crc: bool) -> None:
    original = loads(BASE)
    failures = []
    for value in range(256):
        data = with_byte(BASE, at, value, fix_crc=fix_crc)
        want = expected_header_error(at, value, fix_crc=fix_crc)
        for name, reader in READERS.items():
            try:
                got = reader(data)
            except CompeftError as exc:
                ok = want is not None and isinstance(exc, want)
                if want in (BadMagicError, UnsupportedVersionError, CorruptDataError,
                            LimitExceededError, ChecksumError):
                    ok = ok and type(exc) is want
                if not ok:
                    failures.append(f"0x{value:02x} {name}: {type(exc).__name__}: {exc}")
            else:
                if want is not None:
                    failures.append(f"0x{value:02x} {name}: returned data, want {want.__name__}")
                elif name == "loads":
                    assert got.keys() == original.keys()
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize(("at", "value", "cls", "message"), [
    (0, 0x88, BadMagicError, "byte 0: not a compeft file (magic b'\\x88CPFT\\r\\n\\x1a', "
     "expected b'\\x89CPFT\\r\\n\\x1a')"),
    (8, 2, UnsupportedVersionError, "byte 8: format version 2.0 is not supported; this "
     "reader reads 1.x"),
    (10, 13, CorruptDataError, "byte 10: Alignment_Log2 13 outside [0, 12]"),
    (11, 0x80, CorruptDataError, "byte 11: reserved header flags must be zero (got 0x80)"),
    (15, 0x01, LimitExceededError, f"byte 12: metadata is {2**24 + META_SIZE} bytes; limit "
     f"{2**24}"),
])
def test_header_error_messages(at: int, value: int, cls: type, message: str) -> None:
    data = with_byte(BASE, at, value, fix_crc=False)
    for reader in READERS.values():
        with pytest.raises(cls) as info:
            reader(data)
        assert str(info.value) == message


def test_minor_version_is_accepted() -> None:
    data = with_byte(BASE, 9, 255, fix_crc=True)
    with open_file(data) as f:
        assert f.version == (1, 255)
    assert loads(data).keys() == loads(BASE).keys()


# ---------------------------------------------------------------------------------------------
# Hand-built files with lying sizes (valid checksums, so the size checks are what fires)
# ---------------------------------------------------------------------------------------------


def crc(data: bytes) -> bytes:
    return struct.pack("<I", zlib.crc32(data))


def build_header(meta: bytes = b"", *, meta_size: int | None = None) -> bytes:
    """File_Header, Metadata and Header_Checksum, alignment 1 (no padding anywhere)."""
    head = S.FILE_HEADER.pack(S.MAGIC, 1, 0, 0, 0, len(meta) if meta_size is None else meta_size)
    return head + meta + crc(head + meta)


def build_record(name: bytes, *, kind: int = S.KIND_DENSE, dtype: str = "I8",
                 shape: tuple[int, ...] = (4,), nnz: int | None = None,
                 blocks: list[tuple[int, int, int, bytes, int | None, int | None]],
                 data_size: int | None = None) -> bytes:
    """A record, alignment 1. ``blocks``: (type, stage, param, stored bytes, Stored_Size
    override, Decoded_Size); the data area holds the stored bytes whatever the sizes say."""
    body = varint(len(name)) + name + bytes([S.DTYPE_CODES[dtype], len(shape)])
    body += b"".join(varint(d) for d in shape)
    if kind == S.KIND_TERNARY:
        body += varint(nnz or 0)
    body += bytes([len(blocks)])
    data = b""
    for btype, stage, param, stored, stored_size, decoded in blocks:
        body += bytes([btype, stage]) + varint(param)
        body += varint(len(stored) if stored_size is None else stored_size)
        if stage:
            body += varint(len(stored) if decoded is None else decoded)
        data += stored
    size = len(data) if data_size is None else data_size
    head = bytes([kind]) + varint(len(body) + 8) + varint(size) + body + crc(data)
    return head + crc(head) + data


def build_file(records: list[tuple[bytes, bytes]], *, header: bytes | None = None,
               count: int | None = None) -> bytes:
    """Header, records, an index listing them (``count`` overrides Tensor_Count), trailer."""
    out = build_header() if header is None else header
    entries = b""
    for name, record in records:
        entries += varint(len(name)) + name + varint(len(out))
        out += record
    index = b"\x00" + varint(len(records) if count is None else count) + entries
    return out + index + struct.pack("<Q", len(out)) + crc(index) + S.TAIL_MAGIC


def raw_record(body: bytes, kind: int = S.KIND_DENSE) -> bytes:
    """A record header around ``body`` as given, with an empty data area and valid CRCs."""
    head = bytes([kind]) + varint(len(body) + 8) + varint(0) + body + crc(b"")
    return head + crc(head)


def dense_i8(name: bytes = b"x", **kw: Any) -> bytes:
    kw.setdefault("blocks", [(S.BLOCK_DENSE, 0, 0, b"\x01\x02\x03\x04", None, None)])
    return build_record(name, **kw)


def ternary(name: bytes = b"t", *, shape: tuple[int, ...], nnz: int, positions: bytes,
            ptype: int = S.BLOCK_GOLOMB, param: int = 1, signs: bytes = b"\x00",
            **kw: Any) -> bytes:
    blocks = [(ptype, 0, param, positions, None, None), (S.BLOCK_SIGNS, 0, 0, signs, None, None),
              (S.BLOCK_SCALE, 0, 0, struct.pack("<f", 1.0), None, None)]
    return build_record(name, kind=S.KIND_TERNARY, dtype="F32", shape=shape, nnz=nnz,
                        blocks=blocks, **kw)


HUGE = 2**62
H = len(build_header())  # 20: the first record's offset in these files
BIG = 2**48  # max_numel


def test_builder_makes_valid_files() -> None:
    data = build_file([(b"t", ternary(shape=(8,), nnz=1, positions=b"\x08")),
                       (b"x", dense_i8())])
    assert loads(data)["t"] == TernaryTensor((8,), [3], [False], 1.0)
    assert loads(data)["x"].tolist() == [1, 2, 3, 4]
    assert read_open(data)[1]["x"].tolist() == [1, 2, 3, 4]


def _rec_end_msg(size: int, stored: int) -> str:
    return f"tensor 'x': byte {H}: record ends at {H + size}, the next starts at {stored}"


# name, file, reader -> (class, message); "*" is every reader without an entry of its own
LYING: list[tuple[str, bytes, dict[str, tuple[type, str]]]] = []


def _lie(case: str, data: bytes, **expected: tuple[type, str]) -> None:
    LYING.append((case, data, expected))


# Metadata_Size above the limit; at the limit with no bytes behind it
_lie("metadata-size-huge", build_file([], header=build_header(meta_size=2**32 - 1)),
     all=(LimitExceededError, f"byte 12: metadata is {2**32 - 1} bytes; limit {2**24}"))
_lie("metadata-size-at-limit", build_file([], header=build_header(meta_size=2**24)),
     all=(TruncatedError, "byte 16: metadata: need 16777216 bytes, 22 available"))
# Data_Size and Stored_Size that agree with each other but not with the file
_data = build_file([(b"x", dense_i8(blocks=[(S.BLOCK_DENSE, 0, 0, b"\x01\x02\x03\x04", HUGE,
                                             None)], data_size=HUGE))])
_lie("data-and-stored-size-huge", _data,
     all=(TruncatedError, f"tensor 'x': byte 57: record data: need {HUGE} bytes, 25 available"),
     open_file=(CorruptDataError, f"tensor 'x': byte {H}: record ends at {57 + HUGE}, the next "
                "starts at 61"))
# Data_Size alone, Stored_Size alone
_lie("data-size-lies", build_file([(b"x", dense_i8(data_size=HUGE))]),
     all=(CorruptDataError, f"tensor 'x': byte 22: data size {HUGE} does not match the blocks' "
          "layout (4)"))
_lie("stored-size-lies", build_file([(b"x", dense_i8(
    blocks=[(S.BLOCK_DENSE, 0, 0, b"\x01\x02\x03\x04", HUGE, None)]))]),
     all=(CorruptDataError, f"tensor 'x': byte 22: data size 4 does not match the blocks' "
          f"layout ({HUGE})"))
# dims: a product above max_numel (no wrap-around), dims at the limit with a tiny block
_lie("dims-huge", build_file([(b"x", dense_i8(shape=(2**62, 2**62, 2**62)))]),
     all=(LimitExceededError, f"tensor 'x': byte 27: shape [{2**62}, {2**62}, {2**62}] has "
          f"{2**186} elements; limit {BIG}"))
_lie("dense-dims-at-limit", build_file([(b"x", dense_i8(shape=(BIG,)))]),
     all=(CorruptDataError, f"tensor 'x': byte 47: dense block: 4 bytes, I8[{BIG}] needs {BIG}"))
_lie("bitmask-numel-at-limit", build_file([(b"t", ternary(shape=(BIG,), nnz=1, positions=b"\x01",
                                                          ptype=S.BLOCK_BITMASK, param=0))]),
     all=(CorruptDataError, f"tensor 't': byte 56: bitmask block: 1 bytes, {BIG} bits need "
          f"exactly {BIG // 8}"))
# nnz above numel; nnz at numel for a huge tensor (the decode budget stops it)
_lie("nnz-above-numel", build_file([(b"t", ternary(shape=(8,), nnz=9, positions=b"\x08"))]),
     all=(CorruptDataError, "tensor 't': byte 28: nnz 9 exceeds numel 8"))
_lie("nnz-huge", build_file([(b"t", ternary(shape=(BIG,), nnz=BIG, positions=b"\xff"))]),
     all=(LimitExceededError, f"tensor 't': byte 62: decoding needs {8 + 9 * BIG} bytes, above "
          f"the limit of {2**26} (raise ReadLimits.max_decoded_bytes)"))
# zstd Decoded_Size above the block type's bound, and within it but above the budget
_frame = b"\x28\xb5\x2f\xfd\x20\x04\x21\x00\x00\x01\x02\x03\x04"
_lie("zstd-decoded-size-above-bound", build_file([(b"x", dense_i8(
    blocks=[(S.BLOCK_DENSE, S.STAGE_ZSTD, 0, _frame, None, HUGE)]))]),
     all=(CorruptDataError, f"tensor 'x': byte 50: zstd stage: decoded size {HUGE} exceeds "
          "the dense block bound 4"))
_lie("zstd-decoded-size-above-budget", build_file([(b"x", dense_i8(
    shape=(2**40,), blocks=[(S.BLOCK_DENSE, S.STAGE_ZSTD, 0, _frame, None, 2**40)]))]),
     all=(LimitExceededError, f"tensor 'x': byte 52: decoding needs {2**40} bytes, above the "
          f"limit of {2**26} (raise ReadLimits.max_decoded_bytes)"))
# counts and lengths in the index and the record header
_lie("tensor-count-huge", build_file([], count=HUGE),
     all=(LimitExceededError, f"byte 21: {HUGE} tensors; limit 1000000"))
_lie("name-length-huge", build_file([(b"x", raw_record(varint(HUGE) + b"x"))]),
     all=(LimitExceededError, f"byte 23: tensor name length {HUGE} outside [1, 4096]"))
_lie("header-length-huge", build_file([(b"x", b"\x02" + varint(HUGE) + b"\x04")]),
     all=(LimitExceededError, f"byte 21: record header length {HUGE} outside [8, 65536]"))


@pytest.mark.parametrize(("data", "expected"),
                         [pytest.param(d, e, id=c) for c, d, e in LYING])
def test_lying_sizes_raise_without_allocating(data: bytes,
                                              expected: dict[str, tuple[type, str]]) -> None:
    for name, reader in READERS.items():
        cls, message = expected.get(name, expected["all"])
        tracemalloc.start()
        try:
            with pytest.raises(cls) as info:
                reader(data)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert type(info.value) is cls, name
        assert str(info.value) == message, name
        assert peak < 4 * 2**20, f"{name} allocated {peak} bytes"


def test_lying_metadata_size_within_raised_limits_reads_only_what_is_there() -> None:
    """With the limit raised past 4 GiB, a stream is still read in pieces, not all at once."""
    data = build_file([], header=build_header(meta_size=2**32 - 1))
    limits = ReadLimits(max_metadata_size=2**32)
    for reader in READERS.values():
        tracemalloc.start()
        try:
            with pytest.raises(TruncatedError, match=r"^byte 16: metadata: need 4294967295 "):
                reader(data, limits)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 4 * 2**20


def test_errors_name_the_tensor_and_offset_of_the_broken_block() -> None:
    """A corrupt block deep in a file: every reader names its tensor and its absolute offset."""
    data = dumps10({"a": T_A, "b.c": T_B}, zstd_level=None, alignment=16)
    info = {t.name: t for t in inspect(data).tensors}
    signs = info["b.c"].blocks[1]
    bad = bytearray(data)
    bad[signs.offset] |= 0x80  # a padding bit of the 3-bit signs block: the CRC catches it
    for reader in READERS.values():
        with pytest.raises(ChecksumError) as exc:
            reader(bytes(bad))
        assert exc.value.tensor == "b.c"
        assert exc.value.offset == info["b.c"].blocks[0].offset  # the data area's first byte
        assert str(exc.value).startswith(f"tensor 'b.c': byte {exc.value.offset}: data "
                                         "checksum mismatch: stored 0x")


T_A = TernaryTensor((5,), [1], [True], 1.0)
T_B = TernaryTensor((64,), [3, 9, 60], [True, False, True], 0.25)


def test_errors_are_value_errors_and_pickle() -> None:
    import pickle

    with pytest.raises(ValueError, match="not a compeft file") as info:
        loads(b"GIF89a" + bytes(30))
    exc = pickle.loads(pickle.dumps(info.value))
    assert (type(exc), exc.offset, exc.tensor, str(exc)) == (
        BadMagicError, 0, None, str(info.value))


# ---------------------------------------------------------------------------------------------
# Mutations behind valid checksums: deep checks, and the readers agree
# ---------------------------------------------------------------------------------------------


def _varint_at(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        value |= (data[pos] & 0x7F) << shift
        shift += 7
        pos += 1
        if not data[pos - 1] & 0x80:
            return value, pos


def checksum_spans(data: bytes) -> list[tuple[int, int, int]]:
    """``(store_at, start, end)`` of every CRC of a valid file, in the order to recompute them
    (a data checksum lies inside the record header its header checksum covers)."""
    meta_end = S.FILE_HEADER_SIZE + struct.unpack("<I", data[12:16])[0]
    spans = [(meta_end, 0, meta_end)]
    for t in inspect(data).tensors:
        header_len, pos = _varint_at(data, t.offset + 1)
        header_end = _varint_at(data, pos)[1] + header_len
        spans.append((header_end - 8, t.blocks[0].offset, t.offset + t.record_size))
        spans.append((header_end - 4, t.offset, header_end - 4))
    spans.append((len(data) - 8, struct.unpack("<Q", data[-16:-8])[0], len(data) - 16))
    return spans


def with_checksums(data: bytearray, spans: list[tuple[int, int, int]]) -> bytes:
    for store_at, start, end in spans:
        data[store_at : store_at + 4] = crc(bytes(data[start:end]))
    return bytes(data)


def outcome(reader: Callable[..., Any], data: bytes) -> Any:
    """The reader's result, or the CompeftError it raised (any other exception escapes)."""
    try:
        return reader(data)
    except CompeftError as exc:
        return exc


MUTATION_BASES = [SMALL[k] for k in ("bitmask", "golomb", "dense", "zstd", "metadata")]


@given(st.sampled_from(range(len(MUTATION_BASES))), st.data())
@settings(max_examples=max(50, settings.default.max_examples * 8))
def test_mutations_behind_valid_checksums(which: int, data: st.DataObject) -> None:
    """Bytes changed, then every CRC recomputed: whatever the readers do, they raise only
    CompeftError, and when ``loads`` accepts, the two other readers return the same."""
    base = MUTATION_BASES[which]
    buf = bytearray(base)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(buf) - 1))
        buf[at] = data.draw(st.integers(0, 255) | st.sampled_from([0, 1, 0x7F, 0x80, 0xFF,
                                                                   buf[at] ^ 1]))
    mutated = with_checksums(buf, checksum_spans(base))
    got = {name: outcome(reader, mutated) for name, reader in READERS.items()}
    if isinstance(got["loads"], CompeftError):
        return
    streamed = dict(got["iter_stream"]) if isinstance(got["iter_stream"], list) else None
    assert streamed is not None, got["iter_stream"]
    assert not isinstance(got["open_file"], CompeftError), got["open_file"]
    for name, value in got["loads"].items():
        for other in (streamed[name], got["open_file"][1][name]):
            if isinstance(value, TernaryTensor):
                assert other == value
            else:
                assert other.tobytes() == value.tobytes()
    assert list(streamed) == list(got["loads"]) == list(got["open_file"][1])


def test_checksum_spans_rebuild_the_files() -> None:
    for base in MUTATION_BASES:
        assert with_checksums(bytearray(base), checksum_spans(base)) == base
