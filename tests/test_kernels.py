"""The optional compiled kernels (compeft_format.kernels): the same output bytes as the numpy
path in every case, forced either way; and a failing or missing numba never breaks a
compression (it falls back to numpy and says so once, at debug level)."""

from __future__ import annotations

import doctest
import logging
import sys

import numpy as np
import pytest

import compeft_format
from compeft_format import kernels
from compeft_format import selection as selmod
from compeft_format.compress import SCALES, SCOPES, compress, iter_compress
from compeft_format.errors import EncodeError

numba = pytest.importorskip("numba", reason="numba (the 'fast' extra) is not installed")


@pytest.fixture
def fresh(monkeypatch):
    """The kernels module as in a new process (nothing loaded, nothing failed yet)."""
    monkeypatch.setattr(kernels, "_kernels", None)
    monkeypatch.setattr(kernels, "_failed", None)
    monkeypatch.setattr(kernels, "_said", False)


def task_vector(seed: int = 5) -> dict[str, np.ndarray]:
    """Several chunks of tied float32 values, a float64 vector, a matrix, zeros."""
    rng = np.random.default_rng(seed)
    big = np.round(rng.standard_normal(2 * (1 << 20) + 123), 1).astype(np.float32)  # ties
    big[::7] = 0.0
    big[1::11] = -0.0
    mat = rng.standard_normal((150, 200)).astype(np.float32)
    return {"big": big, "mat": mat, "vec": rng.standard_normal(5000),  # float64
            "zero": np.zeros(77, np.float32), "tiny": np.array([0.5, -0.25], np.float32)}


def run(monkeypatch, path: str, threads: int, fn=compress, **options):
    monkeypatch.setenv(kernels.KERNELS_ENV, path)
    monkeypatch.setenv("COMPEFT_THREADS", str(threads))
    out = dict(fn(**options))
    if path == "numba":
        assert kernels.status() == "numba"
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name], b[name]
        if isinstance(x, np.ndarray):
            assert np.array_equal(x, y), name
            continue
        assert x == y, name
        assert np.float64(x.scale).tobytes() == np.float64(y.scale).tobytes(), name
        assert x.indices.dtype == y.indices.dtype
        assert x.signs.dtype == y.signs.dtype


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("scale", SCALES)
def test_same_bytes_every_scale_and_scope(monkeypatch, scale, scope):
    tv = task_vector()
    metric = scale in ("gram", "kron")  # slower rules: one density
    for density in (0.137,) if metric else (0.01, 0.137):
        options = {"tensors": tv, "density": density, "scale": scale, "scope": scope}
        want = run(monkeypatch, "numpy", 2, **options)
        got = run(monkeypatch, "numba", 2, **options)
        assert_same(got, want)
        assert sum(t.nnz for t in got.values()) > 0


@pytest.mark.parametrize("density", [0.001, 0.05, 0.6, 1.0])
def test_same_bytes_one_and_two_threads_and_streamed(monkeypatch, density):
    tv = task_vector(7)
    tv["mixed"] = np.random.default_rng(3).standard_normal(300_000).astype(np.float32)
    options = {"tensors": tv, "density": density, "exclude": "tiny"}
    want = run(monkeypatch, "numpy", 1, **options)
    for threads in (1, 2):
        assert_same(run(monkeypatch, "numba", threads, **options), want)
        # iter_compress collects the band only (its own kernel), then gathers
        streamed = run(monkeypatch, "numba", threads, fn=iter_compress, **options)
        assert_same(streamed, want)


@pytest.mark.parametrize(
    "edges",
    [
        lambda s, n, k, w: (w.type(100.0), w.type(np.inf)),  # band above the threshold
        lambda s, n, k, w: (w.type(-1), w.type(1e-6)),  # everything a candidate
        lambda s, n, k, w: (w.type(0.5), w.type(0.5000001)),  # thin band beside it
        lambda s, n, k, w: (w.type(0.0), w.type(0.05)),  # every nonzero a candidate
        lambda s, n, k, w: (w.type(0.3), w.type(0.2)),  # an empty band (hi below lo)
    ],
)
def test_same_bytes_with_unlucky_samples(monkeypatch, edges):
    monkeypatch.setattr(selmod, "band_edges", edges)
    rng = np.random.default_rng(12)
    tv = {"m": np.round(rng.standard_normal((1100, 1000)), 1).astype(np.float32),
          "v": rng.standard_normal(5000)}
    tv["v"][::9] = 0.0
    for density, scale in ((0.001, "norm"), (0.137, "proj_vcap"), (1.0, "proj_vcap")):
        options = {"tensors": tv, "density": density, "scale": scale}
        want = run(monkeypatch, "numpy", 2, **options)
        assert_same(run(monkeypatch, "numba", 2, **options), want)
        assert_same(run(monkeypatch, "numba", 2, fn=iter_compress, **options), want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 130, 5000])
@pytest.mark.parametrize("lo_hi", [(-1.0, 0.3), (0.0, 0.5), (0.25, 0.75), (0.25, np.inf),
                                   (0.5, 0.25)])
def test_kernels_match_the_numpy_chunk_code(size, dtype, lo_hi):
    # the block-of-64 masks, their tails, -0.0 and +0.0, values exactly at the edges
    rng = np.random.default_rng(size)
    c = np.round(rng.standard_normal(size), 2).astype(dtype)
    c[::5] = 0.0
    c[1::13] = -0.0
    c[2::17] = lo_hi[0]
    c[3::19] = -lo_hi[1] if np.isfinite(lo_hi[1]) else 1.0
    lo_open, hi = dtype(lo_hi[0]), dtype(lo_hi[1])
    kern = kernels.load()
    assert kern is not None
    assert kern.fits(c)
    numpy_side = selmod.Candidates(lo_open, hi, 1 << 30, positions=True, limit=1 << 30)
    (pos, mag, neg), above, band = numpy_side.chunk(c, 1000)
    (kpos, kmag, kneg), kabove, kband = kern.candidates(c, lo_open, hi, 1000)
    for a, b in ((pos, kpos), (mag, kmag), (neg, kneg), (band, kband)):
        assert a.dtype == b.dtype
        assert a.tobytes() == b.tobytes()
    assert above == kabove
    banded = selmod.Band(lo_open, hi, 1 << 30).chunk(np.abs(c))
    kbanded = kern.band(c, lo_open, hi)
    assert banded[0] == kbanded[0]
    assert banded[1].tobytes() == kbanded[1].tobytes()
    # picking at a threshold with a tie quota
    if mag.size:
        t = np.sort(mag)[mag.size // 2]
        greater, equal = kern.count_at(mag, t)
        assert (greater, equal) == (int((mag > t).sum()), int((mag == t).sum()))
        ties = equal // 2
        keep = (mag > t) | ((mag == t) & (np.cumsum(mag == t) <= ties))
        idx = np.empty(greater + ties, np.int64)
        signs = np.empty(greater + ties, bool)
        kept = kern.fill_kept(pos, mag, neg, t, ties, idx, signs)
        assert np.array_equal(idx, pos[keep])
        assert np.array_equal(signs, neg[keep])
        assert kept.tobytes() == mag[keep].tobytes()
    # iter_compress's output pass: the kept entries of a chunk at a threshold t > 0
    mags = np.abs(c)
    nonzero = np.sort(mags[mags > 0])
    if nonzero.size:
        t = nonzero[nonzero.size // 2]
        equal = int((mags == t).sum())
        for ties, find_ties in ((0, False), (0, True), (equal // 2, True), (equal, True)):
            keep = (mags > t) | ((mags == t) & (np.cumsum(mags == t) <= ties))
            loc, neg, kept, took, seen = kern.gather(c, t, ties, find_ties)
            assert np.array_equal(loc, np.flatnonzero(keep))
            assert np.array_equal(neg, np.signbit(c[keep]))
            assert kept.tobytes() == mags[keep].tobytes()
            assert took == ties
            if find_ties or ties:
                assert seen == (equal > 0)


def test_compiled_sum_of_squares_is_einsums_bit_for_bit():
    # the sum of squares of a float32 chunk, in einsum's order of additions (checked when
    # the kernels load; here on other arrays: any other order changes the last bits of
    # most of these sums)
    kern = kernels.load()
    assert kern is not None
    assert kern.sums_like_einsum
    rng = np.random.default_rng(99)
    differ = 0
    for i in range(60):
        size = int(rng.integers(1, 1 << 20)) if i % 3 else int(rng.integers(1, 70_000))
        c = rng.standard_normal(size).astype(np.float32)
        if i % 2:
            c *= np.exp2(rng.integers(-60, 60, size)).astype(np.float32)
        want = float(np.einsum("i,i->", c, c, dtype=np.float64))
        assert kern.sumsq(c) == want, size
        differ += float(np.sum(c.astype(np.float64) ** 2)) != want
    assert differ > 10  # the test can fail: numpy's own pairwise sum rounds otherwise
    assert kern.sumsq(c.astype(np.float64)) is None  # float64: einsum runs
    assert kern.sumsq(c[::2]) is None
    assert np.isnan(kern.sumsq(np.array([1.0, np.nan], np.float32)))


def test_a_sum_that_does_not_round_like_einsum_is_not_used(monkeypatch):
    kern = kernels.load()
    assert kern is not None
    tv = task_vector()
    monkeypatch.setenv(kernels.KERNELS_ENV, "numba")
    want = compress(tv, density=0.05)
    monkeypatch.setattr(kern._mod, "sumsq", lambda c: float(np.sum(c.astype(np.float64) ** 2)))
    assert not kern._check_sumsq()  # another order: found out
    monkeypatch.setattr(kern, "sums_like_einsum", False)
    assert kern.sumsq(tv["big"]) is None
    assert_same(compress(tv, density=0.05), want)


def test_chunks_the_kernels_do_not_take_go_the_numpy_way():
    kern = kernels.load()
    assert kern is not None
    c = np.arange(10, dtype=np.float32)
    assert kern.fits(c)
    assert not kern.fits(c[::2])  # strided
    assert not kern.fits(c.astype(">f4"))  # byte-swapped
    assert not kern.fits(c.astype(np.float16))
    raw = np.zeros(41, np.uint8)
    assert not kern.fits(raw[1:].view(np.float32))  # unaligned
    # a compression over such values still matches
    big = np.random.default_rng(0).standard_normal(300_001).astype(">f4")
    assert_same(compress({"b": big}, density=0.1),
                compress({"b": big.astype(np.float32)}, density=0.1))


def test_auto_mode_loads_numba_only_for_big_work(monkeypatch, fresh):
    monkeypatch.delenv(kernels.KERNELS_ENV, raising=False)
    assert kernels.mode() == "auto"
    assert kernels.for_size(kernels.AUTO_MIN - 1) is None
    assert kernels.for_size(kernels.AUTO_MIN_STREAM - 1, streaming=True) is None
    assert kernels.AUTO_MIN_STREAM < kernels.AUTO_MIN
    assert kernels.status() == "numpy"  # not tried
    assert kernels.for_size(kernels.AUTO_MIN_STREAM, streaming=True) is not None
    assert kernels.for_size(10) is not None  # once loaded, for any size
    monkeypatch.setenv(kernels.KERNELS_ENV, "numpy")
    assert kernels.for_size(kernels.AUTO_MIN) is None
    monkeypatch.setenv(kernels.KERNELS_ENV, "NUMBA")
    assert kernels.for_size(1) is not None
    monkeypatch.setenv(kernels.KERNELS_ENV, "fast")
    with pytest.raises(EncodeError, match="COMPEFT_KERNELS must be one of"):
        compress({"x": np.ones(3)}, density=0.5)


def test_without_numba_the_numpy_path_runs_and_says_so_once(monkeypatch, fresh, caplog):
    # the import fails, as without numba (also once the package holds the module)
    monkeypatch.setitem(sys.modules, "compeft_format._kernels_numba", None)
    monkeypatch.delattr(compeft_format, "_kernels_numba", raising=False)
    monkeypatch.setenv(kernels.KERNELS_ENV, "numba")
    tv = task_vector()
    caplog.set_level(logging.DEBUG, logger="compeft_format.kernels")
    got = compress(tv, density=0.05)
    again = compress(tv, density=0.05)
    assert kernels.status().startswith("numpy (numba not importable")
    said = [r for r in caplog.records if r.name == "compeft_format.kernels"]
    assert len(said) == 1
    assert said[0].levelno == logging.DEBUG
    assert "numpy path" in said[0].getMessage()
    monkeypatch.setenv(kernels.KERNELS_ENV, "numpy")
    assert_same(got, compress(tv, density=0.05))
    assert_same(again, got)


def test_a_compile_error_falls_back(monkeypatch, fresh):
    from compeft_format import _kernels_numba

    def broken(cache):
        raise numba.core.errors.TypingError("made up")

    monkeypatch.setattr(_kernels_numba, "build", broken)
    monkeypatch.setenv(kernels.KERNELS_ENV, "numba")
    tv = {"w": np.random.default_rng(1).standard_normal(200_000).astype(np.float32)}
    got = compress(tv, density=0.1)
    assert kernels.status().startswith("numpy (numba compile failed")
    monkeypatch.setenv(kernels.KERNELS_ENV, "numpy")
    assert_same(got, compress(tv, density=0.1))


def test_kernels_that_fail_at_run_time_fall_back(monkeypatch, fresh):
    from types import SimpleNamespace

    from compeft_format import _kernels_numba

    def crashing(c):
        raise ZeroDivisionError("made up")

    monkeypatch.setattr(_kernels_numba, "build", lambda cache: SimpleNamespace(sumsq=crashing))
    monkeypatch.setenv(kernels.KERNELS_ENV, "numba")
    assert kernels.load() is None
    assert kernels.status().startswith("numpy (numba kernels failed their check")
    x = np.random.default_rng(2).standard_normal(50_000)
    assert compress({"x": x}, density=0.1)["x"].nnz == 5000


def test_no_writable_cache_directory(monkeypatch, fresh):
    # numba raises RuntimeError ("cannot cache function ...: no locator available") when
    # neither $NUMBA_CACHE_DIR, the package's __pycache__ nor the user's cache is writable:
    # auto mode then stays on numpy (a compile costs seconds in every process); numba mode
    # compiles in the process
    from compeft_format import _kernels_numba

    cached = _kernels_numba.build(cache=True)
    calls = []

    def no_locator(cache):
        calls.append(cache)
        if cache:
            raise RuntimeError("cannot cache function 'candidates': no locator available")
        return cached

    monkeypatch.setattr(_kernels_numba, "build", no_locator)
    monkeypatch.delenv(kernels.KERNELS_ENV, raising=False)
    assert kernels.for_size(kernels.AUTO_MIN) is None
    assert kernels.status() == "numpy"  # may still be tried, in numba mode
    monkeypatch.setenv(kernels.KERNELS_ENV, "numba")
    assert kernels.for_size(10) is not None
    assert calls == [True, True, False]
    assert kernels.status() == "numba"


def test_doctests():
    result = doctest.testmod(kernels, optionflags=doctest.ELLIPSIS)
    assert result.attempted
    assert not result.failed
