"""compeft_format: a compact, checksummed file format for ComPEFT sparse ternary task vectors.

>>> import numpy as np, compeft_format as cf
>>> t = cf.TernaryTensor((2, 3), [0, 4], [False, True], 0.25)
>>> cf.loads(cf.dumps({"w": t}))["w"] == t
True
"""

from ._spec import VERSION_MAJOR, VERSION_MINOR, ReadLimits
from .container import (
    BlockInfo,
    CompeftReader,
    FileInfo,
    TensorInfo,
    Writer,
    dumps,
    inspect,
    iter_stream,
    load_file,
    loads,
    open_file,
    save_file,
)
from .errors import (
    BadMagicError,
    ChecksumError,
    CompeftError,
    CorruptDataError,
    EncodeError,
    FormatError,
    LimitExceededError,
    TruncatedError,
    UnsupportedError,
    UnsupportedFeatureError,
    UnsupportedVersionError,
)
from .tensor import TernaryTensor

__version__ = "0.1.0"
FORMAT_VERSION = f"{VERSION_MAJOR}.{VERSION_MINOR}"

__all__ = [
    "FORMAT_VERSION",
    "BadMagicError",
    "BlockInfo",
    "ChecksumError",
    "CompeftError",
    "CompeftReader",
    "CorruptDataError",
    "EncodeError",
    "FileInfo",
    "FormatError",
    "LimitExceededError",
    "ReadLimits",
    "TensorInfo",
    "TernaryTensor",
    "TruncatedError",
    "UnsupportedError",
    "UnsupportedFeatureError",
    "UnsupportedVersionError",
    "Writer",
    "__version__",
    "dumps",
    "inspect",
    "iter_stream",
    "load_file",
    "loads",
    "open_file",
    "save_file",
]
