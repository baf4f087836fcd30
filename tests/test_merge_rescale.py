"""The merge-aware TIES rules for compressed experts: ``rescale="dense_divisor"`` (and the
``zeros`` counts behind it) and ``rescale="expected_ties"`` (and the pattern ``table`` and the
``prepare`` step behind it).

The rule claims: TIES over compressed experts, with each dropped entry counted in the divisor
with the chance ``p`` that its (unknown) sign agrees, passes each expert through as strongly
as TIES over the uncompressed experts does, where plain TIES passes it about twice as strongly.
These tests check the arithmetic against a per-entry definition and the claim on synthetic
task vectors (the real experts' measurement is ``bench/merge_quality.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
from adapter_helpers import two_lora_experts
from cli_helpers import run
from hypothesis import given, settings
from hypothesis import strategies as st

import compeft_format as cf
from compeft_format import TernaryTensor
from compeft_format.compress import compress
from compeft_format.merge import (
    MAX_PATTERN_INPUTS,
    MergeError,
    Rescale,
    TensorMerge,
    combine,
    dense_divisor,
    expected_ties,
    merge,
)
from compeft_format.merge_compress import merge_and_compress
from compeft_format.merge_io import merge_files
from compeft_format.merge_rescale import expected_rescales


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
    comp = [compress(t, density=density, scale="proj_vcap") for t in experts]
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


# ---------------------------------------------------------------------------------------------
# expected_ties: E[TIES of the originals | what the compressions kept], at its projections
# ---------------------------------------------------------------------------------------------
def _projections(merged: dict[str, np.ndarray], experts: list[dict[str, np.ndarray]]
                 ) -> float:
    """sum_i <merged, t_i>: what the rule keeps equal to the originals' TIES."""
    return float(sum((merged["w"].astype(np.float64) * t["w"]).sum() for t in experts))


@pytest.mark.parametrize("density", [0.2, 0.1, 0.05])
def test_expected_ties_keeps_the_originals_ties_projections(density):
    # unequal experts (scales 1, 0.8, 1.2), entries normal as the model assumes
    experts = _experts(np.random.default_rng(1), corr=0.0)
    ties = merge(experts, method="ties", rescale=None)
    comp = [compress(t, density=density, scale="proj_vcap") for t in experts]
    got = merge(comp, method="ties", rescale="expected_ties")
    # the defining property: sum_i <merge, t_i> is that of TIES over the originals
    assert _projections(got, experts) / _projections(ties, experts) == pytest.approx(1, abs=0.02)
    # and so does each expert's own: it comes through as strongly as there
    np.testing.assert_allclose(_share(got, experts) / _share(ties, experts), 1.0, atol=0.1)
    plain = merge(comp, method="ties", rescale=None)
    assert _projections(plain, experts) / _projections(ties, experts) > 1.3
    if density == 0.2:  # the divisor alone misses it: entries dropped by all count nothing
        divisor = merge(comp, method="ties", rescale="dense_divisor")
        assert _projections(divisor, experts) / _projections(ties, experts) < 0.97


@pytest.mark.parametrize("density", [0.2, 0.1, 0.05])
def test_expected_ties_is_the_least_squares_table_at_those_projections(density):
    # among the tables that keep every expert's projection, the rule takes the one closest
    # to TIES of the originals (entries normal, as the model assumes): closer than the first
    # version, which scaled each expert's part of the conditional mean by one factor
    experts = _experts(np.random.default_rng(1), corr=0.0)
    ties = merge(experts, method="ties", rescale=None)["w"].astype(np.float64)
    comp = [compress(t, density=density, scale="proj_vcap") for t in experts]
    got = merge(comp, method="ties", rescale="expected_ties")

    def scaled(stats):
        return expected_rescales({stats.name: stats}, fit="scaled")[stats.name]

    first = merge(comp, method="ties", rescale=scaled)
    np.testing.assert_allclose(_share(got, experts), _share(first, experts), atol=0.02)

    def err(m):
        return float(((m["w"] - ties) ** 2).sum() / (ties**2).sum())

    assert err(got) < err(first) - 0.002  # measured: 0.0045 (0.2) to 0.010 (0.05) lower
    with pytest.raises(MergeError, match="fit must be"):
        expected_rescales({}, fit="ols")


def test_expected_ties_with_frequency_signs_and_weights():
    experts = _experts(np.random.default_rng(4), corr=0.0)
    comp = [compress(t, density=0.1) for t in experts]
    for kw in ({"sign": "frequency"}, {"weights": [1.0, 0.5, 2.0]}):
        want = merge(experts, method="ties", rescale=None, **kw)
        got = merge(comp, method="ties", rescale="expected_ties", **kw)
        assert _projections(got, experts) / _projections(want, experts) == pytest.approx(
            1, abs=0.03)
        np.testing.assert_allclose(_share(got, experts) / _share(want, experts), 1, atol=0.15)


def test_expected_ties_table_is_odd_sparse_and_deterministic():
    comp = [compress(t, density=0.2)["w"] for t in _experts(np.random.default_rng(5), 0.0)]
    stats = TensorMerge("w", (120, 250), "F32", comp).stats()
    r = expected_ties(stats)
    assert r.zeros is None
    assert r.before is None
    assert r.after == 1.0
    table = np.array(r.table)
    d = stats.digits().astype(np.int64)
    mirror = (np.where(d == 0, 0, 3 - d) * 3 ** np.arange(3)[:, None]).sum(0)
    np.testing.assert_array_equal(table, -table[mirror])  # flipping every sign flips it
    assert table[0] == 0.0  # an entry no input keeps stays zero
    seen = stats.counts > 0
    assert np.all(table[seen & (np.arange(27) != 0)] != 0)
    assert expected_ties(stats) == r
    # one input alone: a kept entry's expected value, with the sign it was kept with
    for i in range(3):
        assert table[3**i] > 0
        assert table[2 * 3**i] < 0
    merged = merge([{"w": c} for c in comp], rescale="expected_ties")["w"]
    kept = np.zeros(120 * 250, bool)
    for c in comp:
        kept[c.indices] = True
    assert np.all(merged.reshape(-1)[~kept] == 0)


def test_expected_ties_scope_spans_tensors_through_prepare():
    # two tensors of one expert, compressed in one global scope: one threshold, so the
    # tensor with the larger entries keeps more of them; each tensor's sigma is inferred
    # from its kept fraction and the shared scale
    rng = np.random.default_rng(6)
    experts = [{"a": (rng.standard_normal((60, 100)) * s).astype(np.float32),
                "b": (rng.standard_normal((40, 100)) * 2 * s).astype(np.float32)}
               for s in (1.0, 0.7, 1.3)]
    comp = [compress(t, density=0.1) for t in experts]
    stats = {n: TensorMerge(n, comp[0][n].shape, "F32", [c[n] for c in comp]).stats()
             for n in ("a", "b")}
    prepared = expected_ties.prepare(stats)
    got = merge(comp, rescale="expected_ties")
    for n in ("a", "b"):
        alone = TensorMerge(n, comp[0][n].shape, "F32", [c[n] for c in comp],
                            rescale=prepared[n]).to_numpy()
        np.testing.assert_array_equal(got[n], alone)
    assert expected_ties(stats["a"]) != prepared["a"]  # alone, a tensor is its own scope
    flat = [{"w": np.concatenate([t["a"].ravel(), t["b"].ravel()])} for t in experts]
    merged = {"w": np.concatenate([got["a"].ravel(), got["b"].ravel()])}
    assert _projections(merged, flat) / _projections(merge(flat, rescale=None), flat) \
        == pytest.approx(1, abs=0.03)
    # merge_and_compress prepares too: its kept entries are those of the prepared merge
    again = merge_and_compress(comp, density=0.05, rescale="expected_ties")
    kept = np.concatenate([again[k].to_numpy().ravel() for k in ("a", "b")]) != 0
    both = np.concatenate([got[k].ravel() for k in ("a", "b")])
    assert np.abs(both[kept]).min() >= np.abs(both[~kept]).max()


def test_expected_ties_through_files_and_the_command_line(tmp_path, capsys):
    rng = np.random.default_rng(7)
    experts = [{"a": (rng.standard_normal((30, 40)) * s).astype(np.float32),
                "b": (rng.standard_normal((20, 40)) * 3 * s).astype(np.float32)}
               for s in (1.0, 0.6)]
    paths = []
    for i, t in enumerate(experts):
        paths.append(tmp_path / f"e{i}.compeft")
        cf.save_file(compress(t, density=0.2), paths[-1])
    s = merge_files(paths, tmp_path / "m.safetensors", rescale="expected_ties")
    assert s.rescale == "expected_ties"
    loaded = [cf.load_file(p) for p in paths]
    want = merge(loaded, rescale="expected_ties")
    assert not np.array_equal(want["a"], merge(loaded, rescale="dense_divisor")["a"])
    with cf.open_safetensors(tmp_path / "m.safetensors") as got:
        for n in ("a", "b"):
            np.testing.assert_array_equal(got.values(n), want[n])
    # compressed again: the scope-wide rule runs before the selection, as in memory
    merge_files(paths, tmp_path / "m.compeft", rescale="expected_ties", density=0.1)
    again = merge_and_compress(loaded, density=0.1, rescale="expected_ties")
    back = cf.load_file(tmp_path / "m.compeft")
    for n in ("a", "b"):
        np.testing.assert_array_equal(back[n].indices, again[n].indices)
        np.testing.assert_array_equal(back[n].signs, again[n].signs)
    # and on the command line
    code, out, _ = run(capsys, "merge", *paths, "-o", tmp_path / "c.safetensors",
                       "--rescale", "expected_ties")
    assert code == 0
    assert "rescale expected_ties" in out
    with cf.open_safetensors(tmp_path / "c.safetensors") as got:
        np.testing.assert_array_equal(got.values("b"), want["b"])


def test_expected_ties_refuses_inputs_of_another_scale_rule(tmp_path, capsys):
    # expected_ties reads each input's threshold from the proj rule's scale: a file whose
    # record names another rule (kron_sketch, kron, ...; not a LoRA product scale, which
    # records the proj scale it replaced, nor a metric rule that records its scopes' proj
    # scales) is refused before anything is written, naming the file and the rule; other
    # merges still take it
    rng = np.random.default_rng(3)
    for other in ("kron", "norm"):  # kron: a metric rule without its proj_scale record
        _refused(tmp_path / other, capsys, rng, other)


def _refused(tmp_path, capsys, rng, other):
    from cli_helpers import one_line_error

    from compeft_format.compress import compression_metadata
    from compeft_format.merge import MergeError

    tmp_path.mkdir()
    paths = []
    for i, scale in enumerate(("proj_vcap", other)):
        t = {"a": rng.standard_normal((30, 40)).astype(np.float32)}
        paths.append(tmp_path / f"e{i}.compeft")
        cf.save_file(compress(t, density=0.2, scale=scale), paths[-1], metadata={
            "compeft.compression": compression_metadata(0.2, 1.0, "global", scale)})
    out = tmp_path / "m.safetensors"
    with pytest.raises(MergeError, match=rf"e1\.compeft: compressed with scale '{other}'"):
        merge_files(paths, out, rescale="expected_ties")
    assert not out.exists()
    code, _, err = run(capsys, "merge", *paths, "-o", out, "--rescale", "expected_ties")
    assert code == 1
    one_line_error(err, f"scale '{other}'", "expected_ties")
    assert not out.exists()
    merge_files(paths, out, rescale="dense_divisor")  # a rule that reads no threshold
    merge_files([paths[0], paths[0]], tmp_path / "p.safetensors", rescale="expected_ties")


def test_expected_ties_falls_back_where_the_model_does_not_apply():
    a = TernaryTensor((4,), [0, 1], [False, True], 1.0)
    b = TernaryTensor((4,), [1, 2], [False, False], 0.5)
    for method in ("sum", "mean"):
        st = TensorMerge("w", (4,), "F32", [a, b], method=method).stats()
        assert expected_ties(st) == Rescale()
    st = TensorMerge("w", (4,), "F32", [a, np.zeros(4, np.float32)]).stats()
    assert expected_ties(st) == dense_divisor(st)
    rows = [np.array([1.0, 0, -1, 0, 0, 1], np.float32)] * (MAX_PATTERN_INPUTS + 1)
    tm = TensorMerge("w", (6,), "F32", [ternary(v) for v in rows], rescale="expected_ties")
    assert tm.rescale == dense_divisor(tm.stats())


@pytest.mark.parametrize("table", [(1.0,) * 8, (1.0,) * 8 + (float("nan"),)])
def test_bad_tables_are_refused(table):
    a = TernaryTensor((4,), [0], [False], 1.0)
    with pytest.raises(MergeError, match=r"table"):
        TensorMerge("w", (4,), "F32", [a, a], rescale=Rescale(table=table)).to_numpy()
    with pytest.raises(MergeError, match=r"table"):  # no pattern table for dense inputs
        TensorMerge("w", (4,), "F32", [np.ones(4, np.float32)] * 2,
                    rescale=Rescale(table=(0.0,) * 9)).to_numpy()


@pytest.mark.parametrize("scope", ["global", "role", "tensor"])
def test_expected_ties_reads_the_proj_scale_a_lora_product_scale_records(tmp_path, scope):
    # a LoRA product scale keeps compress's selection and records the proj scale it
    # replaced: expected_ties infers the thresholds from that, so the merge is the one of the
    # same adapters compressed with the default scale (its table is in absolute units)
    import json

    from safetensors.numpy import load_file

    src = "tests/data/lora-minilm-vader"
    dirs = two_lora_experts(tmp_path, src)
    merged = {}
    for scale in ("proj_vcap", "lora_product_out"):
        comp = []
        for i, d in enumerate(dirs):
            out = tmp_path / f"c-{scale}-{i}"
            cf.compress_file(d, out, density=0.1, scope=scope, scale=scale,
                             base=f"{src}/init")
            comp.append(out)
        with cf.open_file(comp[0] / "adapter_model.compeft") as r:
            meta = r.metadata()["compeft.compression"]
            mags = {n: r.get_raw(n).scale for n in r}
        merged[scale, "mags"] = mags
        for rule in ("expected_ties", "dense_divisor", None):
            out = tmp_path / f"m-{scale}-{rule}"
            merge_files(comp, out, rescale=rule, base=f"{src}/init")
            merged[scale, rule] = load_file(str(out / "adapter_model.safetensors"))
    assert meta["scale"] == "lora_product_out", json.dumps(meta)
    assert "lora_fit" in meta, json.dumps(meta)
    # the fit changed the factors' magnitudes, and PEFT's TIES, which reads them, merges
    # otherwise
    assert any(merged["proj_vcap", "mags"][n] != v for n, v in merged[
        "lora_product_out", "mags"].items())
    lora_b = next(n for n in merged["proj_vcap", None] if "lora_B" in n)
    assert not np.allclose(merged["proj_vcap", None][lora_b],
                           merged["lora_product_out", None][lora_b])
    # expected_ties and dense_divisor merge at the recorded proj scale
    for rule in ("expected_ties", "dense_divisor"):
        for n, v in merged["proj_vcap", rule].items():
            np.testing.assert_allclose(merged["lora_product_out", rule][n], v,
                                       rtol=1e-5, atol=1e-7, err_msg=f"{rule} {n}")


def test_expected_ties_refuses_a_lora_product_scale_without_its_record(tmp_path):
    from compeft_format.compress import compression_metadata

    rng = np.random.default_rng(4)
    names = ("m.lora_A.weight", "m.lora_B.weight")
    paths = []
    for i, fit in enumerate((None, {"selection": "proj_vcap", "proj_scale": {"A": 0.1}})):
        t = {n: rng.standard_normal((8, 8)).astype(np.float32) for n in names}
        meta = compression_metadata(0.2, 1.0, "role", "lora_product_out")
        if fit is not None:
            meta["lora_fit"] = fit
        paths.append(tmp_path / f"e{i}.compeft")
        cf.save_file(compress(t, density=0.2), paths[-1],
                     metadata={"compeft.compression": meta})
    with pytest.raises(MergeError, match=r"e0\.compeft: .*lora_fit\.proj_scale must be"):
        merge_files(paths, tmp_path / "m.safetensors", rescale="expected_ties")
    with pytest.raises(MergeError, match=r"e1\.compeft: .*lora_fit\.proj_scale\['B'\] must"):
        merge_files(paths[::-1], tmp_path / "m.safetensors", rescale="expected_ties")
    assert not (tmp_path / "m.safetensors").exists()


def test_expected_ties_reads_the_proj_scale_a_metric_scale_records(tmp_path):
    # kron_sketch / kron / gram record each scope's proj scale (spec 5.2.1 proj_scale): a
    # file of theirs merges with expected_ties as its proj_vcap compression would, the
    # vector's capped scale included
    from safetensors.numpy import load_file

    from compeft_format.compress import compression_metadata

    rng = np.random.default_rng(6)
    tvs = []
    for i in range(3):
        w = rng.standard_normal((40, 30)) * (1 + i)
        w += 0.5 * rng.standard_normal(w.shape) ** 3  # heavy tails: kron's scale is not proj's
        tvs.append({"w": w.astype(np.float32),
                    "b": 0.01 * rng.standard_normal(30).astype(np.float32)})  # capped: tiny
    merged = {}
    for scale in ("proj_vcap", "kron"):
        paths = []
        for i, t in enumerate(tvs):
            comp = compress(t, density=0.05, scale=scale)
            meta = compression_metadata(0.05, 1.0, "global", scale)
            if scale == "kron":
                meta["proj_scale"] = compress(t, density=0.05, scale="proj")["w"].scale
                assert comp["w"].scale != meta["proj_scale"]
            paths.append(tmp_path / f"{scale}-{i}.compeft")
            cf.save_file(comp, paths[-1], metadata={"compeft.compression": meta})
        for rule in ("expected_ties", "dense_divisor", None):
            out = tmp_path / f"m-{scale}-{rule}.safetensors"
            merge_files(paths, out, rescale=rule)
            merged[scale, rule] = load_file(str(out))
    # PEFT's TIES merges the stored magnitudes; the two rules, the recorded proj scales
    assert not np.allclose(merged["proj_vcap", None]["w"], merged["kron", None]["w"])
    for rule in ("expected_ties", "dense_divisor"):
        for n in ("w", "b"):
            np.testing.assert_allclose(merged["kron", rule][n], merged["proj_vcap", rule][n],
                                       rtol=1e-5, atol=1e-8, err_msg=f"{rule} {n}")


def test_merge_in_memory_takes_the_proj_scales_a_product_fit_replaced():
    # merge(proj_scales=): the in-memory form of what merge_files reads from the record
    from safetensors.numpy import load_file

    from compeft_format import lora_scale as ls

    src = "tests/data/lora-minilm-vader"
    init = load_file(f"{src}/init/adapter_model.safetensors")
    ad = load_file(f"{src}/adapter_model.safetensors")
    rng = np.random.default_rng(8)
    experts = [{n: (v - init[n]) * (1 + 0.5 * rng.standard_normal(v.shape)).astype(np.float32)
                for n, v in ad.items()} for _ in range(3)]
    comp = [compress(t, density=0.05, scale="proj_vcap") for t in experts]
    fitted = [ls.rescale(c, {n: init[n] + t[n] for n in t}, init, rule="lora_product_out")
              for c, t in zip(comp, experts, strict=True)]
    assert fitted[0][next(iter(ad))].scale != comp[0][next(iter(ad))].scale
    want = merge(comp, rescale="expected_ties")
    got = merge(fitted, rescale="expected_ties",
                proj_scales=[{n: v.scale for n, v in c.items()} for c in comp])
    blind = merge(fitted, rescale="expected_ties")
    lora_b = next(n for n in ad if "lora_B" in n)
    assert not np.allclose(blind[lora_b], want[lora_b])
    for n, v in want.items():
        np.testing.assert_allclose(got[n], v, rtol=1e-5, atol=1e-8, err_msg=n)
    with pytest.raises(MergeError, match="proj_scales gives 1 mappings for 3 experts"):
        merge(fitted, rescale="expected_ties", proj_scales=[None])


def test_expected_ties_variants_the_benchmark_measures():
    # fit="common": the conditional mean times one factor; by_tensor: projections per tensor
    rng = np.random.default_rng(9)
    experts = [{"w": (rng.standard_normal((60, 50)) * s).astype(np.float32),  # matrices:
                "v": (rng.standard_normal((40, 50)) * s * 2).astype(np.float32)}  # one scope
               for s in (1, 0.7)]
    comp = [compress(t, density=0.1, scale="proj_vcap") for t in experts]
    stats = {n: TensorMerge(n, experts[0][n].shape, "F32", [c[n] for c in comp]).stats()
             for n in ("w", "v")}
    mean = expected_rescales(stats, mu=[0.0, 0.0])
    common = expected_rescales(stats, fit="common")
    ratios = [np.array(common[n].table)[1:] / np.array(mean[n].table)[1:] for n in stats]
    live = [r[np.isfinite(r)] for r in ratios]
    assert np.ptp(np.concatenate(live)) < 1e-6  # one factor for the scope
    assert live[0][0] > 1.5  # the conditional mean is shrunk; the factor brings it back
    rule = expected_rescales(stats)
    per = expected_rescales(stats, by_tensor=True)
    assert per["w"].table != rule["w"].table
    # one tensor is its own scope: the same either way
    one = {"w": stats["w"]}
    assert expected_rescales(one, by_tensor=True) == expected_rescales(one)


def test_expected_ties_merges_default_files_as_their_proj_vcap_compressions(tmp_path):
    # the default scale ("auto") resolves to kron_sketch at low density and records each
    # scope's proj scale: expected_ties and dense_divisor merge such files as their
    # proj_vcap compressions
    from safetensors.numpy import load_file
    from safetensors.numpy import save_file as save_safetensors

    rng = np.random.default_rng(11)
    merged = {}
    for scale in (None, "proj_vcap"):
        paths = []
        for i in range(3):
            w = rng.standard_normal((50, 40)) * (1 + i) if scale is None else None
            src = tmp_path / f"e{i}.safetensors"
            if scale is None:
                save_safetensors({"w": (w + 0.3 * w**3).astype(np.float32)}, str(src))
            paths.append(tmp_path / f"e{i}-{scale}.compeft")
            cf.compress_file(src, paths[-1], density=0.02,
                             **({} if scale is None else {"scale": scale}))
        with cf.open_file(paths[0]) as r:
            recorded = r.metadata()["compeft.compression"]["scale"]
        for rule in ("expected_ties", "dense_divisor"):
            merged[scale, rule] = load_file(str(merge_files(
                paths, tmp_path / f"m-{scale}-{rule}.safetensors", rescale=rule).file))
        assert recorded == ("kron_sketch" if scale is None else "proj_vcap")
    for rule in ("expected_ties", "dense_divisor"):
        np.testing.assert_allclose(merged[None, rule]["w"], merged["proj_vcap", rule]["w"],
                                   rtol=1e-5, atol=1e-8, err_msg=rule)


@pytest.mark.parametrize("method", ["ties", "sum", "mean"])
def test_dense_divisor_merges_an_input_at_its_recorded_proj_scale(method):
    # an input whose proj scale is recorded (a LoRA product or metric scale replaced it) is
    # merged at that scale, as its proj_vcap compression would be; one without a record
    # keeps its magnitude
    rng = np.random.default_rng(8)
    idx = [np.sort(rng.choice(64, 20, replace=False)) for _ in range(3)]
    sg = [rng.random(20) < 0.5 for _ in range(3)]
    def make(mags):
        return [TernaryTensor((64,), i, s, m) for i, s, m in zip(idx, sg, mags, strict=True)]

    stored, at_proj = make((0.5, 2.0, 1.5)), make((1.0, 3.0, 1.5))
    proj = [{"w": 1.0}, {"w": 3.0}, None]
    got = merge([{"w": t} for t in stored], method=method, rescale="dense_divisor",
                proj_scales=proj)["w"]
    want = merge([{"w": t} for t in at_proj], method=method, rescale="dense_divisor")["w"]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    plain = merge([{"w": t} for t in stored], method=method, rescale="dense_divisor")["w"]
    assert not np.allclose(plain, want)


def test_dense_divisor_merges_files_of_rules_without_a_proj_record(tmp_path):
    # unlike expected_ties, dense_divisor does not need the proj scale: a file of another
    # rule (norm) merges at its stored magnitudes
    rng = np.random.default_rng(9)
    paths = []
    for i in range(2):
        t = {"w": rng.standard_normal((20, 10)).astype(np.float32)}
        paths.append(tmp_path / f"e{i}.compeft")
        cf.compress_file(_save(tmp_path / f"e{i}.safetensors", t), paths[-1], density=0.2,
                         scale="norm")
    with pytest.raises(MergeError, match="'norm'"):
        merge_files(paths, tmp_path / "x.safetensors", rescale="expected_ties")
    out = merge_files(paths, tmp_path / "m.safetensors", rescale="dense_divisor")
    comp = [cf.load_file(p)["w"] for p in paths]
    want = merge([{"w": c} for c in comp], rescale="dense_divisor")["w"]
    from safetensors.numpy import load_file
    np.testing.assert_allclose(load_file(str(out.file))["w"], want, rtol=1e-6)


def _save(path, tensors):
    from safetensors.numpy import save_file
    save_file(tensors, str(path))
    return path
