"""Merging task vectors: task arithmetic and TIES, straight from sparse ternary tensors.

:func:`merge` combines task vectors held in memory (dicts of :class:`TernaryTensor`, numpy
arrays or torch tensors). :mod:`compeft_format.merge_io` does the same from compeft files or
compressed adapter directories, one tensor at a time (``merge_files``), and compresses a
merge again (``merge_and_compress``).

Semantics (per tensor, on the decoded task vectors ``t_1 .. t_n`` with weights ``w_i``)
------------------------------------------------------------------------------------
* ``"sum"``: task arithmetic, ``sum_i w_i t_i``
  (``peft.utils.merge_utils.task_arithmetic``).
* ``"mean"``: the same divided by ``n``.
* ``"ties"``: TIES-Merging with the trim step already done by the compression
  (``peft.utils.merge_utils.ties(..., density=1.0)``): elect the sign of each entry from
  ``sum_i t_i`` (``sign="total"``; a zero sum counts as positive) or from the count of
  positive minus negative entries (``sign="frequency"``), then average ``w_i t_i`` over the
  inputs whose entry is nonzero with the elected sign (zero where there is none). The weights
  take no part in the election, as in PEFT.

Arithmetic is done in float32 (float64 for F64 tensors; BF16 and F16 values widen exactly), in
PEFT's order of operations, adding the inputs one after the other in input order: on the same
float32 inputs the results equal PEFT's wherever PyTorch adds the stacked inputs in that order
(it does for most elements; where it does not, they differ by float rounding).

How it is fast
--------------
A ternary input is a set of positions with signs and one magnitude, so at every position the
merged value depends only on which inputs are nonzero there and with what sign: its *pattern*,
one of ``3^n``. The value of every pattern is computed once, with the very arithmetic above
applied to a table of all patterns, and the tensor is merged by scattering each input's
pattern digit (``3^i`` for plus, ``2 * 3^i`` for minus) into a cache-sized chunk of ``uint16``
codes and looking the codes up in the table: no dense float array of any input is built. For
more than :data:`MAX_PATTERN_INPUTS` inputs, or when an input is dense, the stacked dense
chunk is combined directly (same arithmetic, slower).

Rescaling (a plug-in point)
---------------------------
``rescale`` (a callable, or the name of a rule in :data:`RESCALE_RULES`) is called once per
tensor with a :class:`MergeStats` and may change the magnitudes, the divisor or the merged
values (:mod:`compeft_format.merge_rescale`). For TIES of compressed experts use
``rescale="expected_ties"`` (:func:`expected_ties`); ``rescale="dense_divisor"``
(:func:`dense_divisor`) is the simpler earlier rule. Both are measured in
``bench/results/merge_quality.md``; neither is the default, which stays PEFT's definition.

The arithmetic and the pattern tables are :mod:`compeft_format.merge_math`; this module
merges tensors with them, chunk by chunk (:class:`TensorMerge`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from . import dtypes as _dt
from ._spec import TERNARY_DTYPES
from .errors import EncodeError, MergeError
from .merge_math import (
    MAX_PATTERN_INPUTS,
    METHODS,
    SIGN_METHODS,
    check_options,
    combine,
    pattern_table,
    scaled_magnitudes,
    weights_array,
    work_dtype,
)
from .merge_rescale import (
    EXPECTED_SAMPLES,
    RESCALE_RULES,
    MergeStats,
    Rescale,
    RescaleRule,
    as_rescale,
    dense_divisor,
    expected_ties,
    prepared_rescales,
    resolve_rescale,
)
from .tensor import TernaryTensor, dense_values

# the rescale rules and the arithmetic are re-exported: ``compeft_format.merge`` is where a
# user looks for everything about merging
__all__ = [
    "EXPECTED_SAMPLES",
    "MAX_PATTERN_INPUTS",
    "METHODS",
    "RESCALE_RULES",
    "SIGN_METHODS",
    "MergeError",
    "MergeStats",
    "Rescale",
    "RescaleRule",
    "TensorMerge",
    "check_fit",
    "check_names",
    "check_options",
    "combine",
    "dense_divisor",
    "describe_value",
    "expected_ties",
    "merge",
    "merge_tensor",
    "prepared_rescales",
    "resolve_rescale",
]

_CHUNK = 1 << 16  # elements per chunk: the codes, the lookup's index temporary and the
#                   values of a chunk stay in L2


# ---------------------------------------------------------------------------------------------
# one tensor
# ---------------------------------------------------------------------------------------------
class TensorMerge:
    """The merge of one tensor's inputs, produced chunk by chunk.

    ``values``: one per input, a :class:`TernaryTensor` or a flat dense *storage* array of
    the tensor (with ``dtype`` naming it: BF16 as raw ``uint16`` bits). All must have
    ``shape``'s element count. Nothing is computed until asked: :meth:`stats`,
    :meth:`chunks`, :meth:`codes` or :meth:`to_numpy`.

    >>> a = TernaryTensor((3,), [0, 2], [False, True], 0.5)
    >>> b = TernaryTensor((3,), [1, 2], [False, False], 0.25)
    >>> TensorMerge("w", (3,), "F32", [a, b]).to_numpy().tolist()
    [0.5, 0.25, -0.5]
    """

    def __init__(self, name: str, shape: tuple[int, ...], dtype: str,
                 values: Sequence[TernaryTensor | np.ndarray], *, method: str = "ties",
                 weights: Sequence[float] | None = None, sign: str = "total",
                 rescale: str | RescaleRule | Rescale | None = None,
                 proj_scales: Sequence[float | None] | None = None) -> None:
        self.weights = check_options(len(values), method, weights, sign)
        if proj_scales is not None and len(proj_scales) != len(values):
            raise MergeError(f"proj_scales gives {len(proj_scales)} scales for {len(values)} "
                             "inputs", tensor=name)
        self._proj = None if proj_scales is None else tuple(
            None if p is None else float(p) for p in proj_scales)
        self.name = name
        self.shape = tuple(shape)
        self.dtype = dtype
        self.method = method
        self.sign = sign
        self.numel = math.prod(self.shape)
        self.values = list(values)
        self.work = work_dtype(dtype)
        self._w = weights_array(self.weights, self.work, name)
        self.patterns = (len(values) <= MAX_PATTERN_INPUTS
                         and all(isinstance(v, TernaryTensor) for v in values))
        self._mags = tuple(
            float(dense_values(v.scale, dtype)[0]) if isinstance(v, TernaryTensor) else None
            for v in values)
        self._rescale: Rescale | None = None
        if isinstance(rescale, Rescale):  # a rule's answer, given again: it need not rerun
            self._rescale = as_rescale(rescale, len(values), name)
            rescale = None
        self._rule = resolve_rescale(rescale)
        self._table: np.ndarray | None = None
        self._stats: MergeStats | None = None

    # -- statistics and the rescale rule --
    def stats(self) -> MergeStats:
        """Count the sign patterns (one pass over the codes); cached."""
        if self._stats is None:
            counts = None
            if self.patterns:
                counts = np.zeros(3 ** len(self.values), np.int64)
                for _, codes in self.codes():
                    counts += np.bincount(codes, minlength=counts.size)
            self._stats = MergeStats(self.name, self.shape, self.dtype, self.method, self.sign,
                                     self.weights, self._mags, counts, self._proj)
        return self._stats

    @property
    def rescale(self) -> Rescale:
        """The rescaling applied (the rule's answer; identity without a rule)."""
        if self._rescale is None:
            self._rescale = (Rescale() if self._rule is None else
                             as_rescale(self._rule(self.stats()), len(self.values), self.name))
        return self._rescale

    def table(self) -> np.ndarray:
        """The merged value of every sign pattern, rescaling included (pattern path only)."""
        if self._table is None:
            r = self.rescale
            with np.errstate(over="ignore", invalid="ignore"):  # users check_finite theirs
                if r.table is not None:
                    table = np.array(r.table, dtype=np.float64).astype(self.work)
                else:
                    mags = scaled_magnitudes(self._mags, r.before, self.work)
                    table = pattern_table(mags, self._w, self.method, self.sign, r.zeros)
                if r.after != 1.0:
                    table = table * self.work.type(r.after)
            self._table = table  # a pattern may overflow: check_finite what is used of it
        return self._table

    # -- the passes --
    def codes(self, size: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, codes)``: the sign pattern of each element, ``size`` at a time.

        The codes array is reused from chunk to chunk: use it before the next one.
        """
        if not self.patterns:
            raise MergeError("sign patterns need at most "
                             f"{MAX_PATTERN_INPUTS} ternary inputs", tensor=self.name)
        n = self.numel
        size = size or _CHUNK
        starts = np.arange(0, n, size, dtype=np.int64)
        edges = np.append(starts, n)
        parts = []
        for i, t in enumerate(self.values):
            assert isinstance(t, TernaryTensor)
            digit = np.array([3**i, 2 * 3**i], np.uint16)
            parts.append((t.indices, digit.take(t.signs.view(np.uint8)),
                          np.searchsorted(t.indices, edges)))
        buf = np.zeros(min(size, max(n, 1)), np.uint16)
        for j, a in enumerate(starts.tolist()):
            codes = buf[: min(size, n - a)]
            codes.fill(0)
            for indices, contrib, bounds in parts:
                lo, hi = bounds[j], bounds[j + 1]
                if hi > lo:
                    codes[indices[lo:hi] - a] += contrib[lo:hi]
            yield a, codes

    def chunks(self, size: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, merged values)`` in the compute dtype, ``size`` elements at a time."""
        size = size or _CHUNK
        if self.patterns:
            table = self.table()
            finite = bool(np.isfinite(table).all())
            for a, codes in self.codes(size):
                out = table.take(codes)
                if not finite:
                    self.check_finite(out, f"entries {a} to {a + out.size - 1}")
                yield a, out
            return
        r = self.rescale
        if r.table is not None:
            raise MergeError("a rescale table needs ternary inputs merged by sign patterns "
                             f"(at most {MAX_PATTERN_INPUTS}, none dense)", tensor=self.name)
        before = (None if r.before is None
                  else weights_array(r.before, self.work))
        stack = np.empty((len(self.values), min(size, max(self.numel, 1))), self.work)
        for a in range(0, self.numel, size):
            m = min(size, self.numel - a)
            rows = stack[:, :m]
            for i, v in enumerate(self.values):
                self._fill_row(rows[i], v, a, m)
                if before is not None:
                    rows[i] *= before[i]
            with np.errstate(over="ignore", invalid="ignore"):  # checked next
                out = combine(rows, self._w, self.method, self.sign, r.zeros)
                if r.after != 1.0:
                    out *= self.work.type(r.after)
            self.check_finite(out, f"entries {a} to {a + m - 1}")
            yield a, out

    def check_finite(self, values: np.ndarray, where: str) -> None:
        """Refuse merged ``values`` (``where``: which, for the message) that overflowed the
        compute dtype: a :class:`MergeError` naming the tensor, before anything is written.

        >>> big = TernaryTensor((2,), [0], [False], 3e38)
        >>> TensorMerge("w", (2,), "F32", [big, big], method="sum").to_numpy()
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        compeft_format.errors.MergeError: tensor 'w': the merge is not finite in float32: 1 of 2...
        """
        if not np.isfinite(values).all():
            bad = int(np.count_nonzero(~np.isfinite(values)))
            raise MergeError(f"the merge is not finite in {self.work.name}: {bad} of "
                             f"{values.size} {where} are inf or nan (weights "
                             f"{list(self.weights)}; are they, or the inputs' values, too "
                             "large?)", tensor=self.name)

    def _fill_row(self, row: np.ndarray, v: TernaryTensor | np.ndarray, a: int, m: int) -> None:
        if isinstance(v, TernaryTensor):
            row.fill(0)
            lo, hi = np.searchsorted(v.indices, [a, a + m])
            if hi > lo:
                mag = self.work.type(dense_values(v.scale, self.dtype)[0])
                row[v.indices[lo:hi] - a] = np.where(v.signs[lo:hi], -mag, mag)
        else:
            row[:] = _dt.to_numpy_values(v[a : a + m], self.dtype)

    def to_numpy(self) -> np.ndarray:
        """The merged tensor as one array of the compute dtype (float32; F64: float64)."""
        out = np.empty(self.numel, self.work)
        for a, c in self.chunks():
            out[a : a + c.size] = c
        return out.reshape(self.shape)


# ---------------------------------------------------------------------------------------------
# in memory
# ---------------------------------------------------------------------------------------------
def describe_value(value: Any, name: str, where: int) -> tuple[tuple[int, ...], str,
                                                          TernaryTensor | np.ndarray]:
    """``(shape, dtype, value)``: a TernaryTensor as it is, arrays as flat storage."""
    if isinstance(value, TernaryTensor):
        return value.shape, value.dtype, value
    try:
        storage, dtype = _dt.to_storage(value)
    except EncodeError as exc:
        raise MergeError(f"input {where}: {exc.message}", tensor=name) from None
    if dtype not in TERNARY_DTYPES:
        raise MergeError(f"input {where}: dtype {dtype} is not a float dtype "
                         f"{TERNARY_DTYPES}", tensor=name)
    return tuple(storage.shape), dtype, storage.reshape(-1)


def merge_tensor(values: Sequence[Any], *, method: str = "ties",
                 weights: Sequence[float] | None = None, sign: str = "total",
                 rescale: str | RescaleRule | None = None, name: str = "tensor") -> np.ndarray:
    """Merge one tensor's task vectors (TernaryTensor, numpy arrays or torch tensors).

    Returns a numpy array of the inputs' shape in float32 (float64 for F64 inputs).

    >>> a = TernaryTensor((4,), [0, 1], [False, True], 1.0)
    >>> b = TernaryTensor((4,), [1, 3], [False, False], 3.0)
    >>> merge_tensor([a, b]).tolist()            # entry 1: +3 wins the election
    [1.0, 3.0, 0.0, 3.0]
    >>> merge_tensor([a, b], method="sum", weights=[1, 0.5]).tolist()
    [1.0, 0.5, 0.0, 1.5]
    """
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
        raise MergeError("values must be a sequence of tensors")
    described = [describe_value(v, name, i) for i, v in enumerate(values)]
    check_fit(name, [(s, d) for s, d, _ in described])
    shape, dtype = described[0][0], described[0][1]
    return TensorMerge(name, shape, dtype, [v for _, _, v in described], method=method,
                       weights=weights, sign=sign, rescale=rescale).to_numpy()


def check_fit(name: str, described: Sequence[tuple[tuple[int, ...], str]]) -> None:
    if not described:
        raise MergeError("nothing to merge: no inputs", tensor=name)
    shape, dtype = described[0]
    for i, (s, d) in enumerate(described[1:], start=1):
        if s != shape:
            raise MergeError(f"shape {list(s)} in input {i}, {list(shape)} in input 0",
                             tensor=name)
        if d != dtype:
            raise MergeError(f"dtype {d} in input {i}, {dtype} in input 0", tensor=name)


def check_names(names: Sequence[Sequence[str]], labels: Sequence[str] | None = None) -> None:
    """Raise :class:`MergeError` naming the first tensor not in every input.

    >>> check_names([["a", "b"], ["a"]])
    Traceback (most recent call last):
    ...
    compeft_format.errors.MergeError: tensor 'b': in input 0, missing from input 1
    """
    labels = list(labels) if labels is not None else [f"input {i}" for i in range(len(names))]
    sets = [set(n) for n in names]
    everything = sorted(set().union(*sets), key=lambda s: s.encode("utf-8", "surrogatepass"))
    for name in everything:
        missing = [lab for lab, s in zip(labels, sets, strict=True) if name not in s]
        if missing:
            have = next(lab for lab, s in zip(labels, sets, strict=True) if name in s)
            raise MergeError(f"in {have}, missing from {missing[0]}", tensor=name)


def merge(task_vectors: Sequence[Mapping[str, Any]], *, method: str = "ties",
          weights: Sequence[float] | None = None, sign: str = "total",
          rescale: str | RescaleRule | None = None,
          proj_scales: Sequence[Mapping[str, float] | None] | None = None
          ) -> dict[str, np.ndarray]:
    """Merge task vectors: task arithmetic (``"sum"``, ``"mean"``) or TIES (``"ties"``).

    Parameters
    ----------
    task_vectors:
        One mapping per expert, name -> :class:`TernaryTensor`, numpy array or torch tensor
        (float16, bfloat16, float32, float64): the decoded task vectors (what
        :func:`~compeft_format.load_file` returns, or :func:`~compeft_format.compress`).
        All must hold the same names, with the same shapes and dtypes.
    method:
        ``"ties"`` (default), ``"sum"`` or ``"mean"``; see the module doc.
    weights:
        One finite number per expert (default all 1), applied in the compute dtype.
    sign:
        The TIES sign election: ``"total"`` (sign of the sum; default) or ``"frequency"``
        (sign of the majority; ties count as positive).
    rescale:
        A data-free rescaling rule, per tensor: a callable taking a :class:`MergeStats` and
        returning a factor or a :class:`Rescale`, or the name of one in
        :data:`RESCALE_RULES`.
    proj_scales:
        Per expert, None or name -> the ``proj`` scale a later scale rule replaced in its
        compression (:attr:`MergeStats.proj_scales`; what a file records, spec 5.2.1), for
        rules that infer thresholds from it (:func:`expected_ties`).

    Returns
    -------
    dict
        name -> merged numpy array, float32 (float64 for F64 tensors), in the order of the
        first mapping.

    Raises
    ------
    MergeError
        Names, shapes or dtypes that differ (the first mismatch is named), a non-float
        tensor, or a bad option.

    Examples
    --------
    >>> e1 = {"w": TernaryTensor((2, 2), [0, 3], [False, True], 0.5)}
    >>> e2 = {"w": TernaryTensor((2, 2), [0, 1], [True, False], 0.25)}
    >>> merge([e1, e2])["w"].tolist()          # entry 0: +0.5 and -0.25 elect plus
    [[0.5, 0.25], [0.0, -0.5]]
    >>> merge([e1, e2], method="mean")["w"].tolist()
    [[0.125, 0.125], [0.0, -0.25]]
    """
    if isinstance(task_vectors, Mapping) or not isinstance(task_vectors, Sequence):
        raise MergeError("task_vectors must be a sequence of mappings, one per expert")
    ws = check_options(len(task_vectors), method, weights, sign)
    check_names([list(tv.keys()) for tv in task_vectors])
    if proj_scales is not None and len(proj_scales) != len(task_vectors):
        raise MergeError(f"proj_scales gives {len(proj_scales)} mappings for "
                         f"{len(task_vectors)} experts")
    jobs = []
    for name in task_vectors[0]:  # every mismatch is found before any work is done
        described = [describe_value(tv[name], name, i) for i, tv in enumerate(task_vectors)]
        check_fit(name, [(s, d) for s, d, _ in described])
        proj = (None if proj_scales is None
                else [p.get(name) if p else None for p in proj_scales])
        jobs.append(TensorMerge(name, described[0][0], described[0][1],
                                [v for _, _, v in described], method=method, weights=ws,
                                sign=sign, rescale=rescale, proj_scales=proj))
    by_name = {job.name: job for job in jobs}
    prepared = prepared_rescales(rescale, list(by_name), lambda n: by_name[n].stats())
    for name, r in prepared.items():
        by_name[name]._rescale = r
    return {job.name: job.to_numpy() for job in jobs}
