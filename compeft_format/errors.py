"""The exception hierarchy of ``compeft_format``.

Every error the package raises about *data* (a file, a tensor, an option value) derives from
:class:`CompeftError`. Messages are built in one place, :meth:`CompeftError.__init__`, from
structured fields, and read *where -> what -> numbers*::

    tensor 'layers.0.q': byte 812: golomb block: 3 positions decoded, nnz is 4

API misuse (a wrong argument type, a closed reader) raises plain ``TypeError``/``ValueError``.

Examples
--------
>>> from compeft_format import loads, FormatError
>>> try:
...     loads(b"not a compeft file at all")
... except FormatError as exc:
...     print(type(exc).__name__, exc.offset)
BadMagicError 0
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = [
    "BadMagicError",
    "ChecksumError",
    "CompeftError",
    "ConvertError",
    "CorruptDataError",
    "EncodeError",
    "FormatError",
    "LimitExceededError",
    "MergeError",
    "MissingDependencyError",
    "TruncatedError",
    "UnsupportedError",
    "UnsupportedFeatureError",
    "UnsupportedVersionError",
    "naming",
    "with_path",
]


class CompeftError(Exception):
    """Base class of every error this package raises about compeft data or options.

    Parameters
    ----------
    message:
        What rule was broken, with the numbers involved.
    tensor:
        The tensor the error belongs to, if any.
    offset:
        The absolute byte offset in the file where the error was found, if any.

    Examples
    --------
    >>> import numpy as np
    >>> from compeft_format import compress
    >>> try:
    ...     compress({"w": np.array([np.nan, 1.0])}, density=0.5)
    ... except CompeftError as exc:
    ...     print(type(exc).__name__, exc.tensor, "|", exc.message)
    EncodeError w | value nan at flat index 0 is not finite; a task vector must be finite
    """

    def __init__(self, message: str, *, tensor: str | None = None, offset: int | None = None):
        self.message = message
        self.tensor = tensor
        self.offset = offset
        where = ""
        if tensor is not None:
            where += f"tensor {tensor!r}: "
        if offset is not None:
            where += f"byte {offset}: "
        super().__init__(where + message)

    def __reduce__(self):  # keep the keyword fields when pickled (multiprocessing)
        text = self.args[0] if len(self.args) == 1 else None
        return (_rebuild, (type(self), self.message, self.tensor, self.offset, text))


def _rebuild(cls, message, tensor, offset, text=None):
    exc = cls(message, tensor=tensor, offset=offset)
    if text is not None:  # a text built otherwise (with_path) comes back as it was
        exc.args = (text,)
    return exc


class FormatError(CompeftError, ValueError):
    """The bytes are not a valid compeft file (spec section 9 lists every rule).

    >>> from compeft_format import loads
    >>> try:
    ...     loads(b"")
    ... except FormatError as exc:  # the base of every rule's error
    ...     print(type(exc).__name__, "|", exc)
    TruncatedError | byte 0: file header: need 16 bytes, 0 available
    """


class BadMagicError(FormatError):
    """The file does not start with the compeft magic (or the trailer magic is wrong).

    >>> from compeft_format import loads
    >>> loads(b"PK\\x03\\x04 a zip archive")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    compeft_format.errors.BadMagicError: byte 0: not a compeft file (magic b'PK\\x03\\x04 a z', ...)
    """


class TruncatedError(FormatError):
    """The file ends before a structure it declares.

    >>> from compeft_format import TernaryTensor, dumps, loads
    >>> good = dumps({"w": TernaryTensor((1000,), [5, 600], [0, 1], 0.1)})
    >>> loads(good[:-20])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    compeft_format.errors.TruncatedError: ...
    """


class ChecksumError(FormatError):
    """A stored CRC-32 does not match the bytes it covers.

    >>> from compeft_format import TernaryTensor, dumps, loads
    >>> good = dumps({"w": TernaryTensor((1000,), [5, 600], [0, 1], 0.1)})
    >>> loads(good[:60] + bytes([good[60] ^ 1]) + good[61:])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    compeft_format.errors.ChecksumError: tensor 'w': byte 56: data checksum mismatch: ...
    """


class CorruptDataError(FormatError):
    """A structure is complete and its checksum matches, but its content breaks a rule.

    >>> import os, tempfile, numpy as np
    >>> from compeft_format import decompress_file, save_file
    >>> d = tempfile.mkdtemp()
    >>> p = os.path.join(d, "x.compeft")
    >>> save_file({"w": np.ones(2, np.float32)}, p, metadata={"task_vector": {"reference": "two"}})
    >>> decompress_file(p, os.path.join(d, "x.safetensors"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    compeft_format.errors.CorruptDataError: ...: metadata 'task_vector': reference must be ... 'two'
    """


class LimitExceededError(FormatError):
    """A declared size or count is above a reader limit (spec section 9.2).

    >>> from compeft_format import TernaryTensor, dumps, loads
    >>> good = dumps({"w": TernaryTensor((1000,), [5, 600], [0, 1], 0.1)})
    >>> from compeft_format import ReadLimits
    >>> loads(good, limits=ReadLimits(max_tensors=0))
    Traceback (most recent call last):
    compeft_format.errors.LimitExceededError: byte 24: more than 0 records
    """


class UnsupportedError(CompeftError):
    """Valid under some version of the spec, but not readable by this implementation: a newer
    major version (:class:`UnsupportedVersionError`) or a required part a later minor version
    added (:class:`UnsupportedFeatureError`). Not a :class:`FormatError`: the file may be fine.

    >>> issubclass(UnsupportedVersionError, UnsupportedError)
    True
    >>> issubclass(UnsupportedError, FormatError)
    False
    """


class UnsupportedVersionError(UnsupportedError):
    """The file's major version is newer than this reader supports.

    >>> from compeft_format import TernaryTensor, dumps, loads
    >>> good = dumps({"w": TernaryTensor((1000,), [5, 600], [0, 1], 0.1)})
    >>> loads(good[:8] + bytes([2, 0]) + good[10:])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    compeft_format.errors.UnsupportedVersionError: byte 8: format version 2.0 is not supported; ...
    """


class UnsupportedFeatureError(UnsupportedError):
    """A required part (record kind, block type, stage) that this reader does not know.

    A later minor version may add such parts (spec 10.2); the vectors of
    ``spec/vectors/invalid`` whose error is this one (an unknown record kind, an unknown
    stage) show each case.

    >>> issubclass(UnsupportedFeatureError, UnsupportedError)
    True
    """


class EncodeError(CompeftError, ValueError):
    """The input cannot be represented: not ternary, not finite, bad option value.

    >>> from compeft_format import TernaryTensor
    >>> TernaryTensor((4,), [5], [0], 0.1)
    Traceback (most recent call last):
    compeft_format.errors.EncodeError: indices must lie in [0, 4)
    """


class ConvertError(CompeftError, ValueError):
    """An input or output of a conversion cannot be used.

    A directory that is not a PEFT adapter, a base that does not match the one the task
    vector was measured from, an output that exists, a file that needs ``base``...

    >>> import os, tempfile
    >>> from compeft_format import compress_file
    >>> d = tempfile.mkdtemp()
    >>> compress_file(d, os.path.join(d, "out"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    compeft_format.errors.ConvertError: ...: not a PEFT adapter directory: ...
    """


class MergeError(CompeftError, ValueError):
    """Inputs that do not fit together (names, shapes, dtypes, references), or a bad option.

    >>> from compeft_format import merge_files
    >>> merge_files(["expert.compeft"], "merged.safetensors")
    Traceback (most recent call last):
    compeft_format.errors.MergeError: merge needs two or more inputs, got 1
    """


class MissingDependencyError(CompeftError, ImportError):
    """An optional dependency (torch, peft) that the function called needs is not installed.

    >>> issubclass(MissingDependencyError, ImportError)
    True
    """


def with_path(exc: CompeftError, path: str | os.PathLike) -> CompeftError:
    """Return ``exc`` as the same error type whose message starts with the file name.

    The message reads ``FILE: tensor 'x': byte 12: what``; ``tensor`` and ``offset`` keep
    their values.
    """
    new = type(exc)(f"{os.fspath(path)}: {exc}")
    new.tensor, new.offset = exc.tensor, exc.offset
    return new


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Name the file in a CompeftError raised inside (:func:`with_path`)."""
    try:
        yield
    except CompeftError as exc:
        raise with_path(exc, path) from None
