"""Pack records (spec 5.8, 1.1; column packs, 5.9, 1.2): many small ternary tensors in one record.

The writer packs ternary tensors of at most ``PACK_MEMBER_MAX_NUMEL`` elements (1.1 packs
with ``version="1.1"``, column packs by default); every reader gives back the same tensors as
from the 1.0 file of the same content, and every new rule is enforced on every read path.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from typing import Any

import numpy as np
import pytest
import torch
from file_helpers import READERS, kinds, refuse_every_cut_and_flip

import compeft_format as cf
from compeft_format import TernaryTensor, dumps, inspect, iter_stream, loads, open_file
from compeft_format import _spec as S
from compeft_format._io import encode_varint as varint
from compeft_format.errors import (
    ChecksumError,
    CorruptDataError,
    EncodeError,
    UnsupportedFeatureError,
)


def _ternary(numel: int, density: float, seed: int, dtype: str = "F32",
             shape: tuple[int, ...] | None = None) -> TernaryTensor:
    rng = np.random.default_rng(seed)
    n = int(numel * density)
    idx = np.sort(rng.choice(numel, n, replace=False))
    return TernaryTensor(shape or (numel,), idx, rng.random(n) < 0.5, float(rng.random()), dtype)


def adapter(layers: int = 6, seed: int = 0) -> dict[str, Any]:
    """LoRA-like tensors, a big one that is not packed and a dense one between them."""
    out: dict[str, Any] = {}
    for i in range(layers):
        for m, dtype in (("q", "F32"), ("v", "BF16")):
            stem = f"model.layers.{i}.self_attn.{m}_proj"
            out[f"{stem}.lora_A.weight"] = _ternary(8 * 96, 0.05, seed + 2 * i, dtype, (8, 96))
            out[f"{stem}.lora_B.weight"] = _ternary(96 * 8, 0.3, seed + 2 * i + 1, dtype, (96, 8))
    out["model.layers.3.big"] = _ternary(S.PACK_MEMBER_MAX_NUMEL + 1, 0.01, seed + 99)
    out["model.layers.3.norm"] = np.linspace(-1, 1, 7, dtype=np.float32)
    out["model.layers.3.zero"] = TernaryTensor((0, 4), [], [], 0.0)
    out["model.layers.3.scalar"] = TernaryTensor((), [0], [True], 2.5, "F16")
    return out


def same(a: Any, b: Any) -> bool:
    if isinstance(a, TernaryTensor):
        return a == b
    return np.array_equal(np.asarray(a), np.asarray(b))


PACK_OF = {"1.1": S.KIND_PACK, "1.2": S.KIND_COLUMN_PACK, "1.3": S.KIND_COMPACT_PACK,
           "1.4": S.KIND_BIT_PACK, "1.5": S.KIND_LEAN_PACK, "1.6": S.KIND_TIGHT_PACK,
           "1.7": S.KIND_TWIN_PACK}


@pytest.mark.parametrize("version", ["1.1", "1.2", "1.3", "1.4", "1.5", "1.6", "1.7"])
@pytest.mark.parametrize("positions", ["auto", "golomb", "bitmask"])
@pytest.mark.parametrize("alignment", [1, 8, 64])
def test_packs_read_back_like_the_1_0_file(positions: str, alignment: int, version: str,
                                           ) -> None:
    tensors = adapter()
    new = dumps(tensors, positions=positions, alignment=alignment, version=version)
    old = dumps(tensors, positions=positions, alignment=alignment, version="1.0")
    assert (new[9], old[9]) == (int(version[2]), 0)
    assert PACK_OF[version] in kinds(new)
    assert not set(PACK_OF.values()) & set(kinds(old))
    assert len(new) < len(old)
    want = loads(old)
    got = loads(new)
    assert list(got) == list(want) == sorted(tensors, key=str.encode)
    assert all(same(got[k], want[k]) for k in want)
    assert all(same(v, want[k]) for k, v in iter_stream(io.BytesIO(new)))
    with open_file(new) as f:
        assert f.keys() == list(want)
        for k in want:
            assert same(f.get(k), want[k])
            if isinstance(want[k], TernaryTensor):
                assert np.array_equal(f.get(k, dense=True), want[k].to_numpy())
                assert torch.equal(f.get(k, framework="torch"), want[k].to_torch())
                out = np.full(want[k].shape, 7, want[k].to_numpy().dtype)
                assert f.get(k, dense=True, out=out) is out
                assert np.array_equal(out, want[k].to_numpy())
    assert dumps(got, positions=positions, alignment=alignment, version=version) == new


def test_inspect_lists_members_with_their_blocks() -> None:
    tensors = adapter()
    data = dumps(tensors, version="1.2")  # 1.3 keeps the scales in the table: test_format13
    info = inspect(data)
    assert [t.name for t in info.tensors] == sorted(tensors, key=str.encode)
    member = next(t for t in info.tensors if t.name.endswith("q_proj.lora_A.weight"))
    assert data[member.offset] == S.KIND_COLUMN_PACK
    assert [b.codec for b in member.blocks][1:] == ["signs", "scale"]
    assert all(b.stage == "none" for b in member.blocks)
    assert member.record_size == sum(b.stored_size for b in member.blocks)
    scale = member.blocks[2]
    value = struct.unpack("<f", data[scale.offset : scale.offset + 4])[0]
    assert value == np.float32(loads(data)[member.name].scale)
    big = next(t for t in info.tensors if t.name == "model.layers.3.big")
    assert data[big.offset] == S.KIND_TERNARY


def test_a_pack_closes_when_full_and_at_a_record() -> None:
    """Packs hold at most PACK_DATA_TARGET bytes; a dense tensor ends the pack before it."""
    big_members = {f"t{i:03d}": _ternary(1 << 18, 0.5, i) for i in range(40)}  # ~48 KiB each
    data = dumps(big_members, zstd_level=None)
    packs = [k for k in kinds(data) if k == S.KIND_TWIN_PACK]
    assert len(packs) >= 2
    with open_file(data) as f:
        sizes = {}
        for n in f:
            i = f.info(n)
            sizes[i.offset] = sizes.get(i.offset, 0) + i.record_size
    assert max(sizes.values()) <= S.PACK_DATA_TARGET
    assert loads(data) == big_members
    mixed = {"a": _ternary(10, 0.5, 1), "b": np.ones(2, np.float32), "c": _ternary(10, 0.5, 2)}
    assert kinds(dumps(mixed)) == [S.KIND_TWIN_PACK, S.KIND_DENSE, S.KIND_TWIN_PACK]
    assert kinds(dumps(mixed, version="1.6")) == [S.KIND_TIGHT_PACK, S.KIND_DENSE,
                                                  S.KIND_TIGHT_PACK]
    assert kinds(dumps(mixed, version="1.5")) == [S.KIND_LEAN_PACK, S.KIND_DENSE,
                                                  S.KIND_LEAN_PACK]
    assert kinds(dumps(mixed, version="1.4")) == [S.KIND_BIT_PACK, S.KIND_DENSE, S.KIND_BIT_PACK]
    assert kinds(dumps(mixed, version="1.3")) == [S.KIND_COMPACT_PACK, S.KIND_DENSE,
                                                  S.KIND_COMPACT_PACK]
    assert kinds(dumps(mixed, version="1.2")) == [S.KIND_COLUMN_PACK, S.KIND_DENSE,
                                                  S.KIND_COLUMN_PACK]
    assert kinds(dumps(mixed, version="1.1")) == [S.KIND_PACK, S.KIND_DENSE, S.KIND_PACK]


def test_writer_flush_and_version_option() -> None:
    buf = io.BytesIO()
    with cf.Writer(buf) as w:
        w.write("a", _ternary(100, 0.1, 1))
        before = len(buf.getvalue())
        w.flush()
        assert len(buf.getvalue()) > before  # the pack is out
        w.write("b", _ternary(100, 0.1, 2))
    assert kinds(buf.getvalue()) == [S.KIND_TWIN_PACK, S.KIND_TWIN_PACK]
    assert list(loads(buf.getvalue())) == ["a", "b"]
    for bad in ("2.0", "1.8", "1", (1, 0, 0), "x.y"):
        with pytest.raises(EncodeError, match="version must be one of"):
            dumps({}, version=bad)
    assert dumps({}, version=(1, 0)) == dumps({}, version="1.0")


def test_names_must_increase_across_packs_and_records() -> None:
    buf = io.BytesIO()
    w = cf.Writer(buf)
    w.write("b", _ternary(10, 0.5, 1))
    with pytest.raises(EncodeError, match="increasing order"):
        w.write("a", _ternary(10, 0.5, 1))
    with pytest.raises(EncodeError, match="increasing order"):
        w.write("b", np.ones(1))


# ---------------------------------------------------------------------------------------------
# Hand-built packs: each rule of spec 5.8 on every read path
# ---------------------------------------------------------------------------------------------


def _crc(b: bytes) -> bytes:
    return struct.pack("<I", zlib.crc32(b))


def member_entry(name: bytes, prefix: int = 0, *, dtype: int = 0x01, shape: tuple = (8,),
                 nnz: int = 1, ptype: int = S.BLOCK_BITMASK, param: int = 0,
                 psize: int = 1) -> bytes:
    return (varint(prefix) + varint(len(name) - prefix) + name[prefix:] + bytes([dtype, len(shape)])
            + b"".join(varint(d) for d in shape) + varint(nnz) + bytes([ptype]) + varint(param)
            + varint(psize))


def pack_file(table: bytes, data: bytes, *, name: bytes = b"a", count: int = 1,
              stage: int = 0, decoded: int | None = None, minor: int = 1,
              data_size: int | None = None, index_names: tuple[bytes, ...] | None = None,
              after: bytes = b"") -> bytes:
    """A 1.x file (alignment 1, no metadata) with one pack record and optional records after."""
    header = b"\x89CPFT\r\n\x1a" + bytes([1, minor, 0, 0]) + b"\x00" * 4
    out = header + _crc(header)
    body = (varint(len(name)) + name + varint(count) + bytes([stage]) + varint(len(table))
            + (varint(decoded) if decoded is not None else b"") + table)
    size = len(data) if data_size is None else data_size
    head = bytes([S.KIND_PACK]) + varint(len(body) + 8) + varint(size) + body + _crc(data)
    offsets = [len(out)]
    out += head + _crc(head) + data + after
    if after:
        offsets.append(len(out) - len(after))
    names = index_names or ((name,) if not after else (name, b"z"))
    index = b"\x00" + varint(len(names)) + b"".join(
        varint(len(n)) + n + varint(o) for n, o in zip(names, offsets, strict=True))
    return out + index + struct.pack("<Q", len(out)) + _crc(index) + b"CPFE"


def dense_record(name: bytes) -> bytes:
    body = varint(len(name)) + name + b"\x09\x01\x01\x01" + b"\x05\x00\x00\x01"
    data = b"\x07"
    head = b"\x02" + varint(len(body) + 8) + varint(1) + body + _crc(data)
    return head + _crc(head) + data


# coded against the pack's name "a": 8 F32 elements, position 0 (bitmask 0x01), sign +, scale 1
ONE = member_entry(b"a", 1)
ONE_DATA = b"\x01" + b"\x00" + struct.pack("<f", 1.0)


def test_hand_built_pack_decodes() -> None:
    data = pack_file(ONE, ONE_DATA)
    assert loads(data)["a"] == TernaryTensor((8,), [0], [False], 1.0)
    two = ONE + member_entry(b"ab", 1, shape=(2,), nnz=2, ptype=S.BLOCK_GOLOMB, param=1, psize=1)
    data = pack_file(two, ONE_DATA + b"\x03" + b"\x02" + struct.pack("<f", 0.5), count=2)
    got = loads(data)
    assert got["ab"] == TernaryTensor((2,), [0, 1], [False, True], 0.5)
    with open_file(data) as f:
        assert f.keys() == ["a", "ab"]


def _bad(table: bytes = ONE, data: bytes = ONE_DATA, **kw: Any) -> bytes:
    return pack_file(table, data, **kw)


zstd_table = cf.codecs.ZSTD.encode(ONE * 1, 3)

CASES = {
    "pack in a 1.0 file": (_bad(minor=0), UnsupportedFeatureError,
                           "unknown required record kind 0x03"),
    "no member": (_bad(table=b"", count=0), CorruptDataError, "at least one member"),
    "table stage": (_bad(stage=2), UnsupportedFeatureError, "unknown stage 0x02"),
    "table too big": (_bad(stage=1, decoded=S.PACK_TABLE_MAX + 1, table=zstd_table),
                      CorruptDataError, "pack table: decoded size"),
    "first prefix": (_bad(table=member_entry(b"aa", 2)), CorruptDataError,
                     "prefix length 2 exceeds the previous name's 1 bytes"),
    "first name": (_bad(name=b"b", table=member_entry(b"a", 0)), CorruptDataError,
                   "the first member is named 'a', the pack 'b'"),
    "member order": (_bad(table=ONE + member_entry(b"a", 1), count=2,
                          data=ONE_DATA * 2), CorruptDataError,
                     "pack member names must increase; 'a' follows 'a'"),
    "positions type": (_bad(table=member_entry(b"a", ptype=S.BLOCK_SIGNS)), CorruptDataError,
                       "pack member positions type 0x03 is not bitmask or golomb"),
    "table tail": (_bad(table=ONE + b"\x00"), CorruptDataError,
                   "1 unexpected bytes at the end of the pack table"),
    "data size": (_bad(data_size=7, data=ONE_DATA + b"\x00"), CorruptDataError,
                  re.escape("data size 7 does not match the pack's members (6)")),
    "data checksum": (_bad().replace(ONE_DATA, b"\x02" + ONE_DATA[1:]), ChecksumError,
                      "data checksum mismatch"),
    "member payload": (_bad(table=member_entry(b"a", nnz=2)), CorruptDataError,
                       "signs block|bitmask block"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_pack_rule_is_enforced_on_every_path(case: str) -> None:
    data, cls, pattern = CASES[case]
    for reader in READERS.values():
        with pytest.raises(cls, match=pattern):
            reader(data)


def test_the_next_record_must_follow_the_last_member() -> None:
    table = ONE + member_entry(b"az", 1)
    ok = pack_file(table, ONE_DATA * 2, count=2, after=dense_record(b"z"))
    assert list(loads(ok)) == ["a", "az", "z"]
    bad = pack_file(table, ONE_DATA * 2, count=2, after=dense_record(b"ab"),
                    index_names=(b"a", b"ab"))
    for reader in READERS.values():
        with pytest.raises(CorruptDataError, match=r"'ab' follows 'az'|not below the next record"):
            reader(bad)


def test_truncations_and_bit_flips_of_a_pack_are_refused() -> None:
    """Every cut and every single-bit flip of a small 1.1 file is an error on every path."""
    data = dumps({"a": _ternary(64, 0.2, 1), "ab": _ternary(40, 0.3, 2, "BF16")},
                 metadata={"m": 1}, version="1.1")  # 1.2: tests/test_format12.py
    # Version_Minor (byte 9): 1.0 and 1.3 readers reject or read the same
    refuse_every_cut_and_flip(data, unchecked=[9])
