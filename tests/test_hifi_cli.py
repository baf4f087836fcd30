"""Hi-fi files through the command line: ``compress --hifi``, ``decompress``, ``info``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from cli_helpers import one_line_error, run

from compeft_format import inspect, open_file, save_hifi
from compeft_format.convert import compress_file
from compeft_format.errors import EncodeError
from compeft_format.hifi import DEFAULT_REL_STEP, HIFI_KEY, load_hifi

LORA = Path(__file__).parent / "data" / "lora-minilm-vader"
#: half an ulp of each output dtype, relative: the rounding of base + decoded delta
HALF_ULP = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _steps(path: Path) -> dict[str, float | None]:
    with open_file(path) as r:
        return dict(zip(r.keys(), r.metadata()[HIFI_KEY]["steps"], strict=True))


def _within_half_step(back: dict, orig: dict, steps: dict) -> float:
    """Assert every float entry of ``back`` is within half its step of ``orig`` (plus the
    rounding of the output dtype); return the largest error in steps."""
    worst = 0.0
    for name, t in orig.items():
        assert back[name].dtype == t.dtype, name
        assert back[name].shape == t.shape, name
        if not t.is_floating_point():
            assert torch.equal(back[name], t), name
            continue
        x, y = t.double(), back[name].double()
        err = (y - x).abs()
        bound = steps[name] / 2 * (1 + 1e-6) + x.abs() * HALF_ULP[t.dtype] + 1e-30
        assert bool((err <= bound).all()), (name, float((err - bound).max()))
        worst = max(worst, float(err.max()) / steps[name])
    return worst


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path]:
    """A base checkpoint and its fine-tune: F32, F16 and BF16 tensors and an I64 one."""
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(64, 48, generator=g), "b": torch.randn(48, generator=g).half(),
            "e": torch.randn(16, 16, generator=g).to(torch.bfloat16),
            "ids": torch.arange(6)}
    ft = {k: (v + 0.02 * torch.randn(v.shape, generator=g)).to(v.dtype)
          if v.is_floating_point() else v for k, v in base.items()}
    safetensors.torch.save_file(base, tmp_path / "base.safetensors")
    safetensors.torch.save_file(ft, tmp_path / "ft.safetensors")
    return tmp_path / "base.safetensors", tmp_path / "ft.safetensors"


def test_round_trip_with_base(tmp_path, capsys, pair):
    base, ft = pair
    code, out, err = run(capsys, "compress", ft, "--base", base, "--hifi",
                         "-o", tmp_path / "ft.compeft")
    assert code == 0, err
    assert "hi-fi" in out
    assert f"{DEFAULT_REL_STEP:g} x rms" in out
    assert "3 hi-fi, 1 dense" in out
    assert "'base.safetensors'" in out
    with open_file(tmp_path / "ft.compeft") as r:
        meta = r.metadata()
        assert {r.info(n).dtype for n in ("w", "b", "e")} <= {"I8", "I16"}
    assert meta[HIFI_KEY]["dtypes"] == ["F16", "BF16", None, "F32"]  # b, e, ids, w
    assert meta["compeft.compression"] == {"method": "hifi", "rel_step": DEFAULT_REL_STEP}
    assert meta["task_vector"]["reference"] == "checkpoint"
    assert "compeft.base" in meta  # bound to its base as a ternary file is

    steps = _steps(tmp_path / "ft.compeft")
    assert steps["ids"] is None
    assert len({steps[n] for n in "wbe"}) == 1
    code, out, err = run(capsys, "decompress", tmp_path / "ft.compeft", "--base", base,
                         "-o", tmp_path / "back.safetensors")
    assert code == 0, err
    back = safetensors.torch.load_file(tmp_path / "back.safetensors")
    worst = _within_half_step(back, safetensors.torch.load_file(ft), steps)
    assert worst > 0.4  # the bound is reached, not loose

    # the base is needed, and must be the recorded one
    code, _, err = run(capsys, "decompress", tmp_path / "ft.compeft", "-o", tmp_path / "x")
    one_line_error(err, "--base")
    assert code == 1
    code, _, err = run(capsys, "decompress", tmp_path / "ft.compeft", "--base", ft,
                       "-o", tmp_path / "y.safetensors")
    assert code == 1
    one_line_error(err)


def test_smaller_step_is_closer_and_larger(tmp_path, capsys, pair):
    base, ft = pair
    sizes, errs = [], []
    for rel in ("0.5", "0.05"):
        dst = tmp_path / f"{rel}.compeft"
        code, out, err = run(capsys, "compress", ft, "--base", base, "--hifi", rel, "--json",
                             "-o", dst)
        assert code == 0, err
        summary = json.loads(out)
        assert summary["hifi_step"] == float(rel)
        sizes.append(summary["file_bytes"])
        errs.append(summary["quality"]["overall"]["rel_error"])
    assert sizes[1] > sizes[0]
    assert errs[1] < errs[0] / 5
    # uniform error of step s: rms s / sqrt(12), the step being rel x rms of the task vector
    assert errs[1] == pytest.approx(0.05 / 12**0.5, rel=0.2)


def test_adapter_folder(tmp_path, capsys):
    out_dir = tmp_path / "vader.compeft"
    code, out, err = run(capsys, "compress", LORA, "--hifi", "--base", "zero", "-o", out_dir)
    assert code == 0, err
    assert "hi-fi" in out
    assert "measured from zero" in out
    assert (out_dir / "adapter_config.json").is_file()
    steps = _steps(out_dir / "adapter_model.compeft")
    with open_file(out_dir / "adapter_model.compeft") as r:
        assert "dtypes" not in r.metadata()[HIFI_KEY]  # all F32: the default, not written
    a = next(n for n in steps if ".lora_A." in n)
    # lora_weights: each factor's step divided by its partner's norm, so A's and B's differ
    assert steps[a] != steps[a.replace(".lora_A.", ".lora_B.")]

    code, _, err = run(capsys, "decompress", out_dir, "-o", tmp_path / "back")
    assert code == 0, err
    assert (tmp_path / "back" / "adapter_config.json").is_file()
    back = safetensors.torch.load_file(tmp_path / "back" / "adapter_model.safetensors")
    orig = safetensors.torch.load_file(LORA / "adapter_model.safetensors")
    assert set(back) == set(orig)
    _within_half_step(back, orig, steps)
    # the same values as the Python decoder gives
    decoded = load_hifi(out_dir / "adapter_model.compeft")
    assert np.array_equal(back[a].float().numpy(), decoded[a])


def test_decompress_dtype_and_a_python_hifi_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    tv = {"w": rng.normal(0, 0.01, (32, 8)).astype(np.float32)}
    save_hifi(tv, tmp_path / "tv.compeft", rel_step=0.1)  # no dtypes recorded: float32
    code, _, err = run(capsys, "decompress", tmp_path / "tv.compeft", "-o",
                       tmp_path / "tv.safetensors")
    assert code == 0, err
    back = safetensors.torch.load_file(tmp_path / "tv.safetensors")["w"]
    assert back.dtype == torch.float32
    assert np.array_equal(back.numpy(), load_hifi(tmp_path / "tv.compeft")["w"])
    code, _, err = run(capsys, "decompress", tmp_path / "tv.compeft", "--dtype", "bf16",
                       "-o", tmp_path / "bf.safetensors")
    assert code == 0, err
    bf = safetensors.torch.load_file(tmp_path / "bf.safetensors")["w"]
    assert bf.dtype == torch.bfloat16
    assert torch.equal(bf, back.to(torch.bfloat16))


@pytest.mark.parametrize("extra", [["--density", "0.2"], ["--scale", "norm"],
                                   ["--alpha", "1.5"], ["--scope", "tensor"],
                                   ["--positions", "bitmask"]])
def test_ternary_options_refused(tmp_path, capsys, pair, extra):
    code, _, err = run(capsys, "compress", pair[1], "--hifi", *extra, "-o", tmp_path / "x")
    assert code == 2
    one_line_error(err, "--hifi", extra[0])
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("step", ["0", "-1", "nan", "x"])
def test_bad_step_is_a_usage_error(tmp_path, capsys, pair, step):
    code, _, err = run(capsys, "compress", pair[1], f"--hifi={step}", "-o", tmp_path / "x")
    assert code == 2
    one_line_error(err, "--hifi")


def test_python_default_zstd_level_is_the_commands(tmp_path, capsys, pair):
    # compress_file(hifi=...) with zstd_level left at "auto" writes the command's bytes
    # (level 1, which suits codes); an explicit level is still honoured
    base, ft = pair
    code, _, err = run(capsys, "compress", ft, "--hifi", "0.2", "--base", base, "-o",
                       tmp_path / "cli.compeft", "-q")
    assert code == 0, err
    compress_file(ft, tmp_path / "py.compeft", hifi=0.2, base=base)
    compress_file(ft, tmp_path / "l3.compeft", hifi=0.2, base=base, zstd_level=3)
    cli = (tmp_path / "cli.compeft").read_bytes()
    assert (tmp_path / "py.compeft").read_bytes() == cli
    assert (tmp_path / "l3.compeft").read_bytes() != cli


def test_python_refuses_ternary_options(tmp_path, pair):
    with pytest.raises(EncodeError, match="density"):
        compress_file(pair[1], tmp_path / "x.compeft", hifi=0.2, density=0.3)
    with pytest.raises(EncodeError, match="positive"):
        compress_file(pair[1], tmp_path / "x.compeft", hifi=0.0)
    assert not (tmp_path / "x.compeft").exists()


def test_info_ratio_against_the_original(tmp_path, capsys, pair):
    base, ft = pair
    dst = tmp_path / "ft.compeft"
    assert run(capsys, "compress", ft, "--base", base, "--hifi", "-o", dst)[0] == 0
    original = 64 * 48 * 4 + 48 * 2 + 16 * 16 * 2 + 6 * 8
    size = dst.stat().st_size
    code, out, err = run(capsys, "info", dst)
    assert code == 0, err
    assert f"original {original:,} bytes; ratio {original / size:.1f}x" in out
    assert "hi-fi file" in out
    assert inspect(dst).dense_size < original  # the codes' own size: not what is reported
    code, out, err = run(capsys, "info", "--json", dst)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["hifi"] == {"original_bytes": original, "ratio": original / size}
    # a ternary file has no such line
    assert run(capsys, "compress", ft, "-o", tmp_path / "t.compeft")[0] == 0
    code, out, _ = run(capsys, "info", tmp_path / "t.compeft")
    assert "hi-fi" not in out
    assert "dense " in out


def test_merge_refuses_hifi_files(tmp_path, capsys, pair):
    # merging adds the tensors as ternary values: the codes must never be taken for those
    base, ft = pair
    code, _, err = run(capsys, "compress", ft, "--base", base, "--hifi",
                       "-o", tmp_path / "a.compeft")
    assert code == 0, err
    code, _, err = run(capsys, "merge", tmp_path / "a.compeft", tmp_path / "a.compeft",
                       "-o", tmp_path / "m.compeft")
    assert code == 1
    one_line_error(err, "hi-fi")
    assert not (tmp_path / "m.compeft").exists()


def test_several_inputs_to_a_folder(tmp_path, capsys, pair):
    # several INPUTs go through batch.compress_many: --hifi must reach every one
    base, ft = pair
    code, _, err = run(capsys, "compress", base, ft, "--hifi", "0.3", "-o", f"{tmp_path}/out/")
    assert code == 0, err
    for name in ("base", "ft"):
        with open_file(tmp_path / "out" / f"{name}.compeft") as r:
            assert r.metadata()["compeft.compression"]["rel_step"] == 0.3
            assert r.info("w").dtype == "I8"
