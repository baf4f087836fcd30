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

__all__ = ["TEMP_NAME_BYTES", "atomic_write", "current_umask", "fsync_dir", "lock",
           "remove_stale_temps", "temp_prefix", "through_temp", "writes_through"]


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
    if path.is_symlink():  # replace what it points to, not the link
        path = path.resolve()
    started = time.time()
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp",
                                   dir=path.parent or ".")
    except OSError as exc:
        raise _about(exc, path) from None
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
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename == tmp:
            raise _about(exc, path) from None
        raise
    fsync_dir(path.parent)
    remove_stale_temps(path, started)


def _about(exc: OSError, path: Path) -> OSError:
    """``exc`` said of the user's ``path``, not of the temporary file beside it (which is
    gone): ``IsADirectoryError: [Errno 21] Is a directory: 'out'``."""
    return type(exc)(exc.errno, exc.strerror, str(path))


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


#: Bytes of an output's name kept in its temporary's (``.{name}.<random>.tmp``): file names
#: are at most 255 bytes, and the temporary adds 15.
TEMP_NAME_BYTES = 200


def temp_prefix(path: Path) -> str:
    """The prefix of ``path``'s temporaries, ``.{name}.``, the name cut to
    :data:`TEMP_NAME_BYTES` bytes (at a character) so that an output whose name is legal
    can always have one.

    >>> temp_prefix(Path("/x/out.compeft")), len(temp_prefix(Path("b" * 250)))
    ('.out.compeft.', 202)
    """
    name = path.name.encode("utf-8", "surrogateescape")[:TEMP_NAME_BYTES]
    return f".{name.decode('utf-8', 'ignore')}."


def remove_stale_temps(path: Path, before: float) -> None:
    """Remove what dead writers left beside ``path``: ``.{name}.*.tmp`` files and folders (a
    temporary output) and ``.{name}.*.old`` folders (an output being replaced), last
    modified before ``before`` and not locked by a live writer (see :func:`atomic_write`)."""
    prefix = glob.escape(temp_prefix(path))
    for tmp in [*path.parent.glob(f"{prefix}*.tmp"), *path.parent.glob(f"{prefix}*.old")]:
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

    True for a character device or a FIFO (``/dev/null``, a named pipe), or a symbolic link
    to one (``/dev/stdout``): nothing may replace them, and writing into them is what the
    user asked for. False for a path that does not exist, a regular file or a folder (these
    are replaced by a rename; a link to one, or a dangling link, is for the caller to
    resolve). Any other existing thing (a block device, a socket), or a device where a
    ``folder`` is to be written, raises :class:`~compeft_format.errors.ConvertError`: it is
    never replaced.

    >>> writes_through(Path("/nonexistent/x")), writes_through(Path("/dev/null"))
    (False, True)
    """
    try:
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):  # what it points to decides (-o /dev/stdout is a link)
            mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there (the caller says why)
        return False
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
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
        try:
            with open(tmp, "rb") as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except OSError as exc:  # /dev/full: say which output
            raise _about(exc, path) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
