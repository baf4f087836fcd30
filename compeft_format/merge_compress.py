"""Compressing a merge again: ternary output straight from the sign-pattern tables.

:func:`merge_and_compress` merges task vectors held in memory and compresses the result, and
:func:`compress_merged` is the engine it shares with
:func:`~compeft_format.merge_io.merge_files`: when every input is ternary, a merged tensor
takes one of at most ``3^n`` values (:mod:`compeft_format.merge_math`'s pattern tables), so
the top-k selection and the scale are computed from the counts of each value, and the dense
merged tensor is never built. Other rules and scopes go through
:func:`~compeft_format.compress.iter_compress` on the dense merged tensors, with the same
result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .compress import (
    DEFAULT_SCALE,
    SCALE_CHOICES,
    TopK,
    check_choice,
    check_density,
    compression_metadata,
    float32_scale,
    iter_compress,
)
from .merge import (
    MAX_PATTERN_INPUTS,
    Rescale,
    RescaleRule,
    TensorMerge,
    check_fit,
    check_names,
    check_options,
    describe_value,
    prepared_rescales,
)
from .scales import is_vector, resolve_scale
from .tensor import TernaryTensor

__all__ = ["PATTERN_SCALES", "PATTERN_SCOPES", "compress_merged", "merge_and_compress"]

#: The scale rules the sign-pattern compression computes itself (any other goes through
#: :func:`~compeft_format.compress.iter_compress` on the dense merged tensors).
PATTERN_SCALES = ("proj_vcap", "proj", "norm", "l2", "std")
#: The scopes it computes itself (others, such as ``"role"``, go through ``iter_compress``).
PATTERN_SCOPES = ("global", "tensor")


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
    values = tm.table()[seen]
    tm.check_finite(values, "sign patterns that occur")
    values = values.astype(np.float64)
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
    return float32_scale(raw, [(c.name, c.dtype, c.numel) for c in items])


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


def compress_merged(
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
    pattern table), the scale rule is one of :data:`PATTERN_SCALES` and the scope one of
    :data:`PATTERN_SCOPES`, the dense merged tensors go through ``iter_compress`` instead
    (each merged up to four times).

    >>> from compeft_format.merge import TensorMerge
    >>> vals = [TernaryTensor((4,), [0, 1], [False, True], 1.0),
    ...         TernaryTensor((4,), [0, 3], [False, False], 1.0)]
    >>> make = lambda name, fixed: TensorMerge(name, (4,), "F32", vals, method="ties",
    ...                                        rescale=fixed)
    >>> [(n, t.indices.tolist()) for n, t in
    ...  compress_merged(["w"], make, {"w": "F32"}, True, density=0.25)]
    [('w', [0])]
    """
    scale = resolve_scale(check_choice("scale", scale, SCALE_CHOICES), check_density(density))
    compression_metadata(density, alpha, scope, scale)  # checks the options
    names = list(names)
    if scale not in PATTERN_SCALES or scope not in PATTERN_SCOPES or not patterns:
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
            if scale == "proj_vcap" and is_vector(c.shape):
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
    if isinstance(task_vectors, Mapping) or \
            not all(isinstance(tv, Mapping) for tv in task_vectors):
        raise TypeError("merge_and_compress takes a sequence of task vectors (mappings of "
                        "name -> tensor)")
    ws = check_options(len(task_vectors), method, weights, sign)
    check_names([list(tv.keys()) for tv in task_vectors])
    described = {}
    for name in task_vectors[0]:
        d = [describe_value(tv[name], name, i) for i, tv in enumerate(task_vectors)]
        check_fit(name, [(s, dt) for s, dt, _ in d])
        described[name] = d

    def make(name: str, fixed: Rescale | None) -> TensorMerge:
        d = described[name]
        return TensorMerge(name, d[0][0], d[0][1], [v for _, _, v in d], method=method,
                           weights=ws, sign=sign, rescale=fixed or prepared.get(name, rescale))

    prepared: dict[str, Rescale] = {}  # empty while the rule's prepare looks at the tensors
    prepared = prepared_rescales(rescale, list(described), lambda n: make(n, None).stats())
    names = sorted(described)
    dtypes = {n: d[0][1] for n, d in described.items()}
    patterns = all(len(d) <= MAX_PATTERN_INPUTS and all(isinstance(v, TernaryTensor)
                                                        for _, _, v in d)
                   for d in described.values())
    out = dict(compress_merged(names, make, dtypes, patterns, density=density, alpha=alpha,
                               scope=scope, scale=scale))
    return {name: out[name] for name in task_vectors[0]}
