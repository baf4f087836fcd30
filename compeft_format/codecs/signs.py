"""Sign bits (spec 6.3): one bit per nonzero in position order, 1 = negative, LSB-first."""

from __future__ import annotations

import numpy as np

from .._spec import BLOCK_SIGNS
from ._bits import check_packed, pack_bits, unpack_bits
from .base import BlockCodec, BlockContext


class SignsCodec(BlockCodec):
    """Encode the signs of the nonzeros as a packed bit array.

    >>> from compeft_format.codecs import SignsCodec, BlockContext
    >>> ctx = BlockContext("t", numel=8, nnz=3, dtype="F32", shape=(8,))
    >>> SignsCodec().encode(np.array([True, False, True]), ctx)
    (0, b'\\x05')
    """

    block_type = BLOCK_SIGNS
    name = "signs"
    role = "signs"

    def encode(self, value: np.ndarray, ctx: BlockContext) -> tuple[int, bytes]:
        return 0, pack_bits(value)

    def decode(self, payload: memoryview, param: int, ctx: BlockContext) -> np.ndarray:
        if param != 0:  # spec 6.3: Param is 0
            raise ctx.error(f"signs block: param must be 0, got {param}")
        return unpack_bits(payload, ctx.nnz, ctx, "signs block")

    def packed(self, payload: memoryview, param: int, ctx: BlockContext) -> np.ndarray:
        """Validate the block like :meth:`decode`; return the packed bits (uint8), not bools.

        The dense decoders unpack the few signs of each chunk they write instead.
        """
        if param != 0:  # spec 6.3: Param is 0
            raise ctx.error(f"signs block: param must be 0, got {param}")
        return check_packed(payload, ctx.nnz, ctx, "signs block")

    def max_decoded_size(self, param: int, ctx: BlockContext) -> int:
        return (ctx.nnz + 7) // 8
