"""The scale block (spec 6.4): the per-tensor magnitude as one little-endian float32."""

from __future__ import annotations

import math
import struct

from .._spec import BLOCK_SCALE, SCALE_F32
from ..errors import UnsupportedFeatureError
from .base import BlockCodec, BlockContext

_F32 = struct.Struct("<f")


class ScaleCodec(BlockCodec):
    """One float32; ``Param`` is the Scale_Dtype, 0 = one F32 for the whole tensor.

    Param values other than 0 are reserved for per-row scales in a later minor version.

    >>> from compeft_format.codecs import ScaleCodec, BlockContext
    >>> ScaleCodec().encode(0.5, BlockContext("t", 4, 1, "F32", (4,)))
    (0, b'\\x00\\x00\\x00?')
    """

    block_type = BLOCK_SCALE
    name = "scale"
    role = "scale"

    def encode(self, value: float, ctx: BlockContext) -> tuple[int, bytes]:
        return SCALE_F32, _F32.pack(value)

    def decode(self, payload: memoryview, param: int, ctx: BlockContext) -> float:
        if param != SCALE_F32:
            raise ctx.error(f"scale block: scale dtype {param} is unknown", UnsupportedFeatureError)
        if len(payload) != 4:
            raise ctx.error(f"scale block: {len(payload)} bytes, a float32 scale needs 4")
        (scale,) = _F32.unpack(payload)
        # spec 6.4: finite and not negative (no sign bit, so -0.0 is out too)
        if not math.isfinite(scale) or math.copysign(1.0, scale) < 0:
            raise ctx.error(f"scale block: scale must be finite and non-negative, got {scale!r}")
        return scale

    def max_decoded_size(self, param: int, ctx: BlockContext) -> int:
        return 4
