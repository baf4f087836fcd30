"""The container (spec 4, 5, 8): layout byte by byte, writer rules, the three readers, the API.

Byte-level expectations are spelled out from the layout of docs/DESIGN.md, with CRC-32
computed by ``zlib.crc32`` here, so a change of layout shows as a diff of bytes.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from strategies import ALIGNMENTS

from compeft_format import (
    CompeftError,
    EncodeError,
    TernaryTensor,
    Writer,
    dumps,
    inspect,
    iter_stream,
    load_file,
    loads,
    open_file,
    save_file,
)
from compeft_format import _spec as S
from compeft_format.codecs import ZSTD, BlockContext, get_codec
from compeft_format.dtypes import bf16_bits_to_f32, f32_to_bf16_bits
from compeft_format.metadata import METADATA_ZSTD

MAGIC = b"\x89CPFT\r\n\x1a"


def crc(data: bytes) -> bytes:
    """The 4 little-endian bytes of a CRC-32 (ISO-HDLC, as zlib)."""
    return struct.pack("<I", zlib.crc32(data))


def varint_at(data: bytes, pos: int) -> tuple[int, int]:
    """Return ``(value, next position)`` of the LEB128 VarInt at ``pos``."""
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        shift += 7
        if not byte & 0x80:
            return value, pos


def mixed_tensors() -> dict[str, Any]:
    """Every record and block type: golomb, bitmask, zstd-worthy blocks, dense, 0-d, empty."""
    rng = np.random.default_rng(7)
    sparse = np.flatnonzero(rng.random(5000) < 0.01)
    half = np.flatnonzero(rng.random(3000) < 0.5)
    return {
        "golomb": TernaryTensor((50, 100), sparse, rng.random(sparse.size) < 0.5, 0.25),
        "bitmask": TernaryTensor((3000,), half, np.zeros(half.size, bool), 1.5, "BF16"),
        "empty": TernaryTensor((0, 4), [], [], 0.0, "F16"),
        "scalar": TernaryTensor((), [0], [True], 2.0, "F64"),
        "dense.f32": np.arange(12, dtype=np.float32).reshape(3, 4),
        "dense.zeros": np.zeros(4096, np.int8),  # compresses: a zstd-staged dense block
        "dense.bf16": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "dense.bool": np.array([True, False]),
        "dense.0d": np.array(7, dtype=np.uint16),
    }


def assert_same(a: Any, b: Any) -> None:
    """Equal values: TernaryTensor by ==, arrays by dtype, shape and bytes."""
    if isinstance(a, TernaryTensor):
        assert a == b
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype
        assert a.shape == b.shape
        assert torch.equal(a, b)
    else:
        assert a.dtype == b.dtype
        assert a.shape == b.shape
        assert a.tobytes() == b.tobytes()


# ---------------------------------------------------------------------------------------------
# Layout byte by byte
# ---------------------------------------------------------------------------------------------


def test_dumps_of_an_empty_mapping() -> None:
    header = MAGIC + bytes([1, 0, 3, 0]) + b"\x00\x00\x00\x00"  # v1.0, 8-byte alignment, no meta
    index = b"\x00\x00"  # Record_Kind 0x00 (the index), Tensor_Count 0
    expected = (header + crc(header) + b"\x00" * 4  # pad 20 -> 24
                + index + struct.pack("<Q", 24) + crc(index) + b"CPFE")
    assert dumps({}, version="1.0") == expected
    for version, minor in (("1.1", 1), ("1.2", 2), ("1.3", 3), ("1.4", 4), ("1.5", 5),
                           ("1.6", 6)):  # minor
        head = expected[:9] + bytes([minor]) + expected[10:16]  # the CRC) differ
        assert dumps({}, version=version) == head + crc(head) + expected[20:]
    # 1.7: Flags 0x08 and the short trailer, Index_Size 2 in the place of Index_Offset 24
    head = expected[:9] + bytes([7, 3, 0x08]) + expected[12:16]
    assert dumps({}, version="1.7") == (head + crc(head) + expected[20:26] + struct.pack("<I", 2)
                                        + crc(index) + b"CPFE")
    assert dumps({}) == dumps({}, version="1.7")
    assert len(expected) == 42
    assert loads(expected) == {}
    assert list(iter_stream(io.BytesIO(expected))) == []
    with open_file(expected) as f:
        assert (f.keys(), len(f), f.metadata()) == ([], 0, {})
    info = inspect(expected)
    assert (info.version, info.alignment, info.file_size, info.tensors) == ((1, 0), 8, 42, ())


def test_header_fields_byte_by_byte() -> None:
    buf = io.BytesIO()
    with Writer(buf, version="1.0") as w:  # the 1.0 record layout (1.1 packs: test_pack.py)
        w.write("a", TernaryTensor((4,), [1], [True], 0.5))
    data = buf.getvalue()

    header = MAGIC + bytes([1, 0, 3, 0]) + b"\x00\x00\x00\x00"
    assert data[:16] == header
    assert data[8] == S.VERSION_MAJOR
    assert data[9] == 0
    assert data[16:20] == crc(header)
    assert data[20:24] == b"\x00" * 4
    body = (b"\x01a"  # Name_Length, Name
            + b"\x01\x01\x04"  # Dtype F32, Ndim 1, Dims [4]
            + b"\x01"  # Nnz
            + b"\x03"  # Block_Count
            + b"\x01\x00\x00\x01"  # bitmask, no stage, Param 0, Stored_Size 1
            + b"\x03\x00\x00\x01"  # signs
            + b"\x04\x00\x00\x04")  # scale
    blocks = (b"\x02" + b"\x00" * 7  # bit 1 set: position 1
              + b"\x01" + b"\x00" * 7  # negative
              + struct.pack("<f", 0.5) + b"\x00" * 4)
    head = b"\x01" + bytes([len(body) + 8, len(blocks)]) + body + crc(blocks)
    record = head + crc(head) + b"\x00\x00" + blocks  # header ends at 54: pad to 56
    assert data[24 : 24 + len(record)] == record
    index_at = 24 + len(record)
    index = b"\x00\x01\x01a\x18"  # kind 0, one entry: 'a' at 24
    assert data[index_at:-16] == index
    assert data[-16:] == struct.pack("<Q", index_at) + crc(index) + b"CPFE"
    assert len(data) == 101


@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_alignment_log2_field_and_header_padding(alignment: int) -> None:
    meta = {"k": "v"}  # 11 bytes: the header ends at 31, unaligned for every alignment > 1
    data = dumps({}, metadata=meta, alignment=alignment)
    text = b'{"k":"v"}'
    assert data[10] == int(math.log2(alignment))
    assert struct.unpack("<I", data[12:16])[0] == len(text)
    assert data[16 : 16 + len(text)] == text
    end = 16 + len(text) + 4
    assert data[end - 4 : end] == crc(data[:16] + text)
    first = -(-end // alignment) * alignment
    assert data[end:first] == b"\x00" * (first - end)
    assert data[first] == S.KIND_END
    # spec 5.7 (1.7, Flags bit 3): the index, from `first` to the 12-byte trailer, by its size
    assert data[11] & S.FLAG_SHORT_TRAILER
    assert struct.unpack("<I", data[-12:-8])[0] == len(data) - 12 - first
    assert open_file(data).alignment == alignment


@pytest.mark.parametrize("alignment", [1, 2, 8, 64, 4096])
@pytest.mark.parametrize("zstd_level", [None, 3])
def test_alignment_is_honoured(alignment: int, zstd_level: int | None) -> None:
    data = dumps(mixed_tensors(), alignment=alignment, zstd_level=zstd_level,
                 metadata={"m": 1}, version="1.0")  # one record per tensor
    info = inspect(data)
    index_at = struct.unpack("<Q", data[-16:-8])[0]
    ends = [t.offset for t in info.tensors[1:]] + [index_at]
    assert info.tensors[0].offset % alignment == 0
    for t, next_offset in zip(info.tensors, ends, strict=True):
        assert t.offset % alignment == 0
        assert t.offset + t.record_size == next_offset  # records tile the file
        # the record header, then zero padding up to the first (aligned) block
        header_len, pos = varint_at(data, t.offset + 1)
        _, pos = varint_at(data, pos)
        header_end = pos + header_len
        assert data[header_end : t.blocks[0].offset] == bytes(t.blocks[0].offset - header_end)
        for b in t.blocks:
            assert b.offset % alignment == 0
            end = b.offset + b.stored_size
            pad = -end % alignment
            assert data[end : end + pad] == bytes(pad)
        last = t.blocks[-1]
        assert last.offset + last.stored_size + (-last.stored_size % alignment) == next_offset
    if zstd_level is not None:
        assert any(b.stage == "zstd" for t in info.tensors for b in t.blocks)


def test_determinism_and_dict_order() -> None:
    tensors = mixed_tensors()
    shuffled = dict(reversed(list(tensors.items())))
    meta = {"b": [1, {"y": 2, "x": 1}], "a": "z"}
    meta_shuffled = {"a": "z", "b": [1, {"x": 1, "y": 2}]}
    data = dumps(tensors, metadata=meta)
    assert dumps(tensors, metadata=meta) == data
    assert dumps(shuffled, metadata=meta_shuffled) == data
    assert [t.name for t in inspect(data).tensors] == sorted(tensors, key=str.encode)


def test_names_sort_by_utf8_bytes_not_code_points() -> None:
    # U+FFFD (EF BF BD) sorts before U+10000 (F0 90 80 80) in UTF-8 and in code points, but
    # U+E000 (EE 80 80) vs U+10000 (F0...): the same; a surrogate-free case where UTF-16
    # order would differ: U+FF61 vs U+10000 (UTF-16: D800 < FF61)
    names = ["\U00010000", "\uff61", "a", "B", "é"]
    data = dumps({n: np.zeros(1, np.int8) for n in names})
    assert [t.name for t in inspect(data).tensors] == sorted(names, key=str.encode)
    assert list(loads(data)) == sorted(names, key=str.encode)


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------


def test_metadata_round_trip_and_canonical_form() -> None:
    meta = {"z": [1, 2.5, None, True], "compeft.producer": "tests", "a": {"é": "ü", "b": {}}}
    data = dumps({"t": TernaryTensor((2,), [0], [False], 1.0)}, metadata=meta, version="1.1")
    text = '{"a":{"b":{},"é":"ü"},"compeft.producer":"tests","z":[1,2.5,null,true]}'
    raw = text.encode("utf-8")  # sorted keys, compact separators, UTF-8 (not \\u escapes)
    assert struct.unpack("<I", data[12:16])[0] == len(raw)
    assert data[16 : 16 + len(raw)] == raw
    assert data[16 + len(raw) : 20 + len(raw)] == crc(data[:16] + raw)
    # 1.2 (spec 5.2): the same canonical text, as Metadata_Decoded_Size and a zstd frame
    data12 = dumps({"t": TernaryTensor((2,), [0], [False], 1.0)}, metadata=meta, version="1.2")
    size = struct.unpack("<I", data12[12:16])[0]
    assert (data12[11], data12[16]) == (S.FLAG_METADATA_ZSTD, len(raw))  # a one-byte VarInt
    assert METADATA_ZSTD.decode(data12[17 : 16 + size], len(raw), None) == raw
    # 1.6 (spec 7.1): the same frame, bare (Flags bit 1)
    data16 = dumps({"t": TernaryTensor((2,), [0], [False], 1.0)}, metadata=meta, version="1.6")
    assert data16[11] == S.FLAG_METADATA_ZSTD | S.FLAG_METADATA_BARE
    assert data16[16 : 12 + size] == data12[16:17] + data12[21 : 16 + size]
    assert size < len(raw)
    # 1.7 (spec 5.2): the bare frame alone, its header giving the size (Flags bit 2)
    data17 = dumps({"t": TernaryTensor((2,), [0], [False], 1.0)}, metadata=meta)
    assert data17[11] & 0x07 == (S.FLAG_METADATA_ZSTD | S.FLAG_METADATA_BARE
                                 | S.FLAG_METADATA_UNSIZED)
    assert data17[16 : 11 + size] == data12[21 : 16 + size]
    for d in (data, data12, data16, data17):
        with open_file(d) as f:
            assert f.metadata() == meta
        assert inspect(d).metadata == meta
    assert dumps({}, metadata={}) == dumps({}, metadata=None) == dumps({})


@pytest.mark.parametrize(("meta", "message"), [
    ({1: "x"}, "metadata must be a mapping with string keys"),
    ({"compeft.producer": 1}, "metadata key 'compeft.producer' must be a string"),
    ({"compeft.compression": []}, "metadata key 'compeft.compression' must be an object"),
    ({"compeft.base": "x"}, "metadata key 'compeft.base' must be an object"),
    ({"compeft.base": {"name": 1}}, "metadata key 'compeft.base.name' must be a string"),
    ({"compeft.base": {"hashes": {"a": 1}}},
     "metadata key 'compeft.base.hashes' must be an object of strings"),
])
def test_metadata_errors(meta: dict, message: str) -> None:
    with pytest.raises(EncodeError) as info:
        dumps({}, metadata=meta)
    assert str(info.value) == message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), {1, 2}, b"x", np.int64(1)])
def test_metadata_must_be_json(value: Any) -> None:
    # the rest of the message is the json module's, which varies with the Python version
    with pytest.raises(EncodeError, match=r"^metadata is not JSON-serialisable: "):
        dumps({}, metadata={"x": value})


def test_metadata_depth_limit() -> None:
    deep: Any = "leaf"
    for _ in range(S.DEFAULT_LIMITS.max_metadata_depth - 1):
        deep = [deep]
    assert open_file(dumps({}, metadata={"d": deep})).metadata() == {"d": deep}
    with pytest.raises(EncodeError, match="metadata nests deeper than 64"):
        dumps({}, metadata={"d": [deep]})


# ---------------------------------------------------------------------------------------------
# Writer errors
# ---------------------------------------------------------------------------------------------

T1 = TernaryTensor((3,), [1], [False], 1.0)


def _write(*names: str) -> None:
    with Writer(io.BytesIO()) as w:
        for name in names:
            w.write(name, T1)


@pytest.mark.parametrize(("names", "message"), [
    (("b", "a"), "tensor 'a': names must be unique and written in increasing order; 'a' "
     "follows 'b'"),
    (("a", "a"), "tensor 'a': names must be unique and written in increasing order; 'a' "
     "follows 'a'"),
    (("\u00e9", "z"), "tensor 'z': names must be unique and written in increasing order; 'z' "
     "follows 'é'"),
    (("a\x00b",), "tensor 'a\\x00b': names must be 1..4096 UTF-8 bytes without NUL"),
    (("",), "tensor '': names must be 1..4096 UTF-8 bytes without NUL"),
    (("é" * 2049,), f"tensor {'é' * 2049!r}: names must be 1..4096 UTF-8 bytes without NUL"),
    (("\ud800",), "tensor '\\ud800': name is not valid UTF-8"),
])
def test_writer_name_errors(names: tuple[str, ...], message: str) -> None:
    with pytest.raises(EncodeError) as info:
        _write(*names)
    assert str(info.value) == message


def test_writer_name_limits_and_types() -> None:
    _write("é" * 2048)  # 4096 bytes: the limit itself is fine
    with pytest.raises(TypeError, match="tensor names are str, got bytes"):
        _write(b"a")  # type: ignore[arg-type]  # API misuse: not a CompeftError
    with pytest.raises(TypeError, match="tensor names are str, got int"):
        dumps({1: T1})  # type: ignore[dict-item]
    with pytest.raises(EncodeError, match="a tensor name is not valid UTF-8"):
        dumps({"\udcff": T1})


@pytest.mark.parametrize(("options", "message"), [
    ({"positions": "rle"}, "positions must be one of ('auto', 'bitmask', 'golomb'), got 'rle'"),
    ({"zstd_level": 23}, "zstd level must be an integer in [-7, 22], got 23"),
    ({"zstd_level": -8}, "zstd level must be an integer in [-7, 22], got -8"),
    ({"zstd_level": "3"}, "zstd level must be an integer in [-7, 22], got '3'"),
    ({"zstd_level": 2.0}, "zstd level must be an integer in [-7, 22], got 2.0"),
    ({"alignment": 0}, "alignment must be a power of two in [1, 4096], got 0"),
    ({"alignment": 3}, "alignment must be a power of two in [1, 4096], got 3"),
    ({"alignment": 8192}, "alignment must be a power of two in [1, 4096], got 8192"),
    ({"alignment": -8}, "alignment must be a power of two in [1, 4096], got -8"),
    ({"alignment": 8.0}, "alignment must be a power of two in [1, 4096], got 8.0"),
])
def test_writer_option_errors(options: dict, message: str) -> None:
    for make in (lambda: Writer(io.BytesIO(), **options), lambda: dumps({}, **options)):
        with pytest.raises(EncodeError) as info:
            make()
        assert str(info.value) == message


def test_writer_value_errors() -> None:
    with pytest.raises(EncodeError) as info:
        dumps({"c": np.array([1 + 2j])})
    assert str(info.value) == "tensor 'c': numpy dtype complex128 has no safetensors equivalent"
    with pytest.raises(EncodeError, match=r"^tensor 'o': numpy dtype object"):
        dumps({"o": np.array([None])})
    with pytest.raises(EncodeError, match=r"^tensor 'q': torch dtype torch\.complex64 has no"):
        dumps({"q": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(EncodeError, match=r"^tensor 'd': 17 dimensions; limit 16$"):
        dumps({"d": np.zeros((1,) * 17, np.int8)})
    with pytest.raises(EncodeError, match=r"^tensor 't': 17 dimensions; limit 16$"):
        dumps({"t": TernaryTensor((1,) * 17, [], [], 0.0)})
    dumps({"d": np.zeros((1,) * 16, np.int8)})


def test_a_rejected_write_charges_nothing_to_the_decode_budget() -> None:
    """A tensor the writer rejects leaves it as it was: the next record is written as if the
    rejected one had never been offered (its zstd stage kept within the budget, spec 9.3)."""
    rejected = np.zeros((2,) * 16 + (512,), np.int8)  # 32 MiB of zeros, 17 dimensions
    after = np.zeros(40 << 20, np.int8)  # zstd: 40 MiB charged, within 64 MiB if alone
    alone = io.BytesIO()
    with Writer(alone) as w:
        w.write("b", after)
    offered = io.BytesIO()
    with Writer(offered) as w:
        with pytest.raises(EncodeError, match="17 dimensions"):
            w.write("a", rejected)
        w.write("b", after)
    assert inspect(alone.getvalue()).tensors[0].codecs == "dense+zstd"
    assert offered.getvalue() == alone.getvalue()


@pytest.mark.parametrize("dtype", ["I8", "U8", "BOOL", "F8_E4M3", "int32", np.int16, "x"])
def test_a_ternary_tensor_stands_for_a_float_dtype_only(dtype: Any) -> None:
    with pytest.raises(EncodeError) as info:
        TernaryTensor((2,), [0], [False], 1.0, dtype)
    assert str(info.value) == (f"dtype {dtype!r} is not a ternary dtype; use one of "
                               "('F32', 'F16', 'BF16', 'F64')")


def test_writer_after_close() -> None:
    buf = io.BytesIO()
    w = Writer(buf)
    w.close()
    w.close()  # idempotent
    with pytest.raises(ValueError, match="writer is closed"):
        w.write("a", T1)
    assert buf.getvalue() == dumps({})


def test_writer_needs_no_seek() -> None:
    class Sink:
        def __init__(self) -> None:
            self.parts: list[bytes] = []

        def write(self, b: bytes) -> int:
            self.parts.append(bytes(b))
            return len(b)

    sink = Sink()
    with Writer(sink) as w:  # type: ignore[arg-type]
        for name, value in sorted(mixed_tensors().items(), key=lambda kv: kv[0].encode()):
            w.write(name, value)
    assert b"".join(sink.parts) == dumps(mixed_tensors())


def test_save_file_and_load_file(tmp_path: Path) -> None:
    tensors = mixed_tensors()
    path = tmp_path / "x.compeft"
    save_file(tensors, path, metadata={"k": 1})
    data = path.read_bytes()
    assert data == dumps(tensors, metadata={"k": 1})
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    loaded = load_file(path)
    for name, value in loads(data).items():
        assert_same(loaded[name], value)
    with open_file(path) as f:
        assert f.metadata() == {"k": 1}
        for name in tensors:
            assert_same(f.get(name), loaded[name])


# ---------------------------------------------------------------------------------------------
# Streaming reads
# ---------------------------------------------------------------------------------------------


class NoSeek:
    """A readable stream whose ``seek`` and ``tell`` raise, like a socket or a pipe."""

    def __init__(self, data: bytes, chunk: int | None = None) -> None:
        self._f = io.BytesIO(data)
        self._chunk = chunk

    def read(self, n: int = -1) -> bytes:
        if self._chunk is not None and n > self._chunk:
            n = self._chunk  # a short read that is not the end, as raw pipes and sockets do
        return self._f.read(n)

    def seekable(self) -> bool:
        return False

    def seek(self, *args: Any) -> int:
        raise io.UnsupportedOperation("seek")

    def tell(self) -> int:
        raise io.UnsupportedOperation("tell")


@pytest.mark.parametrize("chunk", [None, 1, 7, 4096])
def test_iter_stream_without_seek(chunk: int | None) -> None:
    data = dumps(mixed_tensors(), metadata={"m": 1})
    expected = loads(data)
    got = list(iter_stream(NoSeek(data, chunk)))  # type: ignore[arg-type]
    assert [n for n, _ in got] == list(expected)
    for name, value in got:
        assert_same(value, expected[name])


@pytest.mark.parametrize("version", ["1.0", "1.1"])
@pytest.mark.parametrize("buffering", [0, -1])
def test_iter_stream_over_a_pipe_yields_tensor_by_tensor(buffering: int, version: str) -> None:
    """The first tensor arrives while the writer is still blocked before the second.

    ``buffering=0`` reads the raw pipe, whose reads return what is there so far. In 1.1 a
    small tensor waits in a pack until ``flush()`` (or a full pack) writes it.
    """
    tensors = mixed_tensors()
    names = sorted(tensors, key=str.encode)
    r, w = os.pipe()
    first_seen = threading.Event()
    errors: list[BaseException] = []

    class Flushing:
        def __init__(self, f: Any) -> None:
            self.f = f

        def write(self, b: bytes) -> None:
            for k in range(0, len(b), 5):  # dribble: the reader sees partial structures
                self.f.write(b[k : k + 5])
                self.f.flush()

    def produce() -> None:
        try:
            with (os.fdopen(w, "wb") as f,
                  Writer(Flushing(f), version=version) as writer):  # type: ignore[arg-type]
                writer.write(names[0], tensors[names[0]])
                writer.flush()
                if not first_seen.wait(timeout=20):
                    raise TimeoutError("the reader did not yield the first tensor on its own")
                for name in names[1:]:
                    writer.write(name, tensors[name])
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    got = []
    with os.fdopen(r, "rb", buffering=buffering) as f:
        for name, value in iter_stream(f):
            got.append((name, value))
            first_seen.set()
    thread.join(timeout=30)
    assert not errors
    expected = loads(dumps(tensors))
    assert [n for n, _ in got] == names
    for name, value in got:
        assert_same(value, expected[name])


def test_iter_stream_is_lazy() -> None:
    """A bad second record is reported only after the first tensor was yielded."""
    data = bytearray(dumps({"a": T1, "b": np.arange(4, dtype=np.int32)}))
    b_info = inspect(bytes(data)).tensors[1]
    data[b_info.blocks[0].offset] ^= 0x01  # the data area of 'b'
    it = iter_stream(io.BytesIO(bytes(data)))
    assert next(it)[0] == "a"
    with pytest.raises(CompeftError, match=r"^tensor 'b': "):
        next(it)


# ---------------------------------------------------------------------------------------------
# Random access
# ---------------------------------------------------------------------------------------------


def test_open_file_reads_only_the_record_it_needs() -> None:
    """Every other record is overwritten with 0xff: one tensor still opens, info and decodes.

    Only the kind byte of each record is kept: the reader looks at it when it opens the file
    (an unknown optional record is not listed, spec 10.2).
    """
    tensors = mixed_tensors()
    data = dumps(tensors, version="1.0")  # one record per tensor (packs: test_pack.py)
    infos = {t.name: t for t in inspect(data).tensors}
    expected = loads(data)
    for keep, kept in infos.items():
        wiped = bytearray(data)
        for name, t in infos.items():
            if name != keep:
                wiped[t.offset + 1 : t.offset + t.record_size] = b"\xff" * (t.record_size - 1)
        with open_file(bytes(wiped)) as f:
            assert f.keys() == list(infos)
            assert f.info(keep) == kept
            assert_same(f.get(keep), expected[keep])
            other = next(n for n in infos if n != keep)
            with pytest.raises(CompeftError, match=f"^tensor {other!r}: "):
                f.get(other)


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_info_offsets_locate_every_block(version: str) -> None:
    """Each block, read at its ``inspect()`` offset and decoded alone, gives the tensor back."""
    tensors = mixed_tensors()
    data = dumps(tensors, version=version)
    loaded = loads(data)
    with open_file(data) as f:
        for name in f:
            info = f.info(name)
            kinds = ((S.KIND_TERNARY, S.KIND_PACK) if info.kind == "ternary" and version == "1.1"
                     else (S.KIND_TERNARY,) if info.kind == "ternary" else (S.KIND_DENSE,))
            assert data[info.offset] in kinds
            ctx = BlockContext(name, info.numel, info.nnz or 0, info.dtype, info.shape)
            parts = {}
            for b in info.blocks:
                payload: bytes = data[b.offset : b.offset + b.stored_size]
                if b.stage == "zstd":
                    payload = ZSTD.decode(payload, b.decoded_size, ctx)
                codec = get_codec(b.block_type)
                assert codec.name == b.codec
                parts[codec.role] = codec.decode(memoryview(payload), b.param, ctx)
            if info.kind == "dense":
                raw, dtype = f.get_raw(name)
                assert dtype == info.dtype
                assert parts["dense"].tobytes() == raw.tobytes()
            else:
                t = loaded[name]
                assert parts["positions"].tolist() == t.indices.tolist()
                assert parts["signs"].tolist() == t.signs.tolist()
                assert parts["scale"] == t.scale


def test_inspect_agrees_with_loads() -> None:
    tensors = mixed_tensors()
    data = dumps(tensors, metadata={"k": [1]}, alignment=16)
    loaded = loads(data)
    info = inspect(data)
    assert (info.version, info.alignment, info.metadata, info.file_size) == (
        (1, 7), 16, {"k": [1]}, len(data))
    assert [t.name for t in info.tensors] == list(loaded)
    for t in info.tensors:
        value = loaded[t.name]
        if isinstance(value, TernaryTensor):
            assert (t.kind, t.dtype, t.shape, t.nnz) == ("ternary", value.dtype, value.shape,
                                                         value.nnz)
            assert t.density == value.density
            assert [b.codec for b in t.blocks][1:] == ["signs", "scale"]
            assert t.blocks[0].codec in ("bitmask", "golomb")
        else:
            assert (t.kind, t.shape, t.nnz, t.density) == ("dense", value.shape, None, None)
            assert [b.codec for b in t.blocks] == ["dense"]
        assert t.numel == math.prod(t.shape)
        assert t.dense_size == t.numel * S.ITEMSIZE[t.dtype]
        for b in t.blocks:
            assert b.decoded_size == (b.stored_size if b.stage == "none" else b.decoded_size)
    assert info.tensors[0].codecs  # e.g. "golomb,signs,scale"
    assert info.numel == sum(t.numel for t in info.tensors)
    assert info.dense_size == sum(t.dense_size for t in info.tensors)
    json.dumps(info.to_dict())  # JSON-safe
    assert info.to_dict()["tensors"][0]["name"] == info.tensors[0].name
    with open_file(data) as f:
        assert f.file_info() == info


def test_reader_api() -> None:
    tensors = mixed_tensors()
    data = dumps(tensors)
    loaded = loads(data)
    f = open_file(data)
    assert (f.version, f.alignment) == ((1, 7), 8)
    assert "golomb" in f
    assert "nope" not in f
    assert list(f) == f.keys() == list(loaded)
    assert len(f) == len(tensors)
    for name, value in f.items():
        assert_same(value, loaded[name])
        assert_same(f[name], loaded[name])
    raw, dtype = f.get_raw("dense.bf16")
    assert (dtype, raw.dtype, raw.tolist()) == ("BF16", np.uint16, [0x3FC0, 0xC000])
    assert f.get_raw("scalar") == loaded["scalar"]
    assert f.get("dense.bf16", framework="torch").dtype == torch.bfloat16
    with pytest.raises(KeyError):
        f.get("nope")
    with pytest.raises(ValueError, match="framework must be 'numpy' or 'torch', got 'jax'"):
        f.get("golomb", framework="jax")
    f.close()
    f.close()
    with pytest.raises(ValueError, match="reader is closed"):
        f.get("golomb")
    for call in (lambda: loads(data, framework="jax"),
                 lambda: list(iter_stream(io.BytesIO(data), framework="jax")),
                 lambda: open_file(data, framework="jax")):
        with pytest.raises(ValueError, match="framework must be"):
            call()


def test_open_file_on_a_path_keeps_arrays_valid_after_close(tmp_path: Path) -> None:
    path = tmp_path / "x.compeft"
    save_file(mixed_tensors(), path)
    with open_file(path) as f:
        arr = f.get("dense.f32")
        t = f.get("golomb")
    assert arr.tolist() == np.arange(12, dtype=np.float32).reshape(3, 4).tolist()
    assert t == mixed_tensors()["golomb"]


def test_torch_framework() -> None:
    data = dumps(mixed_tensors())
    for reader in (lambda: loads(data, framework="torch"),
                   lambda: dict(iter_stream(io.BytesIO(data), framework="torch")),
                   lambda: dict(open_file(data, framework="torch").items())):
        got = reader()
        assert got["dense.bf16"].dtype == torch.bfloat16
        assert got["dense.bf16"].tolist() == [1.5, -2.0]
        assert got["bitmask"].dtype == torch.bfloat16  # a BF16 ternary tensor, native
        assert got["scalar"].shape == ()
        assert got["scalar"].item() == -2.0
        assert got["dense.0d"].shape == ()
        assert got["empty"].shape == (0, 4)
        assert got["empty"].dtype == torch.float16
        assert torch.equal(got["golomb"], mixed_tensors()["golomb"].to_torch())


# ---------------------------------------------------------------------------------------------
# TernaryTensor
# ---------------------------------------------------------------------------------------------


def test_tensor_counts() -> None:
    t = TernaryTensor((2, 3), [1, 5], [False, True], 0.5)
    assert (t.nnz, t.numel, t.density, t.shape, t.dtype) == (2, 6, 2 / 6, (2, 3), "F32")
    assert (TernaryTensor((), [0], [True], 1.0).numel, TernaryTensor((), [], [], 0).nnz) == (1, 0)
    empty = TernaryTensor((3, 0), [], [], 1.0)
    assert (empty.numel, empty.nnz, empty.density) == (0, 0, 0.0)
    z = TernaryTensor.zeros((4, 2), "BF16")
    assert (z.nnz, z.scale, z.dtype, z.to_numpy().tolist()) == (0, 0.0, "BF16", [[0, 0]] * 4)
    assert repr(t) == "TernaryTensor(shape=(2, 3), nnz=2, scale=0.5, dtype='F32')"
    assert t.indices.dtype == np.int64
    assert t.signs.dtype == bool


@pytest.mark.parametrize(("dtype", "np_dtype", "value"), [
    ("F32", np.float32, float(np.float32(0.1))),
    ("F64", np.float64, float(np.float32(0.1))),  # the scale is a float32, widened exactly
    ("F16", np.float16, float(np.float16(0.1))),
    ("BF16", np.float32, 0.10009765625),  # bfloat16 values carried in float32
])
def test_to_numpy_dtypes(dtype: str, np_dtype: type, value: float) -> None:
    t = TernaryTensor((2, 2), [0, 3], [True, False], 0.1, dtype)
    out = t.to_numpy()
    assert out.dtype == np_dtype
    assert out.shape == (2, 2)
    assert out.tolist() == [[-value, 0.0], [0.0, value]]


def test_to_numpy_dtype_override_and_bf16_rounding() -> None:
    t = TernaryTensor((3,), [0, 2], [False, True], 1 + 2**-8, "BF16")
    assert t.to_numpy().tolist() == [1.0, 0.0, -1.0]  # a tie rounds to even
    assert TernaryTensor((1,), [0], [False], 1 + 3 * 2**-8, "BF16").to_numpy().tolist() == [
        1 + 2**-6]
    assert t.to_numpy("F32").tolist() == [1 + 2**-8, 0.0, -(1 + 2**-8)]
    assert t.to_numpy(np.float16).dtype == np.float16
    assert t.to_numpy().shape == (3,)
    assert TernaryTensor((), [0], [True], 2.0).to_numpy().shape == ()


def test_to_torch_bf16_is_native() -> None:
    t = TernaryTensor((2, 2), [0, 3], [True, False], 0.1, "BF16")
    out = t.to_torch()
    assert out.dtype == torch.bfloat16
    assert out.shape == (2, 2)
    bits = out.view(torch.int16).numpy().view(np.uint16).reshape(-1).tolist()
    b = int(f32_to_bf16_bits(np.float32([0.1]))[0])
    assert bits == [b | 0x8000, 0, 0, b]
    assert out.float().numpy().tolist() == t.to_numpy().tolist()
    assert float(bf16_bits_to_f32(np.array([b]))[0]) == 0.10009765625
    for dtype, torch_dtype in [("F32", torch.float32), ("F16", torch.float16),
                               ("F64", torch.float64)]:
        assert TernaryTensor((2,), [1], [True], 0.5, dtype).to_torch().dtype == torch_dtype
    assert t.to_torch("F32").dtype == torch.float32
    assert TernaryTensor((), [0], [True], 2.0, "BF16").to_torch().shape == ()


@pytest.mark.parametrize("make", [
    lambda: np.array([0.0, -2.0, 2.0, 0.0], np.float32),
    lambda: np.array([[0.5, 0.0], [0.0, -0.5]], np.float16),
    lambda: np.array([0.0, 0.0]),
    lambda: np.zeros((0, 3)),
    lambda: np.array(-3.0),
    lambda: torch.tensor([0.0, 1.5, -1.5], dtype=torch.bfloat16),
    lambda: torch.tensor([[0.0, 0.25]], dtype=torch.float32),
])
def test_from_dense_round_trip(make: Any) -> None:
    dense = make()
    t = TernaryTensor.from_dense(dense)
    back = t.to_torch() if isinstance(dense, torch.Tensor) else t.to_numpy()
    assert back.dtype == dense.dtype
    assert tuple(back.shape) == tuple(dense.shape)
    if isinstance(dense, torch.Tensor):
        assert torch.equal(back, dense)
    else:
        np.testing.assert_array_equal(back, dense)
    assert loads(dumps({"t": t}))["t"] == t


def test_from_dense_dtype_override() -> None:
    t = TernaryTensor.from_dense(np.array([0.0, 1.0], np.float32), dtype="BF16")
    assert (t.dtype, t.indices.tolist(), t.scale) == ("BF16", [1], 1.0)


@pytest.mark.parametrize(("dense", "message"), [
    (np.array([1, 0], np.int32), "from_dense needs float data, got I32"),
    (np.array([True]), "from_dense needs float data, got BOOL"),
    (np.array([0.0, np.nan], np.float32), "from_dense: the array holds NaN or infinity"),
    (np.array([np.inf]), "from_dense: the array holds NaN or infinity"),
    (np.array([1.0, -2.0, 0.0]), "from_dense: nonzeros have 2 different magnitudes (1.0 .. "
     "2.0); a ternary tensor has one"),
    (np.array([0.1, -0.1]), "from_dense: magnitude 0.1 is not exact in float32"),
    (np.array([1 + 1j]), "numpy dtype complex128 has no safetensors equivalent"),
])
def test_from_dense_errors(dense: np.ndarray, message: str) -> None:
    with pytest.raises(EncodeError) as info:
        TernaryTensor.from_dense(dense)
    assert str(info.value) == message


@pytest.mark.parametrize(("args", "message"), [
    (((-1,), [], [], 1.0), "shape (-1,) has a negative dimension"),
    (((4,), [1, 2], [True], 1.0), "2 indices but 1 signs; they must match"),
    (((4,), [4], [True], 1.0), "indices must lie in [0, 4)"),
    (((4,), [-1], [True], 1.0), "indices must lie in [0, 4)"),
    (((0,), [0], [True], 1.0), "indices must lie in [0, 0)"),
    (((4,), [2, 2], [True, True], 1.0), "indices must be strictly increasing"),
    (((4,), [3, 1], [True, True], 1.0), "indices must be strictly increasing"),
    (((4,), [1], [True], -1.0), "scale must be finite and non-negative, got -1.0"),
    (((4,), [1], [True], -0.0), "scale must be finite and non-negative, got -0.0"),
    (((4,), [1], [True], float("nan")), "scale must be finite and non-negative, got nan"),
    (((4,), [1], [True], float("inf")), "scale must be finite and non-negative, got inf"),
    (((4,), [1], [True], 1e39), "scale 1e+39 overflows float32"),
])
def test_tensor_constructor_errors(args: tuple, message: str) -> None:
    with pytest.raises(EncodeError) as info:
        TernaryTensor(*args)
    assert str(info.value) == message


def test_tensor_equality() -> None:
    t = TernaryTensor((2, 2), [0, 3], [True, False], 0.5)
    assert t == TernaryTensor([2, 2], np.array([0, 3], np.int32), [1, 0], np.float32(0.5))
    assert t == TernaryTensor((2, 2), [0, 3], [True, False], 0.5 + 2**-30)  # same float32
    for other in (
        TernaryTensor((4,), [0, 3], [True, False], 0.5),
        TernaryTensor((2, 2), [0, 2], [True, False], 0.5),
        TernaryTensor((2, 2), [0, 3], [True, True], 0.5),
        TernaryTensor((2, 2), [0, 3], [True, False], 0.25),
        TernaryTensor((2, 2), [0, 3], [True, False], 0.5, "F16"),
    ):
        assert t != other
    assert t != "t"
    assert (t == 1) is False
    with pytest.raises(TypeError):
        hash(t)


def _names(it: Iterator[tuple[str, Any]]) -> list[str]:
    return [n for n, _ in it]


def test_iter_stream_accepts_bytes_io_and_files(tmp_path: Path) -> None:
    data = dumps(mixed_tensors())
    path = tmp_path / "x.compeft"
    path.write_bytes(data)
    with path.open("rb") as f:
        assert _names(iter_stream(f)) == list(loads(data))
    assert _names(iter_stream(io.BytesIO(data))) == list(loads(data))


def test_dense_input_layouts_are_stored_little_endian_c_order() -> None:
    """Big-endian, transposed, Fortran-ordered and strided inputs read back equal (spec 2.1)."""
    inputs = {
        "be.t": np.arange(12, dtype=">i4").reshape(3, 4).T,
        "fortran": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
        "strided": np.arange(10, dtype=np.uint16)[::3],
        "torch.t": torch.arange(12, dtype=torch.bfloat16).reshape(3, 4).T,
    }
    data = dumps(inputs)
    loaded = loads(data)
    for name in ("be.t", "fortran", "strided"):
        assert loaded[name].dtype == inputs[name].dtype.newbyteorder("<")
        np.testing.assert_array_equal(loaded[name], inputs[name])
    assert open_file(data).get_raw("be.t")[0].tobytes() == np.arange(12, dtype="<i4").reshape(
        3, 4).T.copy().tobytes()
    assert torch.equal(loads(data, framework="torch")["torch.t"], inputs["torch.t"])
