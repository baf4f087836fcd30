"""A short run of the benchmark suite (small sizes, seconds), so that bench/ cannot rot.

Timings are never asserted: the benchmark reports its targets, the tests only check that it
runs, that its tables hold what they say, and the pieces it is built from (formulas, the
README rewrite, the memory hand-off).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import run, sizes  # noqa: E402
from bench.common import entropy_bound, md_table, stc_golomb_bits, time_interleaved  # noqa: E402


def test_quick_run_writes_every_section(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path), "--skip", "memory",
         "--no-readme", "--repeats", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    text = (tmp_path / "results.md").read_text()
    for heading in ("## Machine", "## Size: bits per parameter", "## Size on real adapters",
                    "## Speed", "## Shipping time"):
        assert heading in text
    assert "## Memory" not in text  # skipped
    data = json.loads((tmp_path / "results.json").read_text())
    assert [r["density"] for r in data["sizes"]] == list(sizes.DENSITIES)
    for r in data["sizes"]:  # a whole file is never below the entropy of its positions
        assert r["auto"] >= r["H(p)+p"] * 0.999
        assert r["auto"] <= min(r["golomb"], r["bitmask"]) + 1e-9  # auto picks the smaller
    assert {r["adapter"] for r in data["adapters"]} == {a[0] for a in sizes.ADAPTERS}
    assert len(data["speed"]) == 3
    assert all(len(r["times"]["decode"]) == 1 for r in data["speed"])
    try:  # the plot is the one part that needs matplotlib (a bench extra)
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (tmp_path / "sizes.png").exists()
    else:
        assert (tmp_path / "sizes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("p", "bound", "stc"), [  # paper.md section 4
    (0.01, 0.0908, 0.0911), (0.05, 0.3364, 0.3393), (0.1, 0.5690, 0.5756),
    (0.2, 0.9219, 0.9388), (0.5, 1.5, 1.5)])
def test_reference_formulas(p: float, bound: float, stc: float) -> None:
    assert math.isclose(entropy_bound(p), bound, abs_tol=6e-5)
    assert math.isclose(stc_golomb_bits(p), stc, abs_tol=6e-5)


def test_readme_block_is_replaced_between_the_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{run.README_BEGIN}\nold\n{run.README_END}\n\ntail\n")
    assert run.update_readme("| a |\n| --- |", readme) == "README.md size table updated"
    want = f"# x\n\n{run.README_BEGIN}\n| a |\n| --- |\n{run.README_END}\n\ntail\n"
    assert readme.read_text() == want
    readme.write_text("no markers")
    assert "no" in run.update_readme("x", readme)
    assert readme.read_text() == "no markers"


def test_memory_section_runs_the_memory_script() -> None:
    text = run.run_memory(["--quick"], timeout=600)
    assert text.startswith("Peak resident memory of `compeft compress` and `compeft decompress`")
    assert "| `compeft compress` |" in text
    assert "| `compeft decompress` |" in text
    failed = run.run_memory(["--no-such-option"], timeout=600)
    assert failed.startswith("bench/bench_memory.py failed (exit 2):")
    assert "unrecognized arguments: --no-such-option" in failed


def test_interleaved_timing_and_tables() -> None:
    calls: list[str] = []
    t = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b"] * 3
    assert len(t["a"].runs) == 3
    assert t["a"].best <= t["a"].median
    assert md_table(["x", "y"], [[1, 2]]) == "| x | y |\n| --- | ---: |\n| 1 | 2 |"


def test_overhead_content_measure_and_pack_target(tmp_path: Path) -> None:
    """bench/overhead.py: the content measure by its formula; a packed LLM-like file is
    within 1.05x of it, its 1.0 file is not (issue 13's size target, on a small case)."""
    import zstandard

    from bench import overhead
    from compeft_format import TernaryTensor, save_file

    rng = np.random.default_rng(0)
    tensors = {}
    for name, shape in overhead._llama(8, ("q", "v"), 8):
        numel = shape[0] * shape[1]
        idx = np.sort(rng.choice(numel, numel // 100, replace=False))
        tensors[name] = TernaryTensor(shape, idx, rng.random(idx.size) < 0.5, 0.1)
    names = sorted(tensors, key=str.encode)
    bound = sum(t.numel * entropy_bound(t.density) for t in tensors.values())
    z = len(zstandard.ZstdCompressor(level=3).compress("\n".join(names).encode()))
    for version, ok in (("1.1", True), ("1.0", False)):
        path = tmp_path / f"{version}.compeft"
        save_file(tensors, path, version=version)
        m = overhead.content_measure(path)
        want = math.ceil(bound / 8) + 4 * len(tensors) + z
        assert abs(m["content"] - want) <= 1  # the float sum may round the other way
        assert m["file"] == path.stat().st_size
        assert (m["ratio"] <= overhead.TARGET) is ok, (version, m["ratio"])


def test_overhead_breakdown_adds_up_and_finds_each_part(tmp_path: Path) -> None:
    """bench/overhead.py --breakdown: the parts add up to the file; the data part is exactly
    the blocks; the metadata, a pack's member table and the index land in their own parts."""
    from bench import overhead
    from compeft_format import TernaryTensor, inspect, save_file

    rng = np.random.default_rng(1)
    tensors = {f"layer.{i}.w": TernaryTensor((64, 8), np.sort(rng.choice(512, 20, False)),
                                             rng.random(20) < 0.5, 0.5) for i in range(30)}
    sizes = {}
    for meta in ({}, {"note": "x" * 3000}):
        path = tmp_path / f"m{len(meta)}.compeft"
        save_file(tensors, path, metadata=meta)
        parts = overhead.breakdown(path)
        assert sum(parts.values()) == path.stat().st_size
        info = inspect(path)
        # the blocks in the data areas: a compact pack keeps its scales in its table (5.10),
        # a bit pack's members' streams follow each other bit after bit (5.11)
        blocks = [b for t in info.tensors for b in t.blocks if b.stage != "table"]
        assert all(b.bits is not None for b in blocks)
        assert parts["data"] == -(-sum(b.bits for b in blocks) // 8)
        assert sum(b.stored_size for b in blocks) - parts["data"] >= 30  # the 1.3 rounding
        assert parts["index and trailer"] >= 16  # the trailer alone is 16 bytes (spec 5.7)
        sizes[len(meta)] = parts
    # incompressible-ish metadata grows only the header part; the records are the same
    assert sizes[1]["header and metadata"] > sizes[0]["header and metadata"]
    for part in overhead.PARTS[1:]:
        assert sizes[1][part] == sizes[0][part], part
    # 30 packed names and their member table are framing, more than the bare record headers
    assert sizes[0]["record framing"] > 30


def test_overhead_stream_padding_counts_each_streams_last_byte(tmp_path: Path) -> None:
    """bench/overhead.py: the bits of byte rounding in a bitmask (N bits in ceil(N / 8)
    bytes), a golomb payload (zeros after its final 1) and a signs payload (8 ceil(n / 8) - n)."""
    from bench import overhead
    from compeft_format import TernaryTensor, inspect, save_file

    t = TernaryTensor((1001,), [3, 500, 1000], [0, 1, 1], 0.5)
    for positions in ("bitmask", "golomb"):
        path = tmp_path / f"{positions}.compeft"
        save_file({"w": t}, path, positions=positions, version="1.0", zstd_level=None)
        pad = overhead.stream_padding(path)
        assert pad["signs"] == 5  # 3 signs in one byte
        block = next(b for b in inspect(path).tensors[0].blocks if b.codec == positions)
        if positions == "bitmask":
            assert pad["positions"] == 8 * 126 - 1001
        else:  # T = w n + L + sum(q) + n bits (spec 6.2.1), from the gaps and Param
            m, gaps = block.param, [3, 496, 499]
            b = (m - 1).bit_length()
            u, w = 2**b - m, max(b - 1, 0)
            longs = sum(b >= 1 and g % m >= u for g in gaps)
            bits = w * 3 + longs + sum(g // m for g in gaps) + 3
            assert block.stored_size == -(-bits // 8)
            assert pad["positions"] == 8 * block.stored_size - bits


def test_overhead_command_on_files_and_generated_ia3(tmp_path: Path, capsys) -> None:
    """bench/overhead.py FILE --breakdown prints all three tables; an (IA)^3 made by
    write_adapter starts at ones and compresses from its init/ as the command does."""
    from bench import overhead
    from compeft_format.convert import compress_file

    shapes = overhead._t5_ia3(1, 16, 32)
    assert [n.rsplit(".", 2)[-2] for n, _ in shapes] == ["k", "v", "wo", "k", "v", "k", "v", "wo"]
    folder = overhead.write_adapter(tmp_path / "ia3", shapes, 0)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3"
    assert config["feedforward_modules"] == ["wo"]
    compress_file(folder, tmp_path / "c", density=0.1, base=folder / "init")
    path = tmp_path / "c" / "adapter_model.compeft"
    assert overhead.main([str(path), "--breakdown"]) == 0
    out = capsys.readouterr().out
    assert out.count("| adapter |") == 3
    assert "positions padding bits" in out


def test_compress_against_partition_table(capsys) -> None:
    """bench_select part 3 (compress vs np.partition, 1 thread and all) runs and says it."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_select

    from compeft_format import kernels

    bench_select.bench_compress(1 << 21, 1, 0.05)
    out = capsys.readouterr().out
    assert "| np.partition (fresh copy) |" in out
    assert "| partition (warm copy) |" in out
    assert "| compress 1 thread, numpy |" in out
    assert "load average" in out
    paths = 2 if kernels.status() == "numba" else 1  # numba is in the test extra
    rows = paths * len({1, bench_select.compress_threads()})
    assert out.count("| compress ") == rows
    assert out.count("<= 0.4:") == 2 * rows  # against np.partition and the warm partition
    assert f"kernels: {kernels.status()}" in out
    if paths == 2:
        assert "| compress 1 thread, numba |" in out


def test_compress_phases_and_kernel_load_tables(capsys) -> None:
    """bench_select's CPU-per-step table (both paths) and the kernels' one-time cost."""
    pytest.importorskip("numba")
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_select

    bench_select.bench_phases(1 << 21, 0.05)
    bench_select.kernel_load_cost(compile_too=False)
    out = capsys.readouterr().out
    for step in ("sum of squares", "candidates and band", "picking the kept entries"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {step}"))
        assert float(row.split("|")[2]) > 0
    for step in ("sum of squares (float64, einsum's order)", "candidates and band"):
        assert float(out.split(f"| {step} |")[1].split("|")[1]) > 0  # the numba column
    assert "| numba import + kernels from the on-disk cache |" in out


def test_bench_1b_shapes() -> None:
    """bench_1b's model has the shapes of Llama 3.2 1B: 1.24B parameters, tied embeddings."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_1b

    layout = bench_1b.shapes(128256, 2048, 8192, 16, 32, 8)
    assert len(layout) == 146
    assert sum(math.prod(s) for s in layout.values()) == 1_235_814_400
    assert layout["model.layers.0.self_attn.k_proj.weight"] == (512, 2048)


def test_fidelity_hifi_point_and_crossings() -> None:
    from bench import fidelity

    rng = np.random.default_rng(0)
    tv = {"a.lora_A.w": rng.normal(0, 0.02, (4, 64)).astype(np.float32),
          "a.lora_B.w": rng.normal(0, 0.01, (64, 4)).astype(np.float32)}
    built = fidelity.hifi(tv, 0.25)
    n = fidelity.numel(tv)
    # the recon is the file's: within half a step of the task vector; the size is the file's
    rms = math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in tv.values()) / n)
    for name, v in tv.items():
        assert np.abs(built.recon[name] - v.reshape(-1)).max() <= 0.125 * rms * (1 + 1e-5)
    assert 3.5 < built.entropy_bits < 4.5
    assert built.file_bytes() > built.entropy_bits * n / 8
    points = [{"model": "m", "structure": "s", "setting": str(b), "bits_per_param": b,
               "score": sc} for b, sc in ((3.0, 0.9998), (3.9, 0.99991), (4.5, 0.99995))]
    row = fidelity.crossings(points).splitlines()[2]
    assert row == "| m | s | 3.900 (3.9: 0.9999100) | 0.9999100 (3.9, 3.900 bits) |"
