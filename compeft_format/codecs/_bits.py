"""Bit packing in the one bit order of the format (spec 2.2: LSB-first), and the helpers the
fast paths share: bit ranges that start anywhere, joining two bit streams, and writing
signed values at decoded positions chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from .base import BlockContext

_POP8 = np.array([i.bit_count() for i in range(256)], dtype=np.uint8)


def popcount(a: np.ndarray) -> np.ndarray:
    """Return the number of one bits of each element of the unsigned integer array ``a``.

    ``np.bitwise_count`` where numpy has it (2.0+); on numpy 1.x a table look-up per byte.

    >>> popcount(np.array([0, 1, 255, 0x101], dtype=np.uint16)).tolist()
    [0, 1, 8, 2]
    """
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(a)
    a = np.ascontiguousarray(a)
    if a.dtype == np.uint8:
        return _POP8[a]
    per_byte = _POP8[a.view(np.uint8)].reshape(*a.shape, a.itemsize)
    return per_byte.sum(axis=-1, dtype=np.uint8)


def popcount_total(buf: np.ndarray) -> int:
    """Return the number of one bits of the uint8 array ``buf``."""
    return int(popcount(buf).sum(dtype=np.int64))


def pack_bits(bits: np.ndarray) -> bytes:
    """Pack a bool array LSB-first; the padding bits of the last byte are zero."""
    return np.packbits(np.asarray(bits, dtype=bool), bitorder="little").tobytes()


def check_packed(payload: memoryview, count: int, ctx: BlockContext, what: str) -> np.ndarray:
    """Return ``payload`` as uint8 after the size and zero-padding rules of spec 2.2."""
    need = (count + 7) // 8
    if len(payload) != need:
        raise ctx.error(f"{what}: {len(payload)} bytes, {count} bits need exactly {need}")
    buf = np.frombuffer(payload, dtype=np.uint8)
    if count % 8 and buf[-1] >> (count % 8):
        raise ctx.error(f"{what}: padding bits must be zero (last byte 0x{int(buf[-1]):02x})")
    return buf


def unpack_bits(payload: memoryview, count: int, ctx: BlockContext, what: str) -> np.ndarray:
    """Unpack exactly ``count`` bits, enforcing the size and zero-padding rules of spec 2.2."""
    buf = check_packed(payload, count, ctx, what)
    return np.unpackbits(buf, count=count, bitorder="little").view(bool)


def bit_slice(buf: np.ndarray, start: int, count: int) -> np.ndarray:
    """Return bits ``start .. start + count`` of the LSB-first stream ``buf`` as bools.

    Only the bytes that hold them are unpacked, so a loop over a long stream stays in cache.
    """
    first = start >> 3
    bits = np.unpackbits(buf[first : (start + count + 7) >> 3], bitorder="little").view(bool)
    off = start - 8 * first
    return bits[off : off + count]


def packed_slice(buf: np.ndarray, start: int, count: int) -> np.ndarray:
    """Return bits ``start .. start + count`` of ``buf`` repacked from bit 0, padding zero.

    Works on whole bytes (a shift and an or), 8x less data than unpacking.
    """
    first, shift = start >> 3, start & 7
    nbytes = (count + 7) >> 3
    if shift == 0:
        out = buf[first : first + nbytes].copy()
    else:
        lo = buf[first : first + nbytes] >> shift
        hi = np.zeros(nbytes, dtype=np.uint8)
        nxt = buf[first + 1 : first + 1 + nbytes]  # may be one byte short at the end
        hi[: nxt.size] = nxt << (8 - shift)
        out = lo | hi
    if count & 7:
        out[-1] &= (1 << (count & 7)) - 1
    return out


def count_ones(buf: np.ndarray, start: int) -> int:
    """Return the number of one bits from bit ``start`` to the end of ``buf``."""
    first = start >> 3
    if first >= buf.size:
        return 0
    total = popcount_total(buf[first:])
    below = int(buf[first]) & ((1 << (start & 7)) - 1)  # bits of the first byte before start
    return total - below.bit_count()


def join_bits(head: np.ndarray, head_bits: int, tail: np.ndarray, tail_bits: int) -> bytes:
    """Return the packed stream ``head[:head_bits] + tail[:tail_bits]``.

    Both inputs are packed LSB-first with zero padding; the tail is shifted into place a byte
    at a time instead of going through one bool per bit.
    """
    return concat_bits([(head, head_bits), (tail, tail_bits)])


def concat_bits(parts: Iterable[tuple[np.ndarray, int]]) -> bytes:
    """Return the packed concatenation of ``(packed, nbits)`` streams (LSB-first, zero padded).

    Each part is shifted into place a byte at a time (two shifts and two ors per byte, in
    uint8: 3x faster than going through uint16), never unpacked.
    """
    parts = list(parts)
    total = sum(nbits for _, nbits in parts)
    out = np.zeros((total + 7) >> 3, dtype=np.uint8)
    at = 0
    for packed, nbits in parts:
        nb = (nbits + 7) >> 3
        first, shift = at >> 3, at & 7
        if shift == 0:
            out[first : first + nb] = packed[:nb]
        elif nb:
            src = packed[:nb]
            out[first : first + nb] |= np.left_shift(src, shift)  # uint8: the high bits drop
            spill = min(nb, out.size - first - 1)  # the last byte may spill past the end
            out[first + 1 : first + 1 + spill] |= np.right_shift(src[:spill], 8 - shift)
        at += nbits
    return out.tobytes()


class BitWriter:
    """Append bits chunk by chunk into a packed buffer, keeping the last partial byte aside.

    Packing each chunk as it comes keeps the bools of only one chunk alive (in cache), instead
    of one bool per bit of the whole stream.
    """

    def __init__(self, capacity_bits: int) -> None:
        self.buf = np.zeros((capacity_bits + 7) // 8 + 1, dtype=np.uint8)
        self.nbits = 0
        self._nbytes = 0  # whole bytes packed so far
        self._carry = np.zeros(0, dtype=bool)  # the < 8 bits not packed yet

    def _pack(self, bits: np.ndarray) -> None:
        """Pack the whole bytes of ``bits`` (which starts with the carry); keep the rest."""
        full = bits.size & ~7
        if full:
            at = self._nbytes
            self.buf[at : at + (full >> 3)] = np.packbits(bits[:full], bitorder="little")
            self._nbytes += full >> 3
        self._carry = bits[full:].copy()

    def write(self, bits: np.ndarray) -> None:
        """Append ``bits`` (bools, or integers where nonzero is a one)."""
        if not bits.size:
            return
        joined = np.empty(self._carry.size + bits.size, dtype=bool)
        joined[: self._carry.size] = self._carry
        joined[self._carry.size :] = bits
        self.nbits += bits.size
        self._pack(joined)

    @property
    def pending(self) -> int:
        """Bits written but not packed yet (fewer than 8): :meth:`write_ones` offsets shift."""
        return self._carry.size

    def write_ones(self, ones: np.ndarray, count: int) -> None:
        """Append ``count`` bits, zero but at the offsets ``ones - pending`` (intp; the
        caller adds :attr:`pending` to its offsets, saving a pass here)."""
        c = self._carry.size
        bits = np.zeros(c + count, dtype=bool)
        bits[:c] = self._carry
        bits[ones] = True
        self.nbits += count
        self._pack(bits)

    def packed(self) -> tuple[np.ndarray, int]:
        """Return ``(packed bytes, nbits)``; the padding bits are zero."""
        if self._carry.size:
            self.buf[self._nbytes] = np.packbits(self._carry, bitorder="little")[0]
        return self.buf[: (self.nbits + 7) >> 3], self.nbits


def scatter_signed(chunks: Iterable[tuple[int, np.ndarray]], signs: np.ndarray,
                   values: np.ndarray, out: np.ndarray,
                   ready: Callable[[int], None] | None = None) -> None:
    """Write ``values[sign]`` at each decoded position into the flat array ``out``.

    ``chunks`` yields ``(k0, positions)``: the positions of nonzeros ``k0, k0 + 1, ...``;
    ``signs`` is the packed signs block. Positions and their values are written one chunk at
    a time, so no index array of the whole tensor is ever built. The values come from a
    256 x 8 table indexed by whole sign bytes: one small gather per 8 nonzeros instead of a
    per-nonzero index conversion (2x faster at density 0.2). ``ready(i)``, when given, is
    called before writing at or below element ``i`` (see :class:`compeft_format._alloc.Prefault`).
    """
    table = values[(np.arange(256)[:, None] >> np.arange(8)) & 1]  # byte -> its 8 values
    for k0, pos in chunks:
        if ready is not None:
            ready(int(pos[-1]))
        first, off = k0 >> 3, k0 & 7
        vals = table.take(signs[first : (k0 + pos.size + 7) >> 3], axis=0).reshape(-1)
        out[pos] = vals[off : off + pos.size]
