"""quality_report: relative L2 error and cosine, per tensor and over the concatenation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from compeft_format.compress import compress
from compeft_format.errors import EncodeError
from compeft_format.quality import QualityReport, TensorQuality, quality_report
from compeft_format.taskvec import TaskVector
from compeft_format.tensor import TernaryTensor


def dense_figures(t: np.ndarray, h: np.ndarray) -> tuple[float, float]:
    """Plain reference: (relative error, cosine) of two dense float64 vectors."""
    t = np.asarray(t, np.float64).ravel()
    h = np.asarray(h, np.float64).ravel()
    nt, nh = np.linalg.norm(t), np.linalg.norm(h)
    rel = np.linalg.norm(t - h) / nt if nt else (0.0 if nh == 0 else math.inf)
    cos = float(t @ h / (nt * nh)) if nt and nh else (1.0 if nt == nh == 0 else 0.0)
    return float(rel), cos


def decoded(v) -> np.ndarray:
    if isinstance(v, TernaryTensor):
        return v.to_numpy().astype(np.float64)
    if isinstance(v, torch.Tensor):
        return v.double().numpy()
    return np.asarray(v, np.float64)


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("scale", ["norm", "l2", "std"])
def test_matches_dense_reference(scope, scale):
    rng = np.random.default_rng(0)
    tv = {
        "a": rng.standard_normal((40, 30)).astype(np.float32),
        "b": rng.standard_normal(500) * 3,
        "c": rng.standard_normal(64).astype(np.float16),
        "head": rng.standard_normal((2, 5)).astype(np.float32),
    }
    comp = compress(tv, density=0.2, scope=scope, scale=scale, exclude=["head"])
    report = quality_report(tv, comp)
    assert [q.name for q in report.tensors] == list(tv)
    for name in tv:
        rel, cos = dense_figures(tv[name], decoded(comp[name]))
        q = report[name]
        assert q.rel_error == pytest.approx(rel, rel=1e-9, abs=1e-12)
        assert q.cosine == pytest.approx(cos, rel=1e-9, abs=1e-12)
        assert q.numel == tv[name].size
        assert q.norm == pytest.approx(np.linalg.norm(tv[name].astype(np.float64)))
    assert report["head"].kind == "dense"
    assert report["head"].rel_error == 0.0
    assert report["head"].cosine == pytest.approx(1.0)
    assert report["a"].kind == "ternary"
    assert report["a"].nnz == comp["a"].nnz
    # overall = the concatenation
    cat_t = np.concatenate([np.asarray(tv[n], np.float64).ravel() for n in tv])
    cat_h = np.concatenate([decoded(comp[n]).ravel() for n in tv])
    rel, cos = dense_figures(cat_t, cat_h)
    assert report.overall.rel_error == pytest.approx(rel, rel=1e-9)
    assert report.overall.cosine == pytest.approx(cos, rel=1e-9)
    assert report.overall.numel == cat_t.size
    assert report.overall.nnz == sum(q.nnz for q in report.tensors)
    assert report.overall.kind == "all"


def test_uses_the_decoded_scale_of_the_dtype():
    # F16 stores the scale 0.1 as float16(0.1) = 0.0999755859375
    t = {"w": np.array([0.1, 0.0], np.float16)}
    comp = {"w": TernaryTensor((2,), [0], [False], 0.1, "F16")}
    q = quality_report(t, comp)["w"]
    assert q.rel_error == 0.0
    assert q.cosine == 1.0


def test_bf16_torch_original():
    g = torch.Generator().manual_seed(0)
    orig = {"w": torch.randn(300, generator=g).bfloat16()}
    comp = compress(orig, density=0.3)
    assert comp["w"].dtype == "BF16"
    report = quality_report(orig, comp)
    rel, cos = dense_figures(orig["w"].double().numpy(), comp["w"].to_torch().double().numpy())
    assert report["w"].rel_error == pytest.approx(rel, rel=1e-9)
    assert report["w"].cosine == pytest.approx(cos, rel=1e-9)


def test_zero_conventions():
    zero = np.zeros(4)
    report = quality_report(
        {"z": zero, "z2": zero, "lost": np.array([1.0, -1.0]), "e": np.empty(0)},
        {
            "z": TernaryTensor.zeros((4,), "F64"),
            "z2": TernaryTensor((4,), [2], [True], 0.5, "F64"),
            "lost": TernaryTensor.zeros((2,), "F64"),
            "e": TernaryTensor.zeros((0,), "F64"),
        },
    )
    assert (report["z"].rel_error, report["z"].cosine) == (0.0, 1.0)
    assert (report["z2"].rel_error, report["z2"].cosine) == (math.inf, 0.0)
    assert (report["lost"].rel_error, report["lost"].cosine) == (1.0, 0.0)
    assert (report["e"].rel_error, report["e"].cosine) == (0.0, 1.0)
    assert report["e"].density == 0.0
    d = report.to_dict()
    json.dumps(d, allow_nan=False)  # JSON-safe: inf became None
    z2 = next(x for x in d["tensors"] if x["name"] == "z2")
    assert z2["rel_error"] is None
    assert d["overall"]["numel"] == 10


def test_opposite_sign_gives_negative_cosine():
    q = quality_report({"w": np.array([1.0, 0.0])}, {"w": np.array([-2.0, 0.0])})["w"]
    assert q.cosine == -1.0
    assert q.rel_error == pytest.approx(3.0)
    assert q.kind == "dense"
    assert q.nnz == 1


def test_large_tensor_is_chunked_and_exact():
    rng = np.random.default_rng(1)
    t = {"w": rng.standard_normal(3 * (1 << 20) + 11).astype(np.float32)}
    comp = compress(t, density=0.05)
    rel, cos = dense_figures(t["w"], comp["w"].to_numpy())
    q = quality_report(t, comp)["w"]
    assert q.rel_error == pytest.approx(rel, rel=1e-9)
    assert q.cosine == pytest.approx(cos, rel=1e-9)


def test_format_table_and_dataclasses():
    tv = TaskVector({"layer.0.w": np.array([3.0, -4.0]), "b": np.array([1.0])})
    report = quality_report(tv, compress(tv, density=0.5, scope="tensor"))
    table = report.format_table()
    lines = table.splitlines()
    assert lines[0].split() == ["tensor", "kind", "numel", "nnz", "density", "rel_error", "cosine"]
    assert lines[1].startswith("layer.0.w")
    assert lines[-1].startswith("(overall)")
    assert len(lines) == 4
    assert isinstance(report, QualityReport)
    assert isinstance(report.overall, TensorQuality)
    with pytest.raises(AttributeError):
        report.overall.cosine = 0.0  # frozen
    with pytest.raises(KeyError):
        report["nope"]


def test_errors_name_the_tensor():
    with pytest.raises(EncodeError, match="names differ") as info:
        quality_report({"a": np.ones(2)}, {"b": np.ones(2)})
    assert info.value.tensor == "b"
    with pytest.raises(EncodeError, match="names differ") as info:
        quality_report({"a": np.ones(2), "x": np.ones(1)}, {"a": np.ones(2)})
    assert info.value.tensor == "x"
    with pytest.raises(EncodeError, match="shape") as info:
        quality_report({"a": np.ones(2)}, {"a": TernaryTensor.zeros((3,))})
    assert info.value.tensor == "a"
    with pytest.raises(EncodeError, match="shape"):
        quality_report({"a": np.ones(2)}, {"a": np.ones((2, 1))})
    with pytest.raises(EncodeError, match="I64") as info:
        quality_report({"a": np.arange(2)}, {"a": np.arange(2)})
    assert info.value.tensor == "a"
