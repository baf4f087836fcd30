"""Atomic outputs of the converters: a temporary beside the output, fsynced, then renamed.

An output is never left half-written, never replaces an input, and replaces an existing
output only when forced. Nothing but a regular file or a folder is ever renamed over: a
character device or a FIFO is written through (``-o /dev/null``, as zstd does), anything
else refused. The temporary of a writer killed outright (SIGKILL, power loss) is removed by
the next successful write of the same output, as :func:`~compeft_format.fsio.atomic_write`
does: each writer holds a lock on its temporary while it lives.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

from .errors import ConvertError
from .fsio import (
    current_umask,
    fsync_dir,
    lock,
    remove_stale_temps,
    temp_prefix,
    through_temp,
    writes_through,
)
from .sources import ADAPTER_CONFIG, Source, companion_files

__all__ = ["Output", "copy_companions", "same_path", "write_fsync"]


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
        inputs = list(inputs)
        for p in inputs:
            if same_path(self.dst, p):
                raise ConvertError(f"{self.dst}: the output is an input ({p}); "
                                   "an input is never overwritten")
        self.through = self._check_free()
        if not self.through and self.dst.is_symlink():  # replace what it points to
            self.dst = self.dst.resolve()
        if not self.through and self.dst.is_dir():
            self._check_folder(inputs)
        parent = self.dst.parent
        if not parent.is_dir():
            why = "is not a directory" + ("" if parent.exists() else " (it does not exist)")
            raise ConvertError(f"{self.dst}: cannot write there: {parent} {why}")
        self.tmp: Path | None = None
        self._lock: int | None = None
        self._through: contextlib.ExitStack | None = None
        self._started = 0.0

    def _check_free(self) -> bool:
        """Whether the output is written through (a device, a FIFO); refuse what is taken."""
        if writes_through(self.dst, folder=self.is_dir):
            return True
        if self.dst.exists() or self.dst.is_symlink():
            if not self.force:
                raise ConvertError(f"{self.dst}: the output exists; use --force (force=True) "
                                   "to replace it")
            if self.dst.is_dir() != self.is_dir:
                want = "directory" if self.is_dir else "file"
                raise ConvertError(f"{self.dst}: exists and is not a {want}; not replaced")
        return False

    def _check_folder(self, inputs: list[Path]) -> None:
        """Refuse to replace a folder (with ``force``) that holds an input, the working
        directory, or other folders: replacing it would delete them (an output folder of
        compeft holds files only)."""
        here, cwd = self.dst.resolve(), Path.cwd()
        for p in [*inputs, cwd]:
            if Path(p).resolve().is_relative_to(here):
                what = "the working directory" if p is cwd else f"the input {p}"
                raise ConvertError(f"{self.dst}: the output folder holds {what}; replacing "
                                   "it would delete that (name a new folder inside it)")
        sub = next((c for c in self.dst.iterdir() if c.is_dir() and not c.is_symlink()), None)
        if sub is not None:
            raise ConvertError(f"{self.dst}: holds the folder {sub.name}, so it is not an "
                               "output of compeft; not replaced (name a new folder)")

    def __enter__(self) -> Output:
        self._started = time.time()
        if self.through:  # a private temporary, copied into the device at the end
            self._through = contextlib.ExitStack()
            self.tmp = self._through.enter_context(through_temp(self.dst))
            return self
        prefix = temp_prefix(self.dst)
        if self.is_dir:
            self.tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=self.dst.parent))
            self._lock = os.open(self.tmp, os.O_RDONLY)
        else:
            self._lock, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp",
                                                dir=self.dst.parent)
            self.tmp = Path(name)
        lock(self._lock)  # "in use": remove_stale_temps leaves it alone
        # mkstemp/mkdtemp make private (0600/0700) entries; an output gets the usual mode
        # (read without setting it: the umask is process-wide, see fsio.current_umask)
        self.tmp.chmod((0o777 if self.is_dir else 0o666) & ~current_umask())
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is None:
            self._commit()
        else:
            self._discard()

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _discard(self) -> None:
        if self._through is not None:
            with contextlib.suppress(OSError):
                self._through.__exit__(ConvertError, None, None)  # removes, copies nothing
            self._through = self.tmp = None
            return
        if self.tmp is None:
            return
        with contextlib.suppress(OSError):
            if self.tmp.is_dir():
                shutil.rmtree(self.tmp)
            else:
                self.tmp.unlink()
        self._unlock()
        self.tmp = None

    def _commit(self) -> None:
        assert self.tmp is not None
        if self._through is not None:
            through, self._through = self._through, None
            try:
                through.close()  # copies into the device, removes the temporary
            finally:
                self.tmp = None
            return
        try:
            self._check_free()  # again: it may have appeared meanwhile
            if not self.is_dir:
                os.replace(self.tmp, self.dst)
            elif self.dst.exists():  # force: swap the old directory out, then remove it
                trash = Path(tempfile.mkdtemp(prefix=temp_prefix(self.dst), suffix=".old",
                                              dir=self.dst.parent))
                os.replace(self.dst, trash / "old")
                os.replace(self.tmp, self.dst)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(self.tmp, self.dst)
        except BaseException:
            self._discard()
            raise
        self._unlock()  # after the rename: the name it locked is gone
        self.tmp = None
        fsync_dir(self.dst.parent)
        remove_stale_temps(self.dst, self._started)

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


def copy_companions(source: Source, out: Output) -> None:
    """Copy what travels with the weights: an adapter's config, a model folder's small files
    (config, generation config, tokenizer...), into the output directory."""
    if source.folder == "adapter":
        assert source.config is not None
        shutil.copyfile(source.config, out.file(ADAPTER_CONFIG))
    elif source.folder == "model":
        for p in companion_files(source.path):
            shutil.copyfile(p, out.file(p.name))
