"""The block codec interface (spec 6); :mod:`.registry` maps each ``Block_Type`` to a codec.

A codec turns one part of a tensor (its positions, its signs, its scale, its dense data)
into the bytes of one block and back. Codecs see only their own payload and a
:class:`BlockContext`; only :mod:`compeft_format.container` knows where blocks sit in a file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .._alloc import fresh_zeros, writing
from ..errors import CorruptDataError

__all__ = [
    "BlockCodec",
    "BlockContext",
    "PositionsCodec",
]


@dataclass(frozen=True)
class BlockContext:
    """What a codec may know about the record its block belongs to."""

    name: str | None  #: tensor name, for error messages (None: no tensor, or not known yet)
    numel: int
    nnz: int
    dtype: str
    shape: tuple[int, ...]
    offset: int | None = None  #: absolute file offset of the block payload, for error messages

    def error(self, message: str, cls: type[Exception] = CorruptDataError) -> Exception:
        """Return an error about this block that names the tensor and byte offset."""
        return cls(message, tensor=self.name, offset=self.offset)


class BlockCodec(ABC):
    """One block type of spec 6, found by its ``block_type`` (:func:`get_codec`).

    ``encode`` returns ``(param, payload)``; ``param`` is stored in the block descriptor.
    ``decode`` MUST validate everything it reads and raise a ``FormatError`` subclass,
    never ``IndexError`` or a numpy error.
    """

    block_type: ClassVar[int]  #: the byte stored in Block_Type (spec 5.5)
    name: ClassVar[str]  #: short name used by the API, the CLI and ``info``
    role: ClassVar[str]  #: "positions", "signs", "scale" or "dense"

    @abstractmethod
    def encode(self, value: Any, ctx: BlockContext) -> tuple[int, bytes]:
        """Return ``(param, payload)`` for ``value``."""

    @abstractmethod
    def decode(self, payload: memoryview, param: int, ctx: BlockContext) -> Any:
        """Return the value held by ``payload`` (validated against ``ctx``)."""

    def max_decoded_size(self, param: int, ctx: BlockContext) -> int:
        """Return the largest payload a valid block of this type can have (spec 7.2)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PositionsCodec(BlockCodec):
    """A codec of the nonzero positions: ``positions()`` yields them chunk by chunk.

    ``decode`` gathers the chunks into one int64 array; the dense decoders of the container
    consume the chunks directly, without that array.
    """

    role = "positions"

    @abstractmethod
    def positions(self, payload: memoryview, param: int, ctx: BlockContext
                  ) -> Iterator[tuple[int, np.ndarray]]:
        """Check the block, then yield ``(first nonzero number, positions)`` in order."""

    def decode(self, payload: memoryview, param: int, ctx: BlockContext) -> np.ndarray:
        chunks = self.positions(payload, param, ctx)  # checks the block first
        out, prefault = fresh_zeros(ctx.nnz, np.dtype(np.int64))
        with writing(prefault) as ready:
            for k0, pos in chunks:
                if ready is not None:
                    ready(k0 + pos.size - 1)
                out[k0 : k0 + pos.size] = pos
        return out
