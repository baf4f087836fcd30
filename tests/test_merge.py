"""merge: task arithmetic and TIES on task vectors, checked against PEFT's merge_utils."""

from __future__ import annotations

import doctest
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft.utils import merge_utils

import compeft_format.merge as M
import compeft_format.merge_compress as MC
from compeft_format import EncodeError, TernaryTensor, compress
from compeft_format.merge import MergeError, MergeStats, Rescale, merge, merge_tensor

# ---------------------------------------------------------------------------------------------
# the reference: PEFT itself
# ---------------------------------------------------------------------------------------------


def peft_merge(tensors: list[np.ndarray], weights, method: str, sign: str = "total"):
    """PEFT's merge of float32 (float64) arrays; ``mean`` is task arithmetic over n."""
    ts = [torch.from_numpy(np.ascontiguousarray(t)) for t in tensors]
    w = torch.tensor(list(weights), dtype=ts[0].dtype)
    if method == "ties":
        with warnings.catch_warnings():  # density 1.0: "no pruning will be performed"
            warnings.simplefilter("ignore")
            return merge_utils.ties(ts, w, 1.0, sign).numpy()
    out = merge_utils.task_arithmetic(ts, w).numpy()
    return out / np.float32(len(ts)) if method == "mean" else out


def decoded(t: TernaryTensor) -> np.ndarray:
    """The task vector a ternary tensor stands for, in the compute dtype."""
    v = t.to_numpy()
    return v.astype(np.float64 if t.dtype == "F64" else np.float32)


# ---------------------------------------------------------------------------------------------
# strategies: ternary experts with controlled supports
# ---------------------------------------------------------------------------------------------
# dyadic magnitudes and weights: every sum is exact in float32 whatever the order of the
# additions, so results must equal PEFT's bit for bit (its reduction order varies by element)
DYADIC_SCALES = st.integers(0, 512).map(lambda k: k / 64)
DYADIC_WEIGHTS = st.integers(-8, 8).map(lambda k: k / 4)


@st.composite
def st_experts(draw, *, max_n: int = 6, scales=DYADIC_SCALES, dtype: str = "F32"):
    """``(shape, [TernaryTensor])``: n experts whose supports overlap, coincide or are disjoint."""
    n = draw(st.integers(1, max_n))
    shape = draw(st.sampled_from([(), (0,), (1,), (7,), (3, 5), (4, 1, 6), (64,), (2, 33)]))
    numel = int(np.prod(shape))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    mode = draw(st.sampled_from(["independent", "same", "disjoint", "zero"]))
    densities = [draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])) for _ in range(n)]
    owner = rng.integers(0, n, numel)  # disjoint supports: each entry has one owner
    common = rng.random(numel) < densities[0]
    out = []
    for i in range(n):
        if mode == "independent":
            mask = rng.random(numel) < densities[i]
        elif mode == "same":
            mask = common
        elif mode == "disjoint":
            mask = (owner == i) & (rng.random(numel) < max(densities[i], 0.5))
        else:
            mask = np.zeros(numel, bool)
        idx = np.flatnonzero(mask)
        scale = draw(scales) if mode != "zero" else 0.0
        out.append(TernaryTensor(shape, idx, rng.random(idx.size) < 0.5, scale, dtype))
    return shape, out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st_experts(), st.data())
def test_ties_equals_peft(experts, data):
    shape, ts = experts
    weights = data.draw(st.lists(DYADIC_WEIGHTS, min_size=len(ts), max_size=len(ts)))
    sign = data.draw(st.sampled_from(M.SIGN_METHODS))
    got = merge_tensor(ts, method="ties", weights=weights, sign=sign)
    want = peft_merge([decoded(t) for t in ts], weights, "ties", sign)
    assert got.shape == shape
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


@settings(max_examples=100, deadline=None)
@given(st_experts(), st.data())
def test_sum_and_mean_equal_task_arithmetic(experts, data):
    _shape, ts = experts
    weights = data.draw(st.lists(DYADIC_WEIGHTS, min_size=len(ts), max_size=len(ts)))
    for method in ("sum", "mean"):
        got = merge_tensor(ts, method=method, weights=weights)
        np.testing.assert_array_equal(got, peft_merge([decoded(t) for t in ts], weights,
                                                      method))


@settings(max_examples=80, deadline=None)
@given(st_experts(max_n=10, scales=st.floats(0, 10, width=32)), st.data())
def test_any_float_scales_close_to_peft(experts, data):
    """Arbitrary magnitudes and weights: equal up to the order of float additions.

    PEFT (PyTorch) adds the stacked inputs in an order that depends on the element's place
    in the vectorised loop; where a sum is within rounding of zero the elected sign may
    differ, and only there may the results differ by more than rounding.
    """
    _, ts = experts
    weights = data.draw(st.lists(st.floats(-3, 3, width=32), min_size=len(ts),
                                 max_size=len(ts)))
    sign = data.draw(st.sampled_from(M.SIGN_METHODS))
    dense = [decoded(t) for t in ts]
    for method in M.METHODS:
        got = merge_tensor(ts, method=method, weights=weights, sign=sign)
        want = peft_merge(dense, weights, method, sign)
        scale = sum(abs(w) * float(np.abs(d).max(initial=0)) for w, d in zip(weights, dense,
                                                                               strict=True))
        close = np.isclose(got, want, rtol=1e-5, atol=1e-6 * max(scale, 1e-30))
        if method == "ties" and sign == "total":
            total = np.sum(dense, axis=0) if dense[0].size else np.zeros(0)
            near_zero = np.abs(total) <= 1e-5 * sum(np.abs(d) for d in dense)
            close |= near_zero.reshape(close.shape)
        assert close.all(), (method, sign, got, want)


def test_pattern_path_equals_dense_path(monkeypatch):
    """The table of sign patterns gives the very values of the stacked dense arithmetic."""
    rng = np.random.default_rng(7)
    for n in (1, 2, 3, 5, 8):
        ts = [TernaryTensor((1000,), idx, rng.random(idx.size) < 0.5,
                            float(rng.lognormal()))
              for idx in (np.flatnonzero(rng.random(1000) < 0.3) for _ in range(n))]
        weights = rng.normal(size=n).tolist()
        fast = {(m, s): merge_tensor(ts, method=m, weights=weights, sign=s)
                for m in M.METHODS for s in M.SIGN_METHODS}
        with monkeypatch.context() as mp:
            mp.setattr(M, "MAX_PATTERN_INPUTS", 0)
            for (m, s), want in fast.items():
                np.testing.assert_array_equal(
                    merge_tensor(ts, method=m, weights=weights, sign=s), want)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunk_boundaries(monkeypatch, chunk):
    rng = np.random.default_rng(chunk)
    ts = [TernaryTensor((10, 13), idx, rng.random(idx.size) < 0.5, 0.25 * (i + 1))
          for i, idx in enumerate(np.flatnonzero(rng.random(130) < 0.4) for _ in range(3))]
    want = merge_tensor(ts, weights=[1, -2, 0.5])
    monkeypatch.setattr(M, "_CHUNK", chunk)
    np.testing.assert_array_equal(merge_tensor(ts, weights=[1, -2, 0.5]), want)
    with monkeypatch.context() as mp:
        mp.setattr(M, "MAX_PATTERN_INPUTS", 0)
        np.testing.assert_array_equal(merge_tensor(ts, weights=[1, -2, 0.5]), want)
    np.testing.assert_array_equal(
        want, peft_merge([decoded(t) for t in ts], [1, -2, 0.5], "ties"))


# ---------------------------------------------------------------------------------------------
# dtypes and dense inputs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32", "F64"])
def test_dtypes_merge_the_decoded_values(dtype):
    rng = np.random.default_rng(3)
    ts = [TernaryTensor((50,), idx, rng.random(idx.size) < 0.5, 0.1 * (i + 1), dtype)
          for i, idx in enumerate(np.flatnonzero(rng.random(50) < 0.5) for _ in range(3))]
    got = merge_tensor(ts, weights=[0.5, 1, 2])
    work = np.float64 if dtype == "F64" else np.float32
    assert got.dtype == work
    want = peft_merge([t.to_numpy().astype(work) for t in ts], [0.5, 1, 2], "ties")
    np.testing.assert_array_equal(got, want)


def test_dense_inputs_numpy_and_torch():
    rng = np.random.default_rng(4)
    dense = [rng.normal(size=(6, 7)).astype(np.float32) for _ in range(3)]
    dense[1][dense[1] < 0.3] = 0  # some zeros, which never vote
    for method in M.METHODS:
        for sign in M.SIGN_METHODS:
            want = peft_merge(dense, [1, 2, 3], method, sign)
            np.testing.assert_allclose(merge_tensor(dense, method=method, weights=[1, 2, 3],
                                                    sign=sign), want, rtol=1e-6, atol=1e-7)
    bf = [torch.from_numpy(d).to(torch.bfloat16) for d in dense]
    want = peft_merge([b.float().numpy() for b in bf], [1, 1, 1], "ties")
    np.testing.assert_allclose(merge_tensor(bf), want, rtol=1e-6)
    # ternary and dense inputs of one tensor together
    t = TernaryTensor.from_dense(np.where(dense[0] > 0, 0.5, 0).astype(np.float32))
    want = peft_merge([t.to_numpy(), dense[2]], [1, 1], "ties")
    np.testing.assert_allclose(merge_tensor([t, dense[2]]), want, rtol=1e-6)


def test_merge_dicts_keep_names_and_order():
    e1 = {"b": TernaryTensor((3,), [0], [False], 1.0), "a": np.ones(2, np.float32)}
    e2 = {"a": np.full(2, 3.0, np.float32), "b": TernaryTensor((3,), [0, 2], [True, True], 2.0)}
    out = merge([e1, e2], method="sum")
    assert list(out) == ["b", "a"]
    assert out["b"].tolist() == [-1.0, 0.0, -2.0]
    assert out["a"].tolist() == [4.0, 4.0]


def test_all_zero_and_empty_tensors():
    z = TernaryTensor.zeros((4, 4))
    assert merge_tensor([z, z]).tolist() == np.zeros((4, 4)).tolist()
    e = TernaryTensor.zeros((0, 3))
    assert merge_tensor([e, e, e]).shape == (0, 3)
    scalar = [TernaryTensor((), [0], [s], 1.0) for s in (True, False, True)]
    assert merge_tensor(scalar, sign="frequency").tolist() == -1.0
    assert merge_tensor(scalar, sign="total").tolist() == -1.0
    tied = [TernaryTensor((), [0], [s], 1.0) for s in (True, False)]
    assert merge_tensor(tied).tolist() == 1.0  # a zero sum counts as positive


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_mismatches_are_named():
    a = {"w": TernaryTensor((2, 3), [0], [False], 1.0), "v": np.zeros(2, np.float32)}
    with pytest.raises(MergeError, match=r"tensor 'v': in input 0, missing from input 1"):
        merge([a, {"w": a["w"]}])
    with pytest.raises(MergeError, match=r"tensor 'w'.*shape \[3, 2\] in input 1, \[2, 3\]"):
        merge([a, {**a, "w": TernaryTensor((3, 2), [0], [False], 1.0)}])
    with pytest.raises(MergeError, match=r"tensor 'w'.*dtype F16 in input 2, F32 in input 0"):
        merge([a, a, {**a, "w": TernaryTensor((2, 3), [0], [False], 1.0, "F16")}])
    with pytest.raises(MergeError, match=r"tensor 'v'.*dtype I64"):
        merge([a, {**a, "v": np.zeros(2, np.int64)}])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "median"}, "method must be one of"),
    ({"sign": "max"}, "sign must be one of"),
    ({"weights": [1.0]}, "1 weights for 2 inputs"),
    ({"weights": [1.0, float("nan")]}, "weights must be finite"),
    ({"weights": [1.0, True]}, "weights must be numbers"),
    ({"weights": "1,2"}, "weights must be a sequence"),
    ({"rescale": "no-such-rule"}, "rescale must be a callable or one of"),
])
def test_bad_options(kwargs, message):
    t = {"w": TernaryTensor((2,), [0], [False], 1.0)}
    with pytest.raises(MergeError, match=message):
        merge([t, t], **kwargs)


def test_bad_inputs():
    with pytest.raises(MergeError, match="no inputs"):
        merge([])
    with pytest.raises(MergeError, match="sequence of mappings"):
        merge({"w": np.zeros(1)})


# ---------------------------------------------------------------------------------------------
# the rescaling hook
# ---------------------------------------------------------------------------------------------
def _experts(n=3, size=200, seed=11):
    rng = np.random.default_rng(seed)
    return [TernaryTensor((size,), idx, rng.random(idx.size) < 0.5, 0.5 + i)
            for i, idx in enumerate(np.flatnonzero(rng.random(size) < 0.4) for _ in range(n))]


def test_stats_count_every_sign_pattern():
    ts = _experts()
    seen: list[MergeStats] = []
    merge_tensor(ts, rescale=lambda s: seen.append(s) or 1.0)
    (stats,) = seen
    dense = np.stack([np.sign(t.to_numpy()) for t in ts])  # +1, -1, 0
    digit = np.where(dense > 0, 1, np.where(dense < 0, 2, 0))
    codes = (digit * (3 ** np.arange(3))[:, None]).sum(axis=0)
    np.testing.assert_array_equal(stats.counts, np.bincount(codes, minlength=27))
    assert stats.magnitudes == (0.5, 1.5, 2.5)
    assert stats.n == 3
    assert stats.numel == 200
    nonzero = (dense != 0).sum(axis=0)
    np.testing.assert_array_equal(stats.overlap(), np.bincount(nonzero, minlength=4))
    # values(): the merged value of each pattern, as the merge computes it
    merged = merge_tensor(ts)
    np.testing.assert_array_equal(stats.values()[codes], merged)


def test_rescale_after_and_before():
    ts = _experts()
    plain = merge_tensor(ts, weights=[1, 2, 3])
    half = merge_tensor(ts, weights=[1, 2, 3], rescale=lambda s: 0.5)
    np.testing.assert_array_equal(half, plain * np.float32(0.5))
    before = (2.0, 0.25, 1.0)
    got = merge_tensor(ts, weights=[1, 2, 3], rescale=lambda s: Rescale(before, 3.0))
    scaled = [TernaryTensor(t.shape, t.indices, t.signs, t.scale * f) for t, f in
              zip(ts, before, strict=True)]
    want = peft_merge([decoded(t) for t in scaled], [1, 2, 3], "ties") * np.float32(3.0)
    np.testing.assert_array_equal(got, want)


def test_rescale_on_dense_inputs_and_named_rules(monkeypatch):
    dense = [np.arange(6, dtype=np.float32) - 2, np.ones(6, np.float32)]
    seen = []
    got = merge_tensor(dense, method="sum",
                       rescale=lambda s: seen.append(s) or Rescale((1.0, 2.0), 0.5))
    assert seen[0].counts is None
    assert seen[0].magnitudes == (None, None)
    np.testing.assert_array_equal(got, (dense[0] + 2 * dense[1]) * 0.5)
    with pytest.raises(MergeError, match="needs ternary inputs"):
        seen[0].overlap()
    monkeypatch.setitem(M.RESCALE_RULES, "halve", lambda s: 0.5)
    np.testing.assert_array_equal(merge_tensor(dense, method="sum", rescale="halve"),
                                  (dense[0] + dense[1]) * 0.5)


@pytest.mark.parametrize(("result", "message"), [
    ("x", "returns a float or a Rescale"),
    (float("inf"), "must be finite"),
    (Rescale((1.0,), 1.0), "1 input factors for 2 inputs"),
])
def test_rescale_rule_errors(result, message):
    ts = _experts(n=2)
    with pytest.raises(MergeError, match=message):
        merge_tensor(ts, rescale=lambda s: result)


def test_doctests():
    result = doctest.testmod(M, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 5
    assert result.failed == 0


def test_merge_io_doctests():
    from compeft_format import merge_io

    result = doctest.testmod(merge_io, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 2
    assert result.failed == 0


def test_merge_compress_doctests():
    from compeft_format import merge_compress

    result = doctest.testmod(merge_compress, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 6  # merge_and_compress and compress_merged
    assert result.failed == 0


# ---------------------------------------------------------------------------------------------
# compressing the merge again
# ---------------------------------------------------------------------------------------------
@st.composite
def st_expert_dicts(draw):
    """2-4 experts over a few named tensors (matrices and vectors), F32 or BF16."""
    n = draw(st.integers(2, 4))
    shapes = {"a.weight": (12, 9), "a.bias": (9,), "b": (3, 1, 5), "c": (1,)}
    dtype = draw(st.sampled_from(["F32", "BF16"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    experts = []
    for _ in range(n):
        tv = {}
        for name, shape in shapes.items():
            numel = int(np.prod(shape))
            idx = np.flatnonzero(rng.random(numel) < draw(st.sampled_from([0.0, 0.2, 0.6])))
            tv[name] = TernaryTensor(shape, idx, rng.random(idx.size) < 0.5,
                                     draw(st.sampled_from([0.0, 0.25, 1.0, 0.3])), dtype)
        experts.append(tv)
    return experts


def _same_ternary(got: TernaryTensor, want: TernaryTensor) -> None:
    assert got.shape == want.shape
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.signs, want.signs)
    assert got.scale == pytest.approx(want.scale, rel=1e-6, abs=0)


@settings(max_examples=60, deadline=None)
@given(st_expert_dicts(), st.data())
def test_merge_and_compress_equals_compress_of_the_merge(experts, data):
    method = data.draw(st.sampled_from(M.METHODS))
    sign = data.draw(st.sampled_from(M.SIGN_METHODS))
    weights = data.draw(st.lists(DYADIC_WEIGHTS, min_size=len(experts), max_size=len(experts)))
    density = data.draw(st.sampled_from([0.01, 0.1, 0.3, 1.0]))
    scope = data.draw(st.sampled_from(["global", "tensor"]))
    scale = data.draw(st.sampled_from(MC.PATTERN_SCALES))
    merged = merge(experts, method=method, weights=weights, sign=sign)
    from compeft_format.taskvec import TaskVector

    declared = TaskVector(merged, dtypes={n: t.dtype for n, t in experts[0].items()})
    want = compress(declared, density=density, scope=scope, scale=scale)
    got = MC.merge_and_compress(experts, density=density, method=method, weights=weights,
                               sign=sign, scope=scope, scale=scale)
    assert list(got) == list(experts[0])
    for name in got:
        _same_ternary(got[name], want[name])


def test_merge_and_compress_dense_fallback(monkeypatch):
    """Without pattern tables the dense merged tensors go through iter_compress: same result."""
    rng = np.random.default_rng(5)
    experts = [{"w": TernaryTensor((30, 20), idx, rng.random(idx.size) < 0.5, 0.1 * (i + 1)),
                "v": TernaryTensor((20,), [1, 4], [True, False], 0.2)}
               for i, idx in enumerate(np.flatnonzero(rng.random(600) < 0.3) for _ in range(3))]
    calls = []

    def rule(stats):
        calls.append(stats.name)
        return 0.5

    fast = MC.merge_and_compress(experts, density=0.1, rescale=rule)
    assert sorted(calls) == ["v", "w"]  # once per tensor, though each is read twice
    with monkeypatch.context() as mp:
        for module in (M, MC):  # both decide on the pattern path
            mp.setattr(module, "MAX_PATTERN_INPUTS", 0)
        calls.clear()
        slow = MC.merge_and_compress(experts, density=0.1, rescale=rule)
        assert sorted(calls) == ["v", "w"]
    for name in fast:
        _same_ternary(fast[name], slow[name])
    dense = {name: np.asarray(t.to_numpy()) for name, t in experts[0].items()}
    mixed = MC.merge_and_compress([experts[1], dense], density=0.1, scale="norm")
    want = compress(merge([experts[1], dense]), density=0.1, scale="norm")
    for name in mixed:
        _same_ternary(mixed[name], want[name])


@pytest.mark.parametrize(("scope", "scale"), [("role", "proj_vcap"), ("global", "gram"),
                                               ("tensor", "gram")])
def test_merge_and_compress_other_scopes_and_scales(scope, scale):
    """Scopes and scales without pattern arithmetic go through iter_compress: the same."""
    rng = np.random.default_rng(9)
    names = {"m.lora_A.weight": (4, 30), "m.lora_B.weight": (30, 4), "bias": (30,)}
    experts = [{n: TernaryTensor(s, idx, rng.random(idx.size) < 0.5, 0.1 * (i + 1))
                for n, s in names.items()
                for idx in [np.flatnonzero(rng.random(int(np.prod(s))) < 0.3)]}
               for i in range(3)]
    got = MC.merge_and_compress(experts, density=0.2, scope=scope, scale=scale)
    want = compress(merge(experts), density=0.2, scope=scope, scale=scale)
    for name in names:
        _same_ternary(got[name], want[name])


def test_merge_and_compress_errors():
    e = {"w": TernaryTensor((4,), [0], [False], 1.0)}
    with pytest.raises(EncodeError, match="density"):
        MC.merge_and_compress([e, e], density=0.0)
    with pytest.raises(EncodeError, match="scope"):
        MC.merge_and_compress([e, e], density=0.5, scope="model")
    huge = {"w": TernaryTensor((4,), [0], [False], 60000.0, "F16")}
    with pytest.raises(EncodeError, match="overflows the tensor's dtype F16"):
        MC.merge_and_compress([huge, huge], density=0.5, method="sum", scale="norm")
