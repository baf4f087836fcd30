"""Encoding blocks (spec 6, 7): the positions codec choice and the optional zstd stage.

The payloads are built here; :mod:`compeft_format.container` lays them out in records.
"""

from __future__ import annotations

from collections.abc import Callable

from . import _spec as S
from .codecs import ZSTD, BlockContext, ZstdStage
from .codecs.bitmask import BitmaskCodec
from .codecs.golomb import GolombCodec
from .errors import EncodeError
from .tensor import TernaryTensor

__all__ = ["BACKGROUND_MIN", "POSITIONS_CHOICES", "ZSTD_MIN", "Block", "encode_positions",
           "maybe_zstd", "zstd_later"]

POSITIONS_CHOICES = ("auto", "bitmask", "golomb")
_BITMASK, _GOLOMB = BitmaskCodec(), GolombCodec()


ZSTD_MIN = 64  # smaller payloads are stored raw: a zstd frame would rarely win, never by much


def maybe_zstd(payload: bytes, level: int | None, stage: ZstdStage = ZSTD, bare: bool = False,
               ) -> tuple[int, bytes]:
    """Return ``(stage, stored)``: zstd only where it makes the block smaller (spec 7);
    ``bare``: a frame without its magic number (spec 7.1, 1.6: a tight or twin pack's table)."""
    if level is None or len(payload) < ZSTD_MIN:
        return S.STAGE_NONE, payload
    frame = stage.encode(payload, level, bare)
    if len(frame) < len(payload):
        return S.STAGE_ZSTD, frame
    return S.STAGE_NONE, payload


# The zstd stage of a large block runs on a thread of its own while the writer's thread
# encodes the next block: zstd and most numpy loops release the GIL, so the two share the
# cores. The output is the same bytes (single-threaded zstd, same parameters); zstd's own
# multi-threaded mode would change them. The thread lives for one block only: no worker
# outlives a write, so a fork() never copies a thread that holds a lock.
BACKGROUND_MIN = 1 << 20  # smaller payloads are compressed inline: the hand-off costs more


def zstd_later(payload: bytes, level: int | None) -> Callable[[], tuple[int, bytes]]:
    """Start :func:`maybe_zstd` of ``payload``; return a function that waits for its result."""
    # below ZSTD_MIN too: maybe_zstd stores those raw, and the worker must write the same bytes
    if level is None or len(payload) < max(BACKGROUND_MIN, ZSTD_MIN):
        result = maybe_zstd(payload, level)
        return lambda: result
    wait = ZSTD.encode_later(payload, level)

    def finish() -> tuple[int, bytes]:
        frame = wait()
        return (S.STAGE_ZSTD, frame) if len(frame) < len(payload) else (S.STAGE_NONE, payload)

    return finish


Block = tuple[int, int, int, bytes, int]  # block type, stage, param, stored, decoded size
_HUGE_BITMASK = 1 << 26  # bitmask bytes from which auto first asks whether it can win
_ZSTD_BLOCK = 1 << 17  # RFC 8878 3.1.1.2.4: a block decodes to at most 128 KiB


def _bitmask_cannot_win(g_param: int, g_payload: bytes, ctx: BlockContext) -> bool:
    """Whether ``auto`` would keep golomb whatever zstd made of the bitmask (spec Appendix D).

    The golomb candidate is stored in at most ``len(g_payload)`` bytes and wins a tie when it
    is the smaller raw candidate. The bitmask candidate is stored raw (``ceil(N / 8)`` bytes)
    or as a zstd frame of at least 6 bytes of frame header and 4 bytes (a block header and
    one byte) per 128 KiB it decodes to.
    """
    b_size = _BITMASK.encoded_size(None, ctx)[1]
    frame_floor = 6 + 4 * -(-b_size // _ZSTD_BLOCK)
    return b_size > len(g_payload) and frame_floor >= len(g_payload)



def encode_positions(t: TernaryTensor, ctx: BlockContext, positions: str,
                      level: int | None) -> Callable[[], Block]:
    """Start encoding the positions block; return a function that finishes it.

    ``auto`` keeps the smallest raw candidate, or with zstd the smallest of both candidates
    each through zstd where that is smaller (the smaller raw one wins a tie). The bitmask is
    encoded first so that its zstd stage, the slow one, runs while the golomb stream is built.
    """
    if positions == "golomb" or t.nnz == 0:
        codecs = [_GOLOMB]  # spec 6.2.2: an empty tensor's positions are an empty golomb block
    elif positions == "bitmask":
        codecs = [_BITMASK]
    else:
        codecs = []
    jobs = []
    golomb = None  # (param, payload) once built
    if not codecs and _BITMASK.encoded_size(t.indices, ctx)[1] >= _HUGE_BITMASK:
        # a huge tensor: is the bitmask (numel / 8 bytes, terabytes for a shape of 2^48) worth
        # building? Not where it cannot win: same bytes, and it is never allocated
        golomb = _GOLOMB.encode(t.indices, ctx)
        if _bitmask_cannot_win(*golomb, ctx):
            codecs = [_GOLOMB]
    if codecs:
        if golomb is not None:
            param, payload = golomb
        else:
            try:
                param, payload = codecs[0].encode(t.indices, ctx)
            except MemoryError:  # positions="bitmask" of a shape like 2^48: 32 TiB
                raise EncodeError(
                    f"{codecs[0].name} positions of {t.numel} elements need "
                    f"{codecs[0].encoded_size(t.indices, ctx)[1]} bytes: more than the system "
                    "can allocate", tensor=ctx.name) from None
        jobs.append((codecs[0], param, payload, zstd_later(payload, level)))
    elif level is None:  # auto without zstd: only the smaller raw candidate is built
        g_param, g_payload = golomb or _GOLOMB.encode(t.indices, ctx)
        if _BITMASK.encoded_size(t.indices, ctx)[1] <= len(g_payload):
            b_param, b_payload = _BITMASK.encode(t.indices, ctx)
            jobs.append((_BITMASK, b_param, b_payload, zstd_later(b_payload, None)))
        else:
            jobs.append((_GOLOMB, g_param, g_payload, zstd_later(g_payload, None)))
    else:
        b_param, b_payload = _BITMASK.encode(t.indices, ctx)
        b_job = (_BITMASK, b_param, b_payload, zstd_later(b_payload, level))
        g_param, g_payload = golomb or _GOLOMB.encode(t.indices, ctx)
        # golomb streams are near-incompressible, zstd's fast path: inline
        g_stage = maybe_zstd(g_payload, level)
        g_job = (_GOLOMB, g_param, g_payload, lambda: g_stage)
        jobs = [b_job, g_job] if len(b_payload) <= len(g_payload) else [g_job, b_job]

    def finish() -> Block:
        best = None
        for codec, param, payload, wait in jobs:
            stage, stored = wait()
            if best is None or len(stored) < len(best[3]):
                best = (codec.block_type, stage, param, stored, len(payload))
        assert best is not None
        return best

    return finish

