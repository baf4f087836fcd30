"""compeft_format: a compact file format for ComPEFT sparse ternary task vectors."""

from .errors import *  # noqa: F403
from .tensor import TernaryTensor

__version__ = "0.1.0"
