"""Task vectors: PEFT adapters (real ones included), state dicts, applying a delta."""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterator, Mapping
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from compeft_format import dtypes as dt
from compeft_format.compress import compress
from compeft_format.errors import EncodeError
from compeft_format.quality import quality_report
from compeft_format.taskvec import (
    LazyTaskVector,
    TaskVector,
    TaskVectorReport,
    apply_task_vector,
    peft_task_vector,
    state_dict_task_vector,
)
from compeft_format.tensor import TernaryTensor

DATA = Path(__file__).parent / "data"


def load_adapter(name: str, init: bool = False) -> tuple[dict[str, np.ndarray], str]:
    folder = DATA / name / ("init" if init else "")
    config = json.loads((folder / "adapter_config.json").read_text())
    return load_file(str(folder / "adapter_model.safetensors")), config["peft_type"]


# ---------------------------------------------------------------------------------------------
# real adapters
# ---------------------------------------------------------------------------------------------
def test_real_lora_with_init():
    weights, kind = load_adapter("lora-minilm-vader")
    init, _ = load_adapter("lora-minilm-vader", init=True)
    assert kind == "LORA"
    assert len(weights) == 74
    tv = peft_task_vector(weights, kind, init=init)
    assert list(tv) == list(weights)
    for name, w in weights.items():
        assert tv.dtypes[name] == "F32"
        assert tv[name].dtype == np.float32
        if "lora_B" in name:
            assert not init[name].any()  # B starts at zero ...
            np.testing.assert_array_equal(tv[name], w)  # ... so B - 0 = B
        else:
            assert "lora_A" in name
            assert init[name].any()  # A starts random: it must be subtracted
            np.testing.assert_array_equal(tv[name], w - init[name])
    # from zero (the paper's convention) differs exactly by A_init
    zero = peft_task_vector(weights, kind)
    a = next(n for n in weights if "lora_A" in n)
    np.testing.assert_array_equal(zero[a], weights[a])
    assert not np.shares_memory(zero[a], weights[a])


def test_real_ia3_from_one():
    weights, kind = load_adapter("ia3-minilm-vader")
    init, _ = load_adapter("ia3-minilm-vader", init=True)
    assert kind == "IA3"
    assert len(weights) == 24
    tv = peft_task_vector(weights, kind)
    with_init = peft_task_vector(weights, kind, init=init)
    for name, w in weights.items():
        assert "ia3_l" in name
        np.testing.assert_array_equal(init[name], np.ones_like(w))
        np.testing.assert_array_equal(tv[name], w - np.float32(1))
        np.testing.assert_array_equal(with_init[name], tv[name])
    assert peft_task_vector(weights, "ia3").keys() == tv.keys()  # case-insensitive


@pytest.mark.parametrize("adapter", ["lora-minilm-vader", "ia3-minilm-vader"])
def test_real_adapters_compress_end_to_end(adapter):
    weights, kind = load_adapter(adapter)
    init, _ = load_adapter(adapter, init=True)
    tv = peft_task_vector(weights, kind, init=init)
    out = compress(tv, density=0.1)
    total = sum(v.size for v in tv.values())
    assert sum(t.nnz for t in out.values()) == round(0.1 * total)
    report = quality_report(tv, out)
    assert 0.5 < report.overall.cosine < 1.0
    # the default scale overshoots on purpose (a faithful model, not faithful parameters:
    # see compress), so the parameter-space error is bounded on "norm", which does not
    assert quality_report(tv, compress(tv, density=0.1, scale="norm")).overall.rel_error < 1.0
    rebuilt = apply_task_vector(init, out)
    assert set(rebuilt) == set(weights)
    assert rebuilt[next(iter(weights))].dtype == np.float32


# ---------------------------------------------------------------------------------------------
# peft_task_vector
# ---------------------------------------------------------------------------------------------
def test_peft_errors_name_the_tensor():
    w = {"a.lora_A.weight": np.ones((2, 3), np.float32)}
    with pytest.raises(EncodeError, match="peft_type"):
        peft_task_vector(w, "PREFIX_TUNING")
    assert peft_task_vector(w, "PREFIX_TUNING", init=w)["a.lora_A.weight"].sum() == 0
    with pytest.raises(EncodeError) as info:
        peft_task_vector(w, "LORA", init={})
    assert info.value.tensor == "a.lora_A.weight"
    with pytest.raises(EncodeError, match="only in init"):
        peft_task_vector(w, "LORA", init={**w, "b": np.ones(1)})
    with pytest.raises(EncodeError, match="shape") as info:
        peft_task_vector(w, "LORA", init={"a.lora_A.weight": np.ones((3, 2), np.float32)})
    assert info.value.tensor == "a.lora_A.weight"
    with pytest.raises(EncodeError, match="dtype"):
        peft_task_vector(w, "LORA", init={"a.lora_A.weight": np.ones((2, 3), np.float64)})
    with pytest.raises(EncodeError) as info:
        peft_task_vector({"step": np.arange(3)}, "LORA")
    assert info.value.tensor == "step"
    with pytest.raises(EncodeError, match="DoRA") as info:
        peft_task_vector({"m.lora_magnitude_vector": np.ones(4, np.float32)}, "LORA")
    assert info.value.tensor == "m.lora_magnitude_vector"


def test_peft_ia3_other_tensors_from_zero():
    w = {"q.ia3_l": np.array([1.5], np.float32), "classifier.weight": np.array([0.25])}
    tv = peft_task_vector(w, "IA3")
    assert tv["q.ia3_l"].tolist() == [0.5]
    assert tv["classifier.weight"].tolist() == [0.25]


def test_peft_torch_bf16_and_f16():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=g).bfloat16()
    tv = peft_task_vector({"x.ia3_l": w, "y.ia3_l": w.half()}, "IA3")
    assert tv.dtypes == {"x.ia3_l": "BF16", "y.ia3_l": "F16"}
    assert tv["x.ia3_l"].dtype == np.float32
    assert tv["y.ia3_l"].dtype == np.float32  # float16 differences keep their precision
    np.testing.assert_array_equal(tv["x.ia3_l"], w.float().numpy() - 1)
    np.testing.assert_array_equal(tv["y.ia3_l"], w.half().float().numpy() - 1)
    out = compress(tv, density=0.5)
    assert (out["x.ia3_l"].dtype, out["y.ia3_l"].dtype) == ("BF16", "F16")


def test_task_vector_dict():
    tv = TaskVector({"a": np.zeros(2)})
    assert tv.dtypes == {"a": "F64"}
    tv["b"] = np.zeros(1, np.float16)
    assert tv.dtypes["b"] == "F16"
    del tv["a"]
    assert tv.dtypes == {"b": "F16"}
    assert isinstance(tv, dict)


# ---------------------------------------------------------------------------------------------
# state_dict_task_vector
# ---------------------------------------------------------------------------------------------
def make_pair(rng):
    base = {
        "emb.weight": rng.standard_normal((10, 4)).astype(np.float32),
        "pos_ids": np.arange(10),
        "layer.w": torch.randn(4, 4).bfloat16(),
        "layer.h": rng.standard_normal(3).astype(np.float16),
        "old.head": np.ones(2, np.float32),
    }
    ft = {
        "emb.weight": base["emb.weight"] * np.float32(1.01),
        "pos_ids": np.arange(10),
        "new.head": np.ones(3, np.float32),
        "layer.w": (base["layer.w"].float() * 1.1).bfloat16(),
        "layer.h": (base["layer.h"] * np.float16(0.9)).astype(np.float16),
    }
    return ft, base


def test_state_dict_task_vector_and_report():
    ft, base = make_pair(np.random.default_rng(0))
    tv, report = state_dict_task_vector(ft, base)
    assert list(tv) == ["emb.weight", "layer.w", "layer.h"]
    assert report == TaskVectorReport(
        names=("emb.weight", "layer.w", "layer.h"),
        only_in_finetuned=("new.head",),
        only_in_base=("old.head",),
        non_float=(("pos_ids", "I64"),),
    )
    assert not report.complete
    json.dumps(report.to_dict())
    assert tv.dtypes == {"emb.weight": "F32", "layer.w": "BF16", "layer.h": "F16"}
    np.testing.assert_array_equal(tv["emb.weight"], ft["emb.weight"] - base["emb.weight"])
    np.testing.assert_array_equal(
        tv["layer.w"], ft["layer.w"].float().numpy() - base["layer.w"].float().numpy()
    )
    np.testing.assert_array_equal(
        tv["layer.h"], ft["layer.h"].astype(np.float32) - base["layer.h"].astype(np.float32)
    )


def test_state_dict_round_trip_is_exact():
    ft, base = make_pair(np.random.default_rng(1))
    tv, _ = state_dict_task_vector(ft, base)
    back = apply_task_vector(base, tv)
    assert back["pos_ids"] is base["pos_ids"]
    np.testing.assert_array_equal(back["emb.weight"], ft["emb.weight"])
    np.testing.assert_array_equal(back["layer.h"], ft["layer.h"])
    assert back["layer.h"].dtype == np.float16
    assert back["layer.w"].dtype == torch.bfloat16
    assert torch.equal(back["layer.w"], ft["layer.w"])


def test_state_dict_mismatch_errors():
    with pytest.raises(EncodeError, match=r"shape \(2,\)") as info:
        state_dict_task_vector({"w": np.ones(2)}, {"w": np.ones(3)})
    assert info.value.tensor == "w"
    with pytest.raises(EncodeError, match="F32 does not match F16") as info:
        state_dict_task_vector({"w": np.ones(2, np.float32)}, {"w": np.ones(2, np.float16)})
    assert info.value.tensor == "w"
    with pytest.raises(EncodeError, match="I64 does not match BOOL"):
        state_dict_task_vector({"m": np.ones(2, np.int64)}, {"m": np.ones(2, bool)})


class CountingMapping(Mapping):
    """A lazy mapping that records how many of its earlier values are alive at each fetch."""

    def __init__(self, values: dict) -> None:
        self._values = values
        self.alive: list[int] = []
        self._refs: list[weakref.ref] = []

    def __getitem__(self, name):
        self.alive.append(sum(r() is not None for r in self._refs))
        value = self._values[name].copy()
        self._refs.append(weakref.ref(value))
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def test_lazy_state_dict_task_vector():
    rng = np.random.default_rng(2)
    base_d = {f"w{i}": rng.standard_normal(1000).astype(np.float32) for i in range(4)}
    ft_d = {n: v + np.float32(0.5) for n, v in base_d.items()}
    base, ft = CountingMapping(base_d), CountingMapping(ft_d)
    lazy, report = state_dict_task_vector(ft, base, lazy=True)
    assert isinstance(lazy, LazyTaskVector)
    assert report.complete
    assert len(lazy) == 4
    assert "w1" in lazy
    assert lazy.dtypes == dict.fromkeys(ft_d, "F32")
    eager, _ = state_dict_task_vector(ft_d, base_d)
    for scope in ("global", "tensor"):
        out = compress(lazy, density=0.1, scope=scope)
        # no earlier value of either side is alive when the next one is fetched
        assert max(base.alive + ft.alive) == 0
        assert out == compress(eager, density=0.1, scope=scope)
    with pytest.raises(KeyError):
        lazy["nope"]


def test_eager_state_dict_reads_one_pair_at_a_time():
    rng = np.random.default_rng(3)
    base_d = {f"w{i}": rng.standard_normal(100).astype(np.float32) for i in range(5)}
    base, ft = CountingMapping(base_d), CountingMapping({n: v * 2 for n, v in base_d.items()})
    state_dict_task_vector(ft, base)
    assert max(base.alive) == 0
    assert max(ft.alive) == 0


# ---------------------------------------------------------------------------------------------
# apply_task_vector: one correct rounding from the exact sum
# ---------------------------------------------------------------------------------------------
def nearest(x: Fraction, dname: str) -> float:
    """Reference: the F32/F16/BF16 value nearest to the exact rational x, ties to even."""
    f = float(x)  # within one target ulp of x, so the answer is f's neighbour or f itself
    if dname == "BF16":
        top = int(np.array([f], np.float32).view(np.uint32)[0]) >> 16
        bits = [(top + d) & 0xFFFF for d in (-1, 0, 1, 2)]
        vals = [float(dt.bf16_bits_to_f32(np.array([b], np.uint16))[0]) for b in bits]
    else:
        typ = np.float32 if dname == "F32" else np.float16
        t = typ(f)
        vals_t = [np.nextafter(t, typ(-np.inf)), t, np.nextafter(t, typ(np.inf))]
        bits = [
            int(np.array([v]).view(np.uint32 if typ is np.float32 else np.uint16)[0])
            for v in vals_t
        ]
        vals = [float(v) for v in vals_t]
    cands = [
        (abs(Fraction(v) - x), b & 1, v) for v, b in zip(vals, bits, strict=True) if np.isfinite(v)
    ]
    return min(cands)[2]


def near_midpoints(rng, n: int, dname: str) -> tuple[np.ndarray, np.ndarray]:
    """Base and float32 delta whose exact sum lies a few float32 ulps (of the delta) from a
    midpoint of the target dtype: where rounding through float32 first goes wrong."""
    bits = 8 if dname == "BF16" else 11  # significand bits of the target
    e = rng.integers(-6, 6, n)
    v = np.exp2(e) * (1 + rng.integers(0, 2 ** (bits - 1), n) / 2 ** (bits - 1))
    mid = v + np.exp2(e - bits)  # v + half an ulp: exactly representable in float32
    scale = np.exp2(rng.integers(-4, -1, n))
    base = (v * scale).astype(np.float32)
    base = (
        torch.tensor(base).bfloat16().float().numpy()
        if dname == "BF16"
        else base.astype(np.float16)
    ).astype(np.float64)
    d0 = (mid - base).astype(np.float32)  # exact: few significant bits
    steps = rng.integers(-2, 3, n)
    delta = d0.copy()
    for k in (1, 2):
        up, down = steps >= k, steps <= -k
        delta[up] = np.nextafter(delta[up], np.float32(np.inf))
        delta[down] = np.nextafter(delta[down], np.float32(-np.inf))
    # a third: the delta is the midpoint itself and a tiny base (below half a float32 ulp of
    # the sum, so float32 would tie) decides the direction
    third = slice(0, n // 3)
    tiny = 2.0**-24 if dname == "F16" else 2.0**-100  # representable in the base dtype
    delta[third] = (mid[third] * 256).astype(np.float32)  # >= 4: float32 ulp above 2^-22
    base[third] = tiny * np.where(rng.random(n // 3) < 0.5, -1.0, 1.0)
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    return base * sign, (delta * sign).astype(np.float32)


def test_apply_avoids_double_rounding():
    # exact sum 1 + 2^-8 + 2^-31 lies just above a bf16 midpoint: float32 first would tie down
    base = {"w": torch.tensor([1.0], dtype=torch.bfloat16)}
    out = apply_task_vector(base, {"w": np.array([2.0**-8 + 2.0**-31], np.float32)})
    assert out["w"].item() == 1.0 + 2.0**-7
    # the tail 2^-70 is below float64's reach: TwoSum keeps it
    base = {"w": torch.tensor([2.0**-70], dtype=torch.bfloat16)}
    out = apply_task_vector(base, {"w": np.array([1.0 + 2.0**-8], np.float32)})
    assert out["w"].item() == 1.0 + 2.0**-7
    # F16: 1 + 2^-11 + 2^-24 rounds up; via float32 it would tie down to 1
    out = apply_task_vector(
        {"w": np.array([2.0**-24], np.float16)}, {"w": np.array([1 + 2.0**-11], np.float32)}
    )
    assert out["w"].tolist() == [1 + 2.0**-10]
    # F32 with a float64 delta: 1 + 2^-24 + 2^-60
    out = apply_task_vector(
        {"w": np.array([1.0], np.float32)}, {"w": np.array([2.0**-24 + 2.0**-60])}
    )
    assert out["w"].tolist() == [1 + 2.0**-23]
    assert out["w"].dtype == np.float32


@pytest.mark.parametrize("dname", ["F32", "F16", "BF16", "F64"])
def test_apply_matches_exact_rounding(dname):
    rng = np.random.default_rng(4)
    n = 400
    base_vals = rng.standard_normal(n) * np.exp2(rng.integers(-12, 4, n))
    delta = (rng.standard_normal(n) * np.exp2(rng.integers(-40, 4, n))).astype(np.float32)
    if dname in ("BF16", "F16"):
        base_vals[: n // 2], delta[: n // 2] = near_midpoints(rng, n // 2, dname)
    if dname == "BF16":
        base = torch.tensor(base_vals, dtype=torch.float32).bfloat16()
        b_exact = base.float().numpy().astype(np.float64)
    else:
        np_dtype = {"F32": np.float32, "F16": np.float16, "F64": np.float64}[dname]
        base = base_vals.astype(np_dtype)
        b_exact = base.astype(np.float64)
    got = apply_task_vector({"w": base}, {"w": delta})["w"]
    got = got.float().numpy() if dname == "BF16" else got
    for i in range(n):
        exact = Fraction(float(b_exact[i])) + Fraction(float(delta[i]))
        want = float(exact) if dname == "F64" else nearest(exact, dname)
        assert float(got[i]) == want, (i, float(b_exact[i]), float(delta[i]))


def test_apply_with_ternary_delta_and_torch():
    base = {"w": torch.zeros(2, 3, dtype=torch.bfloat16), "b": torch.ones(3)}
    delta = {"w": TernaryTensor((2, 3), [1, 4], [False, True], 0.1, "BF16")}
    out = apply_task_vector(base, delta)
    assert out["b"] is base["b"]
    assert out["w"].dtype == torch.bfloat16
    assert torch.equal(out["w"], delta["w"].to_torch())


def test_apply_errors():
    with pytest.raises(EncodeError, match="not in the base") as info:
        apply_task_vector({"a": np.ones(2)}, {"b": np.ones(2)})
    assert info.value.tensor == "b"
    with pytest.raises(EncodeError, match="shape") as info:
        apply_task_vector({"a": np.ones(2)}, {"a": np.ones(3)})
    assert info.value.tensor == "a"
    with pytest.raises(EncodeError, match="I64") as info:
        apply_task_vector({"ids": np.arange(2)}, {"ids": np.ones(2)})
    assert info.value.tensor == "ids"


def test_apply_keeps_non_finite_base_values():
    out = apply_task_vector(
        {"w": np.array([np.inf, -np.inf, np.nan, 1.0], np.float32)}, {"w": np.ones(4, np.float32)}
    )
    assert np.isposinf(out["w"][0])
    assert np.isneginf(out["w"][1])
    assert np.isnan(out["w"][2])
    assert out["w"][3] == 2.0
    big = apply_task_vector(
        {"w": torch.tensor([3.0e38], dtype=torch.bfloat16)}, {"w": np.array([3.0e38], np.float32)}
    )
    assert torch.isinf(big["w"]).all()
    assert dt.storage_dtype("BF16") == np.uint16
