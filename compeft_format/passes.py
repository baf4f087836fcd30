"""The passes of one compression over one scope: sample, statistics, threshold, output.

:class:`ScopePasses` is the engine behind :func:`~compeft_format.compress.compress` and
:func:`~compeft_format.compress.iter_compress`, which check the options, split the tensors
into scopes and run one :class:`ScopePasses` per scope:

1. a sparse sample of every tensor gives a band ``[lo, hi]`` in which the k-th largest
   magnitude of the scope lies (:mod:`compeft_format.selection`);
2. one pass adds up the scale's statistics (:mod:`compeft_format.scales`) and keeps the
   candidates above ``lo``, chunk by chunk, on all cores;
3. the exact threshold is found among the candidates, and each tensor's kept entries, signs
   and scale become a :class:`~compeft_format.tensor.TernaryTensor`.

Tensors are read in chunks and never concatenated; :class:`ChunkedValues` lets a caller hand
in values made on demand (a fine-tuned tensor minus its base from two mapped files).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import dtypes as _dt
from . import kernels as _kernels
from . import selection as _sel
from ._alloc import scratch
from ._spec import TERNARY_DTYPES
from .errors import EncodeError
from .scales import (
    CAPPED,
    KEPT_SUM_SCALES,
    METRIC_TERMS,
    RowBlocks,
    Stats,
    is_vector,
    scale_value,
)
from .selection import CHUNK, TopK
from .tensor import TernaryTensor

__all__ = ["ChunkedValues", "ScopePasses", "TensorMeta"]

class ChunkedValues:
    """A tensor's float values made on demand, a slice at a time, never held whole.

    :func:`compress` and :func:`iter_compress` take it wherever they take an array (e.g. a
    fine-tuned tensor minus its base, computed from two memory-mapped files:
    :class:`~compeft_format.plan.FileTaskVector` hands these out). ``chunk(start, stop)``
    returns the flat values ``start:stop`` and ``take(indices)`` those at flat indices, as
    ``dtype`` (float32 or float64); both may be called from several threads at once.

    >>> from compeft_format import compress
    >>> x = np.arange(6, dtype=np.float32) - 2
    >>> v = ChunkedValues((2, 3), np.float32, lambda a, z: x[a:z], lambda i: x[i])
    >>> compress({"t": v}, density=0.5)["t"].indices.tolist()
    [0, 4, 5]
    >>> np.asarray(v).tolist()  # the whole tensor, where an array is needed
    [[-2.0, -1.0, 0.0], [1.0, 2.0, 3.0]]
    """

    def __init__(self, shape: tuple[int, ...], dtype: Any,
                 chunk: Callable[[int, int], np.ndarray],
                 take: Callable[[np.ndarray], np.ndarray]) -> None:
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise EncodeError(f"ChunkedValues must be float32 or float64, got {self.dtype}")
        self.size = math.prod(self.shape)
        self.chunk = chunk
        self.take = take

    @property
    def dtype_name(self) -> str:
        """``"F32"`` or ``"F64"``."""
        return "F64" if self.dtype == np.float64 else "F32"

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self.shape)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """The whole tensor, for code that needs an array (``np.asarray(values)``)."""
        out = np.empty(self.size, self.dtype)
        for start in range(0, self.size, CHUNK):
            stop = min(self.size, start + CHUNK)
            out[start:stop] = self.chunk(start, stop)
        out = out.reshape(self.shape)
        return out if dtype is None else out.astype(dtype, copy=False)





@dataclass
class TensorMeta:
    """What pass 1 learns about a tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # output dtype name
    numel: int
    absmax: float = 0.0  # largest |value| (recorded for the capped scales only)


class ScopePasses:
    """The passes of one compression over one scope (sample, statistics, output)."""

    def __init__(
        self,
        density: float,
        alpha: float,
        scale: str,
        declared: Mapping[str, Any],
        progress: Callable[[str], Any] | None,
    ) -> None:
        self.density = density
        self.alpha = alpha
        self.scale = scale
        self.declared = declared
        self.progress = progress
        #: set by iter_compress: hold one output tensor at a time, at the cost of one more
        #: pass for the scales that need the sum of the kept magnitudes (see _pass3)
        self.stream = False
        self._gram_sums = [0.0, 0.0]  # "gram", "kron": summed metric terms of the matrices
        #: the compiled kernels for this scope's size, or None (numpy); same output either way
        self.kernels: _kernels.Kernels | None = None
        #: given (compress's ``proj_scales``): filled with each tensor's scope's "proj" scale
        #: under the metric rules, whose scale is not proj's
        self.proj_scales: dict[str, float] | None = None

    # -- reading ---------------------------------------------------------------------------
    def _read(self, name: str, value: Any) -> tuple[np.ndarray, str]:
        """Return the flat storage array and storage dtype name; reject non-float data.

        A :class:`ChunkedValues` stays as it is (its values are read by :meth:`_chunk`)."""
        if isinstance(value, ChunkedValues):
            return value, value.dtype_name  # type: ignore[return-value]
        try:
            storage, dname = _dt.to_storage(value)
        except EncodeError as exc:
            raise EncodeError(exc.message, tensor=name) from None
        if dname not in TERNARY_DTYPES:
            raise EncodeError(
                f"dtype {dname} is not a float dtype {TERNARY_DTYPES}; exclude it "
                "(exclude=[...]) to keep it dense",
                tensor=name,
            )
        return storage.reshape(-1), dname

    @staticmethod
    def _chunk(flat: np.ndarray, dname: str, work: np.dtype, start: int) -> np.ndarray:
        """The chunk at ``start``, widened to the work dtype (exact)."""
        if isinstance(flat, ChunkedValues):
            c = flat.chunk(start, min(flat.size, start + CHUNK))
            return c if c.dtype == work else c.astype(work)
        c = _dt.to_numpy_values(flat[start : start + CHUNK], dname)
        return c if c.dtype == work else c.astype(work)

    @classmethod
    def _chunks(cls, flat: np.ndarray, dname: str, work: np.dtype
                ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, values)`` chunks widened to the work dtype (exact)."""
        for start in range(0, flat.size, CHUNK):
            yield start, cls._chunk(flat, dname, work, start)

    # -- the passes ------------------------------------------------------------------------
    # Per-tensor work lives in helper methods so that every view of a tensor dies when the
    # helper returns: the next tensor is only fetched once the previous one is unreachable.
    def run(self, names: list[str], fetch: Callable[[str], Any]) -> dict[str, TernaryTensor]:
        """Compress the scope ``names`` (sorted), fetching values with ``fetch(name)``."""
        return dict(self.iter_run(names, fetch))

    def iter_run(
        self, names: list[str], fetch: Callable[[str], Any]
    ) -> Iterator[tuple[str, TernaryTensor]]:
        """:meth:`run`, yielding each tensor as soon as it is built (in ``names`` order).

        The sample comes first (it only steers the speed), so that pass 1 finds the band
        while it adds up the statistics; :func:`compress` also keeps the candidates' positions
        then (:class:`~compeft_format.selection.Candidates`), and builds the output from them.
        """
        metas: list[TensorMeta] = []
        rng = np.random.default_rng(_sel.SAMPLE_SEED)
        samples = [self._sample_tensor(name, fetch, rng, metas) for name in names]
        n = sum(meta.numel for meta in metas)
        work = np.dtype(np.float64 if any(s.dtype == np.float64 for s in samples) else np.float32)
        sample = np.concatenate([np.empty(0, work)] + [s.astype(work) for s in samples])
        del samples
        k = min(n, max(1, round(self.density * n))) if n else 0
        stats = Stats(need_std=self.scale == "std")
        found = None
        if n:
            lo_open, hi = _sel.band_edges(sample, n, k, work)
            cap = _sel.band_cap(n)
            self.kernels = _kernels.for_size(n, streaming=self.stream)
            found = _sel.Candidates(lo_open, hi, cap, positions=not self.stream, limit=k + cap,
                                    kernels=self.kernels)
        del sample
        for meta in metas:
            self._pass1_tensor(meta, fetch, stats, work, found)
        buf = np.empty(min(CHUNK, max(n, 1)), dtype=work)

        def mags() -> Iterator[np.ndarray]:
            for meta in metas:
                if meta.numel:
                    yield from self._tensor_mags(meta.name, fetch, work, buf)

        if found is None:
            top = TopK(math.inf, 0, 0)
        else:
            top = _sel.from_band(found.band.result(), k, found.lo_open)
            if top is None:  # an unlucky sample: exact, at the cost of more passes
                t, greater = _sel.radix_select(mags, k, work)
                top = _sel.topk_of(t, greater, k)
        if found is not None and found.hold(top):
            yield from self._from_candidates(metas, fetch, top, stats, work, found)
        else:
            yield from self._pass3(metas, fetch, top, stats, work, buf)

    def run_one(self, name: str, tensors: Mapping[str, Any]) -> dict[str, TernaryTensor]:
        """Compress one tensor on its own; it is fetched once and held for the passes."""
        return dict(self.iter_run_one(name, tensors))

    def iter_run_one(
        self, name: str, tensors: Mapping[str, Any]
    ) -> Iterator[tuple[str, TernaryTensor]]:
        """:meth:`run_one`, as a generator."""
        value = tensors[name]
        yield from self.iter_run([name], lambda _name: value)

    def _sample_tensor(
        self, name: str, fetch: Callable[[str], Any], rng: np.random.Generator,
        metas: list[TensorMeta],
    ) -> np.ndarray:
        """Record shape and dtype; return a sample of the magnitudes (one in 256, at random
        positions with replacement) in the tensor's native float dtype."""
        value = fetch(name)
        flat, dname = self._read(name, value)
        out_dtype = self.declared.get(name, dname)
        if out_dtype not in TERNARY_DTYPES:
            out_dtype = dname
        metas.append(TensorMeta(name, _shape_of(value), out_dtype, int(flat.size)))
        native = np.dtype(np.float64 if dname == "F64" else np.float32)
        if not flat.size:
            return np.empty(0, native)
        where = rng.integers(0, flat.size, size=-(-flat.size // _sel.SAMPLE_EVERY))
        picked = flat.take(where) if isinstance(flat, ChunkedValues) else flat[where]
        # a non-finite value here only makes the band useless; pass 1 rejects it by name
        with np.errstate(invalid="ignore"):
            return np.abs(_dt.to_numpy_values(picked, dname)).astype(native, copy=False)

    def _pass1_tensor(
        self,
        meta: TensorMeta,
        fetch: Callable[[str], Any],
        stats: Stats,
        work: np.dtype,
        found: _sel.Candidates | None,
    ) -> None:
        """Check finiteness, add to the statistics and to ``found`` (the band and the
        candidates), chunk by chunk on all cores, while each chunk is in cache."""
        name = meta.name
        flat, dname = self._read(name, fetch(name))
        native = np.dtype(np.float64 if dname == "F64" else np.float32)
        track_max = self.scale in CAPPED and is_vector(meta.shape)
        starts = range(0, flat.size, CHUNK)

        kern = self.kernels if not stats.need_std else None

        def part(start: int) -> tuple[float, Any, Any]:
            c = self._chunk(flat, dname, native, start)
            s2 = kern.sumsq(c) if kern is not None else None
            if s2 is None:
                sums = stats.part(c)
            else:  # what Stats.part returns without need_std, from the compiled sum
                sums = (c.size, s2, 0.0, 0.0) if math.isfinite(s2) else None
            if sums is None:  # not finite: reported in order below
                return 0.0, None, None
            cw = c if native == work else c.astype(work)
            got = found.chunk(cw, start) if found is not None else None
            peak = 0.0
            if track_max and c.size:
                if got is not None and got[0] is not None and got[0][1].size:
                    # the largest |value| is among the candidates whenever there are any
                    peak = float(got[0][1].max())
                else:  # without a temporary |c|
                    peak = max(float(c.max()), -float(c.min()))
            return peak, sums, got

        for start, (peak, sums, got) in zip(starts, _sel.ordered_map(part, starts), strict=True):
            meta.absmax = max(meta.absmax, peak)
            if sums is not None:
                stats.merge(sums)
                if found is not None:
                    found.merge(name, got)
            else:
                c = self._chunk(flat, dname, native, start)
                bad = np.flatnonzero(~np.isfinite(c))
                if bad.size:
                    raise EncodeError(
                        f"value {float(c[bad[0]])!r} at flat index {start + int(bad[0])} is not "
                        "finite; a task vector must be finite",
                        tensor=name,
                    )
                raise EncodeError(
                    "sum of squares overflows float64 (values near 1e154 or above)", tensor=name
                )

    def _tensor_mags(
        self, name: str, fetch: Callable[[str], Any], work: np.dtype, buf: np.ndarray
    ) -> Iterator[np.ndarray]:
        """Yield the magnitudes of one tensor, chunk by chunk, in ``buf``."""
        flat, dname = self._read(name, fetch(name))
        for _, c in self._chunks(flat, dname, work):
            yield np.abs(c, out=buf[: c.size])

    def _pass3(
        self,
        metas: list[TensorMeta],
        fetch: Callable[[str], Any],
        top: TopK,
        stats: Stats,
        work: np.dtype,
        buf: np.ndarray,
    ) -> Iterator[tuple[str, TernaryTensor]]:
        """Find the final scale, then build and yield the tensors one at a time.

        ``"norm"`` and ``"std"`` are known from pass 1: each tensor is gathered when it is
        yielded, so only that one is held. The other scales need the sum of every kept
        magnitude first. With :attr:`stream` set (:func:`iter_compress`), a pass of its own
        computes it, gathering exactly as the output pass does (same order, same ties, so
        the same sum); otherwise (:func:`compress`, which holds every output anyway, and
        reads each tensor at most three times) the positions and signs of all tensors are
        gathered together with the sum and held until the scale is known.
        """
        t = work.type(top.threshold)
        kept_sum = 0.0  # float64 sum of the kept magnitudes
        gram = self._gram_sums = [0.0, 0.0]  # "gram", "kron": summed terms, the matrices
        held: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if top.kept and self.scale not in ("norm", "std"):
            ties_left = top.n_ties
            for meta in metas:
                if meta.numel:
                    idx, signs, ties_left, part_sum = self._gather(
                        meta.name, fetch, t, ties_left, work, buf, gram_of=meta
                    )
                    kept_sum += part_sum
                    if not self.stream:
                        held[meta.name] = (idx, signs)
                    del idx, signs
        value = self._scale_value(top.kept, kept_sum, stats, metas, (gram[0], gram[1]))
        ties_left = top.n_ties
        for meta in metas:
            part = held.pop(meta.name, None)
            if value == 0.0 or not meta.numel or top.kept == 0:
                out = TernaryTensor.zeros(meta.shape, meta.dtype)
            else:
                if part is None:
                    idx, signs, ties_left, _ = self._gather(
                        meta.name, fetch, t, ties_left, work, buf
                    )
                else:
                    idx, signs = part
                out = TernaryTensor(
                    meta.shape, idx, signs, self._tensor_scale(value, meta), meta.dtype,
                    _validated=True,
                )
                del idx, signs
            del part
            if self.progress is not None:
                self.progress(meta.name)
            yield meta.name, out
            del out

    def _from_candidates(
        self,
        metas: list[TensorMeta],
        fetch: Callable[[str], Any],
        top: TopK,
        stats: Stats,
        work: np.dtype,
        found: _sel.Candidates,
    ) -> Iterator[tuple[str, TernaryTensor]]:
        """:meth:`_pass3` from the candidates of pass 1 instead of another pass over the data.

        Each chunk's kept entries are picked from its candidates, which are in position order
        and hold every entry equal to the threshold: the same positions, signs and kept
        magnitude sums (chunk by chunk, in the same order) as :meth:`_gather`, so the same
        output bytes. ``"gram"`` (``"kron"``) reads each matrix once more for its
        :func:`gram_terms` (:func:`kron_terms`).
        """
        t = work.type(top.threshold)
        want_sum = self.scale in KEPT_SUM_SCALES
        kept_sum = 0.0
        gram = self._gram_sums = [0.0, 0.0]
        held: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        ties_left = top.n_ties
        for meta in metas:
            parts = found.parts.pop(meta.name, [])
            if not top.kept or not meta.numel:
                continue
            idx, signs, ties_left, part_sum = self.pick(parts, t, ties_left, want_sum)
            del parts
            kept_sum += part_sum
            if self.scale in METRIC_TERMS and idx.size and not is_vector(meta.shape):
                flat, dname = self._read(meta.name, fetch(meta.name))
                values = _metric_matrix(flat, dname, meta.shape[0], self.scale)
                num, den = METRIC_TERMS[self.scale](values, idx, signs)
                del flat, values
                gram[0] += num
                gram[1] += den
            held[meta.name] = (idx, signs)
        value = self._scale_value(top.kept, kept_sum, stats, metas, (gram[0], gram[1]))
        for meta in metas:
            part = held.pop(meta.name, None)
            if value == 0.0 or part is None:
                out = TernaryTensor.zeros(meta.shape, meta.dtype)
            else:
                out = TernaryTensor(
                    meta.shape, part[0], part[1], self._tensor_scale(value, meta), meta.dtype,
                    _validated=True,
                )
            del part
            if self.progress is not None:
                self.progress(meta.name)
            yield meta.name, out
            del out

    def pick(
        self, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], t: Any, ties_left: int,
        want_sum: bool,
    ) -> tuple[np.ndarray, np.ndarray, int, float]:
        """:meth:`_gather` of one tensor from its candidates ``(positions, magnitudes, sign
        bits)``, chunk by chunk on all cores: which to keep (the ties in order), then each
        chunk's kept entries straight into their slice of the output."""
        if self.kernels is not None:
            return self._pick_compiled(self.kernels, parts, t, ties_left, want_sum)
        find_ties = ties_left > 0

        def mark(i: int) -> tuple[np.ndarray, int, np.ndarray | None]:
            """A chunk's mask of the candidates above ``t``, its count, and where ``t`` is."""
            m = parts[i][1]
            sel = m > t
            eq = None
            if find_ties:
                at = m == t
                eq = np.flatnonzero(at) if at.any() else None
            return sel, int(np.count_nonzero(sel)), eq

        items = range(len(parts))
        sels: list[np.ndarray] = []
        ends = [0]
        for sel, count, eq in _sel.ordered_map(mark, items):
            if ties_left and eq is not None:  # first come, first kept
                took = eq[:ties_left]
                sel[took] = True
                ties_left -= took.size
                count += took.size
            sels.append(sel)
            ends.append(ends[-1] + count)
        idx = np.empty(ends[-1], np.int64)
        signs = np.empty(ends[-1], bool)

        def fill(i: int) -> float:
            """Write a chunk's kept positions and signs; return the sum of their magnitudes,
            summed as _gather sums them (the kept magnitudes in position order)."""
            a, b = ends[i], ends[i + 1]
            if b == a:
                return 0.0
            pos, m, neg = parts[i]
            loc = np.flatnonzero(sels[i])
            # mode "wrap": the indices are valid, and "raise" buffers a take with out=
            np.take(pos, loc, out=idx[a:b], mode="wrap")
            np.take(neg, loc, out=signs[a:b], mode="wrap")
            return float(m.take(loc).sum(dtype=np.float64)) if want_sum else 0.0

        kept_sum = 0.0
        for part in _sel.ordered_map(fill, items):
            kept_sum += part
        return idx, signs, ties_left, kept_sum

    @staticmethod
    def _pick_compiled(
        kern: _kernels.Kernels, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
        t: Any, ties_left: int, want_sum: bool,
    ) -> tuple[np.ndarray, np.ndarray, int, float]:
        """:meth:`pick` with the compiled kernels: each chunk's counts above and at ``t``,
        the ties handed out in order, then each chunk's kept entries into their slice; the
        kept magnitudes are summed by numpy, as :meth:`pick` sums them."""
        items = range(len(parts))
        ties: list[int] = []
        ends = [0]
        for greater, equal in _sel.ordered_map(lambda i: kern.count_at(parts[i][1], t), items):
            took = min(equal, ties_left)  # first come, first kept
            ties_left -= took
            ties.append(took)
            ends.append(ends[-1] + greater + took)
        idx = np.empty(ends[-1], np.int64)
        signs = np.empty(ends[-1], bool)

        def fill(i: int) -> float:
            a, b = ends[i], ends[i + 1]
            if b == a:
                return 0.0
            pos, m, neg = parts[i]
            kept = kern.fill_kept(pos, m, neg, t, ties[i], idx[a:b], signs[a:b])
            return float(kept.sum(dtype=np.float64)) if want_sum else 0.0

        kept_sum = 0.0
        for part in _sel.ordered_map(fill, items):
            kept_sum += part
        return idx, signs, ties_left, kept_sum

    def _gather(
        self,
        name: str,
        fetch: Callable[[str], Any],
        t: Any,
        ties_left: int,
        work: np.dtype,
        buf: np.ndarray,
        gram_of: TensorMeta | None = None,
    ) -> tuple[np.ndarray, np.ndarray, int, float]:
        """Kept flat indices and signs of one tensor; ties are taken first come, first kept.

        With ``gram_of`` (its meta) and ``scale="gram"`` or ``"kron"``, a matrix's
        :func:`gram_terms` or :func:`kron_terms` are added to ``self._gram_sums`` from the
        same read.
        """
        flat, dname = self._read(name, fetch(name))
        idx_parts: list[np.ndarray] = []
        sign_parts: list[np.ndarray] = []
        kept_sum = 0.0
        want_sum = self.scale in KEPT_SUM_SCALES
        find_ties = ties_left > 0

        kern = self.kernels

        def one(start: int, ties: int = 0) -> tuple[np.ndarray, np.ndarray, float, int, bool]:
            """A chunk's kept positions, signs, magnitude sum, ties taken, ties seen."""
            c = self._chunk(flat, dname, work, start)
            if kern is not None and kern.fits(c) and t > 0:  # one compiled loop, same result
                loc, neg, kept, took, seen = kern.gather(c, t, ties, find_ties)
                part = float(kept.sum(dtype=np.float64)) if want_sum and loc.size else 0.0
                return loc, neg, part, took, bool(find_ties and not ties and seen)
            m = np.abs(c, out=scratch(c.size, work))
            sel = m > t
            took = 0
            if ties:
                eq = np.flatnonzero(m == t)[:ties]
                sel[eq] = True
                took = eq.size
            loc = np.flatnonzero(sel)
            part = float(m[loc].sum(dtype=np.float64)) if want_sum and loc.size else 0.0
            tied = bool(find_ties and not ties and (m == t).any())
            return loc, np.signbit(c[loc]), part, took, tied

        # the chunks on all cores; which ties are kept depends on the chunks before, so a
        # chunk holding one is done again, in order, with the ties still to take
        starts = range(0, flat.size, CHUNK)
        for start, got in zip(starts, _sel.ordered_map(one, starts), strict=True):
            if ties_left and got[4]:
                got = one(start, ties_left)
            loc, signs, part, took, _ = got
            ties_left -= took
            if loc.size:
                idx_parts.append(loc + start)
                sign_parts.append(signs)
                kept_sum += part
        idx = np.concatenate(idx_parts) if idx_parts else np.empty(0, np.int64)
        signs = np.concatenate(sign_parts) if sign_parts else np.empty(0, bool)
        if (gram_of is not None and self.scale in METRIC_TERMS and idx.size
                and not is_vector(gram_of.shape)):
            matrix = _metric_matrix(flat, dname, gram_of.shape[0], self.scale)
            num, den = METRIC_TERMS[self.scale](matrix, idx, signs)
            self._gram_sums[0] += num
            self._gram_sums[1] += den
        return idx, signs, ties_left, kept_sum

    def _tensor_scale(self, value: float, meta: TensorMeta) -> float:
        """The scale of one tensor: the scope's, or for ``"proj_vcap"`` a vector's own cap.

        The cap ``alpha * max|t|`` is taken only where it is below the scope's scale, so the
        overflow checks of that scale cover it; rounding to float32 is monotonic, so the min
        of the rounded values is the rounded min.
        """
        if self.scale not in CAPPED or not is_vector(meta.shape):
            return value
        return min(value, float(np.float32(self.alpha * meta.absmax)))

    def _scale_value(self, kept: int, kept_sum: float, stats: Stats, metas: list[TensorMeta],
                     gram: tuple[float, float] = (0.0, 0.0)) -> float:
        """The scope's scale (:func:`~compeft_format.scales.scale_value`); under a metric
        rule, its ``"proj"`` scale goes to :attr:`proj_scales` too."""
        tensors = [(m.name, m.dtype, m.numel) for m in metas]
        if self.proj_scales is not None and self.scale in METRIC_TERMS:
            try:  # the same sums give it; one that overflows a dtype is left out
                proj = scale_value("proj", self.alpha, kept, kept_sum, stats, tensors)
            except EncodeError:
                proj = None
            if proj is not None:
                self.proj_scales.update((m.name, proj) for m in metas)
        return scale_value(self.scale, self.alpha, kept, kept_sum, stats, tensors, gram)


def _metric_matrix(flat: Any, dname: str, rows: int, scale: str) -> np.ndarray | RowBlocks:
    """A matrix's values for :data:`METRIC_TERMS`: for ``"kron_sketch"``, whenever the values
    are not float32 or float64 in memory already (made on demand, or stored as BF16, F16,
    F8), a :class:`RowBlocks` that makes them a block of rows at a time, so that the rule
    needs no float32 copy of the matrix; else the whole array (``"kron"`` and ``"gram"``
    decompose it anyway)."""
    numel = flat.size
    cols = numel // rows if rows else 0
    if scale == "kron_sketch" and isinstance(flat, ChunkedValues):
        return RowBlocks((rows, cols), flat.dtype,
                         lambda a, z: flat.chunk(a * cols, z * cols).reshape(z - a, cols),
                         flat.take)
    if scale == "kron_sketch" and np.dtype(flat.dtype) not in (np.float32, np.float64):
        store = flat.reshape(-1)
        return RowBlocks((rows, cols), np.float32,
                         lambda a, z: _dt.to_numpy_values(store[a * cols : z * cols], dname
                                                          ).reshape(z - a, cols),
                         lambda i: _dt.to_numpy_values(store[i], dname))
    values = np.asarray(flat) if isinstance(flat, ChunkedValues) else _dt.to_numpy_values(
        flat, dname)
    return values.reshape(rows, -1)


def _shape_of(value: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in (value.shape if hasattr(value, "shape") else np.shape(value)))
