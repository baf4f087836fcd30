"""Format 1.4 (spec 5.11, 5.6): bit packs and index entries without a name.

Each new rule has its invalid vector (tests/test_vectors.py runs them on every path, and the
independent reader of spec/tools); here: the spec's example and the code agree, the writer's
1.4 choices (members' streams bit after bit, ``Positions_Bits`` in the table, no name in a
pack's index entry), that 1.4 files read back like the 1.0 file of the same content on every
path and in the independent reader, that they are smaller than 1.3 files of the project's
adapters, and that every cut and bit flip of a small 1.4 file is refused.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
from file_helpers import (
    check_reads_back_like_1_0,
    check_writer_streams_like_dumps,
    ia3_like,
    kinds,
    mixed_tensors,
    random_ternary,
    refuse_every_cut_and_flip,
    refused_below,
    three_members,
)
from spec_helpers import ROOT, SPEC

from compeft_format import TernaryTensor, dumps, inspect, loads, open_file
from compeft_format import _spec as S
from compeft_format._io import BufferSource
from compeft_format.codecs.golomb import _encode_stream
from compeft_format.convert import compress_file
from compeft_format.layout import bit_pack_data, positions_bits, read_index
from compeft_format.packtable import (
    Member,
    compact_table,
    predicted_bits,
    predicted_size,
    read_column_table,
)


def index_of(data: bytes) -> list[tuple[str, int]]:
    """The index entries of ``data`` as stored (spec 5.6): ``""`` for an entry without a name."""
    at = struct.unpack("<Q", data[-16:-8])[0]
    src = BufferSource(memoryview(data)[at:-16], base=at)
    assert src.u8("index kind") == 0
    return read_index(src, S.DEFAULT_LIMITS, nameless=True)


# ---------------------------------------------------------------------------------------------
# the spec's text and the code
# ---------------------------------------------------------------------------------------------
def test_bit_pack_example_of_the_spec() -> None:
    """Spec 5.11's example: the table of 5.10's example, and a 23-bit data area."""
    section = SPEC[SPEC.index("### 5.11 "):SPEC.index("## 6 Block types")]
    shown = next(t.replace("|", "").split() for t in re.findall(
        r"`([0-9a-f |]{20,})`", SPEC[SPEC.index("### 5.10 "):SPEC.index("### 5.11 ")]))
    payload = _encode_stream(np.array([10, 21]), 23, 64)
    assert positions_bits(S.BLOCK_GOLOMB, payload, 64) == 12 == predicted_bits(
        S.BLOCK_GOLOMB, 23, 64, 2)
    assert "`w · n + L + Σ q + n = 8 + 2 + 0 + 2 = 12`" in section
    members = [Member(b"a.w", "F32", (8,), 1, S.BLOCK_BITMASK, 0, 8),
               Member(b"b.w", "F32", (64,), 2, S.BLOCK_GOLOMB, 23, 12)]
    one = struct.pack("<f", 1.0)
    assert compact_table(members, [one, one], "bits").hex(" ").split() == shown
    t = BufferSource(memoryview(compact_table(members, [one, one], "bits")))
    assert read_column_table(t, 2, None, S.DEFAULT_LIMITS, "bits") == members
    data = bit_pack_data([(b"\x01", 8), (b"\x00", 1), (payload, 12), (b"\x02", 2)])
    assert len(data) == 3
    assert "23 bits in 3 bytes" in section
    # the writer's file of these tensors: a data area of at most 23 bits, padded to A = 8
    tensors = {"a.w": TernaryTensor((8,), [0], [False], 1.0),
               "b.w": TernaryTensor((64,), [10, 21], [False, True], 1.0)}
    file = dumps(tensors, zstd_level=None, positions="auto", version="1.4")
    with open_file(file) as f:
        pack = f._packs[f.info("a.w").offset]
    assert pack.used_bits <= 23
    assert pack.data_size == 8
    assert loads(file) == tensors


def test_predicted_bits_is_the_byte_prediction_before_rounding() -> None:
    for ptype, param, numel, nnz in [(1, 0, 10, 3), (2, 23, 64, 2), (2, 5, 8, 1), (2, 1, 8, 0),
                                     (2, 700, 100_000, 140), (2, 1, 50, 50)]:
        bits = predicted_bits(ptype, param, numel, nnz)
        assert predicted_size(ptype, param, numel, nnz) == -(-bits // 8)


# ---------------------------------------------------------------------------------------------
# the writer's 1.4 choices
# ---------------------------------------------------------------------------------------------
def test_members_streams_follow_each_other_bit_after_bit() -> None:
    tensors = ia3_like()
    data = dumps(tensors, version="1.4")
    assert data[9] == 4
    assert kinds(data) == [S.KIND_BIT_PACK]
    assert index_of(data) == [("", inspect(data).tensors[0].offset)]  # no name (spec 5.6)
    with open_file(data) as f:
        members = [f._record(n) for n in f]
        pack = f._packs[members[0].offset]
    bits = 0
    for m in members:  # each member starts where the one before it ended, to the bit
        assert m.bit_span is not None
        assert 8 * (m.data_start - pack.data_start) + m.bit_span[0] == bits
        bits += m.bit_span[1] + m.nnz
    assert pack.used_bits == bits
    assert pack.data_size == -(-bits // 64) * 8  # rounded up to bytes, then to A


def test_records_keep_their_index_names() -> None:
    tensors = {**ia3_like(1), "m.dense": np.arange(4, dtype=np.float32),
               "z.big": random_ternary((2**19 + 1,), 0.0001, 7, 0.5)}
    data = dumps(tensors, version="1.4")
    assert kinds(data) == [S.KIND_BIT_PACK, S.KIND_DENSE, S.KIND_TERNARY]
    assert [name for name, _ in index_of(data)] == ["", "m.dense", "z.big"]


@pytest.mark.parametrize("adapter", ["lora-minilm-vader", "ia3-minilm-vader"])
def test_the_projects_adapters_are_smaller_in_1_4(adapter: str, tmp_path: Path) -> None:
    """The files compress_file writes in format 1.4 against the same tensors in 1.3."""
    out = tmp_path / "out"
    compress_file(ROOT / "tests" / "data" / adapter, out, density=0.01, format_version="1.4")
    data = (out / "adapter_model.compeft").read_bytes()
    assert inspect(data).version == (1, 4)
    with open_file(data) as f:
        tensors, meta = {n: f.get(n) for n in f}, f.metadata()
    # as the writer writes 1.4, alignment 1 where every tensor is ternary (Appendix D 2, 1.6)
    assert data == dumps(tensors, metadata=meta, version="1.4", alignment=1)
    v13 = dumps(tensors, metadata=meta, version="1.3", alignment=1)
    assert loads(v13) == loads(data)
    # a pack's first name leaves the index (about 60 B) and the streams' byte rounding goes
    # (about 0.9 B a tensor); measured at density 0.01 (alignment 1): (IA)^3 610 -> 540 B
    packs = kinds(data).count(S.KIND_BIT_PACK)
    assert len(data) <= len(v13) - 50 * packs - len(tensors) // 4


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alignment", [1, 8])
@pytest.mark.parametrize("positions", ["auto", "golomb", "bitmask"])
def test_1_4_files_read_back_like_1_0_files(positions: str, alignment: int) -> None:
    check_reads_back_like_1_0(mixed_tensors(), ia3_like(2), "1.4", S.KIND_BIT_PACK, positions,
                              alignment)


def test_writer_streams_the_same_bytes_as_dumps() -> None:
    check_writer_streams_like_dumps(ia3_like(3), "1.4")


def test_a_1_3_reader_refuses_a_bit_pack() -> None:
    """Both new parts are unknown below minor 4 (spec 10.1): a 1.4 file with its minor byte
    set to 3 is refused on every path, at the kind or at the index entry without a name."""
    refused_below(dumps(ia3_like(1), version="1.4"), 3,
                  r"unknown required record kind 0x06|index name length 0 outside")


def test_cuts_and_bit_flips_of_a_1_4_file_are_refused() -> None:
    """Every cut and every single-bit flip is an error on every path (a checksum on every byte)."""
    data = dumps(three_members(), version="1.4")
    assert kinds(data) == [S.KIND_BIT_PACK]
    refuse_every_cut_and_flip(data)
