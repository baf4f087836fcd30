#!/usr/bin/env python
"""Write the golden test vectors of spec/FORMAT.md §12.

* ``spec/vectors/valid/``: files the reference encoder writes, with the JSON of their
  decoded content and the writer options that rebuild them byte for byte.
* ``spec/vectors/accepted/``: valid files that the reference encoder never writes
  (optional parts, non-canonical choices); a decoder MUST accept them.
* ``spec/vectors/invalid/``: one or more files per rule of the §9.1 table, each with the
  error class, rule ID and exact message of the reference decoder.

Usage::

    .venv/bin/python spec/tools/make_vectors.py          # write the vectors that are missing
    .venv/bin/python spec/tools/make_vectors.py --check  # rebuild all in memory, write nothing

Released vectors are never edited: a vector file that exists is never overwritten. To pin
something new, add a vector under the next free number.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parents[1]
VECTORS = ROOT / "spec" / "vectors"
sys.path[:0] = [str(ROOT), str(TOOLS)]

from _layout import Block, File, Record, crc32, parse, varint  # noqa: E402
from _rules import Rule, load_rules  # noqa: E402

import compeft_format as cf  # noqa: E402
from compeft_format import ReadLimits, TernaryTensor  # noqa: E402
from compeft_format._spec import METADATA_DICTIONARY, NAME_DICTIONARY  # noqa: E402

DEFAULT_OPTIONS = {"positions": "auto", "zstd_level": 3, "alignment": 8}
KIND_TERNARY, KIND_DENSE = 0x01, 0x02
BITMASK, GOLOMB, SIGNS, SCALE, DENSE = 0x01, 0x02, 0x03, 0x04, 0x05
ZSTD = 0x01


# ---------------------------------------------------------------------------------------------
# Reading a file the three ways a user can
# ---------------------------------------------------------------------------------------------


class ShortReads(io.RawIOBase):
    """A non-seekable stream that returns at most 7 bytes a read, like a raw pipe."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        chunk = self._buf.read(min(len(b), 7))
        b[: len(chunk)] = chunk
        return len(chunk)


def _limits(spec: dict[str, int] | None) -> ReadLimits:
    return ReadLimits(**(spec or {}))


def error_of(fn: Callable[[], Any]) -> tuple[str, str] | None:
    """Return ``(class name, str(exc))`` of the CompeftError ``fn`` raises, or None."""
    try:
        fn()
    except cf.CompeftError as exc:
        return type(exc).__name__, str(exc)
    return None


def read_all_random(data: bytes, limits: ReadLimits) -> None:
    """Open ``data`` for random access and decode every tensor."""
    with cf.open_file(data, limits=limits) as f:
        for name in f:
            f.get_raw(name)


def path_errors(data: bytes, limits: ReadLimits) -> dict[str, tuple[str, str] | None]:
    """Return the error of each read path: loads, iter_stream (short reads) and open_file."""
    return {
        "loads": error_of(lambda: cf.loads(data, limits=limits)),
        "iter_stream": error_of(lambda: list(cf.iter_stream(ShortReads(data), limits=limits))),
        "open_file": error_of(lambda: read_all_random(data, limits)),
    }


# ---------------------------------------------------------------------------------------------
# The JSON form of decoded content (spec §12.2)
# ---------------------------------------------------------------------------------------------


def scale_bits(scale: float) -> str:
    """Return the float32 bits of ``scale`` as ``0x`` and 8 hex digits."""
    return f"0x{struct.unpack('<I', struct.pack('<f', scale))[0]:08x}"


def describe(data: bytes) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Return ``(tensors, layout)`` of a valid file, in file order."""
    tensors, layout = [], []
    with cf.open_file(data) as f:
        for name in f:
            raw = f.get_raw(name)
            if isinstance(raw, TernaryTensor):
                tensors.append({
                    "name": name, "kind": "ternary", "shape": list(raw.shape),
                    "dtype": raw.dtype, "nnz": raw.nnz, "indices": raw.indices.tolist(),
                    "signs": raw.signs.astype(int).tolist(), "scale": raw.scale,
                    "scale_bits": scale_bits(raw.scale),
                })
            else:
                arr, dtype = raw
                tensors.append({"name": name, "kind": "dense", "shape": list(arr.shape),
                                "dtype": dtype, "data_hex": arr.tobytes().hex()})
            info = f.info(name)
            layout.append({"name": name, "blocks": [
                {"codec": b.codec, "stage": b.stage, "param": b.param,
                 "stored_size": b.stored_size, "decoded_size": b.decoded_size}
                for b in info.blocks]})
    return tensors, layout


# ---------------------------------------------------------------------------------------------
# Valid vectors: written by the reference encoder (dumps)
# ---------------------------------------------------------------------------------------------


def _torch_bits(bits: list[int], dtype: str) -> Any:
    """Return a torch tensor of ``dtype`` (BF16 or F8) holding the raw ``bits``."""
    import torch

    if dtype == "BF16":
        return torch.tensor(np.array(bits, np.uint16).view(np.int16)).view(torch.bfloat16)
    t = torch.tensor(np.array(bits, np.uint8))
    return t.view(torch.float8_e4m3fn if dtype == "F8_E4M3" else torch.float8_e5m2)


@dataclass
class Valid:
    """A valid vector: tensors and options given to ``dumps``."""

    slug: str
    description: str
    tensors: Callable[[], dict[str, Any]]
    metadata: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    check: Callable[[list[dict[str, Any]]], bool] = lambda layout: True

    def all_options(self) -> dict[str, Any]:
        return {**DEFAULT_OPTIONS, **self.options}

    def build(self) -> bytes:
        # the vectors before 1.1 give no version: they are 1.0 files
        return cf.dumps(self.tensors(), metadata=self.metadata,
                        **{"version": "1.0", **self.all_options()})


def _scale_pattern() -> dict[str, Any]:
    """Four (IA)^3-like layers of three vectors whose first and third share a scale in each
    layer: a tight pack's Scale_Backs repeat 0 0 2 (spec 5.13)."""
    out = {}
    for i in range(4):
        for j, m in enumerate(("k", "v", "w")):
            scale = 0.25 + 0.0625 * i + (0.03125 if j == 1 else 0.0)
            out[f"layer.{i}.{m}.ia3_l"] = _t((64,), [i, 20 + j, 63 - i], [0, 1, i % 2], scale)
    return out


def _golomb_m(m: int) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda layout: all(e["blocks"][0]["codec"] == "golomb" and e["blocks"][0]["param"] == m
                              for e in layout)


def _t(shape: tuple[int, ...], idx: list[int], signs: list[int], scale: float,
       dtype: str = "F32") -> TernaryTensor:
    return TernaryTensor(shape, idx, signs, scale, dtype)


V11 = {"version": "1.1"}
V12 = {"version": "1.2"}
V13 = {"version": "1.3"}
V14 = {"version": "1.4"}
V15 = {"version": "1.5"}
V16 = {"version": "1.6"}
V17 = {"version": "1.7"}


def _twin_tensors() -> dict[str, Any]:
    """Members with the same positions and signs as an earlier one: 'b.w' (another shape
    and scale) and 'e.w' are twins of 'a.w', 'd.w' of 'c.w'; 'z.w' and 'zz.w', empty, are
    not (spec 5.14, Appendix D 6)."""
    a_idx, a_sg = [3, 17, 40, 41, 63], [0, 1, 1, 0, 1]
    c_idx, c_sg = [0, 9, 31], [1, 1, 0]
    return {
        "a.w": _t((64,), a_idx, a_sg, 0.5),
        "b.w": _t((8, 8), a_idx, a_sg, 0.75, "F16"),
        "c.w": _t((32,), c_idx, c_sg, 0.5),
        "d.w": _t((4, 8), c_idx, c_sg, 0.5, "BF16"),
        "e.w": _t((2, 32), a_idx, a_sg, 1.5),
        "f.w": _t((64,), a_idx, [1, 1, 1, 0, 1], 0.5),
        "z.w": TernaryTensor.zeros((16,)),
        "zz.w": TernaryTensor.zeros((16,)),
    }


def _bert_ia3_like() -> dict[str, Any]:
    """Three BERT-like (IA)^3 layers: each layer's value vector is the attention output's
    (the same positions, signs and scale, the other orientation): Twin_Back 2 (spec 5.14)."""
    out = {}
    for i in range(3):
        stem = f"base_model.model.encoder.layer.{i}"
        shared = ([i, 9 + i, 40 - i], [i % 2, 1, 0], 0.25 + 0.0625 * i)
        out[f"{stem}.attention.output.dense.ia3_l"] = _t((1, 48), *shared)
        out[f"{stem}.attention.self.key.ia3_l"] = _t((48, 1), [2 * i, 30], [1, i % 2],
                                                     0.3125 + 0.0625 * i)
        out[f"{stem}.attention.self.value.ia3_l"] = _t((48, 1), *shared)
        out[f"{stem}.output.dense.ia3_l"] = _t((1, 96), [5, 50 + i, 95], [0, 0, 1], 0.5)
    return out


def _pack_tensors() -> dict[str, Any]:
    return {
        "layers.0.q.lora_A": _t((4, 12), [3, 17, 30, 41], [0, 1, 1, 0], 0.5),
        "layers.0.q.lora_B": _t((12, 4), [0, 9, 47], [1, 0, 1], 0.375, "BF16"),
        "layers.0.v.lora_A": _t((2, 10), sorted([*range(0, 20, 2), 1, 3, 5]),
                                [i % 2 for i in range(13)], 1.25, "F16"),
        "layers.0.v.lora_B": _t((10, 2), [19], [1], 3.0, "F64"),
        "layers.1.scalar": _t((), [0], [1], 0.75),
        "layers.1.zero": TernaryTensor.zeros((3, 3)),
    }


def _lora_like() -> dict[str, Any]:
    out = {}
    for i in range(6):
        for m in ("q", "v"):
            for ab, shape in (("A", (2, 6)), ("B", (6, 2))):
                k = 2 * i + (m == "v")
                out[f"base_model.model.layers.{i}.self_attn.{m}_proj.lora_{ab}.weight"] = _t(
                    shape, [k % 12], [k % 2], 0.5)
    return out


EXAMPLE = Valid(
    "002-spec-example",
    "The annotated example of spec Appendix A: one 2x8 F32 ternary tensor with golomb "
    "positions (M = 3) and a producer in the metadata.",
    lambda: {"w": _t((2, 8), [0, 3, 14], [0, 1, 0], 0.5)},
    metadata={"compeft.producer": "spec"},
    options={"positions": "golomb"},
    check=_golomb_m(3),
)

_M12 = [7, 9, 10, 16, 94, 110, 130, 134, 138, 158, 162, 201, 213, 220, 240, 250, 276, 293]


def _dense_dtypes() -> dict[str, Any]:
    return {
        "bf16": _torch_bits([0x0000, 0x8000, 0x3F80, 0xFF80, 0x7FC1, 0x0001], "BF16").reshape(2, 3),
        "bool": np.array([[True, False, True], [True, False, False]]),
        "f16": np.array([[0.0, -0.0, 65504.0], [-np.inf, np.nan, 6e-8]], np.float16),
        "f32": np.array([[0.0, -0.0, 1.5], [-np.inf, np.nan, 3.4028235e38]], np.float32),
        "f64": np.array([[0.0, -0.0, 1e308], [-np.inf, np.nan, 5e-324]], np.float64),
        "f8_e4m3": _torch_bits([0x00, 0x80, 0x7E, 0x7F, 0x01, 0xFE], "F8_E4M3").reshape(2, 3),
        "f8_e5m2": _torch_bits([0x00, 0x80, 0x7B, 0x7C, 0x7D, 0x01], "F8_E5M2").reshape(2, 3),
        "i16": np.array([[-32768, 32767, 0], [-1, 1, 42]], np.int16),
        "i32": np.array([[-(2**31), 2**31 - 1, 0], [-1, 1, 42]], np.int32),
        "i64": np.array([[-(2**63), 2**63 - 1, 0], [-1, 1, 42]], np.int64),
        "i8": np.array([[-128, 127, 0], [-1, 1, 42]], np.int8),
        "u16": np.array([[0, 65535, 1], [2, 3, 4]], np.uint16),
        "u32": np.array([[0, 2**32 - 1, 1], [2, 3, 4]], np.uint32),
        "u64": np.array([[0, 2**64 - 1, 1], [2, 3, 4]], np.uint64),
        "u8": np.array([[0, 255, 1], [2, 3, 4]], np.uint8),
    }


def _peft_init_tensors() -> dict[str, Any]:
    a = "base_model.model.layer.0.query.lora_A.weight"
    return {a: TernaryTensor((2, 8), [1, 6, 12], [False, True, False], 0.25),
            a.replace("lora_A", "lora_B"): TernaryTensor((8, 2), [3, 10], [True, False],
                                                         0.125)}


def _peft_init_metadata() -> dict[str, Any]:
    """The metadata ``compress_file(base="peft-init")`` writes, for a made-up initial state
    (A: the numbers 0 to 15 / 16 as float32 bytes, B: zeros) and seed 3407."""
    import hashlib

    from compeft_format.plan import base_binding

    names = sorted(_peft_init_tensors())
    init = {names[0]: struct.pack("<16f", *(i / 16 for i in range(16))),
            names[1]: bytes(64)}
    digests = {n: "sha256:" + hashlib.sha256(b).hexdigest() for n, b in init.items()}
    return {
        "compeft.producer": "compeft_format 0.1.0",
        "compeft.compression": {"alpha": 1.0, "density": 0.2, "method": "compeft",
                                "scale": "proj_vcap", "scope": "global"},
        "task_vector": {"reference": "checkpoint", "delta_all_but": [], "peft_type": "LORA",
                        "exclude": []},
        "compeft.base": {"name": "peft-init:3407", **base_binding(digests),
                         "peft_init": {"seed": 3407, "init_lora_weights": True,
                                       "peft": "0.21.2", "torch": "2.13.0+cpu",
                                       "transformers": "5.25.0"}},
    }


VALID: list[Valid] = [
    Valid("001-empty-file", "No tensors and no metadata: header, index and trailer only.",
          dict),
    EXAMPLE,
    Valid("003-0d-tensors", "Ternary tensors of rank 0 (one element): one -1.5, one zero.",
          lambda: {"neg": _t((), [0], [1], 1.5), "zero": TernaryTensor.zeros(())}),
    Valid("004-empty-tensors", "Tensors with no elements: ternary (0,) F32 and (3, 0, 2) F16, "
          "dense (0,) I32.",
          lambda: {"a": TernaryTensor.zeros((0,)), "b": TernaryTensor.zeros((3, 0, 2), "F16"),
                   "c": np.zeros((0,), np.int32)}),
    Valid("005-nnz-zero", "Ternary tensors without nonzeros: an empty golomb block (M = 1), "
          "an empty signs block; the scale is stored as given (0.0 and 0.25).",
          lambda: {"scaled": _t((4, 4), [], [], 0.25), "zero": TernaryTensor.zeros((4, 4))}),
    Valid("006-density-one", "Every element nonzero (3x5): bitmask of ones, mixed signs.",
          lambda: {"full": _t((3, 5), list(range(15)), [i % 3 == 0 for i in range(15)],
                              0.125)}),
    Valid("007-bitmask", "Bitmask positions (numel 35, so 5 padding bits), no zstd.",
          lambda: {"m": _t((5, 7), [0, 3, 4, 10, 17, 22, 28, 33, 34],
                           [0, 1, 1, 0, 0, 1, 0, 1, 0], 0.75)},
          options={"positions": "bitmask", "zstd_level": None}),
    Valid("008-golomb-m1", "Golomb positions with M = 1: unary codes only.",
          lambda: {"g": _t((4, 6), [1, 4, 6, 8, 9, 10, 12, 13, 14, 15, 20, 22],
                           [i % 2 for i in range(12)], 2.0)},
          options={"positions": "golomb"}, check=_golomb_m(1)),
    Valid("009-golomb-m2", "Golomb positions with M = 2 (Rice, k = 1): one extension bit each.",
          lambda: {"g": _t((30,), [4, 5, 7, 11, 18, 22, 23, 24], [1, 0, 0, 1, 1, 0, 1, 0], 3.0)},
          options={"positions": "golomb"}, check=_golomb_m(2)),
    Valid("010-golomb-m4", "Golomb positions with M = 4 (Rice, k = 2): one plane, all codes "
          "long.",
          lambda: {"g": _t((40,), [0, 3, 7, 27, 34, 37], [0, 0, 1, 1, 0, 1], 0.0625)},
          options={"positions": "golomb"}, check=_golomb_m(4)),
    Valid("011-golomb-m12", "Golomb positions with M = 12: three planes, short and long "
          "truncated-binary codes.",
          lambda: {"g": _t((300,), _M12, [(i * 7) % 3 == 0 for i in range(18)], 0.01)},
          options={"positions": "golomb"}, check=_golomb_m(12)),
    Valid("012-bitmask-zstd", "A 64x64 bitmask and its signs both through the zstd stage.",
          lambda: {"z": _t((64, 64), list(range(0, 1024, 2)), [0] * 512, 1.0)},
          options={"positions": "bitmask"},
          check=lambda layout: [b["stage"] for b in layout[0]["blocks"]] == ["zstd", "zstd",
                                                                             "none"]),
    Valid("013-ternary-dtypes", "One ternary tensor per ternary dtype (F32, F16, BF16, F64); "
          "the scale 0.1 is a float32 whatever the dtype.",
          lambda: {f"t_{d.lower()}": _t((3, 4), [1, 6, 11], [0, 1, 0], 0.1, d)
                   for d in ("F32", "F16", "BF16", "F64")}),
    Valid("014-dense-dtypes", "One dense 2x3 tensor per dtype of the dtype table, with edge "
          "values (signed zero, infinities, NaN, extremes).",
          _dense_dtypes, options={"zstd_level": None}),
    Valid("015-dense-zstd", "Dense records through the zstd stage (F32 and U8); a 4-element I16 "
          "stays raw (below 64 bytes).",
          lambda: {"ramp": (np.arange(1024, dtype=np.float32) % 7).reshape(32, 32),
                   "small": np.array([1, -2, 3, -4], np.int16), "zeros": np.zeros(1000, np.uint8)},
          check=lambda layout: [e["blocks"][0]["stage"] for e in layout] == ["zstd", "none",
                                                                            "zstd"]),
    Valid("016-metadata", "Metadata with every reserved key and nested user values.",
          lambda: {"w": _t((2, 2), [3], [1], 1.0)},
          metadata={
              "compeft.producer": "compeft_format 0.1.0",
              "compeft.compression": {"method": "compeft", "density": 0.1, "alpha": 1.0,
                                      "scope": "global", "scale": "norm"},
              "compeft.base": {"name": "org/base-model", "revision": "0123abcd",
                               "hashes": {"model.safetensors": "sha256:" + "ab" * 32}},
              "task": {"name": "ünïcødé ✓", "scores": [1, 2.5, -3, True, False, None],
                       "empty": {}, "none": []},
          }),
    Valid("017-alignment-1", "Alignment 1 (Alignment_Log2 0): no padding anywhere.",
          lambda: {"a": _t((10,), [2, 5], [0, 1], 0.5), "b": np.arange(3, dtype=np.int16)},
          options={"alignment": 1}),
    Valid("018-alignment-64", "Alignment 64 (Alignment_Log2 6).",
          lambda: {"a": _t((10,), [2, 5], [0, 1], 0.5), "b": np.arange(3, dtype=np.int16)},
          options={"alignment": 64}),
    Valid("019-several-tensors", "Five tensors, ternary and dense, in byte order of their "
          "names ('B' < 'a' < 'a.b' < 'a0' < 'z').",
          lambda: {"z": np.array([1.0, 2.0], np.float32), "a0": _t((8,), [7], [0], 4.0),
                   "a.b": _t((2, 3), [0, 5], [1, 1], 0.5, "BF16"), "a": np.array([True]),
                   "B": _t((100,), [3, 50, 99], [0, 1, 0], 0.25)}),
    Valid("020-unicode-names", "Names are UTF-8 data, never paths: accents, CJK, an emoji, a "
          "space and a path-like name.",
          lambda: {"é": _t((2,), [1], [0], 1.0), "层.权重": _t((2,), [0], [1], 1.0),
                   "🙂": np.array([7], np.uint8), "a b": np.array([1], np.int8),
                   "../etc/passwd": np.array([0], np.uint8)}),
    Valid("021-dense-shapes", "Dense tensors of rank 0, with no elements, and BOOL.",
          lambda: {"empty": np.zeros((0, 3), np.int32), "flags": np.array([1, 0, 0, 1, 1], bool),
                   "scalar": np.array(2.5, np.float64)}),
    Valid("022-rank-16", "A ternary tensor of 16 dimensions (the default max_ndim).",
          lambda: {"r": _t((1,) * 15 + (3,), [2], [1], 1.0)}),
    # -- format 1.1 (spec 5.8): pack records
    Valid("023-pack", "Version 1.1: six small ternary tensors in one pack record (front-coded "
          "names; F32, BF16, F16 and F64; golomb and bitmask positions; rank 0; no nonzero).",
          _pack_tensors, metadata={"compeft.producer": "spec"}, options=V11),
    Valid("024-pack-and-records", "Version 1.1: a pack, a dense record (which closes it), a "
          "second pack, a ternary record of 2^19 + 1 elements (too big to pack), a third pack.",
          lambda: {"a.w": _t((3, 4), [1, 6], [0, 1], 0.5), "b.norm": np.array([1.5, -2.0],
                                                                             np.float32),
                   "c.w": _t((5,), [4], [1], 0.25), "c.x": _t((2, 2), [0, 3], [1, 0], 1.0),
                   "d.big": _t((2**19 + 1,), [0, 99, 2**19], [0, 1, 0], 0.125),
                   "e.w": _t((6,), [2, 3], [1, 1], 2.0)}, options=V11),
    Valid("025-pack-zstd-table", "Version 1.1: 24 LoRA-like members whose member table goes "
          "through the zstd stage.", _lora_like, options=V11),
    Valid("026-pack-alignment-1", "Version 1.1: the tensors of 023-pack with alignment 1 and "
          "no zstd.", _pack_tensors, options={**V11, "alignment": 1, "zstd_level": None}),
    # -- document revision 1.1.1
    Valid("027-base-peft-init", "Version 1.1 (revision 1.1.1): a LoRA adapter measured from "
          "its initial state as PEFT's default init made it from a seed: compeft.base holds "
          "the compact binding of that state and the recipe (compeft.base.peft_init, 5.2.1), "
          "which changes nothing in decoding.", _peft_init_tensors,
          metadata=_peft_init_metadata(), options=V11),
    # -- format 1.2: column packs (spec 5.9) and compressed metadata (spec 5.2, 7.3)
    Valid("028-column-pack", "Version 1.2: the six tensors of 023-pack in one column pack "
          "(Param as a difference from the predicted one, Positions_Size as the slack below "
          "its bound); metadata too short to compress.",
          _pack_tensors, metadata={"compeft.producer": "spec"}, options=V12),
    Valid("029-column-pack-and-records", "Version 1.2: the tensors of 024-pack-and-records: "
          "column packs around a dense record and a ternary record too big to pack.",
          lambda: next(v for v in VALID if v.slug == "024-pack-and-records").tensors(),
          options=V12),
    Valid("030-compressed-metadata", "Version 1.2: the metadata of 027-base-peft-init, "
          "compressed with the metadata dictionary (Flags bit 0), and a column pack whose "
          "member table goes through the zstd stage.", _lora_like,
          metadata=_peft_init_metadata(), options=V12),
    Valid("031-column-pack-alignment-1", "Version 1.2: the tensors of 023-pack with alignment "
          "1 and no zstd (so neither the table nor the metadata is compressed).",
          _pack_tensors, metadata=_peft_init_metadata(),
          options={**V12, "alignment": 1, "zstd_level": None}),
    # -- format 1.3: compact packs (spec 5.10) and the name dictionary (spec 7.4)
    Valid("032-compact-pack", "Version 1.3: the six tensors of 023-pack in one compact pack "
          "(no Name in the body, the first name whole in the table, six distinct scales in "
          "the table, the table through the name dictionary).",
          _pack_tensors, metadata={"compeft.producer": "spec"}, options=V13),
    Valid("033-compact-pack-shared-scale", "Version 1.3: 24 LoRA-like members that share "
          "one scale (Scale_Ref 0 for every member, one scale stored), compressed metadata, "
          "the table through the name dictionary.", _lora_like,
          metadata=_peft_init_metadata(), options=V13),
    Valid("034-compact-pack-and-records", "Version 1.3: the tensors of 024-pack-and-records: "
          "compact packs around a dense record and a ternary record too big to pack.",
          lambda: next(v for v in VALID if v.slug == "024-pack-and-records").tensors(),
          options=V13),
    Valid("035-compact-pack-alignment-1", "Version 1.3: the tensors of 023-pack with alignment "
          "1 and no zstd (Table_Stage 0, metadata stored as JSON).",
          _pack_tensors, metadata=_peft_init_metadata(),
          options={**V13, "alignment": 1, "zstd_level": None}),
    # -- format 1.4: bit packs (spec 5.11) and index entries without a name (spec 5.6)
    Valid("036-bit-pack", "Version 1.4: the six tensors of 023-pack in one bit pack (the "
          "members' positions and signs streams bit after bit, Positions_Bits in column 10, "
          "the index entry without a name).",
          _pack_tensors, metadata={"compeft.producer": "spec"}, options=V14),
    Valid("037-bit-pack-shared-scale", "Version 1.4: the 24 LoRA-like members of 033 in a bit "
          "pack (one scale stored), compressed metadata, the table through the name "
          "dictionary.", _lora_like, metadata=_peft_init_metadata(), options=V14),
    Valid("038-bit-pack-and-records", "Version 1.4: the tensors of 024-pack-and-records: bit "
          "packs (index entries without a name) around a dense record and a ternary record "
          "too big to pack (index entries with their names).",
          lambda: next(v for v in VALID if v.slug == "024-pack-and-records").tensors(),
          options=V14),
    Valid("039-bit-pack-alignment-1", "Version 1.4: the tensors of 023-pack with alignment 1 "
          "and no zstd (Table_Stage 0, metadata stored as JSON).",
          _pack_tensors, metadata=_peft_init_metadata(),
          options={**V14, "alignment": 1, "zstd_level": None}),
    # -- format 1.5: lean packs (spec 5.12)
    Valid("040-lean-pack", "Version 1.5: the six tensors of 023-pack in one lean pack (the "
          "members' streams bit after bit, their lengths read from the streams: no column "
          "10), the index entry without a name.",
          _pack_tensors, metadata={"compeft.producer": "spec"}, options=V15),
    Valid("041-lean-pack-shared-scale", "Version 1.5: the 24 LoRA-like members of 033 in a "
          "lean pack (one scale stored), compressed metadata, the table through the name "
          "dictionary.", _lora_like, metadata=_peft_init_metadata(), options=V15),
    Valid("042-lean-pack-and-records", "Version 1.5: the tensors of 024-pack-and-records: lean "
          "packs around a dense record and a ternary record too big to pack.",
          lambda: next(v for v in VALID if v.slug == "024-pack-and-records").tensors(),
          options=V15),
    Valid("043-lean-pack-alignment-1", "Version 1.5: the tensors of 023-pack with alignment 1 "
          "and no zstd (Table_Stage 0, metadata stored as JSON).",
          _pack_tensors, metadata=_peft_init_metadata(),
          options={**V15, "alignment": 1, "zstd_level": None}),
    # -- format 1.6: tight packs (spec 5.13) and bare frames (spec 7.1)
    Valid("044-tight-pack", "Version 1.6: the six tensors of 023-pack in one tight pack (each "
          "member's scale as a distance back, the distinct scales in byte planes), the index "
          "entry without a name.",
          _pack_tensors, metadata={"compeft.producer": "spec"}, options=V16),
    Valid("045-tight-pack-shared-scale", "Version 1.6: the 24 LoRA-like members of 033 in a "
          "tight pack (one scale stored), the metadata and the table (through the name "
          "dictionary) as bare zstd frames (Flags 0x03).", _lora_like,
          metadata=_peft_init_metadata(), options=V16),
    Valid("046-tight-pack-and-records", "Version 1.6: the tensors of 024-pack-and-records: "
          "tight packs around a dense record and a ternary record too big to pack.",
          lambda: next(v for v in VALID if v.slug == "024-pack-and-records").tensors(),
          options=V16),
    Valid("047-tight-pack-alignment-1", "Version 1.6: the tensors of 023-pack with alignment 1 "
          "and no zstd (Table_Stage 0, metadata stored as JSON).",
          _pack_tensors, metadata=_peft_init_metadata(),
          options={**V16, "alignment": 1, "zstd_level": None}),
    Valid("048-tight-pack-scale-backs", "Version 1.6: four layers of three vectors, the first "
          "and third of each layer sharing a scale: Scale_Back 0 0 2 in every layer, eight "
          "scales in byte planes (alignment 1, no zstd, so the table is plain).",
          _scale_pattern, options={**V16, "alignment": 1, "zstd_level": None}),
    # -- format 1.7: twin packs (spec 5.14), unsized bare frames (7.1), the short trailer (5.7)
    Valid("049-twin-pack", "Version 1.7: a twin pack whose 'b.w' and 'e.w' are twins of 'a.w' "
          "(Twin_Back 1 and 4: other shapes, dtypes and scales) and 'd.w' of 'c.w'; 'f.w' "
          "differs from 'a.w' in one sign, and the empty 'z.w' and 'zz.w' are not twins. "
          "Alignment 1, no zstd: the table is plain; Flags 0x08 (the short trailer).",
          _twin_tensors, options={**V17, "alignment": 1, "zstd_level": None}),
    Valid("050-twin-pack-bert-ia3", "Version 1.7: three BERT-like (IA)^3 layers whose value "
          "vector is the twin of the attention output's (Twin_Back 0 0 2 0 in every layer); "
          "the table a bare frame without Table_Decoded_Size, the metadata a bare frame "
          "without Metadata_Decoded_Size (Flags 0x0f: the short trailer too).",
          _bert_ia3_like, metadata=_peft_init_metadata(), options=V17),
    Valid("051-twin-pack-and-records", "Version 1.7: the tensors of 024-pack-and-records: "
          "twin packs (without twins) around a dense record and a ternary record too big to "
          "pack, alignment 8, the short trailer.",
          lambda: next(v for v in VALID if v.slug == "024-pack-and-records").tensors(),
          options=V17),
    Valid("052-empty-file-1-7", "Version 1.7 without tensors or metadata: the header, the "
          "index 00 00 and the 12-byte trailer (Index_Size 2): 38 bytes with alignment 8.",
          dict, options=V17),
]


# ---------------------------------------------------------------------------------------------
# Field-level building blocks (spec §5, §6) used by the accepted and invalid vectors
# ---------------------------------------------------------------------------------------------

_valid_cache: dict[str, bytes] = {}


def valid_bytes(slug: str) -> bytes:
    """Return the bytes of the valid vector ``slug`` (built in memory)."""
    if slug not in _valid_cache:
        _valid_cache[slug] = next(v for v in VALID if v.slug == slug).build()
    return _valid_cache[slug]


def base(slug: str) -> File:
    """Return a fresh :class:`File` model of the valid vector ``slug``."""
    return parse(valid_bytes(slug))


def rec(f: File, name: str) -> Record:
    """Return the record named ``name``."""
    return next(r for r in f.records if r.name == name.encode())


def blk(f: File, name: str, btype: int) -> Block:
    """Return the block of type ``btype`` of the record ``name``."""
    return next(b for b in rec(f, name).blocks if b.type == btype)


def golomb_encode(indices: list[int], m: int) -> bytes:
    """Encode positions with Golomb parameter ``m`` straight from spec §6.2.1."""
    gaps = [p - q - 1 for p, q in zip(indices, [-1, *indices[:-1]], strict=True)]
    b = (m - 1).bit_length()
    u = (1 << b) - m
    w = max(b - 1, 0)
    values, ext = [], []
    for g in gaps:
        r = g % m
        if b == 0:
            values.append(0)
        elif r < u:
            values.append(r)
        else:
            values.append((r + u) >> 1)
            ext.append((r + u) & 1)
    bits = [(v >> j) & 1 for j in range(w) for v in values] + ext
    for g in gaps:
        bits += [0] * (g // m) + [1]
    return pack_bits(bits)


def pack_bits(bits: list[int]) -> bytes:
    """Pack bits LSB-first (spec §2.2)."""
    out = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        out[i // 8] |= bit << (i % 8)
    return bytes(out)


def zstd_frame(data: bytes, *, checksum: bool = False, content_size: bool = True) -> bytes:
    """Return one zstd frame holding ``data``."""
    return zstandard.ZstdCompressor(level=3, write_checksum=checksum,
                                    write_content_size=content_size).compress(data)


def with_zstd(b: Block, frame: bytes | None = None) -> None:
    """Put block ``b`` through the zstd stage (in place)."""
    raw = b.stored
    b.stage, b.stored, b.decoded_size = ZSTD, zstd_frame(raw) if frame is None else frame, len(raw)


def optional_record(name: bytes, body_tail: bytes = b"opaque", data: bytes = b"12345678",
                    kind: int = 0x81) -> Record:
    """Return a record of an unknown optional kind: a name, opaque fields, opaque data."""
    return Record(kind, name, body=varint(len(name)) + name + body_tail, data=data)


def fix_index_crc(f: File) -> None:
    """Set Index_Checksum to the CRC of the bytes from Index_Offset to the trailer."""
    data = f.serialize()
    f.index_crc = crc32(data[f.index_offset : len(data) - len(f.trailing) - 16])


def ternary_scale(value: float) -> bytes:
    """Return a scale block payload."""
    return struct.pack("<f", value)


# ---------------------------------------------------------------------------------------------
# Accepted vectors: valid, but never written by the reference encoder
# ---------------------------------------------------------------------------------------------


@dataclass
class Accepted:
    """A valid file built field by field; decoding it must give ``expect``'s content."""

    slug: str
    description: str
    build: Callable[[], bytes]
    expect: Callable[[], bytes]  #: a canonical file with the same decoded content
    metadata: Callable[[], dict[str, Any]] | None = None  #: when it differs from expect's


def _model(slug: str, fn: Callable[[File], None]) -> Callable[[], bytes]:
    def build() -> bytes:
        f = base(slug)
        fn(f)
        return f.serialize()
    return build


def _minor(f: File) -> None:
    f.minor = 7


def _add_optional_record(f: File) -> None:
    f.records.insert(2, optional_record(b"a.a"))  # between 'a' and 'a.b'


def _add_optional_blocks(f: File) -> None:
    r = rec(f, "w")
    r.blocks.insert(0, Block(0x80, 0, 7, b"hello", 5))
    r.blocks.append(Block(0xFF, ZSTD, 0, zstd_frame(b"x" * 100), 100))


def _noncanonical_metadata(f: File) -> None:
    f.metadata = (b'{ "z" : [1, 2.50, "\\u00e9", 1E2],\n  "compeft.future": {"x": 1},\n'
                  b'  "compeft.producer": "spec" }')


def _bitmask_nnz0(f: File) -> None:
    r = rec(f, "zero")
    r.blocks[0] = Block(BITMASK, 0, 0, bytes(2), 2)


def _golomb_m5(f: File) -> None:
    b = blk(f, "w", GOLOMB)
    b.param, b.stored = 5, golomb_encode([0, 3, 14], 5)
    b.decoded_size = len(b.stored)


def _odd_stages(f: File) -> None:
    r = rec(f, "m")
    with_zstd(r.blocks[0], zstd_frame(r.blocks[0].stored, checksum=True))  # larger than raw
    with_zstd(r.blocks[1])
    with_zstd(r.blocks[2])


def _empty_zstd(f: File) -> None:
    for r in f.records:
        for b in r.blocks:
            if b.decoded_size == 0:
                with_zstd(b)


# -- format 1.1 pack records (spec 5.8), built field by field

PACK = 0x03


def member_entry(name: bytes, prefix: int, *, dtype: int = 0x01, shape: tuple[int, ...] = (8,),
                 nnz: int = 1, ptype: int = BITMASK, param: int = 0, psize: int = 1) -> bytes:
    """One entry of a member table: ``name`` coded against a previous name sharing ``prefix``."""
    return (varint(prefix) + varint(len(name) - prefix) + name[prefix:]
            + bytes([dtype, len(shape)]) + b"".join(varint(d) for d in shape) + varint(nnz)
            + bytes([ptype]) + varint(param) + varint(psize))


#: the member 'a': 8 F32 elements, position 0 (bitmask 0x01), sign +, scale 1.0
ONE = member_entry(b"a", 1)
ONE_DATA = b"\x01" + b"\x00" + struct.pack("<f", 1.0)


def pack_file(table: bytes = ONE, data: bytes = ONE_DATA, *, name: bytes = b"a",
              count: int = 1, stage: int = 0, decoded: int | None = None, minor: int = 1,
              log2: int = 3, data_size: int | None = None, data_crc: int | None = None,
              after: list[tuple[bytes, bytes]] = (), kind: int = 0x03, flags: int = 0,
              metadata: bytes = b"", named: bool = True) -> bytes:
    """A 1.x file holding one pack, then the records ``after`` as ``(name, record bytes)``.

    The data area is ``data`` padded with zeros to the alignment; ``data_size`` and
    ``data_crc`` override the true values. ``kind`` 0x04 makes a column pack (give a
    column ``table``); ``flags`` and ``metadata`` (the stored bytes) go into the header.
    ``named`` False leaves the ``Name`` out of the body (a compact pack, spec 5.10): ``name``
    is then only the index entry's.
    """
    a = 1 << log2
    header = (b"\x89CPFT\r\n\x1a" + bytes([1, minor, log2, flags])
              + struct.pack("<I", len(metadata)) + metadata)
    out = header + struct.pack("<I", crc32(header))
    out += bytes(-len(out) % a)
    padded = data + bytes(-len(data) % a)
    body = ((varint(len(name)) + name if named else b"") + varint(count) + bytes([stage])
            + varint(len(table)) + (varint(decoded) if decoded is not None else b"") + table)
    size = len(padded) if data_size is None else data_size
    head = (bytes([kind]) + varint(len(body) + 8) + varint(size) + body
            + struct.pack("<I", crc32(padded) if data_crc is None else data_crc))
    entries = [(name, len(out))]
    out += head + struct.pack("<I", crc32(head))
    out += bytes(-len(out) % a) + padded
    for rname, record in after:
        entries.append((rname, len(out)))
        out += record
    index = b"\x00" + varint(len(entries)) + b"".join(
        varint(len(n)) + n + varint(o) for n, o in entries)
    if flags & SHORT_TRAILER:  # spec 5.7 (1.7): Index_Size in 4 bytes
        return out + index + struct.pack("<II", len(index), crc32(index)) + b"CPFE"
    return out + index + struct.pack("<QI", len(out), crc32(index)) + b"CPFE"


# -- format 1.2 (spec 5.9, 5.2): column packs and compressed metadata, built field by field

COLUMN_PACK = 0x04


def columns(*members: tuple[bytes, int, int, tuple[int, ...], int, int, int, int]) -> bytes:
    """A column table (spec 5.9) of ``(name, prefix, dtype, shape, nnz, ptype, param_delta
    zigzag, size_delta zigzag)`` members, each name coded against the previous (the first:
    the pack's)."""
    out = b"".join(varint(m[1]) for m in members)
    out += b"".join(varint(len(m[0]) - m[1]) for m in members)
    out += b"".join(m[0][m[1]:] for m in members)
    out += bytes(m[2] for m in members) + bytes(len(m[3]) for m in members)
    out += b"".join(varint(d) for m in members for d in m[3])
    out += b"".join(varint(m[4]) for m in members) + bytes(m[5] for m in members)
    return out + b"".join(varint(m[6]) for m in members) + b"".join(varint(m[7]) for m in members)


#: the member 'a' of ONE as a column table
COL_ONE = columns((b"a", 1, 0x01, (8,), 1, BITMASK, 0, 0))


def column_file(table: bytes = COL_ONE, **kw: Any) -> bytes:
    """A 1.2 file holding one column pack (see :func:`pack_file`)."""
    return pack_file(table, **{"kind": COLUMN_PACK, "minor": 2, **kw})


def _column_bytes(**kw: Any) -> Callable[[], bytes]:
    return lambda: column_file(**kw)


#: canonical JSON of 40 bytes or more, which the 1.2 encoder compresses
BIG_META = b'{"compeft.producer":"compeft_format 0.1.0","note":"' + b"x" * 40 + b'"}'


def meta_frame(json_text: bytes = BIG_META, *, dictionary: bool = True,
               dict_id: int = 0) -> bytes:
    """``Metadata_Decoded_Size`` and a zstd frame of ``json_text`` (spec 5.2)."""
    kw: dict[str, Any] = {}
    if dictionary:
        kw["dict_data"] = zstandard.ZstdCompressionDict(
            METADATA_DICTIONARY, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    frame = zstandard.ZstdCompressor(level=19, write_dict_id=False, **kw).compress(json_text)
    return varint(len(json_text)) + (with_dict_id(frame, dict_id) if dict_id else frame)


def with_dict_id(frame: bytes, dict_id: int) -> bytes:
    """``frame`` with a one-byte ``Dictionary_ID`` in its header (RFC 8878 3.1.1.1:
    Dictionary_ID_Flag 1, the ID after the window descriptor)."""
    fhd = frame[4]
    at = 5 if fhd & 0x20 else 6  # Single_Segment_Flag: no Window_Descriptor
    return frame[:4] + bytes([fhd | 1]) + frame[5:at] + bytes([dict_id]) + frame[at:]


# -- format 1.3 (spec 5.10, 7.4): compact packs, built field by field

COMPACT_PACK = 0x05
NAMES_ZSTD = 0x02  #: Table_Stage 2: zstd with the name dictionary


def compact(*members: tuple[bytes, int, int, tuple[int, ...], int, int, int, int],
            refs: tuple[int, ...] = (0,), scales: tuple[float, ...] = (1.0,)) -> bytes:
    """A compact table (spec 5.10): the columns of :func:`columns`, then ``Scale_Ref``s and
    ``Scale``s."""
    return (columns(*members) + b"".join(varint(r) for r in refs)
            + b"".join(struct.pack("<f", x) for x in scales))


#: the member 'a' of ONE as a compact table (first name whole, scale 1.0 in the table)
CMP_ONE = compact((b"a", 0, 0x01, (8,), 1, BITMASK, 0, 0))
CMP_DATA = ONE_DATA[:2]  # its bitmask and signs: the scale is in the table


def compact_file(table: bytes = CMP_ONE, data: bytes = CMP_DATA, *, first: bytes = b"a",
                 **kw: Any) -> bytes:
    """A 1.3 file holding one compact pack whose first member is ``first`` (its index name;
    see :func:`pack_file`)."""
    return pack_file(table, data, **{"name": first, "named": False, "kind": COMPACT_PACK,
                                     "minor": 3, **kw})


def _compact_bytes(**kw: Any) -> Callable[[], bytes]:
    return lambda: compact_file(**kw)


def names_frame(table: bytes, *, dictionary: bool = True) -> bytes:
    """A zstd frame of ``table`` made with the name dictionary (spec 7.4), or without it."""
    kw: dict[str, Any] = {}
    if dictionary:
        kw["dict_data"] = zstandard.ZstdCompressionDict(
            NAME_DICTIONARY, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdCompressor(level=19, write_dict_id=False, **kw).compress(table)


# -- format 1.4 (spec 5.11, 5.6): bit packs and index entries without a name

BIT_PACK = 0x06
BIT_ONE = CMP_ONE  # 'a' (8 bitmask bits, S_b = 8, Size_Delta 0): the same table as CMP_ONE
BIT_DATA = b"\x01\x00"  # its 8 bitmask bits (position 0) and its sign bit (+): 9 bits
#: 'g': 8 F32 elements, nonzero at 0 (+), golomb M = 5 (predicted): a short code of w = 2
#: zero bits and the unary 1, a 3-bit stream where S_b = 2 + 0 + 1 + 1 = 4 (Size_Delta -1,
#: zigzag 1); then its sign bit: 0b0100
BIT_G = compact((b"g", 0, 0x01, (8,), 1, GOLOMB, 0, 1))
BIT_G_DATA = b"\x04"


def bit_file(table: bytes = BIT_ONE, data: bytes = BIT_DATA, *, entry: bytes = b"",
             **kw: Any) -> bytes:
    """A 1.4 file holding one bit pack whose index entry is named ``entry`` (empty: no name,
    as the reference encoder writes it; see :func:`pack_file`)."""
    return pack_file(table, data, **{"name": entry, "named": False, "kind": BIT_PACK,
                                     "minor": 4, **kw})


def _bit_bytes(**kw: Any) -> Callable[[], bytes]:
    return lambda: bit_file(**kw)


def bit_record(table: bytes, data: bytes, count: int = 1, a: int = 8) -> bytes:
    """A bit pack record with a plain table, to follow another record at an aligned offset."""
    padded = data + bytes(-len(data) % a)
    body = varint(count) + b"\x00" + varint(len(table)) + table
    head = (bytes([BIT_PACK]) + varint(len(body) + 8) + varint(len(padded)) + body
            + struct.pack("<I", crc32(padded)))
    head += struct.pack("<I", crc32(head))
    return head + bytes(-len(head) % a) + padded


# -- format 1.5 (spec 5.12): lean packs, a bit pack's table without column 10

LEAN_PACK = 0x07


def lean(*members: tuple[bytes, int, int, tuple[int, ...], int, int, int],
         refs: tuple[int, ...] = (0,), scales: tuple[float, ...] = (1.0,)) -> bytes:
    """A lean table (spec 5.12): the columns of :func:`compact` without column 10, members
    given as ``(name, prefix, dtype, shape, nnz, ptype, param_delta zigzag)``."""
    table = compact(*((*m, 0) for m in members), refs=refs, scales=scales)
    cut = len(table) - len(members) - len(refs) - 4 * len(scales)  # column 10: one 0 each
    assert table[cut:cut + len(members)] == bytes(len(members))
    return table[:cut] + table[cut + len(members):]


LEAN_ONE = lean((b"a", 0, 0x01, (8,), 1, BITMASK, 0))  # 'a': 8 bitmask bits, then its sign
LEAN_G = lean((b"g", 0, 0x01, (8,), 1, GOLOMB, 0))  # 'g': M = 5, the 3-bit stream of BIT_G


def lean_file(table: bytes = LEAN_ONE, data: bytes = BIT_DATA, **kw: Any) -> bytes:
    """A 1.5 file holding one lean pack whose index entry has no name (see
    :func:`bit_file`)."""
    return bit_file(table, data, **{"kind": LEAN_PACK, "minor": 5, **kw})


def _lean_bytes(**kw: Any) -> Callable[[], bytes]:
    return lambda: lean_file(**kw)


# -- format 1.7 (spec 5.14, 7.1, 5.7): twin packs, unsized bare frames, the short trailer

TWIN_PACK = 0x09
METADATA_UNSIZED = 0x04  #: Flags bit 2 (1.7)
SHORT_TRAILER = 0x08  #: Flags bit 3 (1.7)


def twin(*members: tuple[bytes, int, int, tuple[int, ...], int, int, int, int],
         backs: tuple[int, ...] = (0,), scales: tuple[float, ...] = (1.0,)) -> bytes:
    """A twin table (spec 5.14) of ``(name, prefix, dtype, shape, nnz, ptype, param_delta
    zigzag, twin_back)`` members: columns 1 to 6 of every member, the ``Twin_Back``s, columns
    7 to 9 of the members that are not twins, then each member's ``Scale_Back`` (``backs``)
    and the ``scales`` in byte planes."""
    out = b"".join(varint(m[1]) for m in members)
    out += b"".join(varint(len(m[0]) - m[1]) for m in members)
    out += b"".join(m[0][m[1]:] for m in members)
    out += bytes(m[2] for m in members) + bytes(len(m[3]) for m in members)
    out += b"".join(varint(d) for m in members for d in m[3])
    out += b"".join(varint(m[7]) for m in members)
    own = [m for m in members if not m[7]]
    out += b"".join(varint(m[4]) for m in own) + bytes(m[5] for m in own)
    out += b"".join(varint(m[6]) for m in own)
    raw = [struct.pack("<f", x) for x in scales]
    return (out + b"".join(varint(b) for b in backs)
            + bytes(r[3 - i] for i in range(4) for r in raw))


TWIN_ONE = twin((b"a", 0, 0x01, (8,), 1, BITMASK, 0, 0))  # 'a' of LEAN_ONE, scale 1.0
#: 'a' and its twin 'b' (shape (2, 4)), both scale 1.0: the data area is 'a''s streams alone
TWIN_AB = twin((b"a", 0, 0x01, (8,), 1, BITMASK, 0, 0), (b"b", 0, 0x01, (2, 4), 0, 0, 0, 1),
               backs=(0, 1))


def twin_file(table: bytes = TWIN_ONE, data: bytes = BIT_DATA, **kw: Any) -> bytes:
    """A 1.7 file (``Flags`` 0x08, the short trailer) holding one twin pack whose index entry
    has no name (see :func:`bit_file`)."""
    return bit_file(table, data, **{"kind": TWIN_PACK, "minor": 7, "flags": SHORT_TRAILER,
                                    **kw})


def _twin_bytes(**kw: Any) -> Callable[[], bytes]:
    return lambda: twin_file(**kw)


def unsized_meta(json_text: bytes = BIG_META, **frame_kw: Any) -> bytes:
    """The metadata of ``Flags`` 0x07 (spec 5.2, 1.7): the bare frame alone."""
    return bare(meta_frame(json_text, **frame_kw)[len(varint(len(json_text))):])


# -- format 1.6 (spec 5.13, 7.1): tight packs and bare frames

TIGHT_PACK = 0x08


def tight(*members: tuple[bytes, int, int, tuple[int, ...], int, int, int],
          backs: tuple[int, ...] = (0,), scales: tuple[float, ...] = (1.0,)) -> bytes:
    """A tight table (spec 5.13): the columns of :func:`lean` up to column 9, then each
    member's ``Scale_Back`` and the ``scales`` in byte planes (byte 3 of each, ..., byte 0)."""
    raw = [struct.pack("<f", x) for x in scales]
    return (lean(*members, refs=(), scales=()) + b"".join(varint(b) for b in backs)
            + bytes(r[3 - i] for i in range(4) for r in raw))


TIGHT_ONE = tight((b"a", 0, 0x01, (8,), 1, BITMASK, 0))  # 'a' of LEAN_ONE, scale 1.0
TIGHT_G = tight((b"g", 0, 0x01, (8,), 1, GOLOMB, 0))  # 'g' of LEAN_G


def tight_file(table: bytes = TIGHT_ONE, data: bytes = BIT_DATA, **kw: Any) -> bytes:
    """A 1.6 file holding one tight pack whose index entry has no name (see
    :func:`bit_file`)."""
    return bit_file(table, data, **{"kind": TIGHT_PACK, "minor": 6, **kw})


def _tight_bytes(**kw: Any) -> Callable[[], bytes]:
    return lambda: tight_file(**kw)


def bare(frame: bytes) -> bytes:
    """A zstd ``frame`` without its magic number (spec 7.1, 1.6)."""
    assert frame[:4] == b"\x28\xb5\x2f\xfd"
    return frame[4:]


def bare_meta(json_text: bytes = BIG_META) -> bytes:
    """:func:`meta_frame` of ``json_text`` with a bare frame (``Flags`` bit 1, spec 5.2)."""
    size = varint(len(json_text))
    return size + bare(meta_frame(json_text)[len(size):])


def _meta_file(stored: bytes, *, flags: int = 1, minor: int = 2, **kw: Any) -> Callable[[], bytes]:
    return lambda: column_file(flags=flags, minor=minor, metadata=stored, **kw)


def dense_u8_record(name: bytes, value: int = 7) -> bytes:
    """A dense U8 record of one element, alignment 8."""
    body = varint(len(name)) + name + b"\x09\x01\x01" + b"\x01\x05\x00\x00\x01"
    data = bytes([value]) + bytes(7)
    head = b"\x02" + varint(len(body) + 8) + varint(len(data)) + body
    head += struct.pack("<I", crc32(data))
    head += struct.pack("<I", crc32(head))
    return head + bytes(-(len(head)) % 8) + data


def _pack_bytes(**kw: Any) -> Callable[[], bytes]:
    return lambda: pack_file(**kw)


ACCEPTED: list[Accepted] = [
    Accepted("001-minor-version", "Version_Minor 7: a 1.0 decoder reads any minor version.",
             _model("002-spec-example", _minor), lambda: valid_bytes("002-spec-example")),
    Accepted("002-optional-record", "A record of unknown optional kind 0x81 named 'a.a', "
             "listed in the index, skipped by the decoder.",
             _model("019-several-tensors", _add_optional_record),
             lambda: valid_bytes("019-several-tensors")),
    Accepted("003-optional-blocks", "Unknown optional blocks 0x80 (before the positions) and "
             "0xFF (zstd-staged, after the scale), skipped by the decoder.",
             _model("002-spec-example", _add_optional_blocks),
             lambda: valid_bytes("002-spec-example")),
    Accepted("004-noncanonical-metadata", "Metadata with whitespace, unsorted keys, escapes, "
             "an exponent, and an unknown reserved-prefix key.",
             _model("002-spec-example", _noncanonical_metadata),
             lambda: valid_bytes("002-spec-example"),
             metadata=lambda: {"z": [1, 2.5, "é", 100.0], "compeft.future": {"x": 1},
                               "compeft.producer": "spec"}),
    Accepted("005-bitmask-nnz0", "A tensor without nonzeros whose positions are a bitmask of "
             "zeros (the encoder writes an empty golomb block).",
             _model("005-nnz-zero", _bitmask_nnz0), lambda: valid_bytes("005-nnz-zero")),
    Accepted("006-golomb-m5", "Golomb positions with M = 5, where the encoder picks M = 3.",
             _model("002-spec-example", _golomb_m5), lambda: valid_bytes("002-spec-example")),
    Accepted("007-zstd-stages", "The zstd stage where the encoder leaves blocks raw: a "
             "bitmask (in a frame with a content checksum, larger than the raw block), "
             "the signs and the scale.",
             _model("007-bitmask", _odd_stages), lambda: valid_bytes("007-bitmask")),
    Accepted("008-zstd-empty-blocks", "Empty blocks (0 bytes) through the zstd stage: each is "
             "one frame that declares 0 bytes.",
             _model("004-empty-tensors", _empty_zstd), lambda: valid_bytes("004-empty-tensors")),
    # -- format 1.1
    Accepted("009-pack-first-name-spelled-out", "Version 1.1: a pack whose first member's "
             "name is written whole (Prefix_Length 0) instead of coded against the pack's name.",
             _pack_bytes(table=member_entry(b"a", 0)),
             lambda: cf.dumps({"a": TernaryTensor((8,), [0], [False], 1.0)}, version="1.1")),
    Accepted("010-pack-zstd-table-larger", "Version 1.1: a small member table through the "
             "zstd stage (with a content checksum), larger than the raw table.",
             _pack_bytes(table=zstd_frame(ONE, checksum=True), stage=ZSTD, decoded=len(ONE)),
             lambda: cf.dumps({"a": TernaryTensor((8,), [0], [False], 1.0)}, version="1.1")),
    Accepted("011-pack-minor-9", "Version 1.9 with a pack: packs are known from minor 1 on.",
             _pack_bytes(minor=9),
             lambda: cf.dumps({"a": TernaryTensor((8,), [0], [False], 1.0)}, version="1.1")),
    # -- format 1.2
    Accepted("012-metadata-frame-without-dictionary", "Version 1.2: compressed metadata whose "
             "frame was made without the dictionary (it refers to nothing before its own "
             "data, so it decodes the same with it).",
             _meta_file(meta_frame(dictionary=False)),
             lambda: cf.dumps({"a": TernaryTensor((8,), [0], [False], 1.0)},
                              metadata=json.loads(BIG_META))),
    Accepted("013-metadata-compressed-empty", "Version 1.2: Flags bit 0 with a frame of 0 "
             "bytes: the metadata is an empty object.",
             _meta_file(varint(0) + zstd_frame(b"")),
             lambda: cf.dumps({"a": TernaryTensor((8,), [0], [False], 1.0)})),
    Accepted("014-column-pack-param-far", "Version 1.2: a golomb member of 64 elements, 2 "
             "nonzeros, with M = 4 where the prediction is 22 (Param_Delta -18, zigzag 35), and a "
             "2-byte payload where the predicted size is 3 (Size_Delta -1, zigzag 1).",
             _column_bytes(table=columns((b"a", 1, 0x01, (64,), 2, GOLOMB, 35, 1)),
                           data=golomb_encode([5, 40], 4) + b"\x02" + struct.pack("<f", 1.0)),
             lambda: cf.dumps({"a": TernaryTensor((64,), [5, 40], [False, True], 1.0)})),
    Accepted("015-column-pack-minor-9", "Version 1.9 with a column pack and compressed "
             "metadata: both are known from minor 2 on.",
             _meta_file(meta_frame(), minor=9),
             lambda: cf.dumps({"a": TernaryTensor((8,), [0], [False], 1.0)},
                              metadata=json.loads(BIG_META))),
    # -- format 1.3
    Accepted("016-compact-pack-plain-zstd-table", "Version 1.3: a compact pack whose table "
             "goes through the plain zstd stage (Table_Stage 1, no dictionary), where the "
             "encoder uses the name dictionary (stage 2) or none.",
             _compact_bytes(table=zstd_frame(CMP_ONE), stage=ZSTD, decoded=len(CMP_ONE)),
             lambda: cf.dumps({"a": TernaryTensor((8,), [0], [False], 1.0)})),
    Accepted("017-compact-pack-minor-9", "Version 1.9 with a compact pack: compact packs are "
             "known from minor 3 on.", _compact_bytes(minor=9),
             lambda: cf.dumps({"a": TernaryTensor((8,), [0], [False], 1.0)})),
    Accepted("018-compact-pack-stage-2-without-dictionary", "Version 1.3: Table_Stage 2 with "
             "a frame made without the dictionary (it refers to nothing before its own data, "
             "so it decodes the same with it).",
             _compact_bytes(table=names_frame(CMP_ONE, dictionary=False), stage=NAMES_ZSTD,
                            decoded=len(CMP_ONE)),
             lambda: cf.dumps({"a": TernaryTensor((8,), [0], [False], 1.0)})),
    # -- format 1.4: bit packs (spec 5.11) and index entries without a name (spec 5.6)
    Accepted("019-bit-pack-minor-9", "Version 1.9 with a bit pack whose index entry has no "
             "name: both are known from minor 4 on.", _bit_bytes(minor=9),
             lambda: cf.dumps({"a": TernaryTensor((8,), [0], [False], 1.0)})),
    Accepted("020-bit-pack-named-index-entry", "Version 1.4: a bit pack whose index entry has "
             "its name, 'a' (MAY: the reference encoder leaves it out).", _bit_bytes(entry=b"a"),
             lambda: cf.dumps({"a": TernaryTensor((8,), [0], [False], 1.0)})),
    Accepted("021-bit-pack-golomb-member", "Version 1.4: a golomb member whose 3-bit stream is "
             "one bit shorter than predicted (Size_Delta -1), its sign bit right after it.",
             _bit_bytes(table=BIT_G, data=BIT_G_DATA),
             lambda: cf.dumps({"g": TernaryTensor((8,), [0], [False], 1.0)})),
    Accepted("022-bit-pack-two-packs", "Version 1.4: two bit packs, 'a' (bitmask) and 'g' "
             "(golomb), both index entries without a name.",
             _bit_bytes(after=[(b"", bit_record(BIT_G, BIT_G_DATA))]),
             lambda: cf.dumps({"a": TernaryTensor((8,), [0], [False], 1.0),
                               "g": TernaryTensor((8,), [0], [False], 1.0)})),
    # -- format 1.5: lean packs (spec 5.12)
    Accepted("023-lean-pack-minor-9", "Version 1.9 with a lean pack: lean packs are known "
             "from minor 5 on.", _lean_bytes(minor=9),
             lambda: cf.dumps({"a": TernaryTensor((8,), [0], [False], 1.0)})),
    Accepted("024-lean-pack-bitmask-and-golomb", "Version 1.5: 'a' (8 bitmask bits, a sign "
             "bit) then 'g' (its 3-bit golomb stream read to its one bit, then its sign bit) "
             "in one lean pack: bytes 01 08.",
             _lean_bytes(table=lean((b"a", 0, 0x01, (8,), 1, BITMASK, 0),
                                    (b"g", 0, 0x01, (8,), 1, GOLOMB, 0), refs=(0, 0)),
                         count=2, data=b"\x01\x08"),
             lambda: cf.dumps({"a": TernaryTensor((8,), [0], [False], 1.0),
                               "g": TernaryTensor((8,), [0], [False], 1.0)})),
    # -- format 1.6: tight packs (spec 5.13) and bare frames (spec 7.1)
    Accepted("025-tight-pack-minor-9", "Version 1.9 with a tight pack: tight packs are known "
             "from minor 6 on.", _tight_bytes(minor=9),
             lambda: cf.dumps({"a": TernaryTensor((8,), [0], [False], 1.0)})),
    Accepted("026-tight-pack-scale-stored-twice", "Version 1.6: 'a' and 'g' of 024 with the "
             "same scale 1.0 stored twice (both Scale_Back 0); the reference encoder writes "
             "it once, 'g' with Scale_Back 1.",
             _tight_bytes(table=tight((b"a", 0, 0x01, (8,), 1, BITMASK, 0),
                                      (b"g", 0, 0x01, (8,), 1, GOLOMB, 0), backs=(0, 0),
                                      scales=(1.0, 1.0)),
                          count=2, data=b"\x01\x08"),
             lambda: cf.dumps({"a": TernaryTensor((8,), [0], [False], 1.0),
                               "g": TernaryTensor((8,), [0], [False], 1.0)})),
    Accepted("027-tight-pack-metadata-frame-with-magic", "Version 1.6 with compressed metadata "
             "(Flags 0x01) whose frame keeps its magic number, as 1.2 to 1.5 store it: only "
             "Flags bit 1 makes it bare.",
             _tight_bytes(flags=1, metadata=meta_frame()),
             lambda: cf.dumps({"a": TernaryTensor((8,), [0], [False], 1.0)},
                              metadata=json.loads(BIG_META))),
    Accepted("028-tight-pack-table-stage-1", "Version 1.6: a tight pack whose table is a bare "
             "zstd frame without the name dictionary (Table_Stage 1); the reference encoder "
             "uses stage 2.",
             _tight_bytes(table=bare(zstd_frame(TIGHT_ONE)), stage=0x01,
                          decoded=len(TIGHT_ONE)),
             lambda: cf.dumps({"a": TernaryTensor((8,), [0], [False], 1.0)})),
    # -- format 1.7: twin packs (spec 5.14), unsized bare frames (7.1), the short trailer (5.7)
    Accepted("029-twin-pack-streams-stored-twice", "Version 1.7: 'a' and 'b' with the same "
             "streams, both stored (Twin_Back 0 0); the reference encoder makes 'b' a twin.",
             _twin_bytes(table=twin((b"a", 0, 0x01, (8,), 1, BITMASK, 0, 0),
                                    (b"b", 0, 0x01, (8,), 1, BITMASK, 0, 0), backs=(0, 1)),
                         count=2, data=b"\x01\x02\x00"),
             lambda: cf.dumps({"a": TernaryTensor((8,), [0], [False], 1.0),
                               "b": TernaryTensor((8,), [0], [False], 1.0)})),
    Accepted("030-twin-pack-twin-of-the-nearer", "Version 1.7: 'a' and 'b' stored with the "
             "same streams and 'c' the twin of 'b' (Twin_Back 1); the reference encoder "
             "makes 'b' and 'c' twins of 'a'.",
             _twin_bytes(table=twin((b"a", 0, 0x01, (8,), 1, BITMASK, 0, 0),
                                    (b"b", 0, 0x01, (8,), 1, BITMASK, 0, 0),
                                    (b"c", 0, 0x01, (8,), 0, 0, 0, 1), backs=(0, 1, 1)),
                         count=3, data=b"\x01\x02\x00"),
             lambda: cf.dumps({k: TernaryTensor((8,), [0], [False], 1.0) for k in "abc"})),
    Accepted("031-1-7-long-trailer", "Version 1.7 with Flags 0: a twin pack and the 16-byte "
             "trailer of 1.0 (the reference encoder sets Flags bit 3 and writes 12 bytes).",
             _twin_bytes(flags=0),
             lambda: cf.dumps({"a": TernaryTensor((8,), [0], [False], 1.0)})),
    Accepted("032-1-7-sized-bare-metadata", "Version 1.7 with Flags 0x0b: a bare metadata "
             "frame with Metadata_Decoded_Size in front of it, as 1.6 stores it (only Flags "
             "bit 2 leaves it out).",
             _twin_bytes(flags=0x0B, metadata=bare_meta()),
             lambda: cf.dumps({"a": TernaryTensor((8,), [0], [False], 1.0)},
                              metadata=json.loads(BIG_META))),
    Accepted("033-twin-pack-table-stage-1", "Version 1.7: a twin pack whose table is a bare "
             "zstd frame without the name dictionary (Table_Stage 1) and without "
             "Table_Decoded_Size: its twin 'b' reads 'a''s streams.",
             _twin_bytes(table=bare(zstd_frame(TWIN_AB)), stage=0x01, count=2),
             lambda: cf.dumps({"a": TernaryTensor((8,), [0], [False], 1.0),
                               "b": TernaryTensor((2, 4), [0], [False], 1.0)})),
]


# ---------------------------------------------------------------------------------------------
# Invalid vectors: one or more per rule of spec §9.1
# ---------------------------------------------------------------------------------------------

SAME = "same"


@dataclass
class Invalid:
    """An invalid file and the rule each read path reports.

    ``rule`` is what ``loads`` reports (None: loads accepts the file, which only a reader
    limit of the random-access path can cause). ``stream`` and ``random`` give the rule of
    ``iter_stream`` and of ``open_file`` plus ``get`` of every tensor: ``SAME`` as ``rule``,
    another rule ID, or None where that path accepts the file.
    """

    slug: str
    description: str
    rule: str | None
    build: Callable[[], bytes]
    random: str | None = SAME
    stream: str | None = SAME
    limits: dict[str, int] | None = None


def mutate(slug: str, fn: Callable[[File], Any]) -> Callable[[], bytes]:
    """Return a builder: the valid vector ``slug``, changed by ``fn``, serialized."""
    def build() -> bytes:
        f = base(slug)
        fn(f)
        return f.serialize()
    return build


def raw(fn: Callable[[], bytes]) -> Callable[[], bytes]:
    """Return ``fn`` unchanged (a builder of raw bytes, for symmetry with :func:`mutate`)."""
    return fn


EX = "002-spec-example"  # one ternary record 'w' (golomb M = 3), metadata
BMP = "007-bitmask"  # one ternary record 'm' (bitmask, numel 35)
TWO = "017-alignment-1"  # records 'a' (ternary) and 'b' (dense), alignment 1
DT = "014-dense-dtypes"  # one dense record per dtype
ZS = "015-dense-zstd"  # dense 'ramp' (zstd), 'small' (raw), 'zeros' (zstd)
NNZ0 = "005-nnz-zero"  # ternary 'scaled' and 'zero' without nonzeros
EMPTY = "004-empty-tensors"


def _set(obj: Any, **fields: Any) -> Callable[[File], None]:
    """Return a mutation that sets ``fields`` on ``obj(file)``."""
    def fn(f: File) -> None:
        target = obj(f)
        for k, v in fields.items():
            setattr(target, k, v)
    return fn


def _file(f: File) -> File:
    return f


def _rec(name: str) -> Callable[[File], Record]:
    return lambda f: rec(f, name)


def _blk(name: str, btype: int) -> Callable[[File], Block]:
    return lambda f: blk(f, name, btype)


def _meta(text: bytes) -> Callable[[], bytes]:
    return mutate(EX, _set(_file, metadata=text))


def _name(name: bytes) -> Callable[[File], None]:
    def fn(f: File) -> None:
        f.records[0].name = name  # the index takes the same name
    return fn


def _body(name: str, build_body: Callable[[Record], bytes]) -> Callable[[File], None]:
    def fn(f: File) -> None:
        r = rec(f, name)
        r.body = build_body(r)
    return fn


def _descs(r: Record) -> bytes:
    return bytes([len(r.blocks)]) + b"".join(b.descriptor() for b in r.blocks)


def _dims_body(ndim: int, dims: list[int]) -> Callable[[Record], bytes]:
    def body(r: Record) -> bytes:
        out = varint(len(r.name)) + r.name + bytes([r.dtype, ndim])
        out += b"".join(varint(d) for d in dims) + varint(r.nnz or 0)
        return out + _descs(r)
    return body


def _swap_records(f: File) -> None:
    f.records.reverse()


def _dup_names(f: File) -> None:
    f.records[1].name = f.records[0].name


def _cut(slug: str, keep: Callable[[bytes], int]) -> Callable[[], bytes]:
    def build() -> bytes:
        data = valid_bytes(slug)
        return data[: keep(data)]
    return build


def _bomb() -> bytes:
    """A 2 KB file whose dense block claims 64 MiB + 1 decoded bytes (a real zstd frame)."""
    n = 64 * 2**20 + 1
    f = File(records=[Record(KIND_DENSE, b"bomb", dtype=0x09, dims=[n])])
    f.records[0].blocks = [Block(DENSE, ZSTD, 0, zstd_frame(bytes(n)), n)]
    return f.serialize()


def _golomb_payload(payload: bytes, param: int | None = None) -> Callable[[File], None]:
    def fn(f: File) -> None:
        b = blk(f, "w", GOLOMB)
        b.stored, b.decoded_size = payload, len(payload)
        if param is not None:
            b.param = param
    return fn


def _index_offset(delta: Callable[[File, bytes], int], fix_crc: bool) -> Callable[[File], None]:
    def fn(f: File) -> None:
        data = f.serialize()
        f.index_offset = delta(f, data)
        if fix_crc:
            fix_index_crc(f)
    return fn


def _offsets(f: File) -> list[int]:
    """Return the record offsets of ``f`` as serialized (from its index)."""
    data = f.serialize()
    index_at = struct.unpack("<Q", data[-16:-8])[0]
    pos, out = index_at + 1, []
    count, pos = _read_varint(data, pos)
    for _ in range(count):
        n, pos = _read_varint(data, pos)
        pos += n
        off, pos = _read_varint(data, pos)
        out.append(off)
    return out


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def _entries(fn: Callable[[list[tuple[bytes, int]], int], list[tuple[bytes, int]]]
             ) -> Callable[[File], None]:
    """Return a mutation that rewrites the index entries from the true ones and Index_Offset."""
    def mutation(f: File) -> None:
        data = f.serialize()
        index_at = struct.unpack("<Q", data[-16:-8])[0]
        true = [(r.name, off) for r, off in zip(f.records, _offsets(f), strict=True)]
        f.index_entries = fn(true, index_at)
    return mutation


def _flip_kind(f: File) -> None:
    r = f.records[0]
    r.header_crc = crc32(_record_header_bytes(f, 0))  # the checksum of the unflipped header
    r.kind ^= 0x80


def _record_header_bytes(f: File, i: int) -> bytes:
    """Return record ``i``'s header bytes from Record_Kind to Data_Checksum."""
    data = f.serialize()
    off = _offsets(f)[i]
    r = f.records[i]
    head = bytes([r.kind]) + varint(len(r.build_body()) + 8)
    head += varint(len(r.build_data(f.alignment))) + r.build_body()
    assert data[off : off + len(head)] == head
    return data[off : off + len(head) + 4]


def _hole(f: File) -> None:
    f.records[0].after = bytes(8)  # the index gives the offsets with the hole in place


def _index_at(data: bytes) -> int:
    return struct.unpack("<Q", data[-16:-8])[0]


def _index_bytes(f: File) -> bytes:
    data = f.serialize()
    return data[_index_at(data) : -16]


def _scale_payload(value: bytes) -> Callable[[File], None]:
    return _set(_blk("w", SCALE), stored=value, decoded_size=len(value))


def _zstd_dense(name: str, fn: Callable[[Block], None]) -> Callable[[File], None]:
    def mutation(f: File) -> None:
        fn(blk(f, name, DENSE))
    return mutation


def _reserved_zstd_block(b: Block) -> None:
    """Give the frame's first block the Reserved Block_Type 3 (RFC 8878 3.1.1.2)."""
    frame = bytearray(b.stored)
    fhd = frame[4]
    fcs = (0, 2, 4, 8)[fhd >> 6] or (1 if fhd & 0x20 else 0)
    at = 5 + (0 if fhd & 0x20 else 1) + (0, 1, 2, 4)[fhd & 3] + fcs
    frame[at] |= 0x06
    b.stored = bytes(frame)


def _skippable(b: Block) -> None:
    b.stage, b.stored, b.decoded_size = ZSTD, b"\x50\x2a\x4d\x18" + struct.pack("<I", 2) + b"hi", 0


def _empty_frame_plus(b: Block) -> None:
    b.stage, b.stored, b.decoded_size = ZSTD, zstd_frame(b"") + b"hidden", 0


def _bitmask_bits(change: Callable[[bytearray], None]) -> Callable[[File], None]:
    def fn(f: File) -> None:
        b = blk(f, "m", BITMASK)
        payload = bytearray(b.stored)
        change(payload)
        b.stored = bytes(payload)
    return fn


def _xor(i: int, mask: int) -> Callable[[bytearray], None]:
    def change(p: bytearray) -> None:
        p[i] ^= mask
    return change


INVALID: list[Invalid] = [
    # -- R-EOF-1: structures past the end
    Invalid("001-empty-input", "A file of 0 bytes.", "R-EOF-1", raw(lambda: b"")),
    Invalid("002-cut-in-header", "The first 12 bytes of a file (a prefix of the magic and "
            "more).", "R-EOF-1", _cut(EX, lambda d: 12)),
    Invalid("003-cut-in-metadata", "Cut inside the metadata.", "R-EOF-1", _cut(EX, lambda d: 30)),
    Invalid("004-cut-in-record-header", "Cut inside the first record header.", "R-EOF-1",
            _cut(EX, lambda d: 70), random="R-TRL-2"),
    Invalid("005-cut-in-data", "Cut inside the first record's data area.", "R-EOF-1",
            _cut(EX, lambda d: 90), random="R-TRL-2"),
    Invalid("006-cut-in-trailer", "The last 5 bytes of the trailer missing.", "R-EOF-1",
            _cut(EX, lambda d: len(d) - 5), random="R-TRL-2"),
    Invalid("007-cut-after-header", "The header and its padding only: no index, no trailer.",
            "R-EOF-1", _cut(EX, lambda d: 48), random="R-TRL-7"),
    # -- R-VAR-*: VarInts
    Invalid("008-varint-not-minimal", "Name_Length written as 81 00 (1 in two bytes).",
            "R-VAR-1", mutate(EX, _body("w", lambda r: b"\x81\x00" + r.build_body()[1:]))),
    Invalid("009-varint-not-minimal-count", "Tensor_Count written as 81 80 00 (1 in three "
            "bytes).", "R-VAR-1", mutate(EX, lambda f: setattr(
                f, "index", b"\x00\x81\x80\x00\x01w" + varint(_offsets(f)[0])))),
    Invalid("010-varint-too-large", "A dimension of 2**63 (ten bytes 80 .. 80 01).", "R-VAR-2",
            mutate(EX, _body("w", _dims_body(2, [2**63, 8])))),
    Invalid("011-varint-too-long", "Data_Size as eleven bytes FF x 10, 01.", "R-VAR-3",
            mutate(EX, _set(_rec("w"), data_size_raw=b"\xff" * 10 + b"\x01"))),
    # -- R-HDR-*: the file header
    Invalid("012-bad-magic", "A PNG signature instead of the compeft magic.", "R-HDR-1",
            mutate(EX, _set(_file, magic=b"\x89PNG\r\n\x1a\n"))),
    Invalid("013-not-compeft-short", "Four bytes of a ZIP file: shorter than a header and not "
            "a prefix of the magic.", "R-HDR-1", raw(lambda: b"PK\x03\x04"),
            stream="R-EOF-1"),
    Invalid("014-major-version-2", "Version_Major 2.", "R-HDR-2",
            mutate(EX, _set(_file, major=2))),
    Invalid("015-major-version-0", "Version_Major 0.", "R-HDR-2",
            mutate(EX, _set(_file, major=0))),
    Invalid("016-alignment-log2-13", "Alignment_Log2 13 (8192).", "R-HDR-3",
            mutate(EX, _set(_file, log2=13))),
    Invalid("017-header-flags", "Flags 0x01.", "R-HDR-4", mutate(EX, _set(_file, flags=1))),
    Invalid("018-metadata-size-lies", "Metadata_Size 0xFFFFFFFF in a 125-byte file: rejected "
            "before any read.", "R-HDR-5", mutate(EX, _set(_file, metadata_size=0xFFFFFFFF))),
    Invalid("019-metadata-size-limit", "27 bytes of metadata read with max_metadata_size 26.",
            "R-HDR-5", raw(lambda: valid_bytes(EX)), limits={"max_metadata_size": 26}),
    Invalid("020-header-checksum", "Header_Checksum off by one bit.", "R-HDR-6",
            mutate(EX, lambda f: setattr(f, "header_crc",
                                         crc32(f.serialize()[: 16 + len(f.metadata)]) ^ 1))),
    Invalid("021-header-padding", "A header padding byte of 0x01.", "R-HDR-7",
            mutate(EX, _set(_file, header_pad_byte=1))),
    # -- R-META-*: metadata
    Invalid("022-metadata-not-utf8", "Metadata holding the byte 0xFF.", "R-META-1",
            _meta(b'{"a":"\xff"}')),
    Invalid("023-metadata-syntax", "Metadata with a trailing comma.", "R-META-2",
            _meta(b'{"a":1,}')),
    Invalid("024-metadata-duplicate-key", "An object with the key 'a' twice.", "R-META-3",
            _meta(b'{"a":1,"a":2}')),
    Invalid("025-metadata-nan", "The token NaN.", "R-META-4", _meta(b'{"a":NaN}')),
    Invalid("026-metadata-overflow", "The number 1e400, infinite as a binary64.", "R-META-4",
            _meta(b'{"a":1e400}')),
    Invalid("027-metadata-not-object", "A JSON array at the top.", "R-META-5", _meta(b"[1,2]")),
    Invalid("028-metadata-too-deep", "Objects nested 65 deep.", "R-META-6",
            _meta(b'{"a":' * 65 + b"1" + b"}" * 65)),
    Invalid("029-metadata-very-deep", "Arrays nested 5000 deep (beyond the recursion limit of "
            "a recursive parser).", "R-META-6", _meta(b"[" * 5000 + b"]" * 5000)),
    Invalid("030-producer-not-string", "compeft.producer is a number.", "R-META-7",
            _meta(b'{"compeft.producer":1}')),
    Invalid("031-compression-not-object", "compeft.compression is a string.", "R-META-8",
            _meta(b'{"compeft.compression":"compeft"}')),
    Invalid("032-base-not-object", "compeft.base is an array.", "R-META-9",
            _meta(b'{"compeft.base":["org/model"]}')),
    Invalid("033-base-name-not-string", "compeft.base.name is a number.", "R-META-10",
            _meta(b'{"compeft.base":{"name":7}}')),
    Invalid("034-base-revision-not-string", "compeft.base.revision is null.", "R-META-10",
            _meta(b'{"compeft.base":{"revision":null}}')),
    Invalid("035-base-hashes-not-strings", "A value of compeft.base.hashes is a number.",
            "R-META-11", _meta(b'{"compeft.base":{"hashes":{"a":1}}}')),
    # -- R-REC-*: record framing
    Invalid("036-record-kind-3", "Record_Kind 0x03 (unknown, bit 7 clear).", "R-REC-1",
            mutate(EX, _set(_rec("w"), kind=0x03))),
    Invalid("037-record-kind-7f", "Record_Kind 0x7F (unknown, bit 7 clear).", "R-REC-1",
            mutate(EX, _set(_rec("w"), kind=0x7F))),
    Invalid("038-too-many-records", "Two records read with max_tensors 1.", "R-REC-2",
            raw(lambda: valid_bytes(TWO)), random="R-IDX-1", limits={"max_tensors": 1}),
    Invalid("039-header-length-7", "Header_Length 7, below the two checksums.", "R-REC-3",
            mutate(EX, _set(_rec("w"), header_length=7))),
    Invalid("040-header-length-65537", "Header_Length 65537.", "R-REC-3",
            mutate(EX, _set(_rec("w"), header_length=65537))),
    Invalid("041-record-header-checksum", "A record Header_Checksum of 0.", "R-REC-4",
            mutate(EX, _set(_rec("w"), header_crc=0))),
    Invalid("042-record-header-extra-byte", "One byte after the last Block_Descriptor.",
            "R-REC-5", mutate(EX, _set(_rec("w"), body_extra=b"\x00"))),
    Invalid("043-data-size-mismatch", "Data_Size 8 more than the blocks' aligned sizes.",
            "R-REC-6", mutate(EX, _set(_rec("w"), data_size=32))),
    Invalid("044-names-decrease", "Records 'b' then 'a'.", "R-REC-7", mutate(TWO, _swap_records),
            random="R-IDX-6"),
    Invalid("045-names-repeat", "Two records named 'a'.", "R-REC-7", mutate(TWO, _dup_names),
            random="R-IDX-6"),
    Invalid("046-record-padding", "A record padding byte of 0x01.", "R-REC-8",
            mutate(EX, _set(_rec("w"), pad_byte=1))),
    Invalid("047-data-checksum", "A Data_Checksum of 0.", "R-REC-9",
            mutate(EX, _set(_rec("w"), data_crc=0))),
    Invalid("048-optional-record-data-checksum", "A skipped optional record (kind 0x81) whose "
            "Data_Checksum is wrong; the random-access path never reads it.", "R-REC-10",
            mutate(TWO, lambda f: f.records.insert(1, Record(
                0x81, b"a.x", body=b"\x03a.x", data=b"12345678", data_crc=0))),
            random=None),
    # -- R-NAME-*: names
    Invalid("049-name-empty", "A record whose Name_Length is 0.", "R-NAME-1",
            mutate(EX, _name(b""))),
    Invalid("050-name-4097", "A name of 4097 bytes (max_name_length is 4096).", "R-NAME-1",
            mutate(EX, _name(b"n" * 4097))),
    Invalid("051-index-name-empty", "An index entry whose Name_Length is 0.", "R-NAME-1",
            mutate(EX, _entries(lambda e, i: [(b"", e[0][1])]))),
    Invalid("052-name-not-utf8", "A name holding the byte 0xFF.", "R-NAME-2",
            mutate(EX, _name(b"w\xff"))),
    Invalid("053-name-nul", "A name holding U+0000.", "R-NAME-3", mutate(EX, _name(b"w\x00x"))),
    # -- R-BODY-*: dtype, shape, nnz
    Invalid("054-dtype-unknown", "Dtype code 0x10.", "R-BODY-1",
            mutate(EX, _set(_rec("w"), dtype=0x10))),
    Invalid("055-dtype-zero", "Dtype code 0x00.", "R-BODY-1",
            mutate(EX, _set(_rec("w"), dtype=0x00))),
    Invalid("056-ternary-int-dtype", "A ternary record with Dtype I8.", "R-BODY-2",
            mutate(EX, _set(_rec("w"), dtype=0x05))),
    Invalid("057-ndim-17", "Ndim 17 (max_ndim is 16).", "R-BODY-3",
            mutate(EX, _body("w", _dims_body(17, [1] * 16 + [16])))),
    Invalid("058-numel-2-49", "Dimensions 2**25 x 2**24: 2**49 elements (max_numel 2**48).",
            "R-BODY-4", mutate(EX, _set(_rec("w"), dims=[2**25, 2**24]))),
    Invalid("059-numel-product-huge", "Dimensions (2**63 - 1) x (2**63 - 1): numel is computed "
            "exactly, without wrapping.", "R-BODY-4",
            mutate(EX, _set(_rec("w"), dims=[2**63 - 1, 2**63 - 1]))),
    Invalid("060-nnz-above-numel", "Nnz 17 in a 2x8 tensor.", "R-BODY-5",
            mutate(EX, _set(_rec("w"), nnz=17))),
    # -- R-BLK-*: descriptors and block sets
    Invalid("061-stage-2", "Stage 2 on the signs block.", "R-BLK-1",
            mutate(EX, _set(_blk("w", SIGNS), stage=2))),
    Invalid("062-block-type-6", "An extra block of unknown required type 0x06.", "R-BLK-2",
            mutate(EX, lambda f: rec(f, "w").blocks.append(Block(0x06, 0, 0, b"x", 1)))),
    Invalid("063-block-type-0", "An extra block of type 0x00 before the positions.", "R-BLK-2",
            mutate(EX, lambda f: rec(f, "w").blocks.insert(0, Block(0x00, 0, 0, b"", 0)))),
    Invalid("064-blocks-out-of-order", "Signs before positions.", "R-BLK-3",
            mutate(EX, lambda f: rec(f, "w").blocks.reverse())),
    Invalid("065-ternary-without-scale", "A ternary record without its scale block.", "R-BLK-3",
            mutate(EX, lambda f: rec(f, "w").blocks.pop())),
    Invalid("066-dense-with-bitmask", "A dense record whose block is a bitmask.", "R-BLK-3",
            mutate(DT, _set(_blk("u8", DENSE), type=BITMASK))),
    Invalid("067-two-positions-blocks", "A ternary record with a bitmask and a golomb block.",
            "R-BLK-3", mutate(EX, lambda f: rec(f, "w").blocks.insert(
                0, Block(BITMASK, 0, 0, b"\x09\x40", 2)))),
    Invalid("068-block-padding", "A block padding byte of 0x01.", "R-BLK-4",
            mutate(EX, _set(_blk("w", GOLOMB), pad_byte=1))),
    # -- R-BMP-*: bitmask blocks
    Invalid("069-bitmask-param", "A bitmask block with Param 1.", "R-BMP-1",
            mutate(BMP, _set(_blk("m", BITMASK), param=1))),
    Invalid("070-bitmask-short", "A bitmask of 4 bytes for 35 elements.", "R-BMP-2",
            mutate(BMP, lambda f: setattr(blk(f, "m", BITMASK), "stored",
                                          blk(f, "m", BITMASK).stored[:4]))),
    Invalid("071-bitmask-padding-bit", "Bit 35 (a padding bit) set.", "R-BMP-3",
            mutate(BMP, _bitmask_bits(_xor(4, 0x08)))),
    Invalid("072-bitmask-popcount", "One position bit cleared: 8 bits set, Nnz 9.", "R-BMP-4",
            mutate(BMP, _bitmask_bits(_xor(0, 0x01)))),
    # -- R-GOL-*: golomb blocks (the example: nnz 3, numel 16, M = 3, payload 6e 04)
    Invalid("073-golomb-m0", "M = 0.", "R-GOL-1", mutate(EX, _set(_blk("w", GOLOMB), param=0))),
    Invalid("074-golomb-m-above-numel", "M = 17 in a 16-element tensor.", "R-GOL-1",
            mutate(EX, _set(_blk("w", GOLOMB), param=17))),
    Invalid("075-golomb-nnz0-m2", "No nonzeros but M = 2.", "R-GOL-2",
            mutate(NNZ0, _set(_blk("zero", GOLOMB), param=2))),
    Invalid("076-golomb-nnz0-bytes", "No nonzeros but a 1-byte golomb block.", "R-GOL-2",
            mutate(NNZ0, _set(_blk("zero", GOLOMB), stored=b"\x01"))),
    Invalid("077-golomb-too-short-for-planes", "An empty golomb block for 3 nonzeros.",
            "R-GOL-3", mutate(EX, _golomb_payload(b""))),
    Invalid("078-golomb-too-short-for-extension", "1 byte: three long codes need 3 plane + 3 "
            "extension + 3 unary bits.", "R-GOL-4", mutate(EX, _golomb_payload(b"\x07"))),
    Invalid("079-golomb-extra-one", "A one bit in the padding: 4 unary codes for Nnz 3.",
            "R-GOL-5", mutate(EX, _golomb_payload(b"\x6e\x84"))),
    Invalid("080-golomb-trailing-byte", "A zero byte after the stream.", "R-GOL-6",
            mutate(EX, _golomb_payload(b"\x6e\x04\x00"))),
    Invalid("081-golomb-past-numel", "The last gap 13 instead of 10: position 17 in 16 "
            "elements.", "R-GOL-7", mutate(EX, _golomb_payload(b"\x6e\x08"))),
    # -- R-SGN-*: signs blocks
    Invalid("082-signs-param", "A signs block with Param 1.", "R-SGN-1",
            mutate(EX, _set(_blk("w", SIGNS), param=1))),
    Invalid("083-signs-long", "A signs block of 2 bytes for 3 signs.", "R-SGN-2",
            mutate(EX, _set(_blk("w", SIGNS), stored=b"\x02\x00"))),
    Invalid("084-signs-padding-bit", "Bit 3 (a padding bit) of the signs set.", "R-SGN-3",
            mutate(EX, _set(_blk("w", SIGNS), stored=b"\x0a"))),
    # -- R-SCL-*: scale blocks
    Invalid("085-scale-dtype-1", "Scale_Dtype 1 (Reserved for per-row scales).", "R-SCL-1",
            mutate(EX, _set(_blk("w", SCALE), param=1))),
    Invalid("086-scale-3-bytes", "A scale block of 3 bytes.", "R-SCL-2",
            mutate(EX, _scale_payload(b"\x00\x00\x00"))),
    Invalid("087-scale-negative", "Scale -0.5.", "R-SCL-3", mutate(EX, _scale_payload(
        ternary_scale(-0.5)))),
    Invalid("088-scale-negative-zero", "Scale -0.0 (sign bit set).", "R-SCL-3",
            mutate(EX, _scale_payload(ternary_scale(-0.0)))),
    Invalid("089-scale-nan", "Scale NaN.", "R-SCL-3",
            mutate(EX, _scale_payload(b"\x00\x00\xc0\x7f"))),
    Invalid("090-scale-infinity", "Scale +infinity.", "R-SCL-3",
            mutate(EX, _scale_payload(b"\x00\x00\x80\x7f"))),
    # -- R-DNS-*: dense blocks
    Invalid("091-dense-param", "A dense block with Param 1.", "R-DNS-1",
            mutate(DT, _set(_blk("u8", DENSE), param=1))),
    Invalid("092-dense-short", "A 2x3 I16 dense block of 11 bytes.", "R-DNS-2",
            mutate(DT, lambda f: setattr(blk(f, "i16", DENSE), "stored",
                                         blk(f, "i16", DENSE).stored[:11]))),
    Invalid("093-dense-bool-2", "A BOOL byte of 0x02.", "R-DNS-3",
            mutate(DT, _set(_blk("bool", DENSE), stored=b"\x01\x00\x02\x01\x00\x00"))),
    # -- R-ZST-*: the zstd stage
    Invalid("094-zstd-decoded-above-bound", "Decoded_Size 4097 for a 32x32 F32 block (bound "
            "4096).", "R-ZST-1", mutate(ZS, _set(_blk("ramp", DENSE), decoded_size=4097))),
    Invalid("095-zstd-bound-bitmask", "Decoded_Size 10**12 for a 64x64 bitmask (bound 512).",
            "R-ZST-1", mutate("012-bitmask-zstd", _set(_blk("z", BITMASK),
                                                       decoded_size=10**12))),
    Invalid("096-zstd-not-a-frame", "Stored bytes that are not a zstd frame.", "R-ZST-2",
            mutate(ZS, _set(_blk("ramp", DENSE), stored=b"not a zstd frame"))),
    Invalid("097-zstd-skippable-frame", "An empty block whose stored bytes are a skippable "
            "frame.", "R-ZST-2", mutate(EMPTY, _zstd_dense("c", _skippable))),
    Invalid("098-zstd-size-mismatch", "Decoded_Size 4095, the frame declares 4096.", "R-ZST-3",
            mutate(ZS, _set(_blk("ramp", DENSE), decoded_size=4095))),
    Invalid("099-zstd-no-content-size", "A frame that does not declare its content size.",
            "R-ZST-3", mutate(ZS, _zstd_dense("ramp", lambda b: setattr(
                b, "stored", zstd_frame(bytes(np.arange(1024, dtype=np.float32) % 7),
                                        content_size=False))))),
    Invalid("100-zstd-trailing-byte", "One byte after the frame.", "R-ZST-4",
            mutate(ZS, _zstd_dense("ramp", lambda b: setattr(b, "stored", b.stored + b"\x00")))),
    Invalid("101-zstd-cut-frame", "The frame without its last 3 bytes.", "R-ZST-4",
            mutate(ZS, _zstd_dense("ramp", lambda b: setattr(b, "stored", b.stored[:-3])))),
    Invalid("102-zstd-empty-frame-plus-bytes", "An empty block: a frame declaring 0 bytes, then "
            "6 hidden bytes.", "R-ZST-4", mutate(EMPTY, _zstd_dense("c", _empty_frame_plus))),
    Invalid("103-zstd-corrupt-frame", "A frame whose first block has the Reserved block type "
            "3.", "R-ZST-5", mutate(ZS, _zstd_dense("ramp", _reserved_zstd_block))),
    # -- R-LIM-1: the decode budget
    Invalid("104-zstd-bomb", "A 2 KB file whose U8 dense block decodes to 64 MiB + 1 bytes: "
            "above the default budget max(64 MiB, 64 x file size).", "R-LIM-1", raw(_bomb)),
    Invalid("105-budget-limit", "The 64x64 bitmask file read with max_decoded_bytes 1000.",
            "R-LIM-1", raw(lambda: valid_bytes("012-bitmask-zstd")),
            limits={"max_decoded_bytes": 1000}),
    # -- R-IDX-*: the index
    Invalid("106-index-count-huge", "Tensor_Count 2**40.", "R-IDX-1",
            mutate(EX, _set(_file, index_count=2**40))),
    Invalid("107-index-wrong-offset", "The index gives the record's offset + 8.", "R-IDX-2",
            mutate(EX, _entries(lambda e, i: [(e[0][0], e[0][1] + 8)])), random="R-IDX-7"),
    Invalid("108-index-empty", "An empty index for a file with one record.", "R-IDX-2",
            mutate(EX, _entries(lambda e, i: [])), random="R-IDX-9"),
    Invalid("109-index-size-limit", "A valid file read with max_index_size 4 (its index is 8 "
            "bytes); only the random-access path bounds the index size.", None,
            raw(lambda: valid_bytes(TWO)), random="R-IDX-3", stream=None,
            limits={"max_index_size": 4}),
    Invalid("110-index-offset-at-record", "Index_Offset (and Index_Checksum) point at the "
            "second record, whose first byte is 0x02, not 0x00.", "R-TRL-3",
            mutate(TWO, _index_offset(lambda f, d: _offsets(f)[1], fix_crc=True)),
            random="R-IDX-4"),
    Invalid("111-index-extra-byte", "A byte between the index entries and the trailer.",
            "R-TRL-1", mutate(TWO, lambda f: setattr(f, "index", _index_bytes(f) + b"\x00")),
            random="R-IDX-5"),
    Invalid("112-index-names-decrease", "Index entries 'b' then 'a', records 'a' then 'b'.",
            "R-IDX-2", mutate(TWO, _entries(lambda e, i: [(e[1][0], e[0][1]),
                                                          (e[0][0], e[1][1])])),
            random="R-IDX-6"),
    Invalid("113-index-offsets-repeat", "Both entries give the first record's offset.",
            "R-IDX-2", mutate(TWO, _entries(lambda e, i: [e[0], (e[1][0], e[0][1])])),
            random="R-IDX-7"),
    Invalid("114-index-offset-past-index", "The second entry's offset is Index_Offset.",
            "R-IDX-2", mutate(TWO, _entries(lambda e, i: [e[0], (e[1][0], i)])),
            random="R-IDX-8"),
    Invalid("115-index-name-differs", "The index names the second record 'c'; it is 'b'.",
            "R-IDX-2", mutate(TWO, _entries(lambda e, i: [e[0], (b"c", e[1][1])])),
            random="R-IDX-10"),
    Invalid("116-index-offset-inside-record", "The second entry's offset is 8 bytes into the "
            "second record.", "R-IDX-2",
            mutate(TWO, _entries(lambda e, i: [e[0], (e[1][0], e[1][1] + 8)])),
            random="R-IDX-11"),
    Invalid("117-hole-between-records", "8 zero bytes between two records (a hole).",
            "R-IDX-2", mutate(TWO, _hole), random="R-IDX-11"),
    # -- R-TRL-*: the trailer
    Invalid("118-tail-magic", "Tail_Magic 'CPFX'.", "R-TRL-1",
            mutate(EX, _set(_file, tail=b"CPFX")), random="R-TRL-2"),
    Invalid("119-index-checksum", "Index_Checksum of 0.", "R-TRL-3",
            mutate(EX, _set(_file, index_crc=0))),
    Invalid("120-index-offset-low", "Index_Offset 8 below the index (Index_Checksum over the "
            "bytes from there).", "R-TRL-4",
            mutate(EX, _index_offset(lambda f, d: _index_at(d) - 8, fix_crc=False)),
            random="R-TRL-3"),
    Invalid("121-index-offset-past-end", "Index_Offset 2**64 - 1.", "R-TRL-4",
            mutate(EX, _set(_file, index_offset=2**64 - 1)), random="R-TRL-5"),
    Invalid("122-trailing-byte", "One zero byte after the trailer.", "R-TRL-6",
            mutate(EX, _set(_file, trailing=b"\x00")), random="R-TRL-2"),
    Invalid("123-polyglot-tail", "An HTML page after the trailer (a polyglot).", "R-TRL-6",
            mutate(EX, _set(_file, trailing=b"<html><script>alert(1)</script></html>")),
            random="R-TRL-2"),
    # -- added after the first batch
    Invalid("124-zstd-skippable-then-frame", "A skippable frame, then the real frame of a "
            "4096-byte block: one frame only, and no skippable frames.", "R-ZST-2",
            mutate(ZS, _zstd_dense("ramp", lambda b: setattr(
                b, "stored", b"\x5f\x2a\x4d\x18" + struct.pack("<I", 2) + b"hi" + b.stored)))),
    Invalid("125-kind-bit7-flipped", "Bit 7 of the first record's Record_Kind flipped (0x01 "
            "to 0x81) without fixing its Header_Checksum: an optional kind, but a broken "
            "header, which random access also checks before dropping the record.", "R-REC-4",
            mutate(TWO, _flip_kind)),
    # -- format 1.1: metadata rules pinned (spec 5.2)
    Invalid("126-metadata-integer-2-53", "The integer 2**53, one above the largest exact in "
            "binary64.", "R-META-12", _meta(b'{"n":9007199254740992}')),
    Invalid("127-metadata-integer-401-digits", "A negative integer of 401 digits.", "R-META-12",
            _meta(b'{"n":-' + b"9" * 401 + b"}")),
    Invalid("128-metadata-lone-high-surrogate", "A string value with the escape \\ud800 "
            "alone.", "R-META-13", _meta(b'{"s":"x\\ud800y"}')),
    Invalid("129-metadata-lone-low-surrogate-key", "A key that is the escape \\udc00 alone.",
            "R-META-13", _meta(b'{"\\udc00":1}')),
    Invalid("130-metadata-duplicate-after-unescaping", "The keys 'a' and '\\u0061': equal "
            "once the escape is decoded.", "R-META-3", _meta(b'{"a":1,"\\u0061":2}')),
    # -- format 1.1: pack records (spec 5.8)
    Invalid("131-pack-in-1-0-file", "A pack record in a file whose Version_Minor is 0.",
            "R-REC-1", _pack_bytes(minor=0)),
    Invalid("132-pack-no-member", "Member_Count 0 and an empty table.", "R-PACK-1",
            _pack_bytes(table=b"", count=0, data=b"")),
    Invalid("133-pack-table-stage-2", "Table_Stage 2.", "R-BLK-1", _pack_bytes(stage=2)),
    Invalid("134-pack-table-too-big", "Table_Decoded_Size 1048577.", "R-PACK-2",
            _pack_bytes(table=zstd_frame(ONE), stage=ZSTD, decoded=2**20 + 1)),
    Invalid("135-pack-table-tail", "One byte after the last table entry.", "R-PACK-3",
            _pack_bytes(table=ONE + b"\x00")),
    Invalid("136-pack-prefix-too-long", "The first member shares 2 bytes with the 1-byte name "
            "of the pack.", "R-PACK-4", _pack_bytes(table=member_entry(b"aa", 2))),
    Invalid("137-pack-first-name", "The pack is named 'b', its first member 'a'.", "R-PACK-5",
            _pack_bytes(name=b"b", table=member_entry(b"a", 0))),
    Invalid("138-pack-positions-type", "Positions_Type 0x03 (signs).", "R-PACK-6",
            _pack_bytes(table=member_entry(b"a", 1, ptype=SIGNS))),
    Invalid("139-pack-member-order", "Two members named 'a'.", "R-PACK-7",
            _pack_bytes(table=ONE + member_entry(b"a", 1), count=2, data=ONE_DATA * 2)),
    Invalid("140-pack-data-size", "Data_Size 16 for 6 bytes of members (8 with padding).",
            "R-PACK-8", _pack_bytes(data_size=16, data=ONE_DATA + bytes(10))),
    Invalid("141-pack-next-record-before-last-member", "Members 'a' and 'az', then a record "
            "'ab': below the pack's last member.", "R-REC-7",
            _pack_bytes(table=ONE + member_entry(b"az", 1), count=2, data=ONE_DATA * 2,
                        after=[(b"ab", dense_u8_record(b"ab"))]), random="R-PACK-9"),
    Invalid("142-pack-data-checksum", "Data_Checksum 0.", "R-REC-9", _pack_bytes(data_crc=0)),
    Invalid("143-pack-padding", "A nonzero byte in the padding after the last member (the "
            "checksum covers it).", "R-BLK-4", lambda: _pack_padding()),
    Invalid("144-pack-member-bitmask-bits", "A member's bitmask has 2 bits set, its Nnz is 1.",
            "R-BMP-4", _pack_bytes(data=b"\x03" + ONE_DATA[1:])),
    Invalid("145-pack-member-name-nul", "A second member named 'a' + NUL.", "R-NAME-3",
            _pack_bytes(table=ONE + member_entry(b"a\x00", 1), count=2, data=ONE_DATA * 2)),
    Invalid("146-pack-table-frame-size", "The zstd table frame declares 1 byte less than "
            "Table_Decoded_Size.", "R-ZST-3",
            _pack_bytes(table=zstd_frame(ONE), stage=ZSTD, decoded=len(ONE) + 1)),
    Invalid("147-pack-member-scale-negative", "A member's scale is -1.0.", "R-SCL-3",
            _pack_bytes(data=ONE_DATA[:2] + struct.pack("<f", -1.0))),
]


INVALID += [
    # -- format 1.2: compressed metadata (spec 5.2, 7.3)
    Invalid("148-metadata-flag-in-1-1-file", "Flags bit 0 (compressed metadata) in a file "
            "whose Version_Minor is 1.", "R-HDR-4", _meta_file(meta_frame(), minor=1)),
    Invalid("149-header-flag-bit-1", "Flags 0x02 in a 1.2 file: bits 1 to 7 stay Reserved.",
            "R-HDR-4", _meta_file(b"", flags=2)),
    Invalid("150-metadata-decoded-too-big", "Metadata_Decoded_Size 16 MiB + 1, above the "
            "default max_metadata_size, checked before decompressing.", "R-HDR-5",
            _meta_file(varint(2**24 + 1) + zstd_frame(b"{}"))),
    Invalid("151-metadata-decoded-size-missing", "Flags bit 0 and Metadata_Size 0: no room "
            "for Metadata_Decoded_Size.", "R-EOF-1", _meta_file(b"")),
    Invalid("152-metadata-frame-dictionary-id", "A metadata frame that declares Dictionary_ID "
            "7 (the dictionary is implied, not named).", "R-ZST-2",
            _meta_file(meta_frame(dict_id=7))),
    Invalid("153-metadata-frame-size", "Metadata_Decoded_Size one above what the frame "
            "declares.", "R-ZST-3",
            _meta_file(varint(len(BIG_META) + 1) + meta_frame()[1:])),
    Invalid("154-metadata-frame-tail", "One byte after the metadata frame.", "R-ZST-4",
            _meta_file(meta_frame() + b"\x00")),
    Invalid("155-metadata-frame-not-json", "A metadata frame that decodes to '{\"a\":' (not "
            "JSON): the rules of 5.2 apply to the decoded bytes.", "R-META-2",
            _meta_file(meta_frame(b'{"a":'))),
    Invalid("156-metadata-budget", "Compressed metadata of 82 decoded bytes with "
            "max_decoded_bytes 64: its decoded size is charged to the decode budget.",
            "R-LIM-1", _meta_file(meta_frame()), limits={"max_decoded_bytes": 64}),
    # -- format 1.2: column packs (spec 5.9)
    Invalid("157-column-pack-in-1-1-file", "A column pack in a file whose Version_Minor is 1.",
            "R-REC-1", _column_bytes(minor=1)),
    Invalid("158-column-pack-param-negative", "A golomb member without nonzeros (predicted "
            "Param 1) with Param_Delta -2 (zigzag 3).", "R-PACK-10",
            _column_bytes(table=columns((b"a", 1, 0x01, (8,), 0, GOLOMB, 3, 0)),
                          data=b"\x00" * 0 + struct.pack("<f", 1.0))),
    Invalid("159-column-pack-size-negative", "A bitmask member of 8 elements (predicted "
            "size 1 byte) with Size_Delta -2 (zigzag 3).", "R-PACK-11",
            _column_bytes(table=columns((b"a", 1, 0x01, (8,), 1, BITMASK, 0, 3)))),
    Invalid("160-column-pack-table-tail", "One byte after the last column.", "R-PACK-3",
            _column_bytes(table=COL_ONE + b"\x00")),
    Invalid("161-column-pack-prefix-too-long", "The first member shares 2 bytes with the "
            "1-byte name of the pack.", "R-PACK-4",
            _column_bytes(table=columns((b"aa", 2, 0x01, (8,), 1, BITMASK, 0, 0)))),
    Invalid("162-column-pack-short-column", "A table that ends inside its last column (no "
            "Positions_Slack).", "R-EOF-1", _column_bytes(table=COL_ONE[:-1])),
    Invalid("163-column-pack-member-order", "Two members named 'a'.", "R-PACK-7",
            _column_bytes(table=columns((b"a", 1, 0x01, (8,), 1, BITMASK, 0, 0),
                                        (b"a", 1, 0x01, (8,), 1, BITMASK, 0, 0)),
                          count=2, data=ONE_DATA * 2)),
    Invalid("164-column-pack-bitmask-param", "A bitmask member with Param_Delta 1 (zigzag 2): "
            "its Param 1 breaks the bitmask rule when its data is decoded.", "R-BMP-1",
            _column_bytes(table=columns((b"a", 1, 0x01, (8,), 1, BITMASK, 2, 0)))),
    Invalid("165-column-pack-positions-type", "Positions_Type 0x03 (signs) in the column.",
            "R-PACK-6",
            _column_bytes(table=columns((b"a", 1, 0x01, (8,), 1, SIGNS, 0, 0)))),
    Invalid("166-column-pack-golomb-param-0", "A golomb member of 8 elements and 1 nonzero "
            "with Param 0 (predicted 5, Param_Delta -5, zigzag 9): its predicted size uses "
            "max(1, Param) like the bound of 7.2 (1 byte, Size_Delta 0), and its data breaks "
            "the golomb parameter rule.", "R-GOL-1",
            _column_bytes(table=columns((b"a", 1, 0x01, (8,), 1, GOLOMB, 9, 0)))),
    # -- format 1.3: compact packs (spec 5.10) and the name dictionary (spec 7.4)
    Invalid("167-compact-pack-in-1-2-file", "A compact pack in a file whose Version_Minor "
            "is 2.", "R-REC-1", _compact_bytes(minor=2)),
    Invalid("168-compact-pack-scale-ref-skips", "The first member's Scale_Ref is 1: no scale "
            "is referenced before it, so only 0 is allowed.", "R-PACK-12",
            _compact_bytes(table=compact((b"a", 0, 0x01, (8,), 1, BITMASK, 0, 0), refs=(1,),
                                         scales=(1.0, 2.0)))),
    Invalid("169-compact-pack-scale-ref-second", "Members 'a' (Scale_Ref 0) and 'b' "
            "(Scale_Ref 2): one scale is referenced before 'b', so it may use 0 or 1.",
            "R-PACK-12",
            _compact_bytes(table=compact((b"a", 0, 0x01, (8,), 1, BITMASK, 0, 0),
                                         (b"b", 0, 0x01, (8,), 1, BITMASK, 0, 0),
                                         refs=(0, 2), scales=(1.0, 2.0, 3.0)),
                           count=2, data=CMP_DATA * 2)),
    Invalid("170-compact-pack-first-prefix", "The first member's Prefix_Length is 1: its "
            "previous name is the empty name.", "R-PACK-4",
            _compact_bytes(table=compact((b"a", 1, 0x01, (8,), 1, BITMASK, 0, 0)))),
    Invalid("171-compact-pack-table-tail", "One byte after the scales.", "R-PACK-3",
            _compact_bytes(table=CMP_ONE + b"\x00")),
    Invalid("172-compact-pack-short-scale", "A table that ends inside its one scale.",
            "R-EOF-1", _compact_bytes(table=CMP_ONE[:-1])),
    Invalid("173-compact-pack-stage-3", "Table_Stage 3.", "R-BLK-1",
            _compact_bytes(stage=3, decoded=len(CMP_ONE))),
    Invalid("174-column-pack-stage-2", "Table_Stage 2 (the name dictionary) in a column "
            "pack: it exists in compact packs only.", "R-BLK-1",
            _column_bytes(table=names_frame(COL_ONE), stage=NAMES_ZSTD, decoded=len(COL_ONE),
                          minor=3)),
    Invalid("175-compact-pack-scale-negative", "The member's scale in the table is -1.0.",
            "R-SCL-3",
            _compact_bytes(table=compact((b"a", 0, 0x01, (8,), 1, BITMASK, 0, 0),
                                         scales=(-1.0,)))),
    Invalid("176-compact-pack-member-order", "Members 'b' then 'a'.", "R-PACK-7",
            _compact_bytes(table=compact((b"b", 0, 0x01, (8,), 1, BITMASK, 0, 0),
                                         (b"a", 0, 0x01, (8,), 1, BITMASK, 0, 0), refs=(0, 0)),
                           first=b"b", count=2, data=CMP_DATA * 2)),
    Invalid("177-compact-pack-data-size", "Data_Size 16 for 2 bytes of members (8 with "
            "padding): the scale is not in the data area.", "R-PACK-8",
            _compact_bytes(data_size=16, data=CMP_DATA + bytes(14))),
    Invalid("178-compact-pack-index-name", "The index names the pack 'b', its first member "
            "is 'a'.", "R-IDX-2", _compact_bytes(first=b"b"), random="R-IDX-10"),
    Invalid("179-compact-pack-next-record-before-last-member", "Members 'a' and 'az', then a "
            "record 'ab': below the pack's last member.", "R-REC-7",
            _compact_bytes(table=compact((b"a", 0, 0x01, (8,), 1, BITMASK, 0, 0),
                                         (b"az", 1, 0x01, (8,), 1, BITMASK, 0, 0), refs=(0, 0)),
                           count=2, data=CMP_DATA * 2,
                           after=[(b"ab", dense_u8_record(b"ab"))]), random="R-PACK-9"),
    Invalid("180-compact-pack-table-frame-size", "The stage-2 table frame declares 1 byte "
            "less than Table_Decoded_Size.", "R-ZST-3",
            _compact_bytes(table=names_frame(CMP_ONE), stage=NAMES_ZSTD,
                           decoded=len(CMP_ONE) + 1)),
    Invalid("181-compact-pack-table-dictionary-id", "A stage-2 table frame that declares "
            "Dictionary_ID 7: the name dictionary is implied, never named (7.4).", "R-ZST-2",
            _compact_bytes(table=with_dict_id(names_frame(CMP_ONE), 7), stage=NAMES_ZSTD,
                           decoded=len(CMP_ONE))),
    Invalid("182-compact-pack-short-positions-type-column", "Two members; the table ends "
            "right after the first member's Positions_Type, which is 0x00: the bad value is "
            "reported, not the short column (8.1 step 8b: each value checked as it is read).",
            "R-PACK-6",
            _compact_bytes(table=compact((b"a", 0, 0x01, (8,), 1, 0x00, 0, 0),
                                         (b"b", 0, 0x01, (8,), 1, BITMASK, 0, 0),
                                         refs=(0, 0))[:15],
                           count=2, data=CMP_DATA * 2)),
    # -- format 1.4: bit packs (spec 5.11) and index entries without a name (spec 5.6)
    Invalid("183-bit-pack-in-1-3-file", "A bit pack in a file whose Version_Minor is 3 (its "
            "index entry named 'a', as 1.3 names a compact pack's).", "R-REC-1",
            _bit_bytes(minor=3, entry=b"a")),
    Invalid("184-bit-pack-bitmask-bits", "A bitmask member of 8 elements with Positions_Bits "
            "9 (Size_Delta 1, zigzag 2).", "R-BPK-1",
            _bit_bytes(table=compact((b"a", 0, 0x01, (8,), 1, BITMASK, 0, 2)))),
    Invalid("185-bit-pack-golomb-trailing-zero", "The golomb member 'g' with Positions_Bits 4 "
            "(its predicted length): its 3-bit stream and a zero bit; the stream does not end "
            "with its last code.", "R-BPK-1",
            _bit_bytes(table=compact((b"g", 0, 0x01, (8,), 1, GOLOMB, 0, 0)), data=b"\x04")),
    Invalid("186-bit-pack-golomb-nnz-0-bits", "A golomb member with Nnz 0 (M = 1) and "
            "Positions_Bits 1 (Size_Delta 1, zigzag 2).", "R-BPK-1",
            _bit_bytes(table=compact((b"g", 0, 0x01, (8,), 0, GOLOMB, 0, 2)), data=b"\x00")),
    Invalid("187-bit-pack-golomb-no-bits", "A golomb member with Nnz 1 and Positions_Bits 0 "
            "(Size_Delta -4, zigzag 7): no stream to end with a one bit.", "R-BPK-1",
            _bit_bytes(table=compact((b"g", 0, 0x01, (8,), 1, GOLOMB, 0, 7)), data=b"\x00")),
    Invalid("188-bit-pack-padding-bit", "Bit 9 of the data area, after the member's 9 bits, "
            "is 1.", "R-BLK-4", _bit_bytes(data=b"\x01\x02")),
    Invalid("189-bit-pack-data-size", "Data_Size 16 for the member's 9 bits (8 with "
            "padding).", "R-PACK-8", _bit_bytes(data_size=16, data=BIT_DATA + bytes(14))),
    Invalid("190-bit-pack-positions-bits-negative", "A golomb member whose predicted length "
            "is 4 with Size_Delta -5 (zigzag 9).", "R-PACK-11",
            _bit_bytes(table=compact((b"g", 0, 0x01, (8,), 1, GOLOMB, 0, 9)))),
    Invalid("191-nameless-entry-for-a-record", "A bit pack 'a', then a dense record 'b' whose "
            "index entry has no name.", "R-IDX-2",
            _bit_bytes(after=[(b"", dense_u8_record(b"b"))]), random="R-IDX-12"),
    Invalid("192-nameless-entry-in-1-3-file", "A compact pack in a 1.3 file whose index entry "
            "has no name.", "R-NAME-1", _compact_bytes(first=b"")),
    Invalid("193-bit-packs-out-of-order", "Two bit packs without index names: 'g', then 'a'.",
            "R-REC-7", _bit_bytes(table=BIT_G, data=BIT_G_DATA,
                                  after=[(b"", bit_record(BIT_ONE, BIT_DATA))]),
            random="R-IDX-6"),
    Invalid("194-bit-pack-next-record-before-last-member", "A bit pack of 'a' and 'az' "
            "without an index name, then a record 'ab': below the pack's last member.",
            "R-REC-7",
            _bit_bytes(table=compact((b"a", 0, 0x01, (8,), 1, BITMASK, 0, 0),
                                     (b"az", 1, 0x01, (8,), 1, BITMASK, 0, 0), refs=(0, 0)),
                       count=2, data=b"\x01\x02\x00",
                       after=[(b"ab", dense_u8_record(b"ab"))]), random="R-PACK-9"),
    Invalid("195-bit-pack-index-name", "A bit pack whose index entry is named 'b', its first "
            "member is 'a'.", "R-IDX-2", _bit_bytes(entry=b"b"), random="R-IDX-10"),
    Invalid("196-empty-shape-huge-extent", "Dimensions 0 x 2**50 and Nnz 0: no element, but "
            "the nonzero dimensions multiply past max_numel (found by the independent "
            "reader: the reference decoder refused it, the spec did not say so).", "R-BODY-4",
            mutate(EX, _set(_rec("w"), dims=[0, 2**50], nnz=0))),
    # -- format 1.5: lean packs (spec 5.12)
    Invalid("197-lean-pack-in-1-4-file", "A lean pack in a file whose Version_Minor is 4.",
            "R-REC-1", _lean_bytes(minor=4)),
    Invalid("198-lean-pack-unary-past-data", "The golomb member 'g' with a data area of "
            "zero bits (alignment 1, one byte): its unary part never ends.", "R-LPK-1",
            _lean_bytes(table=LEAN_G, data=b"\x00", log2=0)),
    Invalid("199-lean-pack-signs-past-data", "The bitmask member 'a' in a data area of one "
            "byte (alignment 1): its sign bit would be bit 8.", "R-LPK-1",
            _lean_bytes(data=b"\x01", log2=0)),
    Invalid("200-lean-pack-unary-bound", "The golomb member 'g' (N = 8, n = 1, M = 5) whose "
            "unary one bit is its third: a unary part holds its n ones within "
            "n + floor((N - n) / M) = 2 bits.", "R-LPK-1",
            _lean_bytes(table=LEAN_G, data=b"\x10")),
    Invalid("201-lean-pack-planes-past-data", "A golomb member with Param 2**20 (Param_Delta "
            "2**20 - 5): its 19 plane bits do not fit in a one-byte data area (alignment 1).",
            "R-LPK-1",
            _lean_bytes(table=lean((b"g", 0, 0x01, (8,), 1, GOLOMB, 2 * (2**20 - 5))),
                        data=b"\x00", log2=0)),
    Invalid("202-lean-pack-data-size", "Data_Size 16 for the member's 9 bits (8 with "
            "padding).", "R-PACK-8", _lean_bytes(data_size=16, data=BIT_DATA + bytes(14))),
    Invalid("203-lean-pack-padding-bit", "Bit 9 of the data area, after the member's 9 bits, "
            "is 1.", "R-BLK-4", _lean_bytes(data=b"\x01\x02")),
    # -- format 1.6: tight packs (spec 5.13) and bare frames (spec 7.1)
    Invalid("204-tight-pack-in-1-5-file", "A tight pack in a file whose Version_Minor is 5.",
            "R-REC-1", _tight_bytes(minor=5)),
    Invalid("205-tight-pack-first-scale-back", "The first member's Scale_Back is 1: no member "
            "before it.", "R-TPK-1", _tight_bytes(table=tight(
                (b"a", 0, 0x01, (8,), 1, BITMASK, 0), backs=(1,)))),
    Invalid("206-tight-pack-scale-back-too-far", "Members 'a' and 'g', the second's "
            "Scale_Back 2: one member before it.", "R-TPK-1",
            _tight_bytes(table=tight((b"a", 0, 0x01, (8,), 1, BITMASK, 0),
                                     (b"g", 0, 0x01, (8,), 1, GOLOMB, 0), backs=(0, 2)),
                         count=2, data=b"\x01\x08")),
    Invalid("207-tight-pack-short-scale-planes", "A table that ends inside its scale planes.",
            "R-EOF-1", _tight_bytes(table=TIGHT_ONE[:-1])),
    Invalid("208-tight-pack-scale-planes-tail", "Scale_Back 0 and two scales in the planes: "
            "the second is 4 bytes after the table's end.", "R-PACK-3",
            _tight_bytes(table=tight((b"a", 0, 0x01, (8,), 1, BITMASK, 0),
                                     scales=(1.0, 2.0)))),
    Invalid("209-tight-pack-scale-negative", "The member's scale in the planes is -1.0 "
            "(bf 80 00 00).", "R-SCL-3",
            _tight_bytes(table=tight((b"a", 0, 0x01, (8,), 1, BITMASK, 0), scales=(-1.0,)))),
    Invalid("210-tight-pack-table-frame-with-magic", "Table_Stage 2 with a whole zstd frame: "
            "a tight pack's table frame is bare, so the decoder reads the magic twice.",
            "R-ZST-2", _tight_bytes(table=names_frame(TIGHT_ONE), stage=NAMES_ZSTD,
                                    decoded=len(TIGHT_ONE))),
    Invalid("211-tight-pack-unary-past-data", "The golomb member 'g' of a tight pack with a "
            "data area of zero bits (alignment 1, one byte): its unary part never ends.",
            "R-LPK-1", _tight_bytes(table=TIGHT_G, data=b"\x00", log2=0)),
    Invalid("212-bare-metadata-in-1-5-file", "Flags 0x03 (a bare metadata frame) in a file "
            "whose Version_Minor is 5.", "R-HDR-4",
            _lean_bytes(flags=3, metadata=bare_meta())),
    Invalid("213-bare-metadata-without-bit-0", "Flags 0x02 in a 1.6 file: bit 1 (bare) "
            "without bit 0 (compressed).", "R-HDR-4",
            _tight_bytes(flags=2, metadata=b"{}")),
    Invalid("214-bare-metadata-frame-with-magic", "Flags 0x03 and a metadata frame that keeps "
            "its magic number: read as a frame that starts with it twice.", "R-ZST-2",
            _tight_bytes(flags=3, metadata=meta_frame())),
    Invalid("215-tight-pack-named-entry-in-1-5-file", "A tight pack in a 1.5 file whose index "
            "entry is named 'a': a random-access decoder lists 'a' and refuses it when it is "
            "read (found by the independent reader: the spec said so only for an entry "
            "without a name).", "R-REC-1", _tight_bytes(minor=5, entry=b"a")),
    # -- format 1.7: twin packs (spec 5.14), unsized bare frames (7.1), the short trailer (5.7)
    Invalid("216-twin-pack-in-1-6-file", "A twin pack in a file whose Version_Minor is 6 (the "
            "16-byte trailer).", "R-REC-1", _twin_bytes(minor=6, flags=0)),
    Invalid("217-twin-back-too-far", "Members 'a' and 'b', the second's Twin_Back 2: one "
            "member before it.", "R-TWN-1",
            _twin_bytes(table=twin((b"a", 0, 0x01, (8,), 1, BITMASK, 0, 0),
                                   (b"b", 0, 0x01, (8,), 0, 0, 0, 2), backs=(0, 1)),
                        count=2)),
    Invalid("218-twin-of-a-twin", "'c' is the twin of 'b' (Twin_Back 1), itself the twin of "
            "'a'.", "R-TWN-1",
            _twin_bytes(table=twin((b"a", 0, 0x01, (8,), 1, BITMASK, 0, 0),
                                   (b"b", 0, 0x01, (8,), 0, 0, 0, 1),
                                   (b"c", 0, 0x01, (8,), 0, 0, 0, 1), backs=(0, 1, 1)),
                        count=3)),
    Invalid("219-twin-numel-differs", "'b' (shape (2, 3): 6 elements) is the twin of 'a' (8 "
            "elements).", "R-TWN-1",
            _twin_bytes(table=twin((b"a", 0, 0x01, (8,), 1, BITMASK, 0, 0),
                                   (b"b", 0, 0x01, (2, 3), 0, 0, 0, 1), backs=(0, 1)),
                        count=2)),
    Invalid("220-twin-pack-table-frame-without-content-size", "A twin pack's bare table "
            "frame that declares no content size: nothing else gives the table's size.",
            "R-ZST-3", _twin_bytes(table=bare(zstd_frame(TWIN_ONE, content_size=False)),
                                   stage=0x01)),
    Invalid("221-twin-pack-table-frame-over-1-mib", "A twin pack's bare table frame that "
            "declares 1 MiB + 1 bytes, refused before decompressing.", "R-PACK-2",
            _twin_bytes(table=bare(zstd_frame(bytes(2**20 + 1))), stage=0x01)),
    Invalid("222-twin-pack-body-with-decoded-size", "A twin pack body with a "
            "Table_Decoded_Size before its table frame, as a tight pack's: one byte more "
            "than Table_Stored_Size in the body.", "R-REC-5",
            _twin_bytes(table=bare(zstd_frame(TWIN_ONE)), stage=0x01,
                        decoded=len(TWIN_ONE))),
    Invalid("223-short-trailer-in-1-6-file", "Flags 0x08 (the short trailer) in a file whose "
            "Version_Minor is 6.", "R-HDR-4", _tight_bytes(flags=0x08)),
    Invalid("224-unsized-metadata-without-bare", "Flags 0x0d in a 1.7 file: bit 2 (unsized "
            "metadata frame) without bit 1 (bare).", "R-HDR-4",
            _twin_bytes(flags=0x0D, metadata=meta_frame())),
    Invalid("225-unsized-metadata-without-content-size", "Flags 0x0f and a bare metadata "
            "frame that declares no content size.", "R-ZST-3",
            _twin_bytes(flags=0x0F, metadata=bare(zstandard.ZstdCompressor(
                level=19, write_content_size=False, write_dict_id=False,
                dict_data=zstandard.ZstdCompressionDict(
                    METADATA_DICTIONARY, dict_type=zstandard.DICT_TYPE_RAWCONTENT),
            ).compress(BIG_META)))),
    Invalid("226-unsized-metadata-over-limit", "Flags 0x0f: the bare metadata frame declares "
            "93 bytes, over a max_metadata_size of 92, refused before decompressing.",
            "R-HDR-5", _twin_bytes(flags=0x0F, metadata=unsized_meta()),
            limits={"max_metadata_size": 92}),
    Invalid("227-short-trailer-index-size-one-more", "The short trailer's Index_Size is one "
            "more than the index: it points one byte before the index.", "R-TRL-4",
            raw(lambda: _index_size(twin_file(), +1)), random="R-TRL-3"),
    Invalid("228-short-trailer-index-size-past-start", "The short trailer's Index_Size reaches "
            "before the file's start.", "R-TRL-4",
            raw(lambda: _index_size(twin_file(), 1000)), random="R-TRL-5"),
    Invalid("229-short-trailer-file-too-short", "The 1.7 empty file cut to 36 bytes: the "
            "header (24) and 12, no room for an index byte and a 12-byte trailer.", "R-EOF-1",
            _cut("052-empty-file-1-7", lambda d: 36), random="R-TRL-7"),
]


def _index_size(data: bytes, delta: int) -> bytes:
    """``data`` (with the short trailer) with ``Index_Size`` changed by ``delta``."""
    size = struct.unpack("<I", data[-12:-8])[0]
    return data[:-12] + struct.pack("<I", size + delta) + data[-8:]


def _pack_padding() -> bytes:
    """A pack whose data area has a nonzero padding byte, every checksum right."""
    data = bytearray(ONE_DATA + bytes(2))
    data[7] = 1
    return pack_file(data=bytes(data))


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _as_json(err: tuple[str, str] | None, rule: str | None) -> dict[str, Any] | None:
    if err is None:
        return None
    return {"error": err[0], "rule": rule, "message": err[1]}


def _check_error(slug: str, path: str, err: tuple[str, str] | None, rule_id: str | None,
                 rules: dict[str, Rule]) -> None:
    """Fail unless ``err`` is what ``rule_id`` of the spec's table says (class and message)."""
    if rule_id is None:
        if err is not None:
            raise SystemExit(f"{slug}: {path} raised {err}, expected no error")
        return
    if err is None:
        raise SystemExit(f"{slug}: {path} accepted the file, expected {rule_id}")
    rule = rules[rule_id]
    if err[0] != rule.error or not rule.matches(err[1]):
        raise SystemExit(f"{slug}: {path} raised {err}, which is not {rule_id} "
                         f"({rule.error}: {rule.templates})")
    if ("R" if path == "open_file" else "S") not in rule.paths:
        raise SystemExit(f"{slug}: {rule_id} is not listed for the {path} path")


def invalid_files(rules: dict[str, Rule]) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """Yield ``(slug, bytes, json)`` of every invalid vector, each checked against the table."""
    for v in INVALID:
        data = v.build()
        limits = _limits(v.limits)
        errors = path_errors(data, limits)
        stream = v.rule if v.stream == SAME else v.stream
        random = v.rule if v.random == SAME else v.random
        _check_error(v.slug, "loads", errors["loads"], v.rule, rules)
        _check_error(v.slug, "iter_stream", errors["iter_stream"], stream, rules)
        _check_error(v.slug, "open_file", errors["open_file"], random, rules)
        doc: dict[str, Any] = {"description": v.description}
        if v.limits:
            doc["limits"] = v.limits
        main = _as_json(errors["loads"], v.rule)
        doc.update(main or {"error": None, "rule": None, "message": None})
        if errors["iter_stream"] != errors["loads"]:
            doc["iter_stream"] = _as_json(errors["iter_stream"], stream)
        doc["open_file"] = _as_json(errors["open_file"], random)
        yield v.slug, data, doc


def valid_files() -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """Yield ``(slug, bytes, json)`` of every valid vector."""
    for v in VALID:
        data = valid_bytes(v.slug)
        tensors, layout = describe(data)
        if not v.check(layout):
            raise SystemExit(f"{v.slug}: the encoder no longer makes the layout it pins: {layout}")
        for path, err in path_errors(data, ReadLimits()).items():
            if err is not None:
                raise SystemExit(f"{v.slug}: {path} rejects a valid vector: {err}")
        doc = {"description": v.description, "options": v.all_options(),
               "metadata": v.metadata or {}, "tensors": tensors, "layout": layout}
        yield v.slug, data, doc


def accepted_files() -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """Yield ``(slug, bytes, json)`` of every accepted vector."""
    for v in ACCEPTED:
        data = v.build()
        for path, err in path_errors(data, ReadLimits()).items():
            if err is not None:
                raise SystemExit(f"{v.slug}: {path} rejects an accepted vector: {err}")
        canonical = v.expect()
        tensors, _ = describe(canonical)
        metadata = v.metadata() if v.metadata else cf.open_file(canonical).metadata()
        if cf.open_file(data).metadata() != metadata:
            raise SystemExit(f"{v.slug}: metadata differs from the expectation")
        if not _same_content(cf.loads(data), cf.loads(canonical)):
            raise SystemExit(f"{v.slug}: decodes differently from its canonical file")
        doc = {"description": v.description, "metadata": metadata, "tensors": tensors}
        yield v.slug, data, doc


def _same_content(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if list(a) != list(b):
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, TernaryTensor):
            if x != y:
                return False
        elif not (x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()):
            return False
    return True


def dump_json(doc: Any, depth: int = 0) -> str:
    """Return the JSON text of a vector description: stable, UTF-8, one line per list of scalars."""
    def scalar(x: Any) -> str:
        return json.dumps(x, ensure_ascii=False, allow_nan=False)

    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(doc, dict) and doc:
        items = [f"{inner}{scalar(k)}: {dump_json(v, depth + 1)}" for k, v in doc.items()]
        out = "{\n" + ",\n".join(items) + f"\n{pad}}}"
    elif isinstance(doc, list) and any(isinstance(x, (dict, list)) for x in doc):
        out = "[\n" + ",\n".join(inner + dump_json(x, depth + 1) for x in doc) + f"\n{pad}]"
    elif isinstance(doc, list):
        out = "[" + ", ".join(scalar(x) for x in doc) + "]"
    else:
        out = scalar(doc)
    return out + ("\n" if depth == 0 else "")


def main(argv: list[str] | None = None) -> int:
    """Write the missing vectors (or, with --check, compare every vector with the disk)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="write nothing; report differences")
    args = ap.parse_args(argv)
    rules = load_rules()
    covered = {v.rule for v in INVALID} | {v.random for v in INVALID} | {
        v.stream for v in INVALID}
    missing = [r for r in rules if r not in covered]
    if missing:
        raise SystemExit(f"rules without an invalid vector: {missing}")
    written, differ = 0, 0
    groups = [("valid", valid_files()), ("accepted", accepted_files()),
              ("invalid", invalid_files(rules))]
    for group, items in groups:
        folder = VECTORS / group
        folder.mkdir(parents=True, exist_ok=True)
        for slug, data, doc in items:
            for path, content in ((folder / f"{slug}.compeft", data),
                                  (folder / f"{slug}.json", dump_json(doc).encode("utf-8"))):
                if path.exists():
                    if path.read_bytes() != content:
                        differ += 1
                        print(f"differs (left as released): {path.relative_to(ROOT)}")
                elif args.check:
                    differ += 1
                    print(f"missing: {path.relative_to(ROOT)}")
                else:
                    path.write_bytes(content)
                    written += 1
    print(f"{written} files written, {differ} differ or are missing")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())

