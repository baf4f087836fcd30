"""Property tests: what is written is read back, by every reader, and re-encodes identically.

Every shape (0-d and empty included), densities 0 and 1, every positions codec forced and
``auto``, every dtype, zstd on and off, every alignment.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from strategies import (
    RAW_BITS_DTYPES,
    st_dense_arrays,
    st_metadata,
    st_options,
    st_scales,
    st_shapes,
    st_tensor_dicts,
    st_ternary_tensors,
    tiny_chunks,
    torch_from_storage,
)

from compeft_format import TernaryTensor, dumps, inspect, iter_stream, loads, open_file
from compeft_format import _spec as S
from compeft_format.dtypes import f32_to_bf16_bits, to_numpy_values

OPTS = {"positions": "auto", "zstd_level": 3, "alignment": 8}


def raw_values(data: bytes) -> dict[str, Any]:
    """Every tensor as stored: TernaryTensor, or ``(storage bits, dtype)`` for dense records."""
    with open_file(data) as f:
        return {name: f.get_raw(name) for name in f}


def reencodable(data: bytes) -> dict[str, Any]:
    """The file's tensors in a form the writer takes back unchanged (BF16/F8 through torch)."""
    out = {}
    for name, value in raw_values(data).items():
        if isinstance(value, tuple):
            storage, dtype = value
            value = torch_from_storage(storage, dtype) if dtype in RAW_BITS_DTYPES else storage
        out[name] = value
    return out


def assert_equal_values(got: Any, want: Any) -> None:
    """TernaryTensors by ==; numpy arrays by dtype, shape and bytes (NaN payloads included)."""
    if isinstance(want, TernaryTensor):
        assert isinstance(got, TernaryTensor)
        assert got == want
    else:
        assert got.dtype == want.dtype
        assert got.shape == want.shape
        assert got.tobytes() == want.tobytes()


def expected_numpy(value: Any) -> Any:
    """What ``loads`` returns for a written value: dense BF16/F8 widen to float32."""
    if isinstance(value, TernaryTensor):
        return value
    if isinstance(value, torch.Tensor):
        name = {torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3",
                torch.float8_e5m2: "F8_E5M2"}[value.dtype]
        bits = value.view(torch.int16 if name == "BF16" else torch.uint8).numpy()
        return to_numpy_values(bits.view(np.uint16) if name == "BF16" else bits, name)
    return value


def assert_all_readers(data: bytes, want: dict[str, Any]) -> None:
    """``loads``, ``iter_stream`` and ``open_file`` all return ``want``, in file order."""
    order = sorted(want, key=str.encode)
    loaded = loads(data)
    assert list(loaded) == order
    streamed = list(iter_stream(io.BytesIO(data)))
    assert [n for n, _ in streamed] == order
    with open_file(data) as f:
        assert f.keys() == order
        opened = {name: f.get(name) for name in f}
    for name in order:
        expected = expected_numpy(want[name])
        assert_equal_values(loaded[name], expected)
        assert_equal_values(dict(streamed)[name], expected)
        assert_equal_values(opened[name], expected)


@given(t=st_ternary_tensors(), opts=st_options())
@example(t=TernaryTensor.zeros((0,)), opts=OPTS)
@example(t=TernaryTensor.zeros(()), opts=OPTS)
@example(t=TernaryTensor((), [0], [True], 1.0, "BF16"), opts=OPTS)
@example(t=TernaryTensor((3, 0, 2), [], [], 0.0, "F16"), opts={**OPTS, "positions": "bitmask"})
@example(t=TernaryTensor((9,), np.arange(9), np.ones(9, bool), 2.0**-149), opts=OPTS)
def test_ternary_round_trip(t: TernaryTensor, opts: dict[str, Any]) -> None:
    data = dumps({"t": t}, **opts)
    assert loads(data)["t"] == t
    assert_all_readers(data, {"t": t})
    assert dumps(loads(data), **opts) == data  # identical bytes on re-encoding


@given(t=st_ternary_tensors(density=1.0) | st_ternary_tensors(density=0.0),
       opts=st_options(alignments=(1, 8)))
def test_densities_zero_and_one(t: TernaryTensor, opts: dict[str, Any]) -> None:
    assert t.nnz in (0, t.numel)
    assert loads(dumps({"t": t}, **opts))["t"] == t


@given(t=st_ternary_tensors(), level=st.sampled_from([None, 1, 3]))
def test_positions_codec_forced_and_auto(t: TernaryTensor, level: int | None) -> None:
    """Forced codecs are used (an empty tensor is always an empty golomb block, spec 6.2.2);
    ``auto`` is never bigger than either of them."""
    sizes = {}
    for positions in ("bitmask", "golomb", "auto"):
        data = dumps({"t": t}, positions=positions, zstd_level=level)
        assert loads(data)["t"] == t
        block = inspect(data).tensors[0].blocks[0]
        if positions != "auto":
            assert block.codec == (positions if t.nnz else "golomb")
        if t.nnz == 0:
            assert (block.codec, block.param, block.stored_size) == ("golomb", 1, 0)
        sizes[positions] = block.stored_size
    assert sizes["auto"] <= min(sizes["bitmask"], sizes["golomb"])


@given(tensors=st_tensor_dicts(), opts=st_options(alignments=(1, 2, 8, 64, 4096)))
def test_zstd_is_used_only_where_it_saves_bytes(tensors: dict[str, Any],
                                                opts: dict[str, Any]) -> None:
    data = dumps(tensors, **opts)
    for t in inspect(data).tensors:
        kind = data[t.offset]
        packed = kind in (S.KIND_PACK, S.KIND_COLUMN_PACK, S.KIND_COMPACT_PACK,  # spec 5.8:
                          S.KIND_BIT_PACK, S.KIND_LEAN_PACK, S.KIND_TIGHT_PACK,
                          S.KIND_TWIN_PACK)
        # members are neither aligned nor zstd
        for b in t.blocks:
            # spec 5.10 to 5.14: a compact, bit, lean, tight or twin pack member's scale is in
            # the pack's table
            in_table = b.stage == "table"
            assert in_table == (kind in (S.KIND_COMPACT_PACK, S.KIND_BIT_PACK,
                                         S.KIND_LEAN_PACK, S.KIND_TIGHT_PACK,
                                         S.KIND_TWIN_PACK)
                                 and b.codec == "scale")
            assert packed or b.offset % opts["alignment"] == 0
            assert not packed or b.stage in ("none", "table")
            if opts["zstd_level"] is None or b.codec == "scale":
                assert b.stage != "zstd"
            if b.stage == "zstd":
                assert b.stored_size < b.decoded_size
            else:
                assert b.stored_size == b.decoded_size


@given(tensors=st_tensor_dicts(), opts=st_options(), metadata=st_metadata())
def test_mixed_files_round_trip_through_every_reader(tensors: dict[str, Any],
                                                     opts: dict[str, Any],
                                                     metadata: dict | None) -> None:
    data = dumps(tensors, metadata=metadata, **opts)
    assert_all_readers(data, tensors)
    with open_file(data) as f:
        assert f.metadata() == (metadata or {})
        assert f.alignment == opts["alignment"]
    info = inspect(data)
    assert [t.name for t in info.tensors] == sorted(tensors, key=str.encode)
    assert info.file_size == len(data)
    # identical bytes when the file's own tensors are written again with the same options
    assert dumps(reencodable(data), metadata=metadata, **opts) == data


@given(value=st_dense_arrays(), opts=st_options(alignments=(1, 4, 8)))
def test_dense_round_trip_keeps_every_bit(value: tuple[Any, np.ndarray, str],
                                          opts: dict[str, Any]) -> None:
    written, storage, dtype = value
    data = dumps({"d": written}, **opts)
    raw, raw_dtype = raw_values(data)["d"]
    assert raw_dtype == dtype
    assert raw.shape == storage.shape
    assert raw.tobytes() == storage.tobytes()
    assert_equal_values(loads(data)["d"], to_numpy_values(storage, dtype))
    # torch: the native dtype, bit for bit
    t = loads(data, framework="torch")["d"]
    assert tuple(t.shape) == storage.shape
    if dtype in RAW_BITS_DTYPES:
        assert t.dtype == written.dtype
        bits = t.view(torch.int16 if dtype == "BF16" else torch.uint8).numpy()
        assert bits.tobytes() == storage.tobytes()
    else:
        assert t.numpy().tobytes() == storage.tobytes()
    assert dumps(reencodable(data), **opts) == data


@given(shape=st_shapes(), data=st.data())
def test_torch_bf16_round_trip(shape: tuple[int, ...], data: st.DataObject) -> None:
    """A BF16 ternary tensor reads back as native bfloat16, and from_dense recovers it."""
    t = data.draw(st_ternary_tensors(shapes=st.just(shape), dtypes=("BF16",),
                                     scales=st.floats(2.0**-100, 2.0**100, width=32)))
    blob = dumps({"t": t})
    dense = loads(blob, framework="torch")["t"]
    assert dense.dtype == torch.bfloat16
    assert tuple(dense.shape) == shape
    assert torch.equal(dense, t.to_torch())
    bits = int(f32_to_bf16_bits(np.float32([t.scale]))[0])
    signs = dense.view(torch.int16).numpy().view(np.uint16).reshape(-1)[t.indices] >> 15
    assert signs.tolist() == t.signs.astype(int).tolist()
    assert set(dense.view(torch.int16).numpy().view(np.uint16).reshape(-1).tolist()) <= {
        0, bits, bits | 0x8000}
    # bfloat16 -> ternary: the same tensor with its scale rounded to bfloat16
    back = TernaryTensor.from_dense(dense)
    rounded = float(torch.tensor(t.scale).to(torch.bfloat16).float())
    assert back == TernaryTensor(shape, t.indices, t.signs, rounded if t.nnz else 0.0, "BF16")
    assert loads(dumps({"t": back}), framework="torch")["t"].equal(dense)


@given(t=st_ternary_tensors(dtypes=("F32", "F16", "F64"), scales=st_scales()))
def test_torch_framework_matches_to_torch(t: TernaryTensor) -> None:
    blob = dumps({"t": t})
    for got in (loads(blob, framework="torch")["t"],
                dict(iter_stream(io.BytesIO(blob), framework="torch"))["t"],
                open_file(blob, framework="torch").get("t")):
        want = t.to_torch()
        assert got.dtype == want.dtype
        assert got.shape == want.shape
        assert got.numpy().tobytes() == want.numpy().tobytes()


@given(st_tensor_dicts(max_size=3), st_options(alignments=(1, 8)))
def test_dumps_is_deterministic(tensors: dict[str, Any], opts: dict[str, Any]) -> None:
    shuffled = dict(reversed(list(tensors.items())))
    data = dumps(tensors, **opts)
    assert dumps(shuffled, **opts) == data
    assert data[: len(S.MAGIC)] == S.MAGIC
    assert data[-4:] == S.TAIL_MAGIC


@given(tensors=st_tensor_dicts(max_size=3), opts=st_options(alignments=(1, 8)))
def test_dense_decoding_matches_to_numpy(tensors: dict[str, Any], opts: dict[str, Any]) -> None:
    """``dense=True`` writes ternary tensors straight from the blocks: same as ``to_numpy``."""
    data = dumps(tensors, **opts)
    want = {name: v.to_numpy() if isinstance(v, TernaryTensor) else expected_numpy(v)
            for name, v in tensors.items()}
    readers = {
        "loads": loads(data, dense=True),
        "iter_stream": dict(iter_stream(io.BytesIO(data), dense=True)),
    }
    with open_file(data) as f:
        readers["open_file"] = {name: f.get(name, dense=True) for name in f}
        for name, t in tensors.items():
            if isinstance(t, TernaryTensor):
                out = np.full(t.shape, 7, dtype=want[name].dtype)  # every element overwritten
                assert f.get(name, dense=True, out=out) is out
                readers.setdefault("out", {})[name] = out
    for got in readers.values():
        for name, value in got.items():
            assert_equal_values(value, want[name])


@given(tensors=st_tensor_dicts(max_size=3), opts=st_options(alignments=(1, 8)),
       metadata=st_metadata())
def test_chunk_boundaries_change_nothing(tensors: dict[str, Any], opts: dict[str, Any],
                                         metadata: dict | None) -> None:
    """Every chunked loop cut at a few elements (and zstd on the worker thread): the same
    bytes are written, and every reader and output form returns the same values."""
    data = dumps(tensors, metadata=metadata, **opts)
    with tiny_chunks():
        assert dumps(tensors, metadata=metadata, **opts) == data
        assert_all_readers(data, tensors)
        dense = loads(data, dense=True)
        torch_values = dict(iter_stream(io.BytesIO(data), framework="torch"))
    for name, value in tensors.items():
        if isinstance(value, TernaryTensor):
            assert_equal_values(dense[name], value.to_numpy())
            assert torch.equal(torch_values[name], value.to_torch())
