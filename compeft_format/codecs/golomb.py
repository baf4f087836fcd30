"""Positions as Golomb-coded gaps in a split layout (spec 6.2).

Each nonzero's gap (zeros since the previous nonzero) ``g`` is split into a quotient
``q = g // M`` and a remainder ``r = g % M``. Remainders use a truncated binary code of
``b - 1`` or ``b`` bits (``b = ceil(log2 M)``); quotients use a unary code. With ``M`` a
power of two this is a Golomb-Rice code. The bits are laid out as three parts of one stream:
remainder planes, extension bits and the unary part. That split, rather than interleaving
the codes, lets numpy encode and decode every code at once, with no sequential scan.

Both directions work in chunks (a few ten thousand codes, or a few KiB of the unary part) so
that every temporary stays in the CPU cache; the decoder yields positions chunk by chunk, so
a dense tensor can be written without building the index array of the whole tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from .._spec import BLOCK_GOLOMB
from ._bits import (
    BitWriter,
    bit_slice,
    concat_bits,
    count_ones,
    packed_slice,
    popcount,
    popcount_total,
)
from .base import BlockContext, PositionsCodec

_ENCODE_CHUNK = 1 << 16  # codes per encoder step: int32 temporaries of 256 KiB stay in L2
_DECODE_CHUNK = 1 << 15  # unary bytes per decoder step (262144 bits, ~10^4..10^5 codes)
_INT32_NUMEL = 2**31 - 2**20  # below this every gap, quotient and unary offset fits in int32


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


def _sample_gaps(indices: np.ndarray) -> np.ndarray:
    """Return ``_gaps(indices)[::stride]`` (the sample of :func:`choose_parameter`) directly.

    Only the sampled gaps are computed: the full gap array of a large tensor costs more
    than the whole rest of the choice.
    """
    n = indices.size
    stride = max(1, n // _SAMPLE)
    if stride == 1:
        return _gaps(indices)
    ends = indices[::stride]
    before = np.empty_like(ends)
    before[0] = -1
    before[1:] = indices[stride - 1 : n - 1 : stride][: ends.size - 1]
    return ends - before - 1


def _choose(sample: np.ndarray, n: int, numel: int) -> int:
    """:func:`choose_parameter` given its sample and the number of gaps."""
    if n == 0:
        return 1
    theta = 1.0 - n / numel
    m0 = 1 if theta <= 0.0 else max(1, math.ceil(math.log1p(theta) / -math.log(theta)))
    m0 = min(m0, max(1, numel))
    candidates = [m for m in (m0 - 1, m0, m0 + 1) if 1 <= m <= max(1, numel)]
    return min(candidates, key=lambda m: (_cost_bits(sample, m), m))


def choose_parameter(gaps: np.ndarray, numel: int) -> int:
    """Return the encoder's ``M`` (spec 6.2.3): the best of three around the geometric optimum.

    The Gallager-Van Voorhis rule ``M = ceil(log(1 + theta) / -log(theta))``, with
    ``theta = 1 - nnz / numel``, is optimal for independent positions; the exact cost of
    ``M - 1``, ``M`` and ``M + 1`` on the actual gaps picks the best (the smallest ``M`` on a tie).
    """
    n = gaps.size
    # a fixed stride keeps the choice deterministic and cheap on long streams
    return _choose(gaps[:: max(1, n // _SAMPLE)], n, numel)


def _encode_stream(indices: np.ndarray, m: int, numel: int) -> bytes:
    """Return the golomb stream of the sorted int64 ``indices`` with parameter ``m``.

    One pass over chunks of codes packs, chunk by chunk, the remainder planes (each its own
    packed array: a chunk of codes is whole bytes of every plane), the extension bits and the
    unary part (bit writers that carry a partial byte to the next chunk). The parts are
    joined at the end with byte-wise shifts: where the unary part starts depends on the count
    of long codes, known only then. No array of one bool per bit of the stream is built.
    """
    n = indices.size
    b, u, w = _code_shape(m)
    work = np.int32 if numel < _INT32_NUMEL else np.int64
    last = int(indices[-1])
    planes = np.zeros((w, (n + 7) // 8), dtype=np.uint8)
    ext_bits = BitWriter(n if b else 0)
    # sum(q) <= sum(gaps) // m = (last + 1 - n) // m, plus one terminating bit per code
    unary = BitWriter(n + (last + 1 - n) // m)
    plane_dtype = np.uint8 if w <= 8 else np.uint16 if w <= 16 else np.uint32 if w <= 32 else None
    prev = -1
    step = -(-_ENCODE_CHUNK // 8) * 8  # a multiple of 8: a chunk is whole bytes of each plane
    for k0 in range(0, n, step):
        x = indices[k0 : k0 + step].astype(work)  # narrow first: int32 math is 3x faster
        k = x.size
        g = np.empty(k, dtype=work)
        g[0] = x[0] - prev - 1
        np.subtract(x[1:], x[:-1], out=g[1:])
        g[1:] -= 1
        prev = int(x[-1])
        q = g // m
        if b:
            r = g - q * m
            if u:
                # branch-free truncated binary: a long code is r + u in b bits, whose top b - 1
                # bits go to the planes and whose low bit goes to the extension part
                is_long = r >= u
                # (dtype given: numpy 1.x would type uint8 * scalar by the scalar's value)
                c = r + np.multiply(is_long.view(np.uint8), u, dtype=work)
                # np.compress with a bool condition: 4x faster than c[mask] (and than a uint8 one)
                ext_bits.write(np.compress(is_long, c & 1))
                v = c >> is_long.view(np.uint8)
            else:  # M a power of two: every code is long
                ext_bits.write(r & 1)
                v = r >> 1
            if w:
                if plane_dtype is not None:
                    v = v.astype(plane_dtype)  # narrow: one byte per code for w <= 8
                for j in range(w):  # plane j holds bit j of every v (spec 6.2.1)
                    planes[j, k0 >> 3 : (k0 + k + 7) >> 3] = np.packbits(
                        v & (1 << j), bitorder="little")  # packbits: nonzero is a one
        # unary: q zeros then a one, so the ones sit at cumsum(q + 1) - 1
        q += 1
        np.cumsum(q, dtype=q.dtype, out=q)  # dtype: int32 would otherwise go via int64
        ends = q.astype(np.intp)  # scatter with intp indices: int32 ones are converted, 3x slower
        ends += unary.pending - 1
        unary.write_ones(ends, int(q[-1]))
    return concat_bits([*((planes[j], n) for j in range(w)), ext_bits.packed(), unary.packed()])


_SCAN_BITS = 1 << 20  # bits per step of stream_bits: temporaries of a few MiB at most
_SMALL_STREAM_BITS = 1 << 12  # streams at most this long are read as one Python int


def _small_stream_bits(buf: np.ndarray, start: int, n: int, m: int, numel: int, end: int,
                       ) -> int | None:
    """:func:`stream_bits` of a short stream, as one Python int: a few int operations a
    plane and one a code, where numpy would spend microseconds a call on tiny arrays."""
    b, u, w = _code_shape(m)
    stop = min(end, start + (w + 2) * n + max(numel - n, 0) // m)
    x = int.from_bytes(buf[start >> 3 : (stop + 7) >> 3].tobytes(), "little") >> (start & 7)
    x &= (1 << (stop - start)) - 1
    mask = (1 << n) - 1
    at = w * n
    if b and u:  # count v_k >= u on the planes, most significant first (as _count_long)
        greater, equal = 0, mask
        for j in reversed(range(w)):
            plane = (x >> (j * n)) & mask
            if (u >> j) & 1:
                equal &= plane
            else:
                greater |= equal & plane
                equal &= ~plane
        at += ((greater | equal) & mask).bit_count()
    elif b:
        at += n
    limit = min(stop - start, at + n + max(numel - n, 0) // m)
    y = (x >> at) & ((1 << max(limit - at, 0)) - 1)
    if y.bit_count() < n:
        return None
    for _ in range(n - 1):  # drop the lowest n - 1 one bits; the lowest left is the n-th
        y &= y - 1
    return at + (y & -y).bit_length()


def stream_bits(buf: np.ndarray, start: int, n: int, m: int, numel: int, end: int,
                ) -> int | None:
    """The length in bits of the golomb stream of ``n`` codes with parameter ``m`` that
    starts at bit ``start`` of the LSB-first ``buf``, found by reading it (spec 5.12): its
    ``w`` planes, one extension bit per long code (counted from the planes), and its unary
    part up to its ``n``-th one bit. None when that one bit is not within bit ``end`` nor
    within the ``n + (numel - n) // m`` bits a unary part can take (spec 6.2: positions
    below ``numel``). The unary part is read in steps of about a million bits, so that a
    hostile stream costs time in proportion to its length and no more memory than a step.

    >>> stream = np.frombuffer(_encode_stream(np.array([10, 21]), 23, 64), np.uint8)
    >>> stream_bits(stream, 0, 2, 23, 64, 16), stream_bits(stream, 0, 2, 23, 64, 9)
    (12, None)
    """
    if n == 0:
        return 0
    b, u, w = _code_shape(m)
    at = start + w * n
    if at > end:
        return None
    if n <= 128 and (w + 2) * n + max(numel - n, 0) // m <= _SMALL_STREAM_BITS:
        return _small_stream_bits(buf, start, n, m, numel, end)
    if b and u:  # a code is long when its planes' value is at least u (spec 6.2)
        at += _count_long(buf, n, w, u, start)  # packed: n / 8 bytes a temporary
    elif b:  # M a power of two: every code is long
        at += n
    stop = min(end, at + n + max(numel - n, 0) // m)  # where the unary part must have ended
    need, pos = n, at
    while pos < stop:
        bits = bit_slice(buf, pos, min(_SCAN_BITS, stop - pos))
        found = int(np.count_nonzero(bits))
        if found >= need:
            return pos + int(np.flatnonzero(bits)[need - 1]) + 1 - start
        need -= found
        pos += bits.size
    return None


def _deposit_table() -> np.ndarray:
    """``T[mask << 8 | x]``: the low bits of ``x`` moved to the one bits of ``mask`` (PDEP).

    Bit i of the result is bit ``rank_i`` of x where mask has bit i, ``rank_i`` being the
    number of one bits of mask below i.
    """
    masks = np.arange(256, dtype=np.uint16)[:, None]
    xs = np.arange(256, dtype=np.uint16)[None, :]
    out = np.zeros((256, 256), dtype=np.uint16)
    for i in range(8):
        rank = popcount(masks & ((1 << i) - 1))
        out |= ((masks >> i) & (xs >> rank) & 1) << i
    return out.astype(np.uint8).reshape(-1)


_DEPOSIT = _deposit_table()  # 64 KiB
_POPCOUNT = popcount(np.arange(256, dtype=np.uint8)).astype(np.intp)


def _add_extensions(v: np.ndarray, buf: np.ndarray, ext_at: int, u: int) -> int:
    """Turn the plane values ``v`` (uint8, in place) into remainders; return the long count.

    A long code (``v >= u``) is ``2v + e - u`` with ``e`` its extension bit, the next unused
    one of the extension part (from bit ``ext_at``). The extension bits are spread over the
    long codes 8 codes at a time: per byte of the packed long-code mask, a 256 x 256 table
    deposits the next ``popcount(mask)`` extension bits at the mask's one bits (a PDEP).
    That is a few operations on one byte per 8 codes instead of building the index array
    of the long codes (1.4x faster at density 0.2). 2v + 1 < 2**b <= 256: nothing wraps.
    """
    k = v.size
    is_long = v >= u
    mask = np.packbits(is_long, bitorder="little")
    counts = _POPCOUNT.take(mask)
    offsets = np.cumsum(counts)
    n_long = int(offsets[-1])
    offsets -= counts  # the first extension bit of each byte's codes, relative to ext_at
    # 16-bit windows of the extension part, so 8 bits from any bit offset are one gather
    first = ext_at >> 3
    offsets += ext_at & 7
    nbytes = (((ext_at & 7) + n_long + 7) >> 3) + 1
    part = np.zeros(nbytes + 1, dtype=np.uint16)
    src = buf[first : first + nbytes]
    part[: src.size] = src
    windows = part[:-1] | (part[1:] << 8)
    bits = windows.take(offsets >> 3) >> (offsets & 7).astype(np.uint16)
    index = mask.astype(np.intp) << 8
    index |= bits & 0xFF
    ext = np.unpackbits(_DEPOSIT.take(index), count=k, bitorder="little")
    # short codes keep v; long codes become v + (v - u) + e (the uint8 wrap of v - u on short
    # codes is multiplied by 0)
    t = v - np.uint8(u)
    t *= is_long.view(np.uint8)
    v += t
    v += ext
    return n_long


def _wrap(value: int) -> int:
    """``value`` modulo 2**64 as a signed int64 (what numpy's wrap-around arithmetic gives)."""
    return (value + 2**63) % 2**64 - 2**63


def _count_long(buf: np.ndarray, n: int, w: int, u: int, start: int = 0) -> int:
    """Return how many of the ``n`` plane values are ``>= u`` (long codes), bit-sliced; the
    planes start at bit ``start`` of ``buf``.

    Compares all values at once on the packed planes, most significant plane first, so the
    count costs a few byte-wise operations per plane instead of unpacking every code.
    """
    nbytes = (n + 7) >> 3
    greater = np.zeros(nbytes, dtype=np.uint8)
    equal = np.full(nbytes, 0xFF, dtype=np.uint8)
    for j in reversed(range(w)):
        plane = packed_slice(buf, start + j * n, n)
        if (u >> j) & 1:
            equal &= plane
        else:
            greater |= equal & plane
            equal &= ~plane
    at_least = greater | equal
    if n & 7:
        at_least[-1] &= (1 << (n & 7)) - 1
    return popcount_total(at_least)


def _sum_remainders(buf: np.ndarray, n: int, m: int, n_long: int) -> int:
    """Return the sum of all remainders, simply (only used to word an error)."""
    b, u, w = _code_shape(m)
    if not b:
        return 0
    v = np.zeros(n, dtype=np.int64)
    for j in range(w):
        v |= bit_slice(buf, j * n, n).astype(np.int64) << j
    ext = int(np.count_nonzero(bit_slice(buf, w * n, n_long)))
    long_v = int(v[v >= u].sum()) if u else int(v.sum())
    return int(v.sum()) + long_v - u * n_long + ext


class GolombCodec(PositionsCodec):
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

    def encoded_size(self, value: np.ndarray, ctx: BlockContext) -> tuple[int, int]:
        """Return ``(M, payload size)`` without building the stream."""
        indices = np.asarray(value, dtype=np.int64)
        if not indices.size:
            return 1, 0
        m = _choose(_sample_gaps(indices), indices.size, ctx.numel)
        _b, u, w = _code_shape(m)
        n = indices.size
        if m == 1:
            return m, (int(indices[-1]) + 1 + 7) // 8  # sum(gaps) + n = last + 1
        sum_q = n_long = 0
        prev = -1
        for k0 in range(0, n, _ENCODE_CHUNK):  # chunked: the gaps never exist all at once
            x = indices[k0 : k0 + _ENCODE_CHUNK]
            g = np.empty_like(x)
            g[0] = x[0] - prev - 1
            np.subtract(x[1:], x[:-1], out=g[1:])
            g[1:] -= 1
            prev = int(x[-1])
            q = g // m
            sum_q += int(q.sum())
            if u:
                n_long += int(np.count_nonzero(g - q * m >= u))
        if not u:
            n_long = n
        return m, (w * n + n_long + sum_q + n + 7) // 8

    def encode(self, value: np.ndarray, ctx: BlockContext) -> tuple[int, bytes]:
        indices = np.ascontiguousarray(value, dtype=np.int64)
        n = indices.size
        if n == 0:
            return 1, b""  # spec 6.2.2: an empty block has M = 1
        m = _choose(_sample_gaps(indices), n, ctx.numel)
        return m, _encode_stream(indices, m, ctx.numel)

    def positions(self, payload: memoryview, param: int, ctx: BlockContext,
                  ) -> Iterator[tuple[int, np.ndarray]]:
        """Validate the block, then return an iterator of ``(k0, positions)`` chunks.

        Every check that can be made before decoding (spec 6.2: M, sizes, the count of unary
        codes, where the stream ends) is made here; the last (positions below numel) is made
        on each chunk before it is handed out, with exact integer arithmetic.
        """
        n, numel, m = ctx.nnz, ctx.numel, param
        if not 1 <= m <= max(1, numel):  # spec 6.2.2
            raise ctx.error(f"golomb block: parameter M = {m} outside [1, {max(1, numel)}]")
        if n == 0:
            if len(payload) or m != 1:
                raise ctx.error(f"golomb block: nnz is 0 but M = {m} and {len(payload)} bytes")
            return iter(())
        b, u, w = _code_shape(m)
        size = len(payload)
        total = 8 * size
        if (w + 1) * n > total:
            raise ctx.error(f"golomb block: {size} bytes cannot hold {n} codes with M = {m}")
        buf = np.frombuffer(payload, dtype=np.uint8)
        n_long = 0 if not b else n if not u else _count_long(buf, n, w, u)
        start = w * n + n_long
        if start + n > total:
            raise ctx.error(f"golomb block: {size} bytes too short for the codes")
        ones = count_ones(buf, start)
        if ones != n:  # spec 6.2.1: exactly nnz unary codes
            raise ctx.error(f"golomb block: {ones} unary codes, nnz is {n}")
        if not int(buf[-1]) >> max(0, start - 8 * (size - 1)):
            # spec 6.2.1: the stream ends in the last byte; find where it does end
            tail = np.flatnonzero(bit_slice(buf, start, total - start))
            used = start + int(tail[-1]) + 1
            raise ctx.error(f"golomb block: stream ends at byte {(used + 7) // 8}, block has "
                            f"{size}")
        return self._chunks(buf, m, n, numel, n_long, ctx)

    def _chunks(self, buf: np.ndarray, m: int, n: int, numel: int, n_long: int,
                ctx: BlockContext) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(k0, positions)``, one chunk of the unary part at a time.

        With ``t_i`` the offset of code i's one bit in the unary part and ``R_i`` the sum of
        the remainders up to i, position ``i`` is ``M * t_i + R_i - (M - 1) * i``: one cumsum
        and two multiply-adds per chunk. Chunks are small enough that every term fits in
        int64 (``8 * chunk_bytes * M < 2**59``); the last position of each chunk is checked
        below numel in Python integers before the chunk is used, so intermediate wrap-around
        (modular, hence harmless for in-range results) can never reach the caller.
        """
        b, u, w = _code_shape(m)
        size = buf.size
        start = w * n + n_long
        chunk = max(1, min(_DECODE_CHUNK, (1 << 56) // m))
        r_dtype = np.uint8 if b <= 8 else np.uint16 if b <= 16 else np.uint32 if b <= 32 \
            else np.uint64
        k0 = n_seen_long = r_base = 0
        a = start >> 3
        while a < size:
            stop = min(size, a + chunk)
            bits = np.unpackbits(buf[a:stop], bitorder="little").view(bool)
            if a == start >> 3:
                bits[: start & 7] = False  # the bits before start are extension or plane bits
            pos = np.flatnonzero(bits)
            k = pos.size
            if not k:
                a = stop
                continue
            offset = _wrap(m * (8 * a - start) + r_base + (m - 1) * (1 - k0))
            if b:
                # remainders in the narrowest dtype that holds b bits: fancy indexing on one
                # byte per code is several times cheaper than on int64
                if not w:
                    v = np.zeros(k, dtype=r_dtype)
                else:  # plane 0 unpacked is a fresh array: one byte per code, ours to modify
                    v = bit_slice(buf, k0, k).view(np.uint8)
                    if r_dtype is not np.uint8:
                        v = v.astype(r_dtype)
                    for j in range(1, w):
                        v |= np.left_shift(bit_slice(buf, j * n + k0, k).view(np.uint8), j,
                                           dtype=r_dtype)
                ext_at = w * n + n_seen_long
                if u and r_dtype is np.uint8:  # the common case (M <= 256): no index arrays
                    n_seen_long += _add_extensions(v, buf, ext_at, u)
                elif u:  # long codes (v >= u) are 2v + e - u; 2v + 1 < 2**b, so nothing wraps
                    long_at = np.flatnonzero(v >= u)
                    t = v[long_at]
                    t += t
                    t += bit_slice(buf, ext_at, long_at.size).view(np.uint8)
                    t -= u
                    v[long_at] = t
                    n_seen_long += long_at.size
                else:  # M a power of two: every code is long, r = 2v + e
                    v <<= 1
                    v |= bit_slice(buf, ext_at, k).view(np.uint8)
                    n_seen_long += k
                r = v.astype(np.int64)
                r -= m - 1
                r[:1] += offset  # the cumsum carries the chunk's offset: one pass less
                np.cumsum(r, out=r)
                r_chunk = _wrap(int(r[-1]) - offset) + (m - 1) * k  # exact: |sum| < 2**59
            else:
                r_chunk = 0
            # exact last position of the chunk, in Python integers
            last = (m * (8 * a + int(pos[-1]) - start - (k0 + k - 1)) + r_base + r_chunk
                    + k0 + k - 1)
            if last >= numel:  # spec 6.2.1: positions below numel
                span = (m * (8 * size - start - 1 - (n - 1) - self._trailing_zeros(buf))
                        + _sum_remainders(buf, n, m, n_long) + n)
                raise ctx.error(f"golomb block: positions run to {span - 1}, numel is {numel}")
            if m != 1:
                pos *= m
            pos += r if b else offset
            yield k0, pos
            r_base += r_chunk
            k0 += k
            a = stop

    @staticmethod
    def _trailing_zeros(buf: np.ndarray) -> int:
        """Zero bits after the last one bit (the padding of the last byte)."""
        return 8 - int(buf[-1]).bit_length()

    def max_decoded_size(self, param: int, ctx: BlockContext) -> int:
        _, _, w = _code_shape(max(1, param))
        return ((w + 2) * ctx.nnz + ctx.numel // max(1, param) + 7) // 8
