"""Format 1.5 (spec 5.12): lean packs, whose members' stream lengths are read, not stored.

Each new rule has its invalid vector (tests/test_vectors.py runs them on every path, and the
independent reader of spec/tools); here: the spec's example and the code agree, a golomb
stream's length found by reading it is the length the encoder wrote, the writer's 1.5
choices, that 1.5 files read back like the 1.0 file of the same content on every path and
in the independent reader (members read in any order, ``info`` before any data), that they
are smaller than 1.4 files of the project's adapters, and that every cut and bit flip of a
small 1.5 file is refused.
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
from compeft_format.codecs.golomb import _encode_stream, _small_stream_bits, stream_bits
from compeft_format.convert import compress_file
from compeft_format.layout import positions_bits
from compeft_format.packtable import Member, compact_table


# ---------------------------------------------------------------------------------------------
# the spec's text and the code
# ---------------------------------------------------------------------------------------------
def test_lean_pack_example_of_the_spec() -> None:
    """Spec 5.12's example: 5.10's table without column 10, and b.w's 12-bit stream."""
    section = SPEC[SPEC.index("### 5.12 "):SPEC.index("## 6 Block types")]
    shown = next(t.replace("|", "").split() for t in re.findall(
        r"`([0-9a-f |]{20,})`", SPEC[SPEC.index("### 5.10 "):SPEC.index("### 5.11 ")]))
    members = [Member(b"a.w", "F32", (8,), 1, S.BLOCK_BITMASK, 0, -1),
               Member(b"b.w", "F32", (64,), 2, S.BLOCK_GOLOMB, 23, -1)]
    one = struct.pack("<f", 1.0)
    lean = compact_table(members, [one, one], "none").hex(" ").split()
    assert shown[:22] + shown[24:] == lean  # column 10: the two bytes "00 00" at 22
    assert shown[22:24] == ["00", "00"]
    stream = np.frombuffer(_encode_stream(np.array([10, 21]), 23, 64), np.uint8)
    assert stream_bits(stream, 0, 2, 23, 64, 8 * stream.size) == 12
    assert "12 bits in all" in section


@settings(max_examples=200, deadline=None)
@given(numel=st.integers(1, 5000), data=st.data())
def test_a_golomb_streams_length_read_from_it_is_the_encoders(numel: int, data: Any) -> None:
    n = data.draw(st.integers(1, min(numel, 300)))
    idx = np.array(sorted(data.draw(st.sets(st.integers(0, numel - 1), min_size=n,
                                             max_size=n))), dtype=np.int64)
    m = data.draw(st.integers(1, numel))
    payload = _encode_stream(idx, m, numel)
    bits = positions_bits(S.BLOCK_GOLOMB, payload, numel)
    shift = data.draw(st.integers(0, 7))  # mid-byte, after other streams' bits
    buf = np.frombuffer((int.from_bytes(payload, "little") << shift).to_bytes(
        len(payload) + 1, "little"), np.uint8)
    assert stream_bits(buf, shift, n, m, numel, 8 * buf.size) == bits
    assert stream_bits(buf, shift, n, m, numel, shift + bits - 1) is None  # one bit short
    # short streams are read as a Python int: the same answers
    assert _small_stream_bits(buf, shift, n, m, numel, 8 * buf.size) == bits
    assert _small_stream_bits(buf, shift, n, m, numel, shift + bits - 1) is None


def test_stream_bits_in_small_steps_finds_the_same_lengths(monkeypatch) -> None:
    """The planes and the unary part of a long stream are read with numpy in steps (bounded
    memory on hostile streams): steps of 16 bits, and no stream read as one Python int, give
    the lengths of one step."""
    from compeft_format.codecs import golomb
    rng = np.random.default_rng(3)
    cases = []
    for numel, n, m in [(4000, 300, 9), (4000, 300, 16), (50, 50, 1), (9000, 40, 150),
                        (600, 599, 3), *((int(k), int(k) // 7 + 1, int(k) // 50 + 1)
                                         for k in rng.integers(10, 20000, 40))]:
        idx = np.sort(rng.choice(numel, n, replace=False))
        payload = golomb._encode_stream(idx, m, numel)
        cases.append((np.frombuffer(payload, np.uint8), n, m, numel,
                      positions_bits(S.BLOCK_GOLOMB, payload, numel)))
    monkeypatch.setattr(golomb, "_SCAN_BITS", 16)
    monkeypatch.setattr(golomb, "_SMALL_STREAM_BITS", 0)
    for buf, n, m, numel, bits in cases:
        assert golomb.stream_bits(buf, 0, n, m, numel, 8 * buf.size) == bits
        assert golomb.stream_bits(buf, 0, n, m, numel, bits - 1) is None


# ---------------------------------------------------------------------------------------------
# the writer's 1.5 choices
# ---------------------------------------------------------------------------------------------
def test_members_are_placed_by_reading_their_streams() -> None:
    tensors = ia3_like()
    data = dumps(tensors, version="1.5")
    assert data[9] == 5
    assert kinds(data) == [S.KIND_LEAN_PACK]
    with open_file(data) as f:
        pack = next(iter(f._packs.values()))
        assert pack.used_bits == -1  # the table is read at open; the data area is not
        infos = {n: f.info(n) for n in f}  # info places them: it reads the data area
        assert pack.used_bits > 0
        bits = 0
        for name in f:
            positions, signs = infos[name].blocks[:2]
            assert 8 * (positions.offset - pack.data_start) + positions.first_bit == bits
            assert positions.bits == positions_bits(positions.block_type,
                                                    _payload(tensors[name]),
                                                    tensors[name].numel)
            assert signs.bits == tensors[name].nnz
            bits += positions.bits + signs.bits
        assert pack.used_bits == bits


def _payload(t: TernaryTensor) -> bytes:
    """``t``'s positions payload as a 1.4 writer stores it (the stream the lean pack holds)."""
    with open_file(dumps({"t": t}, version="1.3", zstd_level=None)) as f:
        b = f.info("t").blocks[0]
        raw = f._buf[b.offset:b.offset + b.stored_size]
    return bytes(raw)


@pytest.mark.parametrize("adapter", ["lora-minilm-vader", "ia3-minilm-vader"])
def test_the_projects_adapters_are_smaller_in_1_5(adapter: str, tmp_path: Path) -> None:
    """The files compress_file writes in format 1.5 against the same tensors in 1.4."""
    out = tmp_path / "out"
    compress_file(ROOT / "tests" / "data" / adapter, out, density=0.01,
                  format_version="1.5")
    data = (out / "adapter_model.compeft").read_bytes()
    assert inspect(data).version == (1, 5)
    with open_file(data) as f:
        tensors, meta = {n: f.get(n) for n in f}, f.metadata()
    # what the command writes: alignment 1 where every tensor is ternary (1.6, Appendix D)
    assert data == dumps(tensors, metadata=meta, version="1.5", alignment=1)
    v14 = dumps(tensors, metadata=meta, version="1.4", alignment=1)
    assert loads(v14) == loads(data)
    # measured at density 0.01 (alignment 1): (IA)^3 540 -> 521 B, LoRA 3,496 -> 3,454 B
    assert len(data) <= len(v14) - len(tensors) // 2


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alignment", [1, 8])
@pytest.mark.parametrize("positions", ["auto", "golomb", "bitmask"])
def test_1_5_files_read_back_like_1_0_files(positions: str, alignment: int) -> None:
    check_reads_back_like_1_0(mixed_tensors(), ia3_like(2), "1.5", S.KIND_LEAN_PACK, positions,
                              alignment)


def test_writer_streams_the_same_bytes_as_dumps() -> None:
    check_writer_streams_like_dumps(ia3_like(3), "1.5")


def test_a_1_4_reader_refuses_a_lean_pack() -> None:
    """The kind is unknown below minor 5 (spec 10.1): a 1.5 file with its minor byte set to 4."""
    refused_below(dumps(ia3_like(1), version="1.5"), 4, "unknown required record kind 0x07")


def test_cuts_and_bit_flips_of_a_1_5_file_are_refused() -> None:
    """Every cut and every single-bit flip is an error on every path (a checksum on every byte)."""
    data = dumps(three_members(), version="1.5")
    assert kinds(data) == [S.KIND_LEAN_PACK]
    refuse_every_cut_and_flip(data)
