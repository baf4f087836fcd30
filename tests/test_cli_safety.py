"""What the ``compeft`` command must never do (issue 15, points 1 to 3, and 8's tune rules).

1. replace anything that is not a regular file (a device, a FIFO, a socket) by renaming over
   it: a character device or a FIFO is written through, as ``zstd -o /dev/null`` does;
   anything else is refused;
2. leave a temporary file behind when SIGTERM or SIGHUP stops it (as for Ctrl-C), or keep
   the temporary files of earlier killed runs;
3. lose work: ``tune`` and ``sweep --plot`` check their outputs, the plot format and
   matplotlib before any work, and ``sweep`` prints its table even when the plot fails.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from cli_helpers import one_line_error, run

from compeft_format import inspect
from compeft_format.cli import main

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
IA3 = DATA / "ia3-minilm-vader"
POSIX = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="needs POSIX signals")


@pytest.fixture
def model(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file({f"t{i}": rng.normal(size=(64, 32)).astype(np.float32)
                                 for i in range(6)}, path)
    return path


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------
# 1. never rename over what is not a regular file
# ---------------------------------------------------------------------------------------------
def _read_fifo(path: Path, into: list[bytes]) -> threading.Thread:
    def reader() -> None:
        with open(path, "rb") as f:
            into.append(f.read())

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    return t


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs mkfifo")
def test_a_fifo_is_written_through_not_replaced(tmp_path, capsys, model):
    assert main(["compress", str(model), "-o", str(tmp_path / "file.compeft"), "-q"]) == 0
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for extra in ([], ["-f"]):
        got: list[bytes] = []
        reader = _read_fifo(fifo, got)
        code, _, err = run(capsys, "compress", model, "-o", fifo, *extra)
        reader.join(60)
        assert code == 0, err
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # still the FIFO
        assert got == [(tmp_path / "file.compeft").read_bytes()]
    assert _hidden(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="mknod of a character device needs root (the FIFO test runs)")
def test_a_character_device_is_written_through_not_replaced(tmp_path, capsys, model):
    fake_null = tmp_path / "fake_null"
    os.mknod(fake_null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # what /dev/null is
    for argv in (["compress", model, "-o", fake_null, "--force"],
                 ["compress", model, "-o", fake_null],
                 ["decompress", IA3, "-o", fake_null, "-f"]):
        code, _, err = run(capsys, *argv)
        assert code in (0, 1), err
        st = os.lstat(fake_null)
        assert stat.S_ISCHR(st.st_mode), argv
        assert st.st_rdev == os.makedev(1, 3)
    assert _hidden(tmp_path) == []


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs unix sockets")
def test_other_special_files_are_refused(tmp_path, capsys, model):
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        for argv in (["compress", model, "-o", path, "-f"], ["compress", model, "-o", path]):
            code, _, err = run(capsys, *argv)
            assert code == 1
            one_line_error(err, "not a regular file")
            assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert _hidden(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# 2. SIGTERM and SIGHUP clean up; stale temporary files of killed runs are removed
# ---------------------------------------------------------------------------------------------
# The child runs the command with every tensor written slowly, and says when it writes.
_SLOW = textwrap.dedent(r'''
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from compeft_format import container, safetensors_io
    from compeft_format.cli import main

    def slow(cls):
        write = cls.write
        def slowly(self, *args, **kwargs):
            print("writing", file=sys.stderr, flush=True)
            time.sleep(0.3)
            return write(self, *args, **kwargs)
        cls.write = slowly

    slow(container.Writer)
    slow(safetensors_io.SafetensorsWriter)
    sys.exit(main(sys.argv[2:]))
''')


@POSIX
@pytest.mark.parametrize(("sig", "command", "folder"), [
    ("SIGTERM", "decompress", False), ("SIGHUP", "decompress", False),
    ("SIGTERM", "compress", False), ("SIGTERM", "compress", True)])
def test_sigterm_and_sighup_remove_the_output_in_progress(tmp_path, model, sig, command,
                                                          folder):
    if command == "decompress":
        assert main(["compress", str(model), "-o", str(tmp_path / "in.compeft"), "-q"]) == 0
        src, dst = tmp_path / "in.compeft", tmp_path / "out.safetensors"
    else:
        src, dst = (IA3 if folder else model), tmp_path / "out.compeft"
    before = sorted(os.listdir(tmp_path))
    with subprocess.Popen([sys.executable, "-c", _SLOW, str(ROOT), command, str(src), "-o",
                           str(dst)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL) as proc:
        try:
            assert proc.stderr.readline() == b"writing\n"
            assert _hidden(tmp_path), "the temporary output exists while writing"
            proc.send_signal(getattr(signal, sig))
            err = proc.stderr.read().decode()
            code = proc.wait(60)
        finally:
            proc.kill()
    assert code == 128 + getattr(signal, sig), err
    assert err.splitlines()[-1] == f"compeft: terminated by {sig}", err
    assert sorted(os.listdir(tmp_path)) == before  # no temporary file or folder left


@POSIX
def test_stale_temporaries_of_killed_runs_are_removed(tmp_path, capsys, model):
    assert main(["compress", str(model), "-o", str(tmp_path / "in.compeft"), "-q"]) == 0
    old = time.time() - 3600
    stale_file = tmp_path / ".out.safetensors.k1ll3d.tmp"  # what a killed decompress leaves
    stale_file.write_bytes(b"x" * 1000)
    stale_dir = tmp_path / ".outdir.d34d00.tmp"  # a killed adapter-folder compress
    stale_dir.mkdir()
    (stale_dir / "adapter_model.compeft").write_bytes(b"partial")
    other = tmp_path / ".unrelated.tmp"  # not a temporary of these outputs: kept
    other.write_bytes(b"mine")
    for p in (stale_file, stale_dir, other):
        os.utime(p, (old, old))
    code, _, err = run(capsys, "decompress", tmp_path / "in.compeft", "-o",
                       tmp_path / "out.safetensors")
    assert code == 0, err
    code, _, err = run(capsys, "compress", IA3, "-o", tmp_path / "outdir")
    assert code == 0, err
    assert _hidden(tmp_path) == [".unrelated.tmp"]


@POSIX
def test_the_temporary_of_a_live_writer_is_kept(tmp_path, capsys, model):
    """A writer still running (its temporary locked) keeps its file, however old."""
    assert main(["compress", str(model), "-o", str(tmp_path / "in.compeft"), "-q"]) == 0
    with subprocess.Popen([sys.executable, "-c", _SLOW, str(ROOT), "decompress",
                           str(tmp_path / "in.compeft"), "-o", str(tmp_path / "out.safetensors")],
                          stderr=subprocess.PIPE, stdout=subprocess.DEVNULL) as proc:
        try:
            assert proc.stderr.readline() == b"writing\n"
            (live,) = _hidden(tmp_path)
            old = time.time() - 3600
            os.utime(tmp_path / live, (old, old))
            code, _, err = run(capsys, "decompress", tmp_path / "in.compeft", "-o",
                               tmp_path / "out.safetensors", "-f")
            assert code == 0, err
            assert (tmp_path / live).exists()
        finally:
            proc.kill()


# ---------------------------------------------------------------------------------------------
# 3. tune and sweep check what they will write before any work
# ---------------------------------------------------------------------------------------------
def _eval_logging(log: Path, score: str = "0.5") -> str:
    """An evaluation command that logs each call and prints a constant score."""
    return (f"{shlex.quote(sys.executable)} -c \"import sys; open(sys.argv[1], 'a')"
            f".write('x'); print('score', {score})\" {shlex.quote(str(log))} {{checkpoint}}")


def test_tune_checks_its_output_before_any_evaluation(tmp_path, capsys, model):
    log = tmp_path / "log"
    existing = tmp_path / "exists.compeft"
    existing.write_bytes(b"mine")
    for out, needle in ((tmp_path / "no" / "such" / "out.compeft", "is not a folder"),
                        (existing, "use --force"),
                        (model, "the output is an input")):
        code, stdout, err = run(capsys, "tune", model, "-o", out, "--eval", _eval_logging(log),
                                "--alphas", "1")
        assert code == 1
        one_line_error(err, needle)
        assert stdout == ""
        assert not log.exists(), "no evaluation ran"
    assert existing.read_bytes() == b"mine"


def test_tune_prefers_alpha_one_on_equal_scores_and_reports_the_file(tmp_path, capsys, model):
    log = tmp_path / "log"
    out = tmp_path / "tuned.compeft"
    code, stdout, err = run(capsys, "tune", model, "-o", out, "--eval", _eval_logging(log),
                            "--alphas", "0.7,0.85,1,1.2")
    assert code == 0, err
    assert log.read_text() == "xxxx"  # every candidate evaluated
    assert "chosen: density 0.1, alpha 1 " in stdout
    comp = inspect(out).metadata["compeft.compression"]
    assert comp["alpha"] == 1.0
    size = os.path.getsize(out)
    assert f"written: {out}, {size:,} bytes" in stdout
    code, stdout, err = run(capsys, "tune", model, "-o", tmp_path / "v.compeft", "--eval",
                            _eval_logging(log), "--alphas", "1,2", "-v", "-q")
    assert code == 0
    assert stdout == ""
    assert err.count("candidate density 0.1, alpha ") == 2


def test_sweep_checks_the_plot_before_any_work(tmp_path, capsys, monkeypatch, model):
    import compeft_format.tuning as tuning

    def no_work(*_a, **_k):
        raise AssertionError("the sweep ran")

    monkeypatch.setattr(tuning, "sweep_file", no_work)
    cases = [(tmp_path / "plot.txt", 2, "name the file with one of those suffixes"),
             (tmp_path / "missing" / "plot.png", 1, "is not a folder")]
    for plot, status, needle in cases:
        code, out, err = run(capsys, "sweep", model, "--plot", plot)
        assert code == status, err
        one_line_error(err, needle)
        assert out == ""
    monkeypatch.setitem(sys.modules, "matplotlib.backend_bases", None)  # not installed
    code, out, err = run(capsys, "sweep", model, "--plot", tmp_path / "plot.png")
    assert code == 1
    one_line_error(err, "--plot needs matplotlib")


def test_sweep_prints_its_table_when_the_plot_fails(tmp_path, capsys, monkeypatch, model):
    import compeft_format.tuning as tuning

    def broken(self, path, **_k):
        raise ValueError("cannot render this")

    monkeypatch.setattr(tuning.SweepResult, "plot", broken)
    code, out, err = run(capsys, "sweep", model, "--densities", "0.1,0.2", "--scales", "l2",
                         "--plot", tmp_path / "p.png")
    assert code == 1
    one_line_error(err, "p.png: the plot failed (cannot render this)")
    assert "scale  density" in out
    assert out.count("\nl2 ") == 2
    assert not (tmp_path / "p.png").exists()


def test_tune_file_checks_its_output_before_any_evaluation(tmp_path, model):
    from compeft_format.errors import ConvertError
    from compeft_format.tuning import tune_file

    log = tmp_path / "log"
    with pytest.raises(ConvertError, match="is not a directory"):
        tune_file(model, tmp_path / "no" / "out.compeft", _eval_logging(log), alphas=[1.0])
    with pytest.raises(ConvertError, match="the output is an input"):
        tune_file(model, model, _eval_logging(log), alphas=[1.0], force=True)
    assert not log.exists(), "no evaluation ran"
