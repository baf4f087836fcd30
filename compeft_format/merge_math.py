"""The arithmetic of a merge: PEFT's task arithmetic and TIES in numpy, and sign-pattern tables.

:func:`combine` is the definition every fast path of :mod:`compeft_format.merge` is checked
against: ``merge_utils``' operations, in its order, on a stack of dense task vectors. Ternary
inputs are merged through a table instead: at every position the merged value depends only on
which inputs are nonzero there and with what sign (its *pattern*, one of ``3^n``), so
:func:`pattern_table` applies :func:`combine` once to all patterns (:func:`pattern_digits`).
The rescale rules (:mod:`compeft_format.merge_rescale`) build on the same tables.

>>> mags = np.array([0.5, 0.25], np.float32)
>>> pattern_table(mags, np.ones(2, np.float32), "ties", "total").tolist()[:4]
[0.0, 0.5, -0.5, 0.25]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .errors import MergeError

__all__ = [
    "MAX_PATTERN_INPUTS",
    "METHODS",
    "SIGN_METHODS",
    "check_options",
    "combine",
    "pattern_digits",
    "pattern_table",
    "scaled_magnitudes",
    "weights_array",
    "work_dtype",
]

METHODS = ("ties", "sum", "mean")
SIGN_METHODS = ("total", "frequency")
#: Up to this many ternary inputs a tensor is merged through its table of sign patterns
#: (``3^8 = 6561`` entries; codes fit in ``uint16``); more go through dense chunks.
MAX_PATTERN_INPUTS = 8


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
def work_dtype(dtype: str) -> np.dtype:
    """The dtype a tensor of ``dtype`` is merged in: float64 for F64, else float32.

    >>> work_dtype("BF16"), work_dtype("F64")
    (dtype('float32'), dtype('float64'))
    """
    return np.dtype(np.float64 if dtype == "F64" else np.float32)


def weights_array(weights: Sequence[float], work: np.dtype, name: str = "tensor"
                   ) -> np.ndarray:
    """The weights in the merge's dtype ``work``; a weight beyond its range is a MergeError.

    >>> weights_array([1.0, -0.5], np.dtype(np.float32)).tolist()
    [1.0, -0.5]
    """
    big = [w for w in weights if abs(w) > float(np.finfo(work).max)]
    if big:  # it would be inf in the arithmetic, and the merge inf or nan
        raise MergeError(f"weight {big[0]!r} overflows {work.name}, the dtype the merge "
                         "computes in", tensor=name)
    return np.array(weights, dtype=np.float64).astype(work)


def _seqsum(rows: np.ndarray) -> np.ndarray:
    """Sum over axis 0, adding the rows one after the other (the order is part of the result)."""
    acc = np.zeros(rows.shape[1:], rows.dtype)
    for r in rows:
        acc += r
    return acc


def combine(stack: np.ndarray, weights: np.ndarray, method: str, sign: str,
            zeros: Sequence[float] | None = None) -> np.ndarray:
    """Merge ``stack`` (``n`` task vectors on axis 0) as PEFT does, in ``stack``'s dtype.

    ``weights`` holds ``n`` values of the same dtype. This is the definition every fast path
    is checked against. ``zeros`` (TIES): input ``i`` adds ``zeros[i]`` to the divisor of
    every entry where it is zero (None: PEFT's divisor, the count of agreeing inputs).

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
    if zeros is not None:
        z = np.array(zeros, dtype=np.float64).astype(work).reshape(w.shape)
        return mixed / np.maximum(kept + _seqsum((stack == 0) * z), 1)
    return mixed / np.maximum(kept, 1).astype(work)


def pattern_digits(n: int) -> np.ndarray:
    """``(n, 3**n)`` uint8: digit i (base 3) of every pattern (0 zero, 1 plus, 2 minus).

    >>> pattern_digits(2)[1].tolist()   # input 1's digit of patterns 0..8
    [0, 0, 0, 1, 1, 1, 2, 2, 2]
    """
    p = np.arange(3**n, dtype=np.int64)
    return np.stack([(p // 3**i) % 3 for i in range(n)]).astype(np.uint8) if n else np.zeros(
        (0, 1), np.uint8)


def pattern_table(mags: np.ndarray, weights: np.ndarray, method: str, sign: str,
                   zeros: Sequence[float] | None = None) -> np.ndarray:
    """The merged value of every sign pattern of ternary inputs with magnitudes ``mags``.

    Pattern ``p`` is indexed as :func:`pattern_digits` numbers it; ``zeros`` as in
    :func:`combine`.

    >>> mags = np.array([0.5, 0.25], np.float32)   # patterns 0..4: none, +a, -a, +b, +a +b
    >>> pattern_table(mags, np.ones(2, np.float32), "sum", "total").tolist()[:5]
    [0.0, 0.5, -0.5, 0.25, 0.75]
    """
    d = pattern_digits(mags.size)
    zero = mags.dtype.type(0)
    stack = np.where(d == 1, mags[:, None], np.where(d == 2, -mags[:, None], zero))
    return combine(stack.astype(mags.dtype, copy=False), weights, method, sign, zeros)


def scaled_magnitudes(mags: Sequence[float | None], before: Sequence[float] | None,
                       work: np.dtype) -> np.ndarray:
    """Each input's magnitude (0 for a dense input's None) times its ``before`` factor.

    >>> scaled_magnitudes([0.5, None], [2.0, 1.0], np.dtype(np.float32)).tolist()
    [1.0, 0.0]
    """
    m = np.array([0.0 if v is None else v for v in mags], dtype=np.float64).astype(work)
    if before is not None:
        m = m * np.array(before, dtype=np.float64).astype(work)
    return m
