"""The zstd stage (spec 7): an optional zstd frame around any block's payload.

Thread safety: a python-zstandard compressor or decompressor context must not be used by two
threads at once (two ``dumps`` on two threads crashed the interpreter). A :class:`ZstdStage`
therefore keeps one set of contexts per thread (``threading.local``): creating a context per
call costs ~10 us, a dict look-up of the thread's own ~0.1 us, and each thread reuses its
warm context. A forked child keeps the contexts of the thread that forked, which no other
thread can be using in the child.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import zstandard

from .._spec import NAME_DICTIONARY, STAGE_ZSTD, ZSTD_MAGIC
from .base import BlockContext

__all__ = ["ZstdStage"]

_BLOCK_RLE, _BLOCK_RESERVED = 1, 3  # RFC 8878 3.1.1.2 Block_Type


def _is_skippable(frame: bytes | memoryview) -> bool:
    """Return True for a skippable frame (RFC 8878 3.1.2: magic 0x184D2A50 to 0x184D2A5F)."""
    return len(frame) >= 4 and bytes(frame[1:4]) == b"\x2a\x4d\x18" and frame[0] & 0xF0 == 0x50


def frame_end(frame: bytes | memoryview) -> int | None:
    """Return the size of the zstd frame that starts ``frame``, from its block headers.

    RFC 8878 3.1.1: a frame header, blocks (3-byte header: Last_Block, Block_Type,
    Block_Size; an RLE block stores one byte), then a 4-byte checksum if the header says so.
    Returns None where the walk cannot tell (a header libzstd rejects, a reserved block type):
    the decoder then reports what is wrong. The result may exceed ``len(frame)``: the frame
    is cut short.

    >>> frame = zstandard.ZstdCompressor().compress(b"abc" * 100)
    >>> frame_end(frame) == len(frame), frame_end(frame + b"x") == len(frame)
    (True, True)
    """
    try:
        pos = zstandard.frame_header_size(frame)
        checksum = zstandard.get_frame_parameters(frame).has_checksum
    except zstandard.ZstdError:
        return None
    n = len(frame)
    while pos + 3 <= n:
        head = frame[pos] | frame[pos + 1] << 8 | frame[pos + 2] << 16
        btype = head >> 1 & 3
        if btype == _BLOCK_RESERVED:
            return None
        pos += 3 + (1 if btype == _BLOCK_RLE else head >> 3)
        if head & 1:  # Last_Block
            return pos + 4 * checksum
    return n + 1  # the last block's header is missing


class ZstdStage:
    """Compress a payload into one zstd frame that declares its content size.

    Safe to use from several threads at once (each thread gets its own zstd contexts).
    With ``dictionary`` (raw content, as the metadata and name dictionaries of spec 7.3 and
    7.4), frames are made and read with it, and a frame that names a dictionary ID is refused
    (the dictionary is implied, spec 5.2, 7.4); ``what`` names such a frame in that message.

    >>> s = ZstdStage()
    >>> frame = s.encode(b"\\x00" * 1000, level=3)
    >>> len(frame) < 1000, s.decode(frame, 1000, None) == b"\\x00" * 1000
    (True, True)
    """

    stage_id = STAGE_ZSTD
    name = "zstd"

    def __init__(self, dictionary: bytes | None = None, what: str = "frame") -> None:
        self._local = threading.local()
        self._what = what
        self._dict = None if dictionary is None else zstandard.ZstdCompressionDict(
            dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        self._kw = {} if self._dict is None else {"dict_data": self._dict}

    def _compressor(self, level: int) -> zstandard.ZstdCompressor:
        """This thread's compressor for ``level`` (zstd contexts are not thread-safe)."""
        try:
            return self._local.compressors[level]
        except AttributeError:
            self._local.compressors = {}
        except KeyError:
            pass
        cctx = self._local.compressors[level] = zstandard.ZstdCompressor(
            level=level, write_content_size=True, write_checksum=False, write_dict_id=False,
            **self._kw)
        return cctx

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        """This thread's decompressor."""
        try:
            return self._local.decompressor
        except AttributeError:
            dctx = self._local.decompressor = zstandard.ZstdDecompressor(**self._kw)
            return dctx

    def encode(self, data: bytes, level: int, bare: bool = False) -> bytes:
        """Return one zstd frame holding ``data`` (content size and no checksum, spec 7.1);
        ``bare``: without its 4-byte magic number (a bare frame, spec 7.1, 1.6).

        >>> frame = ZSTD.encode(b"ab" * 100, 3)
        >>> ZSTD.encode(b"ab" * 100, 3, bare=True) == frame[4:]
        True
        """
        frame = self._compressor(level).compress(data)
        return frame[len(ZSTD_MAGIC):] if bare else frame

    def encode_later(self, data: bytes, level: int) -> Callable[[], bytes]:
        """Start :meth:`encode` of ``data`` on a new thread; return a function that waits.

        zstd releases the GIL, so a caller that goes on encoding meanwhile uses a second
        core. The thread lives only as long as this one frame (no long-lived worker: a
        ``fork()`` in another thread never copies a worker holding a lock), and it gets its
        own context. An exception in the thread is raised by the returned function.

        >>> wait = ZstdStage().encode_later(b"ab" * 1000, 3)
        >>> len(wait()) < 2000
        True
        """
        result: list = []

        def run() -> None:
            try:
                result.append(self.encode(data, level))
            except BaseException as exc:  # handed to the waiting caller
                result.append(exc)

        thread = threading.Thread(target=run, name="compeft-zstd", daemon=True)
        thread.start()

        def wait() -> bytes:
            thread.join()
            if isinstance(result[0], BaseException):
                raise result[0]
            return result[0]

        return wait

    def declared_size(self, frame: bytes | memoryview, ctx: BlockContext | None,
                      bare: bool = False) -> int:
        """The ``Frame_Content_Size`` of ``frame``, read from its header alone: a 1.7 bare
        frame's decoded size where no field in front of it gives one (spec 7.1).

        The header's rules come first, as :meth:`decode` checks them: not a skippable frame,
        a valid header and no dictionary ID where the dictionary is implied (R-ZST-2); then a
        declared size (R-ZST-3).

        >>> ZSTD.declared_size(ZSTD.encode(b"ab" * 100, 3, bare=True), None, bare=True)
        200
        """
        if bare:
            frame = ZSTD_MAGIC + bytes(frame[:32])  # a frame header is at most 18 bytes
        declared = self._declared(frame, ctx)
        if declared < 0:
            raise self._fail(ctx, "zstd stage: the frame declares no content size")
        return declared

    def _declared(self, frame: bytes | memoryview, ctx: BlockContext | None) -> int:
        """The frame header's rules (R-ZST-2: not a skippable frame, a valid header, no
        dictionary ID where the dictionary is implied), then its content size (-1: none)."""
        if _is_skippable(frame):  # frame_content_size() would call it a frame of 0 bytes
            raise self._fail(ctx, "zstd stage: a skippable frame is not a zstd frame")
        try:
            declared = zstandard.frame_content_size(frame)
            dict_id = zstandard.get_frame_parameters(frame).dict_id
        except zstandard.ZstdError as exc:
            raise self._fail(ctx, f"zstd stage: bad frame header ({exc})") from None
        if self._dict is not None and dict_id:  # spec 5.2, 7.4: the dictionary is implied
            raise self._fail(ctx, f"zstd stage: the {self._what} declares dictionary {dict_id}")
        return declared

    @staticmethod
    def _fail(ctx: BlockContext | None, msg: str) -> Exception:
        return ctx.error(msg) if ctx is not None else ValueError(msg)

    def decode(self, frame: bytes | memoryview, decoded_size: int, ctx: BlockContext | None,
               bare: bool = False):
        """Return the content of ``frame``, which MUST declare exactly ``decoded_size`` bytes.

        ``bare``: the frame is stored without its magic number, which is put back before it
        is read (spec 7.1, 1.6), so every rule applies to the frame as to any other.

        >>> ZSTD.decode(ZSTD.encode(b"ab" * 100, 3, bare=True), 200, None, bare=True)[:4]
        b'abab'
        """
        def fail(msg: str) -> Exception:
            return self._fail(ctx, msg)

        if bare:  # a small frame (a table, the metadata): the copy costs nothing to speak of
            frame = ZSTD_MAGIC + bytes(frame)
        declared = self._declared(frame, ctx)
        if declared != decoded_size:  # spec 7.1: checked before anything is allocated
            raise fail(f"zstd stage: frame declares {declared} bytes, block declares "
                       f"{decoded_size}")
        try:
            if decoded_size == 0:  # decompress() answers b"" without reading the blocks
                self._check_one_frame(frame, fail)
                dobj = self._decompressor().decompressobj()
                out = dobj.decompress(frame)
                if not (dobj.eof and not dobj.unused_data):  # pragma: no cover - checked above
                    raise fail("zstd stage: not exactly one complete frame")
            else:
                out = self._decompressor().decompress(frame, max_output_size=decoded_size,
                                                      allow_extra_data=False)
        except zstandard.ZstdError as exc:
            self._check_one_frame(frame, fail)  # R-ZST-4, in the spec's words
            raise fail(f"zstd stage: {exc}") from None  # R-ZST-5: the library says what
        if len(out) != decoded_size:
            raise fail(f"zstd stage: {len(out)} bytes decoded, {decoded_size} declared")
        return out

    @staticmethod
    def _check_one_frame(frame: bytes | memoryview, fail: Callable[[str], Exception]) -> None:
        """Spec 7.1 (R-ZST-4): the stored bytes are one complete frame and nothing after it.

        Found from the block headers (:func:`frame_end`), not from the library's error text,
        so the messages are the spec's whatever python-zstandard's wording. Called where
        decoding failed (the fast path pays nothing) and for empty frames, which
        python-zstandard decodes without reading past the header.
        """
        end = frame_end(frame)
        if end is not None and end > len(frame):
            raise fail("zstd stage: decompression error: did not decompress full frame")
        if end is not None and end < len(frame):
            raise fail(f"zstd stage: compressed input contains {len(frame) - end} bytes of "
                       "unused data, which is disallowed")


ZSTD = ZstdStage()
#: compact pack tables (spec 5.10, 7.4): zstd with the name dictionary
NAMES_ZSTD = ZstdStage(NAME_DICTIONARY, "pack table frame")
