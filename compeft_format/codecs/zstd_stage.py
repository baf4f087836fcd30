"""The zstd stage (spec 7): an optional zstd frame around any block's payload."""

from __future__ import annotations

import zstandard

from .._spec import STAGE_ZSTD
from .base import BlockContext

__all__ = ["ZstdStage"]



def _is_skippable(frame: bytes | memoryview) -> bool:
    """Return True for a skippable frame (RFC 8878 3.1.2: magic 0x184D2A50 to 0x184D2A5F)."""
    return len(frame) >= 4 and bytes(frame[1:4]) == b"\x2a\x4d\x18" and frame[0] & 0xF0 == 0x50


class ZstdStage:
    """Compress a payload into one zstd frame that declares its content size.

    >>> s = ZstdStage()
    >>> frame = s.encode(b"\\x00" * 1000, level=3)
    >>> len(frame) < 1000, s.decode(frame, 1000, None) == b"\\x00" * 1000
    (True, True)
    """

    stage_id = STAGE_ZSTD
    name = "zstd"

    def __init__(self) -> None:
        self._compressors: dict[int, zstandard.ZstdCompressor] = {}
        self._decompressor = zstandard.ZstdDecompressor()

    def encode(self, data: bytes, level: int) -> bytes:
        """Return one zstd frame holding ``data`` (content size and no checksum, spec 7.1)."""
        cctx = self._compressors.get(level)
        if cctx is None:
            cctx = zstandard.ZstdCompressor(level=level, write_content_size=True,
                                            write_checksum=False, write_dict_id=False)
            self._compressors[level] = cctx
        return cctx.compress(data)

    def decode(self, frame: bytes | memoryview, decoded_size: int, ctx: BlockContext | None):
        """Return the content of ``frame``, which MUST declare exactly ``decoded_size`` bytes."""
        def fail(msg: str) -> Exception:
            return ctx.error(msg) if ctx is not None else ValueError(msg)

        if _is_skippable(frame):  # frame_content_size() would call it a frame of 0 bytes
            raise fail("zstd stage: a skippable frame is not a zstd frame")
        try:
            declared = zstandard.frame_content_size(frame)
        except zstandard.ZstdError as exc:
            raise fail(f"zstd stage: bad frame header ({exc})") from None
        if declared != decoded_size:  # spec 7.1: checked before anything is allocated
            raise fail(f"zstd stage: frame declares {declared} bytes, block declares "
                       f"{decoded_size}")
        if decoded_size == 0:
            out = self._decode_empty(frame, fail)
        else:
            try:
                out = self._decompressor.decompress(frame, max_output_size=decoded_size,
                                                    allow_extra_data=False)
            except zstandard.ZstdError as exc:
                raise fail(f"zstd stage: {exc}") from None
        if len(out) != decoded_size:
            raise fail(f"zstd stage: {len(out)} bytes decoded, {decoded_size} declared")
        return out

    def _decode_empty(self, frame: bytes | memoryview, fail) -> bytes:
        """Check a frame that declares 0 bytes to its end (spec 7.1: one frame, nothing after).

        python-zstandard answers ``b""`` for such a frame without reading past its header;
        without this walk any bytes could hide in an empty block.
        """
        dobj = self._decompressor.decompressobj()
        try:
            out = dobj.decompress(frame)
        except zstandard.ZstdError as exc:
            raise fail(f"zstd stage: {exc}") from None
        if not dobj.eof:
            raise fail("zstd stage: decompression error: did not decompress full frame")
        if dobj.unused_data:
            raise fail(f"zstd stage: compressed input contains {len(dobj.unused_data)} bytes "
                       "of unused data, which is disallowed")
        return out


ZSTD = ZstdStage()
