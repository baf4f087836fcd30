"""The ``compeft`` command: exit statuses, one-line errors, outputs, summaries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from cli_helpers import one_line_error, run

from compeft_format import inspect

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
LORA = DATA / "lora-minilm-vader"
IA3 = DATA / "ia3-minilm-vader"


@pytest.fixture
def model(tmp_path) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(32, 16, generator=g), "b": torch.randn(16, generator=g).half(),
               "e": torch.randn(8, 8, generator=g).to(torch.bfloat16), "ids": torch.arange(4)}
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(tensors, path)
    return path


# ---------------------------------------------------------------------------------------------
# happy paths
# ---------------------------------------------------------------------------------------------
def test_compress_decompress_round_trip(tmp_path, capsys, model):
    code, out, err = run(capsys, "compress", model, "-o", tmp_path / "m.compeft",
                         "--density", "0.25")
    assert code == 0, err
    assert err == ""  # not a terminal: no progress bar
    for word in ("tensors", "4 (3 ternary, 1 dense)", "density", "dense size", "compressed",
                 "ratio", "bits/param", "cosine"):
        assert word in out, word
    code, out, err = run(capsys, "decompress", tmp_path / "m.compeft", "-o",
                         tmp_path / "back.safetensors")
    assert code == 0, err
    assert "decompressed" in out
    back = safetensors.torch.load_file(tmp_path / "back.safetensors")
    orig = safetensors.torch.load_file(model)
    for name, t in orig.items():
        assert back[name].dtype == t.dtype
        assert back[name].shape == t.shape
    assert torch.equal(back["ids"], orig["ids"])


def test_options_reach_the_file(tmp_path, capsys, model):
    code, out, err = run(capsys, "compress", model, "-o", tmp_path / "a.compeft",
                         "--positions", "rice", "--no-zstd", "--scope", "tensor",
                         "--scale", "l2", "--alpha", "0.5", "--exclude", "e", "--exclude", "x*",
                         "-v")
    assert code == 0, err
    assert "(overall)" in out  # -v: the per-tensor quality table
    info = inspect(tmp_path / "a.compeft")
    comp = info.metadata["compeft.compression"]
    assert (comp["scope"], comp["scale"], comp["alpha"]) == ("tensor", "l2", 0.5)
    assert info.metadata["task_vector"]["exclude"] == ["e", "x*"]
    kinds = {t.name: (t.kind, t.codecs) for t in info.tensors}
    assert kinds["e"] == ("dense", "dense")
    assert kinds["w"] == ("ternary", "golomb,signs,scale")
    code, _, err = run(capsys, "compress", model, "-o", tmp_path / "b.compeft",
                       "--positions", "bitmask", "--zstd", "19")
    assert code == 0, err
    assert inspect(tmp_path / "b.compeft").tensors[-1].codecs.startswith("bitmask")


def test_decompress_dtype_and_base(tmp_path, capsys):
    code, _, err = run(capsys, "compress", LORA, "-o", tmp_path / "c", "--base", LORA / "init")
    assert code == 0, err
    code, _, err = run(capsys, "decompress", tmp_path / "c", "-o", tmp_path / "r")
    assert code == 1
    one_line_error(err, "--base", "'init'")
    assert not (tmp_path / "r").exists()
    code, out, err = run(capsys, "decompress", tmp_path / "c", "-o", tmp_path / "r",
                         "--base", LORA / "init", "--dtype", "bf16")
    assert code == 0, err
    assert "BF16" in out
    back = safetensors.torch.load_file(tmp_path / "r" / "adapter_model.safetensors")
    assert {t.dtype for t in back.values()} == {torch.bfloat16}


def test_info_text_and_json(tmp_path, capsys, model):
    assert run(capsys, "compress", model, "-o", tmp_path / "m.compeft")[0] == 0
    code, out, err = run(capsys, "info", tmp_path / "m.compeft")
    assert code == 0, err
    for word in ("ratio", "bits/param", "density", "codecs", "total", "ternary", "dense",
                 "[32,16]", "BF16", "F16"):
        assert word in out, word
    code, out, err = run(capsys, "info", tmp_path / "m.compeft", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["file_bytes"] == os.path.getsize(tmp_path / "m.compeft")
    assert d["ratio"] == pytest.approx(d["dense_bytes"] / d["file_bytes"])
    assert {t["name"] for t in d["tensors"]} == {"w", "b", "e", "ids"}
    w = next(t for t in d["tensors"] if t["name"] == "w")
    assert w["shape"] == [32, 16]
    assert w["dtype"] == "F32"
    assert 0 < w["density"] <= 0.2
    assert w["codecs"]
    assert w["record_bytes"] > 0
    assert w["bits_per_element"] > 0
    # a compressed adapter directory can be named directly
    assert run(capsys, "compress", IA3, "-o", tmp_path / "d")[0] == 0
    code, out, _ = run(capsys, "info", tmp_path / "d")
    assert code == 0
    assert "measured from: one (PEFT IA3)" in out
    assert "base model: sentence-transformers/all-MiniLM-L6-v2" in out


def test_verify_good_and_bad(tmp_path, capsys, model):
    assert run(capsys, "compress", model, "-o", tmp_path / "m.compeft")[0] == 0
    code, out, _ = run(capsys, "verify", tmp_path / "m.compeft")
    assert code == 0
    assert out.strip().endswith(")")
    assert ": OK (4 tensors" in out
    data = bytearray((tmp_path / "m.compeft").read_bytes())
    bad = tmp_path / "bad.compeft"
    for at in (0, 40, len(data) // 2, len(data) - 3):  # header, record, data, trailer
        flipped = bytearray(data)
        flipped[at] ^= 0x55
        bad.write_bytes(bytes(flipped))
        code, out, _ = run(capsys, "verify", tmp_path / "m.compeft", bad)
        assert code == 1, at
        lines = out.strip().splitlines()
        assert len(lines) == 2
        assert lines[0].endswith("bytes)")
        assert ": OK" in lines[0]
        assert lines[1].startswith(f"{bad}: FAILED: "), lines[1]
    bad.write_bytes(bytes(data[:-1]))  # cut short
    code, out, _ = run(capsys, "verify", bad, tmp_path / "missing.compeft")
    assert code == 1
    assert "bad.compeft: FAILED" in out
    assert "missing.compeft: FAILED" in out
    assert "No such file" in out


def test_demo(capsys):
    code, out, err = run(capsys, "demo")
    assert code == 0, err
    for word in ("compressed", "ratio", "bits/param", "cosine", "decompressed",
                 "measured from checkpoint 'init'"):
        assert word in out, word


def test_progress_bar_on_a_terminal(tmp_path, capsys, monkeypatch, model):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    code, out, err = run(capsys, "compress", model, "-o", tmp_path / "a.compeft")
    assert code == 0
    assert "compress" in err
    assert "tensor" in err
    assert out.startswith("compressed ")  # stdout holds the summary only
    code, out, err = run(capsys, "compress", model, "-o", tmp_path / "b.compeft", "--quiet")
    assert code == 0
    assert err == ""


def test_python_dash_m_help():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "compeft_format", "--help"], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    for cmd in ("compress", "decompress", "info", "verify", "demo"):
        assert cmd in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "compeft_format", "verify", "/nonexistent"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
                          check=False)
    assert proc.returncode == 1
    assert "FAILED" in proc.stdout


# ---------------------------------------------------------------------------------------------
# usage errors: exit 2, one line
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("density", ["0", "1.5", "nan", "-1", "abc", "inf"])
def test_bad_density_is_a_usage_error(tmp_path, capsys, model, density):
    code, out, err = run(capsys, "compress", model, "-o", tmp_path / "o.compeft",
                         "--density", density)
    assert code == 2
    one_line_error(err, "--density")
    assert out == ""
    assert not (tmp_path / "o.compeft").exists()


@pytest.mark.parametrize("argv", [
    [], ["frobnicate"], ["compress"], ["compress", "x.safetensors", "y.safetensors", "-o", "-"],
    ["compress", "x", "-o", "y", "--scope", "layer"], ["compress", "x", "-o", "y", "--alpha", "0"],
    ["compress", "x", "-o", "y", "--zstd", "3", "--no-zstd"],
    ["compress", "x", "-o", "y", "--zstd", "30"], ["decompress", "x", "-o", "y", "--dtype", "f64"],
    ["verify"], ["info"],
])
def test_usage_errors(capsys, argv):
    code, _, err = run(capsys, *argv)
    assert code == 2
    one_line_error(err)


def test_help_and_version(capsys):
    assert run(capsys, "--help")[0] == 0
    code, out, _ = run(capsys, "--version")
    assert code == 0
    assert "compeft" in out
    code, out, _ = run(capsys, "compress", "--help")
    assert code == 0
    assert "--density" in out
    assert "rice" in out


# ---------------------------------------------------------------------------------------------
# data errors: exit 1, one line, nothing left behind
# ---------------------------------------------------------------------------------------------
def test_data_errors(tmp_path, capsys, model):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(model.read_bytes())
    assert run(capsys, "compress", model, "-o", tmp_path / "m.compeft")[0] == 0
    existing = tmp_path / "exists.compeft"
    existing.write_bytes(b"mine")
    noperm_parent = tmp_path / "file-not-dir"
    noperm_parent.write_bytes(b"")
    cases = [
        (["compress", tmp_path / "missing.safetensors", "-o", tmp_path / "o"],
         "missing.safetensors: No such file or directory"),
        (["compress", adapter, "-o", tmp_path / "o"], "adapter_config.json is missing"),
        (["compress", junk, "-o", tmp_path / "o"], "not a valid safetensors file"),
        (["compress", tmp_path / "m.compeft", "-o", tmp_path / "o"], "it is a compeft file"),
        (["decompress", model, "-o", tmp_path / "o"], "not a compeft file"),
        (["decompress", junk, "-o", tmp_path / "o"], "junk.safetensors"),
        (["compress", model, "-o", existing], "use --force"),
        (["compress", model, "-o", model, "--force"], "an input is never overwritten"),
        (["compress", model, "-o", noperm_parent / "o.compeft"], "cannot write there"),
        (["compress", model, "-o", tmp_path / "nodir" / "o.compeft"], "cannot write there"),
        (["compress", model, "-o", tmp_path / "o", "--base", tmp_path / "nobase"], "nobase"),
        (["info", junk], "not a compeft file"),
        (["info", tmp_path / "missing.compeft"], "No such file"),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv, needle in cases:
        code, out, err = run(capsys, *argv)
        assert code == 1, (argv, err)
        one_line_error(err, needle)
        assert out == "", argv
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert existing.read_bytes() == b"mine"


def test_base_mismatch_exit_1(tmp_path, capsys):
    base = tmp_path / "base.safetensors"
    ft = tmp_path / "ft.safetensors"
    safetensors.torch.save_file({"w": torch.ones(4, 4), "v": torch.ones(3)}, base)
    safetensors.torch.save_file({"w": torch.full((4, 4), 1.5), "v": torch.ones(3)}, ft)
    assert run(capsys, "compress", ft, "-o", tmp_path / "ft.compeft", "--base", base,
               "--density", "1", "--scale", "l2")[0] == 0
    for other, needle in [({"w": torch.ones(4, 4)}, "missing ['v']"),
                          ({"w": torch.ones(2, 8), "v": torch.ones(3)}, "F32[2, 8] in the base"),
                          ({"w": torch.ones(4, 4), "v": torch.zeros(3)}, "data differs")]:
        bad = tmp_path / "other.safetensors"
        safetensors.torch.save_file(other, bad)
        code, _, err = run(capsys, "decompress", tmp_path / "ft.compeft", "-o",
                           tmp_path / "out.safetensors", "--base", bad)
        assert code == 1
        one_line_error(err, needle, "other.safetensors")
        assert not (tmp_path / "out.safetensors").exists()
    code, _, err = run(capsys, "decompress", tmp_path / "ft.compeft", "-o",
                       tmp_path / "out.safetensors", "--base", base)
    assert code == 0, err
    out = safetensors.torch.load_file(tmp_path / "out.safetensors")
    assert torch.equal(out["w"], torch.full((4, 4), 1.5))  # uniform delta: exact
    assert np.array_equal(out["v"].numpy(), np.ones(3, np.float32))
