"""compeft_format.torch.apply: a compressed full fine-tune added to a model in place.

The reference is the path a user has today: ``decompress --base`` to a safetensors file, then
load it. ``apply`` must give the very same bits, in every float dtype; refuse a wrong base
before it changes anything; and take an expert back out with ``weight=-1`` within rounding.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import compeft_format as cf
from compeft_format import dtypes as _dt
from compeft_format.codecs import torch_decode as td
from compeft_format.safetensors_io import open_safetensors, save_safetensors
from compeft_format.torch import add_dense_, add_ternary_, apply


class _Net(torch.nn.Module):
    """A small model with the parts a checkpoint has: weights, biases, a norm, a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(11, 8)
        self.lin = torch.nn.Linear(8, 24)
        self.norm = torch.nn.LayerNorm(24)
        self.out = torch.nn.Linear(24, 5)
        self.register_buffer("steps", torch.arange(3))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module", params=["F32", "BF16", "F16"])
def case(request, tmp_path_factory):
    """(dtype, dir): base.safetensors, ft.safetensors, ft.compeft (--base) and its decompress."""
    dtype = _dt_torch(request.param)
    d = tmp_path_factory.mktemp(f"apply-{request.param}")
    torch.manual_seed(0)
    base = _Net().to(dtype)
    ft = copy.deepcopy(base)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_safetensors(_state(base), d / "base.safetensors")
    save_safetensors(_state(ft), d / "ft.safetensors")
    cf.compress_file(d / "ft.safetensors", d / "ft.compeft", base=d / "base.safetensors",
                     density=0.3, exclude=("norm.*",))
    cf.decompress_file(d / "ft.compeft", d / "ft-r.safetensors", base=d / "base.safetensors")
    return request.param, d


def _dt_torch(name: str) -> torch.dtype:
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[name]


def _base(name: str, d: Path) -> _Net:
    model = _Net().to(_dt_torch(name))
    with open_safetensors(d / "base.safetensors") as r:
        model.load_state_dict({k: _dt.to_torch(*r.get(k)) for k in r})
    return model


def _decompressed(d: Path) -> dict[str, torch.Tensor]:
    with open_safetensors(d / "ft-r.safetensors") as r:
        return {k: _dt.to_torch(*r.get(k)) for k in r}


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(-1).view(torch.uint8)
                                              if a.is_floating_point() else a,
                                              b.contiguous().view(-1).view(torch.uint8)
                                              if b.is_floating_point() else b)


@pytest.mark.parametrize("device_path", [False, True])
def test_apply_is_decompress_then_load(case, device_path, monkeypatch):
    """Also through the device decoders (forced on the CPU), as on a GPU."""
    monkeypatch.setattr(td, "FORCE_TORCH", device_path)
    name, d = case
    model = _base(name, d)
    assert apply(model, d / "ft.compeft") is model
    want = _decompressed(d)
    got = model.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert _bits_equal(got[k], want[k]), k


def test_apply_to_a_state_dict(case):
    name, d = case
    sd = _state(_base(name, d))
    apply(sd, d / "ft.compeft")
    want = _decompressed(d)
    for k in want:
        assert _bits_equal(sd[k], want[k]), k


def test_weight_minus_one_takes_the_expert_back_out(case):
    """Each element comes back within one unit in the last place of its dtype; the tensors
    stored whole (the excluded norm) keep the fine-tuned values (documented)."""
    name, d = case
    model = _base(name, d)
    before = _state(model)
    apply(model, d / "ft.compeft")
    after = _state(model)
    # the model is no longer the recorded base, so the base check cannot hold
    with pytest.raises(cf.CompeftError, match="differs from the base"):
        apply(model, d / "ft.compeft", weight=-1)
    apply(model, d / "ft.compeft", weight=-1, verify_base=False)
    moved = 0
    for k, b in before.items():
        r = model.state_dict()[k]
        if not b.is_floating_point():
            assert torch.equal(r, b)
            continue
        if k.startswith("norm."):
            assert torch.equal(r, after[k])
            continue
        top = torch.maximum(torch.maximum(b.abs(), after[k].abs()), r.abs()).float()
        ulp = torch.nextafter(top.to(b.dtype), torch.tensor(float("inf"), dtype=b.dtype))
        ulp = ulp.float() - top
        assert bool(((r.float() - b.float()).abs() <= ulp).all()), k
        moved += int((after[k] != b).sum())
    assert moved > 0


def test_a_wrong_base_is_refused_and_nothing_changes(case):
    name, d = case
    model = _base(name, d)
    with torch.no_grad():
        model.out.bias[0] += 1
    before = _state(model)
    with pytest.raises(cf.CompeftError, match="differs from the base") as exc:
        apply(model, d / "ft.compeft")
    assert exc.value.tensor == "out.bias"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_other_shapes_and_missing_tensors_are_refused_unchanged(case):
    name, d = case
    sd = _state(_base(name, d))
    sd["lin.weight"] = sd["lin.weight"][:-1].clone()
    before = {k: v.clone() for k, v in sd.items()}
    with pytest.raises(cf.CompeftError) as exc:
        apply(sd, d / "ft.compeft")
    assert exc.value.tensor == "lin.weight"
    del sd["lin.weight"], before["lin.weight"]
    with pytest.raises(cf.CompeftError, match="lacks 1 tensors"):
        apply(sd, d / "ft.compeft", verify_base=False)
    for k in before:
        assert torch.equal(sd[k], before[k]), k


def test_tensors_stored_whole_cannot_be_scaled(case):
    """The excluded norm is stored as the fine-tuned values: copied with weight 1, and with
    another weight only when the model already holds them."""
    name, d = case
    model = _base(name, d)
    with pytest.raises(cf.CompeftError, match="stored whole") as exc:
        apply(model, d / "ft.compeft", weight=0.5, verify_base=False)
    assert exc.value.tensor.startswith("norm.")
    assert torch.equal(model.lin.weight, _base(name, d).lin.weight)


def test_a_plain_task_vector_and_a_half(tmp_path):
    """A task vector from zero (no base recorded) at weight 0.5: each changed element is
    base + 0.5 * d rounded once, as apply_task_vector computes it exactly in numpy."""
    rng = np.random.default_rng(1)
    t = cf.TernaryTensor((6, 7), np.sort(rng.choice(42, 9, replace=False)),
                         rng.random(9) < 0.5, 0.3, "BF16")
    cf.save_file({"w": t}, tmp_path / "tv.compeft")
    w = torch.randn(6, 7).to(torch.bfloat16)
    want = cf.apply_task_vector({"w": w.clone()}, {"w": t.to_numpy().astype(np.float64) * 0.5})
    sd = {"w": w.clone()}
    apply(sd, tmp_path / "tv.compeft", weight=0.5)
    assert _bits_equal(sd["w"], want["w"])


def test_an_adapter_is_not_a_task_vector_of_a_model(tmp_path):
    cf.compress_file("tests/data/ia3-minilm-vader", tmp_path / "c", density=0.1)
    with pytest.raises(cf.CompeftError, match=r"compeft_format\.peft"):
        apply({}, tmp_path / "c" / "adapter_model.compeft")


_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F64": torch.float64}


@given(st.sampled_from(sorted(_FLOATS)), st.sampled_from([1.0, -1.0, 0.5, 0.3, -2.75]),
       st.integers(0, 2**32 - 1), st.sampled_from([1e-3, 1.0, 3e4, 2.0**-130]))
def test_add_rounds_once_like_numpy(dtype, weight, seed, magnitude):
    """add_ternary_ and add_dense_ give the exactly rounded sum, as apply_task_vector does."""
    rng = np.random.default_rng(seed)
    n = 64
    base = torch.from_numpy(rng.standard_normal(n) * magnitude).to(_FLOATS[dtype])
    pos = np.sort(rng.choice(n, 20, replace=False))
    neg = rng.random(20) < 0.5
    value = float(np.float32(rng.random() * magnitude))
    unscaled = np.zeros(n)
    unscaled[pos] = np.where(neg, -value, value)
    want = cf.apply_task_vector({"w": base.clone()}, {"w": unscaled * weight})["w"]
    got = add_dense_(base.clone(), torch.from_numpy(unscaled), weight=weight)
    assert _bits_equal(got, want)
    # the sparse add leaves the other elements' bits alone (a -0.0 is not turned into +0.0)
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[pos] = False
    want[untouched] = base[untouched]
    got = add_ternary_(base.clone(), torch.from_numpy(pos), torch.from_numpy(neg), value,
                       weight=weight)
    assert _bits_equal(got, want)


@pytest.mark.parametrize("module", ["compeft_format.torch",
                                    "compeft_format.codecs.torch_decode"])
def test_doctests(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted
    assert not result.failed
