"""bench/lora_calibrate.py's own arithmetic: the halves, the token strings, the summary, the
report (the model runs are the benchmark's; these parts decide what its tables say)."""

from __future__ import annotations

from pathlib import Path

import pytest

lc = pytest.importorskip("bench.lora_calibrate", reason="the bench needs torch")


def _row(adapter: str, ref: str, density: float, tuned: float, auto: float, cal: float) -> dict:
    return {"adapter": adapter, "ref": ref, "density": density, "rule": "lora_product_out",
            "tuned": tuned, "tuned_ratio": 0.5, "auto": auto, "calibrated": cal, "ratio": 0.45,
            "multiplier": 0.9, "window": [0.4, 0.6], "seconds": 1.0}


def test_halves_split_the_sentences_in_two() -> None:
    a, b = lc.halves()
    assert len(a) == len(b) == len(lc.EVAL_SENTENCES) // 2
    assert sorted(a + b) == list(range(len(lc.EVAL_SENTENCES)))
    assert lc.halves() == (a, b)  # fixed: the runs are comparable


def test_token_text_draws_word_pieces() -> None:
    class Tok:
        vocab_size = 30522

        def decode(self, ids: list[int]) -> str:
            return " ".join(map(str, ids))

    uniform = lc.token_text(Tok(), "random", count=3, length=5)
    zipf = lc.token_text(Tok(), "zipf", count=3, length=5)
    assert len(uniform) == len(zipf) == 3
    for text, lo in ((uniform, 1000), (zipf, 1996)):
        ids = [int(t) for s in text for t in s.split()]
        assert len(ids) == 15
        assert all(lo <= i < Tok.vocab_size for i in ids)
    assert lc.token_text(Tok(), "zipf", count=3, length=5) == zipf  # seeded


def test_summary_and_report(tmp_path: Path) -> None:
    rows = [_row("a", "init", 0.01, 0.90, 0.88, 0.899), _row("a", "zero", 0.05, 0.90, 0.90, 0.89),
            _row("b", "init", 0.01, 0.80, 0.79, 0.7951)]
    s = lc.summary(rows)
    assert s["auto"]["within"] == 1  # gaps 0.02, 0.0, 0.01
    assert s["auto"]["worst"] == pytest.approx(0.02)
    assert s["calibrated"]["within"] == 2  # gaps 0.001, 0.01, 0.0049
    assert s["calibrated"]["worst"] == pytest.approx(0.01)
    result = {"inputs": "builtin", "python": "3", "torch": "2", "seconds": 1.0, "load_end": 1.0,
              "summary": {"x.json": s, "all": s}, "rows": {"x.json": rows}}
    out = tmp_path / "r.md"
    lc.report(result, out, "python bench/lora_calibrate.py --rows x.json=dir")
    text = out.read_text()
    assert "| `x.json` | 3 | 1 | 0.0200 |" in text
    assert "| **all** | 3 | 1 |" in text
    assert "| init | 0.0200 / 0.0049 |" in text  # worst at 0.01 from init: auto / calibrated
    assert "Rows calibrated above the target: 1" in text
    assert "| `x.json` | a | zero | 0.05 | 0.0000 | 0.0100 |" in text
