"""scale="auto", the default: which rule it resolves to for which task vector and density, that
every path gives exactly the resolved rule's output, and what the file records."""

from __future__ import annotations

import json

import numpy as np
import pytest
from adapter_helpers import two_lora_experts
from cli_helpers import run

import compeft_format as cf
from compeft_format.compress import DEFAULT_SCALE, compress, iter_compress
from compeft_format.container import dumps
from compeft_format.errors import EncodeError
from compeft_format.lora_scale import LORA_SCALES
from compeft_format.safetensors_io import save_safetensors
from compeft_format.scale_plan import PROJ_SCALE_KEY
from compeft_format.scales import (
    AUTO_LORA_DENSITY,
    AUTO_LORA_RULES,
    AUTO_SKETCH_DENSITY,
    resolve_scale,
)

LORA = "tests/data/lora-minilm-vader"
IA3 = "tests/data/ia3-minilm-vader"


def _task_vector(seed: int = 0) -> dict[str, np.ndarray]:
    """Two near-full-rank matrices wider than kron_sketch's rank (so it sketches) and two
    vectors, float32."""
    rng = np.random.default_rng(seed)
    return {
        "l0.weight": (rng.standard_normal((48, 40)) * np.geomspace(1, 0.05, 40)).astype(
            np.float32),
        "l0.bias": (0.1 * rng.standard_normal(48)).astype(np.float32),
        "l1.weight": rng.standard_normal((64, 36)).astype(np.float32),
        "norm.weight": (0.05 * rng.standard_normal(64)).astype(np.float32),
    }


def test_auto_is_the_default():
    assert DEFAULT_SCALE == "auto"
    assert cf.compress.__kwdefaults__["scale"] == "auto"
    assert cf.compress_file.__kwdefaults__["scale"] == "auto"


@pytest.mark.parametrize(("density", "kind", "want"), [
    # dense: kron_sketch up to AUTO_SKETCH_DENSITY, inclusive
    (0.01, {}, "kron_sketch"), (0.02, {}, "kron_sketch"), (0.05, {}, "kron_sketch"),
    (0.0501, {}, "proj_vcap"), (0.1, {}, "proj_vcap"), (0.2, {}, "proj_vcap"),
    (1.0, {}, "proj_vcap"),
    # vectors only ((IA)^3): proj_vcap everywhere
    (0.01, {"matrices": False}, "proj_vcap"), (0.2, {"matrices": False}, "proj_vcap"),
    # LoRA factors from the initial adapter: lora_product_out up to 0.05, then
    # lora_product_delta up to 0.2
    (0.01, {"lora": "checkpoint"}, "lora_product_out"),
    (0.05, {"lora": "checkpoint"}, "lora_product_out"),
    (0.0501, {"lora": "checkpoint"}, "lora_product_delta"),
    (0.1, {"lora": "checkpoint"}, "lora_product_delta"),
    (0.2, {"lora": "checkpoint"}, "lora_product_delta"),
    (0.2001, {"lora": "checkpoint"}, "proj_vcap"),
    # lora_product_delta with one scale for every factor only
    (0.1, {"lora": "checkpoint", "scope": "tensor"}, "proj_vcap"),
    (0.1, {"lora": "checkpoint", "scope": "role"}, "proj_vcap"),
    (0.05, {"lora": "checkpoint", "scope": "tensor"}, "lora_product_out"),
    (0.2, {"lora": "zero", "scope": "role"}, "lora_product_out"),
    # from zero: up to 0.2
    (0.05, {"lora": "zero"}, "lora_product_out"), (0.1, {"lora": "zero"}, "lora_product_out"),
    (0.2, {"lora": "zero"}, "lora_product_out"), (0.2001, {"lora": "zero"}, "proj_vcap"),
])
def test_the_resolution_table(density, kind, want):
    assert resolve_scale("auto", density, **kind) == want


def test_the_thresholds_and_explicit_rules():
    assert AUTO_SKETCH_DENSITY == 0.05
    assert AUTO_LORA_RULES == {
        "checkpoint": ((0.05, "lora_product_out"), (0.2, "lora_product_delta")),
        "zero": ((0.2, "lora_product_out"),)}
    assert AUTO_LORA_DENSITY == {"checkpoint": 0.2, "zero": 0.2}
    for rule in ("proj_vcap", "kron_sketch", "l2", "lora_product_out"):  # never changed
        assert resolve_scale(rule, 0.01, lora="zero") == rule
        assert resolve_scale(rule, 0.5, matrices=False) == rule
    with pytest.raises(EncodeError, match="reference must be one of"):
        resolve_scale("auto", 0.1, lora="one")


@pytest.mark.parametrize("scope", ["global", "tensor", "role"])
@pytest.mark.parametrize("density", [0.02, 0.05, 0.1])
def test_compress_and_iter_compress_give_the_resolved_rules_bytes(scope, density):
    tv = _task_vector()
    rule = resolve_scale("auto", density)
    want = compress(tv, density=density, scope=scope, scale=rule)
    for got in (compress(tv, density=density, scope=scope),
                dict(iter_compress(tv, density=density, scope=scope, scale="auto"))):
        assert dumps(got) == dumps(want)
    if rule == "kron_sketch":  # and it is not proj_vcap's there (the test can fail)
        other = compress(tv, density=density, scope=scope, scale="proj_vcap")
        assert other["l1.weight"].scale != want["l1.weight"].scale


def test_a_task_vector_of_vectors_gets_proj_vcap_bytes():
    rng = np.random.default_rng(3)
    tv = {f"v{i}": rng.standard_normal(50).astype(np.float32) for i in range(4)}
    assert dumps(compress(tv, density=0.01)) == dumps(compress(tv, density=0.01,
                                                               scale="proj_vcap"))


def test_proj_scales_are_the_proj_rules_scope_scales():
    tv = _task_vector(1)
    for scope in ("global", "tensor", "role"):
        got: dict[str, float] = {}
        out = compress(tv, density=0.03, scope=scope, scale="kron_sketch", proj_scales=got)
        proj = compress(tv, density=0.03, scope=scope, scale="proj")
        assert set(got) == set(tv)
        for name in tv:
            assert got[name] == proj[name].scale, (scope, name)
            assert out[name].scale != got[name]  # kron_sketch's own differs
        streamed: dict[str, float] = {}
        list(iter_compress(tv, density=0.03, scope=scope, scale="kron_sketch",
                           proj_scales=streamed))
        assert streamed == got
    untouched: dict[str, float] = {}
    compress(tv, density=0.03, scale="proj_vcap", proj_scales=untouched)
    assert untouched == {}  # proj's own rules: the stored scale is already it


def _compressed_meta(path):
    with cf.open_file(path) as r:
        return r.metadata()["compeft.compression"], {n: r.get_raw(n) for n in r}


@pytest.mark.parametrize(("density", "rule"), [(0.02, "kron_sketch"), (0.2, "proj_vcap")])
def test_compress_file_records_the_resolved_rule_and_matches_it(tmp_path, density, rule):
    tv = _task_vector(2)
    src = tmp_path / "tv.safetensors"
    save_safetensors(tv, src)
    auto = cf.compress_file(src, tmp_path / "auto.compeft", density=density)
    explicit = cf.compress_file(src, tmp_path / "explicit.compeft", density=density,
                                scale=rule)
    assert auto.scale == explicit.scale == rule
    assert auto.scale_auto
    assert not explicit.scale_auto
    assert f"scale         {rule} (--scale auto" in auto.format()
    assert (tmp_path / "auto.compeft").read_bytes() == (tmp_path / "explicit.compeft").read_bytes()
    meta, got = _compressed_meta(tmp_path / "auto.compeft")
    assert meta["scale"] == rule
    want = compress(tv, density=density, scale=rule)
    for name in tv:
        assert got[name] == want[name]
    if rule == "kron_sketch":  # the proj scale merge's expected_ties needs
        assert meta[PROJ_SCALE_KEY] == compress(tv, density=density, scale="proj")[
            "l1.weight"].scale
    else:
        assert PROJ_SCALE_KEY not in meta


def test_compress_file_proj_scale_by_tensor_and_the_streaming_order(tmp_path):
    tv = _task_vector(4)
    src = tmp_path / "tv.safetensors"
    save_safetensors(tv, src)
    for scope in ("tensor", "role"):
        cf.compress_file(src, tmp_path / f"{scope}.compeft", density=0.02, scope=scope)
        meta, got = _compressed_meta(tmp_path / f"{scope}.compeft")
        proj = compress(tv, density=0.02, scope=scope, scale="proj")
        assert meta["scale"] == "kron_sketch"
        each = {n: proj[n].scale for n in sorted(tv)}
        # one number where every tensor shares its scope's (role: no LoRA names, one scope)
        one = len(set(each.values())) == 1
        assert one == (scope == "role")
        assert meta[PROJ_SCALE_KEY] == (next(iter(each.values())) if one else each)
        want = compress(tv, density=0.02, scope=scope, scale="kron_sketch")
        assert all(got[n] == want[n] for n in tv)


@pytest.mark.parametrize(("base", "density", "rule"), [
    (f"{LORA}/init", 0.02, "lora_product_out"), (f"{LORA}/init", 0.1, "lora_product_delta"),
    (f"{LORA}/init", 0.3, "proj_vcap"), ("zero", 0.2, "lora_product_out"),
    ("zero", 0.3, "proj_vcap"),
])
def test_a_lora_adapter_gets_the_lora_rule_at_low_density(tmp_path, base, density, rule):
    _auto_is(rule, tmp_path, density=density, base=base)


def _auto_is(rule, tmp_path, **options):
    """compress_file of the LoRA with ``options`` writes, for scale auto, the bytes of
    ``rule`` and records ``rule`` (and lora_fit for a product rule)."""
    auto = cf.compress_file(LORA, tmp_path / "a", **options)
    explicit = cf.compress_file(LORA, tmp_path / "e", scale=rule, **options)
    assert auto.scale == explicit.scale == rule
    assert auto.scale_auto
    a = (tmp_path / "a" / "adapter_model.compeft").read_bytes()
    assert a == (tmp_path / "e" / "adapter_model.compeft").read_bytes()
    meta, _ = _compressed_meta(tmp_path / "a" / "adapter_model.compeft")
    assert meta["scale"] == rule
    assert ("lora_fit" in meta) == (rule in LORA_SCALES)


@pytest.mark.parametrize(("scope", "rule"), [("tensor", "proj_vcap"), ("role", "proj_vcap"),
                                             ("global", "lora_product_delta")])
def test_lora_product_delta_only_with_one_global_scale(tmp_path, scope, rule):
    _auto_is(rule, tmp_path, density=0.1, base=f"{LORA}/init", scope=scope)


def test_ia3_stays_proj_vcap(tmp_path):
    s = cf.compress_file(IA3, tmp_path / "a", density=0.01)
    assert s.scale == "proj_vcap"
    meta, _ = _compressed_meta(tmp_path / "a" / "adapter_model.compeft")
    assert meta["scale"] == "proj_vcap"


def test_compress_many_resolves_as_compress_file(tmp_path):
    tv = _task_vector(5)
    srcs = []
    for i in range(2):
        srcs.append(tmp_path / f"t{i}.safetensors")
        save_safetensors({k: v * (i + 1) for k, v in tv.items()}, srcs[-1])
    got = cf.compress_many(srcs, tmp_path / "out", density=0.01)
    assert [s.scale for s in got] == ["kron_sketch", "kron_sketch"]
    for i, src in enumerate(srcs):
        cf.compress_file(src, tmp_path / f"one{i}.compeft", density=0.01, scale="kron_sketch")
        assert (tmp_path / "out" / f"t{i}.compeft").read_bytes() == (
            tmp_path / f"one{i}.compeft").read_bytes()


def test_the_command_line(tmp_path, capsys):
    tv = _task_vector(6)
    src = tmp_path / "tv.safetensors"
    save_safetensors(tv, src)
    code, out, err = run(capsys, "compress", src, "-o", tmp_path / "a.compeft",
                         "--density", "0.02", "--scale", "auto")
    assert code == 0, err
    assert "scale         kron_sketch (--scale auto at this density)" in out
    code, out, err = run(capsys, "compress", src, "-o", tmp_path / "b.compeft",
                         "--density", "0.2", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["scale"], doc["scale_auto"]) == ("proj_vcap", True)
    code, out, _ = run(capsys, "compress", "--help")
    assert code == 0
    flat = " ".join(out.split())
    assert "default auto" in flat
    assert "kron_sketch at density <= 0.05" in flat
    assert "lora_product_out at density <= 0.05" in flat


def test_merging_auto_files(tmp_path):
    """A merge of files compressed with the default: the output records a resolved rule, and
    each input's recorded proj_scale turns its tensors into proj's (what expected_ties reads)."""
    rng = np.random.default_rng(7)
    paths = []
    for i in range(2):
        tv = {"w": rng.standard_normal((40, 30)).astype(np.float32)}
        paths.append(tmp_path / f"e{i}.safetensors")
        save_safetensors(tv, paths[-1])
        cf.compress_file(paths[-1], tmp_path / f"e{i}.compeft", density=0.02)
        meta, got = _compressed_meta(tmp_path / f"e{i}.compeft")
        proj = compress(tv, density=0.02, scale="proj_vcap")["w"]
        as_proj = cf.TernaryTensor(got["w"].shape, got["w"].indices, got["w"].signs,
                                   meta[PROJ_SCALE_KEY], got["w"].dtype)
        assert as_proj == proj
    s = cf.merge_files([tmp_path / "e0.compeft", tmp_path / "e1.compeft"],
                       tmp_path / "m.compeft", density=0.02)
    assert s.form == "compeft"
    meta, _ = _compressed_meta(tmp_path / "m.compeft")
    assert meta["scale"] == "kron_sketch"
    again = cf.merge_files([tmp_path / "e0.compeft", tmp_path / "e1.compeft"],
                           tmp_path / "m2.compeft", density=0.2, scale="auto")
    assert again.form == "compeft"
    assert _compressed_meta(tmp_path / "m2.compeft")[0]["scale"] == "proj_vcap"


@pytest.mark.parametrize("rule", ["lora_product_kron", "lora_product_delta"])
def test_merging_lora_product_fit_files(tmp_path, rule):
    """lora_product_kron and lora_product_delta files record the proj scale they replaced
    (lora_fit), so expected_ties merges them as it merges the same adapters compressed with
    proj_vcap."""
    from safetensors.numpy import load_file

    dirs = two_lora_experts(tmp_path, LORA)
    merged, mags = {}, {}
    for scale in ("proj_vcap", rule):
        comp = [tmp_path / f"c-{scale}-{i}" for i in range(2)]
        for d, out in zip(dirs, comp, strict=True):
            s = cf.compress_file(d, out, density=0.05, scale=scale, base=f"{LORA}/init")
        assert s.scale == scale
        meta, got = _compressed_meta(comp[-1] / "adapter_model.compeft")
        mags[scale] = {n: t.scale for n, t in got.items() if hasattr(t, "scale")}
        if scale != "proj_vcap":
            assert meta["scale"] == rule
            factor = next(n for n in got if ".lora_A." in n)
            assert meta["lora_fit"]["proj_scale"] == mags["proj_vcap"][factor]
        out = tmp_path / f"m-{scale}"
        cf.merge_files(comp, out, rescale="expected_ties", base=f"{LORA}/init")
        merged[scale] = load_file(str(out / "adapter_model.safetensors"))
    assert mags[rule] != mags["proj_vcap"]  # the fit changed the factors' scales
    for n, v in merged["proj_vcap"].items():
        np.testing.assert_allclose(merged[rule][n], v, rtol=1e-5, atol=1e-7, err_msg=n)
