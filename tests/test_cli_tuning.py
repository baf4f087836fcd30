"""``compeft sweep`` and ``compeft tune``: sizes against the files compress writes, the search
against a brute-force one, failing and silent evaluation commands, budgets, usage errors."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from cli_helpers import one_line_error, run

from compeft_format import inspect
from compeft_format.compress import METRIC_SCALES, SCALES, SWEEP_SCALES
from compeft_format.convert import compress_file, decompress_file

DATA = Path(__file__).parent / "data"
LORA = DATA / "lora-minilm-vader"
IA3 = DATA / "ia3-minilm-vader"
PY = shlex.quote(sys.executable)

# The evaluation command of the tune tests: the score is minus the squared distance of the
# candidate checkpoint to the true fine-tuned tensors; every checkpoint path is logged.
EVAL_SCRIPT = """
import sys
import numpy as np
from safetensors.numpy import load_file
checkpoint, target, log = sys.argv[1:4]
with open(log, "a") as f:
    f.write(checkpoint + "\\n")
got, want = load_file(checkpoint), load_file(target)
score = -sum(float(np.sum((got[n].astype(np.float64) - want[n]) ** 2)) for n in want
             if want[n].dtype.kind == "f")
print("evaluating", checkpoint)
print(f"score: {score!r}")
"""


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path]:
    """A base checkpoint and its fine-tune: float tensors and an integer buffer."""
    rng = np.random.default_rng(0)
    base = {"w": rng.normal(size=(48, 32)).astype(np.float32),
            "b": rng.normal(size=32).astype(np.float32), "ids": np.arange(6)}
    ft = {"w": base["w"] + 0.05 * rng.normal(size=(48, 32)).astype(np.float32),
          "b": base["b"] + 0.05 * rng.normal(size=32).astype(np.float32), "ids": np.arange(6)}
    paths = tmp_path / "base.safetensors", tmp_path / "ft.safetensors"
    safetensors.numpy.save_file(base, paths[0])
    safetensors.numpy.save_file(ft, paths[1])
    return paths


# ---------------------------------------------------------------------------------------------
# sweep
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["lora-with-init", "ia3-from-one", "file-with-base"])
def test_sweep_json_sizes_equal_the_files_compress_writes(tmp_path, capsys, pair, case):
    if case == "lora-with-init":
        src, base = LORA, LORA / "init"
    elif case == "ia3-from-one":
        src, base = IA3, None
    else:
        src, base = pair[1], pair[0]
    extra = ["--base", base] if base is not None else []
    code, out, err = run(capsys, "sweep", src, *extra, "--densities", "0.05,0.2",
                         "--scales", "proj_vcap,l2", "--json")
    assert code == 0, err
    assert err == ""  # not a terminal: no progress bar
    d = json.loads(out)
    assert [(p["scale"], p["density"]) for p in d["points"]] == [
        ("proj_vcap", 0.05), ("proj_vcap", 0.2), ("l2", 0.05), ("l2", 0.2)]
    for i, p in enumerate(d["points"]):
        dst = tmp_path / f"out{i}"
        s = compress_file(src, dst, density=p["density"], scale=p["scale"], base=base)
        assert p["file_bytes"] == os.path.getsize(s.file), p
        assert p["numel"] == s.numel
        assert p["dense_bytes"] == s.dense_bytes
        assert p["nnz"] == s.nnz
        assert p["bits_per_param"] == pytest.approx(s.bits_per_param)
        assert p["ratio"] == pytest.approx(s.ratio)
        assert p["rel_error"] == pytest.approx(s.quality.overall.rel_error, rel=1e-12)
        assert p["cosine"] == pytest.approx(s.quality.overall.cosine, rel=1e-12)
        written = {t.name: t.record_size for t in inspect(s.file).tensors}
        per = {t["name"]: t for t in p["quality"]["tensors"]}
        assert set(per) <= set(written)
        for name, t in per.items():
            assert t["record_bytes"] == written[name]
            assert t["rel_error"] == pytest.approx(s.quality[name].rel_error, rel=1e-12)


def test_sweep_table(capsys):
    code, out, err = run(capsys, "sweep", LORA, "--base", LORA / "init", "--densities",
                         " 0.1,")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"sweep of {LORA}: 337,920 parameters")
    assert lines[1].split()[:5] == ["scale", "density", "alpha", "nnz", "bytes"]
    # every rule but the Gram-matrix ones (a pass of rows x cols x min(rows, cols) a matrix)
    assert [line.split()[0] for line in lines[2:]] == list(SWEEP_SCALES)
    assert set(SWEEP_SCALES) | set(METRIC_SCALES) == set(SCALES)


def test_sweep_runs_the_gram_matrix_rules_when_named(capsys):
    code, out, err = run(capsys, "sweep", LORA, "--base", LORA / "init", "--densities", "0.1",
                         "--scales", ",".join(METRIC_SCALES))
    assert code == 0, err
    assert [line.split()[0] for line in out.splitlines()[2:]] == list(METRIC_SCALES)


def test_sweep_refuses_to_replace_a_plot_without_force(tmp_path, capsys):
    png = tmp_path / "sweep.png"
    png.write_bytes(b"mine")
    code, out, err = run(capsys, "sweep", LORA, "--densities", "0.1", "--plot", png)
    assert code == 1
    assert out == ""
    one_line_error(err, "exists", "--force")
    assert png.read_bytes() == b"mine"  # refused before any work, matplotlib or not


def test_sweep_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")  # the plot alone needs it
    png = tmp_path / "sweep.png"
    code, out, err = run(capsys, "sweep", LORA, "--base", LORA / "init", "--densities",
                         " 0.1,", "--plot", png)
    assert code == 0, err
    assert out.splitlines()[-1] == f"plot: {png}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = run(capsys, "sweep", LORA, "--densities", "0.1", "--plot", png, "--force")
    assert code == 0, err


@pytest.mark.parametrize("argv", [
    ["--densities", "0.1,2"], ["--densities", ""], ["--densities", "x"],
    ["--scales", "norm,max"], ["--alpha", "0"], ["--scope", "layer"],
])
def test_sweep_usage_errors_exit_2(capsys, argv):
    code, out, err = run(capsys, "sweep", LORA, *argv)
    assert code == 2
    assert out == ""
    assert "error" in err
    assert "Traceback" not in err


def test_sweep_missing_input_is_a_data_error(tmp_path, capsys):
    code, _, err = run(capsys, "sweep", tmp_path / "nope.safetensors")
    assert code == 1
    one_line_error(err, "nope.safetensors")


# ---------------------------------------------------------------------------------------------
# tune
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def evaluator(tmp_path, pair) -> tuple[str, Path]:
    script = tmp_path / "eval.py"
    script.write_text(EVAL_SCRIPT)
    log = tmp_path / "seen.log"
    cmd = f"{PY} {shlex.quote(str(script))} {{checkpoint}} {shlex.quote(str(pair[1]))} " \
          f"{shlex.quote(str(log))}"
    return cmd, log


def brute_force(tmp_path: Path, pair, densities, alphas) -> dict[tuple[float, float], float]:
    want = safetensors.numpy.load_file(pair[1])
    scores = {}
    for d in densities:
        for a in alphas:
            c, r = tmp_path / f"bf-{d}-{a}.compeft", tmp_path / f"bf-{d}-{a}.safetensors"
            compress_file(pair[1], c, density=d, alpha=a, base=pair[0])
            decompress_file(c, r, base=pair[0])
            got = safetensors.numpy.load_file(r)
            scores[d, a] = -sum(float(np.sum((got[n].astype(np.float64) - want[n]) ** 2))
                                for n in want if want[n].dtype.kind == "f")
    return scores


def test_tune_finds_the_brute_force_setting_and_records_it(tmp_path, capsys, pair, evaluator):
    cmd, log = evaluator
    densities, alphas = [0.1, 0.3], [0.6, 1.0]
    out_path = tmp_path / "tuned.compeft"
    code, out, err = run(capsys, "tune", pair[1], "--base", pair[0], "-o", out_path,
                         "--eval", cmd, "--densities", "0.1,0.3", "--alphas", "0.6,1")
    assert code == 0, err
    brute = brute_force(tmp_path, pair, densities, alphas)
    best = max(brute, key=brute.__getitem__)
    assert f"chosen: density {best[0]:g}, alpha {best[1]:g}" in out
    meta = inspect(out_path).metadata
    comp, record = meta["compeft.compression"], meta["tuning"]
    assert (comp["density"], comp["alpha"]) == best
    assert record["chosen"]["density"] == best[0]
    assert record["chosen"]["alpha"] == best[1]
    assert record["eval"] == cmd
    assert [(c["density"], c["alpha"]) for c in record["candidates"]] == list(brute)
    for c in record["candidates"]:
        assert c["score"] == pytest.approx(brute[c["density"], c["alpha"]], rel=1e-12)
    # the output is what compress writes for the chosen setting (plus the record)
    ref = compress_file(pair[1], tmp_path / "ref.compeft", density=best[0], alpha=best[1],
                        base=pair[0])
    assert [t.record_size for t in inspect(out_path).tensors] == [
        t.record_size for t in inspect(ref.file).tensors]
    # every candidate checkpoint was a temporary file, gone now
    seen = log.read_text().split()
    assert len(seen) == 4
    assert not any(Path(p).exists() for p in seen)


def test_tune_adapter_directory_gets_adapter_checkpoints(tmp_path, capsys):
    # the checkpoint of an adapter is a PEFT adapter directory; the command lists it
    cmd = f"{PY} -c 'import os, sys; print(len(sorted(os.listdir(sys.argv[1]))))' {{checkpoint}}"
    code, out, err = run(capsys, "tune", LORA, "--base", LORA / "init", "-o", tmp_path / "t",
                         "--eval", cmd, "--alphas", "1", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["best"]["score"] == 2.0  # adapter_config.json and adapter_model.safetensors
    assert (tmp_path / "t" / "adapter_model.compeft").is_file()


def test_tune_budget(tmp_path, capsys, pair, evaluator):
    cmd, log = evaluator
    args = ["tune", pair[1], "--base", pair[0], "--eval", cmd, "--densities", "0.05,0.5",
            "--alphas", "1", "--json"]
    code, out, err = run(capsys, *args, "-o", tmp_path / "a.compeft")
    assert code == 0, err
    free = json.loads(out)
    bits = [c["bits_per_param"] for c in free["candidates"]]
    assert free["best"]["density"] == 0.5
    log.unlink()
    budget = sum(bits) / 2
    code, out, err = run(capsys, *args, "-o", tmp_path / "b.compeft",
                         "--budget-bits-per-param", str(budget))
    assert code == 0, err
    capped = json.loads(out)
    assert capped["best"]["density"] == 0.05
    assert capped["candidates"][1]["status"] == "over budget"
    assert len(log.read_text().split()) == 1  # the candidate over the budget was not run
    assert inspect(tmp_path / "b.compeft").metadata["tuning"]["budget_bits_per_param"] == budget
    code, out, err = run(capsys, *args, "-o", tmp_path / "c.compeft",
                         "--budget-bits-per-param", "0.001")
    assert code == 1
    one_line_error(err, "no candidate fits the budget")
    assert not (tmp_path / "c.compeft").exists()


def test_tune_failing_eval_command_names_the_candidate(tmp_path, capsys, pair):
    fail = f"{PY} -c 'import sys; print(\"cuda out of memory\", file=sys.stderr); sys.exit(3)'"
    code, out, err = run(capsys, "tune", pair[1], "--base", pair[0], "-o", tmp_path / "t.compeft",
                         "--eval", f"{fail} {{checkpoint}}", "--alphas", "0.9,1.1")
    assert code == 1
    one_line_error(err, "candidate density 0.1, alpha 0.9", "exit status 3", "cuda out of memory")
    assert out == ""
    assert not (tmp_path / "t.compeft").exists()


@pytest.mark.parametrize("printed", ["", "done", "score: nan", "accuracy: high"])
def test_tune_eval_command_without_a_number_stops(tmp_path, capsys, pair, printed):
    cmd = f"{PY} -c {shlex.quote(f'print({printed!r})')} {{checkpoint}}"
    code, _out, err = run(capsys, "tune", pair[1], "--base", pair[0], "-o", tmp_path / "t.compeft",
                         "--eval", cmd, "--alphas", "1")
    assert code == 1
    one_line_error(err, "candidate density 0.1, alpha 1")
    assert ("printed nothing" in err) if not printed else ("does not end with a finite number"
                                                           in err)
    assert not (tmp_path / "t.compeft").exists()


def test_tune_timeout(tmp_path, capsys, pair):
    cmd = f"{PY} -c 'import time; time.sleep(30)' {{checkpoint}}"
    code, _, err = run(capsys, "tune", pair[1], "--base", pair[0], "-o", tmp_path / "t.compeft",
                       "--eval", cmd, "--alphas", "1", "--timeout", "0.5")
    assert code == 1
    one_line_error(err, "timed out after 0.5 s")


def test_tune_existing_output_is_refused_before_any_evaluation(tmp_path, capsys, pair,
                                                                 evaluator):
    cmd, log = evaluator
    out_path = tmp_path / "t.compeft"
    out_path.write_bytes(b"keep me")
    code, _, err = run(capsys, "tune", pair[1], "--base", pair[0], "-o", out_path,
                       "--eval", cmd, "--alphas", "1")
    assert code == 1
    one_line_error(err, "exists", "--force")
    assert not log.exists()
    assert out_path.read_bytes() == b"keep me"
    code, _, err = run(capsys, "tune", pair[1], "--base", pair[0], "-o", out_path,
                       "--eval", cmd, "--alphas", "1", "--force")
    assert code == 0, err
    assert "tuning" in inspect(out_path).metadata


@pytest.mark.parametrize("argv", [
    ["--eval", "echo 1"],  # no {checkpoint}
    ["--eval", "echo {checkpoint}", "--alphas", "1,-2"],
    ["--eval", "echo {checkpoint}", "--densities", "0"],
    ["--eval", "echo {checkpoint}", "--budget-bits-per-param", "-1"],
    ["--eval", "echo {checkpoint}", "--scale", "max"],
    [],  # no --eval
])
def test_tune_usage_errors_exit_2(tmp_path, capsys, pair, argv):
    code, out, err = run(capsys, "tune", pair[1], "-o", tmp_path / "t.compeft", *argv)
    assert code == 2, err
    assert out == ""
    assert "error" in err
    assert "Traceback" not in err
    assert not (tmp_path / "t.compeft").exists()


def test_tune_table_output(tmp_path, capsys, pair, evaluator):
    cmd, _ = evaluator
    code, out, err = run(capsys, "tune", pair[1], "--base", pair[0], "-o", tmp_path / "t.compeft",
                         "--eval", cmd, "--alphas", "0.8,1.2")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["density", "alpha", "bytes", "bits/param", "score"]
    assert sum(line.startswith("*") for line in lines[1:3]) == 1
    assert any(line.startswith("chosen: density 0.1, alpha") for line in lines)
    assert any(line.startswith("compressed ") for line in lines)

