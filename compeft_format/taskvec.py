"""Task vectors: what a fine-tune changed, ``tau = theta_ft - theta_init``, and back.

* :func:`peft_task_vector` -- a PEFT adapter's tensors measured from their initial values
  (LoRA A and B from zero, (IA)^3 vectors from one, as in the ComPEFT reference code), or
  from a saved initial adapter.
* :func:`state_dict_task_vector` -- a full fine-tune: fine-tuned minus base state dict.
* :func:`apply_task_vector` -- ``base + delta`` rounded once to the base's dtype.

Values and dtypes
-----------------
A task vector is a :class:`TaskVector`: a ``dict`` name -> numpy float array, plus
``.dtypes``, name -> the dtype name of the tensors it was measured from (``"F32"``,
``"F16"``, ``"BF16"``, ``"F64"``). The arrays are float64 for F64 tensors and float32 for
everything else: float16 and bfloat16 differences are computed from the exactly widened
values, so they keep their precision (numpy has no bfloat16). :func:`compeft_format.compress`
reads ``.dtypes`` so each compressed tensor keeps its original dtype name. Inputs may be
numpy arrays or torch tensors of any float dtype, bfloat16 included.

Lazy inputs
-----------
Every function reads its input mappings one name at a time (``m[name]``) and keeps no input
value once it has moved on, so a lazy mapping (safetensors ``safe_open``, ``np.memmap``
files) never has all its values in memory. ``state_dict_task_vector(..., lazy=True)`` also
returns a lazy :class:`LazyTaskVector` that computes each difference on access.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import dtypes as _dt
from ._spec import TERNARY_DTYPES
from .errors import EncodeError
from .tensor import TernaryTensor

__all__ = [
    "LazyTaskVector",
    "TaskVector",
    "TaskVectorReport",
    "add_rounded",
    "apply_task_vector",
    "cast_storage",
    "peft_task_vector",
    "round_sum",
    "state_dict_task_vector",
]

PEFT_TYPES = ("LORA", "IA3")


class TaskVector(dict):
    """A task vector: ``dict`` name -> float array, with the original dtype names.

    Parameters
    ----------
    values:
        Anything ``dict()`` accepts: name -> numpy float array.
    dtypes:
        name -> original dtype name (``"F32"``, ``"F16"``, ``"BF16"``, ``"F64"``). Names
        without an entry default to the array's own dtype.

    Examples
    --------
    >>> import numpy as np
    >>> tv = TaskVector({"w": np.zeros(2, np.float32)}, dtypes={"w": "BF16"})
    >>> tv.dtypes["w"], tv["w"].dtype
    ('BF16', dtype('float32'))
    """

    def __init__(self, values: Any = (), dtypes: Mapping[str, str] | None = None) -> None:
        super().__init__(values)
        self.dtypes: dict[str, str] = {}
        given = dict(dtypes or {})
        for name, arr in self.items():
            self.dtypes[name] = given.get(name) or _dt.numpy_dtype_name(np.asarray(arr).dtype)

    def __setitem__(self, name: str, value: Any) -> None:
        super().__setitem__(name, value)
        if name not in self.dtypes:
            self.dtypes[name] = _dt.numpy_dtype_name(np.asarray(value).dtype)

    def __delitem__(self, name: str) -> None:
        super().__delitem__(name)
        self.dtypes.pop(name, None)

    def __repr__(self) -> str:
        return f"TaskVector({len(self)} tensors)"


@dataclass(frozen=True)
class TaskVectorReport:
    """What :func:`state_dict_task_vector` matched, and what it left out.

    Attributes
    ----------
    names:
        Tensors in the task vector (in both state dicts, float, same shape and dtype).
    only_in_finetuned:
        Names of the fine-tuned state dict missing from the base (e.g. a new head).
    only_in_base:
        Names of the base missing from the fine-tuned state dict.
    non_float:
        ``(name, dtype)`` of tensors present on both sides but not float (position ids,
        step counters, masks): they have no task vector and are left out.

    Examples
    --------
    >>> import numpy as np
    >>> ft = {"w": np.ones(2, np.float32), "ids": np.arange(2), "head": np.ones(3)}
    >>> base = {"w": np.zeros(2, np.float32), "ids": np.arange(2)}
    >>> tv, report = state_dict_task_vector(ft, base)
    >>> report.names, report.only_in_finetuned, report.non_float, report.complete
    (('w',), ('head',), (('ids', 'I64'),), False)
    """

    names: tuple[str, ...]
    only_in_finetuned: tuple[str, ...] = ()
    only_in_base: tuple[str, ...] = ()
    non_float: tuple[tuple[str, str], ...] = ()

    @property
    def complete(self) -> bool:
        """True when every tensor on either side is in the task vector."""
        return not (self.only_in_finetuned or self.only_in_base or self.non_float)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict.

        >>> TaskVectorReport(("a",), only_in_base=("b",)).to_dict()["only_in_base"]
        ['b']
        """
        return {
            "names": list(self.names),
            "only_in_finetuned": list(self.only_in_finetuned),
            "only_in_base": list(self.only_in_base),
            "non_float": [{"name": n, "dtype": d} for n, d in self.non_float],
        }


class LazyTaskVector(Mapping):
    """A read-only mapping name -> ``finetuned[name] - base[name]``, computed on each access.

    Returned by ``state_dict_task_vector(..., lazy=True)``. Nothing is cached: each access
    reads both sides again, so memory stays within one tensor's worth at a time. Has the
    same ``.dtypes`` as :class:`TaskVector`.

    >>> import numpy as np
    >>> ft = {"w": np.full(3, 1.5, np.float32)}
    >>> tv, _ = state_dict_task_vector(ft, {"w": np.ones(3, np.float32)}, lazy=True)
    >>> tv, tv["w"], tv.dtypes
    (LazyTaskVector(1 tensors), array([0.5, 0.5, 0.5], dtype=float32), {'w': 'F32'})
    """

    def __init__(
        self, finetuned: Mapping[str, Any], base: Mapping[str, Any], dtypes: Mapping[str, str]
    ) -> None:
        self._finetuned = finetuned
        self._base = base
        self.dtypes: dict[str, str] = dict(dtypes)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.dtypes:
            raise KeyError(name)
        f_vals, f_name = _float_values(self._finetuned[name], name)
        b_vals, _ = _float_values(self._base[name], name)
        return _difference(f_vals, b_vals, f_name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.dtypes)

    def __len__(self) -> int:
        return len(self.dtypes)

    def __contains__(self, name: object) -> bool:
        return name in self.dtypes

    def __repr__(self) -> str:
        return f"LazyTaskVector({len(self)} tensors)"


# ---------------------------------------------------------------------------------------------
def peft_task_vector(
    weights: Mapping[str, Any], peft_type: str, init: Mapping[str, Any] | None = None
) -> TaskVector:
    """Return the task vector of a PEFT adapter: each tensor minus its initial value.

    Without ``init`` the initial values are PEFT's fixed ones, as in the ComPEFT reference
    code: LoRA ``A`` and ``B`` (and every other tensor of a LoRA adapter) from zero; (IA)^3
    vectors (names containing ``"ia3_"``) from one, other tensors of an (IA)^3 adapter from
    zero. LoRA's ``A`` really starts random, so pass the saved initial adapter as ``init``
    (same names, shapes and dtypes) to measure ``A - A_init`` and ``B - B_init`` instead.

    Parameters
    ----------
    weights:
        name -> numpy array or torch tensor: the trained adapter (e.g. the tensors of
        ``adapter_model.safetensors``).
    peft_type:
        ``peft_type`` of ``adapter_config.json`` (``"LORA"``, ``"IA3"``; case-insensitive).
        Any type is accepted when ``init`` is given.
    init:
        The adapter's initial tensors, or None.

    Returns
    -------
    TaskVector
        Float arrays (float32, float64 for F64) with ``.dtypes`` naming the adapter's dtypes.

    Raises
    ------
    EncodeError
        An unknown ``peft_type`` without ``init``; a non-float tensor; a tensor missing from
        ``init`` or with another shape or dtype there; a DoRA magnitude vector without
        ``init`` (it starts at the base weight's norm, unknown here). Each names the tensor.

    Examples
    --------
    >>> import numpy as np
    >>> peft_task_vector({"m.ia3_l": np.array([1.25, 0.5], np.float32)}, "IA3")["m.ia3_l"]
    array([ 0.25, -0.5 ], dtype=float32)
    >>> w = {"m.lora_A.weight": np.array([[0.5, 1.0]]), "m.lora_B.weight": np.array([[0.25]])}
    >>> i = {"m.lora_A.weight": np.array([[0.25, 1.0]]), "m.lora_B.weight": np.array([[0.0]])}
    >>> peft_task_vector(w, "LORA", init=i)["m.lora_A.weight"]
    array([[0.25, 0.  ]])
    """
    kind = str(peft_type).upper()
    if init is None and kind not in PEFT_TYPES:
        raise EncodeError(
            f"peft_type {peft_type!r} has no known initial value; use one of {PEFT_TYPES} "
            "or pass the initial adapter as init="
        )
    if init is not None:
        missing = [n for n in weights if n not in init]
        extra = [n for n in init if n not in weights]
        if missing or extra:
            raise EncodeError(
                f"init does not match the adapter: {len(missing)} tensors missing from init "
                f"{missing[:5]}, {len(extra)} only in init {extra[:5]}",
                tensor=(missing or extra)[0],
            )
    out = TaskVector()
    for name in weights:
        vals, dname = _float_values(weights[name], name)
        if init is not None:
            i_vals, i_name = _float_values(init[name], name)
            _check_pair(name, vals.shape, dname, i_vals.shape, i_name, "init")
            delta = _difference(vals, i_vals, dname)
        elif kind == "IA3" and "ia3_" in name:
            delta = _difference(vals, None, dname, start=1.0)
        else:
            if "lora_magnitude_vector" in name:
                raise EncodeError(
                    "a DoRA magnitude vector starts at the base weight's column norms; "
                    "pass the initial adapter as init= to measure it",
                    tensor=name,
                )
            delta = _difference(vals, None, dname)
        out.dtypes[name] = dname
        out[name] = delta
    return out


def state_dict_task_vector(
    finetuned: Mapping[str, Any], base: Mapping[str, Any], *, lazy: bool = False
) -> tuple[TaskVector | LazyTaskVector, TaskVectorReport]:
    """Return ``finetuned - base`` over the names both hold, and a report of the rest.

    Names present on one side only and non-float tensors (integer/bool buffers such as
    position ids or step counters) are left out and listed in the report, not errors.

    Parameters
    ----------
    finetuned, base:
        Mappings name -> numpy array or torch tensor (any float dtype, bfloat16 included).
        Read one name at a time.
    lazy:
        If True, return a :class:`LazyTaskVector` that recomputes each difference on access
        instead of a dict holding them all (for models larger than memory). The checks
        still run now, over every pair.

    Returns
    -------
    (TaskVector or LazyTaskVector, TaskVectorReport)
        Differences in the fine-tuned mapping's order (float32, float64 for F64), with
        ``.dtypes``.

    Raises
    ------
    EncodeError
        A tensor whose shape or dtype differs between the two sides (named, with both).

    Examples
    --------
    >>> import numpy as np
    >>> ft = {"w": np.array([1.5, 2.0], np.float32), "ids": np.arange(2), "head": np.ones(1)}
    >>> base = {"w": np.array([1.0, 2.0], np.float32), "ids": np.arange(2)}
    >>> tv, report = state_dict_task_vector(ft, base)
    >>> tv["w"], report.only_in_finetuned, report.non_float
    (array([0.5, 0. ], dtype=float32), ('head',), (('ids', 'I64'),))
    """
    base_names = set(base)
    ft_names = list(finetuned)
    ft_set = set(ft_names)
    only_ft = tuple(n for n in ft_names if n not in base_names)
    only_base = tuple(n for n in base if n not in ft_set)
    names: list[str] = []
    non_float: list[tuple[str, str]] = []
    dtypes: dict[str, str] = {}
    out = TaskVector()
    for name in ft_names:
        if name not in base_names:
            continue
        f_store, f_name = _storage(finetuned[name], name)
        b_store, b_name = _storage(base[name], name)
        _check_pair(name, f_store.shape, f_name, b_store.shape, b_name, "base")
        if f_name not in TERNARY_DTYPES:
            non_float.append((name, f_name))
            continue
        names.append(name)
        dtypes[name] = f_name
        if not lazy:
            out.dtypes[name] = f_name
            out[name] = _difference(
                _dt.to_numpy_values(f_store, f_name), _dt.to_numpy_values(b_store, b_name), f_name
            )
        del f_store, b_store
    report = TaskVectorReport(tuple(names), only_ft, only_base, tuple(non_float))
    if lazy:
        return LazyTaskVector(finetuned, base, dtypes), report
    return out, report


def apply_task_vector(base: Mapping[str, Any], delta: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``base + delta`` per tensor, rounded once to each base tensor's dtype.

    The sum is rounded correctly (round to nearest even) from its exact value, whatever the
    dtypes: it is formed in float64 with its rounding error (TwoSum) and rounded to odd
    before the final rounding, so no double rounding happens (BF16 and F16 included).

    Parameters
    ----------
    base:
        name -> numpy array or torch tensor (the base model). Read one name at a time.
    delta:
        name -> :class:`TernaryTensor`, numpy array or torch tensor of the base's shape
        (e.g. what ``decompress`` returns). Every name must be in ``base``.

    Returns
    -------
    dict
        In ``base``'s order: base tensors with a delta become ``base + delta`` of the same
        type (numpy or torch) and dtype; the others are returned untouched.

    Raises
    ------
    EncodeError
        A delta name missing from ``base``; a shape mismatch; a non-float base tensor with a
        delta (named).

    Examples
    --------
    >>> import numpy as np
    >>> apply_task_vector({"w": np.ones(3, np.float16)}, {"w": np.array([0.5, 0.0, -2.0])})
    {'w': array([ 1.5,  1. , -1. ], dtype=float16)}
    """
    missing = [n for n in delta if n not in base]
    if missing:
        raise EncodeError(
            f"{len(missing)} delta tensors are not in the base: {missing[:5]}", tensor=missing[0]
        )
    out: dict[str, Any] = {}
    for name in base:
        value = base[name]
        if name not in delta:
            out[name] = value
            continue
        out[name] = _apply_one(name, value, delta[name])
    return out


# ---------------------------------------------------------------------------------------------
def _storage(value: Any, name: str) -> tuple[np.ndarray, str]:
    try:
        return _dt.to_storage(value)
    except EncodeError as exc:
        raise EncodeError(exc.message, tensor=name) from None


def _float_values(value: Any, name: str) -> tuple[np.ndarray, str]:
    """Return ``(values, dtype name)``: values exact (BF16 widened to float32)."""
    store, dname = _storage(value, name)
    if dname not in TERNARY_DTYPES:
        raise EncodeError(f"dtype {dname} is not a float dtype {TERNARY_DTYPES}", tensor=name)
    return _dt.to_numpy_values(store, dname), dname


def _work_dtype(dname: str) -> np.dtype:
    return np.dtype(np.float64 if dname == "F64" else np.float32)


def _difference(a: np.ndarray, b: np.ndarray | None, dname: str, start: float = 0.0) -> np.ndarray:
    """``a - b`` (or ``a - start``) in the work dtype of ``dname``, as a new array."""
    work = _work_dtype(dname)
    out = np.array(a, dtype=work, copy=True)
    if b is not None:
        out -= b.astype(work, copy=False)
    elif start:
        out -= work.type(start)
    return out


def _check_pair(
    name: str, shape_a: Any, dtype_a: str, shape_b: Any, dtype_b: str, other: str
) -> None:
    if tuple(shape_a) != tuple(shape_b):
        raise EncodeError(
            f"shape {tuple(shape_a)} does not match {tuple(shape_b)} in {other}", tensor=name
        )
    if dtype_a != dtype_b:
        raise EncodeError(f"dtype {dtype_a} does not match {dtype_b} in {other}", tensor=name)


def _delta_values(name: str, d: Any) -> np.ndarray:
    if isinstance(d, TernaryTensor):
        return d.to_numpy()  # the decoded values, as a decoder writes them
    vals, _ = _float_values(d, name)
    return vals


def _apply_one(name: str, value: Any, d: Any) -> Any:
    store, bname = _storage(value, name)
    if bname not in TERNARY_DTYPES:
        raise EncodeError(f"cannot add a delta to a {bname} tensor", tensor=name)
    dvals = _delta_values(name, d)
    if tuple(dvals.shape) != tuple(store.shape):
        raise EncodeError(
            f"delta shape {tuple(dvals.shape)} does not match the base's {tuple(store.shape)}",
            tensor=name,
        )
    a = _dt.to_numpy_values(store, bname).astype(np.float64)
    b = dvals.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        s = a + b
        # TwoSum: s + err == a + b exactly (when finite)
        bb = s - a
        err = (a - (s - bb)) + (b - bb)
    result = round_sum(s, err, bname)
    if _dt.is_torch_tensor(value):
        return _dt.to_torch(result, bname)
    return result


def round_sum(s: np.ndarray, err: np.ndarray, dname: str) -> np.ndarray:
    """Round the exact ``s + err`` to ``dname``'s storage (BF16 as raw bits), correctly
    (round to nearest even, through round-to-odd): what adding a delta to a base writes.

    >>> import numpy as np
    >>> round_sum(np.array([1.0]), np.array([2.0**-30]), "F32").tolist()  # 1 + 2^-30
    [1.0]
    """
    if dname == "F64":
        return s
    ro = _round_to_odd_f64(s, err)
    with np.errstate(over="ignore"):
        if dname == "F32":
            return ro.astype(np.float32)
        if dname == "F16":
            return ro.astype(np.float16)
        return _dt.f32_to_bf16_bits(_round_to_odd_f32(ro))


def _round_to_odd_f64(s: np.ndarray, err: np.ndarray) -> np.ndarray:
    """Round ``s + err`` (``s`` its nearest float64) to odd: truncate, set the last bit if inexact.

    Rounding to odd first and to nearest second is exact rounding to nearest whenever the
    first precision exceeds the second by two bits or more.
    """
    fix = np.isfinite(err) & (err != 0)
    if not fix.any():
        return s
    out = s.copy()
    sv = out[fix]
    toward_zero = np.signbit(sv) != np.signbit(err[fix])  # |exact| < |s|
    bits = sv.view(np.uint64) - toward_zero.astype(np.uint64)  # step one ulp towards zero
    out[fix] = (bits | np.uint64(1)).view(np.float64)
    return out


def _round_to_odd_f32(x: np.ndarray) -> np.ndarray:
    """Round float64 ``x`` to float32 by round-to-odd."""
    with np.errstate(over="ignore"):
        r = x.astype(np.float32)
    inexact = np.isfinite(x) & (r.astype(np.float64) != x)
    if not inexact.any():
        return r
    rv = r[inexact]
    above = np.abs(rv.astype(np.float64)) > np.abs(x[inexact])  # rounded away from zero
    bits = rv.view(np.uint32) - above.astype(np.uint32)
    r[inexact] = (bits | np.uint32(1)).view(np.float32)
    return r


def add_rounded(base: np.ndarray, dtype: str, delta: np.ndarray) -> np.ndarray:
    """``base + delta`` rounded once to ``dtype`` (storage in and out), as apply_task_vector.

    (apply_task_vector itself takes BF16 only as torch tensors; this works on raw bits.)

    >>> add_rounded(np.ones(2, np.float16), "F16", np.array([0.5, 1e-4], np.float32))
    array([1.5, 1. ], dtype=float16)
    """
    a = _dt.to_numpy_values(base, dtype).astype(np.float64)
    b = delta.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        s = a + b
        bb = s - a
        err = (a - (s - bb)) + (b - bb)  # TwoSum: s + err == a + b exactly
    return round_sum(s, err, dtype)


def cast_storage(storage: np.ndarray, src: str, dst: str | None) -> tuple[np.ndarray, str]:
    """Convert float storage to dtype ``dst`` (rounded once, to nearest even).

    Returns ``(storage, dtype)``; ``dst`` None, the same dtype, or a non-float ``src`` give
    the input back.

    >>> cast_storage(np.array([1.0, 2.5], np.float32), "F32", "BF16")
    (array([16256, 16416], dtype=uint16), 'BF16')
    """
    if dst is None or dst == src or src not in TERNARY_DTYPES:
        return storage, src
    vals = _dt.to_numpy_values(storage, src)
    if dst == "BF16":
        if vals.dtype == np.float64:
            return round_sum(vals, np.zeros_like(vals), "BF16"), dst
        return _dt.f32_to_bf16_bits(vals.astype(np.float32, copy=False)), dst
    with np.errstate(over="ignore"):
        return vals.astype(_dt.storage_dtype(dst)), dst
