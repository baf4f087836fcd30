"""Format 1.3 (spec 5.10, 7.4): compact packs and the name dictionary.

Each new rule has its invalid vector (tests/test_vectors.py runs them on every path, and the
independent reader of spec/tools); here: the spec's text and the code agree (dictionary,
example tables), the writer's 1.3 choices (each distinct scale stored once, no name in the
body, the table through the name dictionary), that 1.3 files read back like the 1.0 file of
the same content on every path, that they are smaller than 1.2 files of the project's
adapters, and that every cut and bit flip of a small 1.3 file is refused.
"""

from __future__ import annotations

import re
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_helpers import one_line_error, run
from file_helpers import (
    check_reads_back_like_1_0,
    kinds,
    random_ternary,
    refuse_every_cut_and_flip,
    refused_below,
    three_members,
)
from spec_helpers import ROOT, SPEC, check_fixed_dictionary

from compeft_format import TernaryTensor, dumps, inspect, loads, open_file
from compeft_format import _spec as S
from compeft_format._io import BufferSource
from compeft_format.codecs import NAMES_ZSTD
from compeft_format.convert import compress_file
from compeft_format.errors import CorruptDataError, EncodeError, MergeError
from compeft_format.layout import read_file_header, read_record_header
from compeft_format.merge_io import merge_files
from compeft_format.packtable import Member, compact_table, read_column_table, read_scale_columns
from compeft_format.safetensors_io import save_safetensors

sys.path.insert(0, str(ROOT / "spec" / "tools"))
import reference_reader as rr


def lora(layers: int = 4) -> dict[str, TernaryTensor]:
    """A LoRA-like adapter compressed with one global scale per factor kind (A, B)."""
    out = {}
    for i in range(layers):
        for m in ("q", "v"):
            stem = f"base_model.model.model.layers.{i}.self_attn.{m}_proj"
            out[f"{stem}.lora_A.weight"] = random_ternary((8, 64), 0.05, 10 * i + 1, 0.25)
            out[f"{stem}.lora_B.weight"] = random_ternary((64, 8), 0.05, 10 * i + 2, 0.0125, "BF16")
    return out


def the_pack(data: bytes):
    """The first record of ``data``, parsed (a compact pack: its members and their scales)."""
    src = BufferSource(memoryview(data))
    header = read_file_header(src, S.DEFAULT_LIMITS, _NoBudget())
    src.pos = header.end
    kind = src.u8("record kind")
    assert kind == S.KIND_COMPACT_PACK
    return read_record_header(src, kind, S.DEFAULT_LIMITS, header.alignment)


class _NoBudget:
    def charge(self, *args: Any) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# the spec's text and the code
# ---------------------------------------------------------------------------------------------
def test_name_dictionary_is_the_spec_text() -> None:
    from_spec = check_fixed_dictionary("7.4", S.NAME_DICTIONARY, rr.NAME_DICTIONARY,
                                       S.NAME_DICTIONARY_SHA256)
    assert f"{len(from_spec)} bytes below" in SPEC


def test_compact_table_examples_of_the_spec() -> None:
    """Spec 5.10's example tables, and its 5-byte data area, byte for byte."""
    m = [Member(b"a.w", "F32", (8,), 1, S.BLOCK_BITMASK, 0, 1),
         Member(b"b.w", "F32", (64,), 2, S.BLOCK_GOLOMB, 23, 2)]
    one, half = struct.pack("<f", 1.0), struct.pack("<f", 0.5)
    section = SPEC[SPEC.index("### 5.10 "):SPEC.index("## 6 Block types")]
    shown = [t.replace("|", "").split() for t in re.findall(r"`([0-9a-f |]{20,})`", section)]
    same = compact_table(m, [one, one]).hex(" ").split()
    assert shown[0] == same
    assert compact_table(m, [half, one]).hex(" ").split()[-10:] == shown[1]
    t = BufferSource(memoryview(compact_table(m, [half, one])))
    assert read_column_table(t, 2, None, S.DEFAULT_LIMITS) == m
    assert read_scale_columns(t, ["a.w", "b.w"]) == [half, one]
    assert t.at_end()
    data = dumps({"a.w": TernaryTensor((8,), [0], [False], 0.5),
                  "b.w": TernaryTensor((64,), [5, 40], [False, True], 1.0)},
                 zstd_level=None, positions="auto", version="1.3")
    rec = the_pack(data)
    assert sum(mm.data_size for mm in rec.members) == 5
    assert rec.data_size == 8


def test_a_scale_ref_that_skips_ahead_is_refused() -> None:
    m = [Member(b"a", "F32", (8,), 1, S.BLOCK_BITMASK, 0, 1)] * 2
    table = BufferSource(memoryview(bytes([0, 2]) + struct.pack("<ff", 1.0, 2.0)))
    with pytest.raises(CorruptDataError, match="scale ref 2 skips ahead: 1 scales"):
        read_scale_columns(table, [x.name.decode() for x in m])


# ---------------------------------------------------------------------------------------------
# the writer's 1.3 choices
# ---------------------------------------------------------------------------------------------
def test_each_distinct_scale_is_stored_once_in_the_table() -> None:
    tensors = lora()
    data = dumps(tensors, version="1.3")
    assert data[9] == 3
    assert kinds(data) == [S.KIND_COMPACT_PACK]
    rec = the_pack(data)
    assert rec.name == min(tensors, key=str.encode)  # the first member's name, not stored
    assert [m.name for m in rec.members] == sorted(tensors, key=str.encode)
    for m in rec.members:  # positions and signs in the data area, the scale in the table
        assert [b[0] for b in m.blocks] == [m.blocks[0][0], S.BLOCK_SIGNS]
        assert m.table_scale[0] == struct.pack("<f", tensors[m.name].scale)
    # the decoded table ends with the two distinct scales, once each, in order of first use
    body = data[data.index(bytes([S.KIND_COMPACT_PACK]), 16):]
    table = _decoded_table(body)
    assert table.endswith(struct.pack("<ff", 0.25, 0.0125))
    refs = table[-8 - len(tensors):-8]
    assert list(refs) == [0, 1] * (len(tensors) // 2)


def _decoded_table(record: bytes) -> bytes:
    """The member table of the compact pack that starts ``record`` (spec 5.10)."""
    src = BufferSource(memoryview(record))
    src.u8("kind")
    src.varint("header length")
    src.varint("data size")
    count = src.varint("count")
    assert count >= 1
    stage = src.u8("stage")
    stored = src.varint("stored")
    assert stage == S.STAGE_ZSTD_NAMES  # a LoRA's names: the dictionary pays
    decoded = src.varint("decoded")
    return NAMES_ZSTD.decode(src.read(stored, "table"), decoded, None)


def test_1_2_and_1_3_hold_the_same_tensors_and_1_3_is_smaller() -> None:
    tensors = lora(8)
    v12, v13 = dumps(tensors, version="1.2"), dumps(tensors, version="1.3")
    assert loads(v12) == loads(v13) == tensors
    # 32 members: 30 scales and one name saved, the table compressed with the dictionary
    assert len(v13) <= len(v12) - 4 * (len(tensors) - 2)


@pytest.mark.parametrize("adapter", ["lora-minilm-vader", "ia3-minilm-vader"])
def test_the_projects_adapters_are_smaller_in_1_3(adapter: str, tmp_path: Path) -> None:
    """The files compress_file writes in format 1.3 against the same tensors in 1.2."""
    out = tmp_path / "out"
    compress_file(ROOT / "tests" / "data" / adapter, out, density=0.01, format_version="1.3")
    data = (out / "adapter_model.compeft").read_bytes()
    with open_file(data) as f:
        tensors, meta = {n: f.get(n) for n in f}, f.metadata()
    # as the writer writes 1.3, alignment 1 where every tensor is ternary (Appendix D 2, 1.6)
    v12 = dumps(tensors, metadata=meta, version="1.2", alignment=1)
    assert data == dumps(tensors, metadata=meta, version="1.3", alignment=1)
    assert inspect(data).version == (1, 3)
    # measured at density 0.01 (alignment 1): (IA)^3 690 -> 610 B, LoRA 3,984 -> 3,588 B
    assert len(data) < 0.95 * len(v12)


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alignment", [1, 8])
@pytest.mark.parametrize("positions", ["auto", "golomb", "bitmask"])
def test_1_3_files_read_back_like_1_0_files(positions: str, alignment: int) -> None:
    tensors: dict[str, Any] = {**lora(2), "m.dense": np.arange(6, dtype=np.float32),
                               "m.zero": TernaryTensor.zeros((3, 3)),
                               "z.big": random_ternary((2**19 + 1,), 0.0001, 7, 0.5)}
    check_reads_back_like_1_0(tensors, list(lora(2))[:1], "1.3", S.KIND_COMPACT_PACK,
                              positions, alignment)


def test_a_1_2_reader_refuses_a_compact_pack() -> None:
    """The kind is unknown below minor 3 (spec 10.1): a 1.3 file with its minor byte set to 2."""
    refused_below(dumps(lora(1), version="1.3"), 2, "unknown required record kind 0x05")


def test_cuts_and_bit_flips_of_a_1_3_file_are_refused() -> None:
    """Every cut and every single-bit flip is an error on every path (a checksum on every byte)."""
    data = dumps(three_members(), version="1.3")
    assert kinds(data) == [S.KIND_COMPACT_PACK]
    refuse_every_cut_and_flip(data)


# ---------------------------------------------------------------------------------------------
# writing an older version, for older readers
# ---------------------------------------------------------------------------------------------
def test_compress_and_merge_write_the_format_version_asked(tmp_path: Path, capsys) -> None:
    src = tmp_path / "tv.safetensors"
    save_safetensors({k: t.to_numpy().astype(np.float32) for k, t in lora(2).items()}, src)
    outs = {}
    for version in ("1.0", "1.1", "1.2", "1.3", "1.4", "1.5", "1.6", "1.7"):
        out = tmp_path / f"v{version}.compeft"
        code, _, err = run(capsys, "compress", src, "-o", out, "--density", "0.05",
                           "--format-version", version, "-q")
        assert code == 0, err
        outs[version] = out.read_bytes()
        assert inspect(outs[version]).version == (1, int(version[2]))
    # the same tensors whatever the version, and the newest file is the smallest
    assert all(loads(d) == loads(outs["1.7"]) for d in outs.values())
    assert (len(outs["1.7"]) < len(outs["1.6"]) < len(outs["1.5"]) < len(outs["1.4"])
            < len(outs["1.3"]) < len(outs["1.2"]) < len(outs["1.1"]) < len(outs["1.0"]))
    code, _, err = run(capsys, "compress", src, "-o", tmp_path / "x.compeft",
                       "--format-version", "1.8")
    assert code == 2
    assert "invalid choice: '1.8'" in err
    with pytest.raises(EncodeError, match=r"version must be one of .* got '2\.0'"):
        compress_file(src, tmp_path / "y.compeft", format_version="2.0")
    assert not (tmp_path / "y.compeft").exists()
    # merge: a compeft output in the version asked; a dense output takes no version
    ins = [tmp_path / "v1.3.compeft", tmp_path / "v1.2.compeft"]
    code, _, err = run(capsys, "merge", *ins, "-o", tmp_path / "m.compeft",
                       "--format-version", "1.1", "-q")
    assert code == 0, err
    assert inspect((tmp_path / "m.compeft").read_bytes()).version == (1, 1)
    code, _, err = run(capsys, "merge", *ins, "-o", tmp_path / "m.safetensors",
                       "--format-version", "1.1")
    assert code == 1
    one_line_error(err, "format_version (--format-version) applies to a .compeft output")
    with pytest.raises(MergeError, match=r"format_version \(--format-version\) applies to a "
                       r"\.compeft output"):
        merge_files(ins, tmp_path / "m2.safetensors", format_version="1.2")
