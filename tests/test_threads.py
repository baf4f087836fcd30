"""Several threads and processes reading and writing at once (issue 16, defect 1).

The thread stress runs in a child interpreter: a data race in a C extension (two threads in
one zstd context) crashes the process, and a crash must fail one test with its exit status,
not end the whole run. Every result is compared byte for byte with a single-threaded
reference, so a race that corrupts data without crashing fails too.
"""

from __future__ import annotations

import concurrent.futures as cf_futures
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np

import compeft_format as cf

PACKAGE_ROOT = str(Path(cf.__file__).resolve().parent.parent)  # the package under test

# tensors of every kind the writer handles: small ternary records (bitmask and golomb, zstd
# inline), a large one whose zstd stage runs on a second thread, dense records
_SETUP = """
import threading, numpy as np, compeft_format as cf
def tensors(seed, big=9 << 20):
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(24):
        n = int(rng.integers(1000, 60_000))
        idx = np.flatnonzero(rng.random(n) < rng.choice([0.01, 0.3]))
        out[f"t{i:02d}"] = cf.TernaryTensor((n,), idx, rng.random(idx.size) < 0.5, 0.1)
    n = big  # 9 Mi: a bitmask over 1 MiB, compressed on a background thread
    idx = np.flatnonzero(rng.random(n) < 0.35)
    out["big"] = cf.TernaryTensor((n,), idx, rng.random(idx.size) < 0.5, 0.01, "F16")
    out["dense"] = rng.standard_normal((64, 33)).astype(np.float32)
    out["zeros"] = np.zeros(5000, np.int16)
    return out
def run_threads(fn, n=4):
    errors = []
    def body(k):
        try:
            fn(k)
        except BaseException as exc:
            errors.append(repr(exc))
    threads = [threading.Thread(target=body, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
"""


def _run_child(code: str, *args: str, timeout: float = 240) -> str:
    """Run ``code`` in a fresh interpreter on the package under test; return its stdout."""
    env = {**os.environ, "PYTHONPATH": PACKAGE_ROOT}
    proc = subprocess.run([sys.executable, "-c", _SETUP + textwrap.dedent(code), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, (
        f"child exited with {proc.returncode} (negative: killed by signal "
        f"{-proc.returncode if proc.returncode < 0 else None})\n{proc.stderr[-3000:]}")
    return proc.stdout


def test_threads_dump_the_same_tensors_to_the_same_bytes() -> None:
    out = _run_child("""
        a, b = tensors(1), tensors(2)
        refs = {0: cf.dumps(a), 1: cf.dumps(b)}
        def work(k):
            src = a if k % 2 == 0 else b
            for _ in range(2 if k < 2 else 1):
                data = cf.dumps(src)
                assert data == refs[k % 2], "dumps gave other bytes under threads"
                back = cf.loads(data)
                assert all(back[n] == src[n] for n in src if n not in ("dense", "zeros"))
                assert np.array_equal(back["dense"], src["dense"])
        run_threads(work)
        print("ok", len(refs[0]), len(refs[1]))
    """)
    assert out.startswith("ok ")


def test_threads_read_different_and_identical_files() -> None:
    out = _run_child("""
        import os, sys, tempfile
        folder = tempfile.mkdtemp()
        data = [cf.dumps(tensors(s, 1 << 20)) for s in (3, 4)]
        paths = []
        for i, d in enumerate(data):
            paths.append(os.path.join(folder, f"{i}.compeft"))
            with open(paths[-1], "wb") as f:
                f.write(d)
        ref = [cf.loads(d) for d in data]
        ref_dense = [cf.loads(d, dense=True)["big"] for d in data]
        def same(got, want):
            assert got.keys() == want.keys()
            for n in want:
                if isinstance(want[n], np.ndarray):
                    assert np.array_equal(got[n], want[n]), n
                else:
                    assert got[n] == want[n], n
        def work(k):
            for r in range(2):
                i = (k + r) % 2  # threads read both files, and the same file, at once
                same(cf.load_file(paths[i]), ref[i])
                same(cf.loads(data[i]), ref[i])
                with cf.open_file(paths[i]) as f:
                    assert np.array_equal(f.get("big", dense=True), ref_dense[i])
                    assert f.get("t03") == ref[i]["t03"]
        run_threads(work, 4)
        print("ok")
    """)
    assert out == "ok\n"


def _tensors(seed: int) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    out: dict[str, object] = {}
    for i in range(8):
        n = int(rng.integers(100, 20_000))
        idx = np.flatnonzero(rng.random(n) < 0.2)
        out[f"w{i}"] = cf.TernaryTensor((n,), idx, rng.random(idx.size) < 0.5, 0.25)
    out["bias"] = rng.standard_normal(300).astype(np.float32)
    return out


def _save_and_check(path: str, seed: int, rounds: int) -> bytes:
    """Write ``_tensors(seed)`` to ``path`` ``rounds`` times, reading it back each time."""
    want = cf.dumps(_tensors(seed))
    for _ in range(rounds):
        cf.save_file(_tensors(seed), path)
        assert Path(path).read_bytes() == want
        with cf.open_file(path) as f:  # a reader sees one whole file, never a mix
            assert f.get("w1") == _tensors(seed)["w1"]
    return want


def test_threads_save_file_to_one_path_and_to_many(tmp_path: Path) -> None:
    shared = str(tmp_path / "shared.compeft")
    errors: list[str] = []

    def work(k: int) -> None:
        try:
            _save_and_check(str(tmp_path / f"own{k}.compeft"), k, 3)
            cf.save_file(_tensors(0), shared)  # identical content from every thread
            got = cf.load_file(shared)
            assert got["w0"] == _tensors(0)["w0"]
        except BaseException as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert Path(shared).read_bytes() == cf.dumps(_tensors(0))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["shared.compeft"] + [f"own{k}.compeft" for k in range(4)])  # no temporary file left


def _process_job(args: tuple[str, str, int]) -> str:
    own, shared, seed = args
    _save_and_check(own, seed, 2)
    cf.save_file(_tensors(0), shared)
    with cf.open_file(shared) as f:
        assert f.get("bias").tobytes() == _tensors(0)["bias"].tobytes()  # type: ignore[attr-defined]
    return cf.dumps(_tensors(seed)).hex()[:64]


def test_processes_save_and_load_at_once(tmp_path: Path) -> None:
    shared = str(tmp_path / "shared.compeft")
    jobs = [(str(tmp_path / f"p{k}.compeft"), shared, 10 + k) for k in range(4)]
    # spawn: a fresh interpreter per worker, as a server's worker processes are
    ctx = multiprocessing.get_context("spawn")
    with cf_futures.ProcessPoolExecutor(2, mp_context=ctx) as pool:
        heads = list(pool.map(_process_job, jobs))
    for (own, _, seed), head in zip(jobs, heads, strict=True):
        assert Path(own).read_bytes() == cf.dumps(_tensors(seed))
        assert head == cf.dumps(_tensors(seed)).hex()[:64]
    assert Path(shared).read_bytes() == cf.dumps(_tensors(0))
def test_fork_after_a_background_compression_does_not_hang() -> None:
    """No zstd worker thread outlives a write, so a fork copies no thread holding a lock."""
    out = _run_child("""
        import os, warnings
        warnings.simplefilter("error")  # Python 3.12+: forking a threaded process warns
        t = tensors(5)
        ref = cf.dumps(t)
        names = sorted(th.name for th in threading.enumerate())
        assert names == ["MainThread"], names
        pid = os.fork()
        if pid == 0:
            ok = cf.dumps(t) == ref and cf.loads(ref)["big"] == t["big"]
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
    """, timeout=120)
    assert out == "child 0\n"


def test_compress_many_on_a_thread_pool_gives_the_files_of_a_sequential_run(
        tmp_path: Path) -> None:
    """The serving-side pattern of the issue: compress_many over a ThreadPoolExecutor."""
    from compeft_format.batch import compress_many

    data = Path(__file__).parent / "data"
    sources = [data / d / "adapter_model.safetensors"
               for d in ("lora-minilm-vader", "ia3-minilm-vader")] * 2
    outs = [tmp_path / f"seq{i}.compeft" for i in range(4)]
    for src, out in zip(sources, outs, strict=True):
        cf.compress_file(src, out, density=0.1)
    threaded = [tmp_path / f"thr{i}.compeft" for i in range(4)]
    with cf_futures.ThreadPoolExecutor(4) as pool:
        compress_many(sources, threaded, executor=pool, density=0.1)
    for a, b in zip(outs, threaded, strict=True):
        assert a.read_bytes() == b.read_bytes()
