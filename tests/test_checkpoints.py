"""Real checkpoints in and out: Hugging Face model folders (sharded), pickled weights, an
adapter's weights file given alone."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from compeft_format import load_file
from compeft_format.convert import compress_file, decompress_file
from compeft_format.errors import ConvertError
from compeft_format.readers import TorchReader, UnsafePickleError
from compeft_format.taskvec import apply_task_vector

DATA = Path(__file__).parent / "data"
LORA = DATA / "lora-minilm-vader"
IA3 = DATA / "ia3-minilm-vader"


def _config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False)


def _state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors model folder (single file or shards)."""
    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        out.update(safetensors.torch.load_file(p))
    return out


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny BF16 causal LM saved in 3 shards, and a "full fine-tune" of it, sharded alike."""
    d = tmp_path_factory.mktemp("llm")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(), dtype=torch.bfloat16)
    model.save_pretrained(d / "base", max_shard_size="20KB")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    model.save_pretrained(d / "ft", max_shard_size="20KB")
    return d / "base", d / "ft"


def _bin_folder(src: Path, dst: Path) -> Path:
    """The same checkpoint as legacy pickled shards (pytorch_model-*.bin and their index)."""
    dst.mkdir()
    index = json.loads((src / "model.safetensors.index.json").read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        name = shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
        tensors = safetensors.torch.load_file(src / shard)
        torch.save(tensors, dst / name)
        weight_map.update(dict.fromkeys(tensors, name))
    (dst / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": index["metadata"], "weight_map": weight_map}))
    for name in ("config.json", "generation_config.json"):
        shutil.copy(src / name, dst / name)
    return dst


def test_sharded_model_folder_round_trip_with_base(tmp_path, llm):
    base, ft = llm
    s = compress_file(ft, tmp_path / "c", base=base, density=0.2)
    assert s.reference == "checkpoint"
    assert s.base_name == "base"
    assert s.file == str(tmp_path / "c" / "model.compeft")
    # the compressed folder: the weights and the small files, no shards nor index
    assert sorted(os.listdir(tmp_path / "c")) == ["config.json", "generation_config.json",
                                                  "model.compeft"]
    d = decompress_file(tmp_path / "c", tmp_path / "out", base=base)
    # sharded as the original: same shard files, same weight map, plus the small files
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(ft))
    idx_ft = json.loads((ft / "model.safetensors.index.json").read_text())
    idx_out = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert idx_out["weight_map"] == idx_ft["weight_map"]
    assert idx_out["metadata"] == idx_ft["metadata"]  # BF16 kept: the same total_size
    assert d.file == str(tmp_path / "out" / "model.safetensors.index.json")
    assert (tmp_path / "out" / "config.json").read_bytes() == (ft / "config.json").read_bytes()

    # what the file says: base + the ternary task vector, rounded once to BF16
    tv = load_file(tmp_path / "c" / "model.compeft")
    want = apply_task_vector(_state(base), tv)
    got = _state(tmp_path / "out")
    assert set(got) == set(_state(ft))
    for name, t in got.items():
        assert t.dtype == torch.bfloat16, name
        assert torch.equal(t, want[name]), name

    # and transformers loads it, BF16
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16
    for name, p in model.state_dict().items():
        assert torch.equal(p, want[name]), name


def test_model_folder_without_base_and_single_file(tmp_path, llm):
    """One model.safetensors (no shards) stored as it is (a task vector from zero)."""
    base, _ = llm
    single = tmp_path / "single"
    transformers.AutoModelForCausalLM.from_pretrained(base).save_pretrained(single)
    assert not (single / "model.safetensors.index.json").exists()
    compress_file(single, tmp_path / "c", density=0.5)
    decompress_file(tmp_path / "c", tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "generation_config.json",
                                                    "model.safetensors"]
    tv = {n: t.to_torch() for n, t in load_file(tmp_path / "c" / "model.compeft").items()}
    got = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    assert got.keys() == tv.keys()
    for name, t in got.items():
        assert torch.equal(t, tv[name]), name
    with open(tmp_path / "out" / "model.safetensors", "rb") as f:  # transformers wants it
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["__metadata__"] == {"format": "pt"}


def test_pickled_sharded_folder(tmp_path, llm):
    """pytorch_model-*.bin shards in, safetensors shards out (the names transformers uses)."""
    base, ft = llm
    bins = _bin_folder(ft, tmp_path / "ft_bin")
    s_bin = compress_file(bins, tmp_path / "c_bin", base=base, density=0.2)
    s_st = compress_file(ft, tmp_path / "c_st", base=base, density=0.2)
    assert (s_bin.nnz, s_bin.numel, s_bin.quality.overall) == (
        s_st.nnz, s_st.numel, s_st.quality.overall)
    decompress_file(tmp_path / "c_bin", tmp_path / "out", base=base)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(ft))
    a, b = _state(tmp_path / "out"), {}
    decompress_file(tmp_path / "c_st", tmp_path / "out_st", base=base)
    b = _state(tmp_path / "out_st")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16
    # a pickled base folder works too, with the same binding
    base_bin = _bin_folder(base, tmp_path / "base_bin")
    decompress_file(tmp_path / "c_st", tmp_path / "out2", base=base_bin)
    c = _state(tmp_path / "out2")
    assert all(torch.equal(c[n], b[n]) for n in b)


def test_adapter_bin_folder(tmp_path):
    """adapter_model.bin (how older PEFT saved adapters): the same task vector."""
    d = tmp_path / "lora_bin"
    d.mkdir()
    shutil.copy(LORA / "adapter_config.json", d)
    torch.save(safetensors.torch.load_file(LORA / "adapter_model.safetensors"),
               d / "adapter_model.bin")
    s = compress_file(d, tmp_path / "c", density=0.1)
    ref = compress_file(LORA, tmp_path / "ref", density=0.1)
    assert (s.reference, s.nnz, s.quality.overall) == (ref.reference, ref.nnz,
                                                        ref.quality.overall)
    a = load_file(tmp_path / "c" / "adapter_model.compeft")
    b = load_file(tmp_path / "ref" / "adapter_model.compeft")
    assert a.keys() == b.keys()
    assert all(a[n] == b[n] for n in a)
    decompress_file(tmp_path / "c", tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["adapter_config.json",
                                                    "adapter_model.safetensors"]


_MARKER = "compeft-test-pickle-ran"


class _Payload:
    """Unpickling this calls os.system: the code a malicious checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("as_torch", [True, False])
@pytest.mark.parametrize("where", ["file", "adapter"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, as_torch, where):
    marker = tmp_path / _MARKER
    state = {"w": torch.ones(3), "x": _Payload(marker)}
    if where == "file":
        path = tmp_path / "pytorch_model.bin"
    else:
        (tmp_path / "a").mkdir()
        shutil.copy(LORA / "adapter_config.json", tmp_path / "a")
        path = tmp_path / "a" / "adapter_model.bin"
    if as_torch:
        torch.save(state, path)
    else:  # a hand-made pickle: protocol 2 as torch writes, the payload its first global
        with open(path, "wb") as f:
            pickle.dump({"x": state["x"]}, f, protocol=2)
    src = path if where == "file" else path.parent
    with pytest.raises(UnsafePickleError) as info:
        compress_file(src, tmp_path / "out")
    message = str(info.value)
    assert "\n" not in message  # one line
    assert message.startswith(f"{path}: refused: its pickle would call posix.system,")
    assert "weights_only=True" in message
    assert not marker.exists()  # the code never ran
    assert not (tmp_path / "out").exists()
    # the payload is real: plain pickle would run it
    with open(path, "rb") as f:
        if not as_torch:
            pickle.load(f)
            assert marker.exists()


def test_torch_reader_rejects_what_is_not_a_state_dict(tmp_path):
    p = tmp_path / "x.bin"
    torch.save([torch.ones(2)], p)
    with pytest.raises(ConvertError, match="holds a list, not a"):
        TorchReader(p)
    torch.save({"w": torch.ones(2), "step": 3}, p)
    with pytest.raises(ConvertError, match="entry 'step' is a int, not a tensor"):
        TorchReader(p)
    p.write_bytes(b"not a pickle")
    with pytest.raises(ConvertError, match="not a torch weights file") as info:
        TorchReader(p)
    assert not isinstance(info.value, UnsafePickleError)
    with open(p, "wb") as f:  # a pickle the safe loader does not read: refused too
        pickle.dump({"w": torch.ones(2)}, f, protocol=4)
    with pytest.raises(ConvertError, match=r"not a torch weights file.*Unsupported operand"):
        TorchReader(p)
    # non-contiguous and shared storage (tied weights) read as plain tensors
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    torch.save({"t": w.t(), "a": w, "b": w}, p)
    with TorchReader(p) as r:
        assert np.array_equal(r.values("t"), w.t().numpy())
        assert np.array_equal(r.values("a"), r.values("b"))
        assert bytes(r.raw("a")) == w.numpy().tobytes()


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_model.bin"])
def test_adapter_weights_file_alone_is_that_adapter(tmp_path, name):
    """ia3/adapter_model.* given alone: measured from one, as its config says (the gates
    are not destroyed), and restored as a file."""
    d = tmp_path / "ia3"
    d.mkdir()
    shutil.copy(IA3 / "adapter_config.json", d)
    tensors = safetensors.torch.load_file(IA3 / "adapter_model.safetensors")
    if name.endswith(".bin"):
        torch.save(tensors, d / name)
    else:
        shutil.copy(IA3 / name, d / name)
    s = compress_file(d / name, tmp_path / "ia3.compeft", density=0.1)
    assert s.reference == "one"
    assert open_meta(tmp_path / "ia3.compeft")["peft_type"] == "IA3"
    decompress_file(tmp_path / "ia3.compeft", tmp_path / "back.safetensors")
    back = safetensors.torch.load_file(tmp_path / "back.safetensors")
    # the directory's own round trip gives the very same tensors
    compress_file(IA3, tmp_path / "dir", density=0.1)
    decompress_file(tmp_path / "dir", tmp_path / "dir_back")
    want = safetensors.torch.load_file(tmp_path / "dir_back" / "adapter_model.safetensors")
    for n in tensors:
        assert torch.equal(back[n], want[n]), n
    zeros = sum(int((t == 0).sum()) for t in back.values())
    assert zeros == 0  # gates near one: none became 0 (measured from zero, 90% would)


def open_meta(path: Path) -> dict:
    from compeft_format import open_file

    with open_file(path) as f:
        return f.metadata()["task_vector"]


def test_command_line_model_folders(tmp_path, llm, capsys):
    """compeft compress/decompress take model folders, as INPUT and as --base."""
    from compeft_format.cli import main

    base, ft = llm
    assert main(["compress", str(ft), "-o", str(tmp_path / "c"), "--base", str(base),
                 "--density", "0.3"]) == 0  # no -q: it silences the summary too
    assert "measured from checkpoint 'base'" in capsys.readouterr().out
    assert main(["decompress", str(tmp_path / "c"), "-o", str(tmp_path / "out"),
                 "--base", str(base), "-q"]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(ft))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16
