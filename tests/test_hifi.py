"""hifi: dense uniform quantisation of a task vector, integer records, steps in the metadata."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from compeft_format import hifi, inspect, load_file, open_file, save_file
from compeft_format.errors import EncodeError
from compeft_format.hifi import (
    HIFI_KEY,
    HifiError,
    hifi_codes,
    hifi_steps,
    load_hifi,
    lora_weights,
    probe_weights,
    save_hifi,
)


def expert(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "layer.0.w": rng.normal(0, 0.02, (48, 32)).astype(np.float32),
        "layer.0.b": rng.laplace(0, 0.005, 48).astype(np.float32),
        "layer.1.w": rng.standard_t(3, (16, 64)).astype(np.float32) * 0.01,
    }


def test_round_trip_codes_exact(tmp_path):
    tv = expert()
    path = tmp_path / "e.compeft"
    steps = save_hifi(tv, path, rel_step=0.3)
    rms = math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in tv.values())
                    / sum(v.size for v in tv.values()))
    assert steps == pytest.approx(dict.fromkeys(tv, 0.3 * rms), rel=1e-6)
    stored = load_file(path)  # a plain reader: the integer codes
    back = load_hifi(path)
    for name, v in tv.items():
        want = np.rint(v.astype(np.float64) / steps[name])
        assert stored[name].dtype == np.int8
        np.testing.assert_array_equal(stored[name], want)
        np.testing.assert_array_equal(back[name], (want * steps[name]).astype(np.float32))
        assert back[name].shape == v.shape
        assert back[name].dtype == np.float32


@given(st.integers(0, 2**32 - 1), st.floats(0.01, 4.0), st.floats(1e-6, 1e3),
       st.integers(0, 300))
def test_error_bound(seed, rel_step, scale, n):
    rng = np.random.default_rng(seed)
    tv = {"a": (rng.standard_t(2, n) * scale).astype(np.float32),
          "b": (rng.normal(0, scale, (3, 5))).astype(np.float64)}
    codes_steps = hifi_steps(tv, rel_step=rel_step)
    data = {n_: hifi_codes(v, codes_steps[n_]) for n_, v in tv.items()}
    for name, v in tv.items():
        s = codes_steps[name]
        x = v.astype(np.float64)
        err = np.abs(x - data[name].astype(np.float64) * s)
        assert (err <= s / 2 * (1 + 1e-9)).all()


def test_error_bound_through_file(tmp_path):
    tv = expert(1)
    steps = save_hifi(tv, tmp_path / "e.compeft", rel_step=0.1)
    back = load_hifi(tmp_path / "e.compeft")
    for name, v in tv.items():
        err = np.abs(back[name].astype(np.float64) - v.astype(np.float64))
        # half a step, plus the float32 rounding of the decoded value
        bound = steps[name] / 2 + np.abs(back[name]) * 2.0**-24
        assert (err <= bound * (1 + 1e-9)).all()
        assert err.max() > steps[name] / 4  # the bound is not vacuous: errors reach it


def test_file_is_plain_format(tmp_path):
    tv = expert()
    path = tmp_path / "e.compeft"
    steps = save_hifi(tv, path, metadata={"note": "archive"})
    info = inspect(path)  # checks every byte of the file
    assert [t.name for t in info.tensors] == sorted(tv)
    assert {t.dtype for t in info.tensors} == {"I8"}
    with open_file(path) as f:
        meta = f.metadata()
    assert meta["note"] == "archive"
    assert meta[HIFI_KEY] == {"steps": list(steps.values()), "version": 1}


def test_wide_codes_use_wider_integers(tmp_path):
    tv = {"a": np.array([0.0, 1.0, 300.0]), "b": np.array([1.0, -70000.0]),
          "c": np.array([0.5, -0.5])}
    path = tmp_path / "e.compeft"
    save_hifi(tv, path, step=1.0)
    stored = load_file(path)
    assert [stored[n].dtype for n in "abc"] == [np.int16, np.int32, np.int8]
    back = load_hifi(path)
    np.testing.assert_array_equal(back["a"], [0, 1, 300])
    np.testing.assert_array_equal(back["b"], [1, -70000])
    np.testing.assert_array_equal(back["c"], [0, 0])  # round half to even


def test_entropy_coded_size(tmp_path):
    # a Gaussian at a quarter of its rms: ~4.05 bits of order-0 entropy per entry; the zstd
    # stage at level 1 must come within a few percent of it (level 3 costs ~7% more)
    x = np.random.default_rng(2).normal(0, 1, 200_000).astype(np.float32)
    path = tmp_path / "e.compeft"
    steps = save_hifi({"x": x}, path, rel_step=0.25)
    _, counts = np.unique(hifi_codes(x, steps["x"]), return_counts=True)
    entropy = float(-(counts * np.log2(counts / counts.sum())).sum()) / x.size
    bits = 8 * path.stat().st_size / x.size
    assert 3.9 < entropy < 4.2
    assert bits < entropy * 1.03


def test_weights_divide_the_step():
    tv = {"a": np.ones(4), "b": np.ones(4)}
    assert hifi_steps(tv, step=0.5, weights={"a": 4.0}) == {"a": 0.125, "b": 0.5}
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(EncodeError, match="weight"):
            hifi_steps(tv, step=0.5, weights={"a": bad})


def test_lora_weights_pair_factors():
    rng = np.random.default_rng(3)
    adapter = {
        "m1.lora_A.weight": rng.normal(0, 1, (4, 16)),
        "m1.lora_B.weight": rng.normal(0, 0.1, (16, 4)),
        "m2.lora_A.weight": rng.normal(0, 1, (4, 16)),
        "m2.lora_B.weight": np.zeros((16, 4)),  # untrained: A does not change the model
        "head.bias": np.ones(3),
    }
    w = lora_weights(adapter)
    norm = {n: np.linalg.norm(v) for n, v in adapter.items()}
    # each factor is weighed by its partner's norm
    assert w["m1.lora_A.weight"] / w["m1.lora_B.weight"] == pytest.approx(
        norm["m1.lora_B.weight"] / norm["m1.lora_A.weight"])
    assert w["m2.lora_B.weight"] / w["m1.lora_B.weight"] == pytest.approx(
        norm["m2.lora_A.weight"] / norm["m1.lora_A.weight"])
    assert w["m2.lora_A.weight"] == 1e-3
    assert w["head.bias"] == 1.0
    # geometric mean 1 over the entries of the weighed factors
    pos = ["m1.lora_A.weight", "m1.lora_B.weight", "m2.lora_B.weight"]
    sizes = np.array([adapter[n].size for n in pos])
    assert np.exp((sizes * np.log([w[n] for n in pos])).sum() / sizes.sum()) == pytest.approx(1)


def test_scalar_and_empty_tensors(tmp_path):
    tv = {"s": np.array(0.3, np.float32), "e": np.zeros((0, 3), np.float32)}
    steps = save_hifi(tv, tmp_path / "e.compeft", step=0.1)
    back = load_hifi(tmp_path / "e.compeft")
    assert steps == {"e": 0.1, "s": 0.1}
    assert isinstance(back["s"], np.ndarray)
    assert back["s"].shape == ()
    assert back["s"] == np.float32(0.3)
    assert back["e"].shape == (0, 3)


def test_zero_task_vector(tmp_path):
    path = tmp_path / "e.compeft"
    assert save_hifi({"z": np.zeros((2, 3), np.float32)}, path) == {"z": 0.0}
    np.testing.assert_array_equal(load_hifi(path)["z"], np.zeros((2, 3)))


def test_torch_and_lazy_inputs(tmp_path):
    reads = []

    class Lazy(dict):
        def __getitem__(self, k):
            reads.append(k)
            return super().__getitem__(k)

    tv = Lazy(w=torch.tensor([0.01, -0.02, 0.03], dtype=torch.bfloat16))
    save_hifi(tv, tmp_path / "e.compeft", rel_step=0.01)
    assert reads == ["w", "w"]  # one pass for the rms, one for the codes
    back = load_hifi(tmp_path / "e.compeft")["w"]
    np.testing.assert_allclose(back, tv["w"].float().numpy(), rtol=0.01)


def test_refuses_bad_input(tmp_path):
    with pytest.raises(EncodeError, match="non-finite"):
        save_hifi({"a": np.array([1.0, np.nan])}, tmp_path / "e.compeft")
    with pytest.raises(EncodeError, match="float"):
        save_hifi({"a": np.array([1, 2])}, tmp_path / "e.compeft")
    with pytest.raises(EncodeError, match="rel_step"):
        save_hifi({"a": np.ones(2)}, tmp_path / "e.compeft", rel_step=0)
    with pytest.raises(EncodeError, match="int32"):
        hifi_codes(np.array([1.0]), 1e-12)
    with pytest.raises(EncodeError, match="written by save_hifi"):
        save_hifi({"a": np.ones(2)}, tmp_path / "e.compeft", metadata={HIFI_KEY: {}})
    assert not (tmp_path / "e.compeft").exists()


def test_load_refuses_other_files(tmp_path):
    plain = tmp_path / "plain.compeft"
    save_file({"a": np.arange(3, dtype=np.int8)}, plain)
    with pytest.raises(HifiError, match="not a hi-fi file"):
        load_hifi(plain)
    few = tmp_path / "few.compeft"
    save_file({"a": np.arange(3, dtype=np.int8), "b": np.arange(2, dtype=np.int8)}, few,
              metadata={HIFI_KEY: {"steps": [0.5], "version": 1}})
    with pytest.raises(HifiError, match="need 2 finite numbers"):
        load_hifi(few)
    floats = tmp_path / "floats.compeft"
    save_file({"a": np.ones(3, np.float32)}, floats,
              metadata={HIFI_KEY: {"steps": [0.5], "version": 1}})
    with pytest.raises(HifiError, match="dense integer codes"):
        load_hifi(floats)


def test_doctests():
    result = doctest.testmod(hifi, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 8
    assert result.failed == 0


def test_value_readers_refuse_a_hifi_file(tmp_path):
    # apply, merge and PEFT loading read the binding first: none of them may take the
    # integer codes for values; decompress decodes them (tests/test_hifi_cli.py)
    from compeft_format import decompress_file
    from compeft_format.safetensors_io import open_safetensors
    from compeft_format.torch import apply

    path = tmp_path / "e.compeft"
    save_hifi({"weight": np.full((2, 2), 0.5, np.float32)}, path, step=0.25)
    s = decompress_file(path, tmp_path / "out.safetensors")
    with open_safetensors(s.file) as r:
        assert r.values("weight").tolist() == [[0.5, 0.5], [0.5, 0.5]]  # not the codes 2
    model = torch.nn.Linear(2, 2, bias=False)
    before = model.weight.detach().clone()
    with pytest.raises(HifiError, match="hi-fi file"):
        apply(model, path)
    assert torch.equal(model.weight, before)


def test_probe_weights_follow_sensitivity():
    rng = np.random.default_rng(4)
    tv = {f"m{i}.{f}": rng.normal(0, 0.01, (8, 24)) for i in range(3) for f in "AB"}
    tv["m3.A"] = rng.normal(0, 0.01, (8, 24))  # a group the distortion ignores
    cost = {"m0": 1.0, "m1": 16.0, "m2": 4.0, "m3": 0.0}
    calls = []

    def distortion(t):
        calls.append(1)
        return sum(cost[n.split(".")[0]] * float(((t[n] - tv[n]) ** 2).sum()) for n in t)

    w = probe_weights(tv, distortion, group=lambda n: n.split(".")[0], rel_step=0.5)
    assert len(calls) == 4  # one call per group
    # a group's weight follows the square root of its per-entry distortion
    per = {}
    steps = hifi_steps(tv, rel_step=0.5)
    for g in cost:
        ns = [n for n in tv if n.startswith(g + ".")]
        err = sum(float(((hifi_codes(tv[n], steps[n]) * steps[n] - tv[n]) ** 2).sum()) for n in ns)
        per[g] = cost[g] * err / sum(tv[n].size for n in ns)
    for g in ("m1", "m2"):
        assert w[f"{g}.A"] / w["m0.A"] == pytest.approx(math.sqrt(per[g] / per["m0"]))
    assert w["m0.A"] == w["m0.B"]
    # the unmeasurable group is weighed as the least sensitive measured one
    assert w["m3.A"] == pytest.approx(w["m0.A"])
    sizes = np.array([tv[n].size for n in tv])
    assert np.exp((sizes * np.log([w[n] for n in tv])).sum() / sizes.sum()) == pytest.approx(1)
    with pytest.raises(EncodeError, match="no group"):
        probe_weights(tv, lambda t: 0.0)
