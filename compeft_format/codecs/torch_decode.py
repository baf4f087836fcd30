"""Decoding blocks with torch operations on any device (spec 6), bit-identical to the numpy codecs.

The reader copies a record's *compressed* payloads to the device (after the zstd stage, which
runs on the host) and rebuilds the tensor there, so the host-to-device copy is the compressed
size, not the dense one:

* bitmask (spec 6.1): the bytes are unpacked LSB-first by shifts, the positions are the set bits;
* golomb (spec 6.2): the remainder planes are summed by shifts, long codes take their extension
  bit through a cumulative count of long codes, and with ``t_k`` the offset of the k-th one bit
  of the unary part and ``R_k`` the cumulative sum of the remainders,
  ``p_k = M * (t_k - k) + R_k + k`` (one ``nonzero`` and one ``cumsum``);
* signs (spec 6.3): unpacked bits, 1 = negative;
* the dense tensor: a zero tensor and one scatter of ``+v``/``-v`` at the positions.

Every rule a numpy codec checks is checked here too: the rules on sizes and padding bits on
the host, the rules on the data (bit counts, where the stream ends, positions below numel) on
the device, with one synchronisation per block. When a rule is broken, the numpy codec decodes
the same payload to raise its own error, so both paths report the same rule, message and
offset. A golomb block whose positions could overflow int64 arithmetic (a huge ``M`` with a
long stream, only in hostile files) is decoded by the numpy codec and copied.

torch is imported when a function here is first called (it is an optional dependency).

>>> import numpy as np
>>> from compeft_format.codecs import BlockContext, GolombCodec
>>> ctx = BlockContext("t", numel=16, nnz=3, dtype="F32", shape=(16,))
>>> m, payload = GolombCodec().encode(np.array([2, 3, 11]), ctx)
>>> positions(GolombCodec.block_type, memoryview(payload), m, ctx, "cpu").tolist()
[2, 3, 11]
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from .._spec import BLOCK_BITMASK, BLOCK_GOLOMB
from ..errors import CorruptDataError
from ..tensor import TernaryTensor, dense_values
from ._bits import check_packed
from .base import BlockCodec, BlockContext
from .dense import DenseCodec
from .registry import get_codec

__all__ = ["FORCE_TORCH", "TORCH_DTYPES", "DeviceTernary", "decode_block", "dense",
           "dense_block", "from_host", "host_to_device", "on_device", "positions", "signs",
           "ternary_dense", "torch_dtype"]

#: The torch dtype (attribute of the ``torch`` module) of each safetensors dtype name.
TORCH_DTYPES = {
    "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
    "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64", "U8": "uint8",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
_INT64_SAFE = 1 << 62  # golomb arithmetic below this bound never wraps in int64

#: Decode with torch on the CPU too. A CPU device otherwise takes the numpy decoders, which
#: are faster there; the tests set this to run the device path in CI, where there is no GPU.
FORCE_TORCH = False


class DeviceTernary(NamedTuple):
    """A ternary record decoded on a device: positions (int64) and signs (bool, True =
    negative) there, the scale and the record's dtype and shape on the host."""

    positions: Any
    negative: Any
    scale: float
    dtype: str
    shape: tuple[int, ...]


def _torch() -> Any:
    from ..errors import MissingDependencyError

    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError("decoding on a torch device needs torch "
                                     "(pip install torch)") from exc
    return torch


def torch_dtype(name: str) -> Any:
    """Return the torch dtype of the safetensors dtype ``name`` (``"BF16"`` -> ``bfloat16``).

    >>> torch_dtype("BF16")
    torch.bfloat16
    """
    return getattr(_torch(), TORCH_DTYPES[name])


def host_to_device(buf: np.ndarray | memoryview | bytes, device: Any) -> Any:
    """Copy host bytes to a uint8 tensor on ``device``.

    The result never shares memory with ``buf`` (which may be a read-only memory map).
    """
    torch = _torch()
    arr = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf
    host = torch.from_numpy(np.array(arr, dtype=np.uint8))  # a writable copy
    dev = torch.device(device)
    return host if dev.type == "cpu" else host.to(dev)


def on_device(device: Any) -> bool:
    """Whether ``device`` decodes with torch: any device but the CPU (unless forced).

    >>> on_device("cpu")
    False
    """
    return FORCE_TORCH or _torch().device(device).type != "cpu"


def decode_block(codec: BlockCodec, payload: memoryview, param: int, ctx: BlockContext,
                 device: Any) -> Any:
    """Decode a positions, signs or dense block (the payload, on the host) on ``device``."""
    if codec.role == "positions":
        return positions(codec.block_type, payload, param, ctx, device)
    if codec.role == "signs":
        return signs(payload, param, ctx, device)
    if codec.role == "dense":
        return dense_block(payload, param, ctx, device)
    raise ctx.error(f"a {codec.name} block is decoded on the host")


def dense(value: Any) -> Any:
    """The dense tensor of a record decoded on a device (a :class:`DeviceTernary` or already
    a tensor), in the record's dtype."""
    if not isinstance(value, DeviceTernary):
        return value
    return ternary_dense(value.positions, value.negative, dense_values(value.scale, value.dtype),
                         value.dtype, value.shape)


def from_host(value: Any, device: Any) -> Any:
    """What a numpy decoder gave (a :class:`TernaryTensor` or ``(storage, dtype)``), on
    ``device``, as the torch decoders give it."""
    torch = _torch()
    if isinstance(value, TernaryTensor):
        # torch.tensor copies: a TernaryTensor's arrays are read-only (from_numpy would share them)
        return DeviceTernary(torch.tensor(value.indices).to(device),
                             torch.tensor(value.signs).to(device), value.scale,
                             value.dtype, value.shape)
    from ..dtypes import to_torch

    return to_torch(*value).to(device)


def _unpack(t: Any, count: int | None = None) -> Any:
    """LSB-first bits of the uint8 tensor ``t`` (spec 2.2) as a uint8 tensor of 0/1."""
    torch = _torch()
    shifts = torch.arange(8, dtype=torch.uint8, device=t.device)
    bits = torch.bitwise_and(torch.bitwise_right_shift(t.unsqueeze(1), shifts), 1).reshape(-1)
    return bits if count is None else bits[:count]


def _numpy_error(block_type: int, payload: memoryview, param: int, ctx: BlockContext,
                 fallback: str) -> Exception:
    """The error the numpy codec raises on this payload (so both paths say the same)."""
    try:
        get_codec(block_type, ctx).decode(payload, param, ctx)
    except CorruptDataError as exc:
        return exc
    return ctx.error(fallback)  # pragma: no cover - the two decoders disagree on validity


def positions(block_type: int, payload: memoryview, param: int, ctx: BlockContext,
              device: Any) -> Any:
    """Decode a positions block (bitmask or golomb) on ``device``: int64 positions, checked.

    ``payload`` is the block's bytes on the host (after any stage). Raises the error the
    numpy codec raises for the same payload.
    """
    if block_type == BLOCK_BITMASK:
        return _bitmask(payload, param, ctx, device)
    if block_type == BLOCK_GOLOMB:
        return _golomb(payload, param, ctx, device)
    raise ctx.error(f"block type 0x{block_type:02x} holds no positions")


def _bitmask(payload: memoryview, param: int, ctx: BlockContext, device: Any) -> Any:
    torch = _torch()
    if param != 0:  # spec 6.1: Param is 0
        raise ctx.error(f"bitmask block: param must be 0, got {param}")
    buf = check_packed(payload, ctx.numel, ctx, "bitmask block")  # size, padding (host)
    if not ctx.nnz:
        if buf.any():
            raise _numpy_error(BLOCK_BITMASK, payload, param, ctx, "bitmask block: bits set")
        return torch.empty(0, dtype=torch.int64, device=device)
    pos = torch.nonzero(_unpack(host_to_device(buf, device))).reshape(-1)
    if pos.numel() != ctx.nnz:  # spec 6.1: popcount equals Nnz
        raise _numpy_error(BLOCK_BITMASK, payload, param, ctx, "bitmask block: count")
    return pos


def _code_shape(m: int) -> tuple[int, int, int]:
    """``(b, u, w)`` of spec 6.2: code length bound, count of short codes, plane count."""
    b = (m - 1).bit_length()
    u = (1 << b) - m
    return b, u, max(b - 1, 0)


def _golomb(payload: memoryview, param: int, ctx: BlockContext, device: Any) -> Any:
    torch = _torch()
    n, numel, m = ctx.nnz, ctx.numel, param
    size = len(payload)
    total = 8 * size

    def fail() -> Exception:
        return _numpy_error(BLOCK_GOLOMB, payload, param, ctx, "golomb block: invalid")

    b, u, w = _code_shape(max(1, m))
    if not 1 <= m <= max(1, numel) or n == 0 or (w + 1) * n > total:
        if n == 0 and size == 0 and m == 1:
            return torch.empty(0, dtype=torch.int64, device=device)
        raise fail()  # spec 6.2.2 and R-GOL-3, worded by the numpy codec
    if m * (total + n + 1) >= _INT64_SAFE:  # only hostile files: exact arithmetic on the host
        pos = get_codec(BLOCK_GOLOMB, ctx).decode(payload, param, ctx)
        return torch.from_numpy(pos).to(device)
    bits = _unpack(host_to_device(np.frombuffer(payload, dtype=np.uint8), device))
    v = torch.zeros(n, dtype=torch.int64, device=bits.device)
    for j in range(w):  # spec 6.2.1: plane j holds bit j of every v_k
        v |= bits[j * n : (j + 1) * n].to(torch.int64) << j
    if not b:
        n_long, is_long = 0, None
    elif not u:
        n_long, is_long = n, None  # M a power of two: every code is long
    else:
        is_long = v >= u
        n_long = int(is_long.sum())
    start = w * n + n_long
    if start + n > total:  # R-GOL-4
        raise fail()
    ones = torch.nonzero(bits[start:]).reshape(-1)
    # R-GOL-5: exactly n unary codes; R-GOL-6: the stream ends in the last byte
    if ones.numel() != n or (start + int(ones[-1])) >> 3 != size - 1:
        raise fail()
    k = torch.arange(n, dtype=torch.int64, device=bits.device)
    if not b:
        r = torch.zeros(n, dtype=torch.int64, device=bits.device)
    elif is_long is None:  # r = 2v + e for every code
        r = 2 * v + bits[w * n : w * n + n].to(torch.int64)
    else:  # long codes take their extension bit in order of appearance: r = 2v + e - u
        ext = bits[w * n : w * n + n_long].to(torch.int64)
        which = torch.cumsum(is_long, 0) - 1
        long_r = 2 * v + ext[which.clamp(min=0)] - u if n_long else v
        r = torch.where(is_long, long_r, v)
    # spec 6.2.1 step 6: p_k = sum_{i<=k} (q_i M + r_i + 1) - 1, with sum q_i = t_k - k
    pos = m * (ones - k) + torch.cumsum(r, 0) + k
    if int(pos[-1]) >= numel:  # R-GOL-7 (exact: no term can wrap, checked above)
        raise fail()
    return pos


def signs(payload: memoryview, param: int, ctx: BlockContext, device: Any) -> Any:
    """Decode a signs block on ``device``: one bool per nonzero, True = negative (spec 6.3)."""
    if param != 0:  # spec 6.3: Param is 0
        raise ctx.error(f"signs block: param must be 0, got {param}")
    buf = check_packed(payload, ctx.nnz, ctx, "signs block")
    return _unpack(host_to_device(buf, device), ctx.nnz).bool()


def ternary_dense(pos: Any, neg: Any, values: np.ndarray, name: str,
                  shape: tuple[int, ...], dtype: Any = None) -> Any:
    """The dense tensor of a ternary record on the device of ``pos``.

    ``values`` is ``[+v, -v]`` as :func:`compeft_format.tensor.dense_values` gives them for
    the record's dtype ``name`` (BF16 as float32 values); the result has torch dtype
    ``dtype`` (default: the record's own), converted from the record's values as
    ``Tensor.to`` converts.
    """
    torch = _torch()
    own = torch_dtype(name)
    vals = torch.from_numpy(np.ascontiguousarray(values)).to(own)
    target = own if dtype is None else dtype
    vals = vals.to(device=pos.device, dtype=target)
    numel = math.prod(shape)
    out = torch.zeros(numel, dtype=target, device=pos.device)
    if pos.numel():
        out[pos] = vals[neg.to(torch.int64)]
    return out.reshape(shape)


def dense_block(payload: memoryview, param: int, ctx: BlockContext, device: Any) -> Any:
    """Decode a dense block (spec 6.5) to a tensor of its own dtype on ``device``.

    The block is checked by the numpy codec (sizes, BOOL bytes), then its bytes are copied.
    """
    DenseCodec().decode(payload, param, ctx)  # the checks; a view, no copy
    dtype = torch_dtype(ctx.dtype)
    if not len(payload):  # an empty uint8 tensor (stride 0) cannot be viewed as another dtype
        return _torch().empty(ctx.shape, dtype=dtype, device=device)
    raw = host_to_device(np.frombuffer(payload, dtype=np.uint8), device)
    return raw.view(dtype).reshape(ctx.shape)

