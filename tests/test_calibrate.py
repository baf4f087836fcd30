"""compeft_format.calibrate: a LoRA adapter's factor scales calibrated on its base model.

A tiny BERT (weights and a word-piece tokenizer written in the test, no download) gets a LoRA
from PEFT, a few optimiser steps train it, and it is saved as PEFT saves it. Calibration must
keep compress's selection and signs, multiply every factor's scale by one factor that does
not lower the embedding score, record what it did, and refuse what it cannot do with one
clear error.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
import transformers
from cli_helpers import one_line_error, run

import compeft_format as cf
from compeft_format import calibrate
from compeft_format.errors import ConvertError, EncodeError
from compeft_format.merge_io import merge_files

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "big", "small", "red", "house",
         "tree", "under", "over", "and", "."]
SENTENCES = ["the cat sat on the mat .", "a big dog ran under the tree .",
             "the small red house .", "a dog and a cat sat over the mat ."]


def _make_adapter(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """(adapter folder, base model folder): a LoRA on q and v of a tiny BERT, trained a bit."""
    base = root / "base"
    vocab = base / "vocab.txt"
    base.mkdir(parents=True)
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]))
    tok = transformers.BertTokenizer(str(vocab))
    tok.save_pretrained(base)
    torch.manual_seed(123)
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32))
    model.save_pretrained(base)
    model = transformers.BertModel.from_pretrained(base)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8,
                                                    target_modules=["query", "value"]))
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=3e-2)
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    target = torch.randn(*enc["input_ids"].shape, 32, generator=torch.Generator().manual_seed(7))
    for _ in range(20):
        loss = ((pm(**enc).last_hidden_state - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.save_pretrained(root / "adapter")
    cfg_path = root / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["base_model_name_or_path"] == str(base)
    return root / "adapter", base


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> tuple[Path, Path]:
    return _make_adapter(tmp_path_factory.mktemp("calibrate"))


def _compress(adapter: Path, out: Path, **kw) -> cf.CompressSummary:
    return cf.compress_file(adapter, out, density=0.1, base="zero", **kw)


def _factors(path: str) -> dict[str, cf.TernaryTensor]:
    with cf.open_file(path) as f:
        return {n: f.get_raw(n) for n in f}


@pytest.mark.parametrize("scale", ["proj_vcap", "lora_product_out"])
def test_calibration_multiplies_every_factor_scale_by_one_factor(adapter, tmp_path,
                                                                 scale) -> None:
    folder, _ = adapter
    plain = _compress(folder, tmp_path / "plain", scale=scale)
    cal = _compress(folder, tmp_path / "cal", scale=scale, calibrate=True)
    a, b = _factors(plain.file), _factors(cal.file)
    with cf.open_file(plain.file) as f:
        before = f.metadata()["compeft.compression"]
    with cf.open_file(cal.file) as f:
        record = f.metadata()["compeft.compression"]
    c = record["calibration"]["multiplier"]
    assert 0.25 <= c <= 4
    assert c != 1.0
    assert a.keys() == b.keys()
    assert len(a) == 8
    for n in a:  # the selection and the signs are compress's; only the scale moves
        np.testing.assert_array_equal(a[n].indices, b[n].indices)
        np.testing.assert_array_equal(a[n].signs, b[n].signs)
        assert b[n].scale == np.float32(c * a[n].scale)
    rec = record["calibration"]
    assert rec["text"] == calibrate.CALIBRATION_TEXT_NAME == "builtin-2"
    assert rec["sentences"] == len(calibrate.CALIBRATION_TEXT)
    assert rec["score"] >= rec["score_before"]
    # merging reads the proj scale, as without calibration (spec 5.2.1: lora_fit.proj_scale)
    assert record["scale"] == scale
    if scale == "proj_vcap":
        assert record["lora_fit"] == {"selection": "proj_vcap",
                                      "proj_scale": next(iter(a.values())).scale}
    else:
        assert record["lora_fit"] == before["lora_fit"]
    assert "calibrated: factor scales x" in cal.note


def test_calibration_is_the_best_multiplier_the_search_finds(adapter, tmp_path) -> None:
    folder, _base = adapter
    from safetensors.numpy import load_file

    w = load_file(str(folder / "adapter_model.safetensors"))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    comp = cf.compress(w, density=0.05)
    got = calibrate.calibrate_lora(comp, w, None, cfg, text=SENTENCES, text_name="words")
    assert got.sentences == len(SENTENCES)
    assert got.text == "words"
    assert got.score >= got.score_before
    # the search's points (1 among them, scored once) and the adapter's own embeddings
    assert got.evaluations == calibrate.GRID + calibrate.REFINE + 2 + 1

    # its score is the search's best: no multiplier on a finer grid does better by more than
    # the golden-section's last step can miss
    def score(c: float) -> float:
        scaled = {n: cf.TernaryTensor(t.shape, t.indices, t.signs, np.float32(c * t.scale))
                  for n, t in comp.items()}
        return calibrate.calibrate_lora(scaled, w, None, cfg, text=SENTENCES).score_before

    assert score(got.multiplier) == pytest.approx(got.score, abs=1e-6)
    finer = max(score(float(c)) for c in np.geomspace(0.25, 4, 25))
    assert got.score >= finer - 2e-3


def test_search_finds_a_known_optimum() -> None:
    for peak in (0.3, 1.0, 2.5):
        x, _fx, n = calibrate.search(lambda c, p=peak: -(np.log(c) - np.log(p)) ** 2)
        assert x == pytest.approx(peak, rel=0.02)
        assert n == calibrate.GRID + calibrate.REFINE + 2
    # at an end of the grid it stays inside [1/4, 4]
    x, _, _ = calibrate.search(lambda c: -c)
    assert x == pytest.approx(0.25, rel=0.05)


def test_calibration_text_file(adapter, tmp_path) -> None:
    folder, _ = adapter
    text = tmp_path / "mine.txt"
    text.write_text("\n".join(SENTENCES) + "\n\n")
    s = _compress(folder, tmp_path / "out", calibrate=text)
    with cf.open_file(s.file) as f:
        rec = f.metadata()["compeft.compression"]["calibration"]
    assert rec["text"] == "mine.txt"
    assert rec["sentences"] == len(SENTENCES)


def test_calibrated_files_merge_at_their_recorded_proj_scale(adapter, tmp_path) -> None:
    # expected_ties and dense_divisor merge an input at the proj scale its file records
    # (spec 5.2.1 lora_fit.proj_scale): calibrated or not, the same merge; PEFT's TIES reads
    # the stored magnitudes, so it sees the calibration
    from safetensors.numpy import load_file

    folder, _ = adapter
    files = {}
    for kind, cal in (("plain", False), ("cal", True)):
        files[kind] = [_compress(folder, tmp_path / f"{kind}{i}", calibrate=cal, alpha=a).file
                       for i, a in enumerate((1.0, 0.8))]
    merged = {}
    for kind in files:
        for rule in ("expected_ties", "dense_divisor", None):
            out = tmp_path / f"m-{kind}-{rule}.safetensors"
            merge_files(files[kind], out, rescale=rule)
            merged[kind, rule] = load_file(str(out))
    for rule in ("expected_ties", "dense_divisor"):
        for n, v in merged["plain", rule].items():
            np.testing.assert_allclose(merged["cal", rule][n], v, rtol=1e-5, atol=1e-7,
                                       err_msg=f"{rule} {n}")
    assert any(not np.allclose(merged["cal", None][n], v)
               for n, v in merged["plain", None].items())


@pytest.mark.parametrize(("kw", "error", "words"), [
    ({"hifi": 0.01}, EncodeError, "hi-fi"),
    ({"calibrate": 3}, EncodeError, "calibrate must be"),
])
def test_bad_options(adapter, tmp_path, kw, error, words) -> None:
    folder, _ = adapter
    with pytest.raises(error, match=words):
        cf.compress_file(folder, tmp_path / "x", base="zero",
                         **({"calibrate": True} | kw))
    assert not (tmp_path / "x").exists()


def test_refusals_name_the_problem(adapter, tmp_path) -> None:
    folder, _ = adapter
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ConvertError, match="no sentence"):
        _compress(folder, tmp_path / "a", calibrate=empty)
    (tmp_path / "bin.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ConvertError, match="not UTF-8"):
        _compress(folder, tmp_path / "b", calibrate=tmp_path / "bin.txt")
    with pytest.raises(ConvertError, match="nothing is downloaded"):
        _compress(folder, tmp_path / "c", calibrate=True, base_model=tmp_path / "nowhere")
    ia3 = Path(__file__).parent / "data" / "ia3-minilm-vader"
    with pytest.raises(ConvertError, match="this is an adapter of PEFT type IA3"):
        cf.compress_file(ia3, tmp_path / "d", calibrate=True)
    plain = tmp_path / "w.safetensors"
    from safetensors.numpy import save_file

    save_file({"w": np.ones((4, 4), np.float32)}, str(plain))
    with pytest.raises(ConvertError, match="this is not a PEFT adapter"):
        cf.compress_file(plain, tmp_path / "e.compeft", calibrate=True)
    assert not any((tmp_path / n).exists() for n in ("a", "b", "c", "d", "e.compeft"))


def test_command_line(adapter, tmp_path, capsys) -> None:
    folder, _ = adapter
    code, out, err = run(capsys, "compress", folder, "-o", tmp_path / "out", "--base", "zero",
                         "--density", "0.1", "--calibrate")
    assert code == 0, err
    assert "calibrated: factor scales x" in out
    text = tmp_path / "t.txt"
    text.write_text("\n".join(SENTENCES))
    code, out, err = run(capsys, "compress", folder, "-o", tmp_path / "out2", "--base", "zero",
                         "--calibration-text", text, "--json")
    assert code == 0, err
    assert "calibrated" in json.loads(out)["note"]
    code, out, err = run(capsys, "info", tmp_path / "out")
    assert code == 0, err
    assert re.search(r"^compression: .*, calibrated x \d\.\d{3} on 40 sentences \(builtin-2\)$",
                     out, re.M), out
    code, out, err = run(capsys, "compress", folder, "-o", tmp_path / "out3", "--base", "zero",
                         "--calibrate", "--base-model", tmp_path / "nowhere")
    assert code == 1
    one_line_error(err, "calibration needs the base model")


@pytest.mark.parametrize(("a_name", "a_shape", "b_shape"), [
    ("base_model.model.emb.lora_embedding_A", (4, 30), (16, 4)),
    ("base_model.model.conv.lora_A.weight", (4, 3, 3, 3), (8, 4, 1, 1)),
])
def test_embedding_and_conv_factors_are_refused(a_name, a_shape, b_shape) -> None:
    rng = np.random.default_rng(0)
    b_name = a_name.replace("_A", "_B")
    w = {a_name: rng.normal(size=a_shape).astype(np.float32),
         b_name: rng.normal(size=b_shape).astype(np.float32)}
    with pytest.raises(ConvertError, match="linear layers only"):
        calibrate.calibrate_lora(cf.compress(w, density=0.2), w, None,
                                 {"base_model_name_or_path": "unused"})


def test_a_model_that_needs_more_than_input_ids_is_refused(adapter, tmp_path) -> None:
    _, bert = adapter
    t5 = tmp_path / "t5"
    transformers.T5Model(transformers.T5Config(
        vocab_size=len(WORDS) + 5, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        decoder_start_token_id=0)).save_pretrained(t5)
    for f in ("vocab.txt", "tokenizer_config.json"):  # any word-piece tokenizer will do
        (t5 / f).write_bytes((bert / f).read_bytes())
    m = "base_model.model.encoder.block.0.layer.0.SelfAttention.q"
    rng = np.random.default_rng(0)
    w = {f"{m}.lora_A.weight": rng.normal(size=(2, 16)).astype(np.float32),
         f"{m}.lora_B.weight": rng.normal(size=(16, 2)).astype(np.float32)}
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "base_model_name_or_path": str(t5)}
    with pytest.raises(ConvertError, match="input_ids and attention_mask alone; T5Model"):
        calibrate.calibrate_lora(cf.compress(w, density=0.2), w, None, cfg, text=SENTENCES)

