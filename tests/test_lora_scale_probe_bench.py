"""The pure parts of bench/lora_scale_probe.py (its probes need the base model and experts)."""

from __future__ import annotations

from pathlib import Path

import pytest

P = pytest.importorskip("bench.lora_scale_probe", reason="the bench needs torch")

ROWS = [
    {"ref": "zero", "density": 0.2, "tuned": 0.90, "a": 0.899, "b": 0.88,
     "window": [0.8, 1.1], "ra": 0.9, "rb": 1.2},
    {"ref": "zero", "density": 0.2, "tuned": 0.95, "a": 0.94, "b": 0.949,
     "window": [0.5, 0.7], "ra": 0.6, "rb": None},
    {"ref": "init", "density": 0.01, "tuned": 0.70, "a": 0.70, "b": 0.60,
     "window": [0.2, 0.3], "ra": 0.31, "rb": 0.25},
]


def test_summarize_scores() -> None:
    s = P.summarize(ROWS, ["a", "b"])
    assert (s["a"]["within"], s["a"]["rows"]) == (2, 3)
    assert s["a"]["cells"] == {"zero 0.2": 1, "init 0.01": 1}
    assert s["a"]["worst"] == pytest.approx(0.01)
    assert s["a"]["mean"] == pytest.approx((0.001 + 0.01 + 0.0) / 3)
    assert (s["b"]["within"], s["b"]["worst"]) == (1, pytest.approx(0.10))


def test_summarize_windows() -> None:
    s = P.summarize(ROWS, ["ra", "rb"], hit=lambda r, k: P.in_window(r[k], r["window"]))
    assert s["ra"]["within"] == 2  # 0.31 is outside [0.2, 0.3]
    assert s["rb"]["cells"] == {"zero 0.2": 0, "init 0.01": 1}  # None never hits
    assert s["ra"]["worst"] is None
    assert s["ra"]["mean"] is None
    text = P.text_report(s)
    assert text.splitlines()[0].startswith("ra: 2 of 3 within 0.005  [")
    assert "worst" not in text


def test_folders() -> None:
    root = Path("/x")
    assert P.folders(root, "seed0", "sentiment") == (root / "experts" / "sentiment",
                                                      root / "experts" / "init")
    assert P.folders(root, "seed7", "syllables")[1] == root / "experts-seed7" / "init"
    assert P.folders(root, "seed3", "tests-data") == (P.TESTS_LORA, P.TESTS_LORA / "init")
