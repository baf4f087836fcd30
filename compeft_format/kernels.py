"""Optional compiled chunk kernels: compress's hot loops fused, with numba, on all cores.

:func:`~compeft_format.compress.compress` spends most of its time in two per-chunk steps:
the statistics pass (which entries may be kept: their positions, magnitudes and signs, and
the threshold's band) and the picking of the kept entries from those candidates. In numpy
each is a handful of whole-chunk operations (two comparisons, ``flatnonzero``, ``take``,
``abs``, ``signbit``, ...); here each is one loop over the chunk, compiled by `numba
<https://numba.pydata.org>`_ (``pip install 'compeft_format[fast]'``), that releases the GIL
so the thread pool runs chunks on all cores. The loops only compare and take ``abs``; the
sum of the kept magnitudes stays in numpy, and the sum of squares of a float32 chunk is
einsum's own order of additions (numpy's 8192-element buffers, two lanes, four vectors a
step), which :func:`load` checks against ``einsum`` before using it (else einsum runs). So
the output is the same, byte for byte, whichever path runs.

Which path runs is set by ``$COMPEFT_KERNELS``:

* ``auto`` (default): the compiled kernels once numba is loaded in this process; numba is
  imported (about 1.2-1.5 s of CPU with loading the compiled code from its on-disk cache) only
  for a pass over at least :data:`AUTO_MIN` (2^30) elements (:data:`AUTO_MIN_STREAM`, 2^28,
  for ``iter_compress``, whose passes save more), where it pays for itself.
  Call :func:`load` to load it up front (e.g. before a batch of smaller compressions).
* ``numba``: the compiled kernels for any size.
* ``numpy``: never.

Without numba, or if it fails (import, compilation, no writable cache directory), the numpy
path runs; the reason is logged once at debug level (logger ``compeft_format.kernels``) and
:func:`status` says it. numba caches the compiled code in ``$NUMBA_CACHE_DIR`` if set, else
next to this module (``__pycache__``), else (read-only there, as a system site-packages is)
in the user's cache directory (``~/.cache/numba``); with no writable place, auto mode stays on
numpy (a compile without a cache costs about 6-7 s of CPU in every process) and ``numba`` mode
compiles.

>>> import numpy as np
>>> k = for_size(10)  # None: auto mode does not load numba for 10 elements
>>> k is None or k.name == "numba"
True
>>> status() in ("numba", "numpy") or status().startswith("numpy (")
True
"""

from __future__ import annotations

import logging
import os
import threading
from types import SimpleNamespace
from typing import Any

import numpy as np

from ._alloc import scratch
from .errors import EncodeError

__all__ = ["AUTO_MIN", "AUTO_MIN_STREAM", "KERNELS_ENV", "Kernels", "for_size", "load", "mode",
           "status"]

#: Environment variable: ``auto`` (default), ``numba`` or ``numpy`` (see the module doc).
KERNELS_ENV = "COMPEFT_KERNELS"
#: In ``auto`` mode, the smallest pass (elements) for which numba is loaded, if it is not yet:
#: importing numba and loading the cached kernels costs about 1.2-1.5 s of CPU once; the
#: kernels save compress about 2.4 ns of CPU per element (iter_compress about 9), measured
#: with ``bench/bench_select.py``: from here even the first call gains.
AUTO_MIN = 1 << 30
#: :data:`AUTO_MIN` for :func:`~compeft_format.compress.iter_compress` (what ``compeft
#: compress`` runs): its passes save about 7-9 ns of CPU per element, so it gains from here.
AUTO_MIN_STREAM = 1 << 28
MODES = ("auto", "numba", "numpy")

log = logging.getLogger(__name__)
_LOCK = threading.Lock()
_kernels: Kernels | None = None
_failed: str | None = None  # why the compiled path is unavailable, once known
_said = False  # the reason was logged


def mode() -> str:
    """``$COMPEFT_KERNELS`` (``auto`` when unset), or :class:`EncodeError` if invalid.

    >>> mode() in MODES
    True
    """
    env = os.environ.get(KERNELS_ENV, "").strip().lower() or "auto"
    if env not in MODES:
        raise EncodeError(f"{KERNELS_ENV} must be one of {MODES}, got {env!r}")
    return env


def for_size(n: int, streaming: bool = False) -> Kernels | None:
    """The compiled kernels for a pass over ``n`` elements, or None for the numpy path;
    ``streaming`` for :func:`~compeft_format.compress.iter_compress`'s passes (in auto mode
    from :data:`AUTO_MIN_STREAM` elements, not :data:`AUTO_MIN`).

    >>> for_size(0) is None or isinstance(for_size(0), Kernels)
    True
    """
    how = mode()
    if how == "numpy":
        return None
    if how == "auto" and _kernels is None and n < (AUTO_MIN_STREAM if streaming else AUTO_MIN):
        return None
    return load(compile_without_cache=how == "numba")


def load(compile_without_cache: bool = True) -> Kernels | None:
    """Import numba and load (or compile) the kernels; None, logged once, if that fails.

    With ``compile_without_cache`` false, give up where numba finds no writable cache
    directory (for now: a later call may still compile) instead of compiling in this process.

    >>> load() is None or load().name == "numba"
    True
    """
    global _kernels, _failed
    with _LOCK:
        if _kernels is not None or _failed is not None:
            return _kernels
        try:
            from . import _kernels_numba
        except Exception as exc:  # numba missing or broken
            _say(f"numba not importable: {exc}", final=True)
            return None
        try:
            funcs = _kernels_numba.build(cache=True)
        except RuntimeError as exc:  # "cannot cache function ...: no locator available"
            if not compile_without_cache:
                _say(f"no writable cache directory for numba: {exc}", final=False)
                return None
            try:
                funcs = _kernels_numba.build(cache=False)
            except Exception as exc2:
                _say(f"numba compile failed: {exc2!r}", final=True)
                return None
        except Exception as exc:
            _say(f"numba compile failed: {exc!r}", final=True)
            return None
        try:
            kernels = Kernels(funcs)  # runs the sum of squares' check
        except Exception as exc:
            _say(f"numba kernels failed their check: {exc!r}", final=True)
            return None
        _kernels = kernels
        if not _kernels.sums_like_einsum:
            log.debug("compeft_format.kernels: the sum of squares stays in numpy's einsum "
                      "(the compiled sum does not round as this numpy's einsum does)")
        return _kernels


def _say(why: str, final: bool) -> None:
    """Log once why the numpy path runs; with ``final``, never try numba again here."""
    global _failed, _said
    if final:
        _failed = why
    if not _said:
        _said = True
        log.debug("compeft_format.kernels: the numpy path runs (%s)", why)


def status() -> str:
    """``"numba"`` if the compiled kernels are loaded, else ``"numpy"`` (with the reason
    numba is not used, once known: ``"numpy (numba not importable: ...)"``).

    >>> status().split()[0] in ("numba", "numpy")
    True
    """
    if _kernels is not None:
        return "numba"
    return "numpy" if _failed is None else f"numpy ({_failed})"


class Kernels:
    """The compiled kernels, called on one chunk at a time from any thread.

    Each method returns what the numpy code it replaces returns (same values, same order);
    they take contiguous, aligned, native-order float32 or float64 chunks (:meth:`fits`).
    """

    name = "numba"

    def __init__(self, mod: SimpleNamespace) -> None:
        self._mod = mod
        #: :meth:`sumsq` gives einsum's bits on this numpy and CPU (checked here, once)
        self.sums_like_einsum = self._check_sumsq()

    def _check_sumsq(self) -> bool:
        """True if the compiled sum of squares equals ``einsum``'s, bit for bit, on arrays
        chosen so that any other order of the additions shows: every length class of
        einsum's 8192-element buffers and of its 8-element steps, values of one scale (where
        a different order changes the last bits most often) and of many scales."""
        rng = np.random.default_rng(0x5EED)
        lengths = [1, 2, 3, 4, 5, 6, 7, 8, 9, 14, 15, 17, 8191, 8192, 8193, 8196, 8198,
                   16384 + 5, 4 * 8192, 4 * 8192 + 9, 5 * 8192 - 1, 9 * 8192 + 3, 1 << 20]
        lengths += [int(v) for v in rng.integers(1, 1 << 18, 8)]
        for i, size in enumerate(lengths):
            c = rng.standard_normal(size).astype(np.float32)
            if i % 2:
                c *= np.exp2(rng.integers(-40, 40, size)).astype(np.float32)
            want = float(np.einsum("i,i->", c, c, dtype=np.float64))
            if float(self._mod.sumsq(c)) != want:
                return False
        return True

    def sumsq(self, c: np.ndarray) -> float | None:
        """``einsum("i,i->", c, c, dtype=float64)`` of a float32 chunk, the same bits
        (without einsum's cast buffers: about half its CPU); None where einsum must run (a
        float64 chunk, or a numpy whose einsum sums in another order)."""
        if not self.sums_like_einsum or c.dtype != np.float32 or not self.fits(c):
            return None
        return float(self._mod.sumsq(c))

    @staticmethod
    def fits(c: np.ndarray) -> bool:
        """True if ``c`` is a chunk the kernels take (else use the numpy path)."""
        return (c.ndim == 1 and c.dtype in (np.float32, np.float64) and c.dtype.isnative
                and c.flags.c_contiguous and c.flags.aligned)

    @staticmethod
    def _bits(c: np.ndarray, lo_open: Any) -> tuple[np.ndarray, Any, Any]:
        """The chunk's bit patterns, the mask of all but the sign bit, and the pattern of
        the smallest magnitude above ``lo_open`` (0 when ``lo_open < 0``)."""
        ukind = np.dtype(np.uint32 if c.dtype == np.float32 else np.uint64)
        absmask = ukind.type(np.iinfo(ukind).max >> 1)
        # non-negative floats order like their bit patterns: |c| > lo_open is bits >= first
        first = ukind.type(0) if lo_open < 0 else ukind.type(
            np.asarray(lo_open, c.dtype).view(ukind)[()] + ukind.type(1))
        return c.view(ukind), absmask, first

    def candidates(self, c: np.ndarray, lo_open: Any, hi: Any, start: int
                   ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], int, np.ndarray]:
        """``((positions, magnitudes, sign bits), count above hi, band)``: what
        :meth:`~compeft_format.selection.Candidates.chunk` returns, for ``c`` at ``start``."""

        u, absmask, first = self._bits(c, lo_open)
        size = c.size
        pos = scratch(size, np.int64, "k-pos")
        mag = scratch(size, c.dtype, "k-mag")
        neg = scratch(size, np.bool_, "k-neg")
        band = scratch(size, c.dtype, "k-band")
        k, above, nband = self._mod.candidates(c, u, absmask, first, c.dtype.type(hi),
                                               start, pos, mag, neg, band)
        return (pos[:k].copy(), mag[:k].copy(), neg[:k].copy()), above, band[:nband].copy()

    def band(self, c: np.ndarray, lo_open: Any, hi: Any) -> tuple[int, np.ndarray]:
        """``(count of |c| above hi, |c| in (lo_open, hi])``: what
        :meth:`~compeft_format.selection.Band.chunk` returns for ``|c|``."""

        u, absmask, first = self._bits(c, lo_open)
        hi = c.dtype.type(hi)
        # every |c| > hi is counted, even below lo_open (an empty band, hi < lo_open)
        visit = min(first, np.asarray(hi).view(u.dtype)[()] + u.dtype.type(1))
        band = scratch(c.size, c.dtype, "k-band")
        above, nband = self._mod.band_only(c, u, absmask, first, visit, hi, band)
        return above, band[:nband].copy()

    def gather(self, c: np.ndarray, t: Any, ties: int, find_ties: bool
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, bool]:
        """The kept entries of the chunk ``c`` at threshold ``t > 0`` (``|c| > t`` and the
        first ``ties`` with ``|c| == t``), in order: ``(chunk positions, sign bits,
        magnitudes, ties taken, whether |c| == t was seen)``; ``find_ties`` says whether
        that last answer is wanted. The magnitudes are a per-thread buffer (sum them before
        the next call on the thread)."""

        u = c.view(np.uint32 if c.dtype == np.float32 else np.uint64)
        absmask = u.dtype.type(np.iinfo(u.dtype).max >> 1)
        t = c.dtype.type(t)
        visit = np.asarray(t).view(u.dtype)[()]
        if not (ties or find_ties):  # |c| == t does not matter: look above t only
            visit = u.dtype.type(visit + u.dtype.type(1))
        loc = scratch(c.size, np.int64, "k-pos")
        neg = scratch(c.size, np.bool_, "k-neg")
        kept = scratch(c.size, c.dtype, "k-kept")
        got, took, seen = self._mod.gather(c, u, absmask, visit, t, ties, loc, neg, kept)
        return loc[:got].copy(), neg[:got].copy(), kept[:got], int(took), bool(seen)

    def count_at(self, m: np.ndarray, t: Any) -> tuple[int, int]:
        """``(count of m > t, count of m == t)``."""
        greater, equal = self._mod.count_at(m, m.dtype.type(t))
        return int(greater), int(equal)

    def fill_kept(self, pos: np.ndarray, m: np.ndarray, neg: np.ndarray, t: Any, ties: int,
                  idx: np.ndarray, signs: np.ndarray) -> np.ndarray:
        """Write the kept entries' positions and signs into ``idx`` and ``signs`` (which
        have exactly their room): those with ``m > t`` and the first ``ties`` with
        ``m == t``, in order. Returns their magnitudes, in that order (a per-thread buffer:
        sum it before the next call on the thread)."""

        kept = scratch(idx.size, m.dtype, "k-kept")
        got = self._mod.fill_kept(pos, m, neg, m.dtype.type(t), ties, idx, signs, kept)
        if got != idx.size:  # pragma: no cover - the counts came from count_at
            raise AssertionError(f"fill_kept wrote {got} of {idx.size} entries")
        return kept
