"""Exact top-k of magnitudes, chunk by chunk, on all cores: the selection under :func:`compress`.

How the exact top-k is found fast (:func:`select_topk`)
------------------------------------------------------
1. A random sample of the magnitudes (fixed seed, one element in 256) estimates the
   threshold; a band ``(lo, hi]`` around it is wide enough that the true threshold falls
   inside with overwhelming probability (a few standard errors of the sample quantile).
2. One streaming pass counts the magnitudes above ``hi`` and collects those inside the band
   (typically well under 1% of the elements).
3. ``np.partition`` of the small band gives the exact k-th largest magnitude.
4. If the sample was unlucky (threshold outside the band, or a band too large because of
   massive ties), an exact radix select over the float bit patterns (16 bits per pass,
   bounded memory) takes over. The result never depends on the sample, only the speed does.

The chunk kernels (:class:`Band`, :class:`Candidates`) are what :mod:`compeft_format.compress`
runs in its statistics pass; the thread pool (:func:`ordered_map`) spreads a pass's chunks over
the cores, in order, so the result never depends on the number of threads.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from ._alloc import SCRATCH_RESERVE, scratch
from .errors import EncodeError
from .kernels import Kernels

__all__ = [
    "BAND_CAP_DIV",
    "BAND_CAP_MIN",
    "BAND_Z",
    "CHUNK",
    "SAMPLE_EVERY",
    "SAMPLE_SEED",
    "THREADS_ENV",
    "Band",
    "Candidates",
    "TopK",
    "band_cap",
    "band_edges",
    "band_scan",
    "compress_threads",
    "from_band",
    "ordered_map",
    "radix_select",
    "sample_of",
    "select",
    "select_topk",
    "topk_of",
]

# elements per chunk (1 << 20): cache-friendly, bounds every temporary to a few MiB
CHUNK = SCRATCH_RESERVE
SAMPLE_EVERY = 256  # one sampled magnitude per 256 elements (with replacement)
SAMPLE_SEED = 0x5EED_C0DE  # fixed: same input, same sample, same (deterministic) run time
BAND_Z = 6.0  # band half-width in standard errors of the sample quantile
BAND_CAP_MIN = 1 << 20  # the band may always hold this many values ...
BAND_CAP_DIV = 32  # ... or n / 32 of them (n / 8 bytes of float32)


# ---------------------------------------------------------------------------------------------
# all cores: chunks of a pass in a thread pool (numpy releases the GIL on 1M-element arrays)
# ---------------------------------------------------------------------------------------------
#: Environment variable: the threads a compression uses (default: the cores this process may
#: run on). 1 runs everything in the calling thread.
THREADS_ENV = "COMPEFT_THREADS"
_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def compress_threads() -> int:
    """The threads a compression uses: ``$COMPEFT_THREADS``, else the usable cores.

    Every pass over the data goes in chunks of 2^20 elements; the chunks of a tensor are
    worked on by this many threads at once and their results combined in order, so the
    output is the same for any number of threads.

    >>> compress_threads() >= 1
    True
    """
    env = os.environ.get(THREADS_ENV, "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise EncodeError(f"{THREADS_ENV} must be a positive integer, got {env!r}") from None
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or threads != _POOL_SIZE:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL = concurrent.futures.ThreadPoolExecutor(threads, "compeft-compress")
            _POOL_SIZE = threads
        return _POOL


def ordered_map(fn: Callable[[int], Any], items: Sequence[int]) -> Iterator[Any]:
    """``map(fn, items)`` over the threads, in order, with a few items in flight at a time
    (so a consumer that stops early, or holds results, bounds the work and the memory)."""
    threads = compress_threads()
    if threads == 1 or len(items) < 2:
        yield from map(fn, items)
        return
    pool = _pool(threads)
    window = 2 * threads
    pending: list[concurrent.futures.Future] = []
    nxt = 0
    try:
        while nxt < len(items) or pending:
            while nxt < len(items) and len(pending) < window:
                pending.append(pool.submit(fn, items[nxt]))
                nxt += 1
            yield pending.pop(0).result()
    finally:
        for f in pending:
            f.cancel()
        concurrent.futures.wait(pending)


# ---------------------------------------------------------------------------------------------
# exact top-k threshold
# ---------------------------------------------------------------------------------------------
class TopK(NamedTuple):
    """The exact top-k of a set of magnitudes, as a threshold plus a tie quota.

    The kept entries are every magnitude ``> threshold`` (``n_greater`` of them) plus the
    first ``n_ties`` entries equal to ``threshold`` in scope order. ``threshold == 0`` means
    fewer than k nonzeros exist: all nonzeros are kept and zeros never are (``n_ties == 0``).
    """

    threshold: float
    n_greater: int
    n_ties: int

    @property
    def kept(self) -> int:
        """Number of kept entries, ``n_greater + n_ties``."""
        return self.n_greater + self.n_ties


def select_topk(magnitudes: np.ndarray | Sequence[np.ndarray], k: int) -> TopK:
    """Return the exact top-k threshold over one or more arrays of magnitudes.

    The result is the same as a full descending sort: the k-th largest magnitude, how many
    are strictly larger, and how many entries equal to it complete the k (taken in array
    order, then flat index order). Zeros are never selected, so fewer than ``k`` entries are
    kept when fewer than ``k`` are nonzero. On 10^8 float32 magnitudes it takes about the
    CPU time of numpy 2.4's (SIMD) ``np.partition`` of a copy, on one core, and spreads over
    the cores (``bench/bench_select.py``); contiguous float32/float64 input is not copied.

    Parameters
    ----------
    magnitudes:
        A non-negative, finite float array (any shape; e.g. ``np.abs(x)``) or a sequence of
        them. Mixed float32
        and float64 arrays are compared in float64; float16 is widened to float32.
    k:
        How many entries to keep; ``0 <= k``. Values above the element count keep everything
        nonzero.

    Returns
    -------
    TopK
        ``(threshold, n_greater, n_ties)``.

    Examples
    --------
    >>> import numpy as np
    >>> select_topk(np.array([0.5, 2.0, 1.0, 1.0, 0.0]), 3)
    TopK(threshold=1.0, n_greater=1, n_ties=2)
    >>> select_topk([np.array([3.0, 0.0]), np.array([0.0])], 2)
    TopK(threshold=0.0, n_greater=1, n_ties=0)
    """
    arrays = [magnitudes] if isinstance(magnitudes, np.ndarray) else list(magnitudes)
    arrays = [np.asarray(a).reshape(-1) for a in arrays]
    for a in arrays:
        if a.dtype.kind != "f":
            raise EncodeError(f"select_topk needs float magnitudes, got {a.dtype}")
    work = np.dtype(np.float64 if any(a.dtype == np.float64 for a in arrays) else np.float32)
    arrays = [a if a.dtype == work else a.astype(work) for a in arrays]
    n = sum(a.size for a in arrays)
    rng = np.random.default_rng(SAMPLE_SEED)
    sample = np.concatenate([np.empty(0, work)] + [sample_of(a, rng) for a in arrays if a.size])

    def chunks() -> Iterator[np.ndarray]:
        for a in arrays:
            for start in range(0, a.size, CHUNK):
                yield a[start : start + CHUNK]

    def band_pass(lo_open: Any, hi: Any, cap: int) -> tuple[int, np.ndarray] | None:
        band = Band(lo_open, hi, cap)
        for a in arrays:
            if not band.add(lambda start, a=a: a[start : start + CHUNK], a.size):
                break
        return band.result()

    return select(chunks, n, int(k), sample, work, band_pass)


def sample_of(flat: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Return ``ceil(n / 256)`` values of ``flat`` at random positions (with replacement)."""
    count = -(-flat.size // SAMPLE_EVERY)
    return flat[rng.integers(0, flat.size, size=count)]


def select(
    make_chunks: Callable[[], Iterable[np.ndarray]],
    n: int,
    k: int,
    sample: np.ndarray,
    work: np.dtype,
    band_pass: Callable[[Any, Any, int], tuple[int, np.ndarray] | None] | None = None,
) -> TopK:
    """Exact top-k threshold of the magnitudes that ``make_chunks()`` yields (each call anew).

    ``sample`` holds magnitudes drawn from the same data; it only steers the speed.
    ``band_pass(lo_open, hi, cap)``, when given, does :func:`band_scan` over the same
    magnitudes (on all cores).
    """
    if k <= 0 or n == 0:
        return TopK(math.inf, 0, 0)
    k = min(k, n)
    lo_open, hi = band_edges(sample, n, k, work)
    cap = band_cap(n)
    found = (band_pass(lo_open, hi, cap) if band_pass is not None
             else band_scan(make_chunks(), lo_open, hi, cap))
    top = from_band(found, k, lo_open)
    if top is None:
        t, greater = radix_select(make_chunks, k, work)
        top = topk_of(t, greater, k)
    return top


def band_cap(n: int) -> int:
    """How many magnitudes a band may hold before the exact radix select takes over."""
    return max(BAND_CAP_MIN, n // BAND_CAP_DIV)


def from_band(found: tuple[int, np.ndarray] | None, k: int, lo_open: Any) -> TopK | None:
    """The exact top-k (``1 <= k <= n``) from a band pass's ``(above, band)``; None when the
    threshold is not in the band (an unlucky sample) or the band went over its cap."""
    if found is None:
        return None
    above, band = found
    if above < k <= above + band.size:
        pos = band.size - (k - above)  # the k-th largest overall sits here in the band
        band.partition(pos)
        t = band[pos]
        greater = above + int(np.count_nonzero(band[pos + 1 :] > t))
        return topk_of(t, greater, k)
    if above < k and lo_open == 0:
        # The band held every nonzero below hi and still fell short: fewer than k
        # nonzeros exist, so the threshold is 0 and all nonzeros are kept.
        return TopK(0.0, above + band.size, 0)
    return None


def topk_of(t: Any, greater: int, k: int) -> TopK:
    t = float(t)
    if t == 0.0:  # zeros are never kept
        return TopK(0.0, greater, 0)
    return TopK(t, greater, k - greater)


def band_edges(sample: np.ndarray, n: int, k: int, work: np.dtype) -> tuple[Any, Any]:
    """Return ``(lo_open, hi)``: the band ``lo_open < m <= hi`` that likely holds the threshold.

    ``lo_open`` is -1 when the band reaches down to include zeros, 0 when it starts just above
    zero, else just below a sampled magnitude; ``hi`` is +inf when the band reaches the top.
    """
    s = sample.size
    if s == 0:
        return work.type(-1), work.type(np.inf)
    sample.sort()
    q = (n - k) / n  # fraction of the elements below the threshold's rank
    centre = q * s
    half = BAND_Z * math.sqrt(s * q * (1.0 - q)) + 4.0
    j_lo = math.floor(centre - half)
    j_hi = math.ceil(centre + half)
    if j_lo < 0:
        lo_open = work.type(-1)
    else:
        lo = sample[j_lo]
        # include lo itself: a heavily tied value often sits right at the quantile
        lo_open = work.type(0) if lo == 0 else np.nextafter(lo, work.type(0))
    hi = sample[j_hi] if j_hi < s else work.type(np.inf)
    return lo_open, hi


def band_scan(
    chunks: Iterable[np.ndarray], lo_open: Any, hi: Any, cap: int
) -> tuple[int, np.ndarray] | None:
    """Count magnitudes ``> hi`` and collect those in ``(lo_open, hi]``; None past ``cap``."""
    above = 0
    parts: list[np.ndarray] = []
    held = 0
    for c in chunks:
        above += int(np.count_nonzero(c > hi))
        mask = c > lo_open
        mask &= c <= hi
        got = c[mask]
        if got.size:
            held += got.size
            if held > cap:
                return None
            parts.append(got)
    band = np.concatenate(parts) if parts else np.empty(0, dtype=hi.dtype)
    return above, band


class Band:
    """:func:`band_scan` fed chunk by chunk: :meth:`chunk` on any thread, :meth:`merge` of
    the chunks' results in order."""

    def __init__(self, lo_open: Any, hi: Any, cap: int) -> None:
        self.lo_open, self.hi, self.cap = lo_open, hi, cap
        self.above = 0
        self.held = 0
        self.parts: list[np.ndarray] = []
        self.overflow = False
        # Non-negative floats order as their bit patterns read as unsigned integers: the
        # band lo_open < m <= hi is then one subtraction and one unsigned comparison,
        # (u - first) <= width, where first = bits(lo_open) + 1 (0 when lo_open < 0).
        ukind = self.ukind = np.dtype(np.uint32 if hi.dtype == np.float32 else np.uint64)
        self.hi_u = hi_u = np.asarray(hi).view(ukind)[()]
        first = self.first = ukind.type(0) if lo_open < 0 else ukind.type(
            np.asarray(lo_open, hi.dtype).view(ukind)[()] + ukind.type(1))
        self.width = ukind.type(hi_u - first) if hi_u >= first else None

    def chunk(self, m: np.ndarray) -> tuple[int, np.ndarray]:
        """``(count above hi, the magnitudes in the band)`` of the magnitudes ``m``."""
        u = m.view(self.ukind)
        above = int(np.count_nonzero(u > self.hi_u))
        if self.width is None:  # an empty band
            return above, m[:0]
        d = np.subtract(u, self.first, out=scratch(u.size, self.ukind))
        return above, m[d <= self.width]

    def merge(self, got: tuple[int, np.ndarray]) -> bool:
        """Add a chunk's :meth:`chunk` (chunks in order); False once past the cap."""
        above, band = got
        self.above += above
        if band.size and not self.overflow:
            self.held += band.size
            if self.held > self.cap:
                self.overflow = True
                self.parts.clear()
            else:
                self.parts.append(band)
        return not self.overflow

    def add(self, magnitudes: Callable[[int], np.ndarray], size: int) -> bool:
        """Add the chunks ``magnitudes(start)`` of ``size`` elements; False past the cap."""
        for got in ordered_map(lambda start: self.chunk(magnitudes(start)),
                                range(0, size, CHUNK)):
            if not self.merge(got):
                return False
        return True

    def result(self) -> tuple[int, np.ndarray] | None:
        """What :func:`band_scan` returns."""
        if self.overflow:
            return None
        band = np.concatenate(self.parts) if self.parts else np.empty(0, self.hi.dtype)
        return self.above, band


class Candidates:
    """The band of pass 1, and with ``positions`` every entry that may be kept.

    Built before pass 1 from the sample's band edges, so the statistics pass also counts the
    magnitudes above the band and collects those in it (:class:`Band`): one pass fewer. With
    ``positions`` it also keeps the flat position, magnitude and sign of every entry whose
    magnitude is above ``lo_open`` (the kept ones, and the band: about ``k`` plus a fraction
    of a percent of ``n``; 13 bytes each for float32) while the chunk is in cache, so that
    once the threshold is known the output is gathered from these alone, not from another
    pass over the data. Past ``limit`` of them it stops keeping positions (they would cost
    more memory than the output itself), and the output takes a pass of its own.
    """

    def __init__(self, lo_open: Any, hi: Any, cap: int, positions: bool, limit: int,
                 kernels: Kernels | None = None) -> None:
        self.band = Band(lo_open, hi, cap)
        #: the compiled kernels (:func:`compeft_format.kernels.for_size`), or None: numpy
        self.kernels = kernels
        self.lo_open = lo_open
        self.neg_lo = -lo_open
        self.positions = positions
        self.limit = limit
        self.count = 0
        #: name -> the chunks' (flat positions, magnitudes, sign bits), in position order
        self.parts: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}

    def chunk(self, c: np.ndarray, start: int) -> tuple[tuple[np.ndarray, ...] | None, int,
                                                        np.ndarray]:
        """``((positions, magnitudes, sign bits), count above hi, band)`` of the chunk of
        values ``c`` at flat position ``start`` (any thread); the first is None once
        positions are no longer kept."""
        kern = self.kernels
        if kern is not None and kern.fits(c):  # one compiled loop, the same result
            if not self.positions:
                return (None, *kern.band(c, self.lo_open, self.band.hi))
            return kern.candidates(c, self.lo_open, self.band.hi, start)
        if not self.positions:
            m = np.abs(c, out=scratch(c.size, c.dtype))
            return (None, *self.band.chunk(m))
        if self.lo_open < 0:  # the band reaches down to zero: every entry
            pos = np.arange(c.size)
        else:  # |c| > lo_open, as two comparisons (cheaper than |c| and one)
            mask = np.greater(c, self.lo_open, out=scratch(c.size, np.bool_))
            mask |= np.less(c, self.neg_lo, out=scratch(c.size, np.bool_, "mask"))
            pos = np.flatnonzero(mask)
        vals = c.take(pos)
        m = np.abs(vals)
        pos += start
        return ((pos, m, np.signbit(vals)), *self.band.chunk(m))

    def merge(self, name: str,
              got: tuple[tuple[np.ndarray, ...] | None, int, np.ndarray]) -> None:
        """Add a chunk's :meth:`chunk` (chunks in order)."""
        cand, above, band = got
        self.band.merge((above, band))
        if not self.positions or cand is None:
            return
        self.count += cand[0].size
        if self.count > self.limit:
            self.positions = False
            self.parts.clear()
            return
        if cand[0].size:
            self.parts.setdefault(name, []).append(cand)

    def hold(self, top: TopK) -> bool:
        """True if the kept positions hold every entry that ``top`` keeps."""
        if not self.positions:
            return False
        t = top.threshold
        return (top.kept == 0 or self.lo_open < 0 or t > self.lo_open
                or (t == self.lo_open and top.n_ties == 0))


def radix_select(
    make_chunks: Callable[[], Iterable[np.ndarray]], k: int, work: np.dtype
) -> tuple[Any, int]:
    """Exact k-th largest by its bit pattern, 16 bits a pass; returns ``(value, n_greater)``.

    Non-negative IEEE floats order like their bit patterns read as unsigned integers, so a
    histogram of the top 16 bits finds the bucket of the k-th largest, the next pass the next
    16 bits inside that bucket, and so on. Memory is one 65536-bin histogram.
    """
    ukind = np.dtype(np.uint32 if work == np.float32 else np.uint64)
    bits = ukind.itemsize * 8
    no_sign = ukind.type((1 << (bits - 1)) - 1)
    prefix = 0
    prefix_bits = 0
    greater = 0
    rank = k  # we want the rank-th largest among the entries matching the prefix
    while prefix_bits < bits:
        shift = ukind.type(bits - prefix_bits - 16)
        hist = np.zeros(1 << 16, dtype=np.int64)
        for c in make_chunks():
            u = c.view(ukind) & no_sign  # -0.0 counts as 0
            if prefix_bits:
                u = u[(u >> ukind.type(bits - prefix_bits)) == ukind.type(prefix)]
            digits = ((u >> shift) & ukind.type(0xFFFF)).astype(np.intp)
            hist += np.bincount(digits, minlength=1 << 16)
        from_top = np.cumsum(hist[::-1])  # from_top[i]: entries with digit >= 65535 - i
        i = int(np.searchsorted(from_top, rank))
        digit = 0xFFFF - i
        above_digit = int(from_top[i] - hist[digit])
        greater += above_digit
        rank -= above_digit
        prefix = (prefix << 16) | digit
        prefix_bits += 16
    value = np.array([prefix], dtype=ukind).view(work)[0]
    return value, greater

