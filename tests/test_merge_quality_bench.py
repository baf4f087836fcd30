"""The pieces of bench/merge_quality.py that its figures rest on: the paired bootstrap, each
task's part of the noise, the met / not met verdict, the cache key and the oracle bound."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

mq = pytest.importorskip("bench.merge_quality", reason="the bench needs torch")

from compeft_format.compress import compress  # noqa: E402
from compeft_format.merge import merge  # noqa: E402


def test_bootstrap_is_paired_and_normalised():
    rng = np.random.default_rng(0)
    base = {"a": rng.normal(0, 1, 300), "b": rng.normal(0, 1, 40)}
    expert = {t: v + 1 for t, v in base.items()}
    items = {"base": base, "ea": expert, "eb": expert,
             "half": {t: v + 0.5 for t, v in base.items()},
             "noisy": {t: v + 0.5 + rng.normal(0, 1, v.size) for t, v in base.items()}}
    boot = mq.bootstrap(items, ("a", "b"), {"a": "ea", "b": "eb"}, reps=200)
    # a model that moves every word by half the expert's gain scores 0.5 on every draw
    np.testing.assert_allclose(boot["half"]["mean"], 0.5)
    assert boot["noisy"]["mean"].std() > 0.05
    # the tasks' words are drawn independently: the parts of the variance add up to 1, and
    # the task with 40 words carries most of it
    diff = {k: boot["noisy"][k] - boot["half"][k] for k in ("a", "b", "mean")}
    shares = mq.noise_shares(diff, ("a", "b"))
    assert sum(shares.values()) == pytest.approx(1)
    assert shares["b"] > 0.7
    assert np.var(diff["mean"]) == pytest.approx((np.var(diff["a"]) + np.var(diff["b"])) / 4,
                                                 rel=0.25)


@pytest.mark.parametrize(("gap", "iv", "want"), [
    (-0.01, [-0.015, 0.0], "within, resolved"),
    (-0.01, [-0.05, 0.03], "within, not resolved"),
    (-0.025, [-0.057, 0.008], "misses, not resolved"),
    (-0.1, [-0.2, -0.05], "misses, resolved"),
    (0.05, [0.021, 0.09], "misses, resolved"),
])
def test_verdict(gap, iv, want):
    assert mq.verdict(gap, iv, 0.02) == want


def test_digest_changes_with_the_weights_only():
    a = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "y": np.ones(2, np.float32)}
    same = {"y": np.ones(2, np.float64), "x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    assert mq.digest(a) == mq.digest(same)  # order and float64 copies of the same values
    b = dict(a, y=np.array([1.0, 1.5], np.float32))
    assert mq.digest(a) != mq.digest(b)
    assert mq.digest(a) != mq.digest({"x": a["x"].reshape(3, 2), "y": a["y"]})


def test_oracle_keeps_the_originals_projections_exactly():
    rng = np.random.default_rng(3)
    experts = [{"w": (rng.standard_normal((60, 80)) * s).astype(np.float32),
                "v": (rng.standard_normal((30, 10)) * s).astype(np.float32)}
               for s in (1, 0.8, 1.2)]  # matrices: one scale per expert, one scope
    comp = [compress(t, density=0.1) for t in experts]
    names = sorted(experts[0])
    parts = [mq._flat(mq.expected_parts(comp, mu), names) for mu in np.eye(4)]
    # the parts rebuild the rule: its table is linear in the multipliers
    rule = mq._flat(merge(comp, method="ties", rescale="expected_ties"), names)
    dense = np.stack([mq._flat(t, names) for t in experts])
    mu = np.linalg.lstsq((dense @ np.stack(parts[1:]).T), dense @ (rule - parts[0]),
                         rcond=None)[0]
    np.testing.assert_allclose(parts[0] + mu @ np.stack(parts[1:]), rule, atol=1e-5)
    oracle = mq._flat(mq.oracle_merge(experts, parts, names), names)
    ties = mq._flat(merge(experts, method="ties"), names)
    np.testing.assert_allclose(dense @ oracle, dense @ ties, rtol=1e-4)


def _experts(rng, names=("m.lora_A.weight", "m.lora_B.weight", "n.lora_A.weight",
                         "n.lora_B.weight")):
    shapes = {"lora_A": (4, 30), "lora_B": (20, 4)}
    return [{n: (rng.standard_normal(shapes[n.split(".")[1]]) * s).astype(np.float32)
             for n in names} for s in (1, 0.8, 1.2)]


def test_oracle_groups_keep_each_groups_projections():
    experts = _experts(np.random.default_rng(4))
    comp = [compress(t, density=0.1, scale="proj_vcap") for t in experts]
    names = sorted(experts[0])
    parts = [mq._flat(mq.expected_parts(comp, mu), names) for mu in np.eye(4)]
    ties = merge(experts, method="ties")
    per_tensor = mq.oracle_groups(experts, parts, names, lambda n: n)
    scope = mq.oracle_merge(experts, parts, names)
    off = 0.0
    for n in names:
        dense = np.stack([t[n].ravel() for t in experts])
        np.testing.assert_allclose(dense @ per_tensor[n].ravel(), dense @ ties[n].ravel(),
                                   rtol=1e-3, atol=1e-4)
        off += float(np.abs(dense @ (scope[n] - ties[n]).ravel()).sum())
    assert off > 1e-2  # the scope-wide oracle keeps them only summed over the tensors


def test_product_fit_brings_the_products_closer():
    rng = np.random.default_rng(5)
    experts = _experts(rng)
    init = {n: (rng.standard_normal(v.shape) if "lora_A" in n else np.zeros(v.shape)
                ).astype(np.float32) for n, v in experts[0].items()}
    comp = [compress(t, density=0.1, scale="proj_vcap") for t in experts]
    merged = merge(comp, method="ties")
    fitted = mq.product_fit(merged, experts, init)
    target = merge(experts, method="ties")

    def err(m, a):
        b = a.replace("lora_A", "lora_B")
        want = target[b] @ (init[a] + target[a])
        return float(((m[b] @ (init[a] + m[a]) - want) ** 2).sum())

    for a in ("m.lora_A.weight", "n.lora_A.weight"):
        assert err(fitted, a) < 0.9 * err(merged, a)
