"""The torch block decoders (codecs/torch_decode.py), forced on the CPU, against the numpy ones.

Every block a numpy codec decodes must decode to the same positions, signs and dense values
through torch, and every payload a numpy codec rejects must be rejected with the same error
(class and message); the GPU runs the same operations.
"""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import st_dense_arrays, st_ternary_tensors

import compeft_format as cf
from compeft_format import TernaryTensor
from compeft_format import _spec as S
from compeft_format.codecs import (
    BitmaskCodec,
    BlockContext,
    DenseCodec,
    GolombCodec,
    SignsCodec,
)
from compeft_format.codecs import torch_decode as td
from compeft_format.errors import CompeftError
from compeft_format.tensor import dense_values


def _ctx(t: TernaryTensor) -> BlockContext:
    return BlockContext("t", t.numel, t.nnz, t.dtype, t.shape, offset=100)


def _bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor (so -0.0 and NaN payloads count)."""
    if not t.numel():
        return b""
    return t.contiguous().reshape(-1).clone().view(torch.uint8).numpy().tobytes()


def _same(numpy_call, torch_call) -> object:
    """Both calls give equal results, or both raise the same error; returns the torch one."""
    try:
        want = numpy_call()
    except CompeftError as exc:
        error = exc
    else:
        error = None
    if error is not None:
        with pytest.raises(type(error)) as raised:
            torch_call()
        assert str(raised.value) == str(error)
        return None
    got = torch_call()
    assert got.device.type == "cpu"
    np.testing.assert_array_equal(got.numpy(), np.asarray(want))
    return got


@st.composite
def st_positions_blocks(draw):
    """A ternary tensor and one of its positions blocks: bitmask, the encoder's golomb, or a
    golomb stream with any M (every code shape: M = 1, powers of two, truncated codes)."""
    t = draw(st_ternary_tensors())
    ctx = _ctx(t)
    which = draw(st.sampled_from(("bitmask", "golomb", "golomb-any-m")))
    if which == "bitmask":
        param, payload = BitmaskCodec().encode(t.indices, ctx)
        return t, S.BLOCK_BITMASK, param, payload
    if which == "golomb-any-m" and t.nnz:
        from compeft_format.codecs import golomb

        m = draw(st.integers(1, max(1, min(t.numel, 3000))))
        return t, S.BLOCK_GOLOMB, m, golomb._encode_stream(t.indices, m, t.numel)
    param, payload = GolombCodec().encode(t.indices, ctx)
    return t, S.BLOCK_GOLOMB, param, payload


@given(st_positions_blocks())
def test_positions_match_numpy(case):
    t, btype, param, payload = case
    ctx = _ctx(t)
    got = td.positions(btype, memoryview(payload), param, ctx, "cpu")
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), t.indices)


@given(st_positions_blocks(), st.data())
def test_damaged_positions_fail_as_numpy_does(case, data):
    """A flipped bit, a cut or an extra byte, a wrong nnz or M: same result, same error."""
    t, btype, param, payload = case
    raw = bytearray(payload)
    how = data.draw(st.sampled_from(("flip", "cut", "extend", "nnz", "param")))
    nnz = t.nnz
    if how == "flip" and raw:
        bit = data.draw(st.integers(0, 8 * len(raw) - 1))
        raw[bit >> 3] ^= 1 << (bit & 7)
    elif how == "cut" and raw:
        raw = raw[:-1]
    elif how == "extend":
        raw += bytes([data.draw(st.integers(0, 255))])
    elif how == "nnz":
        nnz = data.draw(st.integers(0, t.numel))
    elif how == "param":
        param = data.draw(st.integers(0, 2 * t.numel + 2))
    ctx = BlockContext("t", t.numel, nnz, t.dtype, t.shape, offset=100)
    codec = BitmaskCodec() if btype == S.BLOCK_BITMASK else GolombCodec()
    _same(lambda: codec.decode(memoryview(bytes(raw)), param, ctx),
          lambda: td.positions(btype, memoryview(bytes(raw)), param, ctx, "cpu"))


def test_golomb_overflow_guard_uses_the_exact_decoder():
    """A huge M with a long stream takes the numpy decoder (int64 could wrap); same result."""
    numel = 2**48
    rng = np.random.default_rng(3)
    idx = np.unique(rng.integers(0, numel, 1000, dtype=np.int64))
    ctx = BlockContext("t", numel, idx.size, "F32", (numel,))
    from compeft_format.codecs import golomb

    m = 2**47 + 7
    payload = golomb._encode_stream(idx, m, numel)
    assert m * (8 * len(payload) + idx.size + 1) >= td._INT64_SAFE  # the guard's case
    got = td.positions(S.BLOCK_GOLOMB, memoryview(payload), m, ctx, "cpu")
    np.testing.assert_array_equal(got.numpy(), idx)


@given(st_ternary_tensors(), st.data())
def test_signs_match_numpy(t, data):
    ctx = _ctx(t)
    _, payload = SignsCodec().encode(t.signs, ctx)
    raw = bytearray(payload)
    if raw and data.draw(st.booleans()):  # a damaged padding bit or byte count
        raw[-1] |= 0x80 if data.draw(st.booleans()) else 0
        raw = raw if data.draw(st.booleans()) else raw + b"\0"
    _same(lambda: SignsCodec().decode(memoryview(bytes(raw)), 0, ctx),
          lambda: td.signs(memoryview(bytes(raw)), 0, ctx, "cpu"))


@given(st_ternary_tensors(), st.sampled_from([None, "F32", "F16", "BF16", "F64"]))
def test_ternary_dense_matches_to_torch(t, into):
    """The dense tensor on the device equals TernaryTensor.to_torch (then .to(dtype))."""
    pos = torch.tensor(t.indices)  # a copy: the tensor's arrays are read-only
    neg = torch.tensor(t.signs)
    dtype = None if into is None else td.torch_dtype(into)
    got = td.ternary_dense(pos, neg, dense_values(t.scale, t.dtype), t.dtype, t.shape, dtype)
    want = t.to_torch() if dtype is None else t.to_torch().to(dtype)
    assert got.dtype == want.dtype
    assert tuple(got.shape) == t.shape
    assert _bytes(got) == _bytes(want)


@given(st_dense_arrays())
def test_dense_block_matches_numpy(value):
    _, storage, name = value
    ctx = BlockContext("t", storage.size, 0, name, storage.shape)
    _, payload = DenseCodec().encode(storage, ctx)
    got = td.dense_block(memoryview(payload), 0, ctx, "cpu")
    assert got.dtype == td.torch_dtype(name)
    assert tuple(got.shape) == storage.shape
    assert _bytes(got) == storage.tobytes()


def test_dense_block_checks_like_numpy():
    ctx = BlockContext("t", 2, 0, "BOOL", (2,))
    _same(lambda: DenseCodec().decode(memoryview(b"\x00\x02"), 0, ctx),
          lambda: td.dense_block(memoryview(b"\x00\x02"), 0, ctx, "cpu"))
    ctx = BlockContext("t", 3, 0, "F32", (3,))
    _same(lambda: DenseCodec().decode(memoryview(b"\x00" * 8), 0, ctx),
          lambda: td.dense_block(memoryview(b"\x00" * 8), 0, ctx, "cpu"))


def test_a_big_tensor_in_both_codecs():
    """Sizes the hypothesis draws never reach: millions of elements, both codecs."""
    rng = np.random.default_rng(5)
    numel = 2**20 + 5
    for p in (0.001, 0.05, 0.4):
        idx = np.flatnonzero(rng.random(numel) < p)
        t = TernaryTensor((numel,), idx, rng.random(idx.size) < 0.5, 0.25)
        for codec in (GolombCodec(), BitmaskCodec()):
            param, payload = codec.encode(idx, _ctx(t))
            got = td.positions(codec.block_type, memoryview(payload), param, _ctx(t), "cpu")
            assert torch.equal(got, torch.from_numpy(idx)), (p, codec)
    assert math.prod(t.shape) == numel


def test_host_to_device_copies():
    buf = memoryview(b"\x01\x02\x03")
    t = td.host_to_device(buf, "cpu")
    t[0] = 9
    assert bytes(buf) == b"\x01\x02\x03"
    assert t.tolist() == [9, 2, 3]


# ---------------------------------------------------------------------------------------------
# the reader's device path: load_file / get / get_raw with device=, forced through torch
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def forced(monkeypatch):
    """Decode "cpu" with the torch decoders, as a GPU would."""
    monkeypatch.setattr(td, "FORCE_TORCH", True)


def _tensor_dicts():
    from strategies import st_options, st_tensor_dicts

    return st.tuples(st_tensor_dicts(max_size=4), st_options())


@given(_tensor_dicts())
def test_load_file_on_a_device_is_the_cpu_decoding(tmp_path_factory, case):
    tensors, options = case
    path = tmp_path_factory.mktemp("dev") / "t.compeft"
    cf.save_file(tensors, path, **options)
    want = cf.load_file(path, framework="torch")
    with mock.patch.object(td, "FORCE_TORCH", True):
        got = cf.load_file(path, framework="torch", device="cpu")
        with cf.open_file(path) as f:
            one = {n: f.get(n, device="cpu") for n in f}
            raw = {n: f.get_raw(n, device="cpu") for n in f}
    assert list(got) == list(want)
    for n, w in want.items():
        for g in (got[n], one[n], td.dense(raw[n])):
            assert g.dtype == w.dtype
            assert tuple(g.shape) == tuple(w.shape)
            assert _bytes(g) == _bytes(w), n
        if isinstance(tensors[n], TernaryTensor):
            assert torch.equal(raw[n].positions, torch.tensor(tensors[n].indices))
            assert torch.equal(raw[n].negative, torch.tensor(tensors[n].signs))


def test_the_cpu_takes_numpy_unless_forced(tmp_path, forced):
    t = TernaryTensor((5,), [1, 4], [False, True], 0.5, "BF16")
    cf.save_file({"t": t}, tmp_path / "t.compeft")
    with cf.open_file(tmp_path / "t.compeft") as f, mock.patch.object(
            td, "positions", side_effect=AssertionError("torch path")):
        with pytest.raises(AssertionError, match="torch path"):
            f.get("t", device="cpu")
        td.FORCE_TORCH = False
        assert f.get("t", device="cpu").tolist() == [0.0, 0.5, 0.0, 0.0, -0.5]


def test_a_damaged_record_fails_on_the_device_as_on_the_cpu(forced):
    """The device path checks the record's checksum before it copies anything."""
    idx = np.arange(0, 4000, 7)
    t = TernaryTensor((4000,), idx, np.zeros(idx.size, bool), 1.0)
    data = bytearray(cf.dumps({"t": t}, positions="golomb", zstd_level=None))
    with cf.open_file(bytes(data)) as f:
        block = f.info("t").blocks[0]
    data[block.offset + block.stored_size - 1] ^= 0x40
    errors = []
    for forced_torch in (False, True):
        td.FORCE_TORCH = forced_torch
        with pytest.raises(cf.CompeftError) as exc:
            cf.loads(bytes(data), framework="torch", device="cpu")
        errors.append((type(exc.value).__name__, str(exc.value)))
    assert errors[0] == errors[1]
    assert errors[0][0] == "ChecksumError"
