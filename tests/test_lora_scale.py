"""compeft_format.lora_scale: scales fitted on LoRA's rebuilt products, against brute force."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

from compeft_format import lora_scale as ls
from compeft_format.compress import compress
from compeft_format.errors import EncodeError
from compeft_format.tensor import TernaryTensor


def _adapter(rng, modules=3, r=4, out=24, inp=20, init=True):
    """A small random LoRA adapter, its initial state (A random, B zero) and a bias."""
    ad, ref = {}, {}
    for m in range(modules):
        a0 = rng.normal(size=(r, inp))
        ad[f"l{m}.lora_A.weight"] = (a0 + 0.6 * rng.normal(size=(r, inp))).astype(np.float32)
        ad[f"l{m}.lora_B.weight"] = (0.5 * rng.normal(size=(out, r))).astype(np.float32)
        ref[f"l{m}.lora_A.weight"] = a0.astype(np.float32)
        ref[f"l{m}.lora_B.weight"] = np.zeros((out, r), np.float32)
    ad["l0.bias"] = (0.05 * rng.normal(size=out)).astype(np.float32)
    ref["l0.bias"] = np.zeros(out, np.float32)
    return ad, (ref if init else None)


def _dense_error(comp, ad, ref, scales, weights=None, out_metric=False, in_metric=None):
    """sum_m w_m ||(B0 + s_B S_B)(A0 + s_A S_A) - B A||^2, with full dense products; with
    ``out_metric`` the norm is tr(G E E^T), G = P P^T scaled to a mean eigenvalue of 1; with
    ``in_metric`` too, tr(G E H E^T), H = P^T P (``"kron"``) or dA^T dA, dA = A - A0
    (``"delta"``; the identity from zero), scaled the same way."""
    total = 0.0
    for a, b in ls.lora_pairs(comp):
        ra = comp[a].to_numpy().astype(np.float64) / comp[a].scale * scales[a]
        rb = comp[b].to_numpy().astype(np.float64) / comp[b].scale * scales[b]
        a0 = ref[a].astype(np.float64) if ref else 0.0
        b0 = ref[b].astype(np.float64) if ref else 0.0
        got = (b0 + rb) @ (a0 + ra)
        want = ad[b].astype(np.float64) @ ad[a].astype(np.float64)
        e = got - want
        if out_metric:
            g = want @ want.T
            if not np.trace(g) > 0:
                continue
            g /= np.trace(g) / g.shape[0]
            h = np.eye(e.shape[1])
            if in_metric == "kron":
                h = want.T @ want
            elif in_metric == "delta" and ref:
                da = ad[a].astype(np.float64) - ref[a].astype(np.float64)
                h = da.T @ da
            h /= np.trace(h) / h.shape[0]
            sq = float(np.trace(g @ e @ h @ e.T))
        else:
            sq = float((e**2).sum())
        total += (1.0 if weights is None else weights[a] ** 2) * sq
    return total


def _golden(f, lo, hi, steps=60):
    g = (5**0.5 - 1) / 2
    c, d = hi - g * (hi - lo), lo + g * (hi - lo)
    for _ in range(steps):
        if f(c) < f(d):
            hi, d = d, c
            c = hi - g * (hi - lo)
        else:
            lo, c = c, d
            d = lo + g * (hi - lo)
    return (lo + hi) / 2


def _brute_1d(f, hi, points=300):
    """The minimiser of f over (0, hi]: a grid, then golden section around its best."""
    grid = np.linspace(hi / points, hi, points)
    i = int(np.argmin([f(s) for s in grid]))
    return _golden(f, grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)])


#: the input side of each product rule's metric, as _dense_error computes it
IN_METRIC = {"lora_product_kron": "kron", "lora_product_delta": "delta"}


def _tv(ad, ref):
    return {n: ad[n] - (ref[n] if ref else 0) for n in ad}


def test_doctests():
    assert doctest.testmod(ls, raise_on_error=False).failed == 0


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("with_b0", [False, True])
def test_quartic_is_the_dense_error(seed, with_b0):
    rng = np.random.default_rng(seed)
    a, a0, b = rng.normal(size=(3, 7)), rng.normal(size=(3, 7)), rng.normal(size=(5, 3))
    b0 = rng.normal(size=(5, 3)) if with_b0 else None
    sa = rng.integers(-1, 2, size=(3, 7)).astype(float)
    sb = rng.integers(-1, 2, size=(5, 3)).astype(float)
    q = ls.product_quartic(a0, b0, sa, sb, a, b)
    for s in (0.0, 0.3, 1.7, -0.4):
        dense = ((0 if b0 is None else b0) + s * sb) @ (a0 + s * sa) - b @ a
        assert np.polynomial.polynomial.polyval(s, q) == pytest.approx(
            float((dense**2).sum()), rel=1e-10)
    n00, n01, n11 = ls.pair_polynomials(a0, b0, sa, sb, a, b)
    for s_a, s_b in ((0.2, 1.1), (1.5, 0.3)):
        dense = ((0 if b0 is None else b0) + s_b * sb) @ (a0 + s_a * sa) - b @ a
        P = np.polynomial.polynomial
        got = P.polyval(s_a, n00) + 2 * s_b * P.polyval(s_a, n01) + s_b**2 * P.polyval(s_a, n11)
        assert got == pytest.approx(float((dense**2).sum()), rel=1e-10)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("init", "density"), [(True, 0.03), (True, 0.1), (True, 0.4),
                                               (False, 0.1), (False, 0.4)])
@pytest.mark.parametrize("rule", ls.LORA_SCALES)
def test_global_scale_is_the_brute_force_minimum(seed, density, init, rule):
    rng = np.random.default_rng(seed)
    ad, ref = _adapter(rng, init=init)
    comp = compress(_tv(ad, ref), density=density, scale="proj_vcap")
    out = ls.rescale(comp, ad, ref, rule=rule)
    metric = rule != "lora_product"
    pairs = ls.lora_pairs(comp)
    names = [n for p in pairs for n in p]
    assert sum(comp[b].nnz for _, b in pairs)  # both factors have kept entries
    assert sum(comp[a].nnz for a, _ in pairs)

    def err(s):
        return _dense_error(comp, ad, ref, dict.fromkeys(names, s), out_metric=metric,
                            in_metric=IN_METRIC.get(rule))

    s = out[pairs[0][0]].scale
    assert all(out[n].scale == s for n in names)  # one scale for the scope
    want = _brute_1d(err, 20 * comp[pairs[0][0]].scale)
    assert s == pytest.approx(want, rel=1e-4)
    assert err(s) <= err(want) * (1 + 1e-6)
    assert out["l0.bias"] is comp["l0.bias"]  # not a factor: compress's scale
    for n in names:  # the selection and the signs are compress's
        np.testing.assert_array_equal(out[n].indices, comp[n].indices)
        np.testing.assert_array_equal(out[n].signs, comp[n].signs)
    if not init and not metric:  # from zero: s^2 = <B A, S_B S_A> / ||S_B S_A||^2
        num = den = 0.0
        for a, b in pairs:
            ss = (comp[b].to_numpy() / comp[b].scale) @ (comp[a].to_numpy() / comp[a].scale)
            num += float((ss * (ad[b] @ ad[a])).sum())
            den += float((ss**2).sum())
        assert s**2 == pytest.approx(num / den, rel=1e-5)


def _brute_2d(group, comp, ad, ref):
    """The (s_A, s_B) minimising the dense error of the modules ``group``: a 2-d grid,
    zoomed in three times around its best point; vectorised over s_B."""
    mats = []
    for a, b in group:
        sa = comp[a].to_numpy().astype(np.float64) / comp[a].scale
        sb = comp[b].to_numpy().astype(np.float64) / comp[b].scale
        mats.append((sa, sb, ref[a].astype(np.float64), ref[b].astype(np.float64),
                     ad[b].astype(np.float64) @ ad[a].astype(np.float64)))

    def err(s_a, s_b):  # s_b: a vector
        tot = np.zeros(s_b.size)
        for sa, sb, a0, b0, want in mats:
            rb = b0[None] + s_b[:, None, None] * sb[None]
            tot += (((rb @ (a0 + s_a * sa)) - want[None]) ** 2).sum(axis=(1, 2))
        return tot

    a_lo, a_hi = 0.0, 20 * comp[group[0][0]].scale
    b_lo, b_hi = 0.0, 20 * comp[group[0][1]].scale
    for _ in range(4):
        ga, gb = np.linspace(a_lo, a_hi, 81)[1:], np.linspace(b_lo, b_hi, 81)[1:]
        table = np.array([err(x, gb) for x in ga])
        i, j = np.unravel_index(np.argmin(table), table.shape)
        da, db = ga[1] - ga[0], gb[1] - gb[0]
        a_lo, a_hi = max(ga[i] - 2 * da, 0.0), ga[i] + 2 * da
        b_lo, b_hi = max(gb[j] - 2 * db, 0.0), gb[j] + 2 * db
    return float(ga[i]), float(gb[j]), lambda x, y: float(err(x, np.array([y]))[0])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("scope", ["role", "tensor"])
def test_pair_scales_are_the_brute_force_minimum(seed, scope):
    rng = np.random.default_rng(seed)
    ad, ref = _adapter(rng)
    comp = compress(_tv(ad, ref), density=0.1, scope=scope)
    out = ls.rescale(comp, ad, ref, scope=scope)
    pairs = ls.lora_pairs(comp)
    groups = [pairs] if scope == "role" else [[p] for p in pairs]
    for group in groups:
        s_a, s_b, err = _brute_2d(group, comp, ad, ref)
        a_name, b_name = group[0]
        assert out[a_name].scale == pytest.approx(s_a, rel=1e-3)
        assert out[b_name].scale == pytest.approx(s_b, rel=1e-3)
        assert err(out[a_name].scale, out[b_name].scale) <= err(s_a, s_b) * (1 + 1e-6)
        assert all(out[a].scale == out[a_name].scale and out[b].scale == out[b_name].scale
                   for a, b in group)


def test_from_zero_pair_keeps_the_ratio_and_fits_the_product():
    rng = np.random.default_rng(5)
    ad, _ = _adapter(rng, modules=1)
    comp = compress(ad, density=0.3, scope="tensor")
    out = ls.rescale(comp, ad, None, scope="tensor")
    a, b = ls.lora_pairs(comp)[0]
    assert out[a].scale / out[b].scale == pytest.approx(comp[a].scale / comp[b].scale, rel=1e-6)
    p = _brute_1d(lambda x: _dense_error(comp, ad, None, {a: x, b: 1.0}), 20 * comp[a].scale
                  * comp[b].scale)
    assert out[a].scale * out[b].scale == pytest.approx(p, rel=1e-4)


def test_scaling_weighs_the_modules_and_alpha_multiplies():
    rng = np.random.default_rng(7)
    ad, ref = _adapter(rng)
    comp = compress(_tv(ad, ref), density=0.1)
    w = {a: [1.0, 3.0, 0.5][i] for i, (a, _) in enumerate(ls.lora_pairs(comp))}
    out = ls.rescale(comp, ad, ref, scaling=w)
    names = [n for p in ls.lora_pairs(comp) for n in p]
    s = out[names[0]].scale
    want = _brute_1d(lambda x: _dense_error(comp, ad, ref, dict.fromkeys(names, x), w),
                     20 * comp[names[0]].scale)
    assert s == pytest.approx(want, rel=1e-4)
    assert s != pytest.approx(ls.rescale(comp, ad, ref)[names[0]].scale, rel=1e-3)
    assert ls.rescale(comp, ad, ref, scaling=w.__getitem__)[names[0]].scale == s
    doubled = ls.rescale(comp, ad, ref, scaling=w, alpha=2.0)[names[0]].scale
    assert doubled == pytest.approx(2 * s, rel=1e-6)


def test_nothing_kept_in_the_factors_keeps_compress_scale():
    ad = {"m.lora_A.weight": np.zeros((2, 4), np.float32),
          "m.lora_B.weight": np.zeros((3, 2), np.float32),
          "m.bias": np.array([1.0, -2.0, 0.5], np.float32)}
    comp = compress(ad, density=0.5)
    out = ls.rescale(comp, ad)
    assert {n: out[n].scale for n in out} == {n: comp[n].scale for n in comp}


def test_mismatched_factors_are_refused():
    rng = np.random.default_rng(1)
    ad, ref = _adapter(rng, modules=1)
    comp = compress(_tv(ad, ref), density=0.2)
    bad = dict(ad, **{"l0.lora_A.weight": np.zeros((4, 21), np.float32)})
    with pytest.raises(EncodeError, match="do not match"):
        ls.rescale(comp, bad, ref)
    with pytest.raises(EncodeError, match="scope"):
        ls.rescale(comp, ad, ref, scope="module")
    with pytest.raises(EncodeError, match="rule"):
        ls.rescale(comp, ad, ref, rule="proj")


def test_output_metric_is_p_pt():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(3, 11)), rng.normal(size=(9, 3))
    q, w = ls.output_metric(a, b)
    g = (b @ a) @ (b @ a).T
    np.testing.assert_allclose((q * w) @ q.T, g / (np.trace(g) / 9), atol=1e-12)
    assert ls.output_metric(a, np.zeros((9, 3))) is None


def test_kron_metric_is_p_pt_and_pt_p():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(3, 11)), rng.normal(size=(9, 3))
    q, w, qi, wi = ls.kron_metric(a, b)
    p = b @ a
    g, h = p @ p.T, p.T @ p
    np.testing.assert_allclose((q * w) @ q.T, g / (np.trace(g) / 9), atol=1e-12)
    np.testing.assert_allclose((qi * wi) @ qi.T, h / (np.trace(h) / 11), atol=1e-12)
    assert ls.kron_metric(np.zeros((3, 11)), b) is None


def test_delta_metric_is_p_pt_and_da_t_da():
    rng = np.random.default_rng(5)
    a0 = rng.normal(size=(3, 11))
    a, b = a0 + 0.1 * rng.normal(size=(3, 11)), rng.normal(size=(9, 3))
    q, w, qi, wi = ls.delta_metric(a, b, a0)
    g, da = (b @ a) @ (b @ a).T, a - a0
    h = da.T @ da
    np.testing.assert_allclose((q * w) @ q.T, g / (np.trace(g) / 9), atol=1e-12)
    np.testing.assert_allclose((qi * wi) @ qi.T, h / (np.trace(h) / 11), atol=1e-12)
    assert qi.shape == (11, 3)  # thin: dA has rank <= r
    # from zero (no A0), or A never moved: the output metric alone, as lora_product_out
    for ref in (None, a):
        got = ls.delta_metric(a, b, ref)
        assert len(got) == 2
        np.testing.assert_array_equal(got[1], ls.output_metric(a, b)[1])
    assert ls.delta_metric(a, np.zeros((9, 3)), a0) is None


@pytest.mark.parametrize("rule", ["lora_product_kron", "lora_product_delta"])
@pytest.mark.parametrize("with_b0", [False, True])
def test_quartic_under_the_two_sided_metrics_is_the_dense_error(with_b0, rule):
    rng = np.random.default_rng(6)
    a, a0, b = rng.normal(size=(3, 7)), rng.normal(size=(3, 7)), rng.normal(size=(5, 3))
    b0 = rng.normal(size=(5, 3)) if with_b0 else None
    sa = rng.integers(-1, 2, size=(3, 7)).astype(float)
    sb = rng.integers(-1, 2, size=(5, 3)).astype(float)
    p = b @ a
    if rule == "lora_product_kron":
        metric, h = ls.kron_metric(a, b), p.T @ p
    else:
        metric, h = ls.delta_metric(a, b, a0), (a - a0).T @ (a - a0)
    g, h = p @ p.T / (np.trace(p @ p.T) / 5), h / (np.trace(h) / 7)
    q = ls.product_quartic(a0, b0, sa, sb, a, b, metric)
    n00, n01, n11 = ls.pair_polynomials(a0, b0, sa, sb, a, b, metric)
    P = np.polynomial.polynomial
    for s_a, s_b in ((0.3, 0.3), (1.7, 1.7), (0.2, 1.1)):
        e = ((0 if b0 is None else b0) + s_b * sb) @ (a0 + s_a * sa) - p
        want = float(np.trace(g @ e @ h @ e.T))
        if s_a == s_b:
            assert P.polyval(s_a, q) == pytest.approx(want, rel=1e-10)
        got = P.polyval(s_a, n00) + 2 * s_b * P.polyval(s_a, n01) + s_b**2 * P.polyval(s_a, n11)
        assert got == pytest.approx(want, rel=1e-10)


def test_lora_pairs_names():
    names = ["x.lora_A.default.weight", "x.lora_B.default.weight", "e.lora_embedding_A.default",
             "e.lora_embedding_B.default", "y.lora_A.default.weight", "z.weight"]
    assert ls.lora_pairs(names) == [("e.lora_embedding_A.default", "e.lora_embedding_B.default"),
                                    ("x.lora_A.default.weight", "x.lora_B.default.weight")]


def test_a_scale_beyond_the_dtype_is_refused():
    t = TernaryTensor((2, 2), [0], [False], 1.0, "F16")
    u = TernaryTensor((2, 2), [0], [False], 1.0, "F16")
    comp = {"m.lora_A.weight": t, "m.lora_B.weight": u}
    ad = {"m.lora_A.weight": np.full((2, 2), 1e5), "m.lora_B.weight": np.full((2, 2), 1e5)}
    with pytest.raises(EncodeError, match="F16"):
        ls.rescale(comp, ad)


# ---------------------------------------------------------------------------------------------
# compress_file / decompress_file / PEFT loading / the command line
# ---------------------------------------------------------------------------------------------
LORA = "tests/data/lora-minilm-vader"


def _read_adapter(path):
    from safetensors.numpy import load_file

    return load_file(str(path))


@pytest.mark.parametrize(("base", "scope", "rule"), [
    (f"{LORA}/init", "global", "lora_product"), ("zero", "global", "lora_product"),
    (f"{LORA}/init", "role", "lora_product"), (f"{LORA}/init", "global", "lora_product_out"),
    ("zero", "tensor", "lora_product_out"), (f"{LORA}/init", "global", "lora_product_delta")])
def test_compress_file_writes_the_fitted_scales(tmp_path, base, scope, rule):
    import compeft_format as cf

    ad = _read_adapter(f"{LORA}/adapter_model.safetensors")
    init = _read_adapter(f"{LORA}/init/adapter_model.safetensors") if base != "zero" else None
    s = cf.compress_file(LORA, tmp_path / "c", density=0.02, scope=scope, scale=rule,
                         base=base)
    assert s.reference == ("zero" if base == "zero" else "checkpoint")
    # the same as compress, then rescale, in memory
    comp = compress(_tv(ad, init), density=0.02, scope=scope, scale="proj_vcap")
    want = ls.rescale(comp, ad, init, rule=rule, scope=scope, alpha=1.0)
    with cf.open_file(tmp_path / "c" / "adapter_model.compeft") as r:
        meta = r.metadata()["compeft.compression"]
        got = {n: r.get(n) for n in r}
    assert meta["scale"] == rule
    assert meta["lora_fit"]["selection"] == "proj_vcap"
    proj = meta["lora_fit"]["proj_scale"]
    if scope == "global":
        assert proj == comp["base_model.model.encoder.layer.0.attention.self.query.lora_A"
                            ".weight"].scale
    elif scope == "role":
        assert set(proj) == {"A", "B"}
    else:  # by tensor: compress's own scale of each factor
        assert proj == {n: comp[n].scale for p in ls.lora_pairs(comp) for n in p}
    for n, t in want.items():
        assert got[n] == t, n
    changed = [n for n in want if want[n].scale != comp[n].scale]
    assert changed  # the fit moved the factors' scales away from proj_vcap's
    # decompress rebuilds init + fitted ternary
    cf.decompress_file(tmp_path / "c", tmp_path / "r", base=None if base == "zero" else base)
    back = _read_adapter(tmp_path / "r" / "adapter_model.safetensors")
    for n, t in want.items():
        expect = t.to_numpy() + (init[n] if init is not None else 0)
        np.testing.assert_allclose(back[n], expect, rtol=1e-6, atol=1e-7)


def test_the_summary_points_low_density_loras_to_lora_product_out(tmp_path):
    # at density <= 0.02 proj_vcap rebuilds a LoRA worse than leaving it out
    # (bench/results/lora_scale.md): the summary says which rule keeps its gain
    import compeft_format as cf
    from compeft_format.scale_plan import LORA_LOW_DENSITY

    low = cf.compress_file(LORA, tmp_path / "a", density=LORA_LOW_DENSITY, base="zero",
                           scale="proj_vcap")
    assert "--scale lora_product_out" in low.note
    assert "--scale lora_product_out" in low.format()
    assert cf.compress_file(LORA, tmp_path / "b", density=0.05, base="zero",
                            scale="proj_vcap").note is None
    fitted = cf.compress_file(LORA, tmp_path / "c", density=0.01, base="zero",
                              scale="lora_product_out")
    assert fitted.note is None
    default = cf.compress_file(LORA, tmp_path / "e", density=0.01, base="zero")
    assert default.note is None
    assert default.scale == "lora_product_out"
    ia3 = cf.compress_file("tests/data/ia3-minilm-vader", tmp_path / "d", density=0.01)
    assert ia3.note is None


def test_lora_product_is_refused_for_other_sources(tmp_path):
    import compeft_format as cf

    with pytest.raises(EncodeError, match="adapter of PEFT type IA3"):
        cf.compress_file("tests/data/ia3-minilm-vader", tmp_path / "x", scale="lora_product")
    with pytest.raises(EncodeError, match="scale must be one of"):
        compress({"w": np.ones(4)}, density=0.5, scale="lora_product")


def test_peft_loads_a_lora_product_file(tmp_path):
    import copy

    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import compeft_format as cf
    from compeft_format import peft as cpeft

    config = transformers.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                     intermediate_size=1536, vocab_size=40,
                                     max_position_embeddings=32)
    torch.manual_seed(0)
    bert = transformers.BertModel(config).eval()
    base = f"{LORA}/init"
    cf.compress_file(LORA, tmp_path / "c", density=0.02, scale="lora_product", base=base)
    cf.decompress_file(tmp_path / "c", tmp_path / "r", base=base)
    want = peft.PeftModel.from_pretrained(copy.deepcopy(bert), tmp_path / "r")
    got = cpeft.from_pretrained(copy.deepcopy(bert), tmp_path / "c", base=base)
    wa = peft.get_peft_model_state_dict(got, save_embedding_layers=False)
    wb = peft.get_peft_model_state_dict(want, save_embedding_layers=False)
    assert set(wa) == set(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_cli_scale_lora_product(tmp_path, capsys):
    from cli_helpers import one_line_error, run

    import compeft_format as cf

    code, _, err = run(capsys, "compress", LORA, "-o", tmp_path / "c", "--density", "0.02",
                         "--scale", "lora_product", "--base", f"{LORA}/init")
    assert code == 0, err
    with cf.open_file(tmp_path / "c" / "adapter_model.compeft") as r:
        assert r.metadata()["compeft.compression"]["scale"] == "lora_product"
    code, _, err = run(capsys, "compress", "tests/data/ia3-minilm-vader", "-o", tmp_path / "d",
                       "--scale", "lora_product")
    assert code == 1
    one_line_error(err, "lora_product", "IA3")
