"""Dense outputs of tiny files (issue 16, defect 2): bounded before allocation, and paged in
only where they are written.

Two files from the issue: 109 bytes holding one nonzero at index 2^28 - 1 (its dense form is
1 GiB of float32, nearly all zero pages that need never be touched), and 93 bytes declaring a
shape of (2^24, 2^24) (4 PiB dense: above ``ReadLimits.max_dense_bytes``, and above what any
machine allocates).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from strategies import st_ternary_tensors

import compeft_format as cf
from compeft_format import LimitExceededError, ReadLimits, TernaryTensor, encode
from compeft_format.codecs import BlockContext, GolombCodec

PACKAGE_ROOT = str(Path(cf.__file__).resolve().parent.parent)
# the issue's files were written in format 1.6 (1.7 writes them 4 bytes shorter: spec 5.7)
SPARSE_GIB = cf.dumps({"t": TernaryTensor((2**28,), [2**28 - 1], [False], 1.0)}, version="1.6")
PETA = cf.dumps({"t": TernaryTensor((2**24, 2**24), [], [], 1.0)}, version="1.6")
HUGE = TernaryTensor((2**24, 2**24), [5, 2**47], [False, True], 1.0)


def test_the_files_of_the_issue() -> None:
    assert (len(SPARSE_GIB), len(PETA)) == (109, 93)
    assert cf.inspect(PETA).tensors[0].shape == (2**24, 2**24)
    assert cf.loads(PETA)["t"].nnz == 0  # the sparse form is fine: nothing is dense


def test_one_nonzero_in_a_gib_costs_no_gib() -> None:
    """The dense output is np.zeros: pages nobody writes are never allocated, and the
    prefault (which touches every page) runs only for outputs the writes fill anyway."""
    code = textwrap.dedent("""
        import resource, sys
        import compeft_format as cf
        data = bytes.fromhex(sys.argv[1])
        def rss_mib():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        before = rss_mib()
        a = cf.loads(data, dense=True)["t"]
        assert a.shape == (2**28,) and a[-1] == 1.0 and a[:1000].sum() == 0
        del a
        with cf.open_file(data) as f:
            b = f.get("t", dense=True)
        assert b[-1] == 1.0
        del b
        c = cf.loads(data)["t"].to_numpy()
        assert c[-1] == 1.0
        print(round(rss_mib() - before))
    """)
    env = {**os.environ, "PYTHONPATH": PACKAGE_ROOT}
    proc = subprocess.run([sys.executable, "-c", code, SPARSE_GIB.hex()], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grown_mib = int(proc.stdout)
    assert grown_mib < 64, f"peak resident memory grew by {grown_mib} MiB (1024 if prefaulted)"


def test_prefault_only_where_the_writes_fill_the_pages() -> None:
    from compeft_format import _alloc

    if _alloc._madvise is None:
        pytest.skip("no madvise here: outputs are never prefaulted")
    numel = 1 << 25  # 128 MiB of float32, above the prefault's minimum
    per_page = 4096 // 4
    f32 = np.dtype(np.float32)
    cases = [(None, True), (numel, True), (numel // per_page * 16, True),
             (numel // per_page * 16 - 1, False), (1, False), (0, False)]
    for nnz, prefaulted in cases:
        flat, prefault = _alloc.fresh_zeros(numel, f32, nnz=nnz)
        assert (prefault is not None) == prefaulted, nnz
        with _alloc.writing(prefault):
            pass
        del flat


DENSE_READS = {
    "loads": lambda data, **kw: cf.loads(data, dense=True, **kw)["t"],
    "loads torch": lambda data, **kw: cf.loads(data, framework="torch", **kw)["t"],
    "get": lambda data, **kw: cf.open_file(data, **kw).get("t", dense=True),
    "iter_stream": lambda data, **kw: dict(cf.iter_stream(io.BytesIO(data), dense=True,
                                                           **kw))["t"],
    "to_numpy": lambda data, **kw: cf.loads(data)["t"].to_numpy(**kw),
    "to_torch": lambda data, **kw: cf.loads(data)["t"].to_torch(**kw),
}


@pytest.mark.parametrize("path", DENSE_READS)
def test_a_petabyte_shape_is_a_limit_error_before_allocation(path: str) -> None:
    if "torch" in path:
        pytest.importorskip("torch")  # the only test here that needs it
    read = DENSE_READS[path]
    with pytest.raises(LimitExceededError, match=r"(tensor 't': )?dense output \[16777216, "
                       r"16777216\] (float32|uint8|torch.float32)?.*is \d+ bytes; limit "
                       r"17179869184 \(raise ReadLimits.max_dense_bytes\)"):
        read(PETA)


def test_a_raised_limit_still_gives_a_compeft_error_not_memory_error() -> None:
    """Above the limit's default, the system refuses 4 PiB: LimitExceededError all the same."""
    limits = ReadLimits(max_dense_bytes=2**62)
    with pytest.raises(LimitExceededError, match="the system cannot allocate it"):
        cf.loads(PETA, dense=True, limits=limits)
    with pytest.raises(LimitExceededError, match="the system cannot allocate it"):
        cf.loads(PETA)["t"].to_numpy(limits=limits)


def test_the_limit_is_documented_and_raisable() -> None:
    data = cf.dumps({"t": TernaryTensor((1 << 20,), [7], [True], 0.5)})  # 4 MiB dense
    small = ReadLimits(max_dense_bytes=(1 << 22) - 1)
    with pytest.raises(LimitExceededError, match="is 4194304 bytes; limit 4194303"):
        cf.loads(data, dense=True, limits=small)
    with pytest.raises(LimitExceededError, match="is 4194304 bytes; limit 4194303"):
        cf.open_file(data, limits=small).get("t", dense=True)
    with pytest.raises(LimitExceededError, match="is 4194304 bytes; limit 4194303"):
        cf.loads(data)["t"].to_numpy(limits=small)
    exact = ReadLimits(max_dense_bytes=1 << 22)
    assert cf.loads(data, dense=True, limits=exact)["t"][7] == -0.5
    out = np.empty(1 << 20, np.float32)  # the caller's own array: nothing is allocated
    assert cf.open_file(data, limits=small).get("t", dense=True, out=out) is out
    assert ReadLimits().max_dense_bytes == 16 * 2**30
    assert "max_dense_bytes" in (ReadLimits.__doc__ or "") + Path(
        cf.__file__).with_name("_spec.py").read_text()


def test_auto_never_builds_a_bitmask_that_cannot_win() -> None:
    """A (2^24, 2^24) tensor: its bitmask would be 32 TiB; auto writes golomb, the bytes
    positions="golomb" gives, and an explicit bitmask is an EncodeError, not MemoryError."""
    for level in (3, None):
        data = cf.dumps({"t": HUGE}, zstd_level=level)
        assert data == cf.dumps({"t": HUGE}, zstd_level=level, positions="golomb")
        assert cf.loads(data)["t"] == HUGE
    with pytest.raises(cf.EncodeError, match=r"tensor 't': bitmask positions of "
                       r"281474976710656 elements need 35184372088832 bytes"):
        cf.dumps({"t": HUGE}, positions="bitmask")


@given(st_ternary_tensors())
def test_skipping_the_bitmask_never_changes_the_bytes(t: TernaryTensor) -> None:
    """With the skip rule on for every size, auto gives the bytes it gives without it."""
    want = {level: cf.dumps({"t": t}, zstd_level=level) for level in (1, None)}
    old = encode._HUGE_BITMASK
    encode._HUGE_BITMASK = 0
    try:
        for level, data in want.items():
            assert cf.dumps({"t": t}, zstd_level=level) == data
    finally:
        encode._HUGE_BITMASK = old


def test_skip_rule_on_tensors_where_it_fires() -> None:
    rng = np.random.default_rng(0)
    fired = 0
    old = encode._HUGE_BITMASK
    for numel, nnz in [(1 << 22, 1), (1 << 22, 3), (1 << 26, 20), (1 << 25, 30), (1 << 24, 40),
                       (1 << 20, 5)]:
        idx = np.sort(rng.choice(numel, nnz, replace=False))
        t = TernaryTensor((numel,), idx, rng.random(nnz) < 0.5, 1.0)
        ctx = BlockContext("t", numel, nnz, "F32", (numel,))
        fired += encode._bitmask_cannot_win(*GolombCodec().encode(t.indices, ctx), ctx)
        want = cf.dumps({"t": t})
        encode._HUGE_BITMASK = 0
        try:
            assert cf.dumps({"t": t}) == want
        finally:
            encode._HUGE_BITMASK = old
    assert fired == 4  # and not for the last two
