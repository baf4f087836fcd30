"""Format 1.6 (spec 5.13, 7.1): tight packs and bare zstd frames.

Each new rule has its invalid vector (tests/test_vectors.py runs them on every path, and the
independent reader of spec/tools); here: the spec's example and the code agree, the scale
columns of a tight pack round-trip for any sharing of scales, bare frames are the frames
without their magic, the writer's 1.6 choices (and the command's alignment), that 1.6 files
read back like the 1.0 file of the same content on every path and in the independent reader,
that the project's adapters are smaller than in 1.5, and that every cut and bit flip of a
small 1.6 file is refused.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from file_helpers import (
    check_reads_back_like_1_0,
    check_writer_streams_like_dumps,
    ia3_like,
    kinds,
    mixed_tensors,
    refuse_every_cut_and_flip,
    refused_below,
    three_members,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from spec_helpers import ROOT, SPEC

from compeft_format import TernaryTensor, dumps, inspect, loads, open_file
from compeft_format import _spec as S
from compeft_format._io import BufferSource
from compeft_format.codecs import NAMES_ZSTD, ZSTD
from compeft_format.convert import compress_file
from compeft_format.errors import CorruptDataError
from compeft_format.packtable import (
    Member,
    compact_table,
    read_tight_scale_columns,
    tight_scale_columns,
)

F32 = struct.Struct("<f")


# ---------------------------------------------------------------------------------------------
# the spec's text and the code
# ---------------------------------------------------------------------------------------------
def test_tight_pack_example_of_the_spec() -> None:
    """Spec 5.13's example: the lean table of 5.12 with columns 11 and 12 as shown."""
    section = SPEC[SPEC.index("### 5.13 "):SPEC.index("## 6 Block types")]
    shown = [t.replace("|", "").split() for t in re.findall(r"`([0-9a-f ]+\|[0-9a-f ]+)`",
                                                            section)]
    members = [Member(b"a.w", "F32", (8,), 1, S.BLOCK_BITMASK, 0, -1),
               Member(b"b.w", "F32", (64,), 2, S.BLOCK_GOLOMB, 23, -1)]
    one, half = F32.pack(1.0), F32.pack(0.5)
    lean = compact_table(members, [one, one], "none").hex(" ").split()
    tight = compact_table(members, [one, one], "none", tight=True).hex(" ").split()
    # the lean table ends with column 11 (00 00) and its one scale (4 bytes)
    assert tight[:-6] == lean[:-6]
    assert tight[-6:] == shown[0]
    assert tight_scale_columns([half, one]).hex(" ").split() == shown[1]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([0.5, 1.0, 0.25, 3.0, 1e-3, 7.5]), min_size=1, max_size=60))
def test_scale_columns_round_trip(values: list[float]) -> None:
    scales = [F32.pack(v) for v in values]
    stored = tight_scale_columns(scales)
    src = BufferSource(memoryview(stored))
    assert read_tight_scale_columns(src, [f"m{i}" for i in range(len(values))]) == scales
    assert src.at_end()
    distinct = len(set(values))
    assert len(stored) == len(values) + 4 * distinct  # each back distance below 128: 1 byte
    backs = list(stored[:len(values)])
    for k, back in enumerate(backs):  # the nearest member before with the same scale
        before = [j for j in range(k) if values[j] == values[k]]
        assert back == (k - before[-1] if before else 0)


def test_a_scale_back_past_the_first_member_is_refused() -> None:
    src = BufferSource(memoryview(bytes([0, 2]) + bytes(4)))
    with pytest.raises(CorruptDataError, match=r"scale back 2 reaches before the first "
                                               r"member \(member 1\)"):
        read_tight_scale_columns(src, ["a", "b"])


def test_scales_of_one_magnitude_share_their_top_byte_plane() -> None:
    """Why byte planes (spec 5.13): the sign-and-exponent bytes come together, and zstd stores
    a run of them once; as binary32 one after the other they are 4 bytes apart."""
    rng = np.random.default_rng(0)
    values = (0.25 + 0.2 * rng.random(40)).astype(np.float32)
    scales = [v.tobytes() for v in values]
    planes = tight_scale_columns(scales)[40:]
    assert planes[:40] == bytes([0x3E]) * 40
    flat = b"".join(scales)
    assert len(NAMES_ZSTD.encode(planes, 19)) < len(NAMES_ZSTD.encode(flat, 19)) - 30


def test_a_bare_frame_is_the_frame_without_its_magic() -> None:
    data = b'{"compeft.producer":"spec"}' * 4
    frame = ZSTD.encode(data, 19)
    assert frame[:4] == S.ZSTD_MAGIC
    assert ZSTD.encode(data, 19, bare=True) == frame[4:]
    assert ZSTD.decode(frame[4:], len(data), None, bare=True) == data
    with pytest.raises(ValueError, match="bad frame header"):  # the magic twice
        ZSTD.decode(frame, len(data), None, bare=True)


# ---------------------------------------------------------------------------------------------
# the writer's 1.6 choices
# ---------------------------------------------------------------------------------------------
def test_1_6_writes_tight_packs_and_bare_frames() -> None:
    meta = {"compeft.producer": "compeft_format 0.1.0", "note": "x" * 80}
    data = dumps(ia3_like(3), metadata=meta, version="1.6")
    assert data[8:12] == bytes([1, 6, 3, S.FLAG_METADATA_ZSTD | S.FLAG_METADATA_BARE])
    assert kinds(data) == [S.KIND_TIGHT_PACK]
    # neither the metadata frame nor the table frame stores the zstd magic
    assert S.ZSTD_MAGIC not in data
    assert S.ZSTD_MAGIC in dumps(ia3_like(3), metadata=meta, version="1.5")
    plain = dumps(ia3_like(3), metadata=meta, zstd_level=None, version="1.6")  # no zstd
    assert plain[11] == 0
    assert kinds(plain) == [S.KIND_TIGHT_PACK]
    assert loads(plain) == loads(data)
    with open_file(data) as f:
        assert f.metadata() == meta


def test_the_command_writes_alignment_1_without_dense_tensors(tmp_path: Path) -> None:
    """Appendix D 2: alignment serves a dense record viewed in place; compress_file asks for
    1 when every tensor is ternary, and keeps 8 when one stays dense."""
    adapter = ROOT / "tests" / "data" / "ia3-minilm-vader"
    compress_file(adapter, tmp_path / "all", density=0.01)
    info = inspect(tmp_path / "all" / "adapter_model.compeft")
    assert info.alignment == 1
    assert {t.kind for t in info.tensors} == {"ternary"}
    compress_file(adapter, tmp_path / "some", density=0.01, exclude=["*layer.5.output*"])
    info = inspect(tmp_path / "some" / "adapter_model.compeft")
    assert info.alignment == 8
    assert "dense" in {t.kind for t in info.tensors}


@pytest.mark.parametrize("adapter", ["lora-minilm-vader", "ia3-minilm-vader"])
def test_the_projects_adapters_are_smaller_in_1_6(adapter: str, tmp_path: Path) -> None:
    """The files compress_file writes in format 1.6 against the same tensors in 1.5."""
    out = tmp_path / "out"
    compress_file(ROOT / "tests" / "data" / adapter, out, density=0.01, format_version="1.6")
    data = (out / "adapter_model.compeft").read_bytes()
    assert inspect(data).version == (1, 6)
    with open_file(data) as f:
        tensors, meta = {n: f.get(n) for n in f}, f.metadata()
    # what the command writes
    assert data == dumps(tensors, metadata=meta, alignment=1, version="1.6")
    v15 = dumps(tensors, metadata=meta, version="1.5")
    assert loads(v15) == loads(data)
    # measured at density 0.01: (IA)^3 532 -> 482 B, LoRA 3,460 -> 3,448 B (its 74 factors share
    # two scales: what it saves is the frames' magic numbers and the padding)
    assert len(data) <= len(v15) - (40 if adapter.startswith("ia3") else 10)


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alignment", [1, 8])
@pytest.mark.parametrize("positions", ["auto", "golomb", "bitmask"])
def test_1_6_files_read_back_like_1_0_files(positions: str, alignment: int) -> None:
    check_reads_back_like_1_0(mixed_tensors(), ia3_like(2), "1.6", S.KIND_TIGHT_PACK,
                              positions, alignment)


def test_writer_streams_the_same_bytes_as_dumps() -> None:
    check_writer_streams_like_dumps(ia3_like(3), "1.6", metadata={"note": "y" * 100})


def test_a_1_5_reader_refuses_a_tight_pack() -> None:
    """The kind is unknown below minor 6 (spec 10.1): a 1.6 file with its minor byte set to 5."""
    refused_below(dumps(ia3_like(1), version="1.6"), 5, "unknown required record kind 0x08")


def test_a_1_5_reader_refuses_a_bare_metadata_frame() -> None:
    refused_below(dumps(ia3_like(1), metadata={"note": "z" * 100}, version="1.6"), 5,
                  r"reserved header flags must be zero \(got 0x03\)")


def test_cuts_and_bit_flips_of_a_1_6_file_are_refused() -> None:
    """Every cut and every single-bit flip is an error on every path (a checksum on every byte)."""
    data = dumps(three_members(), metadata={"compeft.producer": "x" * 70}, version="1.6")
    assert kinds(data) == [S.KIND_TIGHT_PACK]
    assert data[11] == 3
    refuse_every_cut_and_flip(data)


def _shared(layers: int) -> dict[str, Any]:
    """(IA)^3-like vectors whose k and w of a layer share a scale (Scale_Back 2)."""
    out = {}
    for name, t in ia3_like(layers).items():
        layer = int(name.split(".")[4])
        scale = 0.3 + 0.01 * layer + (0.002 if ".value." in name else 0.0)
        out[name] = TernaryTensor(t.shape, t.indices, t.signs, scale)
    return out


def test_shared_scales_read_back() -> None:
    tensors = _shared(4)
    data = dumps(tensors, version="1.6")
    assert loads(data) == tensors
    with open_file(data) as f:
        assert {n: f.get(n) for n in f} == tensors
