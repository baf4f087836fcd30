"""compeft_format.peft: compressed adapter folders loaded straight into a model.

The reference is what a user does today: ``decompress`` the folder, then
``PeftModel.from_pretrained`` / ``load_adapter``. The direct path must give the same adapter
weights (dtypes and bits) and the same outputs, for the real LoRA and (IA)^3 adapters of
``tests/data`` on a MiniLM-shaped BERT built from a config (random weights, no hub).
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import peft
import pytest
import torch
import transformers

import compeft_format as cf
from compeft_format import peft as cpeft
from compeft_format.errors import MissingDependencyError

LORA, IA3 = "tests/data/lora-minilm-vader", "tests/data/ia3-minilm-vader"


@pytest.fixture(scope="module")
def bert() -> torch.nn.Module:
    config = transformers.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                     intermediate_size=1536, vocab_size=40,
                                     max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, tuple]:
    """name -> (compressed folder, decompressed folder, base or None)."""
    d = tmp_path_factory.mktemp("peft")
    out = {}
    for name, src, base in (("lora", LORA, None), ("ia3", IA3, None),
                            ("lora-init", LORA, f"{LORA}/init"),
                            ("ia3-init", IA3, f"{IA3}/init")):
        cf.compress_file(src, d / name, density=0.1, base=base)
        cf.decompress_file(d / name, d / f"{name}-r", base=base)
        out[name] = (d / name, d / f"{name}-r", base)
    for name, src, base in (("lora-hifi", LORA, None), ("ia3-hifi-init", IA3, f"{IA3}/init")):
        cf.compress_file(src, d / name, hifi=0.05, base=base)  # integer codes and their steps
        cf.decompress_file(d / name, d / f"{name}-r", base=base)
        out[name] = (d / name, d / f"{name}-r", base)
    return out


def _weights(model: torch.nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    return peft.get_peft_model_state_dict(model, adapter_name=adapter, save_embedding_layers=False)


def _same_adapter(a: torch.nn.Module, b: torch.nn.Module, adapter: str = "default") -> None:
    wa, wb = _weights(a, adapter), _weights(b, adapter)
    assert set(wa) == set(wb)
    for k in wa:
        assert wa[k].dtype == wb[k].dtype, k
        assert wa[k].device == wb[k].device, k
        assert torch.equal(wa[k].view(torch.uint8), wb[k].view(torch.uint8)), k


def _out(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


@pytest.mark.parametrize(("name", "dtype"), [
    ("lora", torch.float32), ("ia3", torch.float32), ("lora-init", torch.float32),
    ("ia3-init", torch.float32), ("lora", torch.bfloat16), ("ia3-init", torch.bfloat16),
    ("lora-hifi", torch.float32), ("ia3-hifi-init", torch.float32),
    ("lora-hifi", torch.bfloat16), ("ia3-hifi-init", torch.bfloat16)])
def test_from_pretrained_is_decompress_then_load(bert, ids, folders, name, dtype):
    compressed, restored, base = folders[name]
    want = peft.PeftModel.from_pretrained(copy.deepcopy(bert).to(dtype), restored)
    got = cpeft.from_pretrained(copy.deepcopy(bert).to(dtype), compressed, base=base)
    assert type(got) is type(want)
    assert not got.training
    _same_adapter(got, want)
    assert torch.equal(_out(got, ids), _out(want, ids))


@pytest.mark.parametrize("name", ["lora", "ia3-init"])
def test_through_the_device_decoders(bert, ids, folders, name, monkeypatch):
    """The torch decoders (forced on the CPU, as on a GPU) give the same adapter."""
    from compeft_format.codecs import torch_decode

    monkeypatch.setattr(torch_decode, "FORCE_TORCH", True)
    compressed, restored, base = folders[name]
    want = peft.PeftModel.from_pretrained(copy.deepcopy(bert), restored)
    got = cpeft.from_pretrained(copy.deepcopy(bert), compressed, base=base)
    _same_adapter(got, want)


def test_a_second_expert_and_switching(bert, ids, folders):
    """load_adapter adds an expert; set_adapter switches, as with PEFT's own loaders."""
    lora, lora_r, _ = folders["lora"]
    init, init_r, base = folders["lora-init"]
    want = peft.PeftModel.from_pretrained(copy.deepcopy(bert), lora_r)
    want.load_adapter(init_r, "second")
    got = cpeft.from_pretrained(copy.deepcopy(bert), lora)
    assert cpeft.load_adapter(got, init, "second", base=base) is got
    _same_adapter(got, want, "second")
    for adapter in ("second", "default", "second"):
        want.set_adapter(adapter)
        got.set_adapter(adapter)
        assert torch.equal(_out(got, ids), _out(want, ids)), adapter
    # the two experts differ, so switching did something
    got.set_adapter("default")
    first = _out(got, ids)
    got.set_adapter("second")
    assert not torch.equal(first, _out(got, ids))


def test_load_adapter_into_a_peft_model_made_by_peft(bert, folders):
    ia3, ia3_r, _ = folders["ia3"]
    want = peft.PeftModel.from_pretrained(copy.deepcopy(bert), ia3_r)
    want.load_adapter(ia3_r, "other")
    got = peft.PeftModel.from_pretrained(copy.deepcopy(bert), ia3_r)
    cpeft.load_adapter(got, ia3, "other")
    _same_adapter(got, want, "other")


def test_a_failed_load_adapter_leaves_the_model_as_it_was(bert, ids, folders, tmp_path):
    """An expert whose weights do not fit its config: refused, and not left half loaded."""
    import json
    import shutil

    lora, _, _ = folders["lora"]
    bad = tmp_path / "bad"
    shutil.copytree(lora, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["r"] = 4
    (bad / "adapter_config.json").write_text(json.dumps(config))
    model = cpeft.from_pretrained(copy.deepcopy(bert), lora)
    before = _out(model, ids)
    with pytest.raises(cf.CompeftError, match="in the model"):
        cpeft.load_adapter(model, bad, "bad")
    assert "bad" not in model.peft_config
    assert not any(p.is_meta for p in model.parameters())
    assert torch.equal(_out(model, ids), before)


def test_an_expert_held_in_memory(bert, folders):
    lora, lora_r, _ = folders["lora"]
    held = cpeft.CompressedAdapter.read(lora)
    assert len(held.data) == (lora / "adapter_model.compeft").stat().st_size
    want = peft.PeftModel.from_pretrained(copy.deepcopy(bert), lora_r)
    _same_adapter(cpeft.from_pretrained(copy.deepcopy(bert), held), want)


def test_trainable(bert, folders):
    lora, lora_r, _ = folders["lora"]
    want = peft.PeftModel.from_pretrained(copy.deepcopy(bert), lora_r, is_trainable=True)
    got = cpeft.from_pretrained(copy.deepcopy(bert), lora, is_trainable=True)
    assert got.training == want.training
    trainable = {n for n, p in got.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in want.named_parameters() if p.requires_grad}
    assert trainable


def _untouched(model: torch.nn.Module) -> bool:
    return not any("lora_" in n or "ia3_" in n for n, _ in model.named_parameters())


def test_a_wrong_or_missing_base_is_refused_before_the_model_changes(bert, folders):
    init, _, _ = folders["lora-init"]
    model = copy.deepcopy(bert)
    with pytest.raises(cf.CompeftError, match="give it with base="):
        cpeft.from_pretrained(model, init)
    with pytest.raises(cf.CompeftError, match="not the base"):
        cpeft.from_pretrained(model, init, base=f"{IA3}/init")
    assert _untouched(model)
    lora, _, _ = folders["lora"]
    with pytest.raises(cf.CompeftError, match="takes no base="):
        cpeft.from_pretrained(model, lora, base=f"{LORA}/init")
    assert _untouched(model)


def test_not_a_compressed_folder(bert, tmp_path):
    with pytest.raises(cf.CompeftError, match="not a compressed adapter folder"):
        cpeft.from_pretrained(copy.deepcopy(bert), LORA)


def test_an_adapter_for_another_model_is_refused(folders):
    lora, _, _ = folders["lora"]
    small = transformers.BertModel(transformers.BertConfig(
        hidden_size=384, num_hidden_layers=2, num_attention_heads=12, intermediate_size=1536,
        vocab_size=40))
    with pytest.raises(cf.CompeftError, match="not in the model"):
        cpeft.from_pretrained(small, lora)


def test_missing_peft_or_torch_is_a_clear_error(monkeypatch, folders):
    lora, _, _ = folders["lora"]
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(MissingDependencyError, match="needs peft and torch"):
        cpeft.from_pretrained(torch.nn.Linear(2, 2), lora)
    monkeypatch.setitem(sys.modules, "torch", None)
    from compeft_format.torch import apply

    with pytest.raises(MissingDependencyError, match="needs torch") as exc:
        apply({}, lora / "adapter_model.compeft")
    assert isinstance(exc.value, ImportError)
    assert isinstance(exc.value, cf.CompeftError)


def test_the_modules_import_without_torch_or_peft():
    code = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None
        sys.modules["peft"] = None
        import compeft_format.peft, compeft_format.torch
        from compeft_format.codecs import torch_decode
        from compeft_format.errors import MissingDependencyError
        try:
            torch_decode.torch_dtype("F32")
        except MissingDependencyError as exc:
            print("clear:", exc)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert run.stdout.startswith("clear: decoding on a torch device needs torch")


def test_doctests():
    import doctest

    result = doctest.testmod(cpeft, optionflags=doctest.ELLIPSIS)
    assert result.attempted
    assert not result.failed
