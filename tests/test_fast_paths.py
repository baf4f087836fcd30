"""The fast paths' machinery: fresh outputs faulted in ahead of the writer (``_alloc``), dense
decoding straight from the blocks, and the encoder's worker thread, on every branch.

The real sizes (64 MiB outputs, 2 MiB huge pages) are shrunk so that every branch runs on
small tensors; the results must not change.
"""

from __future__ import annotations

import numpy as np
import pytest

import compeft_format as cf
from compeft_format import _alloc, encode
from compeft_format.codecs import ZSTD, _bits

HUGE_ELEMENTS = _alloc._HUGE // 4  # float32 elements per huge page


def _tensor(numel: int, p: float, seed: int, dtype: str = "F32") -> cf.TernaryTensor:
    rng = np.random.default_rng(seed)
    k = round(p * numel)
    return cf.TernaryTensor((numel,), np.sort(rng.choice(numel, k, replace=False)),
                            rng.random(k) < 0.5, 0.25, dtype)


@pytest.fixture
def small_outputs(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Every output goes through Prefault; blocks of a few pages."""
    monkeypatch.setattr(_alloc, "_MIN_BYTES", 0)
    monkeypatch.setattr(_alloc, "_BLOCK", 3 * _alloc._PAGE)
    return monkeypatch


@pytest.mark.parametrize("case", ["warm huge pages", "cold huge pages", "no huge pages",
                                  "populate fails", "no madvise"])
@pytest.mark.parametrize("p", [0.0, 0.001, 0.05, 0.5, 1.0])
def test_dense_decoding_through_every_prefault_branch(small_outputs: pytest.MonkeyPatch,
                                                      case: str, p: float) -> None:
    if case == "cold huge pages":
        small_outputs.setattr(_alloc, "_COLD_SECONDS", -1.0)  # every huge page is cold
    elif case == "no huge pages":
        small_outputs.setattr(_alloc, "_THP", False)
    elif case == "populate fails":
        small_outputs.setattr(_alloc, "_THP", False)
        small_outputs.setattr(_alloc, "_madvise", lambda addr, n, advice: -1)
    elif case == "no madvise":
        small_outputs.setattr(_alloc, "_madvise", None)
    else:
        small_outputs.setattr(_alloc, "_COLD_SECONDS", 1e9)
    numel = 3 * HUGE_ELEMENTS + 12345  # several huge pages (of float32, and of int64 indices
    # at p = 1), an unaligned end
    t = _tensor(numel, p, seed=int(p * 1000))
    want = t.to_numpy()
    data = cf.dumps({"t": t})
    got = cf.loads(data, dense=True)["t"]
    assert got.dtype == want.dtype
    assert np.array_equal(got, want)
    assert np.array_equal(np.signbit(got), np.signbit(want))
    assert cf.TernaryTensor.from_dense(got) == t if t.nnz else not got.any()
    assert cf.loads(data)["t"] == t  # the index array goes through the prefault too
    assert cf.loads(cf.dumps({"t": t}, positions="bitmask"))["t"] == t
    torch = pytest.importorskip("torch")
    assert torch.equal(cf.loads(data, framework="torch")["t"], t.to_torch())


def test_prefault_never_overwrites_what_the_writer_wrote(small_outputs: pytest.MonkeyPatch,
                                                         ) -> None:
    small_outputs.setattr(_alloc, "_COLD_SECONDS", -1.0)
    flat, prefault = _alloc.fresh_zeros(4 * HUGE_ELEMENTS, np.dtype(np.float32))
    assert prefault is not None
    stride = _alloc._PAGE // 4
    for i in range(0, flat.size, stride):  # write exactly where the helper writes its zeros
        prefault.ready(i)
        flat[i] = 1.0
    prefault.close()
    assert np.count_nonzero(flat) == len(range(0, flat.size, stride))


def test_small_outputs_skip_the_machinery() -> None:
    flat, prefault = _alloc.fresh_zeros(1000, np.dtype(np.float64))
    assert prefault is None
    assert flat.dtype == np.float64
    assert not flat.any()


def test_dense_into_out_and_errors(tmp_path) -> None:
    t = _tensor(5000, 0.1, seed=3, dtype="BF16")
    path = tmp_path / "x.compeft"
    cf.save_file({"b": np.arange(6, dtype=np.int16), "t": t}, path)
    with cf.open_file(path) as f:
        out = np.full((5000,), 7.0, dtype=np.float32)
        assert f.get("t", dense=True, out=out) is out
        assert np.array_equal(out, t.to_numpy())
        b = np.empty(6, dtype=np.int16)
        assert f.get("b", dense=True, out=b) is b
        assert b.tolist() == list(range(6))
        with pytest.raises(ValueError, match="out must hold"):
            f.get("t", dense=True, out=np.empty(5000, np.float64))
        with pytest.raises(ValueError, match="needs dense=True"):
            f.get("t", out=out)
        with pytest.raises(ValueError, match="C-contiguous"):
            f.get("t", dense=True, out=np.empty(10000, np.float32)[::2])
    assert np.array_equal(cf.load_file(path, dense=True)["t"], t.to_numpy())
    with open(path, "rb") as f:
        streamed = dict(cf.iter_stream(f, dense=True))
    assert np.array_equal(streamed["t"], t.to_numpy())


def test_to_numpy_out_is_zeroed_first() -> None:
    t = _tensor(300, 0.2, seed=4)
    out = np.full((300,), 9.0, dtype=np.float32)
    assert t.to_numpy(out=out) is out
    assert np.array_equal(out, t.to_numpy())


def test_encoder_worker_thread_gives_the_same_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    t = _tensor(200_000, 0.3, seed=5)
    inline = {p: cf.dumps({"t": t}, positions=p) for p in ("auto", "bitmask", "golomb")}
    # a stored frame made by the worker below
    assert cf.inspect(inline["bitmask"]).tensors[0].codecs == "bitmask+zstd,signs,scale"
    calls = []
    encode_later = ZSTD.encode_later
    monkeypatch.setattr(ZSTD, "encode_later", lambda *a: calls.append(1) or encode_later(*a))
    monkeypatch.setattr(encode, "BACKGROUND_MIN", 1)  # every zstd stage on the worker
    for p, data in inline.items():
        assert cf.dumps({"t": t}, positions=p) == data, p
    assert len(calls) == 3  # the worker compressed one candidate in each


def test_concat_bits_and_bit_writer_match_bools() -> None:
    rng = np.random.default_rng(6)
    pieces = [rng.random(int(rng.integers(0, 40))) < 0.5 for _ in range(30)]
    packed = _bits.concat_bits(
        (np.packbits(b, bitorder="little"), b.size) for b in pieces)
    assert packed == np.packbits(np.concatenate(pieces), bitorder="little").tobytes()
    w = _bits.BitWriter(sum(b.size for b in pieces) + 100)
    ones_pieces = []
    for b in pieces:
        if rng.random() < 0.5:
            w.write(b)
            ones_pieces.append(b)
        else:  # the same bits, given as the offsets of their ones
            w.write_ones(np.flatnonzero(b) + w.pending, b.size)
            ones_pieces.append(b)
    buf, nbits = w.packed()
    assert nbits == sum(b.size for b in ones_pieces)
    assert buf.tobytes() == np.packbits(np.concatenate(ones_pieces), bitorder="little").tobytes()


def test_a_failed_decode_stops_the_prefault(small_outputs: pytest.MonkeyPatch) -> None:
    import threading

    from compeft_format.codecs import BlockContext, GolombCodec, golomb

    small_outputs.setattr(_alloc, "_COLD_SECONDS", -1.0)
    small_outputs.setattr(golomb, "_DECODE_CHUNK", 1)  # the error comes in the last chunk
    t = _tensor(HUGE_ELEMENTS, 0.3, seed=7)
    ctx = BlockContext("t", t.numel, t.nnz, "F32", t.shape)
    m, payload = GolombCodec().encode(t.indices, ctx)
    short = BlockContext("t", int(t.indices[-1]), t.nnz, "F32", t.shape)  # last one is out
    with pytest.raises(cf.CorruptDataError, match="positions run to"):
        GolombCodec().decode(memoryview(payload), m, short)
    assert not [th for th in threading.enumerate() if th.name == "compeft-prefault"]


def test_worker_stores_small_payloads_raw_as_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A block under encode.ZSTD_MIN is stored raw whichever thread compresses it: with every
    zstd stage on the worker (BACKGROUND_MIN = 1) a 19-byte bitmask that zstd would shrink
    was stored as a frame, inline it is raw (found by test_chunk_boundaries_change_nothing)."""
    t = cf.TernaryTensor((152,), [0, 151], [False, True], 0.5)
    payload = bytes(19)
    assert len(ZSTD.encode(payload, 1)) < len(payload) < encode.ZSTD_MIN  # zstd would win
    inline = cf.dumps({"t": t}, positions="bitmask", zstd_level=1, alignment=1)
    assert cf.inspect(inline).tensors[0].codecs == "bitmask,signs,scale"
    monkeypatch.setattr(encode, "BACKGROUND_MIN", 1)
    assert cf.dumps({"t": t}, positions="bitmask", zstd_level=1, alignment=1) == inline
