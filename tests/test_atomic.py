"""Atomic writes: ``save_file`` never leaves a partial file at the destination.

A writer runs in a subprocess and is killed with SIGKILL part-way through a large file. The
destination must then hold the previous complete file (or nothing, if there was none), and
the hidden temporary file it leaves must be removed by the next successful ``save_file`` to
that path, while the temporary file of a writer that is still alive is left alone. The rule
is documented in :func:`compeft_format.fsio.atomic_write`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import compeft_format as cf
from compeft_format import TernaryTensor

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

# The child writes N tensors of 256 KiB; the mapping hands them out slowly (save_file reads
# values lazily, one record at a time), so the temporary file grows for a few seconds.
# It prints "go" once, then (with --stall) sleeps halfway before resuming.
_CHILD = textwrap.dedent(r'''
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from collections.abc import Mapping
    import numpy as np
    import compeft_format as cf

    path, count = sys.argv[2], int(sys.argv[3])
    delay, stall = float(sys.argv[4]), float(sys.argv[5])

    class Slow(Mapping):
        def __len__(self):
            return count
        def __iter__(self):
            return (f"t{i:04d}" for i in range(count))
        def __getitem__(self, name):
            i = int(name[1:])
            if i == 0:
                print("go", flush=True)
            if stall and i == count // 2:
                time.sleep(stall)
            time.sleep(delay)
            return np.full(1 << 16, i, dtype=np.float32)  # 256 KiB, incompressible enough

    cf.save_file(Slow(), path, zstd_level=None)
    print("done", flush=True)
''')


def _start_writer(path: Path, count: int = 400, delay: float = 0.01,
                  stall: float = 0.0) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(ROOT), str(path), str(count),
                             str(delay), str(stall)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "go"
    return proc


def _temps(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def _wait_for_temp(path: Path, size: int, timeout: float = 20.0) -> Path:
    """Wait until the writer's temporary file holds at least ``size`` bytes."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for tmp in _temps(path):
            if tmp.stat().st_size >= size:
                return tmp
        time.sleep(0.02)
    raise AssertionError(f"no temporary file of {size} bytes appeared beside {path}")


def _kill_mid_write(path: Path) -> Path:
    proc = _start_writer(path)
    tmp = _wait_for_temp(path, 8 << 20)  # 8 MiB of about 100 MiB written
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()  # its pipe: no ResourceWarning
    assert proc.returncode == -signal.SIGKILL
    return tmp


OLD = {"w": TernaryTensor((100,), [3, 50], [True, False], 0.5), "b": np.arange(4.0)}
NEW = {"w": TernaryTensor((10,), [9], [False], 2.0)}


def _assert_loads(path: Path, want: dict) -> None:
    got = cf.load_file(path)
    assert list(got) == sorted(want)
    for k, v in want.items():
        assert (got[k] == v) if isinstance(v, TernaryTensor) else np.array_equal(got[k], v)


def test_kill_mid_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "model.compeft"
    cf.save_file(OLD, path)
    before = path.read_bytes()
    stale = _kill_mid_write(path)
    assert path.read_bytes() == before  # the old file, byte for byte
    _assert_loads(path, OLD)
    assert stale.exists()
    assert stale.name.startswith(".model.compeft.")
    # the next successful write to the path removes what the dead writer left
    cf.save_file(NEW, path)
    _assert_loads(path, NEW)
    assert _temps(path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.compeft"]


def test_kill_mid_write_without_a_previous_file_leaves_nothing_visible(tmp_path):
    path = tmp_path / "model.compeft"
    _kill_mid_write(path)
    assert not path.exists()
    assert all(p.name.startswith(".") for p in tmp_path.iterdir())  # only the hidden temp
    cf.save_file(NEW, path)
    _assert_loads(path, NEW)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.compeft"]


def test_a_live_writers_temporary_file_is_not_removed(tmp_path):
    """A writer stalled mid-file keeps its (old) temporary file: it holds a lock on it."""
    path = tmp_path / "model.compeft"
    proc = _start_writer(path, count=40, delay=0.0, stall=2.5)
    tmp = _wait_for_temp(path, 19 * (1 << 18))  # the first half is written, then it stalls
    time.sleep(0.3)  # so that its last write is older than ours starts
    cf.save_file(NEW, path)
    assert tmp.exists(), "the temporary file of a live writer was removed"
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert out.strip() == "done"
    got = cf.load_file(path)  # the stalled writer renamed last: its file wins, whole
    assert list(got) == [f"t{i:04d}" for i in range(40)]
    assert _temps(path) == []


def test_other_names_are_not_touched(tmp_path):
    """Only ``.{name}.*.tmp`` of the same name is cleaned up, never other files."""
    path = tmp_path / "a.compeft"
    keep = [tmp_path / n for n in (".b.compeft.x1.tmp", ".a.compeft.tmp", "a.compeft.1.tmp",
                                   ".a.compeft.x.tmp.bak")]
    stale = tmp_path / ".a.compeft.zz.tmp"
    for p in [*keep, stale]:
        p.write_bytes(b"x")
        os.utime(p, (1, 1))  # very old
    cf.save_file(NEW, path)
    assert not stale.exists()
    assert all(p.exists() for p in keep)


def test_an_error_mid_write_removes_the_temporary_file(tmp_path):
    path = tmp_path / "m.compeft"
    cf.save_file(OLD, path)
    bad = {"a": np.ones(3), "z": np.array(["not", "numbers"])}  # fails on the second record
    with pytest.raises(cf.EncodeError):
        cf.save_file(bad, path)
    _assert_loads(path, OLD)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.compeft"]


def test_saved_file_has_the_usual_mode(tmp_path):
    path = tmp_path / "m.compeft"
    cf.save_file(NEW, path)
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_saving_never_changes_the_umask(tmp_path, monkeypatch):
    """The umask is process-wide: setting it, even for a moment, changes the mode of files
    other threads create meanwhile. atomic_write reads it without setting it."""
    from compeft_format import fsio

    calls = []
    monkeypatch.setattr(os, "umask", lambda *a: calls.append(a) or 0o022)
    for mask in (0o027, 0o002):
        monkeypatch.setattr(fsio, "_umask_from_proc", lambda m=mask: m)
        cf.save_file(NEW, tmp_path / f"{mask:o}.compeft")
        assert (tmp_path / f"{mask:o}.compeft").stat().st_mode & 0o777 == 0o666 & ~mask
    assert calls == []
    # where /proc cannot tell (not Linux), the value read once at import
    monkeypatch.setattr(fsio, "_umask_from_proc", lambda: None)
    monkeypatch.setattr(fsio, "_IMPORT_UMASK", 0o077)
    cf.save_file(NEW, tmp_path / "c.compeft")
    assert (tmp_path / "c.compeft").stat().st_mode & 0o777 == 0o600
    # the converters' outputs (files and folders) follow the same rule
    monkeypatch.setattr(fsio, "_umask_from_proc", lambda: 0o027)
    from compeft_format.outputs import Output, write_fsync

    with Output(tmp_path / "dir", is_dir=True, force=False, inputs=[]) as out:
        write_fsync(out.file("a.bin"), lambda f: f.write(b"abc"))
    with Output(tmp_path / "file", is_dir=False, force=False, inputs=[]) as out:
        write_fsync(out.file(), lambda f: f.write(b"abc"))
    assert (tmp_path / "dir").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "file").stat().st_mode & 0o777 == 0o640
    assert calls == []


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc only")
def test_current_umask_reads_the_real_umask():
    from compeft_format.fsio import current_umask

    previous = os.umask(0o037)
    try:
        assert current_umask() == 0o037
    finally:
        os.umask(previous)
    assert current_umask() == previous
