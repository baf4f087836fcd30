"""Misuse of the API and the command line found by review: each is refused, nothing is lost.

Every case here once went wrong: a file descriptor closed under its owner, a folder holding
the input deleted by ``--force``, NaN written by a merge, a float taken for a position...
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file as load_safetensors

import compeft_format as cf
from compeft_format.cli import main
from compeft_format.errors import ConvertError, EncodeError
from compeft_format.lora_scale import peft_scaling
from compeft_format.merge import MergeError, TensorMerge
from compeft_format.safetensors_io import open_safetensors, save_safetensors

T = cf.TernaryTensor
LORA = Path(__file__).parent / "data" / "lora-minilm-vader"


def _delta(path: Path) -> Path:
    rng = np.random.default_rng(0)
    save_safetensors({"w": rng.normal(size=(32, 32)).astype(np.float32)}, path)
    return path


# -- paths ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [True, None, 3.0, 0])
def test_a_path_that_is_not_one_is_a_type_error(tmp_path, bad):
    with pytest.raises(TypeError, match="takes a path"):
        cf.open_file(bad)
    with pytest.raises(TypeError, match="takes a path"):
        cf.load_file(bad)


def test_an_int_never_closes_the_callers_file_descriptor(tmp_path):
    p = tmp_path / "x.compeft"
    cf.save_file({"w": T((4,), [1], [True], 0.5)}, p)
    with open(p, "rb") as f:
        with pytest.raises(TypeError):
            cf.open_file(f.fileno())
        os.fstat(f.fileno())  # still open
        assert f.read(8) == b"\x89CPFT\r\n\x1a"


def test_load_file_takes_the_files_bytes_as_open_file_does():
    data = cf.dumps({"w": T((4,), [1], [True], 0.5), "d": np.arange(3.0)})
    got = cf.load_file(data)
    assert got["w"].to_numpy().tolist() == [0.0, -0.5, 0.0, 0.0]
    got["d"] += 1  # the caller's own, writeable
    assert got["d"].tolist() == [1.0, 2.0, 3.0]


def test_a_failed_save_names_the_users_path_not_the_temporary(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError) as exc:
        cf.save_file({"a": np.zeros(2)}, tmp_path / "d")
    assert exc.value.filename == str(tmp_path / "d")
    with pytest.raises(FileNotFoundError) as exc:
        cf.save_file({"a": np.zeros(2)}, tmp_path / "nodir" / "o.compeft")
    assert exc.value.filename == str(tmp_path / "nodir" / "o.compeft")
    assert sorted(os.listdir(tmp_path)) == ["d"]
    assert not os.listdir(tmp_path / "d")


# -- tensors ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("shape", "indices", "match"), [
    ((4,), [1.5, 2.9], "indices must be integers"),
    ((4,), [True], "indices must be integers"),
    ((4,), np.array([[1], [2]]), "indices must be flat"),
    ((4.9,), [], "dimensions must be integers"),
    ((-2,), [], "has a negative dimension"),
    ((2**63,), [], r"a dimension above 2\*\*63 - 1"),
])
def test_positions_and_dimensions_are_integers(shape, indices, match):
    signs = [False] * len(np.asarray(indices).reshape(-1))
    with pytest.raises(EncodeError, match=match):
        T(shape, indices, signs, 1.0)


def test_zeros_checks_its_shape():
    with pytest.raises(EncodeError, match="negative dimension"):
        T.zeros((-2, -3))
    assert T.zeros(np.array([2, 3])).shape == (2, 3)


def test_the_writer_refuses_what_default_readers_refuse():
    for n in (2**48 + 1, 2**60):  # 2**60 once divided by zero in the golomb parameter
        with pytest.raises(EncodeError, match=r"elements; limit 281474976710656"):
            cf.dumps({"x": T((n,), [0], [False], 1.0)})
    assert cf.loads(cf.dumps({"x": T((2**48,), [0], [False], 1.0)}))["x"].numel == 2**48


def test_meta_and_sparse_torch_tensors_are_refused():
    torch = pytest.importorskip("torch")
    with pytest.raises(EncodeError, match="meta device"):
        cf.dumps({"x": torch.empty(2, device="meta")})
    with pytest.raises(EncodeError, match="give it dense"):
        cf.compress({"x": torch.eye(3).to_sparse()}, density=0.5)


# -- merging ----------------------------------------------------------------------------------
def test_a_weight_beyond_float32_is_refused(tmp_path):
    for i in range(2):
        cf.save_file({"w": T((8,), [1, 3], [True, False], 0.5)}, tmp_path / f"{i}.compeft")
    ins = [tmp_path / "0.compeft", tmp_path / "1.compeft"]
    for out in ("o.safetensors", "o.compeft"):
        with pytest.raises(MergeError, match=r"weight 1e\+39 overflows float32"):
            cf.merge_files(ins, tmp_path / out, weights=[1e39, 1.0], method="sum")
    assert not (tmp_path / "o.safetensors").exists()
    assert not (tmp_path / "o.compeft").exists()


@pytest.mark.parametrize("out", ["o.safetensors", "o.compeft"])
def test_a_merge_that_overflows_is_refused_and_nothing_written(tmp_path, out):
    for i in range(2):
        cf.save_file({"w": T((8,), [1, 3], [True, False], 3e38)}, tmp_path / f"{i}.compeft")
    ins = [tmp_path / "0.compeft", tmp_path / "1.compeft"]
    with pytest.raises(MergeError, match="not finite in float32"):
        cf.merge_files(ins, tmp_path / out, method="sum")
    assert not (tmp_path / out).exists()
    # values as large that never meet merge fine
    cf.save_file({"w": T((8,), [5], [True], 3e38)}, tmp_path / "2.compeft")
    cf.merge_files([ins[0], tmp_path / "2.compeft"], tmp_path / "ok.safetensors", method="sum")
    got = load_safetensors(tmp_path / "ok.safetensors")["w"]
    assert np.isfinite(got).all()
    assert got[5] == np.float32(-3e38)


def test_the_dense_merge_path_refuses_overflow_too():
    big = np.full(4, 3e38, np.float32)
    with pytest.raises(MergeError, match="4 of 4 entries 0 to 3"):
        TensorMerge("w", (4,), "F32", [big, big], method="sum").to_numpy()


# -- the command line -------------------------------------------------------------------------
def test_force_never_replaces_a_folder_holding_an_input(tmp_path, capsys, monkeypatch):
    p = tmp_path / "p"
    shutil.copytree(LORA, p / "adp")
    (p / "precious.txt").write_text("x")
    assert main(["compress", str(p / "adp"), "-o", str(p), "-f", "-q"]) == 1
    assert "the output folder holds the input" in capsys.readouterr().err
    monkeypatch.chdir(p)
    assert main(["compress", "adp", "-o", ".", "-f", "-q"]) == 1
    assert "the output folder holds" in capsys.readouterr().err
    assert sorted(os.listdir(p)) == ["adp", "precious.txt"]  # nothing lost, no litter
    assert (p / "adp" / "adapter_model.safetensors").exists()


def test_force_never_replaces_a_folder_holding_folders(tmp_path, capsys):
    (tmp_path / "models" / "a").mkdir(parents=True)
    assert main(["compress", str(LORA), "-o", str(tmp_path / "models"), "-f", "-q"]) == 1
    assert "holds the folder a" in capsys.readouterr().err
    assert os.listdir(tmp_path / "models") == ["a"]
    # an output folder of compeft is replaced as before
    out = tmp_path / "out"
    assert main(["compress", str(LORA), "-o", str(out), "-q"]) == 0
    assert main(["compress", str(LORA), "-o", str(out), "-f", "-q", "--density", "0.05"]) == 0


def test_a_link_output_is_followed_never_replaced(tmp_path):
    src = _delta(tmp_path / "x.safetensors")
    (tmp_path / "real.compeft").write_bytes(b"old")
    (tmp_path / "link.compeft").symlink_to("real.compeft")
    assert main(["compress", str(src), "-o", str(tmp_path / "link.compeft"), "-f", "-q"]) == 0
    assert (tmp_path / "link.compeft").is_symlink()
    assert (tmp_path / "real.compeft").read_bytes()[:8] == b"\x89CPFT\r\n\x1a"
    # a link to a device is written through (-o /dev/stdout is one)
    (tmp_path / "null").symlink_to(os.devnull)
    assert main(["compress", str(src), "-o", str(tmp_path / "null"), "-f", "-q"]) == 0
    assert (tmp_path / "null").is_symlink()


def test_an_output_name_of_legal_length_is_written(tmp_path):
    src = _delta(tmp_path / ("b" * 235 + ".safetensors"))
    assert main(["compress", str(src), "-q"]) == 0
    assert (tmp_path / ("b" * 235 + ".compeft")).exists()
    assert main(["decompress", str(tmp_path / ("b" * 235 + ".compeft")), "-o",
                 str(tmp_path / ("c" * 240 + ".safetensors")), "-q"]) == 0


@pytest.mark.parametrize(("key", "value", "match"), [
    ("lora_alpha", None, "lora_alpha of .* must be a finite number, got None"),
    ("lora_alpha", "abc", "lora_alpha of .* must be a finite number, got 'abc'"),
    ("alpha_pattern", {"[": 4}, "alpha_pattern key '\\[' is not a regular expression"),
    ("alpha_pattern", [1], "alpha_pattern must be an object"),
])
def test_bad_adapter_config_values_are_one_line_errors(tmp_path, capsys, key, value, match):
    adapter = tmp_path / "adp"
    shutil.copytree(LORA, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config[key] = value
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    # density 0.01: the default scale weighs the modules by PEFT's scaling
    assert main(["compress", str(adapter), "-o", str(tmp_path / "o"), "--density", "0.01",
                 "-q"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "adapter_config.json" in err

    assert re.search(match, err), err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConvertError):
        peft_scaling(config, "m.lora_A.weight", 8)


def test_negative_weights_as_the_help_writes_them(tmp_path, capsys):
    src = _delta(tmp_path / "x.safetensors")
    assert main(["compress", str(src), "-o", str(tmp_path / "a.compeft"), "-q"]) == 0
    shutil.copy(tmp_path / "a.compeft", tmp_path / "b.compeft")
    assert main(["merge", str(tmp_path / "a.compeft"), str(tmp_path / "b.compeft"), "-o",
                 str(tmp_path / "m.safetensors"), "--method", "sum", "--weights", "-1,0.5",
                 "-q"]) == 0
    a = cf.load_file(tmp_path / "a.compeft")["w"].to_numpy()
    got = load_safetensors(tmp_path / "m.safetensors")["w"]
    np.testing.assert_allclose(got, -0.5 * a, rtol=1e-6)


def test_decompress_to_a_narrower_dtype_refuses_an_overflow(tmp_path, capsys):
    w = (np.random.default_rng(0).normal(size=(16, 16)) * 1e6).astype(np.float32)
    save_safetensors({"w": w}, tmp_path / "big.safetensors")
    cf.compress_file(tmp_path / "big.safetensors", tmp_path / "big.compeft")
    out = tmp_path / "o.safetensors"
    assert main(["decompress", str(tmp_path / "big.compeft"), "-o", str(out), "--dtype", "f16",
                 "-q"]) == 1
    assert "tensor 'w': 26 values overflow F16" in capsys.readouterr().err
    assert not out.exists()
    cf.decompress_file(tmp_path / "big.compeft", out, dtype="bf16")  # bf16 holds 1e6
    with open_safetensors(out) as r:
        assert np.isfinite(r.values("w")).all()


def test_merge_files_takes_a_sequence_not_one_path(tmp_path):
    with pytest.raises(TypeError, match="one path"):
        cf.merge_files(str(tmp_path / "a.compeft"), tmp_path / "o.compeft")


def test_quality_report_refuses_non_finite_originals():
    t = T((4,), [0], [False], 1.0)
    for bad in (np.inf, np.nan):
        with pytest.raises(EncodeError, match="NaN or infinity"):
            cf.quality_report({"a": np.array([bad, 0, 0, 0])}, {"a": t})


def test_extra_metadata_keys_are_strings(tmp_path):
    src = _delta(tmp_path / "x.safetensors")
    with pytest.raises(EncodeError, match="keys must be strings"):
        cf.compress_file(src, tmp_path / "o.compeft", extra_metadata={1: 2})
    assert not (tmp_path / "o.compeft").exists()


def test_messages_say_where(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _delta(tmp_path / "x.safetensors")
    a = np.ones((4, 4), np.float32)
    a[0, 0] = np.nan
    save_safetensors({"w": a}, tmp_path / "nan.safetensors")
    cases = [
        (["decompress", "nonexist"], 1, "nonexist: No such file or directory"),
        (["compress", "x.safetensors", "-o", "nodir/x.compeft"], 1,
         "nodir/x.compeft: cannot write there: nodir is not a directory (it does not exist)"),
        (["compress", "nan.safetensors", "-q"], 1,
         "nan.safetensors: tensor 'w': value nan at flat index 0 is not finite"),
        (["merge", "-", "x.compeft", "-o", "m.compeft"], 2, "stdin (-) is not an input"),
        (["sweep", "-"], 2, "stdin (-) is not an input"),
    ]
    if os.path.exists("/dev/full"):
        cases.append((["compress", "x.safetensors", "-o", "/dev/full", "-f"], 1,
                      "/dev/full: No space left on device"))
    for argv, status, text in cases:
        assert main(argv) == status, argv
        err = capsys.readouterr().err
        assert text in err, (argv, err)
        assert err.count("\n") == 1, err


def test_info_json_has_an_entry_for_every_file(tmp_path, capsys):
    good = tmp_path / "g.compeft"
    cf.save_file({"w": T((4,), [1], [True], 0.5)}, good)
    assert main(["info", str(good), str(tmp_path / "missing.compeft"), "--json"]) == 1
    docs = json.loads(capsys.readouterr().out)
    assert [d["file"] for d in docs] == [str(good), str(tmp_path / "missing.compeft")]
    assert "No such file" in docs[1]["error"]
    assert "error" not in docs[0]


def test_merge_refuses_compression_options_for_a_dense_output(tmp_path):
    for i in range(2):
        cf.save_file({"w": T((8,), [1, 3], [True, False], 0.5)}, tmp_path / f"{i}.compeft")
    with pytest.raises(MergeError, match=r"density \(--density\) applies to a \.compeft output"):
        cf.merge_files([tmp_path / "0.compeft", tmp_path / "1.compeft"],
                       tmp_path / "o.safetensors", density=0.5)


def test_a_file_in_the_way_of_an_output_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _delta(tmp_path / "x.safetensors")
    (tmp_path / "afile").write_text("x")
    for argv, text in ((["compress", "x.safetensors", "-o", "afile/", "-q"],
                        "afile/: it exists and is not a folder"),
                       (["demo", "--keep", "afile/sub", "-q"],
                        "afile/sub: afile exists and is not a folder")):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert text in err, err
    assert (tmp_path / "afile").read_text() == "x"


def test_misused_arguments_are_type_errors():
    import io

    data = cf.dumps({"w": T((4,), [1], [True], 0.5)})
    for call, text in ((lambda: cf.loads(data, limits=None), "limits must be a ReadLimits"),
                       (lambda: cf.open_file(data, limits=3), "limits must be a ReadLimits"),
                       (lambda: list(cf.iter_stream(data)), "binary stream"),
                       (lambda: list(cf.iter_stream(io.StringIO("abc"))), "this one is text"),
                       (lambda: cf.compress([np.ones(3)], density=0.5), "mapping")):
        with pytest.raises(TypeError, match=text):
            call()


def test_info_and_verify_never_read_a_terminal(capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    for command in ("info", "verify"):
        assert main([command, "-"]) == 2
        err = capsys.readouterr().err
        assert "stdin is a terminal" in err, err
        assert err.count("\n") == 1, err


def test_a_bad_peft_init_seed_is_a_usage_error(tmp_path, capsys):
    src = _delta(tmp_path / "x.safetensors")
    assert main(["compress", str(src), "--base", "peft-init:abc", "-o",
                 str(tmp_path / "y.compeft")]) == 2
    err = capsys.readouterr().err
    assert "the seed must be an integer" in err, err
    assert not (tmp_path / "y.compeft").exists()


def test_verify_checks_a_compressed_adapters_config(tmp_path, capsys):
    out = tmp_path / "adp"
    assert main(["compress", str(LORA), "-o", str(out), "-q"]) == 0
    assert main(["verify", str(out)]) == 0
    capsys.readouterr()
    (out / "adapter_config.json").write_text("{not json")
    assert main(["verify", str(out)]) == 1
    assert "adapter_config.json: not valid JSON" in capsys.readouterr().out
    (out / "adapter_config.json").write_text("[1]")
    assert main(["verify", str(out), "--json"]) == 1
    assert "not a JSON object" in json.loads(capsys.readouterr().out)["error"]


def test_a_scale_that_is_no_float_is_an_encode_error():
    for bad in (10**400, None, "x"):
        with pytest.raises(EncodeError, match="scale must be a finite non-negative number"):
            T((4,), [1], [True], bad)


def test_merge_and_compress_takes_a_sequence_of_mappings():
    with pytest.raises(TypeError, match="sequence of task vectors"):
        cf.merge_and_compress({"w": np.ones(3)}, density=0.5)


def test_decompress_bf16_to_f16_refuses_an_overflow_too(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    save_torch({"w": torch.full((4,), 1e6, dtype=torch.bfloat16)}, str(tmp_path / "b.safetensors"))
    cf.compress_file(tmp_path / "b.safetensors", tmp_path / "b.compeft", exclude="w")
    with pytest.raises(ConvertError, match="tensor 'w': 4 values overflow F16"):
        cf.decompress_file(tmp_path / "b.compeft", tmp_path / "o.safetensors", dtype="f16")
    assert not (tmp_path / "o.safetensors").exists()
