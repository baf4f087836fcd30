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
    """The bytes are not a valid compeft file (spec section 9 lists every rule)."""


class BadMagicError(FormatError):
    """The file does not start with the compeft magic (or the trailer magic is wrong)."""


class TruncatedError(FormatError):
    """The file ends before a structure it declares."""


class ChecksumError(FormatError):
    """A stored CRC-32 does not match the bytes it covers."""


class CorruptDataError(FormatError):
    """A structure is complete and its checksum matches, but its content breaks a rule."""


class LimitExceededError(FormatError):
    """A declared size or count is above a reader limit (spec section 9.2)."""


class UnsupportedError(CompeftError):
    """Valid under some version of the spec, but not readable by this implementation."""


class UnsupportedVersionError(UnsupportedError):
    """The file's major version is newer than this reader supports."""


class UnsupportedFeatureError(UnsupportedError):
    """A required part (record kind, block type, stage) that this reader does not know."""


class EncodeError(CompeftError, ValueError):
    """The input cannot be represented: not ternary, not finite, bad option value."""


class ConvertError(CompeftError, ValueError):
    """An input or output of a conversion cannot be used.

    A directory that is not a PEFT adapter, a base that does not match the one the task
    vector was measured from, an output that exists, a file that needs ``base``...
    """


class MergeError(CompeftError, ValueError):
    """Inputs that do not fit together (names, shapes, dtypes, references), or a bad option."""


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
