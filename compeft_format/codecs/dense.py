"""Dense data (spec 6.5): the raw little-endian elements of a tensor kept losslessly."""

from __future__ import annotations

import numpy as np

from .._spec import BLOCK_DENSE, ITEMSIZE
from ..dtypes import storage_dtype
from .base import BlockCodec, BlockContext


class DenseCodec(BlockCodec):
    """``numel * itemsize`` bytes in C order, as safetensors stores them.

    >>> from compeft_format.codecs import DenseCodec, BlockContext
    >>> DenseCodec().encode(np.array([1, 2], np.int16), BlockContext("t", 2, 0, "I16", (2,)))
    (0, b'\\x01\\x00\\x02\\x00')
    """

    block_type = BLOCK_DENSE
    name = "dense"
    role = "dense"

    def encode(self, value: np.ndarray, ctx: BlockContext) -> tuple[int, bytes]:
        return 0, np.ascontiguousarray(value, dtype=storage_dtype(ctx.dtype)).tobytes()

    def decode(self, payload: memoryview, param: int, ctx: BlockContext) -> np.ndarray:
        if param != 0:
            raise ctx.error(f"dense block: param must be 0, got {param}")
        need = ctx.numel * ITEMSIZE[ctx.dtype]
        if len(payload) != need:
            raise ctx.error(f"dense block: {len(payload)} bytes, {ctx.dtype}{list(ctx.shape)} "
                            f"needs {need}")
        arr = np.frombuffer(payload, dtype=storage_dtype(ctx.dtype))
        if ctx.dtype == "BOOL" and arr.size and np.frombuffer(payload, np.uint8).max() > 1:
            raise ctx.error("dense block: BOOL bytes must be 0 or 1")  # spec 6.5
        return arr.reshape(ctx.shape)

    def max_decoded_size(self, param: int, ctx: BlockContext) -> int:
        return ctx.numel * ITEMSIZE[ctx.dtype]
