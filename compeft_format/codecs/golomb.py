"""Positions as Golomb-coded gaps in a split layout (spec 6.2).

Each nonzero's gap (zeros since the previous nonzero) ``g`` is split into a quotient
``q = g // M`` and a remainder ``r = g % M``. Remainders use a truncated binary code of
``b - 1`` or ``b`` bits (``b = ceil(log2 M)``); quotients use a unary code. With ``M`` a
power of two this is a Golomb-Rice code. The bits are laid out as three parts of one stream:
remainder planes, extension bits and the unary part. That split, rather than interleaving
the codes, lets numpy encode and decode every code at once, with no sequential scan.
"""

from __future__ import annotations

import math

import numpy as np

from .._spec import BLOCK_GOLOMB
from .base import BlockCodec, BlockContext, register_codec


def _code_shape(m: int) -> tuple[int, int, int]:
    """Return ``(b, u, w)``: code length bound, count of short codes, plane count."""
    b = (m - 1).bit_length()  # ceil(log2 m)
    u = (1 << b) - m  # remainders below u take b - 1 bits
    return b, u, max(b - 1, 0)


def _gaps(indices: np.ndarray) -> np.ndarray:
    """Return the zero-run before each position (the first is counted from -1)."""
    return _runs(indices)


def _runs(ends: np.ndarray) -> np.ndarray:
    """Return ``ends[i] - ends[i - 1] - 1`` with ``ends[-1] = -1`` (no prepend copy)."""
    out = np.empty_like(ends)
    if ends.size:
        out[0] = ends[0]
        np.subtract(ends[1:], ends[:-1], out=out[1:])
        out[1:] -= 1
    return out


def _split(gaps: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(q, r)`` with ``gaps = q * m + r`` (faster than ``np.divmod``)."""
    q = gaps // m
    return q, gaps - q * m


def _cost_bits(gaps: np.ndarray, m: int) -> int:
    """Return the exact stream length in bits for parameter ``m``."""
    _b, u, w = _code_shape(m)
    n = gaps.size
    if m == 1:
        return int(gaps.sum()) + n
    q, r = _split(gaps, m)
    n_long = int(np.count_nonzero(r >= u)) if u else n
    return w * n + n_long + int(q.sum()) + n


_SAMPLE = 1 << 18  # gaps looked at when choosing M for a long stream


def choose_parameter(gaps: np.ndarray, numel: int) -> int:
    """Return the encoder's ``M`` (spec 6.2.3): the best of three around the geometric optimum.

    The Gallager-Van Voorhis rule ``M = ceil(log(1 + theta) / -log(theta))``, with
    ``theta = 1 - nnz / numel``, is optimal for independent positions; the exact cost of
    ``M - 1``, ``M`` and ``M + 1`` on the actual gaps picks the best (the smallest ``M`` on a tie).
    """
    n = gaps.size
    if n == 0:
        return 1
    theta = 1.0 - n / numel
    m0 = 1 if theta <= 0.0 else max(1, math.ceil(math.log1p(theta) / -math.log(theta)))
    m0 = min(m0, max(1, numel))
    candidates = [m for m in (m0 - 1, m0, m0 + 1) if 1 <= m <= max(1, numel)]
    # a fixed stride keeps the choice deterministic and cheap on long streams
    sample = gaps[:: max(1, n // _SAMPLE)]
    return min(candidates, key=lambda m: (_cost_bits(sample, m), m))


@register_codec
class GolombCodec(BlockCodec):
    """Positions as Golomb-coded gaps; ``Param`` is the Golomb parameter ``M``.

    >>> from compeft_format.codecs import GolombCodec, BlockContext
    >>> ctx = BlockContext("t", numel=16, nnz=3, dtype="F32", shape=(16,))
    >>> m, payload = GolombCodec().encode(np.array([2, 3, 11]), ctx)
    >>> m, payload.hex()
    (2, '3402')
    >>> GolombCodec().decode(memoryview(payload), m, ctx).tolist()
    [2, 3, 11]
    """

    block_type = BLOCK_GOLOMB
    name = "golomb"
    role = "positions"

    def encoded_size(self, value: np.ndarray, ctx: BlockContext) -> tuple[int, int]:
        """Return ``(M, payload size)`` without building the stream."""
        gaps = _gaps(np.asarray(value, dtype=np.int64))
        if not gaps.size:
            return 1, 0
        m = choose_parameter(gaps, ctx.numel)
        return m, (_cost_bits(gaps, m) + 7) // 8

    def encode(self, value: np.ndarray, ctx: BlockContext) -> tuple[int, bytes]:
        indices = np.asarray(value, dtype=np.int64)
        n = indices.size
        if n == 0:
            return 1, b""  # spec 6.2.2: an empty block has M = 1
        gaps = _gaps(indices)
        m = choose_parameter(gaps, ctx.numel)
        b, u, w = _code_shape(m)
        q, r = _split(gaps, m)
        if b >= 1:
            # branch-free truncated binary: a long code is r + u in b bits, whose top b - 1
            # bits go to the planes and whose low bit goes to the extension part
            long = r >= u
            where_long = np.flatnonzero(long)
            c = r
            c[where_long] += u
            ext = (c[where_long] & 1).astype(bool)
            v = np.right_shift(c, long.view(np.uint8), out=c)
        else:
            v = r
            ext = np.empty(0, dtype=bool)
        start = w * n + ext.size
        q += 1
        ends = np.cumsum(q, out=q)  # unary: q zeros then a one, so the ones end each code
        bits = np.zeros(start + int(ends[-1]), dtype=bool)
        for j in range(w):  # plane j holds bit j of every v (spec 6.2.1)
            np.not_equal(v & (1 << j), 0, out=bits[j * n : (j + 1) * n])
        bits[w * n : start] = ext
        ends += start - 1
        bits[ends] = True
        return m, np.packbits(bits, bitorder="little").tobytes()

    def decode(self, payload: memoryview, param: int, ctx: BlockContext) -> np.ndarray:
        n, numel, m = ctx.nnz, ctx.numel, param
        if not 1 <= m <= max(1, numel):  # spec 6.2.2
            raise ctx.error(f"golomb block: parameter M = {m} outside [1, {max(1, numel)}]")
        if n == 0:
            if len(payload) or m != 1:
                raise ctx.error(f"golomb block: nnz is 0 but M = {m} and {len(payload)} bytes")
            return np.empty(0, dtype=np.int64)
        b, u, w = _code_shape(m)
        total = 8 * len(payload)
        if (w + 1) * n > total:
            raise ctx.error(f"golomb block: {len(payload)} bytes cannot hold {n} codes "
                            f"with M = {m}")
        # a bool view: flatnonzero is 5x faster on bool than on uint8
        bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8), bitorder="little").view(bool)
        v = np.zeros(n, dtype=np.int64)
        for j in range(w):
            plane = bits[j * n : (j + 1) * n].view(np.uint8).astype(np.int64)
            v |= plane << j if j else plane
        start = w * n
        r = v
        if b >= 1:
            where_long = np.flatnonzero(v >= u)
            n_long = where_long.size
            if start + n_long + n > total:
                raise ctx.error(f"golomb block: {len(payload)} bytes too short for the codes")
            # a long code's plane bits are its top b - 1 bits; append the extension bit
            r[where_long] = ((v[where_long] << 1) | bits[start : start + n_long]) - u
            start += n_long
        ones = np.flatnonzero(bits[start:])
        if ones.size != n:  # spec 6.2.1: exactly nnz unary codes
            raise ctx.error(f"golomb block: {ones.size} unary codes, nnz is {n}")
        used = start + int(ones[-1]) + 1
        if (used + 7) // 8 != len(payload):  # spec 6.2.1: the stream ends in the last byte
            raise ctx.error(f"golomb block: stream ends at byte {(used + 7) // 8}, block has "
                            f"{len(payload)}")
        q = _runs(ones)
        # spec 6.2.1: the last position is below numel; Python ints, so nothing can wrap
        span = m * int(q.sum()) + int(r.sum()) + n
        if span > numel:
            raise ctx.error(f"golomb block: positions run to {span - 1}, numel is {numel}")
        q *= m
        q += r
        q += 1
        np.cumsum(q, out=q)
        q -= 1
        return q

    def max_decoded_size(self, param: int, ctx: BlockContext) -> int:
        _, _, w = _code_shape(max(1, param))
        return ((w + 2) * ctx.nnz + ctx.numel // max(1, param) + 7) // 8
