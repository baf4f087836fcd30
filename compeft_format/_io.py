"""Bounded byte sources and VarInts (spec 2.3): the only place that reads raw bytes.

A source never returns fewer bytes than asked for: it raises :class:`TruncatedError` with the
absolute offset, the count needed and the count available. Nothing here knows the layout of
a compeft file; :mod:`compeft_format.container` does.
"""

from __future__ import annotations

from typing import BinaryIO

from ._spec import VARINT_MAX_BYTES, VARINT_MAX_VALUE
from .errors import CorruptDataError, TruncatedError

_READ_CHUNK = 1 << 20  # a stream's declared sizes are trusted only as the bytes arrive


def encode_varint(value: int) -> bytes:
    """Return the minimal unsigned LEB128 encoding of ``value`` (spec 2.3).

    >>> encode_varint(300).hex()
    'ac02'
    """
    if not 0 <= value <= VARINT_MAX_VALUE:
        raise ValueError(f"varint value {value} outside [0, 2**63 - 1]")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class Source:
    """Sequential reads with an absolute position, for error messages and layout checks."""

    pos: int
    tensor: str | None = None  # named in errors while a record is being read
    capture: bytearray | None = None  # when set, every byte read is appended to it

    def read(self, n: int, what: str) -> memoryview:  # pragma: no cover - interface
        raise NotImplementedError

    def at_end(self) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def u8(self, what: str) -> int:
        """Read one unsigned byte."""
        return self.read(1, what)[0]

    def varint(self, what: str) -> int:
        """Read a minimal unsigned LEB128 VarInt below 2**63 (spec 2.3)."""
        start = self.pos
        value = 0
        for i in range(VARINT_MAX_BYTES):
            byte = self.read(1, what)[0]
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                if byte == 0 and i > 0:  # spec 2.3: the encoding is minimal
                    raise CorruptDataError(f"{what}: VarInt is not minimal", tensor=self.tensor,
                                           offset=start)
                if value > VARINT_MAX_VALUE:
                    raise CorruptDataError(f"{what}: VarInt {value} exceeds 2**63 - 1",
                                           tensor=self.tensor, offset=start)
                return value
        raise CorruptDataError(f"{what}: VarInt longer than {VARINT_MAX_BYTES} bytes",
                               tensor=self.tensor, offset=start)

    def truncated(self, what: str, need: int, have: int) -> TruncatedError:
        """Return the error for a read past the end."""
        return TruncatedError(f"{what}: need {need} bytes, {have} available", tensor=self.tensor,
                              offset=self.pos)


class BufferSource(Source):
    """Reads from a bytes-like object (zero copy); ``base`` is the offset of its first byte."""

    def __init__(self, data: bytes | bytearray | memoryview, base: int = 0) -> None:
        self.buf = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
        self.base = base
        self.pos = base

    @property
    def remaining(self) -> int:
        """Bytes left to read."""
        return len(self.buf) - (self.pos - self.base)

    def read(self, n: int, what: str) -> memoryview:
        i = self.pos - self.base
        if n > len(self.buf) - i:
            raise self.truncated(what, n, len(self.buf) - i)
        self.pos += n
        out = self.buf[i : i + n]
        if self.capture is not None:
            self.capture += out
        return out

    def at_end(self) -> bool:
        return self.remaining == 0


class StreamSource(Source):
    """Reads from a file object that may not seek (a pipe, a download in progress)."""

    def __init__(self, fileobj: BinaryIO) -> None:
        self.f = fileobj
        self.pos = 0

    def read(self, n: int, what: str) -> memoryview:
        # grow with the bytes actually present, never with the declared size; and only an
        # empty read is the end: a raw stream (an unbuffered pipe, a socket) returns short
        # reads long before it
        parts, got = [], 0
        while got < n:
            chunk = self.f.read(min(_READ_CHUNK, n - got))
            if not chunk:
                raise self.truncated(what, n, got)
            parts.append(chunk)
            got += len(chunk)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.pos += n
        if self.capture is not None:
            self.capture += data
        return memoryview(data)

    def at_end(self) -> bool:
        return self.f.read(1) == b""
