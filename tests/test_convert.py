"""compress_file / decompress_file: round trips, bases, adapters, bad inputs, atomic outputs."""

from __future__ import annotations

import base64
import doctest
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

import compeft_format.convert as conv
from compeft_format import (
    BadMagicError,
    ConvertError,
    EncodeError,
    FormatError,
    SafetensorsError,
    TernaryTensor,
    compress_file,
    decompress_file,
    inspect,
    load_file,
    open_file,
)
from compeft_format.compress import compress
from compeft_format.plan import FileTaskVector, base_binding, tensor_sha256
from compeft_format.safetensors_io import SafetensorsReader, open_safetensors, save_safetensors
from compeft_format.taskvec import apply_task_vector, peft_task_vector

DATA = Path(__file__).parent / "data"
LORA = DATA / "lora-minilm-vader"
IA3 = DATA / "ia3-minilm-vader"


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.0.w": torch.randn(48, 32, generator=g),
        "layer.0.b16": (torch.randn(40, 24, generator=g) * 0.1).to(torch.bfloat16),
        "layer.1.h16": (torch.randn(64, generator=g) * 0.1).to(torch.float16),
        "layer.1.d64": torch.randn(8, 8, generator=g, dtype=torch.float64),
        "position_ids": torch.arange(16).reshape(1, 16),
        "mask": torch.rand(5, generator=g) > 0.5,
        "scalar": torch.tensor(0.75),
        "empty": torch.zeros(0, 3),
    }


FLOAT = ("layer.0.w", "layer.0.b16", "layer.1.h16", "layer.1.d64", "scalar", "empty")


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata=None) -> Path:
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    return path


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


@pytest.fixture
def model(tmp_path) -> Path:
    return _save(_tensors(), tmp_path / "model.safetensors", {"format": "pt"})


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_round_trip_equals_in_memory_compress(tmp_path, model, scope):
    tensors = _tensors()
    s = compress_file(model, tmp_path / "m.compeft", density=0.2, scope=scope)
    d = decompress_file(tmp_path / "m.compeft", tmp_path / "back.safetensors")
    # compress accepts torch tensors (BF16 native): the in-memory reference
    ref = compress({n: tensors[n] for n in FLOAT}, density=0.2, scope=scope)
    back = safetensors.torch.load_file(tmp_path / "back.safetensors")
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype, name
        assert back[name].shape == t.shape, name
        want = ref[name].to_torch() if name in ref else t
        assert torch.equal(back[name], want), name
    assert (s.tensors, s.ternary, s.dense) == (8, 6, 2)
    assert s.nnz == sum(t.nnz for t in ref.values())
    assert s.reference == "zero"
    assert d.reference == "zero"
    with safetensors.safe_open(tmp_path / "back.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}  # the source's metadata comes back


def test_summary_matches_the_file(tmp_path, model):
    s = compress_file(model, tmp_path / "m.compeft", density=0.1)
    info = inspect(tmp_path / "m.compeft")
    assert s.file_bytes == info.file_size == os.path.getsize(tmp_path / "m.compeft")
    assert s.dense_bytes == info.dense_size
    assert s.numel == info.numel
    assert s.ratio == pytest.approx(info.dense_size / info.file_size)
    assert s.bits_per_param == pytest.approx(8 * info.file_size / info.numel)
    meta = info.metadata
    assert meta["compeft.compression"]["density"] == 0.1
    assert meta["task_vector"] == {"reference": "zero", "exclude": []}
    assert "compeft.base" not in meta  # no base: nothing to name
    assert meta["compeft.producer"].startswith("compeft_format ")
    text = s.format(verbose=True)
    for word in ("tensors", "density", "dense size", "compressed", "ratio", "bits/param",
                 "cosine", "(overall)"):
        assert word in text
    json.dumps(s.to_dict())


def test_exclude_keeps_tensors_lossless(tmp_path, model):
    tensors = _tensors()
    s = compress_file(model, tmp_path / "m.compeft", density=0.1, exclude=["layer.0.*"])
    assert s.ternary == 4
    assert s.dense == 4
    raw = load_file(tmp_path / "m.compeft", framework="torch")
    assert torch.equal(raw["layer.0.b16"], tensors["layer.0.b16"])  # BF16 dense record
    decompress_file(tmp_path / "m.compeft", tmp_path / "b.safetensors")
    back = safetensors.torch.load_file(tmp_path / "b.safetensors")
    for name in ("layer.0.w", "layer.0.b16", "position_ids", "mask"):
        assert torch.equal(back[name], tensors[name]), name


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_decompress_dtype(tmp_path, model, dtype):
    tdt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    compress_file(model, tmp_path / "m.compeft", density=0.3, exclude=["layer.1.h16"])
    d = decompress_file(tmp_path / "m.compeft", tmp_path / "b.safetensors", dtype=dtype)
    assert d.dtype == dtype.upper()
    plain = decompress_file(tmp_path / "m.compeft", tmp_path / "p.safetensors")
    assert plain.dtype is None
    back = safetensors.torch.load_file(tmp_path / "b.safetensors")
    orig = safetensors.torch.load_file(tmp_path / "p.safetensors")
    for name, t in orig.items():
        if t.is_floating_point():
            assert back[name].dtype == tdt, name
            # one rounding from the decoded value in its own dtype (torch rounds to nearest)
            assert torch.equal(back[name], t.to(tdt)), name
        else:
            assert torch.equal(back[name], t), name


@pytest.mark.parametrize("positions", ["auto", "bitmask", "golomb", "rice"])
@pytest.mark.parametrize("zstd", [None, 3])
def test_positions_and_zstd_options(tmp_path, model, positions, zstd):
    compress_file(model, tmp_path / "m.compeft", density=0.2, positions=positions,
                  zstd_level=zstd)
    info = inspect(tmp_path / "m.compeft")
    codecs = {t.codecs.split(",")[0] for t in info.tensors if t.kind == "ternary" and t.nnz}
    if positions in ("golomb", "rice"):
        assert codecs <= {"golomb", "golomb+zstd"}
    elif positions == "bitmask":
        assert codecs <= {"bitmask", "bitmask+zstd"}
    if zstd is None:
        assert not any("zstd" in t.codecs for t in info.tensors)


def test_lazy_task_vector_hands_out_views_without_copies(tmp_path, model):
    with open_safetensors(model) as r:
        tv = FileTaskVector(["layer.0.w", "layer.0.b16"], r, None, None)
        w = tv["layer.0.w"]
        assert not w.flags.owndata
        assert not w.flags.writeable
        assert tv.dtypes == {"layer.0.w": "F32", "layer.0.b16": "BF16"}
        assert tv["layer.0.b16"].dtype == np.float32  # BF16 widened (exactly) for compress


# ---------------------------------------------------------------------------------------------
# a full checkpoint measured from a base
# ---------------------------------------------------------------------------------------------
def _finetune(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ft = {}
    for name, t in base.items():
        if t.is_floating_point() and t.numel():
            noise = torch.randn(t.shape, generator=g, dtype=torch.float64) * 0.01
            ft[name] = (t.double() + noise).to(t.dtype)
        else:
            ft[name] = t.clone()
    ft["head.w"] = torch.randn(3, 4, generator=g)  # a new head: not in the base
    return ft


@pytest.fixture
def checkpoint(tmp_path):
    base = _tensors(1)
    base["only.in.base"] = torch.ones(2)
    ft = _finetune({k: v for k, v in base.items() if k != "only.in.base"})
    return (_save(base, tmp_path / "base.safetensors"), _save(ft, tmp_path / "ft.safetensors"),
            base, ft)


def test_base_reconstructs_the_full_checkpoint(tmp_path, checkpoint):
    base_path, ft_path, base, ft = checkpoint
    s = compress_file(ft_path, tmp_path / "ft.compeft", base=base_path, density=0.5,
                      exclude=["layer.1.h16"])
    assert s.reference == "checkpoint"
    assert s.base_name == "base.safetensors"
    metadata = open_file(tmp_path / "ft.compeft").metadata()
    base_meta, meta = metadata["compeft.base"], metadata["task_vector"]
    # the compact base binding (spec 5.2.1, 1.1): one digest, 2 bytes a tensor
    assert set(base_meta) == {"name", "sha256", "digests"}
    assert base_meta["name"] == "base.safetensors"
    names = set(open_file(tmp_path / "ft.compeft").keys())
    delta = names - set(meta["delta_all_but"])  # shorter than listing the delta
    assert sorted(delta) == sorted(["layer.0.w", "layer.0.b16", "layer.1.d64", "scalar",
                                    "empty"])
    # the base binding: the tensors the task vector is measured from, and only those
    hashes = {n: tensor_sha256(SafetensorsReader(base_path), n) for n in delta}
    assert base_meta == {"name": "base.safetensors", **base_binding(hashes)}
    assert len(base64.b64decode(base_meta["digests"])) == 2 * len(delta)
    assert meta["reference"] == "checkpoint"
    assert meta["exclude"] == ["layer.1.h16"]

    # the task vector alone is not the model: --base is required, and named
    with pytest.raises(ConvertError, match=r"measured from the base 'base.safetensors'.*--base"):
        decompress_file(tmp_path / "ft.compeft", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()

    d = decompress_file(tmp_path / "ft.compeft", tmp_path / "out.safetensors", base=base_path)
    assert d.base == str(base_path)
    out = safetensors.torch.load_file(tmp_path / "out.safetensors")
    assert set(out) == set(ft)  # the fine-tuned file's tensors, not the base's extras
    delta = {n: t for n, t in load_file(tmp_path / "ft.compeft").items() if n in delta}
    want = apply_task_vector({n: base[n] for n in delta}, delta)  # torch in, torch out
    for name, t in ft.items():
        assert out[name].dtype == t.dtype, name
        assert out[name].shape == t.shape, name
        if name in delta:
            assert torch.equal(out[name], want[name]), name
        else:  # excluded, non-float, new head: stored as they are, lossless
            assert torch.equal(out[name], t), name


def test_exact_task_vector_with_base_at_density_one(tmp_path):
    """Every delta +-1/8 and density 1: the compression is exact, so base + tv == ft."""
    g = torch.Generator().manual_seed(3)
    base = {"w": (torch.randint(-32, 32, (6, 5), generator=g) / 8).to(torch.bfloat16),
            "h": (torch.randint(-32, 32, (7,), generator=g) / 8).half()}
    ft = {n: (t.float() + (torch.randint(0, 2, t.shape, generator=g) * 0.25 - 0.125)).to(t.dtype)
          for n, t in base.items()}
    bp, fp = _save(base, tmp_path / "b.safetensors"), _save(ft, tmp_path / "f.safetensors")
    s = compress_file(fp, tmp_path / "f.compeft", base=bp, density=1.0, scale="l2")
    assert s.nnz == 37
    assert s.quality.overall.rel_error == 0.0
    decompress_file(tmp_path / "f.compeft", tmp_path / "o.safetensors", base=bp)
    out = safetensors.torch.load_file(tmp_path / "o.safetensors")
    for n in ft:
        assert torch.equal(out[n], ft[n]), n


@pytest.mark.parametrize("change", ["missing", "shape", "dtype", "data"])
def test_base_that_does_not_match_is_refused(tmp_path, checkpoint, change):
    base_path, ft_path, base, _ = checkpoint
    compress_file(ft_path, tmp_path / "ft.compeft", base=base_path, density=0.2)
    other = dict(base)
    if change == "missing":  # a tensor the task vector was measured from
        del other["layer.1.d64"]
    elif change == "shape":
        other["layer.0.w"] = base["layer.0.w"].reshape(32, 48)
    elif change == "dtype":
        other["layer.0.w"] = base["layer.0.w"].double()
    else:
        other["layer.1.d64"] = base["layer.1.d64"].clone()
        other["layer.1.d64"][0, 0] += 1
    bad = _save(other, tmp_path / "other.safetensors")
    match = {"missing": r"not the base 'base.safetensors'.*: 1 of the 6 tensors it was "
                        r"measured from missing \['layer.1.d64'\]",
             "shape": r"tensor 'layer.0.w'.*F32\[32, 48\] in the base, F32\[48, 32\]",
             "dtype": r"tensor 'layer.0.w'.*F64\[48, 32\] in the base",
             "data": r"tensor 'layer.1.d64'.*data differs from the base"}[change]
    before = _listing(tmp_path)
    with pytest.raises(ConvertError, match=match) as info:
        decompress_file(tmp_path / "ft.compeft", tmp_path / "out.safetensors", base=bad)
    assert str(bad) in str(info.value)
    assert _listing(tmp_path) == before  # nothing written, no temporary left


def test_names_on_one_side(tmp_path, checkpoint):
    """The names only the base or only the fine-tune has are in the summary; decompress needs
    exactly the base tensors the task vector was measured from, not the base's others."""
    base_path, ft_path, base, _ = checkpoint
    s = compress_file(ft_path, tmp_path / "ft.compeft", base=base_path, density=0.2)
    assert s.only_in_base == ("only.in.base",)
    assert s.only_in_source == ("head.w",)
    text = s.format()
    assert "only in base  1 tensor ['only.in.base']: not needed to restore" in text
    assert "not in base   1 tensor ['head.w']: stored as they are" in text
    assert s.to_dict()["only_in_base"] == ["only.in.base"]
    want = decompress_file(tmp_path / "ft.compeft", tmp_path / "want.safetensors",
                           base=base_path)
    # a base without the tensor the fine-tune lacks, and with one of its own: the same output
    other = {n: t for n, t in base.items() if n != "only.in.base"}
    other["stranger"] = torch.zeros(1)
    bp = _save(other, tmp_path / "other.safetensors")
    got = decompress_file(tmp_path / "ft.compeft", tmp_path / "got.safetensors", base=bp)
    assert Path(got.file).read_bytes() == Path(want.file).read_bytes()


def test_compress_refuses_a_base_with_other_shapes(tmp_path, checkpoint):
    base_path, _, _base, ft = checkpoint
    ft = dict(ft)
    ft["layer.0.w"] = torch.zeros(2, 2)
    fp = _save(ft, tmp_path / "ft2.safetensors")
    with pytest.raises(ConvertError, match=r"tensor 'layer.0.w'.*F32\[48, 32\] in the base"):
        compress_file(fp, tmp_path / "x.compeft", base=base_path)
    assert not (tmp_path / "x.compeft").exists()


def test_plain_task_vector_added_to_a_base(tmp_path):
    """A task vector from zero (no compeft.base) plus --base: apply_task_vector's result."""
    base = {"a": torch.randn(4, 4), "b": torch.randn(3).to(torch.bfloat16), "n": torch.arange(2)}
    tv = {"a": TernaryTensor((4, 4), [1, 5], [False, True], 0.5),
          "b": TernaryTensor((3,), [2], [True], 0.25, "BF16")}
    from compeft_format import save_file

    save_file(tv, tmp_path / "tv.compeft")
    bp = _save(base, tmp_path / "base.safetensors")
    decompress_file(tmp_path / "tv.compeft", tmp_path / "o.safetensors", base=bp)
    out = safetensors.torch.load_file(tmp_path / "o.safetensors")
    want = apply_task_vector(base, tv)
    assert set(out) == set(base)
    for n in base:
        assert torch.equal(out[n], want[n]), n


# ---------------------------------------------------------------------------------------------
# PEFT adapter directories
# ---------------------------------------------------------------------------------------------
def test_ia3_directory_round_trip_adds_one(tmp_path):
    s = compress_file(IA3, tmp_path / "c", density=0.2)
    assert _listing(tmp_path / "c") == ["adapter_config.json", "adapter_model.compeft"]
    assert (tmp_path / "c" / "adapter_config.json").read_bytes() == \
        (IA3 / "adapter_config.json").read_bytes()
    assert s.reference == "one"
    meta = inspect(tmp_path / "c" / "adapter_model.compeft").metadata
    assert meta["compeft.base"] == {"name": "sentence-transformers/all-MiniLM-L6-v2"}
    assert meta["task_vector"]["peft_type"] == "IA3"
    assert meta["task_vector"]["delta_all_but"] == []  # all 24 start at one
    decompress_file(tmp_path / "c", tmp_path / "r")
    assert _listing(tmp_path / "r") == ["adapter_config.json", "adapter_model.safetensors"]
    orig = safetensors.torch.load_file(IA3 / "adapter_model.safetensors")
    ref = compress(peft_task_vector(orig, "IA3"), density=0.2)
    back = safetensors.torch.load_file(tmp_path / "r" / "adapter_model.safetensors")
    assert set(back) == set(orig)
    for name, t in orig.items():
        want = torch.from_numpy(np.float32(1) + ref[name].to_numpy())
        assert back[name].dtype == t.dtype
        assert back[name].shape == t.shape
        assert torch.equal(back[name], want), name
    with safetensors.safe_open(tmp_path / "r" / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_an_ia3_base_of_ones_is_recorded_as_the_recipe(tmp_path):
    """The saved initial state of an (IA)^3 adapter is all ones: the file is the one written
    without a base (measured from one, no digests), and says so."""
    plain = compress_file(IA3, tmp_path / "plain", density=0.01)
    given = compress_file(IA3, tmp_path / "given", density=0.01, base=IA3 / "init")
    assert given.reference == "one"
    assert "holds IA3's initial values" in given.note
    assert ((tmp_path / "given" / "adapter_model.compeft").read_bytes()
            == (tmp_path / "plain" / "adapter_model.compeft").read_bytes())
    assert given.file_bytes == plain.file_bytes
    # decompress given that base again, as for any base: it adds nothing, and is taken
    decompress_file(tmp_path / "given", tmp_path / "r1")
    decompress_file(tmp_path / "given", tmp_path / "r2", base=IA3 / "init")
    assert ((tmp_path / "r1" / "adapter_model.safetensors").read_bytes()
            == (tmp_path / "r2" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ConvertError, match=r"stored as it is \(from zero or one\), which takes no"):
        decompress_file(tmp_path / "given", tmp_path / "r3", base=LORA / "init")
    # a base that differs from the ones anywhere is a checkpoint, bound by its digests
    init = safetensors.torch.load_file(IA3 / "init" / "adapter_model.safetensors")
    name = sorted(init)[3]
    init[name] = init[name].clone()
    init[name].view(-1)[5] = 1.0 + 2.0**-20
    (tmp_path / "near").mkdir()
    safetensors.torch.save_file(init, tmp_path / "near" / "adapter_model.safetensors")
    near = compress_file(IA3, tmp_path / "near-c", density=0.01, base=tmp_path / "near")
    assert near.reference == "checkpoint"
    assert near.note is None or "initial values" not in near.note
    meta = inspect(tmp_path / "near-c" / "adapter_model.compeft").metadata
    assert meta["task_vector"]["reference"] == "checkpoint"
    assert "digests" in meta["compeft.base"]


def test_lora_directory_from_zero_and_from_init(tmp_path):
    orig = safetensors.torch.load_file(LORA / "adapter_model.safetensors")
    init = safetensors.torch.load_file(LORA / "init" / "adapter_model.safetensors")
    # from zero: the adapter as it is (one rule in both: "auto" picks lora_product_out
    # for a LoRA folder from zero at 0.1, which compress alone cannot)
    compress_file(LORA, tmp_path / "z", density=0.1, scale="proj_vcap")
    decompress_file(tmp_path / "z", tmp_path / "zr")
    ref = compress(peft_task_vector(orig, "LORA"), density=0.1, scale="proj_vcap")
    back = safetensors.torch.load_file(tmp_path / "zr" / "adapter_model.safetensors")
    for name in orig:
        assert torch.equal(back[name], ref[name].to_torch()), name
    # from the saved initial adapter: A - A_init, restored on top of the init (proj_vcap
    # again: "auto" fits a LoRA's factors on their products from it at 0.1)
    s = compress_file(LORA, tmp_path / "i", density=0.1, base=LORA / "init", scale="proj_vcap")
    assert s.base_name == "init"
    with pytest.raises(ConvertError, match=r"measured from the base 'init'"):
        decompress_file(tmp_path / "i", tmp_path / "ir")
    decompress_file(tmp_path / "i", tmp_path / "ir", base=LORA / "init")
    ref = compress(peft_task_vector(orig, "LORA", init=init), density=0.1)
    want = apply_task_vector(init, ref)
    back = safetensors.torch.load_file(tmp_path / "ir" / "adapter_model.safetensors")
    for name in orig:
        assert torch.equal(back[name], want[name]), name
    # the wrong initial adapter is refused, naming it
    with pytest.raises(ConvertError, match=r"ia3-minilm-vader/init.*not the base 'init'"):
        decompress_file(tmp_path / "i", tmp_path / "bad", base=IA3 / "init")
    # an adapter stored as it is takes no base
    with pytest.raises(ConvertError, match=r"takes no --base"):
        decompress_file(tmp_path / "z", tmp_path / "bad", base=LORA / "init")
    assert not (tmp_path / "bad").exists()


def _adapter_dir(tmp_path: Path, config: dict | None, weights: bool = True) -> Path:
    d = tmp_path / "adapter"
    d.mkdir()
    if config is not None:
        (d / "adapter_config.json").write_text(json.dumps(config))
    if weights:
        shutil.copy(LORA / "adapter_model.safetensors", d / "adapter_model.safetensors")
    return d


def test_adapter_directory_errors(tmp_path):
    d = _adapter_dir(tmp_path, None)
    with pytest.raises(ConvertError, match=r"not a PEFT adapter directory: adapter_config.json"):
        compress_file(d, tmp_path / "o")
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(ConvertError, match=r"adapter_config.json: not valid JSON"):
        compress_file(d, tmp_path / "o")
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA"}))
    with pytest.raises(ConvertError, match=r"'LOHA' has no known initial value.*--base"):
        compress_file(d, tmp_path / "o")
    (d / "adapter_model.safetensors").unlink()  # adapter_model.bin is read too (test_checkpoints)
    (d / "adapter_model.bin").write_bytes(b"neither torch nor safetensors")
    with pytest.raises(SafetensorsError, match=r"adapter_model.bin: not a valid safetensors"):
        compress_file(d, tmp_path / "o")
    (d / "adapter_model.bin").unlink()
    with pytest.raises(ConvertError, match=r"adapter_model.safetensors is missing; compress"):
        compress_file(d, tmp_path / "o")
    with pytest.raises(ConvertError, match=r"adapter_model.compeft is missing"):
        decompress_file(d, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_init_adapter_with_other_tensors_is_refused(tmp_path):
    init = tmp_path / "init.safetensors"
    save_safetensors({"x": np.zeros(3, np.float32)}, init)
    with pytest.raises(ConvertError, match=r"initial adapter does not match"):
        compress_file(LORA, tmp_path / "o", base=init)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# bad inputs and outputs: a CompeftError or OSError, and nothing left behind
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("density", [0, 0.0, 1.5, -0.1, float("nan"), float("inf")])
def test_bad_density(tmp_path, model, density):
    with pytest.raises(EncodeError, match=r"density must be in"):
        compress_file(model, tmp_path / "o.compeft", density=density)
    assert not (tmp_path / "o.compeft").exists()


def test_bad_options(tmp_path, model):
    for kwargs, match in [({"alpha": 0}, "alpha"), ({"scope": "layer"}, "scope"),
                          ({"scale": "max"}, "scale"), ({"positions": "huffman"}, "positions"),
                          ({"zstd_level": 99}, "zstd level")]:
        with pytest.raises(EncodeError, match=match):
            compress_file(model, tmp_path / "o.compeft", **kwargs)
    compress_file(model, tmp_path / "o.compeft")
    with pytest.raises(EncodeError, match=r"dtype must be one of"):
        decompress_file(tmp_path / "o.compeft", tmp_path / "o.safetensors", dtype="f64")
    assert _listing(tmp_path) == ["model.safetensors", "o.compeft"]


def test_missing_inputs(tmp_path, model):
    with pytest.raises(FileNotFoundError, match=r"No such file"):
        compress_file(tmp_path / "nope.safetensors", tmp_path / "o.compeft")
    with pytest.raises(FileNotFoundError):
        compress_file(model, tmp_path / "o.compeft", base=tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):
        decompress_file(tmp_path / "nope.compeft", tmp_path / "o.safetensors")
    assert _listing(tmp_path) == ["model.safetensors"]


def test_not_safetensors_and_not_compeft(tmp_path, model):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello, this is not a tensor file at all")
    with pytest.raises(SafetensorsError, match=r"junk.bin: not a valid safetensors file"):
        compress_file(junk, tmp_path / "o.compeft")
    compress_file(model, tmp_path / "m.compeft")
    with pytest.raises(SafetensorsError, match=r"it is a compeft file"):
        compress_file(tmp_path / "m.compeft", tmp_path / "o.compeft")
    with pytest.raises(BadMagicError, match=r"model.safetensors: .*not a compeft file"):
        decompress_file(model, tmp_path / "o.safetensors")
    with pytest.raises(BadMagicError, match=r"junk.bin"):
        decompress_file(junk, tmp_path / "o.safetensors")
    assert _listing(tmp_path) == ["junk.bin", "m.compeft", "model.safetensors"]


def test_corrupt_compeft_is_refused_and_leaves_nothing(tmp_path, model):
    compress_file(model, tmp_path / "m.compeft")
    info = inspect(tmp_path / "m.compeft")
    rec = next(t for t in info.tensors if t.kind == "ternary" and t.nnz)
    data = bytearray((tmp_path / "m.compeft").read_bytes())
    data[rec.blocks[0].offset] ^= 0xFF
    (tmp_path / "m.compeft").write_bytes(bytes(data))
    # a pack (format 1.1) has one checksum: the error names the tensors it covers
    first = next(t.name for t in info.tensors if t.offset == rec.offset)
    with pytest.raises(FormatError, match=rf"m.compeft: tensor .*checksum mismatch.*"
                                          rf"\(a pack of \d+ tensors, '{first}' to"):
        decompress_file(tmp_path / "m.compeft", tmp_path / "o.safetensors")
    assert _listing(tmp_path) == ["m.compeft", "model.safetensors"]


def test_existing_output_needs_force_and_input_is_never_overwritten(tmp_path, model):
    out = tmp_path / "o.compeft"
    out.write_bytes(b"keep me")
    with pytest.raises(ConvertError, match=r"the output exists; use --force"):
        compress_file(model, out)
    assert out.read_bytes() == b"keep me"
    compress_file(model, out, force=True)
    assert inspect(out).tensors
    for dst in (model, tmp_path / "." / "model.safetensors"):
        with pytest.raises(ConvertError, match=r"the output is an input"):
            compress_file(model, dst, force=True)
    with pytest.raises(ConvertError, match=r"the output is an input"):
        decompress_file(out, out, force=True)
    # a directory output replaces a directory only with force
    compress_file(IA3, tmp_path / "d")
    with pytest.raises(ConvertError, match=r"exists"):
        compress_file(IA3, tmp_path / "d")
    compress_file(IA3, tmp_path / "d", force=True, density=0.5)
    assert _listing(tmp_path / "d") == ["adapter_config.json", "adapter_model.compeft"]
    assert inspect(tmp_path / "d" / "adapter_model.compeft").metadata[
        "compeft.compression"]["density"] == 0.5
    with pytest.raises(ConvertError, match=r"is not a directory"):
        compress_file(IA3, out, force=True)  # a file is not replaced by a directory
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_unwritable_output(tmp_path, model):
    with pytest.raises(ConvertError, match=r"cannot write there"):
        compress_file(model, tmp_path / "no" / "such" / "dir" / "o.compeft")
    with pytest.raises(ConvertError, match=r"cannot write there"):
        compress_file(model, model / "o.compeft")  # below a file
    assert _listing(tmp_path) == ["model.safetensors"]


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    save_safetensors({"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)},
                     tmp_path / "m.safetensors")

    def boom(*args, **kwargs):
        raise EncodeError("disk on fire")

    from compeft_format import container

    monkeypatch.setattr(container.Writer, "close", boom)
    with pytest.raises(EncodeError, match=r"disk on fire"):
        compress_file(tmp_path / "m.safetensors", tmp_path / "o.compeft")
    with pytest.raises(EncodeError, match=r"disk on fire"):
        compress_file(IA3, tmp_path / "d")
    assert _listing(tmp_path) == ["m.safetensors"]


def test_output_mode_follows_umask(tmp_path, model):
    mask = os.umask(0o022)
    try:
        compress_file(model, tmp_path / "o.compeft")
        compress_file(IA3, tmp_path / "d")
    finally:
        os.umask(mask)
    assert (tmp_path / "o.compeft").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("module", ["convert", "sources", "outputs", "summary", "plan",
                                    "binding", "_progress"])
def test_doctests(module):
    import importlib

    mod = importlib.import_module(f"compeft_format.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted or module == "summary"
    assert not result.failed


@pytest.mark.parametrize("with_base", [False, True])
def test_sliced_quality_equals_quality_report(tmp_path, monkeypatch, checkpoint, with_base):
    """The summary's quality, computed slice by slice, is quality_report's on whole tensors."""
    from compeft_format import quality_report

    monkeypatch.setattr(conv, "_QUALITY_SLICE", 100)  # many slices per tensor
    base_path, ft_path, base, ft = checkpoint
    kwargs = {"base": base_path} if with_base else {}
    s = compress_file(ft_path, tmp_path / "q.compeft", density=0.2, **kwargs)
    stored = load_file(tmp_path / "q.compeft")
    names = [q.name for q in s.quality.tensors]
    tv = {}
    for n in names:
        delta = ft[n].double() - base[n].double() if with_base else ft[n].double()
        tv[n] = delta.to(torch.float64 if ft[n].dtype == torch.float64 else torch.float32)
    want = quality_report(tv, {n: stored[n] for n in names})
    assert [q.name for q in want.tensors] == names
    for got, exp in zip((*s.quality.tensors, s.quality.overall),
                        (*want.tensors, want.overall), strict=True):
        assert (got.name, got.kind, got.numel, got.nnz) == (exp.name, exp.kind, exp.numel,
                                                             exp.nnz)
        for field in ("norm", "rel_error", "cosine"):
            assert getattr(got, field) == pytest.approx(getattr(exp, field), rel=1e-12), field
