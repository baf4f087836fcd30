"""Merging task vectors: task arithmetic and TIES, straight from sparse ternary tensors.

:func:`merge` combines task vectors held in memory (dicts of :class:`TernaryTensor`, numpy
arrays or torch tensors); :func:`merge_files` does the same from compeft files or compressed
adapter directories, one tensor at a time.

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
tensor with a :class:`MergeStats`: the inputs' magnitudes, the weights and, for ternary
inputs, how many entries carry each sign pattern. It returns a factor for the merged tensor,
or a :class:`Rescale` that also multiplies each input's magnitude *before* the election and
the averaging. Rules are data-free: they see the structure of the inputs, not a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import dtypes as _dt
from ._spec import TERNARY_DTYPES
from .compress import (
    DEFAULT_SCALE,
    TopK,
    compression_metadata,
    iter_compress,
)
from .errors import CompeftError, EncodeError
from .tensor import TernaryTensor, dense_values

__all__ = [
    "MAX_PATTERN_INPUTS",
    "METHODS",
    "PATTERN_SCALES",
    "RESCALE_RULES",
    "SIGN_METHODS",
    "MergeError",
    "MergeStats",
    "Rescale",
    "TensorMerge",
    "check_names",
    "check_options",
    "combine",
    "merge",
    "merge_and_compress",
    "merge_tensor",
]

METHODS = ("ties", "sum", "mean")
SIGN_METHODS = ("total", "frequency")
#: Up to this many ternary inputs a tensor is merged through its table of sign patterns
#: (``3^8 = 6561`` entries; codes fit in ``uint16``); more go through dense chunks.
MAX_PATTERN_INPUTS = 8
_CHUNK = 1 << 16  # elements per chunk: the codes, the lookup's index temporary and the
#                   values of a chunk stay in L2


class MergeError(CompeftError, ValueError):
    """Inputs that do not fit together (names, shapes, dtypes, references), or a bad option."""


# ---------------------------------------------------------------------------------------------
# rescaling hook
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rescale:
    """What a rescaling rule returns for one tensor.

    ``before``: one factor per input, multiplying its magnitude (ternary) or values (dense)
    before the sign election and the averaging (None: all 1). ``after``: a factor multiplying
    the merged tensor.

    >>> Rescale(after=0.5)
    Rescale(before=None, after=0.5)
    """

    before: tuple[float, ...] | None = None
    after: float = 1.0


@dataclass(frozen=True)
class MergeStats:
    """What a rescaling rule sees of one tensor (data-free: the inputs' structure only).

    Attributes
    ----------
    name, shape, dtype:
        The tensor.
    method, sign:
        The merge options.
    weights:
        One weight per input (as given, before the cast to the compute dtype).
    magnitudes:
        Each ternary input's magnitude as decoded (its scale rounded to the dtype); None for
        a dense input.
    counts:
        When every input is ternary and there are at most :data:`MAX_PATTERN_INPUTS` of them:
        ``counts[p]`` entries of the tensor have sign pattern ``p``, where digit ``i`` of
        ``p`` in base 3, ``(p // 3**i) % 3``, is 0 if input ``i`` is zero there, 1 if
        positive, 2 if negative (:meth:`digits`). Else None (the rule must then cope without).

    Examples
    --------
    >>> a = TernaryTensor((4,), [0, 1], [False, False], 1.0)
    >>> b = TernaryTensor((4,), [1, 2], [True, False], 1.0)
    >>> seen = []
    >>> _ = merge_tensor([a, b], rescale=lambda s: seen.append(s) or 1.0)
    >>> seen[0].overlap().tolist()   # entries nonzero in 0, 1 and 2 inputs
    [1, 2, 1]
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    method: str
    sign: str
    weights: tuple[float, ...]
    magnitudes: tuple[float | None, ...]
    counts: np.ndarray | None

    @property
    def n(self) -> int:
        """Number of inputs."""
        return len(self.weights)

    @property
    def numel(self) -> int:
        """Elements of the tensor."""
        return math.prod(self.shape)

    def digits(self) -> np.ndarray:
        """``(n, 3**n)`` array: digit ``i`` of every pattern (0 zero, 1 plus, 2 minus)."""
        return _digits(self.n)

    def overlap(self) -> np.ndarray:
        """Entries by how many inputs are nonzero there: an array of ``n + 1`` counts."""
        if self.counts is None:
            raise MergeError("overlap needs ternary inputs (counts is None)", tensor=self.name)
        nonzero = (self.digits() != 0).sum(axis=0)
        return np.bincount(nonzero, weights=self.counts, minlength=self.n + 1).astype(np.int64)

    def values(self, before: Sequence[float] | None = None) -> np.ndarray:
        """The merged value of every pattern (``3**n`` values; ``before`` as in Rescale)."""
        if self.counts is None:
            raise MergeError("values needs ternary inputs (counts is None)", tensor=self.name)
        work = _work_dtype(self.dtype)
        mags = _scaled_magnitudes(self.magnitudes, before, work)
        return _pattern_table(mags, _weights_array(self.weights, work), self.method, self.sign)


RescaleRule = Callable[[MergeStats], float | Rescale]
#: Named data-free rescaling rules (``rescale="name"``, ``compeft merge --rescale NAME``).
RESCALE_RULES: dict[str, RescaleRule] = {}


def _resolve_rescale(rescale: str | RescaleRule | None) -> RescaleRule | None:
    if rescale is None or callable(rescale):
        return rescale
    try:
        return RESCALE_RULES[rescale]
    except (KeyError, TypeError):
        raise MergeError(f"rescale must be a callable or one of {sorted(RESCALE_RULES)}, "
                         f"got {rescale!r}") from None


def _as_rescale(result: Any, n: int, name: str) -> Rescale:
    if isinstance(result, Rescale):
        out = result
    elif isinstance(result, (int, float, np.integer, np.floating)) and not isinstance(result,
                                                                                       bool):
        out = Rescale(after=float(result))
    else:
        raise MergeError(f"a rescale rule returns a float or a Rescale, got {result!r}",
                         tensor=name)
    factors = [*list(out.before or ()), out.after]
    if out.before is not None and len(out.before) != n:
        raise MergeError(f"rescale gave {len(out.before)} input factors for {n} inputs",
                         tensor=name)
    if not all(math.isfinite(float(f)) for f in factors):
        raise MergeError(f"rescale factors must be finite, got {out}", tensor=name)
    return out


# ---------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------
def check_options(n: int, method: str, weights: Sequence[float] | None, sign: str
                  ) -> tuple[float, ...]:
    """Check the merge options for ``n`` inputs; return the weights (default all 1).

    >>> check_options(2, "ties", None, "total")
    (1.0, 1.0)
    """
    if method not in METHODS:
        raise MergeError(f"method must be one of {METHODS}, got {method!r}")
    if sign not in SIGN_METHODS:
        raise MergeError(f"sign must be one of {SIGN_METHODS}, got {sign!r}")
    if n < 1:
        raise MergeError("nothing to merge: no inputs")
    if weights is None:
        return (1.0,) * n
    if isinstance(weights, (str, bytes)):
        raise MergeError(f"weights must be a sequence of numbers, got {weights!r}")
    ws = list(weights.tolist() if hasattr(weights, "tolist") else weights)
    if len(ws) != n:
        raise MergeError(f"{len(ws)} weights for {n} inputs")
    out = []
    for w in ws:
        if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)):
            raise MergeError(f"weights must be numbers, got {w!r}")
        if not math.isfinite(float(w)):
            raise MergeError(f"weights must be finite, got {float(w)!r}")
        out.append(float(w))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# the arithmetic (PEFT's, in numpy)
# ---------------------------------------------------------------------------------------------
def _work_dtype(dtype: str) -> np.dtype:
    return np.dtype(np.float64 if dtype == "F64" else np.float32)


def _weights_array(weights: Sequence[float], work: np.dtype) -> np.ndarray:
    return np.array(weights, dtype=np.float64).astype(work)


def _seqsum(rows: np.ndarray) -> np.ndarray:
    """Sum over axis 0, adding the rows one after the other (the order is part of the result)."""
    acc = np.zeros(rows.shape[1:], rows.dtype)
    for r in rows:
        acc += r
    return acc


def combine(stack: np.ndarray, weights: np.ndarray, method: str, sign: str) -> np.ndarray:
    """Merge ``stack`` (``n`` task vectors on axis 0) as PEFT does, in ``stack``'s dtype.

    ``weights`` holds ``n`` values of the same dtype. This is the definition every fast path
    is checked against.

    >>> t = np.array([[1.0, -2.0, 0.0], [3.0, 1.0, 0.0]], np.float32)
    >>> combine(t, np.ones(2, np.float32), "ties", "total").tolist()
    [2.0, -2.0, 0.0]
    >>> combine(t, np.ones(2, np.float32), "sum", "total").tolist()
    [4.0, -1.0, 0.0]
    """
    work = stack.dtype
    w = weights.reshape((-1,) + (1,) * (stack.ndim - 1))
    weighted = stack * w
    if method == "sum":
        return _seqsum(weighted)
    if method == "mean":
        return _seqsum(weighted) / work.type(stack.shape[0])
    signs = np.sign(stack)
    elected = _seqsum(stack) if sign == "total" else _seqsum(signs)
    majority = np.where(elected >= 0, work.type(1), work.type(-1))
    mask = signs == majority
    mixed = _seqsum(weighted * mask)
    kept = mask.sum(axis=0)
    return mixed / np.maximum(kept, 1).astype(work)


def _digits(n: int) -> np.ndarray:
    """``(n, 3**n)`` uint8: digit i (base 3) of every pattern."""
    p = np.arange(3**n, dtype=np.int64)
    return np.stack([(p // 3**i) % 3 for i in range(n)]).astype(np.uint8) if n else np.zeros(
        (0, 1), np.uint8)


def _pattern_table(mags: np.ndarray, weights: np.ndarray, method: str, sign: str) -> np.ndarray:
    """The merged value of every sign pattern of ternary inputs with magnitudes ``mags``."""
    d = _digits(mags.size)
    zero = mags.dtype.type(0)
    stack = np.where(d == 1, mags[:, None], np.where(d == 2, -mags[:, None], zero))
    return combine(stack.astype(mags.dtype, copy=False), weights, method, sign)


def _scaled_magnitudes(mags: Sequence[float | None], before: Sequence[float] | None,
                       work: np.dtype) -> np.ndarray:
    m = np.array([0.0 if v is None else v for v in mags], dtype=np.float64).astype(work)
    if before is not None:
        m = m * np.array(before, dtype=np.float64).astype(work)
    return m


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
                 rescale: str | RescaleRule | Rescale | None = None) -> None:
        self.weights = check_options(len(values), method, weights, sign)
        self.name = name
        self.shape = tuple(shape)
        self.dtype = dtype
        self.method = method
        self.sign = sign
        self.numel = math.prod(self.shape)
        self.values = list(values)
        self.work = _work_dtype(dtype)
        self._w = _weights_array(self.weights, self.work)
        self.patterns = (len(values) <= MAX_PATTERN_INPUTS
                         and all(isinstance(v, TernaryTensor) for v in values))
        self._mags = tuple(
            float(dense_values(v.scale, dtype)[0]) if isinstance(v, TernaryTensor) else None
            for v in values)
        self._rescale: Rescale | None = None
        if isinstance(rescale, Rescale):  # a rule's answer, given again: it need not rerun
            self._rescale = _as_rescale(rescale, len(values), name)
            rescale = None
        self._rule = _resolve_rescale(rescale)
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
                                     self.weights, self._mags, counts)
        return self._stats

    @property
    def rescale(self) -> Rescale:
        """The rescaling applied (the rule's answer; identity without a rule)."""
        if self._rescale is None:
            self._rescale = (Rescale() if self._rule is None else
                             _as_rescale(self._rule(self.stats()), len(self.values), self.name))
        return self._rescale

    def table(self) -> np.ndarray:
        """The merged value of every sign pattern, rescaling included (pattern path only)."""
        if self._table is None:
            r = self.rescale
            mags = _scaled_magnitudes(self._mags, r.before, self.work)
            table = _pattern_table(mags, self._w, self.method, self.sign)
            if r.after != 1.0:
                table = table * self.work.type(r.after)
            self._table = table
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
            for a, codes in self.codes(size):
                yield a, table.take(codes)
            return
        r = self.rescale
        before = (None if r.before is None
                  else _weights_array(r.before, self.work))
        stack = np.empty((len(self.values), min(size, max(self.numel, 1))), self.work)
        for a in range(0, self.numel, size):
            m = min(size, self.numel - a)
            rows = stack[:, :m]
            for i, v in enumerate(self.values):
                self._fill_row(rows[i], v, a, m)
                if before is not None:
                    rows[i] *= before[i]
            out = combine(rows, self._w, self.method, self.sign)
            if r.after != 1.0:
                out *= self.work.type(r.after)
            yield a, out

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
def _describe(value: Any, name: str, where: int) -> tuple[tuple[int, ...], str,
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
    described = [_describe(v, name, i) for i, v in enumerate(values)]
    _check_fit(name, [(s, d) for s, d, _ in described])
    shape, dtype = described[0][0], described[0][1]
    return TensorMerge(name, shape, dtype, [v for _, _, v in described], method=method,
                       weights=weights, sign=sign, rescale=rescale).to_numpy()


def _check_fit(name: str, described: Sequence[tuple[tuple[int, ...], str]]) -> None:
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
    compeft_format.merge.MergeError: tensor 'b': in input 0, missing from input 1
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
          rescale: str | RescaleRule | None = None) -> dict[str, np.ndarray]:
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
    jobs = []
    for name in task_vectors[0]:  # every mismatch is found before any work is done
        described = [_describe(tv[name], name, i) for i, tv in enumerate(task_vectors)]
        _check_fit(name, [(s, d) for s, d, _ in described])
        jobs.append(TensorMerge(name, described[0][0], described[0][1],
                                [v for _, _, v in described], method=method, weights=ws,
                                sign=sign, rescale=rescale))
    return {job.name: job.to_numpy() for job in jobs}


# ---------------------------------------------------------------------------------------------
# compressing a merge again (ternary output)
# ---------------------------------------------------------------------------------------------
#: The scale rules the sign-pattern compression computes itself (any other goes through
#: :func:`~compeft_format.compress.iter_compress` on the dense merged tensors).
PATTERN_SCALES = ("proj_vcap", "proj", "norm", "l2", "std")


@dataclass
class _Counted:
    """One merged tensor as distinct values and how many entries hold each."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    values: np.ndarray  # float64: the merged value of each pattern that occurs
    counts: np.ndarray  # int64: entries per value
    rescale: Rescale


def _counted(tm: TensorMerge) -> _Counted:
    stats = tm.stats()
    assert stats.counts is not None
    seen = np.flatnonzero(stats.counts)
    values = tm.table()[seen].astype(np.float64)
    return _Counted(tm.name, tm.shape, tm.dtype, tm.numel, values, stats.counts[seen],
                    tm.rescale)


def _select_counted(items: Sequence[_Counted], k: int) -> TopK:
    """The exact top-k of the entries' magnitudes, as compress's select_topk gives it."""
    n = sum(c.numel for c in items)
    if k <= 0 or n == 0:
        return TopK(math.inf, 0, 0)
    k = min(k, n)
    mags = np.abs(np.concatenate([c.values for c in items]))
    counts = np.concatenate([c.counts for c in items])
    distinct, where = np.unique(mags, return_inverse=True)
    per = np.bincount(where.reshape(-1), weights=counts, minlength=distinct.size)
    per = np.rint(per).astype(np.int64)  # exact: counts are below 2^53
    from_top = np.cumsum(per[::-1])  # entries with magnitude >= distinct[::-1][i]
    i = int(np.searchsorted(from_top, k))
    t = float(distinct[::-1][i])
    greater = int(from_top[i] - per[::-1][i])
    if t == 0.0:  # zeros are never kept
        return TopK(0.0, greater, 0)
    return TopK(t, greater, k - greater)


def _pattern_scale(items: Sequence[_Counted], top: TopK, scale: str, alpha: float) -> float:
    """The scope's scale from the counted values, by compress's rules (float32-exact)."""
    if top.kept == 0:
        return 0.0
    values = np.concatenate([c.values for c in items])
    counts = np.concatenate([c.counts for c in items]).astype(np.float64)
    n = sum(c.numel for c in items)
    mags = np.abs(values)
    sumsq = float(np.dot(counts, values * values))
    kept_sum = float(np.dot(counts[mags > top.threshold], mags[mags > top.threshold]))
    kept_sum += top.n_ties * top.threshold
    if scale in ("proj", "proj_vcap"):
        raw = alpha * (sumsq / kept_sum)
    elif scale == "norm":
        raw = alpha * math.sqrt(sumsq) / math.sqrt(top.kept)
    elif scale == "l2":
        raw = alpha * kept_sum / top.kept
    else:  # std: unbiased, over every entry (zeros included)
        mean = float(np.dot(counts, values)) / n
        m2 = float(np.dot(counts, (values - mean) ** 2))
        raw = alpha * (math.sqrt(max(m2, 0.0) / (n - 1)) if n > 1 else 0.0)
    where = items[0].name if len(items) == 1 else None
    scope = "" if where else f"global scope ({len(items)} tensors): "
    with np.errstate(over="ignore"):
        value = float(np.float32(raw))
    if not math.isfinite(value):
        raise EncodeError(f"{scope}scale {raw!r} overflows float32", tensor=where)
    for c in items:  # the decoder rounds the scale to each tensor's dtype
        if c.numel and not math.isfinite(float(dense_values(value, c.dtype)[0])):
            raise EncodeError(f"{scope}scale {value!r} overflows the tensor's dtype {c.dtype}",
                              tensor=c.name)
    return value


def _is_vector(shape: tuple[int, ...]) -> bool:
    return sum(d > 1 for d in shape) <= 1


def _gather(tm: TensorMerge, top: TopK, ties_left: int, scale: float
            ) -> tuple[TernaryTensor, int]:
    """The kept entries of one merged tensor (ties first come, first kept), from its codes."""
    table = tm.table().astype(np.float64)
    t = top.threshold
    keep = np.abs(table) > t
    tie = np.abs(table) == t
    negative = np.signbit(table)
    idx_parts, sign_parts = [], []
    for a, codes in tm.codes():
        sel = keep.take(codes)
        if ties_left:
            eq = np.flatnonzero(tie.take(codes))[:ties_left]
            sel[eq] = True
            ties_left -= eq.size
        loc = np.flatnonzero(sel)
        if loc.size:
            idx_parts.append(loc + a)
            sign_parts.append(negative.take(codes[loc]))
    idx = np.concatenate(idx_parts) if idx_parts else np.empty(0, np.int64)
    signs = np.concatenate(sign_parts) if sign_parts else np.empty(0, bool)
    return TernaryTensor(tm.shape, idx, signs, scale, tm.dtype, _validated=True), ties_left


def _compress_merged(
    names: Sequence[str],
    make: Callable[[str, Rescale | None], TensorMerge],
    dtypes: Mapping[str, str],
    patterns: bool,
    *,
    density: float,
    alpha: float = 1.0,
    scope: str = "global",
    scale: str = DEFAULT_SCALE,
) -> Iterator[tuple[str, TernaryTensor]]:
    """Compress merged tensors again, yielding ``(name, TernaryTensor)`` in ``names`` order.

    The result is :func:`~compeft_format.compress.iter_compress` of the dense merged tensors
    (the same kept entries and signs; the scale equal up to the rounding of float64 sums);
    ``names`` must be sorted. ``make(name, rescale)`` builds the :class:`TensorMerge` of a
    tensor (``rescale`` None the first time, then the :class:`Rescale` it gave, so that a
    rule runs once per tensor); it is called twice per tensor, and nothing is kept between
    the calls but the counts of the sign patterns. Unless ``patterns`` (every tensor has a
    pattern table) and the scale rule is one of :data:`PATTERN_SCALES`, the dense merged
    tensors go through ``iter_compress`` instead (each merged up to four times).
    """
    compression_metadata(density, alpha, scope, scale)  # checks the options
    names = list(names)
    if scale not in PATTERN_SCALES or not patterns:
        merged = _MergedTensors(names, make, dtypes)
        yield from iter_compress(merged, density=density, alpha=alpha, scope=scope,
                                 scale=scale)
        return
    scopes = [names] if scope == "global" else [[n] for n in names]
    for group in scopes:
        items = [_counted(make(n, None)) for n in group]
        n_total = sum(c.numel for c in items)
        k = max(1, round(density * n_total)) if n_total else 0
        top = _select_counted(items, k)
        value = _pattern_scale(items, top, scale, alpha)
        ties_left = top.n_ties
        for c in items:
            if value == 0.0 or not c.numel or top.kept == 0:
                yield c.name, TernaryTensor.zeros(c.shape, c.dtype)
                continue
            own = value
            if scale == "proj_vcap" and _is_vector(c.shape):
                absmax = float(np.abs(c.values).max(initial=0.0))
                own = min(value, float(np.float32(alpha * absmax)))
            out, ties_left = _gather(make(c.name, c.rescale), top, ties_left, own)
            yield c.name, out


class _MergedTensors(Mapping):
    """The dense merged tensors, computed on access (for iter_compress)."""

    def __init__(self, names: list[str], make: Callable[[str, Rescale | None], TensorMerge],
                 dtypes: Mapping[str, str]) -> None:
        self._names = names
        self._make = make
        self._rescales: dict[str, Rescale] = {}
        self.dtypes = dict(dtypes)  # the tensors' own dtypes (BF16 arrives as float32)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.dtypes:
            raise KeyError(name)
        tm = self._make(name, self._rescales.get(name))
        self._rescales[name] = tm.rescale
        return tm.to_numpy()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def merge_and_compress(task_vectors: Sequence[Mapping[str, Any]], *, density: float,
                       method: str = "ties", weights: Sequence[float] | None = None,
                       sign: str = "total", rescale: str | RescaleRule | None = None,
                       alpha: float = 1.0, scope: str = "global",
                       scale: str = DEFAULT_SCALE) -> dict[str, TernaryTensor]:
    """Merge task vectors (as :func:`merge`) and compress the result (as
    :func:`~compeft_format.compress.compress` with ``density``, ``alpha``, ``scope``,
    ``scale``), without building the dense merged tensors when the inputs are ternary.

    >>> e1 = {"w": TernaryTensor((8,), [0, 1, 2], [False, False, True], 1.0)}
    >>> e2 = {"w": TernaryTensor((8,), [1, 2, 5], [False, False, False], 0.5)}
    >>> out = merge_and_compress([e1, e2], density=0.25)
    >>> out["w"].indices.tolist(), out["w"].signs.tolist()
    ([0, 2], [False, True])
    """
    ws = check_options(len(task_vectors), method, weights, sign)
    check_names([list(tv.keys()) for tv in task_vectors])
    described = {}
    for name in task_vectors[0]:
        d = [_describe(tv[name], name, i) for i, tv in enumerate(task_vectors)]
        _check_fit(name, [(s, dt) for s, dt, _ in d])
        described[name] = d

    def make(name: str, fixed: Rescale | None) -> TensorMerge:
        d = described[name]
        return TensorMerge(name, d[0][0], d[0][1], [v for _, _, v in d], method=method,
                           weights=ws, sign=sign, rescale=fixed or rescale)

    names = sorted(described)
    dtypes = {n: d[0][1] for n, d in described.items()}
    patterns = all(len(d) <= MAX_PATTERN_INPUTS and all(isinstance(v, TernaryTensor)
                                                        for _, _, v in d)
                   for d in described.values())
    out = dict(_compress_merged(names, make, dtypes, patterns, density=density, alpha=alpha,
                                scope=scope, scale=scale))
    return {name: out[name] for name in task_vectors[0]}
