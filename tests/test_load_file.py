"""``load_file`` gives arrays the caller owns (issue 16, defect 5), ``open_file`` views.

It used to return read-only views of a memory map it never closed: writing to them raised,
replacing the file failed on Windows while they lived, and truncating the file underneath
could kill the process with SIGBUS.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import compeft_format as cf
from compeft_format import TernaryTensor

PACKAGE_ROOT = str(Path(cf.__file__).resolve().parent.parent)


def _tensors() -> dict[str, object]:
    return {
        "plain": np.random.default_rng(0).integers(0, 2**32, 4096, dtype=np.uint32),  # raw
        "ramp": np.tile(np.arange(64, dtype=np.int16), 256),  # zstd: decoded to bytes
        "t": TernaryTensor((1000,), [3, 999], [True, False], 0.5),
    }


def test_load_file_arrays_are_writeable_and_independent_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "a.compeft"
    cf.save_file(_tensors(), path)
    codecs = {i.name: i.codecs for i in cf.inspect(path).tensors}
    assert codecs["plain"] == "dense"  # a view of the map would be zero-copy
    assert codecs["ramp"] == "dense+zstd"
    got = cf.load_file(path)
    dense = cf.load_file(path, dense=True)
    for arrays in (got, dense):
        for name in ("plain", "ramp"):
            arr = arrays[name]
            assert arr.flags.writeable, name
            arr[0] = 7  # the caller may change them
            assert arr[0] == 7
    assert dense["t"].flags.writeable
    cf.save_file({"other": np.ones(2)}, path)  # replaced while the arrays live
    want = _tensors()
    assert np.array_equal(got["plain"][1:], want["plain"][1:])
    assert np.array_equal(got["ramp"][1:], want["ramp"][1:])
    assert cf.load_file(path).keys() == {"other"}
    path.unlink()
    assert got["plain"][4095] == want["plain"][4095]
    if Path("/proc/self/maps").exists():  # no map of the file is left behind
        assert str(path) not in Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not hasattr(os, "truncate"), reason="needs os.truncate")
def test_truncating_the_file_under_loaded_arrays_is_harmless(tmp_path: Path) -> None:
    """In a child: a view of a map whose file is cut faults (SIGBUS) when read."""
    path = tmp_path / "big.compeft"
    cf.save_file({"plain": np.arange(1 << 20, dtype=np.float32)}, path, zstd_level=None)
    code = textwrap.dedent("""
        import os, sys
        import compeft_format as cf
        path = sys.argv[1]
        a = cf.load_file(path)["plain"]
        os.truncate(path, 0)
        print(float(a[-1]))
    """)
    env = {**os.environ, "PYTHONPATH": PACKAGE_ROOT}
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-1000:]}"
    assert proc.stdout == f"{float((1 << 20) - 1)}\n"


def test_open_file_keeps_zero_copy_views(tmp_path: Path) -> None:
    path = tmp_path / "a.compeft"
    cf.save_file(_tensors(), path)
    with cf.open_file(path) as f:
        plain = f.get("plain")
        assert not plain.flags.writeable  # a view of the map: no copy was made
        assert plain.base is not None
        assert np.array_equal(plain, _tensors()["plain"])
    assert plain[4095] == _tensors()["plain"][4095]  # still valid after close, as documented


def test_load_file_of_a_file_cut_meanwhile_is_a_compeft_error(tmp_path: Path) -> None:
    path = tmp_path / "a.compeft"
    cf.save_file(_tensors(), path)
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(cf.CompeftError):
        cf.load_file(path)
