"""safetensors_io: our reader and streaming writer against the ``safetensors`` library."""

from __future__ import annotations

import doctest
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch
from hypothesis import given
from hypothesis import strategies as st

import compeft_format.safetensors_io as sio
from compeft_format import dtypes as _dt
from compeft_format.errors import EncodeError, FormatError, UnsupportedFeatureError
from compeft_format.safetensors_io import (
    SafetensorsError,
    SafetensorsReader,
    SafetensorsWriter,
    open_safetensors,
    parse_header,
    save_safetensors,
)

TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}


def _torch_tensor(dtype: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = int(np.prod(shape))
    if dtype == "BOOL":
        return (torch.rand(n, generator=g) > 0.5).reshape(shape)
    if dtype in ("F8_E4M3", "F8_E5M2", "BF16", "F16", "F32", "F64"):
        return (torch.randn(n, generator=g) * 3).to(TORCH[dtype]).reshape(shape)
    return torch.randint(0, 100, (n,), generator=g).to(TORCH[dtype]).reshape(shape)


def _mixed() -> dict[str, torch.Tensor]:
    return {
        "w.f32": _torch_tensor("F32", (3, 5)),
        "w.bf16": _torch_tensor("BF16", (4, 3), 1),
        "w.f16": _torch_tensor("F16", (7,), 2),
        "a.f64": _torch_tensor("F64", (2, 2), 3),
        "ids": _torch_tensor("I64", (6,), 4),
        "mask": _torch_tensor("BOOL", (2, 3), 5),
        "q": _torch_tensor("F8_E4M3", (5,), 6),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros((0, 4)),
        "u8": _torch_tensor("U8", (3,), 7),
    }


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads included)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def _write_ours(tensors: dict[str, torch.Tensor], path: Path, metadata=None) -> None:
    save_safetensors(tensors, path, metadata=metadata)


# ---------------------------------------------------------------------------------------------
# agreement with the library
# ---------------------------------------------------------------------------------------------
def test_ours_load_with_safetensors_torch(tmp_path):
    tensors = _mixed()
    path = tmp_path / "ours.safetensors"
    _write_ours(tensors, path, metadata={"format": "pt"})
    back = safetensors.torch.load_file(path)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype, name
        assert back[name].shape == t.shape, name
        assert _same_bits(back[name], t), name
    with safetensors.safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_ours_is_byte_identical_to_the_library(tmp_path):
    tensors = _mixed()
    ours = tmp_path / "ours.safetensors"
    # one metadata key: the library writes __metadata__ from a hash map, in a random order
    _write_ours(tensors, ours, metadata={"format": "pt"})
    theirs = safetensors.torch.save(tensors, metadata={"format": "pt"})
    assert ours.read_bytes() == theirs


def test_library_files_read_back_with_ours(tmp_path):
    tensors = _mixed()
    path = tmp_path / "theirs.safetensors"
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    with open_safetensors(path) as r:
        assert r.metadata == {"format": "pt"}
        assert set(r.keys()) == set(tensors)
        for name, t in tensors.items():
            arr, dtype = r.get(name)
            assert dtype == {v: k for k, v in TORCH.items()}[t.dtype]
            assert arr.shape == tuple(t.shape)
            assert not arr.flags.writeable  # a view of the read-only map
            # the raw bits agree, and the torch view of them is the same tensor
            assert _same_bits(_dt.to_torch(arr, dtype), t), name
        bf16 = r.values("w.bf16")
        assert bf16.dtype == np.float32
        np.testing.assert_array_equal(bf16, tensors["w.bf16"].float().numpy())


def test_numpy_library_files_read_back(tmp_path):
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([True, False])}
    path = tmp_path / "np.safetensors"
    safetensors.numpy.save_file(arrays, path)
    with SafetensorsReader(path) as r:
        for k, v in arrays.items():
            np.testing.assert_array_equal(r.values(k), v)


def test_non_contiguous_arrays_are_written_right(tmp_path):
    base = np.arange(60, dtype=np.float32).reshape(6, 10)
    arrays = {"t": base.T, "s": base[::2, 1::3], "neg": base[::-1], "be": base.astype(">f4")}
    path = tmp_path / "nc.safetensors"
    save_safetensors(arrays, path)
    back = safetensors.numpy.load_file(path)
    for k, v in arrays.items():
        np.testing.assert_array_equal(back[k], v)
        assert back[k].dtype == np.float32


@given(st.dictionaries(
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=8)
    .filter(lambda s: s != "__metadata__"),
    st.tuples(st.sampled_from(sorted(TORCH)),
              st.lists(st.integers(0, 4), max_size=3).map(tuple)),
    max_size=6))
def test_property_round_trip_with_library(spec):
    tensors = {n: _torch_tensor(d, s, i) for i, (n, (d, s)) in enumerate(spec.items())}
    buf = io.BytesIO()
    layout = [(n, {v: k for k, v in TORCH.items()}[t.dtype], tuple(t.shape))
              for n, t in tensors.items()]
    with SafetensorsWriter(buf, layout) as w:
        for n in w.order:
            w.write(n, tensors[n])
    assert buf.getvalue() == safetensors.torch.save(tensors)
    back = safetensors.torch.load(buf.getvalue())
    for n, t in tensors.items():
        assert _same_bits(back[n], t)


# ---------------------------------------------------------------------------------------------
# the streaming writer
# ---------------------------------------------------------------------------------------------
def test_writer_streams_parts_in_order():
    buf = io.BytesIO()
    w = SafetensorsWriter(buf, [("b", "BF16", (4,)), ("a", "F32", (2, 2)), ("z", "I8", (0,))],
                          metadata={"k": "v"})
    assert w.order == ["a", "b", "z"]
    w.write("a", np.zeros(3, np.float32))
    w.write("a", np.ones(1, np.float32))
    bits = _dt.f32_to_bf16_bits(np.array([1.0, -2.0, 0.5, 3.0], np.float32))
    w.write("b", bits[:1])
    w.write("b", bits[1:])
    w.close()
    back = safetensors.torch.load(buf.getvalue())
    assert back["a"].tolist() == [[0.0, 0.0], [0.0, 1.0]]
    assert back["b"].tolist() == [1.0, -2.0, 0.5, 3.0]
    assert back["z"].shape == (0,)


def test_writer_refuses_wrong_order_size_and_dtype():
    w = SafetensorsWriter(io.BytesIO(), [("a", "F32", (2,)), ("b", "F16", (1,))])
    with pytest.raises(EncodeError, match=r"expected 'a'"):
        w.write("b", np.zeros(1, np.float16))
    with pytest.raises(EncodeError, match=r"cannot declare F64 data as F32"):
        w.write("a", np.zeros(2))
    with pytest.raises(EncodeError, match=r"3 bytes|12 bytes written"):
        w.write("a", np.zeros(3, np.float32))
    w.write("a", np.zeros(2, np.float32))
    with pytest.raises(EncodeError, match=r"tensor 'b': only 0 of 2 bytes"):
        w.close()
    with pytest.raises(EncodeError, match=r"reserved or repeated"):
        SafetensorsWriter(io.BytesIO(), [("a", "F32", (1,)), ("a", "F32", (1,))])
    with pytest.raises(EncodeError, match=r"unknown dtype"):
        SafetensorsWriter(io.BytesIO(), [("a", "F12", (1,))])


def test_save_is_atomic(tmp_path):
    path = tmp_path / "x.safetensors"
    save_safetensors({"a": np.ones(2, np.float32)}, path)
    before = path.read_bytes()
    with pytest.raises(EncodeError):
        save_safetensors({"a": np.ones(2, np.float32), "b": np.array(["s"])}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_release_keeps_arrays_valid(tmp_path):
    path = tmp_path / "x.safetensors"
    data = np.random.default_rng(0).normal(size=(512, 512)).astype(np.float32)
    save_safetensors({"a": data, "b": np.arange(3)}, path)
    r = SafetensorsReader(path)
    a = r.values("a")
    r.release("a")
    r.release()
    np.testing.assert_array_equal(a, data)
    r.close()
    np.testing.assert_array_equal(a, data)  # the map lives as long as the array
    with pytest.raises(ValueError, match=r"closed"):
        r.get("a")


# ---------------------------------------------------------------------------------------------
# bad files: a SafetensorsError (a FormatError) naming the file, where the library also fails
# ---------------------------------------------------------------------------------------------
def _blob(header=None, data=b"", raw: bytes | None = None, size: int | None = None) -> bytes:
    h = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if size is None else size) + h + data


T = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BAD = {
    "empty": (b"", "0 bytes"),
    "short": (b"\x01\x02\x03", "3 bytes"),
    "huge header": (_blob(raw=b"{}", size=200_000_000), "above the"),
    "past end": (_blob(raw=b"{}", size=50), "past the end"),
    "not json": (_blob(raw=b"{nope"), "not valid UTF-8 JSON"),
    "not utf8": (_blob(raw=b'{"\xff":1}'), "not valid UTF-8 JSON"),
    "list": (_blob(raw=b"[1]"), "not a JSON object"),
    "dup": (_blob(raw=b'{"a":' + json.dumps(T).encode() + b',"a":'
                  + json.dumps(T).encode() + b"}", data=bytes(8)), "duplicate key"),
    "bad dtype": (_blob({"a": {**T, "dtype": "F13"}}, bytes(8)), "unknown dtype"),
    "bad shape": (_blob({"a": {**T, "shape": [-2]}}, bytes(8)), "shape must be"),
    "bad offsets": (_blob({"a": {**T, "data_offsets": [8, 0]}}, bytes(8)), "data_offsets"),
    "size": (_blob({"a": {**T, "shape": [3]}}, bytes(8)), "needs 12 bytes"),
    "hole": (_blob({"a": {**T, "data_offsets": [4, 12]}}, bytes(12)), "leaves a hole"),
    "overlap": (_blob({"a": T, "b": {**T, "data_offsets": [4, 12]}}, bytes(12)), "overlaps"),
    "trailing": (_blob({"a": T}, bytes(9)), "end at byte"),
    "missing data": (_blob({"a": T}, bytes(7)), "end at byte"),
    "metadata": (_blob({"__metadata__": {"a": 1}, "a": T}, bytes(8)), "__metadata__"),
    "no fields": (_blob({"a": {"dtype": "F32"}}, bytes(8)), "needs an object"),
    "compeft": (b"\x89CPFT\r\n\x1a" + bytes(40), "compeft file"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files(tmp_path, case):
    blob, match = BAD[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(SafetensorsError, match=match) as info:
        SafetensorsReader(path)
    assert isinstance(info.value, FormatError)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
    if case != "dup":  # the library keeps the last of two equal keys; we refuse them
        with pytest.raises(Exception):  # noqa: B017, PT011 - the library's own error types
            safetensors.safe_open(path, "np")


def test_unsupported_dtype(tmp_path):
    path = tmp_path / "e8m0.safetensors"
    path.write_bytes(_blob({"a": {"dtype": "F8_E8M0", "shape": [1], "data_offsets": [0, 1]}},
                           bytes(1)))
    with pytest.raises(UnsupportedFeatureError, match=r"F8_E8M0 is not supported"):
        open_safetensors(path)


def test_valid_edge_files(tmp_path):
    cases = {
        "no tensors": _blob({}),
        "leading space": _blob(raw=b' {"a":' + json.dumps(T).encode() + b"}", data=bytes(8)),
        "extra field": _blob({"a": {**T, "x": 1}}, bytes(8)),
        "empty tensor": _blob({"a": {**T, "shape": [0, 2], "data_offsets": [0, 0]}}),
    }
    for name, blob in cases.items():
        path = tmp_path / "ok.safetensors"
        path.write_bytes(blob)
        with safetensors.safe_open(path, "np"):
            pass
        with SafetensorsReader(path) as r:
            for k in r:
                r.get(k)
        assert parse_header(blob, len(blob))[0] == {}, name


def test_doctests():
    result = doctest.testmod(sio, optionflags=doctest.ELLIPSIS)
    assert result.attempted
    assert not result.failed
