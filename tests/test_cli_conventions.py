"""The ``compeft`` command as users of zstd and gzip expect it (issue 15, points 4 to 8).

``-`` for stdin and stdout byte for byte, default output names beside the input, several
INPUTs with ``-o DIR/`` and ``-j``, ``-f``, ``-V`` everywhere, ``-q``/``-v``/``--json``,
no abbreviations, usage errors naming the subcommand's help, no Python parameter names in
messages, the note on a relative error above 1, ``demo --keep``, tune's tie rule.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from cli_helpers import one_line_error, run

from compeft_format import inspect
from compeft_format.cli import COMMAND_MODULES, main, parser
from compeft_format.cli.files import default_output

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
LORA = DATA / "lora-minilm-vader"
IA3 = DATA / "ia3-minilm-vader"
COMMANDS = sorted(parser()._subparsers._group_actions[0].choices)  # every subcommand


def _save(path: Path, seed: int, shape: tuple[int, ...] = (40, 24)) -> Path:
    rng = np.random.default_rng(seed)
    safetensors.numpy.save_file({"w": rng.normal(size=shape).astype(np.float32),
                                 "b": rng.normal(size=shape[-1]).astype(np.float16),
                                 "ids": np.arange(5)}, path)
    return path


@pytest.fixture
def model(tmp_path) -> Path:
    return _save(tmp_path / "model.safetensors", 0)


def _cli(*argv: object, stdin: bytes | None = None, cwd: Path | None = None,
         ) -> subprocess.CompletedProcess:
    """``python -m compeft_format ARGV`` in a real process (stdin and stdout are pipes)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "compeft_format", *map(str, argv)],
                          input=stdin if stdin is not None else b"", capture_output=True,
                          env=env, cwd=cwd, timeout=300, check=False)


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---------------------------------------------------------------------------------------------
# 4. - reads stdin, -o - and -c write stdout, byte for byte; the summary goes to stderr
# ---------------------------------------------------------------------------------------------
def test_stdin_and_stdout_hold_the_files_bytes(tmp_path, model):
    assert main(["compress", str(model), "-o", str(tmp_path / "file.compeft"), "-q"]) == 0
    want = (tmp_path / "file.compeft").read_bytes()
    for argv, stdin in ((["compress", model, "-o", "-"], None),
                        (["compress", model, "-c"], None),
                        (["compress", model, "--stdout"], None),
                        (["compress", "-", "-o", "-"], model.read_bytes()),
                        (["compress", "-"], model.read_bytes())):  # stdin alone: to stdout
        proc = _cli(*argv, stdin=stdin, cwd=tmp_path)
        assert proc.returncode == 0, (argv, proc.stderr)
        assert proc.stdout == want, argv
        err = proc.stderr.decode()
        assert err.startswith("compressed "), argv  # the summary, on stderr
        assert "<stdout>" in err
        assert ("<stdin>" in err) == (stdin is not None)
    # stdin to a file: the same bytes as from the file
    proc = _cli("compress", "-", "-o", tmp_path / "from-stdin.compeft", stdin=model.read_bytes())
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "from-stdin.compeft").read_bytes() == want
    assert proc.stdout.decode().startswith("compressed <stdin> -> ")
    # and back: decompress from stdin to stdout gives the file decompress writes
    assert main(["decompress", str(tmp_path / "file.compeft"), "-o",
                 str(tmp_path / "back.safetensors"), "-q"]) == 0
    proc = _cli("decompress", "-", "-c", stdin=want)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (tmp_path / "back.safetensors").read_bytes()
    assert proc.stderr.decode().startswith("decompressed <stdin> -> <stdout>")
    # an error names stdin, not the temporary file behind it; stdout gets nothing
    proc = _cli("compress", "-", "-c", stdin=b"not a safetensors file")
    assert proc.returncode == 1
    assert proc.stdout == b""
    assert proc.stderr.decode().startswith("compeft: error: <stdin>: "), proc.stderr
    assert "compeft-stdio" not in proc.stderr.decode()
    # --json with the data on stdout: the document goes to stderr
    proc = _cli("compress", model, "-c", "--json")
    assert proc.stdout == want
    assert json.loads(proc.stderr)["output"] == "<stdout>"
    # nothing is left behind in the folder or in TMPDIR's stdio folders
    assert _listing(tmp_path) == sorted(["model.safetensors", "file.compeft",
                                         "from-stdin.compeft", "back.safetensors"])


def test_stdout_refusals(tmp_path, capsys, monkeypatch, model):
    # an adapter folder has no single byte stream
    code, _out, err = run(capsys, "compress", IA3, "-c")
    assert code == 1
    one_line_error(err, "cannot be written to stdout")
    # several INPUTs to stdout, or - among several INPUTs: usage errors before any work
    for argv in (["compress", model, model, "-c"], ["compress", model, "-", "-o", "x/"],
                 ["compress", model, "-c", "-o", "x.compeft"]):
        code, _, err = run(capsys, *argv)
        assert code == 2, argv
        one_line_error(err, "(see compeft compress --help)")
    # binary data is never written to a terminal, nor read from one (as zstd)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    code, _, err = run(capsys, "compress", model, "-c")
    assert code == 2
    one_line_error(err, "stdout is a terminal")
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    code, _, err = run(capsys, "decompress", "-", "-o", tmp_path / "x.safetensors")
    assert code == 2
    one_line_error(err, "stdin is a terminal")
    assert _listing(tmp_path) == ["model.safetensors"]


# ---------------------------------------------------------------------------------------------
# 5. default output names beside the input; an existing output needs -f
# ---------------------------------------------------------------------------------------------
def test_default_names_beside_the_input(tmp_path, capsys, model):
    code, out, err = run(capsys, "compress", model)
    assert code == 0, err
    assert f"-> {tmp_path / 'model.compeft'}" in out
    inspect(tmp_path / "model.compeft")
    first = (tmp_path / "model.compeft").read_bytes()
    code, _, err = run(capsys, "compress", model, "--density", "0.5")
    assert code == 1
    one_line_error(err, "model.compeft: the output exists; use --force to replace it")
    assert (tmp_path / "model.compeft").read_bytes() == first
    code, _, err = run(capsys, "compress", model, "--density", "0.5", "-f")
    assert code == 0, err
    assert (tmp_path / "model.compeft").read_bytes() != first
    # decompress names x.compeft -> x.safetensors: here the original, so refused without -f
    before = model.read_bytes()
    code, _, err = run(capsys, "decompress", tmp_path / "model.compeft")
    assert code == 1
    one_line_error(err, "model.safetensors: the output exists; use --force")
    assert model.read_bytes() == before
    (tmp_path / "sub").mkdir()
    shutil.copy(tmp_path / "model.compeft", tmp_path / "sub" / "m.compeft")
    assert run(capsys, "decompress", tmp_path / "sub" / "m.compeft")[0] == 0
    assert _listing(tmp_path / "sub") == ["m.compeft", "m.safetensors"]
    # a name that does not end in .compeft cannot be named for decompress
    code, _, err = run(capsys, "decompress", model)
    assert code == 1
    one_line_error(err, "does not end in .compeft; give one with -o")


def test_default_names_of_folders(tmp_path, capsys):
    adapter = tmp_path / "ia3"
    shutil.copytree(IA3, adapter)
    code, _, err = run(capsys, "compress", adapter)
    assert code == 0, err
    assert (tmp_path / "ia3.compeft" / "adapter_model.compeft").is_file()
    shutil.move(tmp_path / "ia3.compeft", tmp_path / "copy.compeft")
    code, _out, err = run(capsys, "decompress", tmp_path / "copy.compeft")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "copy")) == ["adapter_config.json",
                                                    "adapter_model.safetensors"]
    assert default_output("a/b.safetensors", "compress") == "a/b.compeft"
    assert default_output("a/b.bin", "compress") == "a/b.bin.compeft"
    assert default_output("a/b.compeft", "decompress") == "a/b.safetensors"


# ---------------------------------------------------------------------------------------------
# 6. several INPUTs, -o DIR/, -j N
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_several_inputs_into_a_folder(tmp_path, capsys, jobs):
    srcs = [_save(tmp_path / f"m{i}.safetensors", i) for i in range(3)]
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "compress", *srcs, "-o", f"{out}/", "-j", jobs, "--json")
    assert code == 0, err
    docs = json.loads(stdout)
    assert [Path(d["output"]).name for d in docs] == ["m0.compeft", "m1.compeft", "m2.compeft"]
    for i, src in enumerate(srcs):  # the bytes of compressing each alone
        assert run(capsys, "compress", src, "-o", tmp_path / f"alone{i}.compeft")[0] == 0
        assert (out / f"m{i}.compeft").read_bytes() == (
            tmp_path / f"alone{i}.compeft").read_bytes()
    back = tmp_path / "back"
    code, stdout, err = run(capsys, "decompress", *sorted(out.iterdir()), "-o", back, "-j", jobs)
    assert code == 0, err
    assert stdout.count("decompressed ") == 3
    assert sorted(os.listdir(back)) == ["m0.safetensors", "m1.safetensors", "m2.safetensors"]
    # info on several files, text and JSON
    code, stdout, _ = run(capsys, "info", *sorted(out.iterdir()), "--json")
    assert code == 0
    assert [Path(d["file"]).name for d in json.loads(stdout)] == [
        "m0.compeft", "m1.compeft", "m2.compeft"]
    code, stdout, _ = run(capsys, "info", *sorted(out.iterdir()))
    assert code == 0
    assert stdout.count(": compeft 1.") == 3


def test_a_failing_input_does_not_stop_the_others(tmp_path, capsys, model):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors at all")
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "compress", bad, model, "-o", out, "--json")
    assert code == 1
    one_line_error(err, "bad.safetensors")
    docs = json.loads(stdout)
    assert "error" in docs[0]
    assert docs[1]["output"] == str(out / "model.compeft")
    assert sorted(os.listdir(out)) == ["model.compeft"]
    # two INPUTs that would write the same output: refused before any work
    (tmp_path / "a").mkdir()
    twin = shutil.copy(model, tmp_path / "a" / "model.safetensors")
    code, _, err = run(capsys, "compress", model, twin, "-o", tmp_path / "twins/")
    assert code == 1
    one_line_error(err, "would be written there")
    assert not (tmp_path / "twins").exists()
    code, _, err = run(capsys, "compress", model, "-j", "-1")
    assert code == 2
    one_line_error(err, "--jobs")


# ---------------------------------------------------------------------------------------------
# 7. -f, -V, -q, -v, --json, help texts, no abbreviations, usage errors, option names
# ---------------------------------------------------------------------------------------------
def test_every_subcommand_has_the_common_options(capsys):
    assert {"compress", "decompress", "info", "verify", "demo", "sweep", "tune"} <= set(COMMANDS)
    assert len(COMMAND_MODULES) >= 4
    for cmd in COMMANDS:
        code, out, _ = run(capsys, cmd, "--help")
        assert code == 0, cmd
        # make a subcommand's parser with cli.options.add_command, and give it add_verbose
        assert "-V, --version" in out, cmd
        assert "-v, --verbose" in out, cmd
        for argv in ([cmd, "-V"], [cmd, "--version"], ["-V"]):
            code, out, _ = run(capsys, *argv)
            assert code == 0, argv
            assert out.startswith("compeft 0."), argv
            assert "(format 1." in out, argv
    for cmd in ("compress", "decompress", "sweep", "tune", "demo"):
        out = run(capsys, cmd, "--help")[1]
        assert "-f, --force" in out, cmd
        assert "-q, --quiet" in out, cmd
    for cmd in ("compress", "decompress", "verify", "info", "sweep", "tune"):
        assert "--json" in run(capsys, cmd, "--help")[1], cmd
    for cmd in ("compress", "decompress"):
        out = " ".join(run(capsys, cmd, "--help")[1].split())
        assert "INPUT a .safetensors file" in out or "INPUT a .compeft file" in out, cmd
        assert "-o OUTPUT, --output OUTPUT the" in out, cmd
        assert "-c, --stdout" in out, cmd
        assert "-j N, --jobs N" in out, cmd


@pytest.mark.parametrize(("argv", "helps"), [
    (["compress", "m.safetensors", "--dens", "0.2"], "compress"),  # never abbreviated
    (["compress", "m.safetensors", "--bogus"], "compress"),
    (["decompress", "x.compeft", "--dtyp", "f16"], "decompress"),
    (["sweep", "m.safetensors", "--densit", "0.1"], "sweep"),
    (["tune", "m", "-o", "o", "--eval", "true"], "tune"),  # no {checkpoint}
    (["info"], "info"),
    (["--vers"], None),
])
def test_usage_errors_name_the_subcommands_help(capsys, argv, helps):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    prog = "compeft" if helps is None else f"compeft {helps}"
    one_line_error(err, f"{prog}: error: ", f"(see {prog} --help)")


def test_quiet_verbose_and_json(tmp_path, capsys, model):
    code, out, err = run(capsys, "compress", model, "-o", tmp_path / "a.compeft", "-q")
    assert (code, out, err) == (0, "", "")
    code, out, err = run(capsys, "decompress", tmp_path / "a.compeft", "-o",
                         tmp_path / "a.safetensors", "-q")
    assert (code, out, err) == (0, "", "")
    code, out, _ = run(capsys, "decompress", tmp_path / "a.compeft", "-o",
                       tmp_path / "b.safetensors", "-v")
    assert code == 0
    assert "\n  w    F32   [40,24]\n" in out
    assert "\n  ids  I64   [5]\n" in out
    code, out, _ = run(capsys, "compress", model, "-o", tmp_path / "c.compeft", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["file_bytes"] == os.path.getsize(tmp_path / "c.compeft")
    assert d["output"] == str(tmp_path / "c.compeft")
    code, out, _ = run(capsys, "decompress", tmp_path / "c.compeft", "-o",
                       tmp_path / "c.safetensors", "--json")
    assert code == 0
    assert json.loads(out)["file_bytes"] == os.path.getsize(tmp_path / "c.safetensors")
    code, out, _ = run(capsys, "verify", tmp_path / "a.compeft", "--json")
    assert code == 0
    assert json.loads(out) == {"file": str(tmp_path / "a.compeft"), "ok": True, "tensors": 3,
                               "bytes": os.path.getsize(tmp_path / "a.compeft")}
    bad = tmp_path / "bad.compeft"
    bad.write_bytes((tmp_path / "a.compeft").read_bytes()[:-5])
    code, out, _ = run(capsys, "verify", tmp_path / "a.compeft", bad, "--json")
    assert code == 1
    docs = json.loads(out)
    assert [d["ok"] for d in docs] == [True, False]
    assert docs[1]["error"]
    code, out, _ = run(capsys, "verify", tmp_path / "a.compeft", bad, "-q")
    assert code == 1
    assert out.startswith(f"{bad}: FAILED")
    assert out.count("\n") == 1
    code, out, _ = run(capsys, "verify", tmp_path / "a.compeft", "-v")
    assert out.splitlines()[1:] == ["  b: OK", "  ids: OK", "  w: OK"]
    code, out, _ = run(capsys, "info", tmp_path / "a.compeft", "-v")
    assert '"compeft.compression"' in out  # the metadata, as JSON


def test_messages_name_options_not_python_parameters(tmp_path, capsys):
    assert run(capsys, "compress", LORA, "-o", tmp_path / "c", "--base", LORA / "init")[0] == 0
    for argv in (["compress", LORA, "-o", tmp_path / "c"],
                 ["decompress", tmp_path / "c", "-o", tmp_path / "r"]):
        code, _, err = run(capsys, *argv)
        assert code == 1
        one_line_error(err)
        assert "=" not in err, err  # no "(force=True)", no "(base=)"
    assert "--force" in run(capsys, "compress", LORA, "-o", tmp_path / "c")[2]
    assert "--base" in run(capsys, "decompress", tmp_path / "c", "-o", tmp_path / "r")[2]


# ---------------------------------------------------------------------------------------------
# 8. the relative error above 1, demo --keep, progress counts tensors, tune's tie rule
# ---------------------------------------------------------------------------------------------
def test_a_relative_error_above_one_is_explained(tmp_path, capsys, model):
    code, out, _ = run(capsys, "compress", model, "-o", tmp_path / "a.compeft")
    assert code == 0
    rel = float(out.split("rel. error ")[1].split(",")[0])
    assert rel > 1  # proj_vcap at density 0.1 on a random tensor
    assert "(above 1 is expected: the kept entries are scaled up" in out
    code, out, _ = run(capsys, "compress", model, "-o", tmp_path / "b.compeft", "--scale", "l2")
    assert code == 0
    assert float(out.split("rel. error ")[1].split(",")[0]) <= 1  # least squares: never
    assert "above 1 is expected" not in out


def test_demo_keeps_its_files_with_keep(tmp_path, capsys):
    keep = tmp_path / "kept"
    code, out, err = run(capsys, "demo", "--keep", keep)
    assert code == 0, err
    assert f"The restored folder {keep / 'restored'} is a PEFT adapter" in " ".join(out.split())
    assert sorted(os.listdir(keep / "restored")) == ["adapter_config.json",
                                                    "adapter_model.safetensors"]
    assert (keep / "compressed" / "adapter_model.compeft").is_file()
    code, _, err = run(capsys, "demo", "--keep", keep)
    assert code == 1
    one_line_error(err, "use --force")
    assert run(capsys, "demo", "--keep", keep, "-f", "-q") == (0, "", "")
    code, out, err = run(capsys, "demo", "-q")
    assert (code, out, err) == (0, "", "")
    code, out, _ = run(capsys, "demo")
    assert "give --keep DIR to keep it" in " ".join(out.split())


def test_the_progress_bar_counts_tensors(tmp_path, capsys, monkeypatch):
    srcs = [_save(tmp_path / "m.safetensors", 0)]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    code, out, err = run(capsys, "compress", srcs[0], "-o", tmp_path / "a.compeft")
    assert code == 0
    assert out.startswith("compressed ")  # stdout holds the summary only
    # 2 float tensors compressed, read in 5 passes: the bar counts to 2, pass by pass
    assert "compress (pass 1/5)" in err, err
    totals = set(re.findall(r"\| *\d+/(\d+) \[", err))
    assert totals == {"2"}, err
    code, out, err = run(capsys, "decompress", tmp_path / "a.compeft", "-o",
                         tmp_path / "a.safetensors")
    assert code == 0
    assert set(re.findall(r"\| *\d+/(\d+) \[", err)) == {"3"}  # the integer one too
