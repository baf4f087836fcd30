#!/usr/bin/env python
"""An independent compeft 1.7 decoder (and so 1.6 to 1.0), written from spec/FORMAT.md alone.

It exists to check that the specification is enough to write a compatible reader: it imports
nothing from ``compeft_format``, only the standard library and ``zstandard``, and follows the
numbered steps of FORMAT.md §8. It is slow (pure Python bit handling) and meant for test
vectors, not for real files.

Decoded content has the JSON form of the vectors (FORMAT.md §12)::

    {"metadata": {...}, "tensors": [{"name", "kind", "shape", "dtype", ...}, ...]}

Every rejection raises :class:`SpecError` with the rule ID of FORMAT.md §9.1.

Usage: ``python spec/tools/reference_reader.py FILE [--random]`` prints the content as JSON.
"""

from __future__ import annotations

import json
import math
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zstandard

# §5.1, §5.7
MAGIC = bytes.fromhex("89435046540d0a1a")
TAIL_MAGIC = b"CPFE"
ZSTD_MAGIC = bytes.fromhex("28b52ffd")
# §5.4.2: code -> (name, item size, may a ternary record have it)
DTYPES = {
    0x01: ("F32", 4, True), 0x02: ("F16", 2, True), 0x03: ("BF16", 2, True),
    0x04: ("F64", 8, True), 0x05: ("I8", 1, False), 0x06: ("I16", 2, False),
    0x07: ("I32", 4, False), 0x08: ("I64", 8, False), 0x09: ("U8", 1, False),
    0x0A: ("U16", 2, False), 0x0B: ("U32", 4, False), 0x0C: ("U64", 8, False),
    0x0D: ("BOOL", 1, False), 0x0E: ("F8_E4M3", 1, False), 0x0F: ("F8_E5M2", 1, False),
}
# §5.5
ROLES = {0x01: "positions", 0x02: "positions", 0x03: "signs", 0x04: "scale", 0x05: "dense"}
OPTIONAL = 0x80
MAX_HEADER_LENGTH = 65536  # §5.3
PACK = 0x03  # §5.8, from Version_Minor 1
COLUMN_PACK = 0x04  # §5.9, from Version_Minor 2
COMPACT_PACK = 0x05  # §5.10, from Version_Minor 3
BIT_PACK = 0x06  # §5.11, from Version_Minor 4
LEAN_PACK = 0x07  # §5.12, from Version_Minor 5
TIGHT_PACK = 0x08  # §5.13, from Version_Minor 6
TWIN_PACK = 0x09  # §5.14, from Version_Minor 7
PACKS = (PACK, COLUMN_PACK, COMPACT_PACK, BIT_PACK, LEAN_PACK, TIGHT_PACK, TWIN_PACK)
# no Name in the body; in a file of minor 4 or more an index entry may have none (§5.6)
UNNAMED = (COMPACT_PACK, BIT_PACK, LEAN_PACK, TIGHT_PACK, TWIN_PACK)
# members placed by reading their streams (§5.12 to §5.14), with the kind R-LPK-1 names
PLACED = {LEAN_PACK: "lean", TIGHT_PACK: "tight", TWIN_PACK: "twin"}
MAX_PACK_TABLE = 1_048_576  # §5.8
METADATA_ZSTD = 0x01  # §5.1 Flags bit 0, from Version_Minor 2
METADATA_BARE = 0x02  # §5.1 Flags bit 1, from Version_Minor 6: the metadata frame is bare
METADATA_UNSIZED = 0x04  # §5.1 Flags bit 2, from Version_Minor 7: no Metadata_Decoded_Size
SHORT_TRAILER = 0x08  # §5.1 Flags bit 3, from Version_Minor 7: the 12-byte trailer (§5.7)
# §7.3: the metadata dictionary, the lines of the spec's block joined without line endings
METADATA_DICTIONARY = "".join((
    '"IA3","LOHA","LOKR","role","tensor","zero","one","norm","gram","kron","kron_sketch",',
    '"lora_product","lora_product_out","auto","hifi","F16","BF16","F32",',
    '"hashes":{"model.safetensors":"sha256:"},"revision":"main",',
    '"compeft_format.hifi":{"dtypes":[null,"F32"],"steps":[0.0001,null],"version":1},',
    '"compeft.compression":{"lora_fit":{"proj_scale":0.01,"selection":"proj_vcap"},',
    '"method":"hifi","rel_step":0.01},',
    '"compeft.base":{"name":"peft-init:","peft_init":{"init_lora_weights":true,"peft":"0.1",',
    '"seed":0,"torch":"2.0.0+cpu","transformers":"4.0"},"sha256":"sha256:"},',
    '"task_vector":{"delta":[],"exclude":[],"peft_type":"LORA","reference":"zero"}}',
    '{"compeft.base":{"digests":"","name":"init","sha256":"sha256:"},',
    '"compeft.compression":{"alpha":1.0,"density":0.1,"method":"compeft",',
    '"scale":"proj_vcap","scope":"global"},"compeft.producer":"compeft_format 0.1.0",',
    '"safetensors.metadata":{"format":"pt"},',
    '"task_vector":{"delta_all_but":[],"exclude":[],"peft_type":"LORA","reference":"checkpoint"}}',
)).encode("ascii")
# §7.4: the name dictionary (compact pack tables, Table_Stage 2), joined the same way
NAME_DICTIONARY = "".join((
    "lora_magnitude_vector.lora_embedding_A.lora_embedding_B.hada_w1_a.hada_w1_b.hada_w2_a.",
    "hada_w2_b.lokr_w1.lokr_w2.oft_r.ia3_l.lora_E.weight.bias.",
    "vision_model.encoder.layers.0.self_attn.out_proj.mlp.fc1.fc2.layer_norm1.",
    "text_model.encoder.layers.0.self_attn.k_proj.",
    "model.decoder.layers.0.encoder_attn.q_proj.self_attn_layer_norm.final_layer_norm.",
    "model.encoder.layers.0.self_attn.v_proj.",
    "gpt_neox.layers.0.attention.query_key_value.dense.mlp.dense_h_to_4h.dense_4h_to_h.",
    "transformer.h.0.self_attention.query_key_value.dense.",
    "transformer.h.0.attn.c_attn.c_proj.mlp.c_fc.c_proj.",
    "encoder.block.0.layer.0.SelfAttention.q.k.v.o.",
    "decoder.block.0.layer.1.EncDecAttention.q.v.layer.2.DenseReluDense.wi_0.wi_1.wo.",
    "roberta.encoder.layer.0.attention.self.query.key.value.",
    "bert.encoder.layer.0.attention.output.dense.intermediate.dense.output.dense.",
    "model.layers.0.block_sparse_moe.experts.0.w1.w2.w3.gate.",
    "model.layers.0.self_attn.qkv_proj.o_proj.mlp.gate_up_proj.down_proj.",
    "base_model.model.lm_head.base_model.model.model.embed_tokens.",
    "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight",
    "base_model.model.encoder.layer.0.attention.self.value.lora_B.weight",
    "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight",
    "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight",
    "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
    "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight",
    "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight",
    "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight",
)).encode("ascii")
JSON_INT_MAX = 2**53 - 1  # §5.2
VARINT_MAX = 2**63 - 1  # §2.3


class SpecError(Exception):
    """A file broke rule ``rule`` of FORMAT.md §9.1."""

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(f"{rule}: {detail}")
        self.rule = rule


@dataclass(frozen=True)
class Limits:
    """The limits of FORMAT.md §9.2, with their defaults."""

    max_metadata_size: int = 16 * 2**20
    max_metadata_depth: int = 64
    max_index_size: int = 256 * 2**20
    max_tensors: int = 1_000_000
    max_ndim: int = 16
    max_name_length: int = 4096
    max_numel: int = 2**48
    max_decoded_bytes: int | None = None


def crc32(data: bytes) -> int:
    """CRC-32/ISO-HDLC (§2.4)."""
    return zlib.crc32(data) & 0xFFFFFFFF


def align(x: int, a: int) -> int:
    """The smallest multiple of ``a`` not less than ``x`` (§2.1)."""
    return -(-x // a) * a


class Cursor:
    """Reads from ``data[pos:end]``; reading past ``end`` breaks R-EOF-1 (§4)."""

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data, self.pos = data, pos
        self.end = len(data) if end is None else end

    def take(self, n: int, what: str) -> bytes:
        if n > self.end - self.pos:
            raise SpecError("R-EOF-1", f"{what}: {n} bytes needed, {self.end - self.pos} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def varint(self, what: str) -> int:
        """§2.3: LEB128, minimal, at most 10 bytes, at most 2^63 - 1."""
        value = 0
        for i in range(10):
            byte = self.u8(what)
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                if byte == 0 and i > 0:
                    raise SpecError("R-VAR-1", f"{what}: not minimal")
                if value > VARINT_MAX:
                    raise SpecError("R-VAR-2", f"{what}: {value}")
                return value
        raise SpecError("R-VAR-3", f"{what}: more than 10 bytes")

    def left(self) -> int:
        return self.end - self.pos


def check_zero(data: bytes, rule: str) -> None:
    """Padding bytes are zero."""
    if any(data):
        raise SpecError(rule, "padding byte not zero")


def read_name(c: Cursor, limits: Limits, empty: bool = False) -> str:
    """§5.4.1: Name_Length and Name (``empty``: an index entry of a 1.4 file, §5.6, whose
    Name_Length may be 0, the empty name "")."""
    n = c.varint("Name_Length")
    if not (0 if empty else 1) <= n <= limits.max_name_length:
        raise SpecError("R-NAME-1", f"Name_Length {n}")
    return decode_name(c.take(n, "Name"))


def decode_name(raw: bytes) -> str:
    """A name's bytes as text (§5.4.1): UTF-8 (R-NAME-2) without NUL (R-NAME-3)."""
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError("R-NAME-2", repr(raw)) from None
    if "\x00" in name:
        raise SpecError("R-NAME-3", repr(name))
    return name


# ---------------------------------------------------------------------------------------------
# §5.1, §5.2: header and metadata
# ---------------------------------------------------------------------------------------------


@dataclass
class Header:
    alignment: int
    metadata: dict[str, Any]
    first: int  #: P: where the first record (or the index) starts
    minor: int = 0
    flags: int = 0

    @property
    def kinds(self) -> tuple[int, ...]:
        """§5.3: the required kinds this file may hold."""
        return ((0x01, 0x02) + (PACK,) * (self.minor >= 1) + (COLUMN_PACK,) * (self.minor >= 2)
                + (COMPACT_PACK,) * (self.minor >= 3) + (BIT_PACK,) * (self.minor >= 4)
                + (LEAN_PACK,) * (self.minor >= 5) + (TIGHT_PACK,) * (self.minor >= 6)
                + (TWIN_PACK,) * (self.minor >= 7))

    @property
    def unnamed_entries(self) -> bool:
        """§5.6 (1.4): the entry of a compact, bit, lean, tight or twin pack may have no
        name."""
        return self.minor >= 4

    @property
    def trailer_size(self) -> int:
        """§5.7: 16 bytes, or 12 with Flags bit 3 (1.7, the short trailer)."""
        return 12 if self.flags & SHORT_TRAILER else 16


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _has_lone_surrogate(value: Any) -> bool:
    """§5.2: a string holding a code point D800 to DFFF (only an unpaired escape makes one)."""
    if isinstance(value, str):
        return any(0xD800 <= ord(ch) <= 0xDFFF for ch in value)
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def parse_metadata(raw: bytes, limits: Limits) -> dict[str, Any]:
    """§5.2 in the order of §8.1 step 4."""
    if not raw:
        return {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError("R-META-1", str(exc)) from None

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in items]
        if len(set(keys)) != len(keys):
            raise SpecError("R-META-3", "duplicate key")
        return dict(items)

    def constant(token: str) -> Any:
        raise SpecError("R-META-4", token)

    def number(token: str) -> float:
        value = float(token)
        if not math.isfinite(value):
            raise SpecError("R-META-4", token)
        return value

    def integer(token: str) -> int:
        if len(token.lstrip("-")) > 16 or abs(int(token)) > JSON_INT_MAX:
            raise SpecError("R-META-12", token[:40])
        return int(token)

    try:
        meta = json.loads(text, object_pairs_hook=pairs, parse_constant=constant,
                          parse_float=number, parse_int=integer)
    except RecursionError:
        raise SpecError("R-META-6", "nesting") from None
    except ValueError as exc:  # JSONDecodeError
        raise SpecError("R-META-2", str(exc)) from None
    if _has_lone_surrogate(meta):
        raise SpecError("R-META-13", "lone surrogate")
    if not isinstance(meta, dict):
        raise SpecError("R-META-5", type(meta).__name__)
    if _depth(meta) > limits.max_metadata_depth:
        raise SpecError("R-META-6", "nesting")
    # §5.2.1
    if "compeft.producer" in meta and not isinstance(meta["compeft.producer"], str):
        raise SpecError("R-META-7", "compeft.producer")
    if "compeft.compression" in meta and not isinstance(meta["compeft.compression"], dict):
        raise SpecError("R-META-8", "compeft.compression")
    if "compeft.base" in meta:
        base = meta["compeft.base"]
        if not isinstance(base, dict):
            raise SpecError("R-META-9", "compeft.base")
        for key in ("name", "revision"):
            if key in base and not isinstance(base[key], str):
                raise SpecError("R-META-10", key)
        hashes = base.get("hashes", {})
        if not isinstance(hashes, dict) or not all(isinstance(v, str) for v in hashes.values()):
            raise SpecError("R-META-11", "hashes")
    return meta


def read_header(data: bytes, limits: Limits, budget: Budget) -> Header:
    """§8.1 steps 1 to 5 (compressed metadata is charged to ``budget``)."""
    if len(data) < 16 and not MAGIC.startswith(data[:8]):
        raise SpecError("R-HDR-1", "short and not a prefix of the magic")
    c = Cursor(data)
    magic, major, minor, log2, flags, msize = struct.unpack("<8sBBBBI", c.take(16, "header"))
    if magic != MAGIC:
        raise SpecError("R-HDR-1", repr(magic))
    if major != 1:
        raise SpecError("R-HDR-2", f"major {major}")
    if log2 > 12:
        raise SpecError("R-HDR-3", f"Alignment_Log2 {log2}")
    # §5.1: bits 4 to 7 Reserved; bit 0 from minor 2; bit 1 from minor 6; bits 2 and 3 from
    # minor 7 (these four first); then bit 1 only with bit 0; then bit 2 only with bit 1
    if (flags & 0xF0 or (flags & METADATA_ZSTD and minor < 2)
            or (flags & METADATA_BARE and minor < 6)
            or (flags & (METADATA_UNSIZED | SHORT_TRAILER) and minor < 7)):
        raise SpecError("R-HDR-4", f"reserved header flags must be zero (got 0x{flags:02x})")
    if flags & METADATA_BARE and not flags & METADATA_ZSTD:
        raise SpecError("R-HDR-4", "header flag bit 1 (bare metadata frame) is set without bit 0 "
                                   "(compressed metadata)")
    if flags & METADATA_UNSIZED and not flags & METADATA_BARE:
        raise SpecError("R-HDR-4", "header flag bit 2 (unsized metadata frame) is set without "
                                   "bit 1 (bare metadata frame)")
    if msize > limits.max_metadata_size:
        raise SpecError("R-HDR-5", f"metadata {msize}")
    raw = c.take(msize, "Metadata")
    if c.u32("Header_Checksum") != crc32(data[: 16 + msize]):
        raise SpecError("R-HDR-6", "header checksum")
    if flags & METADATA_ZSTD:  # step 3a (§5.2)
        if flags & METADATA_UNSIZED:  # 1.7: the bare frame alone, its header gives the size
            decoded = unsized_frame_size(raw, METADATA_DICTIONARY)
        else:
            m = Cursor(raw)
            decoded = m.varint("Metadata_Decoded_Size")
            raw = raw[m.pos :]
        if decoded > limits.max_metadata_size:
            raise SpecError("R-HDR-5", f"metadata decodes to {decoded} bytes; limit "
                                       f"{limits.max_metadata_size}")
        budget.charge(decoded)
        raw = undo_zstd(raw, decoded, METADATA_DICTIONARY,
                        bare=bool(flags & METADATA_BARE))  # §7.1 bare frames (1.6)
    meta = parse_metadata(raw, limits)
    a = 1 << log2
    first = align(c.pos, a)
    check_zero(c.take(first - c.pos, "header padding"), "R-HDR-7")
    return Header(a, meta, first, minor, flags)


# ---------------------------------------------------------------------------------------------
# §5.3 to §5.5: record headers
# ---------------------------------------------------------------------------------------------


@dataclass
class Desc:
    type: int
    stage: int
    param: int
    stored: int
    decoded: int


@dataclass
class RecordHeader:
    kind: int
    name: str
    dtype: str
    shape: list[int]
    nnz: int | None
    descs: list[Desc]
    data_crc: int
    header_end: int
    data_size: int
    members: list[Member] | None = None  # §5.8: a pack's members

    @property
    def known(self) -> bool:
        return self.kind in (0x01, 0x02, *PACKS)


@dataclass
class Member:
    """One entry of a pack's member table (§5.8)."""

    name: str
    dtype: str
    shape: list[int]
    nnz: int
    positions_type: int
    param: int
    positions_size: int  #: bytes of its positions payload (a bit pack's: Positions_Bits rounded up)
    scale: bytes | None = None  #: §5.10: a compact pack member's scale, from its table
    #: §5.11: a bit pack member's positions stream length (a lean, tight or twin pack's once
    #: placed; a twin's is its source's)
    positions_bits: int | None = None
    twin: int = 0  #: §5.14: a twin pack member's Twin_Back (0: not a twin)

    @property
    def size(self) -> int:
        """Its bytes in the data area (a compact pack keeps the scale in the table)."""
        return self.positions_size + (self.nnz + 7) // 8 + (4 if self.scale is None else 0)

    @property
    def bits(self) -> int:
        """§5.11: its bits in a bit pack's data area, positions stream then signs stream."""
        assert self.positions_bits is not None
        return self.positions_bits + self.nnz


def read_record_header(c: Cursor, kind: int, limits: Limits, a: int) -> RecordHeader:
    """§8.1 steps 7 to 9 (the Record_Kind byte has been read)."""
    start = c.pos - 1
    hl = c.varint("Header_Length")
    if not 8 <= hl <= MAX_HEADER_LENGTH:
        raise SpecError("R-REC-3", f"Header_Length {hl}")
    data_size = c.varint("Data_Size")
    body_start = c.pos
    c.take(hl - 4, "Record_Body and Data_Checksum")
    stored_crc = c.u32("Header_Checksum")
    if stored_crc != crc32(c.data[start : c.pos - 4]):
        raise SpecError("R-REC-4", "record header checksum")
    header_end = c.pos
    body_end = header_end - 8
    data_crc = struct.unpack("<I", c.data[body_end : body_end + 4])[0]
    b = Cursor(c.data, body_start, body_end)
    if kind in UNNAMED:  # §5.10 to §5.14: no Name; the first member's name is the record's
        members = read_pack_body(b, None, limits, columns=True, bits=kind == BIT_PACK,
                                 lean=kind in PLACED, tight=kind in (TIGHT_PACK, TWIN_PACK),
                                 twin=kind == TWIN_PACK)
        name = members[0].name
    else:
        name = read_name(b, limits)
        if kind in PACKS:
            members = read_pack_body(b, name, limits, columns=kind == COLUMN_PACK)
    if kind in PLACED:  # §5.12 to §5.14: Data_Size is checked after placing the members (step 13)
        return RecordHeader(kind, name, "", [], None, [], data_crc, header_end, data_size,
                            members)
    if kind in PACKS:
        if kind == BIT_PACK:  # §5.11: one bit stream of B bits, rounded up to bytes
            used = (sum(m.bits for m in members) + 7) // 8
        else:
            used = sum(m.size for m in members)
        if data_size != align(used, a):
            raise SpecError("R-PACK-8", f"Data_Size {data_size}")
        return RecordHeader(kind, name, "", [], None, [], data_crc, header_end, data_size,
                            members)
    if kind not in (0x01, 0x02):  # an optional kind: the rest of the body is not ours
        return RecordHeader(kind, name, "", [], None, [], data_crc, header_end, data_size)
    dtype, shape, nnz = read_tensor_fields(b, kind == 0x01, limits)
    descs = []
    for _ in range(b.u8("Block_Count")):
        btype, stage = b.u8("Block_Type"), b.u8("Stage")
        param, stored = b.varint("Param"), b.varint("Stored_Size")
        if stage == 0:
            decoded = stored
        elif stage == 1:
            decoded = b.varint("Decoded_Size")
        else:
            raise SpecError("R-BLK-1", f"Stage {stage}")
        descs.append(Desc(btype, stage, param, stored, decoded))
    if b.left():
        raise SpecError("R-REC-5", f"{b.left()} bytes left in the body")
    if data_size != sum(align(d.stored, a) for d in descs):
        raise SpecError("R-REC-6", f"Data_Size {data_size}")
    for d in descs:
        if d.type not in ROLES and not d.type & OPTIONAL:
            raise SpecError("R-BLK-2", f"Block_Type {d.type}")
    roles = [ROLES[d.type] for d in descs if d.type in ROLES]
    if roles != (["positions", "signs", "scale"] if kind == 0x01 else ["dense"]):
        raise SpecError("R-BLK-3", f"blocks {roles}")
    return RecordHeader(kind, name, dtype, shape, nnz, descs, data_crc, header_end, data_size)


def read_tensor_fields(b: Cursor, ternary: bool, limits: Limits,
                       ) -> tuple[str, list[int], int | None]:
    """§5.4.2, §5.4.3: Dtype, Ndim, Dim, and Nnz for a ternary tensor."""
    code = b.u8("Dtype")
    if code not in DTYPES:
        raise SpecError("R-BODY-1", f"dtype {code}")
    dtype, _, ternary_ok = DTYPES[code]
    if ternary and not ternary_ok:
        raise SpecError("R-BODY-2", dtype)
    ndim = b.u8("Ndim")
    if ndim > limits.max_ndim:
        raise SpecError("R-BODY-3", f"Ndim {ndim}")
    shape = [b.varint("Dim") for _ in range(ndim)]
    numel = math.prod(shape)
    if numel > limits.max_numel:
        raise SpecError("R-BODY-4", f"numel {numel}")
    if math.prod(d for d in shape if d) > limits.max_numel:  # §5.4.3 (1.4): nonzero dims
        raise SpecError("R-BODY-4", f"nonzero dimensions of {shape}")
    nnz = None
    if ternary:
        nnz = b.varint("Nnz")
        if nnz > numel:
            raise SpecError("R-BODY-5", f"Nnz {nnz}")
    return dtype, shape, nnz


def read_pack_body(b: Cursor, name: str | None, limits: Limits, columns: bool = False,
                   bits: bool = False, lean: bool = False, tight: bool = False,
                   twin: bool = False) -> list[Member]:
    """§8.1 step 8a (8b for a column pack, 8c for a compact pack, whose ``name`` is None, for
    a bit pack, with ``bits``, for a lean pack, with ``lean``: no column 10, for a tight
    pack, with ``lean`` and ``tight``: a bare table frame, Scale_Back and Scale_Planes as
    columns 11 and 12, §5.13, and for a twin pack, with ``twin`` too: no
    Table_Decoded_Size, the frame header gives it, and a Twin_Back column, §5.14): the rest of
    a pack's body and its member table."""
    count = b.varint("Member_Count")
    if count < 1:
        raise SpecError("R-PACK-1", "no member")
    stage = b.u8("Table_Stage")
    stored_size = b.varint("Table_Stored_Size")
    if stage not in ((0, 1) if name is not None else (0, 1, 2)):
        raise SpecError("R-BLK-1", f"Table_Stage {stage}")
    decoded = b.varint("Table_Decoded_Size") if stage and not twin else stored_size
    if decoded > MAX_PACK_TABLE:
        raise SpecError("R-PACK-2", f"Table_Decoded_Size {decoded}")
    table = b.take(stored_size, "Table")
    if b.left():
        raise SpecError("R-REC-5", f"{b.left()} bytes left in the body")
    dictionary = NAME_DICTIONARY if stage == 2 else None
    if stage and twin:  # §5.14, §7.1 unsized bare frames (1.7): the frame header gives the size
        decoded = unsized_frame_size(table, dictionary)
        if decoded > MAX_PACK_TABLE:
            raise SpecError("R-PACK-2", f"pack table: decoded size {decoded} exceeds "
                                        f"{MAX_PACK_TABLE}")
    if stage:  # a tight or twin pack's table frame is bare (§5.13, §7.1)
        table = undo_zstd(table, decoded, dictionary, bare=tight)
    t = Cursor(table)
    if columns:
        members = read_columns(t, count, name, limits, bits, lean, twin)
        if tight:
            read_scale_planes(t, members)
        elif name is None:  # §5.10 columns 11 and 12: scale refs, then each scale once
            refs, distinct = [], 0
            for _ in range(count):
                ref = t.varint("Scale_Ref")
                if ref > distinct:
                    raise SpecError("R-PACK-12", f"Scale_Ref {ref} after {distinct} scales")
                distinct += ref == distinct
                refs.append(ref)
            scales = [t.take(4, "Scale") for _ in range(distinct)]
            for m, ref in zip(members, refs, strict=True):
                m.scale = scales[ref]
        if t.left():
            raise SpecError("R-PACK-3", f"{t.left()} bytes after the columns")
        return members
    prev = name.encode()
    members = []
    for i in range(count):
        prefix = t.varint("Prefix_Length")
        if prefix > len(prev):
            raise SpecError("R-PACK-4", f"Prefix_Length {prefix}")
        suffix = t.varint("Suffix_Length")
        if not 1 <= prefix + suffix <= limits.max_name_length:
            raise SpecError("R-NAME-1", f"name length {prefix + suffix}")
        raw = prev[:prefix] + t.take(suffix, "Suffix")
        mname = member_name(raw, i, prev, name)
        dtype, shape, nnz = read_tensor_fields(t, True, limits)
        ptype = t.u8("Positions_Type")
        if ptype not in (0x01, 0x02):
            raise SpecError("R-PACK-6", f"Positions_Type {ptype}")
        param, psize = t.varint("Param"), t.varint("Positions_Size")
        assert nnz is not None
        members.append(Member(mname, dtype, shape, nnz, ptype, param, psize))
        prev = raw
    if t.left():
        raise SpecError("R-PACK-3", f"{t.left()} bytes after the entries")
    return members


def read_scale_planes(t: Cursor, members: list[Member]) -> None:
    """§5.13 columns 11 and 12 of a tight pack: every Scale_Back (R-TPK-1, each as it is
    read), then the D distinct scales as four byte planes (byte 3 of every scale, then byte 2,
    byte 1, byte 0); each member gets the 4 bytes of its scale."""
    backs = []
    for i in range(len(members)):
        j = t.varint("Scale_Back")
        if j > i:
            raise SpecError("R-TPK-1", f"scale back {j} reaches before the first member "
                                       f"(member {i})")
        backs.append(j)
    count = backs.count(0)  # D
    planes = t.take(4 * count, "scales")
    new = 0  # d: the zeros among the Scale_Backs before the member
    for i, (m, j) in enumerate(zip(members, backs, strict=True)):
        if j:
            m.scale = members[i - j].scale
        else:
            m.scale = bytes(planes[(3 - k) * count + new] for k in range(4))
            new += 1


def member_name(raw: bytes, i: int, prev: bytes, name: str | None) -> str:
    """A member's name checks (§5.8): UTF-8, no NUL, the first is the pack's (not in a
    compact pack, §5.10), increasing."""
    mname = decode_name(raw)
    if i == 0 and name is not None and raw != name.encode():
        raise SpecError("R-PACK-5", f"{mname!r} is not {name!r}")
    if i > 0 and raw <= prev:
        raise SpecError("R-PACK-7", f"{mname!r} after {prev!r}")
    return mname


def zigzag(z: int) -> int:
    """§5.9: 0, 1, 2, 3, ... stand for 0, -1, 1, -2, ..."""
    return z // 2 if z % 2 == 0 else -(z + 1) // 2


def predicted_param(ptype: int, numel: int, nnz: int) -> int:
    """§5.9: Q, in exact integer arithmetic."""
    if ptype == 0x01:
        return 0
    if nnz == 0:
        return 1
    return max(1, min(numel, (45426 * numel + 11000 * nnz) // (65536 * nnz)))


def predicted_bits(ptype: int, m: int, numel: int, n: int) -> int:
    """§5.11: S_b, the predicted stream length in bits, in exact integer arithmetic."""
    if ptype == 0x01:
        return numel
    if n == 0:
        return 0
    m = max(1, m)  # as §7.2: Param 0 is rejected later (R-GOL-1)
    b, u, w = golomb_shape(m)
    long_codes = n * (m - u) // m if b >= 1 else 0
    unary = max(0, (numel - n - n * (m - 1) // 2) // m)
    return w * n + long_codes + unary + n


def predicted_size(ptype: int, m: int, numel: int, n: int) -> int:
    """§5.9: S, S_b rounded up to bytes (for a bitmask ceil(N / 8))."""
    return (predicted_bits(ptype, m, numel, n) + 7) // 8


def read_columns(t: Cursor, count: int, name: str | None, limits: Limits, bits: bool = False,
                 lean: bool = False, twin: bool = False) -> list[Member]:
    """§8.1 step 8b: the columns of a column pack's member table (§5.9); ``name`` None: a
    compact pack's (§5.10), whose first name is coded against the empty name; ``bits``: a bit
    pack's (§5.11), whose column 10 gives Positions_Bits; ``lean``: a lean, tight or twin
    pack's (§5.12 to §5.14), which has no column 10 (its members' lengths are found in the
    data area); ``twin``: a twin pack's (§5.14), with column 6a (Twin_Back) after the
    dimensions and columns 7 to 9 for the members that are not twins only."""
    prefixes = [t.varint("Prefix_Length") for _ in range(count)]
    suffixes = [t.varint("Suffix_Length") for _ in range(count)]
    names, prev = [], b"" if name is None else name.encode()
    for i in range(count):
        if prefixes[i] > len(prev):
            raise SpecError("R-PACK-4", f"Prefix_Length {prefixes[i]}")
        if not 1 <= prefixes[i] + suffixes[i] <= limits.max_name_length:
            raise SpecError("R-NAME-1", f"name length {prefixes[i] + suffixes[i]}")
        raw = prev[: prefixes[i]] + t.take(suffixes[i], "Suffix")
        names.append(member_name(raw, i, prev, name))
        prev = raw
    dtypes = []
    for _ in range(count):
        code = t.u8("Dtype")
        if code not in DTYPES:
            raise SpecError("R-BODY-1", f"dtype {code}")
        if not DTYPES[code][2]:
            raise SpecError("R-BODY-2", DTYPES[code][0])
        dtypes.append(DTYPES[code][0])
    ndims = []
    for _ in range(count):  # §8.1 8b: each value checked as it is read
        ndims.append(t.u8("Ndim"))
        if ndims[-1] > limits.max_ndim:
            raise SpecError("R-BODY-3", f"Ndim {ndims[-1]}")
    shapes = []
    for ndim in ndims:
        shapes.append([t.varint("Dim") for _ in range(ndim)])
        if math.prod(shapes[-1]) > limits.max_numel:
            raise SpecError("R-BODY-4", f"numel {math.prod(shapes[-1])}")
        if math.prod(d for d in shapes[-1] if d) > limits.max_numel:  # §5.4.3 (1.4)
            raise SpecError("R-BODY-4", f"nonzero dimensions of {shapes[-1]}")
    twins = read_twin_backs(t, names, shapes) if twin else [0] * count
    # columns 7 to 9: a twin has no entry; its Nnz, Positions_Type and Param are its source's
    # (an earlier member that is not a twin, so already read)
    nnzs: list[int] = []
    for i, shape in enumerate(shapes):
        if twins[i]:
            nnzs.append(nnzs[i - twins[i]])
            continue
        nnzs.append(t.varint("Nnz"))
        if nnzs[-1] > math.prod(shape):
            raise SpecError("R-BODY-5", f"Nnz {nnzs[-1]}")
    ptypes: list[int] = []
    for i in range(count):
        if twins[i]:
            ptypes.append(ptypes[i - twins[i]])
            continue
        ptypes.append(t.u8("Positions_Type"))
        if ptypes[-1] not in (0x01, 0x02):
            raise SpecError("R-PACK-6", f"Positions_Type {ptypes[-1]}")
    params: list[int] = []
    for i in range(count):
        if twins[i]:
            params.append(params[i - twins[i]])
            continue
        q = predicted_param(ptypes[i], math.prod(shapes[i]), nnzs[i])
        d = zigzag(t.varint("Param_Delta"))
        if q + d < 0:
            raise SpecError("R-PACK-10", f"Param {q} + {d}")
        params.append(q + d)
    if lean:  # §5.12: no column 10; positions_size and positions_bits come from the data area
        return [Member(names[i], dtypes[i], shapes[i], nnzs[i], ptypes[i], params[i], 0,
                       twin=twins[i]) for i in range(count)]
    members = []
    predict = predicted_bits if bits else predicted_size  # §5.11 column 10, or §5.9's
    for i in range(count):
        s = predict(ptypes[i], params[i], math.prod(shapes[i]), nnzs[i])
        e = zigzag(t.varint("Size_Delta"))
        if s + e < 0:
            raise SpecError("R-PACK-11", f"Positions_{'Bits' if bits else 'Size'} {s} + {e}")
        if bits:  # §5.11: the payload is the stream rounded up to bytes
            members.append(Member(names[i], dtypes[i], shapes[i], nnzs[i], ptypes[i],
                                  params[i], (s + e + 7) // 8, positions_bits=s + e))
        else:
            members.append(Member(names[i], dtypes[i], shapes[i], nnzs[i], ptypes[i],
                                  params[i], s + e))
    return members


def read_twin_backs(t: Cursor, names: list[str], shapes: list[list[int]]) -> list[int]:
    """§5.14 column 6a of a twin pack: every Twin_Back, each checked as it is read (R-TWN-1:
    it reaches no further than the first member, to a member that is not a twin and whose
    dimensions multiply to the twin's numel)."""
    backs: list[int] = []
    for i, shape in enumerate(shapes):
        j = t.varint("Twin_Back")
        if j > i:
            raise SpecError("R-TWN-1", f"{names[i]!r}: twin pack member: twin back {j} reaches "
                                       f"before the first member (member {i})")
        if j and backs[i - j]:
            raise SpecError("R-TWN-1", f"{names[i]!r}: twin pack member: its source "
                                       f"{names[i - j]!r} ({j} back) is a twin itself")
        if j and math.prod(shapes[i - j]) != math.prod(shape):
            raise SpecError("R-TWN-1", f"{names[i]!r}: twin pack member: its source "
                                       f"{names[i - j]!r} ({j} back) has "
                                       f"{math.prod(shapes[i - j])} elements, the twin "
                                       f"{math.prod(shape)}")
        backs.append(j)
    return backs


def decode_pack(h: RecordHeader, data: bytes, a: int, budget: Callable[[], Budget],
                ) -> list[dict[str, Any]]:
    """§8.1 step 13 for a pack: its checksum, its padding (a lean, tight or twin pack's after
    placing its members, R-LPK-1, and checking Data_Size, R-PACK-8), then each member's
    payloads, each
    charged to ``budget()`` (the decoding's budget, or a member's own in random access)."""
    if crc32(data) != h.data_crc:
        raise SpecError("R-REC-9", "data checksum")
    assert h.members is not None
    if h.kind in PLACED:
        return decode_lean_pack(h.members, data, a, budget, PLACED[h.kind])
    if h.kind == BIT_PACK:
        return decode_bit_pack(h.members, data, budget)
    used = sum(m.size for m in h.members)
    check_zero(data[used:], "R-BLK-4")
    out, at = [], 0
    for m in h.members:
        positions = data[at : at + m.positions_size]
        at += m.positions_size
        signs = data[at : at + (m.nnz + 7) // 8]
        at += (m.nnz + 7) // 8
        scale = m.scale  # a compact pack keeps the scale in its table (§5.10)
        if scale is None:
            scale = data[at : at + 4]
            at += 4
        out.append(decode_member(m, positions, signs, scale, budget()))
    return out


def decode_bit_pack(members: list[Member], data: bytes, budget: Callable[[], Budget],
                    ) -> list[dict[str, Any]]:
    """§5.11, §8.1 step 13: the padding after the last member's last bit (R-BLK-4), then each
    member: its stream lengths (R-BPK-1), then its streams rounded up to bytes, decoded as a
    compact pack member's payloads. A twin (§5.14) takes no bits: it reads its source's
    streams."""
    starts, total = [], 0  # the bit where each member's streams start; B
    for i, m in enumerate(members):
        if m.twin:
            starts.append(starts[i - m.twin])
        else:
            starts.append(total)
            total += m.bits
    if total % 8 and data[total // 8] >> (total % 8):
        raise SpecError("R-BLK-4", f"padding bits after bit {total} not zero")
    check_zero(data[(total + 7) // 8 :], "R-BLK-4")
    out = []
    for m, at in zip(members, starts, strict=True):
        assert m.positions_bits is not None
        assert m.scale is not None
        n_bits, numel = m.positions_bits, math.prod(m.shape)
        if m.positions_type == 0x01 and n_bits != numel:
            raise SpecError("R-BPK-1", f"bitmask stream of {n_bits} bits, numel {numel}")
        if m.positions_type == 0x02 and m.nnz == 0 and n_bits != 0:
            raise SpecError("R-BPK-1", f"golomb stream of {n_bits} bits with Nnz 0")
        if m.positions_type == 0x02 and m.nnz and not (n_bits and bit(data, at + n_bits - 1)):
            raise SpecError("R-BPK-1", f"golomb stream of {n_bits} bits does not end with a 1")
        positions = stream_bytes(data, at, n_bits)
        signs = stream_bytes(data, at + n_bits, m.nnz)
        out.append(decode_member(m, positions, signs, m.scale, budget()))
    return out


def decode_lean_pack(members: list[Member], data: bytes, a: int, budget: Callable[[], Budget],
                     kind: str = "lean") -> list[dict[str, Any]]:
    """§5.12 (and §5.13 for a tight pack, ``kind`` "tight", §5.14 for a twin pack, "twin"),
    §8.1 step 13 (after the checksum): place the members in order (R-LPK-1; a twin on its
    source's streams, taking no bits), check Data_Size (R-PACK-8), then decode the members as
    a bit pack's: padding (R-BLK-4), then each member's streams rounded up to bytes (R-BPK-1
    holds by construction)."""
    placed: list[Member] = []
    at = 0  # the bit where the next member's streams start
    for i, m in enumerate(members):
        if m.twin:  # §5.14: its source's streams (its Nnz, type and Param are the source's)
            n_bits = placed[i - m.twin].positions_bits
            assert n_bits is not None
        else:
            n_bits = place_lean_member(m, data, at, kind)
            at += n_bits + m.nnz
        placed.append(Member(m.name, m.dtype, m.shape, m.nnz, m.positions_type, m.param,
                             (n_bits + 7) // 8, m.scale, n_bits, m.twin))
    if len(data) != align((at + 7) // 8, a):  # B = at
        raise SpecError("R-PACK-8", f"Data_Size {len(data)}, members take {at} bits")
    return decode_bit_pack(placed, data, budget)


def place_lean_member(m: Member, data: bytes, at: int, kind: str = "lean") -> int:
    """§5.12: the length in bits of member ``m``'s positions stream, which starts at bit
    ``at`` of the data area ``data`` (R-LPK-1: it and the signs stream after it lie within the
    data area; a golomb unary part holds its n one bits within n + floor((N - n) / M) bits).
    ``kind`` ("lean", "tight" or "twin", §5.13, §5.14) names the pack in the messages."""
    total = 8 * len(data)

    def need(count: int, stream: str) -> None:
        if count > total - at:
            raise SpecError("R-LPK-1", f"{m.name!r}: {kind} pack member: its {stream} stream "
                                       f"runs past the data area ({total - at} bits left, "
                                       f"{count} needed)")

    numel, n = math.prod(m.shape), m.nnz
    if m.positions_type == 0x01:
        length = numel
    elif n == 0:
        length = 0
    else:
        mm = max(1, m.param)  # a Param outside [1, max(1, N)] is R-GOL-1, when decoded
        b, u, w = golomb_shape(mm)
        need(w * n, "positions")
        v = [sum(bit(data, at + j * n + k) << j for j in range(w)) for k in range(n)]
        if b == 0:
            long_codes = 0
        elif u == 0:
            long_codes = n
        else:
            long_codes = sum(1 for x in v if x >= u)
        s = w * n + long_codes  # the unary part starts at bit at + s
        need(s, "positions")
        limit = min(n + (numel - n) // mm, total - at - s)
        ones, t = 0, 0
        while ones < n and t < limit:
            ones += bit(data, at + s + t)
            t += 1
        if ones < n:
            if t >= total - at - s:
                raise SpecError("R-LPK-1", f"{m.name!r}: {kind} pack member: its positions "
                                           f"stream runs past the data area ({total - at - s} "
                                           f"bits left for the unary part, {ones} of {n} ones)")
            raise SpecError("R-LPK-1", f"{m.name!r}: {kind} pack member: unary part holds "
                                       f"{ones} of {n} ones in its first {limit} bits")
        length = s + t
    need(length, "positions")
    need(length + n, "signs")
    return length


def bit(data: bytes, i: int) -> int:
    """§2.2: bit ``i`` of a stream is bit i mod 8 of byte floor(i / 8)."""
    return (data[i // 8] >> (i % 8)) & 1


def stream_bytes(data: bytes, start: int, count: int) -> bytes:
    """§5.11: bits ``start`` to ``start + count - 1`` of ``data`` as a payload of its own,
    ceil(count / 8) bytes whose padding bits are zero."""
    first, last = start // 8, (start + count + 7) // 8
    value = int.from_bytes(data[first:last], "little") >> (start % 8)
    return (value & ((1 << count) - 1)).to_bytes((count + 7) // 8, "little")


def decode_member(m: Member, positions: bytes, signs: bytes, scale: bytes, budget: Budget,
                  ) -> dict[str, Any]:
    """§8.1 step 13: a pack member's payloads, decoded as a ternary record's positions, signs
    and scale blocks (§8.1 step 14, Stage 0)."""
    numel = math.prod(m.shape)
    itemsize = next(size for name, size, _ in DTYPES.values() if name == m.dtype)
    mh = RecordHeader(0x01, m.name, m.dtype, m.shape, m.nnz, [], 0, 0, 0)
    budget.charge(8 * len(positions) + 9 * m.nnz)
    indices = decode_block(m.positions_type, m.param, positions, mh, numel, m.nnz, itemsize)
    sign_bits = decode_block(0x03, 0, signs, mh, numel, m.nnz, itemsize)
    scale_bits, value = decode_block(0x04, 0, scale, mh, numel, m.nnz, itemsize)
    return {"name": m.name, "kind": "ternary", "shape": m.shape, "dtype": m.dtype,
            "nnz": m.nnz, "indices": indices, "signs": sign_bits, "scale": value,
            "scale_bits": f"0x{scale_bits:08x}"}


# ---------------------------------------------------------------------------------------------
# §6, §7: blocks
# ---------------------------------------------------------------------------------------------


def bits_of(payload: bytes, count: int, rules: tuple[str, str]) -> list[int]:
    """§2.2: exactly ``count`` bits LSB-first, padding bits zero (size rule, padding rule)."""
    if len(payload) != (count + 7) // 8:
        raise SpecError(rules[0], f"{len(payload)} bytes for {count} bits")
    bits = [(payload[i // 8] >> (i % 8)) & 1 for i in range(8 * len(payload))]
    if any(bits[count:]):
        raise SpecError(rules[1], "padding bits")
    return bits[:count]


def golomb_shape(m: int) -> tuple[int, int, int]:
    """§6.2: b = ceil(log2 M), u = 2^b - M, w = max(b - 1, 0)."""
    b = 0
    while (1 << b) < m:
        b += 1
    return b, (1 << b) - m, max(b - 1, 0)


def max_payload(btype: int, param: int, numel: int, nnz: int, itemsize: int) -> int:
    """§7.2."""
    if btype == 0x01:
        return (numel + 7) // 8
    if btype == 0x02:
        m = max(1, param)
        w = golomb_shape(m)[2]
        return ((w + 2) * nnz + numel // m + 7) // 8
    if btype == 0x03:
        return (nnz + 7) // 8
    if btype == 0x04:
        return 4
    return numel * itemsize


def decode_golomb(payload: bytes, m: int, numel: int, n: int) -> list[int]:
    """§6.2.2 then §6.2.1."""
    if not 1 <= m <= max(1, numel):
        raise SpecError("R-GOL-1", f"M {m}")
    if n == 0:
        if payload or m != 1:
            raise SpecError("R-GOL-2", f"M {m}, {len(payload)} bytes")
        return []
    b, u, w = golomb_shape(m)
    total = 8 * len(payload)
    if (w + 1) * n > total:
        raise SpecError("R-GOL-3", "too short for the planes")
    bits = [(payload[i // 8] >> (i % 8)) & 1 for i in range(total)]
    v = [sum(bits[j * n + k] << j for j in range(w)) for k in range(n)]
    long_codes = [k for k in range(n) if b >= 1 and v[k] >= u]
    if w * n + len(long_codes) + n > total:
        raise SpecError("R-GOL-4", "too short for the extension bits")
    r = list(v) if b >= 1 else [0] * n
    for i, k in enumerate(long_codes):
        r[k] = 2 * v[k] + bits[w * n + i] - u
    s = w * n + len(long_codes)
    ones = [t for t in range(s, total) if bits[t]]
    if len(ones) != n:
        raise SpecError("R-GOL-5", f"{len(ones)} unary codes")
    if (ones[-1] + 1 + 7) // 8 != len(payload):
        raise SpecError("R-GOL-6", "stream does not end in the last byte")
    positions, prev_one, p = [], s - 1, -1
    for k, t in enumerate(ones):
        q = t - prev_one - 1
        prev_one = t
        p += q * m + r[k] + 1
        positions.append(p)
    if positions[-1] >= numel:
        raise SpecError("R-GOL-7", f"position {positions[-1]}")
    return positions


def frame_header(stored: bytes, dictionary: bytes | None = None,
                 bare: bool = False) -> tuple[bytes, int]:
    """§7.1 R-ZST-2: the frame (``bare``: a bare frame, 1.6, whose magic number is put back
    first, so that every rule applies to the whole frame; stored bytes that begin with the
    magic hold it twice: a bad frame header) and the content size its header declares (-1:
    none). With a ``dictionary`` (implied, §7.3, §7.4) the header names no Dictionary_ID."""
    if bare:
        stored = ZSTD_MAGIC + stored
    if len(stored) >= 4 and stored[1:4] == b"\x2a\x4d\x18" and stored[0] & 0xF0 == 0x50:
        raise SpecError("R-ZST-2", "skippable frame")
    try:
        declared = zstandard.frame_content_size(stored)
        dict_id = zstandard.get_frame_parameters(stored).dict_id
    except zstandard.ZstdError as exc:
        raise SpecError("R-ZST-2", str(exc)) from None
    if dictionary is not None and dict_id:  # §5.2: the dictionary is implied, not named
        raise SpecError("R-ZST-2", f"Dictionary_ID {dict_id}")
    return stored, declared


def unsized_frame_size(stored: bytes, dictionary: bytes | None = None) -> int:
    """§7.1 unsized bare frames (1.7): the Decoded_Size that the bare frame's header gives,
    after the header's own checks (R-ZST-2) and that it declares one (R-ZST-3); the caller
    checks the bound of the field it stands for before decompressing."""
    declared = frame_header(stored, dictionary, bare=True)[1]
    if declared < 0:
        raise SpecError("R-ZST-3", "zstd stage: the frame declares no content size")
    return declared


def undo_zstd(stored: bytes, decoded_size: int, dictionary: bytes | None = None,
              bare: bool = False) -> bytes:
    """§7.1 (with the metadata dictionary of §7.3 for compressed metadata, or the name
    dictionary of §7.4); ``bare``: a bare frame (1.6), see :func:`frame_header`."""
    stored, declared = frame_header(stored, dictionary, bare)
    if declared != decoded_size:
        raise SpecError("R-ZST-3", f"frame declares {declared}")
    kw = {}
    if dictionary is not None:
        kw["dict_data"] = zstandard.ZstdCompressionDict(
            dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    dobj = zstandard.ZstdDecompressor(**kw).decompressobj()
    try:
        out = dobj.decompress(stored)
    except zstandard.ZstdError as exc:
        raise SpecError("R-ZST-5", str(exc)) from None
    if not dobj.eof or dobj.unused_data:
        raise SpecError("R-ZST-4", "not exactly one complete frame")
    if len(out) != decoded_size:
        raise SpecError("R-ZST-5", f"{len(out)} bytes decoded")
    return out


class Budget:
    """§9.3."""

    def __init__(self, limits: Limits, size: int) -> None:
        if limits.max_decoded_bytes is not None:
            self.limit = limits.max_decoded_bytes
        else:
            self.limit = max(64 * 2**20, 64 * size)
        self.used = 0

    def charge(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise SpecError("R-LIM-1", f"{self.used} > {self.limit}")


def decode_data(h: RecordHeader, data: bytes, a: int, budget: Budget) -> dict[str, Any]:
    """§8.1 steps 13 and 14: the tensor of a known record, in the JSON form of §12."""
    if crc32(data) != h.data_crc:
        raise SpecError("R-REC-9", "data checksum")
    numel, nnz = math.prod(h.shape), h.nnz or 0
    itemsize = next(size for name, size, _ in DTYPES.values() if name == h.dtype)
    values: dict[str, Any] = {}
    at = 0
    for d in h.descs:
        stored = data[at : at + d.stored]
        check_zero(data[at + d.stored : at + align(d.stored, a)], "R-BLK-4")
        at += align(d.stored, a)
        if d.type not in ROLES:
            continue  # §10.2: an optional block is skipped
        payload = stored
        if d.stage == 1:
            if d.decoded > max_payload(d.type, d.param, numel, nnz, itemsize):
                raise SpecError("R-ZST-1", f"Decoded_Size {d.decoded}")
            budget.charge(d.decoded)
            payload = undo_zstd(stored, d.decoded)
        if ROLES[d.type] == "positions":
            budget.charge(8 * len(payload) + 9 * nnz)
        values[ROLES[d.type]] = decode_block(d.type, d.param, payload, h, numel, nnz, itemsize)
    if h.kind == 0x02:
        return {"name": h.name, "kind": "dense", "shape": h.shape, "dtype": h.dtype,
                "data_hex": values["dense"]}
    scale_bits, scale = values["scale"]
    return {"name": h.name, "kind": "ternary", "shape": h.shape, "dtype": h.dtype, "nnz": nnz,
            "indices": values["positions"], "signs": values["signs"], "scale": scale,
            "scale_bits": f"0x{scale_bits:08x}"}


def decode_block(btype: int, param: int, payload: bytes, h: RecordHeader, numel: int,
                 nnz: int, itemsize: int) -> Any:
    """§6.1 to §6.5."""
    if btype == 0x01:
        if param != 0:
            raise SpecError("R-BMP-1", f"Param {param}")
        bits = bits_of(payload, numel, ("R-BMP-2", "R-BMP-3"))
        positions = [i for i, bit in enumerate(bits) if bit]
        if len(positions) != nnz:
            raise SpecError("R-BMP-4", f"{len(positions)} bits set")
        return positions
    if btype == 0x02:
        return decode_golomb(payload, param, numel, nnz)
    if btype == 0x03:
        if param != 0:
            raise SpecError("R-SGN-1", f"Param {param}")
        return bits_of(payload, nnz, ("R-SGN-2", "R-SGN-3"))
    if btype == 0x04:
        if param != 0:
            raise SpecError("R-SCL-1", f"Scale_Dtype {param}")
        if len(payload) != 4:
            raise SpecError("R-SCL-2", f"{len(payload)} bytes")
        bits = struct.unpack("<I", payload)[0]
        scale = struct.unpack("<f", payload)[0]
        if bits >> 31 or not math.isfinite(scale):
            raise SpecError("R-SCL-3", repr(scale))
        return bits, scale
    if param != 0:
        raise SpecError("R-DNS-1", f"Param {param}")
    if len(payload) != numel * itemsize:
        raise SpecError("R-DNS-2", f"{len(payload)} bytes")
    if h.dtype == "BOOL" and any(x > 1 for x in payload):
        raise SpecError("R-DNS-3", "BOOL byte above 1")
    return payload.hex()


# ---------------------------------------------------------------------------------------------
# §8.1 and §8.2
# ---------------------------------------------------------------------------------------------


def read_stream(data: bytes, limits: Limits | None = None) -> dict[str, Any]:
    """Decode ``data`` by the sequential procedure of §8.1."""
    limits = limits or Limits()
    budget = Budget(limits, len(data))
    header = read_header(data, limits, budget)
    a = header.alignment
    c = Cursor(data, header.first)
    seen: list[tuple[str, int, bool]] = []  # each record's name, offset, may its entry be unnamed
    last: str | None = None  # the last tensor name: a record's or a pack's last member's
    tensors = []
    while True:
        at = c.pos
        kind = c.u8("Record_Kind")
        if kind == 0x00:
            break
        if kind not in header.kinds and not kind & OPTIONAL:
            raise SpecError("R-REC-1", f"Record_Kind {kind}")
        if len(seen) >= limits.max_tensors:
            raise SpecError("R-REC-2", "too many records")
        h = read_record_header(c, kind, limits, a)
        if last is not None and h.name.encode() <= last.encode():
            raise SpecError("R-REC-7", f"{h.name!r} after {last!r}")
        seen.append((h.name, at, kind in UNNAMED and header.unnamed_entries))
        last = h.members[-1].name if h.members else h.name
        data_start = align(h.header_end, a)
        check_zero(c.take(data_start - h.header_end, "record padding"), "R-REC-8")
        area = c.take(h.data_size, "data area")
        if kind not in header.kinds:
            if crc32(area) != h.data_crc:
                raise SpecError("R-REC-10", "data checksum of an optional record")
            continue
        if kind in PACKS:
            tensors.extend(decode_pack(h, area, a, lambda: budget))
            continue
        tensors.append(decode_data(h, area, a, budget))
    index_at = c.pos - 1
    count = c.varint("Tensor_Count")
    if count > limits.max_tensors:
        raise SpecError("R-IDX-1", f"Tensor_Count {count}")
    entries = [(read_name(c, limits, header.unnamed_entries), c.varint("Record_Offset"))
               for _ in range(count)]
    if len(entries) != len(seen) or not all(map(lists, entries, seen)):
        raise SpecError("R-IDX-2", "index does not match the records")
    index_end = c.pos  # T: where the trailer starts
    if header.flags & SHORT_TRAILER:  # §5.7 (1.7): Index_Size in the place of Index_Offset
        index_size, crc, tail = struct.unpack("<II4s", c.take(12, "Trailer"))
        offset = index_end - index_size
    else:
        offset, crc, tail = struct.unpack("<QI4s", c.take(16, "Trailer"))
    if tail != TAIL_MAGIC:
        raise SpecError("R-TRL-1", repr(tail))
    if crc != crc32(data[index_at:index_end]):
        raise SpecError("R-TRL-3", "index checksum")
    if offset != index_at:
        raise SpecError("R-TRL-4", f"trailer points at {offset}, the index is at {index_at}")
    if c.left():
        raise SpecError("R-TRL-6", "bytes after the trailer")
    return {"metadata": header.metadata, "tensors": tensors}


def lists(entry: tuple[str, int], record: tuple[str, int, bool]) -> bool:
    """§8.1 step 15: an index entry is its record's name and offset; in a file of minor 4 or
    more a compact, bit, lean, tight or twin pack's entry may have the empty name instead
    (§5.6)."""
    (name, off), (rname, at, may_be_unnamed) = entry, record
    return off == at and (name == rname or (name == "" and may_be_unnamed))


def read_random(data: bytes, limits: Limits | None = None) -> dict[str, Any]:
    """Decode ``data`` by the random-access procedure of §8.2, reading every entry."""
    limits = limits or Limits()
    header = read_header(data, limits, Budget(limits, len(data)))  # the opening's budget
    a, size, first = header.alignment, len(data), header.first
    t = header.trailer_size  # step 2: 16, or 12 with the short trailer (§5.7)
    if size < first + 1 + t:
        raise SpecError("R-TRL-7", f"{size} bytes")
    if t == 12:  # §5.7 (1.7): Index_Size; the index is at F - 12 - Index_Size
        index_size, crc, tail = struct.unpack("<II4s", data[-12:])
        index_at = size - 12 - index_size
    else:
        index_at, crc, tail = struct.unpack("<QI4s", data[-16:])
    if tail != TAIL_MAGIC:
        raise SpecError("R-TRL-2", repr(tail))
    if not first <= index_at <= size - t - 1:
        raise SpecError("R-TRL-5", f"index offset {index_at} outside [{first}, {size - t - 1}]")
    if size - t - index_at > limits.max_index_size:
        raise SpecError("R-IDX-3", "index size")
    if crc != crc32(data[index_at : size - t]):
        raise SpecError("R-TRL-3", "index checksum")
    c = Cursor(data, index_at, size - t)
    if c.u8("Index_Kind") != 0x00:
        raise SpecError("R-IDX-4", "Index_Kind")
    count = c.varint("Tensor_Count")
    if count > limits.max_tensors:
        raise SpecError("R-IDX-1", f"Tensor_Count {count}")
    entries = [(read_name(c, limits, header.unnamed_entries), c.varint("Record_Offset"))
               for _ in range(count)]
    if c.left():
        raise SpecError("R-IDX-5", f"{c.left()} bytes after the entries")
    previous: str | None = None  # step 5: the last entry that has a name (§5.6: "" has none)
    for i, (name, off) in enumerate(entries):
        if name and previous is not None and name.encode() <= previous.encode():
            raise SpecError("R-IDX-6", f"{name!r}")
        if off <= entries[i - 1][1] if i else off != first:
            raise SpecError("R-IDX-7", f"offset {off}")
        if off >= index_at:
            raise SpecError("R-IDX-8", f"offset {off}")
        previous = name or previous
    if not entries and index_at != first:
        raise SpecError("R-IDX-9", "bytes before an empty index")
    ends = [off for _, off in entries[1:]] + [index_at]
    spans = []
    last: str | None = None  # step 6: the previous entry's name, or its pack's last member's
    for i, ((name, off), end) in enumerate(zip(entries, ends, strict=False)):
        kind = data[off]
        if header.unnamed_entries and not name and kind not in UNNAMED:
            raise SpecError("R-IDX-12", f"entry without a name, record of kind {kind:#04x}")
        if not name and kind not in header.kinds:  # step 6: at once (§5.6, §5.13)
            raise SpecError("R-REC-1", f"Record_Kind {kind} of an entry without a name")
        if kind in PACKS and kind in header.kinds:
            # step 6: a pack's header and member table are read when the file is opened; an
            # entry without a name takes the pack's name
            h = _record_in_span(data, name or None, off, end, limits, a)
            if not name and last is not None and h.name.encode() <= last.encode():
                raise SpecError("R-IDX-6", f"{h.name!r} after {last!r}")
            following = entries[i + 1][0] if i + 1 < len(entries) else ""
            if following and h.members[-1].name.encode() >= following.encode():
                raise SpecError("R-PACK-9", f"{h.members[-1].name!r}")
            spans.append((h.name, off, end))
            last = h.members[-1].name
            continue
        last = name
        if kind not in header.kinds and kind & OPTIONAL:
            # step 6: the header of a dropped optional record is checked (its checksum covers
            # the kind byte), its data area is not read
            c = Cursor(data, off + 1, end)
            read_record_header(c, kind, limits, a)
            continue
        spans.append((name, off, end))
    tensors = []
    for name, off, end in spans:
        h = _record_in_span(data, name, off, end, limits, a, header.kinds)
        area = data[align(h.header_end, a) : end]
        if h.kind in PACKS:  # each member with a budget of its own (§8.2 step 9, §9.3)
            tensors.extend(decode_pack(h, area, a, lambda: Budget(limits, size)))
        else:
            tensors.append(decode_data(h, area, a, Budget(limits, size)))
    return {"metadata": header.metadata, "tensors": tensors}


def _record_in_span(data: bytes, name: str | None, off: int, end: int, limits: Limits, a: int,
                    kinds: tuple[int, ...] = (0x01, 0x02, *PACKS)) -> RecordHeader:
    """§8.2 steps 7 and 8: the record header of an entry, within its span (``name`` None: an
    entry without a name, which takes its pack's, §5.6)."""
    c = Cursor(data, off, end)
    kind = c.u8("Record_Kind")
    if kind not in kinds:
        raise SpecError("R-REC-1", f"Record_Kind {kind}")
    h = read_record_header(c, kind, limits, a)
    if name is not None and h.name != name:
        raise SpecError("R-IDX-10", f"{h.name!r} is not {name!r}")
    data_start = align(h.header_end, a)
    if data_start + h.data_size != end:
        raise SpecError("R-IDX-11", "record does not end at the next one")
    check_zero(data[h.header_end : data_start], "R-REC-8")
    return h


def main(argv: list[str]) -> int:
    """Print the content of a file as JSON, or the rule it breaks."""
    data = open(argv[0], "rb").read()  # noqa: SIM115 - a one-shot tool
    read = read_random if "--random" in argv[1:] else read_stream
    try:
        print(json.dumps(read(data), indent=1, ensure_ascii=False))
    except SpecError as exc:
        print(f"invalid: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
