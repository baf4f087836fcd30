"""compress(): exact top-k, signs and scale against a plain argsort reference; edge cases."""

from __future__ import annotations

import importlib
import json
import math
import weakref
from collections.abc import Iterator, Mapping

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from compeft_format.compress import (
    COMPRESSION_METADATA_KEY,
    TopK,
    compress,
    compression_metadata,
    select_topk,
)
from compeft_format.errors import CompeftError, EncodeError
from compeft_format.taskvec import TaskVector
from compeft_format.tensor import TernaryTensor

# the module itself (the package may export a function of the same name)
cmod = importlib.import_module("compeft_format.compress")
selmod = importlib.import_module("compeft_format.selection")
smod = importlib.import_module("compeft_format.scales")

SCALES = ("proj_vcap", "kron_sketch", "kron", "gram", "proj", "norm", "l2", "std")
METRIC = ("gram", "kron", "kron_sketch")
SCOPES = ("global", "tensor", "role")


# ---------------------------------------------------------------------------------------------
# the plain reference: concatenate in sorted-name order, stable argsort by descending magnitude
# ---------------------------------------------------------------------------------------------
def _values64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def reference(tv, density, alpha=1.0, scope="global", scale="proj_vcap", exclude=()):
    """name -> (indices, signs, scale as float64) for the compressed names."""
    names = sorted(n for n in tv if n not in exclude)
    groups = [names] if scope == "global" else [[n] for n in names]
    if scope == "role":
        roles = [[n for n in names if ".lora_A." in n], [n for n in names if ".lora_B." in n]]
        groups = [*roles, [n for n in names if n not in roles[0] + roles[1]]]
    out = {}
    for group in groups:
        flats = [_values64(tv[n]).reshape(-1) for n in group]
        flat = np.concatenate([np.empty(0), *flats])
        n = flat.size
        mags = np.abs(flat)
        k = max(1, round(density * n)) if n else 0
        chosen = np.argsort(-mags, kind="stable")[:k]  # ties: lowest position first
        chosen = chosen[mags[chosen] > 0]  # zeros are never kept
        if not chosen.size:
            s = 0.0
        elif scale in ("proj", "proj_vcap") or (
            scale in METRIC and not _gram_reference(tv, group, flats, chosen, scale)[0]
        ):
            s = alpha * float(np.sum(flat * flat)) / float(mags[chosen].sum())
        elif scale in METRIC:
            _, num, den = _gram_reference(tv, group, flats, chosen, scale)
            s = alpha * num / den
        elif scale == "norm":
            s = alpha * math.sqrt(float(np.sum(flat * flat))) / math.sqrt(chosen.size)
        elif scale == "l2":
            s = alpha * float(mags[chosen].mean())
        else:
            s = alpha * float(flat.std(ddof=1)) if n > 1 else 0.0
        if float(np.float32(s)) == 0.0:
            chosen = chosen[:0]
        chosen = np.sort(chosen)
        off = 0
        for name, f in zip(group, flats, strict=True):
            sel = chosen[(chosen >= off) & (chosen < off + f.size)]
            s_name = s
            capped = scale in ("proj_vcap", *METRIC)
            if capped and sum(d > 1 for d in np.shape(tv[name])) <= 1 and sel.size:
                s_name = min(s, alpha * float(np.abs(f).max()))  # a vector's own cap
            out[name] = (sel - off, flat[sel] < 0, s_name)
            off += f.size
    return out


def _gram_reference(tv, group, flats, chosen, scale="gram"):
    """``(usable, num, den)`` of the "gram" or "kron" scale, by the dense trace formulas.

    "gram": input metric ``C = t^T t`` (mean eigenvalue 1). "kron": output metric
    ``G = (t t^T)^(1/2)`` and input metric ``A = (t^T t)^(1/2)`` (each mean eigenvalue 1),
    here through numpy's SVD (the library goes through an eigendecomposition instead).
    "kron_sketch": each matrix's terms from the library's estimate,
    :func:`~compeft_format.scales.kron_sketch_terms`, on this reference's own selection (what
    is checked here is how compress sums them; the estimate is tested on its own below).
    """
    num = den = 0.0
    off = 0
    for name, f in zip(group, flats, strict=True):
        shape = np.shape(tv[name])
        sel = chosen[(chosen >= off) & (chosen < off + f.size)] - off
        off += f.size
        if sum(d > 1 for d in shape) <= 1 or not sel.size:
            continue
        t = f.reshape(shape[0], -1)
        signs = np.zeros(f.size)
        signs[sel] = np.sign(f[sel])
        s_mat = signs.reshape(t.shape)
        if scale == "kron_sketch":
            n_, d_ = smod.kron_sketch_terms(t, sel, f[sel] < 0)
            num += n_
            den += d_
            continue
        if scale == "gram":
            g, c = np.eye(t.shape[0]), t.T @ t / (float((t * t).sum()) / t.shape[1])
        else:
            u, sv, vt = np.linalg.svd(t, full_matrices=False)
            g = u @ np.diag(sv) @ u.T / (sv.sum() / t.shape[0])
            c = vt.T @ np.diag(sv) @ vt / (sv.sum() / t.shape[1])
        num += float(np.trace(g @ s_mat @ c @ t.T))
        den += float(np.trace(g @ s_mat @ c @ s_mat.T))
    return num > 0 and den > 0, num, den


def assert_matches(out, ref, tv):
    assert set(ref) <= set(out)
    for name, (idx, signs, s) in ref.items():
        t = out[name]
        assert isinstance(t, TernaryTensor), name
        assert t.shape == tuple(np.shape(tv[name])), name
        np.testing.assert_array_equal(t.indices, idx, err_msg=name)
        np.testing.assert_array_equal(t.signs, signs, err_msg=name)
        if idx.size:
            assert t.scale == pytest.approx(s, rel=1e-6), name
        else:
            assert t.nnz == 0


def tie_heavy(rng, shapes, dtype=np.float32, zeros=0.3):
    """Values on a coarse grid (many exact ties) with a fraction of zeros."""
    out = {}
    for i, shape in enumerate(shapes):
        v = np.asarray(rng.integers(-4, 5, size=shape) * 0.125, dtype=dtype)
        v[rng.random(shape) < zeros] = 0
        out[f"t{i:02d}"] = v
    return out


# ---------------------------------------------------------------------------------------------
# against the reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("density", [0.001, 0.05, 0.3, 0.5, 0.9, 1.0])
def test_matches_reference_with_ties_and_zeros(scope, scale, density):
    rng = np.random.default_rng(1)
    tv = tie_heavy(rng, [(7, 13), (200,), (3, 4, 5), (), (0, 3), (1,), (64, 33)])
    tv["zz_all_zero"] = np.zeros((4, 4), np.float32)
    out = compress(tv, density=density, scope=scope, scale=scale, alpha=1.5)
    assert_matches(out, reference(tv, density, 1.5, scope, scale), tv)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("scale", SCALES)
def test_matches_reference_continuous_large(scope, scale):
    # big enough that the sampled band is a real band, not the whole scope
    rng = np.random.default_rng(2)
    tv = {
        "b.weight": rng.standard_normal((300, 700)).astype(np.float32),
        "a.weight": rng.standard_normal(150_000).astype(np.float32) * 0.5,
        "c.bias": rng.standard_normal(512).astype(np.float32),
    }
    out = compress(tv, density=0.07, scope=scope, scale=scale)
    assert_matches(out, reference(tv, 0.07, 1.0, scope, scale), tv)


@pytest.mark.parametrize("scale", SCALES)
def test_role_scope_selects_lora_a_and_b_apart(scale):
    # A large (random init), B small (trained from zero): a global selection would take
    # nearly all of its entries from A; by role, each keeps its own density
    rng = np.random.default_rng(7)
    tv = {}
    for m in ("l0.q", "l0.v", "l1.q"):
        tv[f"{m}.lora_A.weight"] = rng.uniform(-0.05, 0.05, (8, 96)).astype(np.float32)
        tv[f"{m}.lora_B.weight"] = (rng.standard_normal((96, 8)) * 0.004).astype(np.float32)
    tv["head.bias"] = rng.standard_normal(16).astype(np.float32) * 0.01
    out = compress(tv, density=0.1, scope="role", scale=scale)
    assert_matches(out, reference(tv, 0.1, 1.0, "role", scale), tv)
    b_kept = sum(out[n].nnz for n in tv if ".lora_B." in n)
    assert b_kept == round(0.1 * 3 * 96 * 8)
    assert sum(compress(tv, density=0.1)[n].nnz for n in tv if ".lora_B." in n) < b_kept / 4
    streamed = dict(cmod.iter_compress(tv, density=0.1, scope="role", scale=scale))
    assert list(streamed) == sorted(tv)
    assert all(streamed[n] == out[n] for n in tv)


def test_mixed_dtypes_compare_in_float64():
    rng = np.random.default_rng(3)
    tv = {
        "f64": rng.standard_normal(1000),
        "f16": rng.standard_normal(1000).astype(np.float16),
        "f32": rng.standard_normal(1000).astype(np.float32),
    }
    tv["f64"][:5] = tv["f32"][:5]  # exact cross-dtype ties
    out = compress(tv, density=0.2)
    assert_matches(out, reference(tv, 0.2), tv)
    assert {n: t.dtype for n, t in out.items()} == {"f64": "F64", "f16": "F16", "f32": "F32"}


def test_global_ties_follow_sorted_name_order_not_input_order():
    tv = {"b": np.array([1.0, 1.0]), "a": np.array([0.5, 1.0])}
    out = compress(tv, density=0.5)  # k = 2 of three equal magnitudes 1.0
    assert list(out) == ["b", "a"]  # input order kept in the result
    assert out["a"].indices.tolist() == [1]
    assert out["b"].indices.tolist() == [0]
    per = compress(tv, density=0.5, scope="tensor")
    assert per["a"].indices.tolist() == [1]
    assert per["b"].indices.tolist() == [0]


def test_keeps_exactly_round_density_n():
    rng = np.random.default_rng(4)
    tv = {"w": rng.standard_normal(1001).astype(np.float32)}
    for d in (0.1, 0.25, 0.5, 0.0005, 1e-9):
        assert compress(tv, density=d)["w"].nnz == max(1, round(d * 1001))


def test_never_keeps_zeros_and_all_zero_scope_is_empty():
    tv = {"w": np.array([0.0, 3.0, 0.0, -1.0]), "z": np.zeros(3)}
    out = compress(tv, density=1.0)
    assert out["w"].indices.tolist() == [1, 3]
    assert out["z"].nnz == 0
    zero = compress({"a": np.zeros(5), "b": np.zeros((2, 0))}, density=0.5)
    for name, t in zero.items():
        assert t.nnz == 0, name
        assert t.scale == 0.0, name
    assert zero["b"].shape == (2, 0)


def test_constant_task_vector_with_std_scale_is_empty():
    out = compress({"w": np.full(10, 0.5)}, density=0.3, scale="std")
    assert out["w"].nnz == 0
    assert out["w"].scale == 0.0
    assert compress({"w": np.full(10, 0.5)}, density=0.3)["w"].nnz == 3


def test_zero_d_and_empty_tensors():
    tv = {"s": np.float32(2.5), "e": np.empty((0, 4), np.float32), "v": np.float32([1, -1])}
    out = compress(tv, density=0.5, scope="tensor")
    assert out["s"].shape == ()
    assert out["s"].nnz == 1
    assert out["e"].shape == (0, 4)
    assert out["e"].nnz == 0
    g = compress(tv, density=0.34)  # round(0.34 * 3) = 1: the scalar wins
    assert g["s"].nnz == 1
    assert g["v"].nnz == 0


def test_scales_by_hand():
    tv = {"w": np.array([3.0, -4.0, 0.0, 1.0])}
    # kept: -4, 3
    assert compress(tv, density=0.5, scale="l2")["w"].scale == pytest.approx(3.5)
    assert compress(tv, density=0.5, scale="norm")["w"].scale == pytest.approx(
        math.sqrt(26) / math.sqrt(2)
    )
    assert compress(tv, density=0.5, scale="std", alpha=2)["w"].scale == pytest.approx(
        2 * np.std([3.0, -4.0, 0.0, 1.0], ddof=1)
    )
    got = compress(tv, density=0.5, scale="norm")["w"].to_numpy()
    s = math.sqrt(13)
    np.testing.assert_allclose(got, [s, -s, 0, 0], rtol=1e-6)
    assert np.linalg.norm(got) == pytest.approx(np.linalg.norm(tv["w"]), rel=1e-6)
    # the default, proj (not capped here: 26/7 < max |t| = 4): unbiased along t
    got = compress(tv, density=0.5)["w"].to_numpy()
    np.testing.assert_allclose(got, [26 / 7, -26 / 7, 0, 0], rtol=1e-6)
    assert float(got @ tv["w"]) == pytest.approx(float(tv["w"] @ tv["w"]), rel=1e-6)
    # a vector whose own largest |t| is below proj's scale is capped at it; a matrix is not
    vec = {"v": np.array([0.5, -0.1]), "m": np.array([[2.0, 1.0], [0.0, 1.0]])}
    out = compress(vec, density=0.4)  # keeps 2.0 and one 1.0; proj = 6.26 / 3
    assert out["m"].scale == pytest.approx(6.26 / 3, rel=1e-6)
    assert out["v"].nnz == 0
    out = compress(vec, density=0.7)  # keeps 2.0, 1.0, 1.0 and 0.5; proj = 6.26 / 4.5
    assert out["m"].scale == pytest.approx(6.26 / 4.5, rel=1e-6)
    assert out["v"].nnz == 1
    assert out["v"].scale == pytest.approx(0.5)  # capped: 0.5 < 6.26 / 4.5
    out = compress(vec, density=0.6)  # keeps 2.0, 1.0, 1.0, 0.5; proj = 6.26 / 4.5
    assert out["m"].scale == pytest.approx(6.26 / 4.5, rel=1e-6)
    assert out["v"].scale == pytest.approx(0.5)
    assert compress(vec, density=0.6, scale="proj")["v"].scale == pytest.approx(6.26 / 4.5)


@pytest.mark.parametrize("shape", [(7, 19), (19, 7), (12, 12), (1, 9)])
def test_kron_terms_match_the_svd_formulas(shape):
    """kron_terms (eigendecomposition of the smaller Gram) = the trace formulas via SVD."""
    rng = np.random.default_rng(sum(shape))
    t = rng.standard_normal(shape) * rng.lognormal(0, 1, shape[1])  # uneven columns
    idx = np.sort(rng.choice(t.size, max(1, t.size // 5), replace=False))
    signs = t.reshape(-1)[idx] < 0
    num, den = cmod.kron_terms(t, idx, signs)
    u, sv, vt = np.linalg.svd(t, full_matrices=False)
    g = u @ np.diag(sv) @ u.T / (sv.sum() / shape[0])
    a = vt.T @ np.diag(sv) @ vt / (sv.sum() / shape[1])
    s_mat = np.zeros(t.size)
    s_mat[idx] = np.where(signs, -1.0, 1.0)
    s_mat = s_mat.reshape(shape)
    assert num == pytest.approx(float(np.trace(g @ s_mat @ a @ t.T)), rel=1e-9)
    assert den == pytest.approx(float(np.trace(g @ s_mat @ a @ s_mat.T)), rel=1e-9)
    # the numerator needs no decomposition: <S, t t^T t> over the two mean eigenvalues
    assert num == pytest.approx(float((s_mat * (t @ t.T @ t)).sum())
                                / (sv.sum() ** 2 / t.size), rel=1e-9)


def test_kron_terms_rank_deficient_and_empty():
    rng = np.random.default_rng(3)
    low = rng.standard_normal((9, 2)) @ rng.standard_normal((2, 6))  # rank 2
    idx = np.array([0, 7, 20, 33])
    num, den = cmod.kron_terms(low, idx, low.reshape(-1)[idx] < 0)
    u, sv, vt = np.linalg.svd(low, full_matrices=False)
    sv, u, vt = sv[:2], u[:, :2], vt[:2]  # the exact rank: the rest is rounding noise
    m = u.T @ (np.zeros(54) + np.isin(np.arange(54), idx) * np.sign(low.reshape(-1))
               ).reshape(9, 6) @ vt.T
    norm = (sv.sum() / 9) * (sv.sum() / 6)
    assert num == pytest.approx(float((sv**3 * np.diag(m)).sum()) / norm, rel=1e-7)
    assert den == pytest.approx(float((np.outer(sv, sv) * m**2).sum()) / norm, rel=1e-7)
    assert cmod.kron_terms(np.zeros((3, 4)), np.array([1]), np.array([False])) == (0.0, 0.0)
    assert cmod.kron_terms(low, np.array([], np.int64), np.array([], bool)) == (0.0, 0.0)


def test_kron_is_proj_on_a_rank_one_matrix_and_gram_is_not():
    """A rank-one update has one output and one input direction: both metrics are those
    directions, so "kron" puts back exactly the projection on t, as "proj" does."""
    rng = np.random.default_rng(11)
    t = np.outer(rng.standard_normal(8), rng.standard_normal(5))
    for density in (0.1, 0.3, 0.6):
        kron = compress({"w": t}, density=density, scale="kron")["w"].scale
        proj = compress({"w": t}, density=density, scale="proj")["w"].scale
        gram = compress({"w": t}, density=density, scale="gram")["w"].scale
        assert kron == pytest.approx(proj, rel=1e-6)
        assert gram != pytest.approx(proj, rel=1e-3)


def _fine_tune_like(rng, rows, cols, rank=6, decay=0.5):
    """A near-full-rank update: a few strong directions over a bulk whose singular values
    fall off as a power law (``decay``), as an AdamW full fine-tune's do."""
    k = min(rows, cols)
    u, _ = np.linalg.qr(rng.standard_normal((rows, k)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, k)))
    sv = (np.arange(1, k + 1) + rank) ** -decay
    sv[:rank] *= 2.0
    return ((u * sv) @ v.T).astype(np.float32)


def _top(t, density):
    idx = np.sort(np.argsort(-np.abs(t), axis=None, kind="stable")[: round(density * t.size)])
    return idx, np.signbit(t.reshape(-1)[idx])


@pytest.mark.parametrize("shape", [(200, 90), (90, 200), (128, 128)])
@pytest.mark.parametrize("decay", [0.3, 0.6])
def test_kron_sketch_is_close_to_kron_on_a_full_rank_update(shape, decay):
    """The estimate's ratio num/den (the scale) stays within 5% of the exact one, and each
    term within 10%, where the tail (what the sketch's rank misses) holds 15-50% of the
    energy and is far from flat (a slow power law)."""
    rng = np.random.default_rng(int(decay * 10) + shape[0])
    t = _fine_tune_like(rng, *shape, decay=decay)
    sv = np.linalg.svd(t.astype(np.float64), compute_uv=False)
    assert float((sv[smod.SKETCH_RANK:] ** 2).sum() / (sv**2).sum()) > 0.15  # a real tail
    for density in (0.01, 0.05, 0.2):
        idx, signs = _top(t, density)
        num, den = smod.kron_sketch_terms(t, idx, signs)
        e_num, e_den = smod.kron_terms(t, idx, signs)
        assert num / den == pytest.approx(e_num / e_den, rel=0.05), density
        # the terms themselves (their weight in a scope's sums) within 10%
        assert num == pytest.approx(e_num, rel=0.1)
        assert den == pytest.approx(e_den, rel=0.1)


def test_kron_sketch_is_kron_without_a_tail():
    rng = np.random.default_rng(5)
    small = rng.standard_normal((smod.SKETCH_RANK, 300))  # a side within the rank: exact
    idx, signs = _top(small, 0.1)
    assert smod.kron_sketch_terms(small, idx, signs) == smod.kron_terms(small, idx, signs)
    low = (rng.standard_normal((150, 8)) @ rng.standard_normal((8, 220))).astype(np.float32)
    for density in (0.01, 0.2):  # rank 8 < SKETCH_RANK: the range finder holds all of it
        idx, signs = _top(low, density)
        num, den = smod.kron_sketch_terms(low, idx, signs)
        e_num, e_den = smod.kron_terms(low, idx, signs)
        assert num == pytest.approx(e_num, rel=1e-4)
        assert den == pytest.approx(e_den, rel=1e-4)


def test_kron_sketch_is_deterministic_homogeneous_and_safe_at_extremes():
    rng = np.random.default_rng(8)
    t = _fine_tune_like(rng, 100, 140).astype(np.float64)
    idx, signs = _top(t, 0.05)
    np.random.seed(1)
    first = smod.kron_sketch_terms(t, idx, signs)
    np.random.seed(2)  # the global random state plays no part
    assert smod.kron_sketch_terms(t, idx, signs) == first
    # num ~ t, den ~ 1; far outside float32's range both ways, with no overflow
    for factor in (1e-30, 1e30, 2.0**-140):
        num, den = smod.kron_sketch_terms(t * factor, idx, signs)
        assert num == pytest.approx(first[0] * factor, rel=1e-5)
        assert den == pytest.approx(first[1], rel=1e-5)
    transposed = np.ravel_multi_index(np.unravel_index(idx, t.shape)[::-1], t.T.shape)
    order = np.argsort(transposed)
    num, den = smod.kron_sketch_terms(t.T, transposed[order], signs[order])
    assert num / den == pytest.approx(first[0] / first[1], rel=1e-4)
    assert smod.kron_sketch_terms(np.zeros((40, 50)), idx[:3], signs[:3]) == (0.0, 0.0)
    assert smod.kron_sketch_terms(t, idx[:0], signs[:0]) == (0.0, 0.0)


@pytest.mark.parametrize("shape", [(100, 140), (140, 100)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kron_sketch_on_row_blocks_is_kron_sketch_on_the_array(shape, dtype):
    # a matrix read a few rows at a time (as compress hands a BF16 or made-on-demand matrix
    # to the rule, so that it needs no float32 copy of it) gives the same terms, up to the
    # order of float32 additions, including the scaled copy of far-off values
    rng = np.random.default_rng(12)
    for factor in (1.0, 1e-30):
        t = (_fine_tune_like(rng, *shape) * factor).astype(dtype)
        idx, signs = _top(t, 0.05)
        want = smod.kron_sketch_terms(t, idx, signs)
        blocks = smod.RowBlocks(t.shape, t.dtype, lambda a, z, t=t: t[a:z],
                                lambda i, t=t: t.reshape(-1)[i], step=7)
        assert len(list(blocks.blocks())) == -(-shape[0] // 7)
        got = smod.kron_sketch_terms(blocks, idx, signs)
        assert got == pytest.approx(want, rel=1e-5)
    # one block is the array itself: the very same terms
    assert smod.kron_sketch_terms(smod.RowBlocks.of(t), idx, signs) == want


def test_kron_sketch_of_bf16_storage_reads_row_blocks(monkeypatch):
    # compress gives kron_sketch a BF16 matrix a block at a time, never a float32 copy
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(13)
    w = torch.from_numpy(_fine_tune_like(rng, 90, 60).astype(np.float32)).to(torch.bfloat16)
    seen = []
    real = smod.kron_sketch_terms

    def spy(t, idx, signs):
        seen.append(type(t).__name__)
        return real(t, idx, signs)

    monkeypatch.setitem(smod.METRIC_TERMS, "kron_sketch", spy)
    got = compress({"w": w}, density=0.05, scale="kron_sketch")["w"]
    want = compress({"w": w.float().numpy()}, density=0.05, scale="kron_sketch")["w"]
    assert seen == ["RowBlocks", "ndarray"]
    assert (got.nnz, got.scale) == (want.nnz, want.scale)


def test_kron_without_a_kept_matrix_entry_is_proj_vcap():
    tv = {"v": np.array([0.5, -0.1, 0.05]), "b": np.array([[0.01, -0.02], [0.0, 0.01]])}
    for density in (0.2, 0.4):  # only entries of the vector are kept
        got = compress(tv, density=density, scale="kron")
        want = compress(tv, density=density, scale="proj_vcap")
        assert {n: (got[n].nnz, got[n].scale) for n in tv} == {
            n: (want[n].nnz, want[n].scale) for n in tv}


@pytest.mark.parametrize("module", ["compress", "passes", "scales", "selection"])
def test_compress_doctests(module):
    import doctest

    mod = importlib.import_module(f"compeft_format.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted
    assert not result.failed


def test_std_statistics_are_accurate_with_a_large_mean():
    # mean 1e4, std ~1e-3 over chunks: a naive sum-of-squares formula would lose it all
    rng = np.random.default_rng(5)
    x = 1e4 + rng.standard_normal(3 * (1 << 20) + 17) * 1e-3
    got = compress({"w": x}, density=0.01, scale="std")["w"].scale
    assert got == pytest.approx(float(np.float32(x.std(ddof=1))), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# dtypes, torch, task vectors
# ---------------------------------------------------------------------------------------------
def test_torch_bf16_input():
    g = torch.Generator().manual_seed(0)
    tv = {
        "x.weight": (torch.randn(64, 48, generator=g) * 0.01).to(torch.bfloat16),
        "x.bias": (torch.randn(48, generator=g) * 0.01).to(torch.bfloat16),
    }
    for scope in SCOPES:
        out = compress(tv, density=0.1, scope=scope)
        for name, t in out.items():
            assert t.dtype == "BF16"
            assert t.shape == tuple(tv[name].shape)
        assert_matches(out, reference(tv, 0.1, scope=scope), tv)
        dense = out["x.weight"].to_torch()
        assert dense.dtype == torch.bfloat16
        kept = dense != 0
        assert torch.equal(torch.signbit(dense[kept]), torch.signbit(tv["x.weight"][kept]))


def test_torch_float32_and_float16_input():
    g = torch.Generator().manual_seed(1)
    tv = {"a": torch.randn(100, generator=g), "b": torch.randn(50, generator=g).half()}
    out = compress(tv, density=0.2)
    assert (out["a"].dtype, out["b"].dtype) == ("F32", "F16")
    assert_matches(out, reference(tv, 0.2), tv)


def test_declared_dtypes_of_a_task_vector_are_kept():
    tv = TaskVector({"w": np.array([0.5, -0.25], np.float32)}, dtypes={"w": "BF16"})
    assert compress(tv, density=1.0)["w"].dtype == "BF16"


# ---------------------------------------------------------------------------------------------
# exclude, progress, order, metadata
# ---------------------------------------------------------------------------------------------
def test_exclude_keeps_values_untouched_and_out_of_the_scope():
    rng = np.random.default_rng(6)
    head = rng.standard_normal((2, 8)).astype(np.float32) * 100
    ids = np.arange(10)
    tv = {
        "enc.w": rng.standard_normal(300).astype(np.float32),
        "classifier.weight": head,
        "classifier.bias": torch.ones(2),
        "pos_ids": ids,
    }
    out = compress(tv, density=0.1, exclude=["classifier.*", "pos_ids"])
    assert out["classifier.weight"] is head
    assert out["pos_ids"] is ids
    assert out["classifier.bias"] is tv["classifier.bias"]
    assert list(out) == list(tv)
    ref = reference({"enc.w": tv["enc.w"]}, 0.1)
    assert_matches(out, ref, tv)
    assert compress(tv, density=0.1, exclude="*")["enc.w"] is tv["enc.w"]


def test_exclude_is_case_sensitive_glob():
    tv = {"Head.w": np.ones(2), "x": np.ones(2)}
    assert isinstance(compress(tv, density=1.0, exclude=["head.*"])["Head.w"], TernaryTensor)
    with pytest.raises(EncodeError):
        compress(tv, density=1.0, exclude=[3])


def test_progress_called_once_per_tensor():
    seen = []
    tv = {"b": np.ones(3), "a": np.ones(2), "skip": np.ones(1)}
    compress(tv, density=0.5, exclude=["skip"], progress=seen.append)
    assert sorted(seen) == ["a", "b", "skip"]
    seen.clear()
    compress(tv, density=0.5, scope="tensor", progress=seen.append)
    assert sorted(seen) == ["a", "b", "skip"]


def test_compression_metadata():
    meta = compression_metadata(0.1, 2, "tensor", "l2")
    assert meta == {
        "method": "compeft",
        "density": 0.1,
        "alpha": 2.0,
        "scope": "tensor",
        "scale": "l2",
    }
    json.dumps(meta, allow_nan=False)
    assert COMPRESSION_METADATA_KEY == "compeft.compression"
    with pytest.raises(EncodeError):
        compression_metadata(0, 1, "global", "norm")
    with pytest.raises(EncodeError):
        compression_metadata(0.1, 1, "layer", "norm")


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "density", [0, 0.0, -0.1, 1.0000001, 2, math.nan, math.inf, True, "0.1", None]
)
def test_bad_density(density):
    with pytest.raises(EncodeError, match="density"):
        compress({"w": np.ones(3)}, density=density)


@pytest.mark.parametrize("alpha", [0, -1.0, math.nan, math.inf, False, "1"])
def test_bad_alpha(alpha):
    with pytest.raises(EncodeError, match="alpha"):
        compress({"w": np.ones(3)}, density=0.5, alpha=alpha)


def test_bad_scope_and_scale():
    with pytest.raises(EncodeError, match="scope"):
        compress({"w": np.ones(3)}, density=0.5, scope="layer")
    with pytest.raises(EncodeError, match="scale"):
        compress({"w": np.ones(3)}, density=0.5, scale="max")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("scale", SCALES)
def test_non_finite_input_names_the_tensor(bad, scale):
    x = np.zeros(3 * (1 << 20) + 5, np.float32)
    x[(1 << 21) + 7] = bad
    with pytest.raises(EncodeError) as info:
        compress({"a": np.ones(4), "bad.w": x}, density=0.1, scale=scale)
    assert info.value.tensor == "bad.w"
    assert str((1 << 21) + 7) in str(info.value)
    with pytest.raises(EncodeError):
        compress({"bad": torch.tensor([1.0, bad]).bfloat16()}, density=0.1, scope="tensor")


def test_non_float_tensor_names_the_tensor():
    with pytest.raises(EncodeError, match="exclude") as info:
        compress({"w": np.ones(3), "step": np.array(5)}, density=0.5)
    assert info.value.tensor == "step"
    with pytest.raises(EncodeError) as info:
        compress({"mask": torch.ones(3, dtype=torch.bool)}, density=0.5)
    assert info.value.tensor == "mask"
    assert isinstance(info.value, CompeftError)


def test_scale_overflow_is_an_error():
    with pytest.raises(EncodeError, match="F16") as info:
        compress({"w": np.full(100, 60000, np.float16)}, density=0.01)
    assert info.value.tensor == "w"
    with pytest.raises(EncodeError, match="float32"):
        compress({"w": np.full(4, 1e100), "v": np.ones(2)}, density=0.5)
    with pytest.raises(EncodeError, match="overflows float64") as info:
        compress({"w": np.full(4, 1e200)}, density=0.5)
    assert info.value.tensor == "w"


# ---------------------------------------------------------------------------------------------
# lazy mappings: one value at a time, fetched a bounded number of times
# ---------------------------------------------------------------------------------------------
class LazyTensors(Mapping):
    """Creates each value on access and records how many earlier values are still alive."""

    def __init__(self, specs: dict[str, tuple[int, int]]) -> None:
        self.specs = specs
        self.fetches: dict[str, int] = dict.fromkeys(specs, 0)
        self.alive_at_fetch: list[int] = []
        self._refs: list[weakref.ref] = []

    def __getitem__(self, name: str) -> np.ndarray:
        size, seed = self.specs[name]
        self.alive_at_fetch.append(sum(r() is not None for r in self._refs))
        self.fetches[name] += 1
        value = np.random.default_rng(seed).standard_normal(size).astype(np.float32)
        self._refs.append(weakref.ref(value))
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("scale", SCALES)
def test_lazy_mapping_holds_one_value_at_a_time(scope, scale):
    specs = {f"layer{i}": (50_000 + 1000 * i, i) for i in range(5)}
    lazy = LazyTensors(specs)
    out = compress(lazy, density=0.05, scope=scope, scale=scale)
    assert max(lazy.alive_at_fetch) == 0
    assert max(lazy.fetches.values()) <= (1 if scope == "tensor" else 3)
    eager = {n: lazy[n] for n in specs}
    assert_matches(out, reference(eager, 0.05, scope=scope, scale=scale), eager)


# ---------------------------------------------------------------------------------------------
# select_topk and its fallbacks
# ---------------------------------------------------------------------------------------------
def sorted_topk(arrays, k) -> TopK:
    flat = np.concatenate([np.asarray(a, np.float64).reshape(-1) for a in arrays])
    if k <= 0 or not flat.size:
        return TopK(math.inf, 0, 0)
    desc = np.sort(flat)[::-1]
    t = desc[min(k, flat.size) - 1]
    if t == 0:
        return TopK(0.0, int(np.count_nonzero(flat > 0)), 0)
    greater = int(np.count_nonzero(flat > t))
    return TopK(float(t), greater, min(k, flat.size) - greater)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_select_topk_matches_sort(dtype):
    rng = np.random.default_rng(7)
    a = np.abs(rng.standard_normal(400_000)).astype(dtype)
    b = np.abs(rng.integers(0, 6, 50_000) * 0.5).astype(dtype)  # massive ties and zeros
    for k in (1, 7, 1000, 40_000, 225_000, 449_999, 450_000, 10**7):
        assert select_topk([a, b], k) == sorted_topk([a, b], k), k
    assert select_topk(a, 0) == TopK(math.inf, 0, 0)
    assert select_topk([], 3) == TopK(math.inf, 0, 0)


@pytest.mark.parametrize(
    "edges",
    [
        lambda s, n, k, w: (w.type(100.0), w.type(np.inf)),  # band above the threshold
        lambda s, n, k, w: (w.type(-1), w.type(1e-6)),  # band below it
        lambda s, n, k, w: (w.type(0.5), w.type(0.5000001)),  # thin band beside it
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unlucky_sample_falls_back_to_exact_radix(monkeypatch, edges, dtype):
    calls = []
    radix = selmod.radix_select
    monkeypatch.setattr(selmod, "band_edges", edges)
    monkeypatch.setattr(selmod, "radix_select", lambda *a: calls.append(1) or radix(*a))
    rng = np.random.default_rng(8)
    a = np.abs(rng.standard_normal(100_000)).astype(dtype)
    a[::7] = a[3]  # a tied value
    for k in (1, 14_286, 30_000, 99_999):
        assert select_topk(a, k) == sorted_topk([a], k), k
    assert calls


def test_band_over_the_cap_falls_back(monkeypatch):
    calls = []
    radix = selmod.radix_select
    monkeypatch.setattr(selmod, "radix_select", lambda *a: calls.append(1) or radix(*a))
    monkeypatch.setattr(selmod, "BAND_CAP_MIN", 10)
    monkeypatch.setattr(selmod, "BAND_CAP_DIV", 10**9)
    x = np.full(50_000, 0.25, np.float32)  # every magnitude tied
    x[::3] = 0
    x[5] = 1.0
    tv = {"w": x * np.where(np.arange(x.size) % 2, 1, -1).astype(np.float32)}
    for d in (0.01, 0.5, 0.9):
        out = compress(tv, density=d)
        assert_matches(out, reference(tv, d), tv)
    assert len(calls) == 3


@pytest.mark.parametrize(
    "edges",
    [
        lambda s, n, k, w: (w.type(100.0), w.type(np.inf)),  # band above the threshold
        lambda s, n, k, w: (w.type(-1), w.type(1e-6)),  # band below it (everything a candidate)
        lambda s, n, k, w: (w.type(0.5), w.type(0.5000001)),  # thin band beside it
        lambda s, n, k, w: (w.type(0.0), w.type(0.05)),  # band below: every nonzero a candidate
    ],
)
@pytest.mark.parametrize("scale", ["proj_vcap", "norm", "gram", "kron", "kron_sketch"])
def test_unlucky_sample_in_compress_is_still_exact(monkeypatch, edges, scale):
    # compress finds the band in its statistics pass and keeps the candidates' positions;
    # a band that misses the threshold must still give the exact selection, by compress
    # (from the candidates where they hold every kept entry, else from a pass of its own)
    # and iter_compress alike
    radix = selmod.radix_select
    calls = []
    monkeypatch.setattr(selmod, "band_edges", edges)
    monkeypatch.setattr(selmod, "radix_select", lambda *a: calls.append(1) or radix(*a))
    rng = np.random.default_rng(12)
    tv = {"m": np.round(rng.standard_normal((300, 200)), 1).astype(np.float32),
          "v": rng.standard_normal(5000).astype(np.float64)}
    tv["v"][::9] = 0.0
    for d in (0.001, 0.137, 0.6, 1.0):
        out = compress(tv, density=d, scale=scale)
        assert_matches(out, reference(tv, d, scale=scale), tv)
        streamed = dict(cmod.iter_compress(tv, density=d, scale=scale))
        assert streamed == out
    assert calls


@pytest.mark.parametrize("scale", SCALES)
def test_compress_reads_a_tensor_once_after_its_sample(scale):
    # the statistics pass also finds the threshold's band and the kept entries' positions:
    # a lazy tensor is fetched for its sample, then once in full ("gram" reads a matrix
    # once more for its Gram terms; these are vectors); iter_compress reads it for output
    specs = {f"layer{i}": (30_000 + 1000 * i, i) for i in range(3)}
    lazy = LazyTensors(specs)
    out = compress(lazy, density=0.05, scale=scale)
    assert max(lazy.fetches.values()) == 2
    lazy2 = LazyTensors(specs)
    assert dict(cmod.iter_compress(lazy2, density=0.05, scale=scale)) == out
    assert min(lazy2.fetches.values()) >= 3


def test_fewer_nonzeros_than_k_through_the_band():
    rng = np.random.default_rng(9)
    x = np.zeros(1_000_000, np.float32)
    x[rng.choice(x.size, 30_000, replace=False)] = rng.standard_normal(30_000)
    assert select_topk(np.abs(x), 200_000) == TopK(0.0, 30_000, 0)
    assert compress({"x": x}, density=0.2)["x"].nnz == 30_000


# ---------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------
_grid = st.sampled_from([-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 0.3, -0.7])


@st.composite
def task_vectors(draw):
    count = draw(st.integers(1, 4))
    tv = {}
    for i in range(count):
        dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=12))
        tv[f"m{draw(st.integers(0, 99)):02d}.{i}"] = draw(
            hnp.arrays(dtype, shape, elements=_grid, fill=st.just(0))
        )
    return tv


@settings(deadline=None)
@given(
    tv=task_vectors(),
    density=st.floats(1e-4, 1.0, exclude_min=False) | st.sampled_from([1.0, 0.5, 1e-9]),
    scope=st.sampled_from(SCOPES),
    scale=st.sampled_from(SCALES),
)
def test_property_matches_reference(tv, density, scope, scale):
    out = compress(tv, density=density, scope=scope, scale=scale)
    assert list(out) == list(tv)
    assert_matches(out, reference(tv, density, 1.0, scope, scale), tv)
    for name, t in out.items():
        assert (
            t.dtype
            == {np.float16: "F16", np.float32: "F32", np.float64: "F64"}[tv[name].dtype.type]
        )


@settings(deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 30_000),
    k=st.integers(0, 31_000),
    levels=st.sampled_from([0, 3, 50, 10**6]),
)
def test_property_select_topk(seed, n, k, levels):
    rng = np.random.default_rng(seed)
    a = np.abs(rng.standard_normal(n)).astype(np.float32)
    if levels:
        a = np.round(a * levels) / levels  # ties
    assert select_topk(a, k) == sorted_topk([a], k)


@pytest.mark.parametrize("scale", ["proj_vcap", "std"])
def test_threads_do_not_change_the_result(monkeypatch, scale):
    """Chunks run on several threads and are combined in order: the same output, bit for
    bit, as one thread; ties (many equal magnitudes across chunks) taken in the same order."""
    from compeft_format.compress import compress_threads

    rng = np.random.default_rng(5)
    big = np.round(rng.standard_normal(3 * (1 << 20) + 123), 1).astype(np.float32)  # ties
    tv = {"big": big, "b16": rng.standard_normal((1100, 1000)).astype(np.float32),
          "vec": rng.standard_normal(5000).astype(np.float32)}
    got = {}
    for threads in ("1", "3"):
        monkeypatch.setenv("COMPEFT_THREADS", threads)
        assert compress_threads() == int(threads)
        got[threads] = compress(tv, density=0.137, scale=scale)
    assert got["1"].keys() == got["3"].keys()
    for name in got["1"]:
        assert got["1"][name] == got["3"][name], name
    assert got["1"]["big"].nnz + got["1"]["b16"].nnz + got["1"]["vec"].nnz == round(
        0.137 * sum(v.size for v in tv.values()))
    monkeypatch.setenv("COMPEFT_THREADS", "x")
    with pytest.raises(EncodeError, match="COMPEFT_THREADS must be a positive integer"):
        compress(tv, density=0.1)


def test_role_scope_through_compress_file(tmp_path):
    # the tests/data LoRA adapter from zero: each role keeps its own 5%
    from pathlib import Path

    from compeft_format.container import load_file
    from compeft_format.convert import compress_file

    src = Path(__file__).parent / "data" / "lora-minilm-vader"
    compress_file(src, tmp_path / "out", density=0.05, scope="role", scale="gram")
    got = load_file(tmp_path / "out" / "adapter_model.compeft")
    for role in (".lora_A.", ".lora_B."):
        ts = [t for n, t in got.items() if role in n]
        assert sum(t.nnz for t in ts) == round(0.05 * sum(t.numel for t in ts))
        assert len({t.scale for t in ts if t.nnz}) == 1  # one scale per role (no vectors)
