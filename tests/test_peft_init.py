"""compeft_format.peft_init: a LoRA adapter's initial state regenerated from its seed.

A tiny BERT is built from a config written in the test (no download); PEFT makes a LoRA on it
after ``torch.manual_seed(SEED)``, a few optimiser steps train it, and it is saved as PEFT
saves it. The regenerated initial state must be PEFT's, bit for bit; compressing from it
(``base="peft-init"``) must give what compressing from the saved initial adapter gives.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
import transformers
from cli_helpers import one_line_error, run

import compeft_format as cf
from compeft_format import peft_init
from compeft_format.errors import ConvertError
from compeft_format.safetensors_io import open_safetensors

SEED = 3407  # not the first candidate: the search must replay, then regenerate it


def _values(path: Path) -> dict[str, np.ndarray]:
    with open_safetensors(path) as r:
        return {n: np.array(r.values(n)) for n in r}


def _make_adapter(root: Path, seed: int = SEED, **lora: object) -> tuple[Path, Path]:
    """(trained adapter folder, saved initial adapter folder) of a LoRA on a tiny BERT."""
    bdir = root / "base"
    config = transformers.BertConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=512, vocab_size=50,
                                     max_position_embeddings=16)
    config.save_pretrained(bdir)
    torch.manual_seed(123)  # the base's own random weights: not part of the recipe
    model = transformers.BertModel(config)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value", "dense"], **lora))
    pm.save_pretrained(root / "init")
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 50, (4, 8), generator=gen)
    target = torch.randn(4, 8, 256, generator=gen)
    for _ in range(5):  # a few steps of training: A moves away from its start, B from zero
        loss = ((pm(input_ids=ids).last_hidden_state - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.save_pretrained(root / "trained")
    for d in ("init", "trained"):  # built from a config: name its folder as the base
        p = root / d / "adapter_config.json"
        cfg = json.loads(p.read_text())
        cfg["base_model_name_or_path"] = str(bdir)
        p.write_text(json.dumps(cfg))
    return root / "trained", root / "init"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> tuple[Path, Path]:
    return _make_adapter(tmp_path_factory.mktemp("peft_init"))


def test_seed_found_and_init_regenerated_bit_for_bit(adapter) -> None:
    trained, init = adapter
    saved = _values(init / "adapter_model.safetensors")
    before = torch.get_rng_state()
    match = peft_init.find_seed(trained, _values(trained / "adapter_model.safetensors"))
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random state untouched
    assert match.seed == SEED
    # candidates in order, up to the sure match
    assert match.tried == peft_init.DEFAULT_SEEDS.index(SEED) + 1 < len(peft_init.DEFAULT_SEEDS)
    assert match.per_candidate is not None
    assert 0.3 < match.cosine < 1
    assert match.z > peft_init.Z_ALL
    assert sorted(match.init) == sorted(saved)
    for n, a in saved.items():
        assert a.dtype == match.init[n].dtype, n
        assert np.array_equal(a, match.init[n]), n
    again = peft_init.regenerate_init(trained, SEED)
    assert all(np.array_equal(again[n], saved[n]) for n in saved)
    other = peft_init.regenerate_init(trained, SEED + 1)
    a0 = next(n for n in saved if ".lora_A." in n)
    assert not np.array_equal(other[a0], saved[a0])


def test_compress_from_peft_init_equals_compress_from_saved_init(adapter, tmp_path) -> None:
    trained, init = adapter
    s = cf.compress_file(trained, tmp_path / "seed", density=0.2, base="peft-init")
    ref = cf.compress_file(trained, tmp_path / "init", density=0.2, base=init)
    assert s.reference == "checkpoint"
    assert s.base_name == f"peft-init:{SEED}"
    assert f"seed {SEED}" in s.note
    n = peft_init.DEFAULT_SEEDS.index(SEED) + 1
    assert f"found after {n} of {len(peft_init.DEFAULT_SEEDS)} candidates" in s.note
    with cf.open_file(tmp_path / "seed" / "adapter_model.compeft") as a, \
            cf.open_file(tmp_path / "init" / "adapter_model.compeft") as b:
        base = a.metadata()["compeft.base"]
        assert base["peft_init"]["seed"] == SEED
        assert base["peft_init"]["init_lora_weights"]
        assert base["sha256"] == b.metadata()["compeft.base"]["sha256"]
        assert sorted(a) == sorted(b)
        for n in a:  # the same task vector compressed: the same records
            assert a.get(n) == b.get(n), n
    # equal size but for the recipe in the metadata
    assert 0 < s.file_bytes - ref.file_bytes < 200
    # decompressed without a base: the initial state is regenerated and checked
    d = cf.decompress_file(tmp_path / "seed", tmp_path / "seed-r")
    assert d.base is not None
    assert d.base.startswith(f"peft-init:{SEED}")
    cf.decompress_file(tmp_path / "init", tmp_path / "init-r", base=init)
    got = _values(tmp_path / "seed-r" / "adapter_model.safetensors")
    want = _values(tmp_path / "init-r" / "adapter_model.safetensors")
    assert sorted(got) == sorted(want)
    assert all(np.array_equal(got[n], want[n]) for n in want)
    # explicitly naming it is the same; a given seed is checked, not searched
    cf.decompress_file(tmp_path / "seed", tmp_path / "seed-r2", base="peft-init")
    s2 = cf.compress_file(trained, tmp_path / "seed2", density=0.2, base=f"peft-init:{SEED}")
    assert s2.file_bytes == s.file_bytes
    assert "given" in s2.note


def test_wrong_seed_refused(adapter, tmp_path) -> None:
    trained, _ = adapter
    with pytest.raises(ConvertError, match=f"seed {SEED + 1} is not the one"):
        cf.compress_file(trained, tmp_path / "x", base=f"peft-init:{SEED + 1}")
    with pytest.raises(ConvertError, match="no seed found: 3 seeds tried"):
        peft_init.find_seed(trained, _values(trained / "adapter_model.safetensors"),
                            candidates=[0, 1, 2])
    assert not (tmp_path / "x").exists()


def test_a_different_regeneration_is_refused_at_decompress(adapter, tmp_path,
                                                           monkeypatch) -> None:
    """Another torch or PEFT version that draws otherwise: the digests tell, and say which."""
    trained, _ = adapter
    cf.compress_file(trained, tmp_path / "c", density=0.2, base="peft-init")
    real = peft_init._regenerate

    def drifted(*args, **kw):
        state = real(*args, **kw)
        name = next(n for n in state if ".lora_A." in n)
        state[name] = state[name] * (1 + 1e-6)
        return state

    monkeypatch.setattr(peft_init, "_regenerate", drifted)
    with pytest.raises(ConvertError, match="is not the initial adapter the file was compressed "
                       r"from \(peft .*, torch .*\).*lora_A"):
        cf.decompress_file(tmp_path / "c", tmp_path / "r")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(("change", "message"), [
    ({"init_lora_weights": "gaussian"}, "init_lora_weights is 'gaussian'"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights is 'pissa'"),
    ({"use_dora": True}, "use_dora is True"),
    ({"peft_type": "IA3"}, "an adapter of PEFT type IA3"),
])
def test_other_initialisations_refused(adapter, tmp_path, change, message) -> None:
    trained, _ = adapter
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(
        (trained / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((trained / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ConvertError, match=message):
        cf.compress_file(folder, tmp_path / "x", base="peft-init")


def test_no_base_config_offline_is_a_clear_error(adapter, tmp_path) -> None:
    trained, _ = adapter
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(
        (trained / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((trained / "adapter_config.json").read_text())
    base_dir = cfg["base_model_name_or_path"]
    cfg["base_model_name_or_path"] = "compeft-tests/no-such-model"
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match=r"neither a local folder nor in the Hugging Face "
                       r"cache.*--base-model"):
        cf.compress_file(folder, tmp_path / "x", base="peft-init")
    # given the folder, it works
    s = cf.compress_file(folder, tmp_path / "x", base="peft-init", base_model=base_dir)
    assert s.base_name == f"peft-init:{SEED}"
    with pytest.raises(ConvertError, match="neither a local folder"):
        cf.decompress_file(tmp_path / "x", tmp_path / "r")
    cf.decompress_file(tmp_path / "x", tmp_path / "r", base_model=base_dir)


def test_peft_init_on_a_file_without_recipe_refused(tmp_path) -> None:
    cf.compress_file("tests/data/ia3-minilm-vader", tmp_path / "c")
    with pytest.raises(ConvertError, match="not compressed from PEFT's regenerated"):
        cf.decompress_file(tmp_path / "c", tmp_path / "r", base="peft-init")
    with pytest.raises(ConvertError, match="the seed must be an integer"):
        cf.compress_file("tests/data/ia3-minilm-vader", tmp_path / "d", base="peft-init:x")


def test_cli_round_trip(adapter, tmp_path, capsys) -> None:
    trained, init = adapter
    code, out, err = run(capsys, "compress", trained, "-o", tmp_path / "c", "--base",
                         "peft-init", "--density", "0.2")
    assert code == 0, err
    assert f"'peft-init:{SEED}'" in out
    assert f"from seed {SEED}" in out
    code, out, err = run(capsys, "decompress", tmp_path / "c", "-o", tmp_path / "r")
    assert code == 0, err
    assert f"peft-init:{SEED}" in out
    code, _, err = run(capsys, "decompress", tmp_path / "c", "-o", tmp_path / "r2", "--base",
                       init)  # the saved initial adapter is the same base: accepted
    assert code == 0, err
    got, want = (_values(tmp_path / d / "adapter_model.safetensors") for d in ("r", "r2"))
    assert all(np.array_equal(got[n], want[n]) for n in want)
    code, _, err = run(capsys, "compress", trained, "-o", tmp_path / "w", "--base",
                       "peft-init:1")
    assert code == 1
    one_line_error(err, "seed 1 is not the one")


def test_default_for_a_lora_folder_is_the_regenerated_init(adapter, tmp_path) -> None:
    """No base: the seed is searched; where it cannot be, from zero with a note; base="zero"
    asks for from zero."""
    trained, _init = adapter
    s = cf.compress_file(trained, tmp_path / "d", density=0.2)
    ref = cf.compress_file(trained, tmp_path / "s", density=0.2, base="peft-init")
    assert s.base_name == f"peft-init:{SEED}"
    assert s.file_bytes == ref.file_bytes
    z = cf.compress_file(trained, tmp_path / "z", density=0.2, base="zero")
    assert z.reference == "zero"
    assert z.note is None
    # not regenerable here (its base model's config is nowhere local): from zero, said so
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(
        (trained / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((trained / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(
        json.dumps({**cfg, "base_model_name_or_path": "compeft-tests/no-such-model"}))
    f = cf.compress_file(folder, tmp_path / "f", density=0.2)
    assert f.reference == "zero"
    assert f.note.startswith("from zero, the initial adapter not regenerated: the base "
                             "model's config 'compeft-tests/no-such-model'")
    assert "\n" not in f.note
    assert "note          from zero" in f.format()
    with cf.open_file(tmp_path / "f" / "adapter_model.compeft") as a, \
            cf.open_file(tmp_path / "z" / "adapter_model.compeft") as b:
        assert all(a.get(n) == b.get(n) for n in a)


def test_peft_loading_and_merging_regenerate_the_init(adapter, tmp_path) -> None:
    """compeft_format.peft and merge_files take a file compressed from the seed without a base,
    and give what the saved initial adapter given as base gives."""
    from compeft_format import peft as cpeft

    trained, init = adapter
    cf.compress_file(trained, tmp_path / "seed", density=0.2)
    cf.compress_file(trained, tmp_path / "init", density=0.2, base=init)
    config = transformers.BertConfig.from_pretrained(
        json.loads((trained / "adapter_config.json").read_text())["base_model_name_or_path"])
    got, want = (peft.get_peft_model_state_dict(cpeft.from_pretrained(
        transformers.BertModel(config), tmp_path / name, base=b))
        for name, b in (("seed", None), ("init", init)))
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[n], want[n]) for n in want)
    cf.merge_files([tmp_path / "seed", tmp_path / "seed"], tmp_path / "m1")
    cf.merge_files([tmp_path / "init", tmp_path / "init"], tmp_path / "m2", base=init)
    a, b = (_values(tmp_path / m / "adapter_model.safetensors") for m in ("m1", "m2"))
    assert sorted(a) == sorted(b)
    assert all(np.array_equal(a[n], b[n]) for n in b)


def test_doctests() -> None:
    import doctest

    result = doctest.testmod(peft_init, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 6
    assert not result.failed
