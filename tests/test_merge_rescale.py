"""The merge-aware TIES divisor (``rescale="dense_divisor"``) and the ``zeros`` counts behind it.

The rule claims: TIES over compressed experts, with each dropped entry counted in the divisor
with the chance ``p`` that its (unknown) sign agrees, passes each expert through as strongly
as TIES over the uncompressed experts does, where plain TIES passes it about twice as strongly.
These tests check the arithmetic against a per-entry definition and the claim on synthetic
task vectors (the real experts' measurement is ``bench/merge_quality.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compeft_format import TernaryTensor
from compeft_format.compress import compress
from compeft_format.merge import (
    MAX_PATTERN_INPUTS,
    MergeError,
    Rescale,
    TensorMerge,
    combine,
    dense_divisor,
    merge,
)


def naive_ties(stack: np.ndarray, zeros: list[float]) -> np.ndarray:
    """TIES entry by entry: agreeing inputs averaged, each zero input adding zeros[i]."""
    out = np.zeros(stack.shape[1])
    for j in range(stack.shape[1]):
        col = stack[:, j]
        elected = 1.0 if col.sum() >= 0 else -1.0
        agree = np.sign(col) == elected
        div = agree.sum() + sum(z for z, v in zip(zeros, col, strict=True) if v == 0)
        out[j] = col[agree].sum() / max(div, 1.0)
    return out


def ternary(values: np.ndarray) -> TernaryTensor:
    """A TernaryTensor from an array whose nonzeros share one magnitude."""
    idx = np.flatnonzero(values)
    scale = float(np.abs(values[idx[0]])) if idx.size else 0.0
    return TernaryTensor(values.shape, idx, values[idx] < 0, scale)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 4), m=st.integers(1, 40), seed=st.integers(0, 2**32 - 1),
       zeros=st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=4, max_size=4))
def test_combine_with_zeros_is_the_per_entry_definition(n, m, seed, zeros):
    rng = np.random.default_rng(seed)
    stack = rng.choice([-2.0, -1.0, 0.0, 0.0, 1.0, 3.0], size=(n, m))
    got = combine(stack, np.ones(n), "ties", "total", zeros[:n])
    np.testing.assert_allclose(got, naive_ties(stack, zeros[:n]), rtol=1e-12)
    # no zeros counts: PEFT's divisor, unchanged
    np.testing.assert_array_equal(combine(stack, np.ones(n), "ties", "total", None),
                                  combine(stack, np.ones(n), "ties", "total"))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 4), seed=st.integers(0, 2**32 - 1),
       zeros=st.lists(st.sampled_from([0.0, 0.3, 0.5, 1.0]), min_size=4, max_size=4))
def test_pattern_table_path_equals_the_dense_path(n, seed, zeros):
    rng = np.random.default_rng(seed)
    mags = rng.uniform(0.1, 2.0, n).astype(np.float32)
    rows = [rng.choice([-1, 0, 0, 0, 1], size=97).astype(np.float32) * m for m in mags]
    r = Rescale(zeros=tuple(zeros[:n]))
    fast = TensorMerge("w", (97,), "F32", [ternary(v) for v in rows], rescale=r)
    assert fast.patterns
    slow = TensorMerge("w", (97,), "F32", rows, rescale=r)  # dense inputs: combine per chunk
    np.testing.assert_allclose(fast.to_numpy(), slow.to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(fast.to_numpy(), naive_ties(np.stack(rows).astype(np.float64),
                                                           zeros[:n]), rtol=1e-6)


def _experts(rng, corr: float, n: int = 3) -> list[dict[str, np.ndarray]]:
    shared = rng.standard_normal((120, 250))
    return [{"w": ((np.sqrt(corr) * shared + np.sqrt(1 - corr) * rng.standard_normal(
        (120, 250))) * s).astype(np.float32)} for s in (1.0, 0.8, 1.2)[:n]]


def _share(merged: dict[str, np.ndarray], experts: list[dict[str, np.ndarray]]) -> np.ndarray:
    """How strongly each expert comes through: <merged, t_i> / ||t_i||^2."""
    return np.array([float((merged["w"] * t["w"]).sum() / (t["w"] ** 2).sum())
                     for t in experts])


@pytest.mark.parametrize("density", [0.2, 0.05])
def test_dense_divisor_passes_experts_as_strongly_as_the_originals_ties(density):
    experts = _experts(np.random.default_rng(1), corr=0.0)
    want = _share(merge(experts, method="ties", rescale=None), experts)
    comp = [compress(t, density=density) for t in experts]
    plain = _share(merge(comp, method="ties", rescale=None), experts)
    fixed = _share(merge(comp, method="ties", rescale="dense_divisor"), experts)
    assert np.all(plain / want > 1.4)  # the defect: TIES of compressed experts is near a sum
    np.testing.assert_allclose(fixed / want, 1.0, atol=0.2)
    # sum needs no fix: the default scale keeps each expert's share already
    np.testing.assert_allclose(_share(merge(comp, method="sum", rescale=None), experts),
                               _share(merge(experts, method="sum", rescale=None), experts),
                               atol=0.05)


def test_agreement_is_estimated_from_the_overlaps():
    rng = np.random.default_rng(2)
    for corr, lo, hi in ((0.0, 0.45, 0.55), (0.8, 0.75, 1.0)):
        comp = [compress(t, density=0.2)["w"] for t in _experts(rng, corr)]
        r = dense_divisor(TensorMerge("w", (120, 250), "F32", comp).stats())
        assert r.before is None
        assert r.after == 1.0
        assert r.zeros is not None
        assert len(set(r.zeros)) == 1
        assert lo < r.zeros[0] < hi, (corr, r.zeros)


def test_no_overlap_gives_one_half_and_an_empty_input_counts_nothing():
    a = TernaryTensor((6,), [0, 1], [False, True], 1.0)
    b = TernaryTensor((6,), [2, 3], [False, False], 0.5)
    empty = TernaryTensor((6,), [], [], 0.0)
    r = dense_divisor(TensorMerge("w", (6,), "F32", [a, b, empty]).stats())
    assert r.zeros == (0.5, 0.5, 0.0)
    got = merge([{"w": a}, {"w": b}, {"w": empty}], rescale="dense_divisor")["w"]
    np.testing.assert_allclose(got, [1 / 1.5, -1 / 1.5, 0.5 / 1.5, 0.5 / 1.5, 0, 0])


def test_identity_for_sum_mean_and_dense_inputs():
    a = TernaryTensor((4,), [0, 1], [False, True], 1.0)
    b = TernaryTensor((4,), [1, 2], [False, False], 0.5)
    for method in ("sum", "mean"):
        assert dense_divisor(TensorMerge("w", (4,), "F32", [a, b], method=method).stats()) \
            == Rescale()
        np.testing.assert_array_equal(
            merge([{"w": a}, {"w": b}], method=method, rescale="dense_divisor")["w"],
            merge([{"w": a}, {"w": b}], method=method, rescale=None)["w"])
    dense = [{"w": np.array([1.0, 0.0, -2.0], np.float32)},
             {"w": np.array([0.0, 0.0, 3.0], np.float32)}]
    np.testing.assert_array_equal(merge(dense, rescale="dense_divisor")["w"],
                                  merge(dense, rescale=None)["w"])
    # a dense input's zeros are real: only the ternary input's count
    r = dense_divisor(TensorMerge("w", (4,), "F32", [a, np.zeros(4, np.float32)]).stats())
    assert r.zeros == (0.5, 0.0)


def test_more_inputs_than_pattern_tables_use_one_half():
    rng = np.random.default_rng(3)
    n = MAX_PATTERN_INPUTS + 1
    rows = [rng.choice([-1, 0, 0, 0, 0, 1], size=50).astype(np.float32) for _ in range(n)]
    rows[0][:] = 0  # no kept entry: counts nothing
    tm = TensorMerge("w", (50,), "F32", [ternary(v) for v in rows], rescale="dense_divisor")
    assert not tm.patterns
    assert tm.rescale.zeros == (0.0,) + (0.5,) * (n - 1)
    np.testing.assert_allclose(tm.to_numpy(), naive_ties(np.stack(rows).astype(np.float64),
                                                         [0.0] + [0.5] * (n - 1)), rtol=1e-6)


@pytest.mark.parametrize("zeros", [(0.5,), (0.5, -0.1), (0.5, float("nan"))])
def test_bad_zeros_are_refused(zeros):
    a = TernaryTensor((4,), [0], [False], 1.0)
    with pytest.raises(MergeError, match=r"zeros|finite"):
        TensorMerge("w", (4,), "F32", [a, a], rescale=Rescale(zeros=zeros)).to_numpy()
