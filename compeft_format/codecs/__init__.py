"""Block codecs (spec 6) and the zstd stage (spec 7), one module each.

Importing this package registers every codec; :func:`get_codec` looks one up by the
``Block_Type`` byte stored in the file.
"""

from .base import (
    BlockCodec,
    BlockContext,
    PositionsCodec,
    get_codec,
    register_codec,
    registered_codecs,
)
from .bitmask import BitmaskCodec
from .dense import DenseCodec
from .golomb import GolombCodec
from .scale import ScaleCodec
from .signs import SignsCodec
from .zstd_stage import ZSTD, ZstdStage

__all__ = [
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
    "register_codec",
    "registered_codecs",
]
