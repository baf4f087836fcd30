"""Format 1.7 (spec 5.14, 7.1, 5.7): twin packs, unsized bare frames and the short trailer.

A twin pack member whose positions and signs are an earlier member's stores none of its own;
the metadata frame and a twin pack's table frame carry their decoded size only in the frame
header; the trailer gives the index's size in 4 bytes. Exact bytes where the spec gives them,
every read path, the writer's choices (Appendix D), older readers' refusals, damage.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from file_helpers import (
    READERS,
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
from spec_helpers import ROOT

import compeft_format as cf
from compeft_format import TernaryTensor, dumps, inspect, loads, open_file
from compeft_format import _spec as S
from compeft_format._io import BufferSource
from compeft_format.convert import compress_file
from compeft_format.errors import CorruptDataError
from compeft_format.packtable import Member, compact_table, read_column_table


def _bert_layers(layers: int = 3) -> dict[str, TernaryTensor]:
    """(IA)^3-like layers whose value vector is the attention output's, other orientation."""
    out = {}
    for name, t in ia3_like(layers).items():
        out[name] = t
        if ".attention.self.value." in name:
            out[name.replace("attention.self.value", "attention.output.dense")] = (
                TernaryTensor((1, t.numel), t.indices, t.signs, t.scale))
    return out


def _twins(data: bytes) -> list[str]:
    """The tensors of ``data`` that take no bytes though they have nonzeros: the twins."""
    return [t.name for t in inspect(data).tensors if t.nnz and t.record_size == 0]


# ---------------------------------------------------------------------------------------------
# exact bytes
# ---------------------------------------------------------------------------------------------
def test_the_spec_example_table() -> None:
    """Spec 5.14's example: 'a.w' (8 elements, bitmask) and its twin 'b.w' (shape (2, 4))."""
    a = Member(b"a.w", "F32", (8,), 1, S.BLOCK_BITMASK, 0, 8)
    b = Member(b"b.w", "F32", (2, 4), 1, S.BLOCK_BITMASK, 0, 8, twin=1)
    one = struct.pack("<f", 1.0)
    table = compact_table([a, b], [one, one], "none", tight=True, twins=True)
    # columns 1 to 6 of both, Twin_Back 00 01, columns 7 to 9 of 'a.w' alone, 11 and 12
    assert table.hex(" ") == ("00 00 03 03 61 2e 77 62 2e 77 01 01 01 02 08 02 04 00 01 "
                              "01 01 00 00 01 3f 80 00 00")
    rows = read_column_table(BufferSource(memoryview(table)), 2, None, S.DEFAULT_LIMITS,
                             "none", twins=True)
    # the twin gets its source's nnz, type and param; its name and shape are its own
    assert [(r.name, r.shape, r.nnz, r.ptype, r.param, r.twin) for r in rows] == [
        (b"a.w", (8,), 1, S.BLOCK_BITMASK, 0, 0), (b"b.w", (2, 4), 1, S.BLOCK_BITMASK, 0, 1)]


def test_the_default_writes_1_7() -> None:
    meta = {"compeft.producer": "compeft_format 0.1.0", "note": "x" * 80}
    data = dumps(_bert_layers(2), metadata=meta)
    flags = (S.FLAG_METADATA_ZSTD | S.FLAG_METADATA_BARE | S.FLAG_METADATA_UNSIZED
             | S.FLAG_SHORT_TRAILER)
    assert data[8:12] == bytes([1, 7, 3, flags])
    assert kinds(data) == [S.KIND_TWIN_PACK]
    assert S.ZSTD_MAGIC not in data
    # the short trailer: the index's size, its checksum, the tail magic
    size, _crc, tail = S.SHORT_TRAILER.unpack(data[-12:])
    assert tail == S.TAIL_MAGIC
    assert data[len(data) - 12 - size] == S.KIND_END
    # JSON under 64 bytes is stored as it is: no metadata flag, the trailer's still
    small = dumps(ia3_like(1), metadata={"a": 1})
    assert small[11] == S.FLAG_SHORT_TRAILER
    plain = dumps(_bert_layers(2), metadata=meta, zstd_level=None)
    assert plain[11] == S.FLAG_SHORT_TRAILER
    assert loads(plain) == loads(data)
    with open_file(data) as f:
        assert f.metadata() == meta


# ---------------------------------------------------------------------------------------------
# twins
# ---------------------------------------------------------------------------------------------
def test_twins_read_back_on_every_path() -> None:
    tensors = _bert_layers(3)
    data = dumps(tensors)
    twins = _twins(data)
    assert twins == sorted(n for n in tensors if ".attention.self.value." in n)
    for read in READERS.values():
        assert read(data) == tensors
    with open_file(data) as f:
        for name in reversed(twins):  # a twin asked for first reads its source's streams
            value = f.get(name, dense=True)
            assert np.array_equal(value, tensors[name].to_numpy())
            assert f.info(name).blocks[0].offset == f.info(
                name.replace("attention.self.value", "attention.output.dense")).blocks[0].offset


def test_a_twin_keeps_its_own_shape_dtype_and_scale() -> None:
    a = random_ternary((64,), 0.2, 1, 0.5)
    tensors = {"a": a, "b": TernaryTensor((8, 8), a.indices, a.signs, 0.75, "BF16"),
               "c": random_ternary((64,), 0.2, 2, 0.5),
               "d": TernaryTensor((2, 32), a.indices, a.signs, 1.5, "F16"),
               "e": TernaryTensor((64,), a.indices, ~np.asarray(a.signs), 0.5),
               "z": TernaryTensor.zeros((64,)), "zz": TernaryTensor.zeros((64,))}
    data = dumps(tensors)
    # the first member with the same streams is the source; one sign differs: not a twin;
    # empty members take no bits anyway and are not made twins
    assert _twins(data) == ["b", "d"]
    assert loads(data) == tensors
    assert loads(dumps(tensors, version="1.6")) == tensors
    assert len(data) < len(dumps(tensors, version="1.6")) - 2 * 8


def test_twins_stay_within_the_decode_budget() -> None:
    """A twin adds a decoding but no bytes (spec 9.3, Appendix D 6): the writer makes twins
    only while every charge stays within 64 times the file's bytes, without the 64 MiB
    floor, which the members after them could not make up for."""
    full = TernaryTensor((4096,), np.arange(4096), np.zeros(4096, bool), 0.5)
    tensors = {f"t{i:02d}": full for i in range(40)}  # each decoding charged 40,960 bytes,
    data = dumps(tensors, zstd_level=None)  # 41 times its 1,001 bytes of streams
    twins = _twins(data)
    assert 5 < len(twins) < 35  # as many twins as 64 - 41 bytes a stored copy leaves room for
    assert loads(data, limits=cf.ReadLimits(max_decoded_bytes=64 * len(data))) == tensors
    with pytest.raises(cf.LimitExceededError):  # each twin is charged as its source
        loads(data, limits=cf.ReadLimits(max_decoded_bytes=40 * 40960 - 1))


def test_a_twin_is_only_made_within_its_pack() -> None:
    """A twin's source is a member of the same pack (spec 5.14); a flush ends the pack."""
    import io

    a = random_ternary((64,), 0.2, 1, 0.5)
    buf = io.BytesIO()
    with cf.Writer(buf) as w:
        w.write("a", a)
        w.flush()
        w.write("b", a)
        w.write("c", a)
    assert kinds(buf.getvalue()) == [S.KIND_TWIN_PACK, S.KIND_TWIN_PACK]
    assert _twins(buf.getvalue()) == ["c"]
    assert loads(buf.getvalue()) == {"a": a, "b": a, "c": a}


# ---------------------------------------------------------------------------------------------
# the project's adapters
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("density", [0.01, 0.05])
def test_the_projects_ia3_has_twins_and_is_smaller(density: float, tmp_path: Path) -> None:
    """PEFT's default (IA)^3 of a BERT model: each layer's value and attention-output vectors
    compress to one ternary tensor (spec 5.14); measured 482 -> 446 B at 0.01, 975 -> 867 B
    at 0.05."""
    adapter = ROOT / "tests" / "data" / "ia3-minilm-vader"
    compress_file(adapter, tmp_path / "v17", density=density)
    compress_file(adapter, tmp_path / "v16", density=density, format_version="1.6")
    v17 = (tmp_path / "v17" / "adapter_model.compeft").read_bytes()
    v16 = (tmp_path / "v16" / "adapter_model.compeft").read_bytes()
    assert inspect(v17).version == (1, 7)
    assert loads(v17) == loads(v16)
    assert all(".attention.self.value." in n for n in _twins(v17))
    assert len(_twins(v17)) >= 5
    assert len(v17) <= len(v16) - (30 if density == 0.01 else 100)


# ---------------------------------------------------------------------------------------------
# reading, writing, older readers, damage
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alignment", [1, 8])
@pytest.mark.parametrize("positions", ["auto", "golomb", "bitmask"])
def test_1_7_files_read_back_like_1_0_files(positions: str, alignment: int) -> None:
    twins = _bert_layers(2)  # pack members, some of them twins, asked for first
    check_reads_back_like_1_0(mixed_tensors() | twins, twins, "1.7", S.KIND_TWIN_PACK,
                              positions, alignment)


def test_writer_streams_the_same_bytes_as_dumps() -> None:
    check_writer_streams_like_dumps(_bert_layers(3), "1.7", metadata={"note": "y" * 100})


def test_a_1_6_reader_refuses_a_1_7_file_at_its_header() -> None:
    """Flags bits 2 and 3 are Reserved below minor 7 (spec 5.1, 10.1): a 1.7 file with its
    minor byte set to 6 is refused before its frame header is read as a size."""
    refused_below(dumps(_bert_layers(1)), 6, r"reserved header flags must be zero \(got 0x08\)")
    refused_below(dumps(_bert_layers(1), metadata={"note": "z" * 100}), 6,
                  r"reserved header flags must be zero \(got 0x0f\)")


def test_cuts_and_bit_flips_of_a_1_7_file_are_refused() -> None:
    """Every cut and every single-bit flip is an error on every path (a checksum on every
    byte), with a twin among the members."""
    tensors = three_members()
    tensors["c"] = TernaryTensor((8, 8), tensors["a"].indices, tensors["a"].signs, 0.25)
    data = dumps(tensors, metadata={"compeft.producer": "x" * 70})
    assert kinds(data) == [S.KIND_TWIN_PACK]
    assert _twins(data) == ["c"]
    assert data[11] == 0x0F
    refuse_every_cut_and_flip(data)


def test_an_unsized_frame_is_read_from_its_header() -> None:
    """Spec 7.1 (1.7): the frame's own content size stands for the field; a frame without
    one is refused before anything is decompressed (R-ZST-3)."""
    from compeft_format.codecs.zstd_stage import ZSTD

    frame = ZSTD.encode(b"ab" * 300, 3, bare=True)
    assert ZSTD.declared_size(frame, None, bare=True) == 600
    import zstandard

    sizeless = zstandard.ZstdCompressor(write_content_size=False).compress(b"ab" * 300)[4:]
    with pytest.raises(ValueError, match="declares no content size"):
        ZSTD.declared_size(sizeless, None, bare=True)
    with pytest.raises(ValueError, match="bad frame header"):  # the magic twice
        ZSTD.declared_size(S.ZSTD_MAGIC + frame, None, bare=True)


def test_a_twin_that_reaches_too_far_is_refused() -> None:
    """R-TWN-1 on the package's own table reader (the vectors cover every path)."""
    a = Member(b"a", "F32", (8,), 1, S.BLOCK_BITMASK, 0, 8)
    b = Member(b"b", "F32", (8,), 1, S.BLOCK_BITMASK, 0, 8, twin=2)
    one = struct.pack("<f", 1.0)
    table = compact_table([a, b], [one, one], "none", tight=True, twins=True)
    with pytest.raises(CorruptDataError, match="twin back 2 reaches before the first member"):
        read_column_table(BufferSource(memoryview(table)), 2, None, S.DEFAULT_LIMITS, "none",
                          twins=True)


def test_info_names_a_twin_and_its_source(tmp_path: Path, capsys) -> None:
    """``inspect`` and ``compeft info`` say which tensor a twin reads (spec 5.14)."""
    import json

    from cli_helpers import run

    tensors = _bert_layers(1)
    path = tmp_path / "t.compeft"
    path.write_bytes(dumps(tensors))
    twin = "base_model.model.encoder.layer.0.attention.self.value.ia3_l"
    source = "base_model.model.encoder.layer.0.attention.output.dense.ia3_l"
    by_name = {t.name: t for t in inspect(path).tensors}
    assert by_name[twin].twin_of == source
    assert by_name[twin].record_size == 0
    assert {n for n, t in by_name.items() if t.twin_of} == {twin}
    code, out, _ = run(capsys, "info", path)
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith(twin))
    assert row.split()[5:7] == ["twin", "0"]
    code, out, _ = run(capsys, "info", "--json", path)
    rows = {t["name"]: t for t in json.loads(out)["tensors"]}
    assert (rows[twin]["twin_of"], rows[source]["twin_of"]) == (source, None)
