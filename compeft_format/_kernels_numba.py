"""The numba code behind :mod:`compeft_format.kernels` (imported only by its :func:`load`).

:func:`build` compiles every function for float32 and float64 before its first call (with
``cache=True`` the machine code is kept on disk, so a later process loads it instead of
compiling); each releases the GIL, so :func:`~compeft_format.selection.ordered_map` runs
chunks on all cores. Inputs are typed read-only (a writable array is accepted too: a file
mapped read-only is not copied); outputs are caller-owned buffers large enough for a chunk.

Each loop computes exactly what the numpy code of :mod:`compeft_format.selection` and
:mod:`compeft_format.compress` computes (no float arithmetic but ``abs`` and comparisons;
sums stay in numpy), so either path gives the same bytes.
"""

from __future__ import annotations

from types import SimpleNamespace

import numba as nb
import numpy as np
from numba import types
from numba.cpython.unsafe.numbers import trailing_zeros

_OPTS = {"nogil": True, "boundscheck": False, "error_model": "numpy"}
_PAIRS = ((types.float32, types.uint32), (types.float64, types.uint64))


def _ro(dtype: types.Type) -> types.Array:
    return types.Array(dtype, 1, "C", readonly=True)


def _rw(dtype: types.Type) -> types.Array:
    return types.Array(dtype, 1, "C")


_I64 = types.int64
_CAND_SIGS = [types.UniTuple(_I64, 3)(_ro(f), _ro(u), u, u, f, _I64, _rw(_I64), _rw(f),
                                        _rw(types.boolean), _rw(f)) for f, u in _PAIRS]
_BAND_SIGS = [types.UniTuple(_I64, 2)(_ro(f), _ro(u), u, u, u, f, _rw(f)) for f, u in _PAIRS]
_COUNT_SIGS = [types.UniTuple(_I64, 2)(_ro(f), f) for f, _ in _PAIRS]
_GATHER_SIGS = [types.Tuple((_I64, _I64, types.boolean))(
    _ro(f), _ro(u), u, u, f, _I64, _rw(_I64), _rw(types.boolean), _rw(f)) for f, u in _PAIRS]
_SUMSQ_SIGS = [types.float64(_ro(types.float32))]
_FILL_SIGS = [_I64(_ro(_I64), _ro(f), _ro(types.boolean), f, _I64, _rw(_I64),
                   _rw(types.boolean), _rw(f)) for f, _ in _PAIRS]


@nb.njit(inline="always")
def _mask64(u, base, stop, absmask, least):  # pragma: no cover
    """Bit ``j`` set where ``|entry base + j| >= least`` (as bit patterns), for the block
    ``base:stop`` (at most 64 entries). A full block takes the constant-length loop, which
    LLVM vectorises; inlined into each kernel, so it adds no call."""
    m = np.uint64(0)
    if stop - base == 64:
        for j in range(64):
            m |= np.uint64((u[base + j] & absmask) >= least) << np.uint64(j)
    else:
        for j in range(stop - base):
            m |= np.uint64((u[base + j] & absmask) >= least) << np.uint64(j)
    return m


def candidates(c, u, absmask, first, hi, start, pos, mag, neg, band):  # pragma: no cover
    """Entries with ``|c| >= first`` (as bit patterns: ``|c| > lo_open``): flat position
    ``start + i``, ``|c|`` and sign bit into ``pos``, ``mag``, ``neg``; those ``<= hi`` also
    into ``band``. Returns ``(candidates, count above hi, band size)``."""
    n = c.shape[0]
    full = n - n % 64
    k = 0
    above = 0
    nband = 0
    for base in range(0, full + 64, 64):
        # a 64-bit mask of the block's candidates (vectorised), then its set bits in order
        stop = min(base + 64, n)
        m = _mask64(u, base, stop, absmask, first)
        while m:
            i = base + np.int64(trailing_zeros(m))
            m &= m - np.uint64(1)
            a = abs(c[i])
            pos[k] = start + i
            mag[k] = a
            neg[k] = (u[i] & absmask) != u[i]
            k += 1
            band[nband] = a
            nband += a <= hi
            above += a > hi
    return k, above, nband


def band_only(c, u, absmask, first, visit, hi, band):  # pragma: no cover
    """:func:`candidates` without the positions, over every entry: ``(count of |c| > hi,
    band size)``; ``visit = min(first, the pattern just above hi)``."""
    n = c.shape[0]
    full = n - n % 64
    above = 0
    nband = 0
    for base in range(0, full + 64, 64):
        stop = min(base + 64, n)
        m = _mask64(u, base, stop, absmask, visit)
        while m:
            i = base + np.int64(trailing_zeros(m))
            m &= m - np.uint64(1)
            a = abs(c[i])
            band[nband] = a
            nband += (a <= hi) & ((u[i] & absmask) >= first)
            above += a > hi
    return above, nband


def count_at(m, t):  # pragma: no cover
    """``(count of m > t, count of m == t)``."""
    greater = 0
    equal = 0
    for i in range(m.shape[0]):
        greater += m[i] > t
        equal += m[i] == t
    return greater, equal


def fill_kept(pos, m, neg, t, ties, idx, signs, kept):  # pragma: no cover
    """Keep the entries with ``m > t`` and the first ``ties`` with ``m == t``, in order:
    positions into ``idx``, signs into ``signs``, magnitudes into ``kept``; returns how many."""
    j = 0
    for i in range(m.shape[0]):
        a = m[i]
        take = a > t
        if a == t and ties > 0:
            ties -= 1
            take = True
        if take:
            idx[j] = pos[i]
            signs[j] = neg[i]
            kept[j] = a
            j += 1
    return j


def gather(c, u, absmask, visit, t, ties, loc, neg, kept):  # pragma: no cover
    """The kept entries of a chunk at threshold ``t`` (``|c| > t``, and the first ``ties``
    with ``|c| == t``), in order: chunk positions into ``loc``, sign bits into ``neg``,
    magnitudes into ``kept``. ``visit`` is the pattern of the smallest magnitude to look at
    (``t``'s, or the next one up where ties do not matter). Returns ``(count, ties taken,
    whether a magnitude equal to t was seen)``."""
    n = c.shape[0]
    full = n - n % 64
    j = 0
    took = 0
    seen = False
    for base in range(0, full + 64, 64):
        stop = min(base + 64, n)
        m = _mask64(u, base, stop, absmask, visit)
        while m:
            i = base + np.int64(trailing_zeros(m))
            m &= m - np.uint64(1)
            a = abs(c[i])
            take = a > t
            if a == t:
                seen = True
                if took < ties:
                    took += 1
                    take = True
            if take:
                loc[j] = i
                neg[j] = (u[i] & absmask) != u[i]
                kept[j] = a
                j += 1
    return j, took, seen


#: einsum's buffers (numpy's nditer buffer size): each is summed on its own, then added up
EINSUM_BUFFER = 8192


@nb.njit(inline="always", **_OPTS)  # part of sumsq's code (and of its cache entry)
def _sumsq_block(c, b0, b1):  # pragma: no cover
    """One buffer as numpy 2.x's baseline einsum sums it: two float64 lanes, four 2-lane
    vectors a step (the last of them added first), then the rest, then the two lanes."""
    a0 = 0.0
    a1 = 0.0
    i = b0
    while b1 - i >= 8:
        for u in range(3, -1, -1):
            v0 = np.float64(c[i + 2 * u])
            v1 = np.float64(c[i + 2 * u + 1])
            a0 = v0 * v0 + a0
            a1 = v1 * v1 + a1
        i += 8
    while i < b1:
        v0 = np.float64(c[i])
        a0 = v0 * v0 + a0
        if i + 1 < b1:
            v1 = np.float64(c[i + 1])
            a1 = v1 * v1 + a1
        i += 2
    return a0 + a1


def sumsq(c):  # pragma: no cover
    """``einsum("i,i->", c, c, dtype=float64)`` of a float32 chunk, in einsum's order
    (:func:`compeft_format.kernels.load` checks that it is, on this numpy and CPU, before
    using it). Four buffers are summed side by side (eight independent chains instead of
    two: the additions' latency, not their order, is what limits a single buffer); their
    sums are added up in order."""
    n = c.shape[0]
    bs = EINSUM_BUFFER
    nfull = n // bs
    total = 0.0
    b = 0
    while b + 4 <= nfull:
        # scalars, not an array: the eight chains stay in registers
        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
        p0 = b * bs
        p1 = p0 + bs
        p2 = p1 + bs
        p3 = p2 + bs
        for i in range(0, bs, 8):
            for u in range(3, -1, -1):
                j = i + 2 * u
                v = np.float64(c[p0 + j])
                s0 = v * v + s0
                v = np.float64(c[p0 + j + 1])
                s1 = v * v + s1
                v = np.float64(c[p1 + j])
                s2 = v * v + s2
                v = np.float64(c[p1 + j + 1])
                s3 = v * v + s3
                v = np.float64(c[p2 + j])
                s4 = v * v + s4
                v = np.float64(c[p2 + j + 1])
                s5 = v * v + s5
                v = np.float64(c[p3 + j])
                s6 = v * v + s6
                v = np.float64(c[p3 + j + 1])
                s7 = v * v + s7
        total = total + (s0 + s1)
        total = total + (s2 + s3)
        total = total + (s4 + s5)
        total = total + (s6 + s7)
        b += 4
    for b0 in range(b * bs, n, bs):
        total = total + _sumsq_block(c, b0, min(n, b0 + bs))
    return total


def build(cache: bool) -> SimpleNamespace:
    """The kernels compiled (or, with ``cache``, loaded from numba's on-disk cache).

    Raises RuntimeError where ``cache`` is set and numba finds no writable cache directory.
    """
    def jit(sigs: list, fn: object) -> object:
        return nb.njit(sigs, cache=cache, **_OPTS)(fn)

    return SimpleNamespace(
        candidates=jit(_CAND_SIGS, candidates),
        band_only=jit(_BAND_SIGS, band_only),
        count_at=jit(_COUNT_SIGS, count_at),
        fill_kept=jit(_FILL_SIGS, fill_kept),
        gather=jit(_GATHER_SIGS, gather),
        sumsq=jit(_SUMSQ_SIGS, sumsq),
    )
