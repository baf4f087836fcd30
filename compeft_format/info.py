"""What :func:`~compeft_format.container.inspect` reports: files, records and blocks, as data.

These classes know no offsets of their own: the container fills them from the headers it parses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from . import _spec as S

__all__ = ["BlockInfo", "FileInfo", "TensorInfo"]


@dataclass(frozen=True)
class BlockInfo:
    """One block of a record, as described by its Block_Descriptor (spec 5.5).

    >>> from compeft_format import TernaryTensor, dumps, inspect
    >>> data = dumps({"w": TernaryTensor((1000,), [5, 600], [0, 1], 0.1)})
    >>> [(b.codec, b.stage, b.stored_size) for b in inspect(data).tensors[0].blocks]
    [('golomb', 'none', 3), ('signs', 'none', 1), ('scale', 'table', 4)]
    """

    codec: str  #: "bitmask", "golomb", "signs", "scale", "dense" (or "0x.." when unknown)
    block_type: int
    #: "none" or "zstd"; "table" for a compact pack member's scale (spec 5.10), which is kept
    #: in the pack's member table: its offset is then where the stored table starts (the
    #: table may be compressed, so the scale's 4 bytes need not lie there)
    stage: str
    param: int
    stored_size: int
    decoded_size: int
    offset: int  #: absolute offset of the stored bytes
    #: a bit pack member's stream (spec 5.11): its length in bits (``stored_size`` is the
    #: bytes its payload takes once moved to a byte boundary) and its first bit within the
    #: byte at ``offset`` (0 to 7); None for a block of whole bytes
    bits: int | None = None
    first_bit: int | None = None


@dataclass(frozen=True)
class TensorInfo:
    """What a record header says about one tensor, without decoding its data.

    >>> from compeft_format import TernaryTensor, dumps, inspect
    >>> t = inspect(dumps({"w": TernaryTensor((1000,), [5, 600], [0, 1], 0.1)})).tensors[0]
    >>> t.name, t.kind, t.dtype, t.shape, t.nnz, t.density, t.codecs
    ('w', 'ternary', 'F32', (1000,), 2, 0.002, 'golomb,signs,scale')
    """

    name: str
    kind: str  #: "ternary" or "dense"
    dtype: str
    shape: tuple[int, ...]
    nnz: int | None
    blocks: tuple[BlockInfo, ...]
    offset: int  #: absolute offset of the record
    record_size: int  #: header plus data area, in bytes
    #: a twin pack member that stores no streams (format 1.7, spec 5.14): the member whose
    #: positions and signs it reads; None for any other tensor
    twin_of: str | None = None

    @property
    def numel(self) -> int:
        """Number of elements of the dense tensor."""
        return math.prod(self.shape)

    @property
    def density(self) -> float | None:
        """``nnz / numel`` for a ternary record."""
        if self.nnz is None:
            return None
        return self.nnz / self.numel if self.numel else 0.0

    @property
    def dense_size(self) -> int:
        """Bytes the tensor takes dense, in its dtype."""
        return self.numel * S.ITEMSIZE[self.dtype]

    @property
    def bits_per_element(self) -> float:
        """Record bytes (header, blocks and padding) times 8 over ``numel``."""
        return 8 * self.record_size / self.numel if self.numel else 0.0

    @property
    def codecs(self) -> str:
        """The blocks as ``codec[+zstd]`` joined by commas, e.g. ``"golomb,signs,scale"``."""
        return ",".join(b.codec + ("+zstd" if b.stage == "zstd" else "") for b in self.blocks)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict."""
        return {
            "name": self.name, "kind": self.kind, "dtype": self.dtype, "shape": list(self.shape),
            "numel": self.numel, "nnz": self.nnz, "density": self.density,
            "record_bytes": self.record_size, "dense_bytes": self.dense_size,
            "bits_per_element": self.bits_per_element, "codecs": self.codecs,
            "blocks": [b.__dict__ for b in self.blocks], "twin_of": self.twin_of,
        }


@dataclass(frozen=True)
class FileInfo:
    """The header, metadata and per-tensor layout of a file (see :func:`inspect`).

    >>> from compeft_format import TernaryTensor, dumps, inspect
    >>> data = dumps({"w": TernaryTensor((1000,), [5, 600], [0, 1], 0.1)})
    >>> info = inspect(data)
    >>> info.version, info.file_size == len(data), [t.name for t in info.tensors]
    ((1, 7), True, ['w'])
    >>> info.dense_size  # 1000 float32 values
    4000
    """

    version: tuple[int, int]
    alignment: int
    metadata: dict[str, Any]
    file_size: int
    tensors: tuple[TensorInfo, ...]

    @property
    def dense_size(self) -> int:
        """Bytes of all tensors stored dense in their dtypes."""
        return sum(t.dense_size for t in self.tensors)

    @property
    def numel(self) -> int:
        """Elements of all tensors."""
        return sum(t.numel for t in self.tensors)

    @property
    def ratio(self) -> float:
        """Dense size over file size."""
        return self.dense_size / self.file_size if self.file_size else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict."""
        return {
            "version": f"{self.version[0]}.{self.version[1]}", "alignment": self.alignment,
            "metadata": self.metadata, "file_bytes": self.file_size,
            "dense_bytes": self.dense_size, "numel": self.numel, "ratio": self.ratio,
            "bits_per_element": 8 * self.file_size / self.numel if self.numel else 0.0,
            "tensors": [t.to_dict() for t in self.tensors],
        }
