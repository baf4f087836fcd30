"""Bit packing in the one bit order of the format (spec 2.2: LSB-first)."""

from __future__ import annotations

import numpy as np

from .base import BlockContext


def pack_bits(bits: np.ndarray) -> bytes:
    """Pack a bool array LSB-first; the padding bits of the last byte are zero."""
    return np.packbits(np.asarray(bits, dtype=bool), bitorder="little").tobytes()


def unpack_bits(payload: memoryview, count: int, ctx: BlockContext, what: str) -> np.ndarray:
    """Unpack exactly ``count`` bits, enforcing the size and zero-padding rules of spec 2.2."""
    need = (count + 7) // 8
    if len(payload) != need:
        raise ctx.error(f"{what}: {len(payload)} bytes, {count} bits need exactly {need}")
    buf = np.frombuffer(payload, dtype=np.uint8)
    if count % 8 and buf[-1] >> (count % 8):
        raise ctx.error(f"{what}: padding bits must be zero (last byte 0x{int(buf[-1]):02x})")
    return np.unpackbits(buf, count=count, bitorder="little").view(bool)
