"""Positions as a bitmask (spec 6.1): one bit per element, 1 = nonzero, LSB-first."""

from __future__ import annotations

import numpy as np

from .._spec import BLOCK_BITMASK
from ._bits import pack_bits, unpack_bits
from .base import BlockCodec, BlockContext, register_codec


@register_codec
class BitmaskCodec(BlockCodec):
    """Positions as ``numel`` presence bits.

    >>> from compeft_format.codecs import BitmaskCodec, BlockContext
    >>> ctx = BlockContext("t", numel=10, nnz=3, dtype="F32", shape=(10,))
    >>> BitmaskCodec().encode(np.array([0, 2, 9]), ctx)
    (0, b'\\x05\\x02')
    """

    block_type = BLOCK_BITMASK
    name = "bitmask"
    role = "positions"

    def encode(self, value: np.ndarray, ctx: BlockContext) -> tuple[int, bytes]:
        mask = np.zeros(ctx.numel, dtype=bool)
        mask[value] = True
        return 0, pack_bits(mask)

    def encoded_size(self, value: np.ndarray, ctx: BlockContext) -> tuple[int, int]:
        """Return ``(param, payload size)`` without encoding."""
        return 0, (ctx.numel + 7) // 8

    def decode(self, payload: memoryview, param: int, ctx: BlockContext) -> np.ndarray:
        if param != 0:  # spec 6.1: Param is 0
            raise ctx.error(f"bitmask block: param must be 0, got {param}")
        mask = unpack_bits(payload, ctx.numel, ctx, "bitmask block")
        indices = np.flatnonzero(mask)
        if indices.size != ctx.nnz:  # spec 6.1: popcount equals Nnz
            raise ctx.error(f"bitmask block: {indices.size} bits set, nnz is {ctx.nnz}")
        return indices

    def max_decoded_size(self, param: int, ctx: BlockContext) -> int:
        return (ctx.numel + 7) // 8
