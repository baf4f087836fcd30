"""The container of spec 4 to 8, as one public face: writing, reading, and inspecting files.

The work is split by responsibility: :mod:`.layout` knows where every byte sits (parsing
and building headers, records, packs, the index), :mod:`.writer` writes files and
:mod:`.reader` decodes them. This module gathers their public names, which the package
and its users import from here.

>>> data = dumps({"w": TernaryTensor((2, 2), [3], [False], 1.0)})
>>> inspect(data).tensors[0].codecs
'bitmask,signs,scale'
"""

from __future__ import annotations

from .encode import POSITIONS_CHOICES
from .fsio import atomic_write
from .info import BlockInfo, FileInfo, TensorInfo
from .metadata import decode_metadata, encode_metadata
from .reader import CompeftReader, inspect, iter_stream, load_file, loads, open_file
from .tensor import TernaryTensor
from .writer import Writer, dumps, file_alignment, save_file

__all__ = [
    "POSITIONS_CHOICES",
    "BlockInfo",
    "CompeftReader",
    "FileInfo",
    "TensorInfo",
    "TernaryTensor",
    "Writer",
    "atomic_write",
    "decode_metadata",
    "dumps",
    "encode_metadata",
    "file_alignment",
    "inspect",
    "iter_stream",
    "load_file",
    "loads",
    "open_file",
    "save_file",
]
