"""Block codecs (spec 6) and the zstd stage (spec 7), one module each.

:func:`get_codec` finds the codec of a ``Block_Type`` byte stored in a file (the table of
spec 5.5: fixed by the format, no registration hook).
"""

from .base import BlockCodec, BlockContext, PositionsCodec
from .bitmask import BitmaskCodec
from .dense import DenseCodec
from .golomb import GolombCodec
from .registry import get_codec, registered_codecs
from .scale import ScaleCodec
from .signs import SignsCodec
from .zstd_stage import NAMES_ZSTD, ZSTD, ZstdStage

__all__ = [
    "NAMES_ZSTD",
    "ZSTD",
    "BitmaskCodec",
    "BlockCodec",
    "BlockContext",
    "DenseCodec",
    "GolombCodec",
    "PositionsCodec",
    "ScaleCodec",
    "SignsCodec",
    "ZstdStage",
    "get_codec",
    "registered_codecs",
]
