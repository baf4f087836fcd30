"""`TernaryTensor`: the value type the format stores (every element is +scale, -scale or 0)."""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np

from . import dtypes as _dt
from ._alloc import Prefault, fresh_zeros, writing
from ._spec import DEFAULT_LIMITS, TERNARY_DTYPES, VARINT_MAX_VALUE, ReadLimits
from .errors import EncodeError, LimitExceededError

__all__ = ["TernaryTensor", "check_dense_bytes", "dense_output", "dense_values", "dense_zeros"]

_NAME_ALIASES = {
    "f32": "F32", "float32": "F32", "f16": "F16", "float16": "F16", "bf16": "BF16",
    "bfloat16": "BF16", "f64": "F64", "float64": "F64",
}


def _dtype_name(dtype: Any) -> str:
    """Normalise a dtype given as a name, numpy dtype or torch dtype to ``F32``/``F16``/..."""
    if isinstance(dtype, str):
        name = dtype if dtype in TERNARY_DTYPES else _NAME_ALIASES.get(dtype.lower())
    elif type(dtype).__module__ == "torch":
        name = _NAME_ALIASES.get(str(dtype).removeprefix("torch."))
    else:
        try:
            name = _dt.numpy_dtype_name(np.dtype(dtype))
        except (TypeError, EncodeError):
            name = None
    if name not in TERNARY_DTYPES:
        raise EncodeError(f"dtype {dtype!r} is not a ternary dtype; use one of {TERNARY_DTYPES}")
    return name


def _round_scale(scale: float, name: str) -> float:
    """Return ``scale`` rounded to the dense dtype ``name``, as a Python float."""
    if name == "BF16":
        return float(_dt.bf16_bits_to_f32(_dt.f32_to_bf16_bits(np.float32([scale])))[0])
    with np.errstate(over="ignore"):  # above 65504 an F16 tensor holds inf, as numpy casts
        if name == "F16":
            return float(np.float16(scale))
        return float(np.float32(scale))


_SCATTER_CHUNK = 1 << 16  # nonzeros per step of the dense writers (fits in L2 with its values)


def dense_values(scale: float, name: str, *, bf16_bits: bool = False) -> np.ndarray:
    """Return ``[+value, -value]``: the two nonzero elements of a dense tensor of dtype ``name``.

    Indexed by a sign bit (1 = negative). BF16 gives float32 values rounded to bfloat16, or
    with ``bf16_bits`` the raw uint16 bits (the sign is the top bit, as torch stores them).

    >>> dense_values(0.5, "F16")
    array([ 0.5, -0.5], dtype=float16)
    """
    if name == "BF16" and bf16_bits:
        bits = _dt.f32_to_bf16_bits(np.float32([scale]))[0]
        return np.array([bits, bits | 0x8000], dtype=np.uint16)
    np_dtype = np.float32 if name == "BF16" else _dt.storage_dtype(name)
    value = _round_scale(scale, name)
    return np.array([value, -value], dtype=np_dtype)


def check_dense_bytes(shape: tuple[int, ...], dtype: Any, limits: ReadLimits = DEFAULT_LIMITS,
                      tensor: str | None = None) -> int:
    """Return the bytes of a dense output of ``shape`` and ``dtype`` (spec 9.4), checked.

    Raises :class:`LimitExceededError` above ``limits.max_dense_bytes``. Every maker of a
    dense output calls it before allocating (``dtype``: anything with an ``itemsize``, numpy
    or torch).

    >>> check_dense_bytes((1024, 1024), np.dtype(np.float16))
    2097152
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > limits.max_dense_bytes:
        raise LimitExceededError(f"dense output {list(shape)} {dtype} is {nbytes} bytes; limit "
                                 f"{limits.max_dense_bytes} (raise ReadLimits.max_dense_bytes)",
                                 tensor=tensor)
    return nbytes


def dense_zeros(shape: tuple[int, ...], dtype: np.dtype, nnz: int | None,
                limits: ReadLimits = DEFAULT_LIMITS, tensor: str | None = None,
                ) -> tuple[np.ndarray, Prefault | None]:
    """Return a new flat zero array for the dense form of a ternary tensor, and its prefault.

    Its size is checked against ``limits.max_dense_bytes`` before anything is allocated
    (spec 9.2: a file of a hundred bytes can declare a shape of petabytes), and an
    allocation the system refuses is a :class:`LimitExceededError` too, never numpy's
    ``MemoryError``. ``nnz`` elements will be written (see :func:`_alloc.fresh_zeros`).

    >>> dense_zeros((2**24, 2**24), np.dtype(np.float32), 0)
    Traceback (most recent call last):
    ...
    compeft_format.errors.LimitExceededError: dense output [16777216, 16777216] float32 is \
1125899906842624 bytes; limit 17179869184 (raise ReadLimits.max_dense_bytes)
    """
    numel = math.prod(shape)
    nbytes = check_dense_bytes(shape, dtype, limits, tensor)
    try:
        return fresh_zeros(numel, dtype, nnz=nnz)
    except MemoryError:
        raise LimitExceededError(f"dense output {list(shape)} {dtype} is {nbytes} bytes: the "
                                 "system cannot allocate it", tensor=tensor) from None


def _dims(shape: Any) -> tuple[int, ...]:
    """``shape`` as a tuple of ints; an :class:`EncodeError` for a dimension that is not an
    integer (4.9 is not 4), is negative, or does not fit a VarInt (spec 2.3)."""
    try:
        dims = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise EncodeError(f"shape {shape!r}: dimensions must be integers") from None
    if any(d < 0 for d in dims):
        raise EncodeError(f"shape {dims} has a negative dimension")
    if any(d > VARINT_MAX_VALUE for d in dims):
        raise EncodeError(f"shape {dims} has a dimension above 2**63 - 1 (spec 2.3)")
    return dims


def _check_positions(indices: Any) -> None:
    """Refuse ``indices`` unless integers in one dimension (a float 1.5 is no position, and
    flattening a 2-D array would hide a mistake)."""
    arr = np.asarray(indices)
    if arr.size and arr.dtype.kind not in "iu":
        raise EncodeError(f"indices must be integers, got {arr.dtype}")
    if arr.ndim > 1:
        raise EncodeError(f"indices must be flat (C-order positions), got shape {arr.shape}")


def _frozen(given: Any, dtype: type, trusted: bool) -> np.ndarray:
    """Return ``given`` as a flat contiguous read-only array of ``dtype``.

    A new array (converted from a list, another dtype) needs no copy, nor does a view of
    read-only arrays only (another tensor's); anything someone else could still write to
    (the caller's own array, torch memory) is copied: changing it later would change a
    validated tensor. ``trusted`` (arrays the package has just built) skips the copy.
    """
    arr = np.ascontiguousarray(given, dtype=dtype)
    if not (trusted or (arr is not given and arr.base is None)):  # not a new array of ours
        base = arr if arr is given else arr.base
        while isinstance(base, np.ndarray) and not base.flags.writeable:
            base = base.base
        if base is not None:  # a writeable array, or memory numpy cannot vouch for
            arr = arr.copy()
    if arr.base is None:  # ours: frozen at the source, so views of it are known read-only
        arr.flags.writeable = False
    arr = arr.reshape(-1)
    arr.flags.writeable = False
    return arr


def dense_output(out: np.ndarray | None, numel: int, dtype: np.dtype) -> np.ndarray:
    """Return a flat zeroed array of ``numel`` elements: a new one, or a flat view of ``out``.

    A new array comes from ``np.zeros``, whose pages the OS hands out already zeroed.
    """
    if out is None:
        return np.zeros(numel, dtype=dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
    if out.dtype != dtype or out.size != numel:
        raise ValueError(f"out must hold {numel} elements of {np.dtype(dtype)}, got {out.size} "
                         f"of {out.dtype}")
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("out must be C-contiguous and writeable")
    flat = out.reshape(-1)
    flat.fill(0)
    return flat


class TernaryTensor:
    """A sparse ternary tensor: ``value[i] = -scale if signs[k] else +scale`` at ``indices[k]``.

    Parameters
    ----------
    shape:
        The dense shape (any rank, 0-d and empty included).
    indices:
        Flat C-order positions of the nonzeros, strictly increasing (stored as int64).
    signs:
        One bool per nonzero, True = negative.
    scale:
        The common magnitude; finite, non-negative, stored as float32 (spec 6.4).
    dtype:
        The dense dtype the tensor stands for, in safetensors spelling:
        ``"F32"``, ``"F16"``, ``"BF16"`` or ``"F64"``.

    Examples
    --------
    >>> import numpy as np
    >>> t = TernaryTensor((2, 3), [1, 5], [False, True], 0.5)
    >>> t.nnz, t.numel, round(t.density, 3)
    (2, 6, 0.333)
    >>> t.to_numpy()
    array([[ 0. ,  0.5,  0. ],
           [ 0. ,  0. , -0.5]], dtype=float32)
    >>> TernaryTensor.from_dense(t.to_numpy()) == t
    True
    """

    __slots__ = ("dtype", "indices", "scale", "shape", "signs")

    def __init__(
        self,
        shape: Any,
        indices: Any,
        signs: Any,
        scale: float,
        dtype: Any = "F32",
        *,
        _validated: bool = False,
    ) -> None:
        self.shape: tuple[int, ...] = _dims(shape)
        self.dtype: str = _dtype_name(dtype)
        if not _validated:
            _check_positions(indices)
        # the arrays are read-only (copied from a caller who could change them): a tensor
        # stays as validated (an unsorted index would let the prefault overwrite values)
        self.indices: np.ndarray = _frozen(indices, np.int64, _validated)
        self.signs: np.ndarray = _frozen(signs, bool, _validated)
        try:
            scale = float(scale)
        except (OverflowError, TypeError, ValueError):  # 10**400, None, "x"
            raise EncodeError(f"scale must be a finite non-negative number, got {scale!r:.40}"
                              ) from None
        if not math.isfinite(scale) or math.copysign(1.0, scale) < 0:
            raise EncodeError(f"scale must be finite and non-negative, got {scale!r}")
        with np.errstate(over="ignore"):  # an overflow is refused just below, not warned
            scale32 = float(np.float32(scale))
        if not math.isfinite(scale32):
            raise EncodeError(f"scale {scale!r} overflows float32")
        self.scale: float = scale32
        if not _validated:
            self._validate()

    def _validate(self) -> None:
        if any(d < 0 for d in self.shape):
            raise EncodeError(f"shape {self.shape} has a negative dimension")
        if self.indices.shape != self.signs.shape:
            raise EncodeError(
                f"{self.indices.size} indices but {self.signs.size} signs; they must match"
            )
        n = self.indices.size
        if n:
            if self.indices[0] < 0 or self.indices[-1] >= self.numel:
                raise EncodeError(f"indices must lie in [0, {self.numel})")
            if n > 1 and not bool(np.all(self.indices[1:] > self.indices[:-1])):
                raise EncodeError("indices must be strictly increasing")

    # -- properties ------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        """Number of elements of the dense tensor."""
        return math.prod(self.shape)

    @property
    def nnz(self) -> int:
        """Number of nonzero elements."""
        return int(self.indices.size)

    @property
    def density(self) -> float:
        """``nnz / numel`` (0.0 for a tensor without elements)."""
        return self.nnz / self.numel if self.numel else 0.0

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def zeros(cls, shape: Any, dtype: Any = "F32") -> TernaryTensor:
        """Return an all-zero tensor (scale 0).

        >>> TernaryTensor.zeros((2, 2)).nnz
        0
        """
        return cls(shape, np.empty(0, np.int64), np.empty(0, bool), 0.0, dtype, _validated=True)

    @classmethod
    def from_dense(cls, array: Any, dtype: Any = None) -> TernaryTensor:
        """Build from a dense numpy array or torch tensor whose nonzeros share one magnitude.

        Raises :class:`EncodeError` for non-float data, non-finite values, nonzeros of
        different magnitudes, or a magnitude that float32 cannot hold exactly.

        >>> TernaryTensor.from_dense(np.array([0.0, -2.0, 2.0])).dtype
        'F64'
        """
        storage, name = _dt.to_storage(array)
        if name not in TERNARY_DTYPES:
            raise EncodeError(f"from_dense needs float data, got {name}")
        values = _dt.to_numpy_values(storage, name).reshape(-1)
        if not np.isfinite(values).all():
            raise EncodeError("from_dense: the array holds NaN or infinity")
        indices = np.flatnonzero(values)
        nz = values[indices]
        mags = np.abs(nz)
        scale = float(mags[0]) if indices.size else 0.0
        if indices.size and not bool(np.all(mags == mags[0])):
            raise EncodeError(
                f"from_dense: nonzeros have {np.unique(mags).size} different magnitudes "
                f"({float(mags.min())!r} .. {float(mags.max())!r}); a ternary tensor has one"
            )
        if float(np.float32(scale)) != scale:
            raise EncodeError(f"from_dense: magnitude {scale!r} is not exact in float32")
        out_dtype = name if dtype is None else dtype
        return cls(storage.shape, indices, np.signbit(nz), scale, out_dtype, _validated=True)

    # -- conversion ------------------------------------------------------------------------
    def to_numpy(self, dtype: Any = None, *, out: np.ndarray | None = None,
                 limits: ReadLimits = DEFAULT_LIMITS) -> np.ndarray:
        """Return the dense array; BF16 comes back as float32 holding bfloat16 values.

        ``dtype`` (``"F32"``, ``np.float16``, ...) overrides the stored dtype. ``out``, a
        C-contiguous writeable array of ``numel`` elements of that numpy dtype, receives the
        values instead of a new array (it is zeroed first) and is returned. A new array
        above ``limits.max_dense_bytes`` (16 GiB) raises :class:`LimitExceededError`.

        >>> TernaryTensor((3,), [2], [True], 0.1, "F16").to_numpy()
        array([ 0. ,  0. , -0.1], dtype=float16)
        """
        name = self.dtype if dtype is None else _dtype_name(dtype)
        vals = dense_values(self.scale, name)
        if out is None:
            flat, prefault = dense_zeros(self.shape, vals.dtype, self.nnz, limits)
        else:
            flat, prefault = dense_output(out, self.numel, vals.dtype), None
        self._scatter(flat, vals, prefault)
        return flat.reshape(self.shape) if out is None else out

    def to_torch(self, dtype: Any = None, *, limits: ReadLimits = DEFAULT_LIMITS):
        """Return the dense ``torch.Tensor`` in the stored dtype (BF16 native).

        ``limits.max_dense_bytes`` bounds its size, as for :meth:`to_numpy`.

        >>> TernaryTensor((2,), [0], [False], 1.5, "BF16").to_torch()
        tensor([1.5000, 0.0000], dtype=torch.bfloat16)
        """
        name = self.dtype if dtype is None else _dtype_name(dtype)
        vals = dense_values(self.scale, name, bf16_bits=True)
        flat, prefault = dense_zeros(self.shape, vals.dtype, self.nnz, limits)
        self._scatter(flat, vals, prefault)
        return _dt.to_torch(flat.reshape(self.shape), name)

    def _scatter(self, flat: np.ndarray, vals: np.ndarray, prefault: Prefault | None) -> None:
        """Write ``vals[sign]`` at every nonzero, a cache-sized chunk of nonzeros at a time.

        Chunks avoid a values array of the whole tensor (one gather per chunk instead).
        """
        signs = self.signs.view(np.uint8)
        with writing(prefault) as ready:
            for a in range(0, self.nnz, _SCATTER_CHUNK):
                idx = self.indices[a : a + _SCATTER_CHUNK]
                if ready is not None:
                    ready(int(idx[-1]))
                flat[idx] = vals.take(signs[a : a + _SCATTER_CHUNK])

    # -- value semantics -------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TernaryTensor):
            return NotImplemented
        return (
            self.shape == other.shape
            and self.dtype == other.dtype
            and np.float32(self.scale).tobytes() == np.float32(other.scale).tobytes()
            and np.array_equal(self.indices, other.indices)
            and np.array_equal(self.signs, other.signs)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable arrays inside

    def __repr__(self) -> str:
        return (
            f"TernaryTensor(shape={self.shape}, nnz={self.nnz}, scale={self.scale!r}, "
            f"dtype={self.dtype!r})"
        )
