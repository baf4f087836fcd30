"""Create the seed corpora ``fuzz/corpus/<harness>/`` (run again after spec/vectors changes).

    .venv/bin/python fuzz/make_corpus.py [--clean]   # (re)writes the seeds under fuzz/corpus/

Seeds of ``fuzz_loads`` are every ``spec/vectors/**/*.compeft`` (valid and invalid golden
files) plus small files generated here: each codec with and without zstd, every alignment
class, dense records of several dtypes, metadata, and crafted optional records and blocks
that the writer never emits. Seeds of ``fuzz_roundtrip`` are random byte strings (a
``DataProvider`` turns any bytes into a valid input). Everything is deterministic, so the
corpus can be rebuilt byte for byte; :func:`seeds` gives it in memory for the smoke test.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import _craft as C
import _harness
import numpy as np

import compeft_format as cf
from compeft_format import TernaryTensor

VECTORS = _harness.ROOT / "spec" / "vectors"


def _ternary(numel: int, nnz: int, rng: np.random.Generator, shape=None, dtype="F32",
             scale: float = 0.0125) -> TernaryTensor:
    idx = np.sort(rng.choice(numel, size=nnz, replace=False)) if nnz else np.empty(0, np.int64)
    signs = rng.random(nnz) < 0.5
    return TernaryTensor(shape or (numel,), idx, signs, scale, dtype)


def dumps10(*args: object, **kwargs: object) -> bytes:
    """``cf.dumps`` of a 1.0 file (the seeds made before format 1.1)."""
    return cf.dumps(*args, version="1.0", **kwargs)  # type: ignore[arg-type]


def _generated() -> dict[str, bytes]:
    """Small valid (and a few crafted) files that cover every structure of the format."""
    rng = np.random.default_rng(0)
    out: dict[str, bytes] = {}
    sparse = _ternary(600, 9, rng, (20, 30))
    dense_ish = _ternary(256, 128, rng, (16, 16), "BF16")
    out["empty"] = dumps10({})
    out["metadata-only"] = dumps10({}, metadata={
        "compeft.producer": "make_corpus", "compeft.base": {"name": "m", "hashes": {"a": "b"}},
        "compeft.compression": {"k": 0.1}, "list": [1, 2.5, None, True, "é"]})
    out["golomb"] = dumps10({"w": sparse}, positions="golomb", zstd_level=None)
    out["bitmask"] = dumps10({"w": dense_ish}, positions="bitmask", zstd_level=None)
    out["auto-zstd"] = dumps10({"a": sparse, "b": dense_ish, "c": _ternary(4000, 40, rng)})
    out["zero-d-and-empty"] = dumps10({
        "scalar": TernaryTensor((), [0], [True], 1.5, "F64"),
        "empty": TernaryTensor.zeros((0, 7), "F16"), "zeros": TernaryTensor.zeros((3, 1, 2))})
    out["dense-mixed"] = dumps10({
        "b": np.array([True, False, True]), "f": np.linspace(-1, 1, 7, dtype=np.float32),
        "i": np.arange(-5, 5, dtype=np.int64).reshape(2, 5), "u": np.zeros(300, np.uint8)})
    out["align1"] = dumps10({"x": sparse, "y": np.arange(5, dtype=np.int16)}, alignment=1)
    out["align64"] = dumps10({"x": sparse, "y": np.arange(5, dtype=np.int16)}, alignment=64)
    # zstd on every block type: long runs make each payload compressible
    runs = TernaryTensor((4096,), np.arange(0, 4096, 2), np.zeros(2048, bool), 0.5)
    out["zstd-bitmask-signs"] = dumps10({"r": runs}, positions="bitmask")
    out["zstd-golomb"] = dumps10({"r": TernaryTensor((8192,), np.arange(0, 8192, 16),
                                                      np.ones(512, bool), 0.25)},
                                  positions="golomb")
    out["zstd-dense"] = dumps10({"d": np.zeros(1000, np.float32)})
    # format 1.1: pack records (a pack, a dense record that closes it, a second pack)
    out["pack-lora"] = cf.dumps({
        f"layers.{i}.{m}.lora_{ab}": _ternary(96, 5, rng, (8, 12) if ab == "A" else (12, 8))
        for i in range(3) for m in ("q", "v") for ab in ("A", "B")}, version="1.1")
    out["pack-and-records"] = cf.dumps({"a": sparse, "b": np.arange(3, dtype=np.int8),
                                        "c": dense_ish, "d": _ternary(40, 4, rng, None, "F64")},
                                       version="1.1")
    # crafted: what the writer never emits but a reader must handle
    scale = C.block(C.SCALE, payload=np.float32(0.5).tobytes())
    ternary = C.record(b"t", shape=(8,), nnz=1, blocks=[
        C.block(C.BITMASK, payload=b"\x04"), C.block(C.SIGNS, payload=b"\x01"), scale])
    out["crafted-optional-record"] = C.build_file(
        [C.record(b"a-extra", kind=0x81, body=C.varint(7) + b"a-extra" + b"\x00\x01",
                  blocks=[C.block(0x99, payload=b"opaque")]), ternary])
    out["crafted-optional-block"] = C.build_file([C.record(b"t", shape=(8,), nnz=1, blocks=[
        C.block(C.BITMASK, payload=b"\x04"), C.block(0x85, param=3, payload=b"xyz"),
        C.block(C.SIGNS, payload=b"\x01"), scale])])
    out["crafted-bf16-f8-dense"] = C.build_file([
        C.record(b"bf", kind=C.KIND_DENSE, dtype=C.BF16, shape=(3,), nnz=None,
                 blocks=[C.block(C.DENSE, payload=bytes.fromhex("803f0040c0ff"))]),
        C.record(b"f8", kind=C.KIND_DENSE, dtype=0x0E, shape=(4,), nnz=None,
                 blocks=[C.block(C.DENSE, payload=bytes.fromhex("00387fff"))])],
        alignment_log2=0)
    out["crafted-minor-version"] = C.build_file([ternary], minor=7)
    # format 1.2: column packs and compressed metadata (a generator of their own, so that
    # the seeds above keep their bytes)
    rng12 = np.random.default_rng(12)
    meta = {"compeft.producer": "compeft_format 0.1.0", "compeft.base": {
        "digests": "8NPzzMrg88w6", "name": "init", "sha256": "sha256:" + "ab" * 32},
        "compeft.compression": {"alpha": 1.0, "density": 0.1, "method": "compeft",
                                "scale": "proj_vcap", "scope": "global"}}
    out["column-pack-lora"] = cf.dumps({
        f"layers.{i}.{m}.lora_{ab}": _ternary(96, 5, rng12, (8, 12) if ab == "A" else (12, 8))
        for i in range(3) for m in ("q", "v") for ab in ("A", "B")}, metadata=meta,
        version="1.2")
    out["column-pack-and-records"] = cf.dumps({
        "a": _ternary(600, 9, rng12, (20, 30)), "b": np.arange(3, dtype=np.int8),
        "c": _ternary(256, 128, rng12, (16, 16), "BF16"), "d": _ternary(40, 4, rng12, None, "F64"),
        "e": _ternary(64, 0, rng12)}, metadata=meta, alignment=1, version="1.2")
    # format 1.3: compact packs, one scale shared by several members, two by the others
    rng13 = np.random.default_rng(13)
    lora = {f"base_model.model.model.layers.{i}.self_attn.{m}_proj.lora_{ab}.weight":
            _ternary(96, 5, rng13, (8, 12) if ab == "A" else (12, 8),
                     scale=0.25 if ab == "A" else 0.0125)
            for i in range(3) for m in ("q", "v") for ab in ("A", "B")}
    out["compact-pack-lora"] = cf.dumps(lora, metadata=meta, version="1.3")
    out["compact-pack-and-records"] = cf.dumps({
        "a": _ternary(600, 9, rng13, (20, 30)), "b": np.arange(3, dtype=np.int8),
        "c": _ternary(256, 128, rng13, (16, 16), "BF16"), "d": _ternary(40, 4, rng13, None, "F64"),
        "e": _ternary(64, 0, rng13)}, metadata=meta, alignment=1, version="1.3")
    return out


def _vectors() -> dict[str, bytes]:
    """The golden files of spec/vectors/ (valid and invalid), when present."""
    if not VECTORS.is_dir():
        return {}
    return {"vector-" + "_".join(p.relative_to(VECTORS).parts): p.read_bytes()
            for p in sorted(VECTORS.rglob("*.compeft"))}


def _roundtrip_seeds() -> dict[str, bytes]:
    rng = random.Random(0)
    out = {}
    for i, n in enumerate([0, 1, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024]):
        out[f"random-{i:02d}-{n}"] = bytes(rng.randrange(256) for _ in range(n))
    out["all-ff-256"] = b"\xff" * 256
    out["all-00-256"] = bytes(256)
    return out


def seeds(harness: str) -> dict[str, bytes]:
    """The seed corpus of ``harness`` as ``{file name: bytes}``."""
    if harness == "fuzz_loads":
        return {**_generated(), **_vectors()}
    if harness == "fuzz_roundtrip":
        return _roundtrip_seeds()
    raise ValueError(f"unknown harness {harness!r}")


def main(argv: list[str]) -> None:
    """Write the seeds under fuzz/corpus/<harness>/ (``--clean``: remove every other file).

    Files a campaign added (libFuzzer names them by their SHA-1) are kept unless ``--clean``.
    """
    for harness in ("fuzz_loads", "fuzz_roundtrip"):
        folder = _harness.CORPUS_DIR / harness
        folder.mkdir(parents=True, exist_ok=True)
        if "--clean" in argv:
            for old in folder.glob("*"):
                old.unlink()
        files = seeds(harness)
        for name, data in files.items():
            Path(folder / name).write_bytes(data)
        print(f"{folder}: {len(files)} files, {sum(map(len, files.values()))} bytes")


if __name__ == "__main__":
    main(sys.argv)
