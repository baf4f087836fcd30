"""Atomic outputs of the converters: a temporary beside the output, fsynced, then renamed.

An output is never left half-written, never replaces an input, and replaces an existing
output only when forced.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

from .errors import ConvertError
from .fsio import current_umask

__all__ = ["Output", "same_path", "write_fsync"]


def same_path(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name the same file (resolved, or the same inode).

    >>> same_path(Path("/tmp/x/../y"), Path("/tmp/y"))
    True
    """
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


class Output:
    """An output written atomically: a temporary file or directory beside it, then a rename.

    Refuses an output that is an input, and an existing one unless ``force``. On any error
    the temporary is removed, so nothing partial is ever left behind. Write into
    :meth:`file` inside ``with``; leaving the block without an error commits.

    >>> import os, tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> with Output(d / "out", is_dir=True, force=False, inputs=[]) as out:
    ...     write_fsync(out.file("a.bin"), lambda f: f.write(b"abc"))
    >>> sorted(os.listdir(d)), (d / "out" / "a.bin").read_bytes()
    (['out'], b'abc')
    """

    def __init__(self, dst: str | os.PathLike, *, is_dir: bool, force: bool,
                 inputs: Iterable[Path]) -> None:
        self.dst = Path(dst)
        self.is_dir = is_dir
        self.force = force
        for p in inputs:
            if same_path(self.dst, p):
                raise ConvertError(f"{self.dst}: the output is an input ({p}); "
                                   "an input is never overwritten")
        self._check_free()
        parent = self.dst.parent
        if not parent.is_dir():
            raise ConvertError(f"{self.dst}: cannot write there: {parent} is not a directory")
        self.tmp: Path | None = None

    def _check_free(self) -> None:
        if self.dst.exists() or self.dst.is_symlink():
            if not self.force:
                raise ConvertError(f"{self.dst}: the output exists; use --force (force=True) "
                                   "to replace it")
            if self.dst.is_dir() != self.is_dir:
                want = "directory" if self.is_dir else "file"
                raise ConvertError(f"{self.dst}: exists and is not a {want}; not replaced")

    def __enter__(self) -> Output:
        prefix = f".{self.dst.name}."
        if self.is_dir:
            self.tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=self.dst.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=self.dst.parent)
            os.close(fd)
            self.tmp = Path(name)
        # mkstemp/mkdtemp make private (0600/0700) entries; an output gets the usual mode
        # (read without setting it: the umask is process-wide, see fsio.current_umask)
        self.tmp.chmod((0o777 if self.is_dir else 0o666) & ~current_umask())
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is None:
            self._commit()
        else:
            self._discard()

    def _discard(self) -> None:
        if self.tmp is None:
            return
        with contextlib.suppress(OSError):
            if self.tmp.is_dir():
                shutil.rmtree(self.tmp)
            else:
                self.tmp.unlink()
        self.tmp = None

    def _commit(self) -> None:
        assert self.tmp is not None
        try:
            self._check_free()  # again: it may have appeared meanwhile
            if not self.is_dir:
                os.replace(self.tmp, self.dst)
            elif self.dst.exists():  # force: swap the old directory out, then remove it
                trash = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.", suffix=".old",
                                              dir=self.dst.parent))
                os.replace(self.dst, trash / "old")
                os.replace(self.tmp, self.dst)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(self.tmp, self.dst)
        except BaseException:
            self._discard()
            raise
        self.tmp = None

    def file(self, name: str | None = None) -> Path:
        """The temporary path to write: the file itself, or ``name`` in the directory."""
        assert self.tmp is not None
        return self.tmp / name if name is not None else self.tmp


def write_fsync(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Create ``path``, let ``write`` fill it, then flush it to disk (example: :class:`Output`)."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())

