"""A real client: a tiny BERT with a LoRA / (IA)^3 adapter, through the command line and back.

The restored adapter directory must load with ``PeftModel.from_pretrained`` unchanged and
give exactly the outputs of the same model whose adapter weights were replaced in memory by
the dense values of ``compress(...)``'s ternary tensors.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
import transformers

from compeft_format.cli import main
from compeft_format.compress import compress
from compeft_format.lora_scale import rescale
from compeft_format.scales import resolve_scale
from compeft_format.taskvec import peft_task_vector

DENSITY = 0.2


@pytest.fixture(scope="module")
def base_model() -> torch.nn.Module:
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, vocab_size=100,
                                     max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (3, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _out(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def _trained(base: torch.nn.Module, config: object, perturb) -> torch.nn.Module:
    """A PEFT model whose adapter weights moved as if trained (LoRA B starts at zero)."""
    model = peft.get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(perturb(name, p, g))
    return model.eval()


def _round_trip(tmp_path: Path, model: torch.nn.Module) -> Path:
    model.save_pretrained(tmp_path / "adapter")
    assert main(["compress", str(tmp_path / "adapter"), "-o", str(tmp_path / "c"),
                 "--density", str(DENSITY), "-q"]) == 0
    assert main(["decompress", str(tmp_path / "c"), "-o", str(tmp_path / "r"), "-q"]) == 0
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    return tmp_path / "r"


def _in_memory(base, config, adapter_sd: dict[str, torch.Tensor], dense: dict) -> torch.nn.Module:
    """The same model with its adapter weights replaced in memory."""
    model = peft.get_peft_model(copy.deepcopy(base), config)
    peft.set_peft_model_state_dict(model, {k: dense[k] for k in adapter_sd})
    return model.eval()


def test_lora_through_the_command_line(tmp_path, base_model, inputs):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"],
                             lora_dropout=0.0)
    trained = _trained(base_model, config,
                       lambda n, p, g: p + 0.05 * torch.randn(p.shape, generator=g))
    restored_dir = _round_trip(tmp_path, trained)

    restored = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), restored_dir).eval()
    sd = peft.get_peft_model_state_dict(trained)
    assert any("lora_A" in k for k in sd)
    assert any("lora_B" in k for k in sd)
    ternary = compress(peft_task_vector(sd, "LORA"), density=DENSITY)  # LoRA: from zero
    # the command's default for a LoRA folder from zero at this density: the same selection,
    # the factors' scale fitted on the products (every module has PEFT's scaling 2)
    assert resolve_scale("auto", DENSITY, lora="zero") == "lora_product_out"
    ternary = rescale(ternary, sd, None, rule="lora_product_out")
    expected = _in_memory(base_model, config, sd, {k: t.to_torch() for k, t in ternary.items()})
    got = _out(restored, inputs)
    assert torch.equal(got, _out(expected, inputs))
    # and the adapter matters: neither the base nor the uncompressed adapter give this
    assert not torch.allclose(got, _out(base_model, inputs))
    assert not torch.allclose(got, _out(trained, inputs))


def test_ia3_through_the_command_line(tmp_path, base_model, inputs):
    config = peft.IA3Config(target_modules=["key", "value", "output.dense"],
                            feedforward_modules=["output.dense"])
    trained = _trained(base_model, config,
                       lambda n, p, g: p + 0.1 * torch.randn(p.shape, generator=g))
    restored_dir = _round_trip(tmp_path, trained)

    restored = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), restored_dir).eval()
    sd = peft.get_peft_model_state_dict(trained)
    assert sd
    assert all("ia3_l" in k for k in sd)
    ternary = compress(peft_task_vector(sd, "IA3"), density=DENSITY)  # (IA)^3: from one
    dense = {k: torch.from_numpy(np.float32(1) + t.to_numpy()) for k, t in ternary.items()}
    expected = _in_memory(base_model, config, sd, dense)
    got = _out(restored, inputs)
    assert torch.equal(got, _out(expected, inputs))
    assert not torch.allclose(got, _out(base_model, inputs))
    assert not torch.allclose(got, _out(trained, inputs))
