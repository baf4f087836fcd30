"""The fixed table of spec 5.5: ``Block_Type`` byte -> the codec of that block.

The table is fixed: a new block type is a change of the format (spec 5.5 and 6, the
container's rules of which blocks a record holds, vectors), not a plug-in, so there is no
registration hook.
"""

from __future__ import annotations

from ..errors import UnsupportedFeatureError
from .base import BlockCodec, BlockContext
from .bitmask import BitmaskCodec
from .dense import DenseCodec
from .golomb import GolombCodec
from .scale import ScaleCodec
from .signs import SignsCodec

__all__ = ["get_codec", "registered_codecs"]

_CODECS: dict[int, BlockCodec] = {
    c.block_type: c
    for c in (BitmaskCodec(), GolombCodec(), SignsCodec(), ScaleCodec(), DenseCodec())
}


def get_codec(block_type: int, ctx: BlockContext | None = None) -> BlockCodec:
    """Return the codec for ``block_type``; unknown types raise ``UnsupportedFeatureError``.

    >>> get_codec(0x02).name
    'golomb'
    """
    try:
        return _CODECS[block_type]
    except KeyError:
        msg = f"unknown block type 0x{block_type:02x}"
        if ctx is not None:
            raise ctx.error(msg, UnsupportedFeatureError) from None
        raise UnsupportedFeatureError(msg) from None


def registered_codecs() -> dict[int, BlockCodec]:
    """Return a copy of the table (block type -> codec instance).

    >>> sorted(c.name for c in registered_codecs().values())
    ['bitmask', 'dense', 'golomb', 'scale', 'signs']
    """
    return dict(_CODECS)
