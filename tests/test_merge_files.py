"""merge_files and ``compeft merge``: compressed experts merged straight from their files."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
import transformers
from cli_helpers import one_line_error, run
from test_merge import peft_merge

import compeft_format as cf
import compeft_format.merge as M
from compeft_format import TernaryTensor
from compeft_format.cli import main
from compeft_format.merge import MergeError, merge
from compeft_format.merge_compress import merge_and_compress
from compeft_format.merge_io import merge_files
from compeft_format.safetensors_io import open_safetensors, save_safetensors
from compeft_format.taskvec import apply_task_vector

DATA = Path(__file__).parent / "data"
LORA = DATA / "lora-minilm-vader"
IA3 = DATA / "ia3-minilm-vader"


def _decoded(path: Path) -> dict[str, TernaryTensor]:
    """The records of a compeft file (or compressed adapter directory)."""
    return cf.load_file(path / "adapter_model.compeft" if path.is_dir() else path)


def _values(path: Path) -> dict[str, np.ndarray]:
    with open_safetensors(path) as r:
        return {n: np.array(r.values(n)) for n in r}


# ---------------------------------------------------------------------------------------------
# experts: the real adapters of tests/data, compressed at several densities
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> dict[str, list[Path]]:
    d = tmp_path_factory.mktemp("experts")
    out: dict[str, list[Path]] = {"lora": [], "lora_init": [], "ia3": []}
    for density in (0.05, 0.1, 0.2):
        out["lora"].append(d / f"lora-{density}")
        cf.compress_file(LORA, out["lora"][-1], density=density)
        out["lora_init"].append(d / f"lora-init-{density}")
        cf.compress_file(LORA, out["lora_init"][-1], density=density, base=LORA / "init")
    for density in (0.1, 0.2):
        out["ia3"].append(d / f"ia3-{density}")
        cf.compress_file(IA3, out["ia3"][-1], density=density, scope="tensor")
    return out


def test_real_adapters_to_safetensors_equal_peft(experts, tmp_path):
    ins = experts["lora"]
    for method in M.METHODS:
        s = merge_files(ins, tmp_path / f"{method}.safetensors", method=method,
                        weights=[1, 0.5, 2])
        assert s.form == "safetensors"
        assert s.merged == s.tensors
        got = _values(tmp_path / f"{method}.safetensors")
        inputs = [_decoded(p) for p in ins]
        want = merge(inputs, method=method, weights=[1, 0.5, 2])
        assert sorted(got) == sorted(want)
        for name, w in want.items():
            np.testing.assert_array_equal(got[name], w)
            ref = peft_merge([t[name].to_numpy() for t in inputs], [1, 0.5, 2], method)
            np.testing.assert_allclose(got[name], ref, rtol=1e-6, atol=1e-9)


def test_adapter_directory_out_loads_in_peft(experts, tmp_path):
    """LoRA from zero: the merged adapter is the merged task vector; PEFT loads it."""
    out = tmp_path / "merged"
    assert main(["merge", *map(str, experts["lora"]), "-o", str(out), "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json",
                                                     "adapter_model.safetensors"]
    assert (out / "adapter_config.json").read_bytes() == (
        experts["lora"][0] / "adapter_config.json").read_bytes()
    want = merge([_decoded(p) for p in experts["lora"]])
    got = _values(out / "adapter_model.safetensors")
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_ia3_gets_its_one_back(experts, tmp_path):
    out = tmp_path / "ia3"
    s = merge_files(experts["ia3"], out, method="mean")
    assert s.form == "adapter"
    want = merge([_decoded(p) for p in experts["ia3"]], method="mean")
    got = _values(out / "adapter_model.safetensors")
    for name in want:
        np.testing.assert_array_equal(got[name], np.float32(1) + want[name])


def test_checkpoint_reference_needs_its_base(experts, tmp_path, capsys):
    ins = experts["lora_init"]
    code, _, err = run(capsys, "merge", *ins, "-o", tmp_path / "m", "-q")
    assert code == 1
    one_line_error(err, "measured from the base", "--base")
    assert not (tmp_path / "m").exists()
    code, out, _ = run(capsys, "merge", *ins, "-o", tmp_path / "m", "--base", LORA / "init")
    assert code == 0
    assert "merged 3 inputs" in out
    merged = merge([_decoded(p) for p in ins])
    init = _values(LORA / "init" / "adapter_model.safetensors")
    want = apply_task_vector(init, merged)
    got = _values(tmp_path / "m" / "adapter_model.safetensors")
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    # a different base is refused by its hashes
    code, _, err = run(capsys, "merge", *ins, "-o", tmp_path / "m2", "--base", LORA, "-q")
    assert code == 1
    one_line_error(err, "differs from the base")


def test_compeft_out_recompresses_and_keeps_the_binding(experts, tmp_path):
    ins = experts["lora_init"]
    dst = tmp_path / "m.compeft"
    s = merge_files(ins, dst, sign="frequency", weights=[1, 1, 0.5])
    assert s.form == "compeft"
    assert s.density == 0.2  # the largest input density
    inputs = [_decoded(p) for p in ins]
    want = merge_and_compress(inputs, density=0.2, sign="frequency", weights=[1, 1, 0.5])
    got = cf.load_file(dst)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name]
    with cf.open_file(dst) as f:
        meta = f.metadata()
    with cf.open_file(ins[0] / "adapter_model.compeft") as f:
        meta0 = f.metadata()
    assert meta["task_vector"] == meta0["task_vector"]
    assert meta["compeft.base"] == meta0["compeft.base"]
    assert meta["merge"]["method"] == "ties"
    assert meta["merge"]["sign"] == "frequency"
    assert meta["compeft.compression"]["density"] == 0.2
    # decompressing with the base gives base + the compressed merge
    cf.decompress_file(dst, tmp_path / "full.safetensors", base=LORA / "init")
    init = _values(LORA / "init" / "adapter_model.safetensors")
    expect = apply_task_vector(init, want)
    full = _values(tmp_path / "full.safetensors")
    for name in expect:
        np.testing.assert_array_equal(full[name], expect[name])


def test_compeft_out_density_option(experts, tmp_path, capsys):
    code, out, _ = run(capsys, "merge", *experts["lora"][:2], "-o", tmp_path / "m.compeft",
                       "--density", "0.03", "--method", "sum")  # no -q: it silences the summary
    assert code == 0
    assert "density 0.03" in out
    got = cf.load_file(tmp_path / "m.compeft")
    numel = sum(t.numel for t in got.values())
    assert sum(t.nnz for t in got.values()) == round(0.03 * numel)


# ---------------------------------------------------------------------------------------------
# a tiny BERT: merged adapters through PEFT
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bert() -> torch.nn.Module:
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, vocab_size=100,
                                     max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def _adapter(base, config, seed: int, path: Path, scale: float) -> None:
    model = peft.get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_merged_adapter_runs_in_peft(tiny_bert, tmp_path, kind):
    if kind == "lora":
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                 lora_dropout=0.0)
    else:
        config = peft.IA3Config(target_modules=["key", "value", "output.dense"],
                                feedforward_modules=["output.dense"])
    ins = []
    for i in range(3):
        _adapter(tiny_bert, config, i, tmp_path / f"a{i}", 0.1)
        assert main(["compress", str(tmp_path / f"a{i}"), "-o", str(tmp_path / f"c{i}"),
                     "--density", "0.3", "-q"]) == 0
        ins.append(str(tmp_path / f"c{i}"))
    assert main(["merge", *ins, "-o", str(tmp_path / "merged"), "-q"]) == 0
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_bert), tmp_path / "merged")
    merged = merge([_decoded(Path(p)) for p in ins])
    one = 1.0 if kind == "ia3" else 0.0
    expected = peft.get_peft_model(copy.deepcopy(tiny_bert), config)
    peft.set_peft_model_state_dict(
        expected, {k: torch.from_numpy(one + v) for k, v in merged.items()})
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = loaded.eval()(input_ids=ids).last_hidden_state
        want = expected.eval()(input_ids=ids).last_hidden_state
        plain = tiny_bert(input_ids=ids).last_hidden_state
    assert torch.equal(got, want)
    assert not torch.allclose(got, plain)


# ---------------------------------------------------------------------------------------------
# plain task-vector files
# ---------------------------------------------------------------------------------------------
def _tv_files(tmp_path: Path, n: int = 3, dtype: str = "F32", ids: bool = True) -> list[Path]:
    """Task vectors from zero (no metadata): a ternary "a" and, with ``ids``, an int tensor."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        idx = np.flatnonzero(rng.random(1200) < 0.2)
        tensors = {"a": TernaryTensor((40, 30), idx, rng.random(idx.size) < 0.5,
                                      0.1 * (i + 1), dtype)}
        if ids:
            tensors["ids"] = np.arange(5, dtype=np.int64)
        paths.append(tmp_path / f"tv{i}.compeft")
        cf.save_file(tensors, paths[-1])
    return paths


def test_task_vector_files_and_a_base(tmp_path):
    ins = _tv_files(tmp_path, dtype="BF16")
    s = merge_files(ins, tmp_path / "m.safetensors", method="sum")
    assert (s.merged, s.copied) == (1, 1)
    got = _values(tmp_path / "m.safetensors")
    assert got["ids"].tolist() == list(range(5))  # copied: the same in every input
    with open_safetensors(tmp_path / "m.safetensors") as r:
        assert r.info("a").dtype == "BF16"
    merged = merge([{"a": cf.load_file(p)["a"]} for p in ins], method="sum")["a"]
    bits = cf.dtypes.f32_to_bf16_bits(merged)
    np.testing.assert_array_equal(got["a"], cf.dtypes.bf16_bits_to_f32(bits))
    # a base: base + merged over every base tensor (an int tensor takes no task vector)
    rng = np.random.default_rng(1)
    base = {"a": torch.from_numpy(rng.normal(size=(40, 30)).astype(np.float32)).bfloat16(),
            "other": torch.ones(3, dtype=torch.bfloat16), "ids": torch.arange(5)}
    save_safetensors(base, tmp_path / "base.safetensors")
    with pytest.raises(cf.CompeftError, match="cannot add a task vector to a I64"):
        merge_files(ins, tmp_path / "full.safetensors", method="sum",
                    base=tmp_path / "base.safetensors")
    (tmp_path / "float").mkdir()
    ins = _tv_files(tmp_path / "float", dtype="BF16", ids=False)
    merge_files(ins, tmp_path / "full.safetensors", method="sum",
                base=tmp_path / "base.safetensors")
    full = _values(tmp_path / "full.safetensors")
    want = apply_task_vector(base, {"a": merged})
    assert sorted(full) == ["a", "ids", "other"]
    np.testing.assert_array_equal(full["a"], want["a"].float().numpy())
    np.testing.assert_array_equal(full["other"], np.ones(3, np.float32))


def test_copied_tensors_must_be_equal(tmp_path):
    ins = _tv_files(tmp_path)
    cf.save_file({**cf.load_file(ins[2]), "ids": np.arange(1, 6, dtype=np.int64)}, ins[2])
    with pytest.raises(MergeError, match=r"tensor 'ids'.*not a task vector"):
        merge_files(ins, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_many_inputs_take_the_dense_path(tmp_path):
    rng = np.random.default_rng(2)
    ins = []
    for i in range(M.MAX_PATTERN_INPUTS + 2):
        idx = np.flatnonzero(rng.random(500) < 0.2)
        ins.append(tmp_path / f"e{i}.compeft")
        cf.save_file({"w": TernaryTensor((500,), idx, rng.random(idx.size) < 0.5, 0.5 + i)},
                     ins[-1])
    merge_files(ins, tmp_path / "m.compeft", density=0.1)
    want = merge_and_compress([cf.load_file(p) for p in ins], density=0.1)
    assert cf.load_file(tmp_path / "m.compeft")["w"] == want["w"]


# ---------------------------------------------------------------------------------------------
# what does not fit together, and outputs
# ---------------------------------------------------------------------------------------------
def test_mismatches_name_the_first_one(experts, tmp_path, capsys):
    ins = _tv_files(tmp_path)
    extra = tmp_path / "extra.compeft"
    cf.save_file({**cf.load_file(ins[0]), "b": TernaryTensor((2,), [0], [False], 1.0)}, extra)
    shape = tmp_path / "shape.compeft"
    cf.save_file({**cf.load_file(ins[0]), "a": TernaryTensor((30, 40), [0], [False], 1.0)},
                 shape)
    dtype = tmp_path / "dtype.compeft"
    cf.save_file({**cf.load_file(ins[0]), "a": TernaryTensor((40, 30), [0], [False], 1.0,
                                                             "F16")}, dtype)
    kind = tmp_path / "kind.compeft"
    cf.save_file({**cf.load_file(ins[0]), "a": np.zeros((40, 30), np.float32)}, kind)
    cases = [
        ([ins[0], extra], ["tensor 'b'", f"in {extra}", f"missing from {ins[0]}"]),
        ([ins[0], ins[1], shape], ["tensor 'a'", f"{shape}: shape [30, 40], [40, 30]"]),
        ([ins[0], dtype], ["tensor 'a'", "dtype F16, F32"]),
        ([ins[0], kind], ["tensor 'a'", "a dense record, ternary"]),
        ([ins[0], experts["lora"][0]], ["an adapter directory", "one form"]),
        ([experts["lora"][0], experts["lora_init"][0]],
         ["not measured from the same reference", "a checkpoint"]),
        ([experts["lora"][0], experts["ia3"][0]], ["peft_type is 'IA3', 'LORA'"]),
    ]
    for inputs, needles in cases:
        code, _, err = run(capsys, "merge", *inputs, "-o", tmp_path / "out.safetensors", "-q")
        assert code == 1, (inputs, err)
        one_line_error(err, *needles)
        assert not (tmp_path / "out.safetensors").exists()


def test_adapter_config_mismatch(experts, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(experts["lora"][1], other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["target_modules"] = ["query"]
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    code, _, err = run(capsys, "merge", experts["lora"][0], other, "-o", tmp_path / "o", "-q")
    assert code == 1
    one_line_error(err, "target_modules is ['query']", "adapters merge only with the same")


def test_usage_errors_exit_2(tmp_path, capsys):
    ins = _tv_files(tmp_path, n=2)
    for argv, needle in [
        ([ins[0]], "two or more inputs"),
        ([*ins, "--weights", "1,2,3"], "--weights has 3 values for 2 inputs"),
        ([*ins, "--weights", "1,x"], "not a number"),
        ([*ins, "--method", "median"], "invalid choice"),
        ([*ins, "--density", "0"], "must be in (0, 1]"),
    ]:
        code, _, err = run(capsys, "merge", *argv, "-o", tmp_path / "m.compeft")
        assert code == 2, (argv, err)
        one_line_error(err, needle)
    assert not (tmp_path / "m.compeft").exists()


def test_data_errors_exit_1(tmp_path, capsys):
    ins = _tv_files(tmp_path, n=2)
    for argv, needle in [
        ([*ins, "-o", tmp_path / "m.bin"], "must end in .compeft"),
        ([*ins, "-o", tmp_path / "m.compeft", "--base", ins[0]], "takes no --base"),
        ([*ins, "-o", ins[0]], "the output is an input"),
        ([ins[0], tmp_path / "missing.compeft", "-o", tmp_path / "m.compeft"],
         "No such file"),
    ]:
        code, _, err = run(capsys, "merge", *argv)
        assert code == 1, (argv, err)
        one_line_error(err, needle)
    corrupt = tmp_path / "corrupt.compeft"
    corrupt.write_bytes(ins[1].read_bytes()[:-3])
    code, _, err = run(capsys, "merge", ins[0], corrupt, "-o", tmp_path / "m.compeft")
    assert code == 1
    one_line_error(err, str(corrupt))


def test_existing_output_and_force(tmp_path, capsys):
    ins = _tv_files(tmp_path, n=2)
    dst = tmp_path / "m.compeft"
    dst.write_bytes(b"old")
    code, _, err = run(capsys, "merge", *ins, "-o", dst)
    assert code == 1
    one_line_error(err, "exists", "--force")
    assert dst.read_bytes() == b"old"
    code, _, _ = run(capsys, "merge", *ins, "-o", dst, "--force", "--density", "0.2", "-q")
    assert code == 0
    want = merge_and_compress([{"a": cf.load_file(p)["a"]} for p in ins], density=0.2)
    assert cf.load_file(dst)["a"] == want["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.compeft", "tv0.compeft",
                                                          "tv1.compeft"]  # no temporaries


def test_help_has_an_example(capsys):
    code, out, _ = run(capsys, "merge", "--help")
    assert code == 0
    assert "compeft merge sentiment.compeft topic.compeft -o merged.compeft" in out
    assert "largest input density" in out
    assert "LoRA A and B" in out


def test_rescale_rule_through_files(tmp_path, monkeypatch):
    ins = _tv_files(tmp_path, n=2)
    monkeypatch.setitem(M.RESCALE_RULES, "half", lambda stats: 0.5)
    s = merge_files(ins, tmp_path / "m.safetensors", rescale="half", method="sum")
    assert s.rescale == "half"
    plain = merge([{"a": cf.load_file(p)["a"]} for p in ins], method="sum")
    np.testing.assert_array_equal(_values(tmp_path / "m.safetensors")["a"],
                                  plain["a"] * np.float32(0.5))


def test_rescale_option_on_the_command_line(tmp_path, capsys, monkeypatch):
    ins = _tv_files(tmp_path, n=2, ids=False)
    monkeypatch.setitem(M.RESCALE_RULES, "third", lambda stats: 1 / 3)
    code, out, _ = run(capsys, "merge", *ins, "-o", tmp_path / "m.safetensors",
                       "--rescale", "third", "--method", "mean")  # -q: no summary
    assert code == 0
    assert "rescale third" in out
    plain = merge([cf.load_file(p) for p in ins], method="mean")
    np.testing.assert_array_equal(_values(tmp_path / "m.safetensors")["a"],
                                  plain["a"] * np.float32(1 / 3))
    code, _, err = run(capsys, "merge", *ins, "-o", tmp_path / "n.safetensors",
                       "--rescale", "fourth")
    assert code == 2
    one_line_error(err, "invalid choice: 'fourth'")
