"""Decoded values as the caller asked for them: TernaryTensor, dense numpy arrays, torch tensors.

Nothing here knows the file layout; the container hands over decoded blocks.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _spec as S
from . import dtypes as _dt
from ._alloc import writing
from .codecs._bits import scatter_signed
from .tensor import TernaryTensor, dense_output, dense_values, dense_zeros

__all__ = ["check_framework", "dense_ternary", "present"]


def dense_ternary(shape: tuple[int, ...], dtype: str, values: dict[str, Any], dense: str,
                  out: np.ndarray | None, *, nnz: int | None = None,
                  limits: S.ReadLimits = S.DEFAULT_LIMITS, name: str | None = None,
                  ) -> np.ndarray:
    """Write a ternary tensor's dense array from its blocks' positions and packed signs.

    The positions codec yields chunks of positions; each is written at once with its signs'
    values, so neither the int64 index array nor the bool signs of the whole tensor are
    built. The output is "numpy" values (BF16 as float32, as ``to_numpy``) or "torch"
    storage (BF16 as raw uint16 bits, as ``to_torch`` stores them). A new array is checked
    against ``limits.max_dense_bytes`` first (spec 9.2); ``nnz``, the count of nonzeros (None:
    unknown), tells whether prefaulting its pages pays (:func:`dense_zeros`).
    """
    vals = dense_values(values["scale"], dtype, bf16_bits=dense == "torch")
    if out is None:
        flat, prefault = dense_zeros(shape, vals.dtype, nnz, limits, name)
    else:
        flat, prefault = dense_output(out, math.prod(shape), vals.dtype), None
    with writing(prefault) as ready:
        scatter_signed(values["positions"], values["signs"], vals, flat, ready)
    return flat.reshape(shape) if out is None else out


def present(value: Any, framework: str) -> Any:
    """Return a decoded value in the caller's framework (spec-independent).

    ``value`` is a :class:`TernaryTensor` or ``(storage array, dtype)``; a ternary record
    decoded dense for numpy comes as ``(values, "F32"/"F16"/"F64")``, already values.
    """
    if framework == "torch":
        if isinstance(value, TernaryTensor):
            return value.to_torch()
        arr, dtype = value
        return _dt.to_torch(arr, dtype)
    if isinstance(value, TernaryTensor):
        return value
    arr, dtype = value
    return _dt.to_numpy_values(arr, dtype)


def check_framework(framework: str) -> None:
    if framework not in ("numpy", "torch"):
        raise ValueError(f"framework must be 'numpy' or 'torch', got {framework!r}")
