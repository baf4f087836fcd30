"""compress_many: many inputs over an executor (in process, threads, a dask cluster)."""

from __future__ import annotations

import doctest
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from compeft_format import batch
from compeft_format.batch import batch_outputs, compress_many, output_name
from compeft_format.convert import compress_file
from compeft_format.errors import ConvertError, EncodeError, FormatError
from compeft_format.safetensors_io import save_safetensors

DATA = Path(__file__).parent / "data"


@pytest.fixture
def sources(tmp_path) -> list[Path]:
    """Two plain task vectors, a LoRA and an (IA)^3 adapter directory (small, real)."""
    d = tmp_path / "in"
    d.mkdir()
    out = []
    for i in range(2):
        rng = np.random.default_rng(i)
        p = d / f"tv{i}.safetensors"
        save_safetensors({"w": rng.normal(size=(32, 48)).astype(np.float32),
                          "b": rng.normal(size=48).astype(np.float16),
                          "ids": np.arange(5)}, p)
        out.append(p)
    for name in ("lora-minilm-vader", "ia3-minilm-vader"):
        shutil.copytree(DATA / name, d / name, ignore=shutil.ignore_patterns("init"))
        out.append(d / name)
    return out


def _reference(sources: list[Path], tmp_path: Path, **options) -> list[Path]:
    """What compress_file writes for each source, one by one, in this process."""
    ref = tmp_path / "ref"
    ref.mkdir()
    outs = batch_outputs(sources, ref)
    for s, o in zip(sources, outs, strict=True):
        compress_file(s, o, **options)
    return outs


def _files(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or ``path`` itself), by relative name."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def _check_same(got: list, outs: list[Path], ref: list[Path], sources: list[Path]) -> None:
    assert [s.source for s in got] == [str(s) for s in sources]  # in order
    for summary, out, r in zip(got, outs, ref, strict=True):
        assert summary.output == str(out)
        assert _files(out) == _files(r)  # byte-identical to compress_file's


def test_dask_local_cluster(tmp_path, sources):
    """A real dask.distributed cluster (worker processes): the same bytes as compress_file."""
    distributed = pytest.importorskip("distributed")
    ref = _reference(sources, tmp_path, density=0.2)
    # dashboard on any free port: with None the scheduler still binds 8787, which may be taken
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as client:
        pids = set(client.run(os.getpid).values())
        assert os.getpid() not in pids
        assert len(pids) == 2
        got = compress_many(sources, tmp_path / "out", executor=client.get_executor(),
                            density=0.2)
        # a failure on a worker comes back as the same error type, naming its input
        bad = tmp_path / "bad.safetensors"
        save_safetensors({"w": np.array([1.0, np.nan], np.float32)}, bad)
        with pytest.raises(EncodeError, match=f"^{bad}: .*not finite"):
            compress_many([bad], [tmp_path / "bad.compeft"], executor=client.get_executor(),
                          density=0.5)
    _check_same(got, batch_outputs(sources, tmp_path / "out"), ref, sources)
    assert not (tmp_path / "bad.compeft").exists()


@pytest.mark.parametrize("pool", [False, True])
def test_in_process_and_threads(tmp_path, sources, pool):
    ref = _reference(sources, tmp_path, density=0.1, scale="l2")
    outs = [tmp_path / f"o{i}" for i in range(len(sources))]
    if pool:
        with ThreadPoolExecutor(3) as ex:
            got = compress_many(sources, outs, executor=ex, density=0.1, scale="l2")
    else:
        got = compress_many(sources, outs, density=0.1, scale="l2")
    _check_same(got, outs, ref, sources)


@pytest.mark.parametrize("pool", [False, True])
def test_failures(tmp_path, sources, pool):
    bad = tmp_path / "in" / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    srcs = [sources[0], bad, sources[1]]
    ex = ThreadPoolExecutor(2) if pool else None
    try:
        got = compress_many(srcs, tmp_path / "all", executor=ex, return_exceptions=True,
                            density=0.1)
        assert [type(g).__name__ for g in got] == ["CompressSummary", "SafetensorsError",
                                                   "CompressSummary"]
        assert isinstance(got[1], FormatError)
        assert str(got[1]).startswith(str(bad))
        assert sorted(os.listdir(tmp_path / "all")) == ["tv0.compeft", "tv1.compeft"]
        with pytest.raises(Exception, match=f"^{bad}: "):
            compress_many(srcs, tmp_path / "first", executor=ex, density=0.1)
        # an existing output fails that source only, naming it
        got = compress_many(srcs[:1], tmp_path / "all", executor=ex, return_exceptions=True)
        assert isinstance(got[0], ConvertError)
        assert "the output exists" in str(got[0])
    finally:
        if ex is not None:
            ex.shutdown()


def test_outputs_checked_before_any_work(tmp_path, sources):
    with pytest.raises(ConvertError, match="4 sources but 3 outputs"):
        compress_many(sources, [tmp_path / "a", tmp_path / "b", tmp_path / "c"])
    with pytest.raises(ConvertError, match="output of two sources"):
        compress_many(sources[:2], [tmp_path / "a", tmp_path / "x" / ".." / "a"])
    other = tmp_path / "other"
    other.mkdir()
    twin = other / sources[0].name
    shutil.copyfile(sources[0], twin)
    with pytest.raises(ConvertError, match="would be written there"):
        compress_many([sources[0], twin], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "a").exists()
    assert compress_many([], tmp_path / "none") == []
    with pytest.raises(TypeError, match="'densty'"):
        compress_many(sources, tmp_path / "o", densty=0.1)
    with pytest.raises(TypeError, match="'dst'"):
        compress_many(sources, tmp_path / "o", dst="x")
    assert not (tmp_path / "o").exists()


def test_output_name(tmp_path):
    assert output_name("x/model.safetensors") == "model.compeft"
    assert output_name("x/adapter_model.bin") == "adapter_model.compeft"
    assert output_name("x/odd") == "odd.compeft"
    assert output_name(tmp_path) == tmp_path.name
    assert output_name(str(tmp_path) + "/") == tmp_path.name


def test_doctests():
    result = doctest.testmod(batch, optionflags=doctest.ELLIPSIS)
    assert result.attempted
    assert not result.failed


def test_error_naming_its_input_pickles():
    """Errors travel back from worker processes pickled: the file name must survive."""
    import pickle

    from compeft_format.convert import with_path

    exc = with_path(EncodeError("value nan is not finite", tensor="w"), "a.safetensors")
    back = pickle.loads(pickle.dumps(exc))
    assert (type(back), str(back), back.tensor) == (
        EncodeError, "a.safetensors: tensor 'w': value nan is not finite", "w")
