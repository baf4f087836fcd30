"""Dtype handling: safetensors dtype names, numpy storage types, BF16/F8 and torch interop.

numpy has no bfloat16 or float8, so such data travels as its raw bits (``uint16``/``uint8``)
inside the package: the *storage* array. :func:`to_numpy_values` widens it to float32 exactly;
:func:`to_torch` gives the native torch dtype.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._spec import ITEMSIZE
from .errors import EncodeError

__all__ = [
    "bf16_bits_to_f32",
    "f32_to_bf16_bits",
    "is_torch_tensor",
    "numpy_dtype_name",
    "storage_dtype",
    "to_numpy_values",
    "to_storage",
    "to_torch",
    "torch_dtype_name",
]

_NUMPY_BY_NAME: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
    "F8_E4M3": np.dtype("u1"),  # raw bits
    "F8_E5M2": np.dtype("u1"),  # raw bits
}
_NAME_BY_NUMPY: dict[np.dtype, str] = {
    np.dtype(t): n
    for n, t in [
        ("F64", "f8"), ("F32", "f4"), ("F16", "f2"), ("I64", "i8"), ("I32", "i4"),
        ("I16", "i2"), ("I8", "i1"), ("U64", "u8"), ("U32", "u4"), ("U16", "u2"),
        ("U8", "u1"), ("BOOL", "?"),
    ]
}
_TORCH_NAMES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
    "int32": "I32", "int16": "I16", "int8": "I8", "uint64": "U64", "uint32": "U32",
    "uint16": "U16", "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}
assert set(_NUMPY_BY_NAME) == set(ITEMSIZE)


def storage_dtype(name: str) -> np.dtype:
    """Return the numpy dtype that holds the raw little-endian bits of dtype ``name``."""
    try:
        return _NUMPY_BY_NAME[name]
    except KeyError:
        raise EncodeError(f"unknown dtype {name!r}; known: {sorted(_NUMPY_BY_NAME)}") from None


def numpy_dtype_name(dtype: np.dtype) -> str:
    """Return the safetensors name of a numpy dtype (``float32`` -> ``"F32"``)."""
    dt = np.dtype(dtype).newbyteorder("=") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)
    try:
        return _NAME_BY_NUMPY[dt]
    except KeyError:
        raise EncodeError(f"numpy dtype {np.dtype(dtype)} has no safetensors equivalent") from None


def torch_dtype_name(dtype: Any) -> str | None:
    """The safetensors name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``), or None.

    >>> import torch
    >>> torch_dtype_name(torch.bfloat16), torch_dtype_name(torch.complex64)
    ('BF16', None)
    """
    return _TORCH_NAMES.get(str(dtype).removeprefix("torch."))


def is_torch_tensor(x: Any) -> bool:
    """Return True for a ``torch.Tensor`` without importing torch."""
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def to_storage(x: Any, dtype: str | None = None) -> tuple[np.ndarray, str]:
    """Return ``(storage_array, dtype_name)`` for a numpy array or torch tensor.

    The storage array is C-contiguous little-endian; BF16 and F8 become their raw bits.
    A numpy ``uint16``/``uint8`` array can be declared BF16/F8 with ``dtype``.

    >>> arr, name = to_storage(np.ones(3, np.float16))
    >>> name, arr.dtype
    ('F16', dtype('float16'))
    """
    if is_torch_tensor(x):
        if x.device.type == "meta":
            raise EncodeError(f"a tensor on the meta device has no values (shape "
                              f"{tuple(x.shape)}); materialise it first")
        if str(x.layout) != "torch.strided":
            raise EncodeError(f"a {x.layout} tensor: give it dense (.to_dense())")
        t = x.detach().cpu().contiguous()
        name = _TORCH_NAMES.get(str(t.dtype).removeprefix("torch."))
        if name is None:
            raise EncodeError(f"torch dtype {t.dtype} has no safetensors equivalent")
        if name == "BF16":
            import torch

            arr = t.view(torch.uint16).numpy()
        elif name.startswith("F8"):
            import torch

            arr = t.view(torch.uint8).numpy()
        else:
            arr = t.numpy()
    else:
        arr = np.asarray(x)
        name = numpy_dtype_name(arr.dtype)
    if dtype is not None and dtype != name:
        if storage_dtype(dtype) != storage_dtype(name):
            raise EncodeError(f"cannot declare {name} data as {dtype}")
        name = dtype
    want = storage_dtype(name)
    # spec 2.1: little-endian, C order; the reshape keeps a 0-d array 0-d (ascontiguousarray
    # returns at least 1-d)
    arr = np.ascontiguousarray(arr, dtype=want).reshape(arr.shape)
    return arr, name


def f32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) and return the raw ``uint16`` bits."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    u = a.view(np.uint32)
    out = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():  # keep NaN a NaN (rounding could carry into the exponent)
        out[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return out


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bits to float32 exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _f8_table(exp_bits: int, man_bits: int, bias: int, fn: bool) -> np.ndarray:
    """Return the 256-entry float32 decode table of an 8-bit float format."""
    table = np.empty(256, dtype=np.float32)
    for b in range(256):
        sign = -1.0 if b & 0x80 else 1.0
        e = (b >> man_bits) & ((1 << exp_bits) - 1)
        m = b & ((1 << man_bits) - 1)
        if fn and e == (1 << exp_bits) - 1 and m == (1 << man_bits) - 1:
            v = np.nan  # e4m3fn: only S.1111.111 is NaN, no infinities
        elif not fn and e == (1 << exp_bits) - 1:
            v = np.inf if m == 0 else np.nan
        elif e == 0:
            v = m / (1 << man_bits) * 2.0 ** (1 - bias)
        else:
            v = (1 + m / (1 << man_bits)) * 2.0 ** (e - bias)
        table[b] = sign * v
    return table


_F8_TABLES = {
    "F8_E4M3": _f8_table(4, 3, 7, fn=True),
    "F8_E5M2": _f8_table(5, 2, 15, fn=False),
}


def to_numpy_values(arr: np.ndarray, name: str) -> np.ndarray:
    """Return storage data as numpy values: BF16 and F8 widen exactly to float32."""
    if name == "BF16":
        return bf16_bits_to_f32(arr)
    if name in _F8_TABLES:
        return _F8_TABLES[name][arr]
    return arr


def to_torch(arr: np.ndarray, name: str):
    """Return storage data as a torch tensor of the native dtype (BF16 and F8 included)."""
    import torch

    if not arr.flags.writeable:
        arr = arr.copy()  # torch warns on read-only memory (a file map, a bytes object)
    shape = arr.shape  # np.ascontiguousarray returns at least 1-d: a 0-d array gets it back
    if name == "BF16":
        out = torch.from_numpy(np.ascontiguousarray(arr, np.uint16)).view(torch.bfloat16)
    elif name == "F8_E4M3":
        out = torch.from_numpy(np.ascontiguousarray(arr, np.uint8)).view(torch.float8_e4m3fn)
    elif name == "F8_E5M2":
        out = torch.from_numpy(np.ascontiguousarray(arr, np.uint8)).view(torch.float8_e5m2)
    else:
        out = torch.from_numpy(np.ascontiguousarray(arr))
    return out.reshape(shape)
