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


# --- more trios of experts (bench/experts.py --seed) and pooling over them -----------------
ex_mod = pytest.importorskip("bench.experts", reason="the bench needs torch")


def test_trio_0s_derived_seeds_are_the_ones_the_cached_experts_were_made_with():
    # before --seed the code spelled them SEED, SEED + 1 + task index, SEED + 7 (SEED = 0)
    assert ex_mod.derived_seeds(0) == {
        "split": {"sentiment": "0-sentiment", "frequency": "0-frequency",
                  "syllables": "0-syllables"},
        "init": 0, "heads": {"sentiment": 1, "frequency": 2, "syllables": 3}, "batches": 7}
    assert ex_mod.default_cache(0) == ex_mod.CACHE
    assert ex_mod.default_cache(1) == ex_mod.CACHE.with_name(ex_mod.CACHE.name + "-seed1")
    # no two trios share a torch or numpy seed, and each trio's split is its own
    used = [s for k in range(5) for d in [ex_mod.derived_seeds(k)]
            for s in (d["init"], d["batches"], *d["heads"].values())]
    assert len(used) == len(set(used))
    assert ex_mod.derived_seeds(1)["split"]["syllables"] == "1-syllables"
    with pytest.raises(ValueError, match="seed"):
        ex_mod.derived_seeds(-1)


def test_load_task_shuffles_with_the_trios_split_seed(monkeypatch):
    import random

    words = {f"w{i:03d}": 1 + i % 4 for i in range(60)}
    monkeypatch.setattr(ex_mod, "_cmudict", lambda: dict(words))
    pairs = sorted((w, float(n - 1)) for w, n in words.items())
    old = list(pairs)
    random.Random("0-syllables").shuffle(old)  # what the code did before --seed
    t0 = ex_mod.load_task("syllables", None)
    assert list(zip(t0.words, t0.targets, strict=True)) == old
    assert ex_mod.load_task("syllables", None, seed=0).words == t0.words
    t1 = ex_mod.load_task("syllables", None, seed=1)
    assert t1.words != t0.words
    assert sorted(t1.words) == sorted(t0.words)


def test_make_init_seeds_torch_with_the_trios_init_seed(monkeypatch, tmp_path):
    import torch

    drawn = {}

    class Fake:
        def save_pretrained(self, out):
            drawn[out] = torch.rand(3)

    monkeypatch.setattr(ex_mod, "peft_model", lambda enc: Fake())
    for seed in (0, 1):
        ex_mod.make_init(None, tmp_path / str(seed), seed)
    torch.manual_seed(0)
    assert torch.equal(drawn[str(tmp_path / "0")], torch.rand(3))
    torch.manual_seed(100)
    assert torch.equal(drawn[str(tmp_path / "1")], torch.rand(3))


def test_item_cache_keys_on_the_experts(tmp_path):
    path = tmp_path / "scores.npz"
    fa, fb = np.arange(4.0), np.arange(4.0) + 10
    calls = []

    def make(v):
        def f():
            calls.append(v)
            return {"t": np.full(3, v)}
        return f

    # a file in the layout before the key named the experts: taken over by its trio
    np.savez(path, fingerprint=fa, **{"tv:abc|t": np.full(3, 1.0)})
    store = mq.ItemCache(path)
    store.use("experts:A", fa)
    got, hit = store.get("tv:abc", ("t",), make(9.0))
    assert hit
    assert got["t"].tolist() == [1.0] * 3
    assert calls == []
    # the same model (weights digest) on another trio is another entry: no collision
    store.use("experts:B", fb)
    got, hit = store.get("tv:abc", ("t",), make(2.0))
    assert not hit
    assert got["t"].tolist() == [2.0] * 3
    again = mq.ItemCache(path)
    again.use("experts:A", fa)
    assert again.get("tv:abc", ("t",), make(9.0))[0]["t"].tolist() == [1.0] * 3
    # a trio whose fingerprint changed loses its own entries only
    again.use("experts:B", fb + 1)
    assert not again.get("tv:abc", ("t",), make(3.0))[1]
    again.use("experts:A", fa)
    assert again.get("tv:abc", ("t",), make(9.0))[1]
    assert calls == [2.0, 3.0]
    with pytest.raises(RuntimeError, match="use"):
        mq.ItemCache(None).get("k", ("t",), make(0.0))


def _trio_items(rng, shift, n=(300, 2000)):
    """Per-word scores of a fake trio: base, experts, originals' TIES, and a row ``shift``
    (in the expert's gain units) below it, with its own per-word noise."""
    tasks = ("a", "b")
    base = {t: rng.normal(0, 1, k) for t, k in zip(tasks, n, strict=True)}
    items = {"base": base}
    for t in tasks:
        items[f"expert {t}"] = {u: base[u] + (1.0 if u == t else -0.2) for u in tasks}
    ref = {t: base[t] + 0.6 + rng.normal(0, 0.5, base[t].size) for t in tasks}
    items["originals|ties|none"] = ref
    items["compressed 0.2|ties|expected_ties"] = {
        t: ref[t] + shift + rng.normal(0, 0.5, base[t].size) for t in tasks}
    return tasks, items


def test_pooled_gaps_are_the_mean_of_the_trios_with_a_narrower_interval():
    rng = np.random.default_rng(11)
    tasks, t0 = _trio_items(rng, -0.01)
    _, t1 = _trio_items(rng, -0.05)
    pair = {"g": ("compressed 0.2|ties|expected_ties", "originals|ties|none")}
    p = mq.pooled_gaps([t0, t1], tasks, pair, reps=400)["g"]
    e = {t: f"expert {t}" for t in tasks}
    want = [mq.normalised_mean(t, pair["g"][0], tasks, e)
            - mq.normalised_mean(t, pair["g"][1], tasks, e) for t in (t0, t1)]
    assert p["gaps"] == pytest.approx(want)
    assert p["gap"] == pytest.approx(np.mean(want))
    assert want[0] > want[1] + 0.02  # the two trios' gaps differ as built
    # trio 0's interval is its own bootstrap's (seed 0): the one the single-trio tables give
    boot = mq.bootstrap(t0, tasks, e, reps=400, seed=0)
    assert p["intervals95"][0] == pytest.approx(mq.interval(
        boot[pair["g"][0]]["mean"] - boot[pair["g"][1]]["mean"]))
    # pooling two independent trios of like noise narrows the interval by about sqrt(2)
    widths = [b - a for a, b in p["intervals95"]]
    pooled = p["interval95"][1] - p["interval95"][0]
    assert pooled < 0.85 * min(widths)
    assert pooled == pytest.approx(np.hypot(*widths) / 2, rel=0.2)
    assert p["interval95"][0] < p["gap"] < p["interval95"][1]
    assert p["sd_between"] == pytest.approx(np.std(want, ddof=1))


def test_pooled_gap_of_a_row_equal_to_its_reference_is_exactly_zero():
    rng = np.random.default_rng(12)
    trios = []
    for _ in range(3):
        tasks, items = _trio_items(rng, 0.0)
        items["same"] = items["originals|ties|none"]
        trios.append(items)
    p = mq.pooled_gaps(trios, tasks, {"g": ("same", "originals|ties|none")}, reps=100)["g"]
    assert p["gaps"] == [0.0, 0.0, 0.0]
    assert p["interval95"] == [0.0, 0.0]


@pytest.mark.parametrize("module", [mq, ex_mod], ids=["merge_quality", "experts"])
def test_bench_doctests(module):
    import doctest

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted
    assert not result.failed


def test_trios_pool_the_target_rows_and_render_them():
    rng = np.random.default_rng(13)
    densities = (0.2, 0.1)
    measured = []
    for seed, shift in ((0, -0.03), (1, 0.1)):
        tasks, items = _trio_items(rng, 0.0)
        items["originals|ties-freq|none"] = items["originals|ties|none"]
        rows = []
        for d in densities:
            for v in mq.TARGET_ROWS:
                for k, rule in enumerate(("none", *mq.TARGET_RULES)):
                    key = f"compressed {d}|{v}|{rule}"
                    items[key] = {t: items[f"originals|{v}|none"][t] + shift * k
                                  for t in tasks}
                    rows.append({"source": f"compressed {d}", "method": v, "rule": rule,
                                 "normalised": {"mean": 0.0}})
        res = {"tasks": list(tasks), "experts_dir": f"/x/{seed}", "experts_id": "experts:x",
               "seed": seed, "words": {t: items["base"][t].size for t in tasks},
               "base": dict.fromkeys(tasks, 0.0),
               "experts": {e: dict.fromkeys(tasks, 1.0) for e in tasks}, "seconds": 1.0,
               "models": 1, "reused_rows": 0, "target": 0.02, "fix": "expected_ties",
               "rows": [{"source": "originals", "method": v, "rule": "none",
                         "normalised": {"mean": 0.5}} for v in mq.TARGET_ROWS] + rows}
        measured.append((res, items))
    summary, pooled, rules = mq.trios(measured, densities, reps=100)
    assert [s["seed"] for s in summary] == [0, 1]
    # the rows are the originals' plus shift x (0, 1, 2) in raw per-word score; the experts'
    # gain is 1 on each task, so the normalised gaps are shift x (0, 1, 2) exactly
    et = pooled["compressed 0.2|ties|expected_ties"]
    assert et["gaps"] == pytest.approx([-0.06, 0.2])
    assert et["gap"] == pytest.approx(0.07)
    assert et["verdict"].startswith("misses above")
    assert pooled["compressed 0.2|ties|dense_divisor"]["gaps"] == pytest.approx([-0.03, 0.1])
    assert pooled["compressed 0.1|ties|none"]["verdict"] == "within, resolved"
    diff = rules["compressed 0.1|ties-freq|expected_ties - dense_divisor"]
    assert diff["gaps"] == pytest.approx([-0.03, 0.1])
    res = dict(measured[0][0], trios=summary, pooled=pooled, pooled_rules=rules)
    text = "\n".join(mq.trios_section(res, densities))
    assert "## Across 2 trios of experts (seeds 0, 1)" in text
    assert "--experts /x/0 /x/1" in text
    assert "**+0.070**" in text
    # over the two trios as draws: 0.07 -+ 12.706 * sd([-0.06, 0.2]) / sqrt(2) = -+ 1.652
    assert et["interval95_trios"] == pytest.approx([0.07 - 1.6518, 0.07 + 1.6518], abs=1e-3)
    assert "**[-1.582, +1.722]** (not resolved against -0.02" in text
