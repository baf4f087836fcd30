"""Atomic file replacement: a crash leaves the old file or the new one, never a mix."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ConvertError

try:  # POSIX: a lock tells a stale temporary file from one being written (atomic_write)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["atomic_write", "current_umask", "fsync_dir", "lock", "remove_stale_temps",
           "through_temp", "writes_through"]


def _umask_from_proc() -> int | None:
    """The umask as Linux 4.7+ reports it in ``/proc/self/status``, without changing it."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_by_setting() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Elsewhere the umask can only be read by setting it, which for a moment changes it for every
# thread (a file another thread creates then gets other permissions): done once, at import
_IMPORT_UMASK = _umask_from_proc()
if _IMPORT_UMASK is None:  # pragma: no cover - not Linux
    _IMPORT_UMASK = _umask_by_setting()


def current_umask() -> int:
    """Return the process umask without changing it (the value at import where unreadable).

    >>> 0 <= current_umask() <= 0o777
    True
    """
    mask = _umask_from_proc()
    return _IMPORT_UMASK if mask is None else mask


def atomic_write(path: str | os.PathLike, write: Any) -> None:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, then rename it over ``path``.

    A crash leaves either the old file or the new one, never a mix: the temporary file
    ``.{name}.<random>.tmp`` (hidden: a dot name) is flushed and fsynced before the rename,
    and the directory after it. On an exception the temporary file is removed.

    A writer killed outright (SIGKILL, power loss) cannot remove its temporary file, so the
    next successful ``atomic_write`` to the same ``path`` removes the stale ones: siblings
    named ``.{name}.*.tmp`` last modified before this write started and, where ``fcntl``
    exists, not locked. Every writer holds an exclusive ``flock`` on its temporary file while
    it writes and the kernel drops it when the writer dies, so the temporary file of a writer
    that is still running (even a stalled one) is left alone.

    Nothing but a regular file is ever renamed over: a character device or a FIFO
    (``/dev/null``, a named pipe) is written through, as ``zstd -o /dev/null`` does, and
    anything else that is not a regular file (a folder, a block device, a socket) is refused
    (see :func:`writes_through`).
    """
    path = Path(path)
    if writes_through(path):
        with through_temp(path) as tmp_path, open(tmp_path, "wb") as f:
            write(f)
        return
    started = time.time()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "in use": see remove_stale_temps
        # mkstemp makes a private (0600) file; give the usual mode
        os.chmod(tmp, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            if fcntl is not None:
                os.replace(tmp, path)  # before close: the lock holds until the name is gone
        if fcntl is None:
            os.replace(tmp, path)  # Windows cannot rename a file that is still open
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    remove_stale_temps(path, started)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(path: Path, before: float) -> None:
    """Remove what dead writers left beside ``path``: ``.{name}.*.tmp`` files and folders (a
    temporary output) and ``.{name}.*.old`` folders (an output being replaced), last
    modified before ``before`` and not locked by a live writer (see :func:`atomic_write`)."""
    name = glob.escape(path.name)
    for tmp in [*path.parent.glob(f".{name}.*.tmp"), *path.parent.glob(f".{name}.*.old")]:
        with contextlib.suppress(OSError):  # gone already, or not ours to remove
            if tmp.lstat().st_mtime >= before or tmp.is_symlink():
                continue  # a writer that started after us: certainly alive
            fd = os.open(tmp, os.O_RDONLY)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a writer lives
                if tmp.is_dir():
                    shutil.rmtree(tmp)
                else:
                    tmp.unlink()
            finally:
                os.close(fd)


def lock(fd: int) -> None:
    """Mark the temporary file or folder open as ``fd`` as in use until ``fd`` is closed (or
    its process dies), so that :func:`remove_stale_temps` leaves it alone."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def writes_through(path: Path, *, folder: bool = False) -> bool:
    """Whether an output to ``path`` must be written through instead of renamed over it.

    True for a character device or a FIFO (``/dev/null``, a named pipe): nothing may replace
    them, and writing into them is what the user asked for. False for a path that does not
    exist, a regular file, a folder or a symbolic link (these are replaced by a rename). Any
    other existing thing (a block device, a socket), or a device where a ``folder`` is to be
    written, raises :class:`~compeft_format.errors.ConvertError`: it is never replaced.

    >>> writes_through(Path("/nonexistent/x")), writes_through(Path("/dev/null"))
    (False, True)
    """
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there (the caller says why)
        return False
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
        return False
    special = stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)
    if special and not folder:
        return True
    kind = ("a character device" if stat.S_ISCHR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
            else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a special file")
    raise ConvertError(f"{path}: exists and is not a regular file ({kind}); never replaced")


@contextlib.contextmanager
def through_temp(path: Path) -> Iterator[Path]:
    """A private temporary file to write (in ``TMPDIR``, not beside a device), copied into
    ``path`` (a character device or a FIFO: see :func:`writes_through`) when the block
    succeeds, and removed in every case."""
    fd, tmp = tempfile.mkstemp(prefix="compeft-", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
