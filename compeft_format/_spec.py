"""Every magic number, id and limit of the format, in one place (spec/FORMAT.md is normative).

Each group is headed by the spec section that defines it. Nothing else in the package
spells these values.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# spec 5.1 File_Header
MAGIC = b"\x89CPFT\r\n\x1a"
VERSION_MAJOR = 1
VERSION_MINOR = 7  # what the reference encoder writes by default (spec 10.1)
# what an encoder can be asked for
VERSIONS = ((1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (1, 6), (1, 7))
FILE_HEADER = struct.Struct("<8sBBBBI")  # Magic, Major, Minor, Alignment_Log2, Flags, Metadata_Size
FILE_HEADER_SIZE = FILE_HEADER.size  # 16
CHECKSUM = struct.Struct("<I")
CHECKSUM_SIZE = 4
MIN_ALIGNMENT_LOG2 = 0
MAX_ALIGNMENT_LOG2 = 12  # 4096, a page
FLAG_METADATA_ZSTD = 0x01  # spec 5.1 Flags bit 0 (1.2): the metadata is a zstd frame (5.2)
FLAG_METADATA_BARE = 0x02  # spec 5.1 Flags bit 1 (1.6): ... stored without its magic number
BARE_FRAMES_MINOR = 6  # spec 7.1 (1.6): from it, a frame may be stored without its magic
#: spec 5.1 Flags bit 2 (1.7): a bare metadata frame without Metadata_Decoded_Size in front of
#: it (spec 5.2: its Frame_Content_Size gives it)
FLAG_METADATA_UNSIZED = 0x04
FLAG_SHORT_TRAILER = 0x08  # spec 5.1 Flags bit 3 (1.7): the 12-byte trailer of spec 5.7
FLAGS_1_7_MINOR = 7  # spec 5.1: bits 2 and 3 mean something from this minor on
DEFAULT_ALIGNMENT_LOG2 = 3  # 8 bytes: every dtype of spec 5.4 can be viewed in place

# spec 5.3 Record_Kind
KIND_END = 0x00  # the Index follows
KIND_TERNARY = 0x01
KIND_DENSE = 0x02
KIND_PACK = 0x03  # spec 5.8 (1.1): many small ternary tensors in one record
KIND_COLUMN_PACK = 0x04  # spec 5.9 (1.2): a pack whose member table is stored in columns
KIND_COMPACT_PACK = 0x05  # spec 5.10 (1.3): a column pack with its scales in the table
KIND_BIT_PACK = 0x06  # spec 5.11 (1.4): a compact pack with its members' streams bit after bit
KIND_LEAN_PACK = 0x07  # spec 5.12 (1.5): a bit pack whose members' lengths are read, not stored
KIND_TIGHT_PACK = 0x08  # spec 5.13 (1.6): a lean pack with its scales coded tighter, bare frame
KIND_TWIN_PACK = 0x09  # spec 5.14 (1.7): a tight pack whose members may share another's streams
#: spec 5.3, 10.1: each pack kind by the minor version that defined it, which is the kind a
#: writer of that minor writes; a file of minor m may hold the kinds of every minor up to m
PACK_KIND_SINCE = {1: KIND_PACK, 2: KIND_COLUMN_PACK, 3: KIND_COMPACT_PACK, 4: KIND_BIT_PACK,
                   5: KIND_LEAN_PACK, 6: KIND_TIGHT_PACK, 7: KIND_TWIN_PACK}
NAMELESS_INDEX_MINOR = 4  # spec 5.6 (1.4): from it, a compact to twin pack's entry may be ""

# spec 5.8 pack records (format 1.1)
PACK_TABLE_MAX = 1 << 20  # the largest decoded member table (a format limit)
PACK_MEMBER_MAX_NUMEL = 1 << 19  # the reference encoder packs ternary tensors up to this size
PACK_DATA_TARGET = 1 << 20  # ... into packs of at most this many data bytes (unless one member)
PACK_TABLE_TARGET = 1 << 15  # ... and member tables of at most this many bytes
KIND_OPTIONAL_BIT = 0x80  # spec 10.2: an unknown kind with this bit set is skipped

# spec 5.5 Block_Type
BLOCK_BITMASK = 0x01
BLOCK_GOLOMB = 0x02
BLOCK_SIGNS = 0x03
BLOCK_SCALE = 0x04
BLOCK_DENSE = 0x05
BLOCK_OPTIONAL_BIT = 0x80

# spec 7 Stage
STAGE_NONE = 0x00
STAGE_ZSTD = 0x01
STAGE_ZSTD_NAMES = 0x02  # spec 7.4 (1.3): zstd with the name dictionary; pack tables, 0x05-0x09
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # spec 7.1 (1.6): what a bare frame leaves out (RFC 8878)
DEFAULT_ZSTD_LEVEL = 3
# Appendix D (1.2): metadata up to this size and column pack tables are compressed at level
# 19 whatever the writer's level: they are small, and level 19 takes milliseconds there
SMALL_ZSTD_LEVEL = 19
SMALL_ZSTD_MAX = 1 << 20

# spec 7.3 (1.2): the metadata dictionary, a zstd raw content dictionary; the lines of the
# spec's block joined without line endings
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
METADATA_DICTIONARY_SHA256 = "74130976f777c0428923a6f73eeda0734bdd755a4237a7122b63790a1df82365"

# spec 7.4 (1.3): the name dictionary, a zstd raw content dictionary for compact pack tables
# (tensor names of common model families under PEFT's prefixes); the lines of the spec's
# block joined without line endings
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
NAME_DICTIONARY_SHA256 = "535e5a983fe63c343bce53a5a0789d41ab2ec9d83c518c0c5f9ba22346c04385"

# spec 5.7 Trailer
TRAILER = struct.Struct("<QI4s")  # Index_Offset, Index_Checksum, Tail_Magic
TRAILER_SIZE = TRAILER.size  # 16
#: spec 5.7 (1.7): with Flags bit 3, the trailer gives the index's size in 4 bytes
SHORT_TRAILER = struct.Struct("<II4s")  # Index_Size, Index_Checksum, Tail_Magic
TAIL_MAGIC = b"CPFE"

# spec 2.3 VarInt
VARINT_MAX_BYTES = 10
VARINT_MAX_VALUE = 2**63 - 1

# spec 5.4 Dtype codes: code -> (safetensors name, item size in bytes)
DTYPES: dict[int, tuple[str, int]] = {
    0x01: ("F32", 4),
    0x02: ("F16", 2),
    0x03: ("BF16", 2),
    0x04: ("F64", 8),
    0x05: ("I8", 1),
    0x06: ("I16", 2),
    0x07: ("I32", 4),
    0x08: ("I64", 8),
    0x09: ("U8", 1),
    0x0A: ("U16", 2),
    0x0B: ("U32", 4),
    0x0C: ("U64", 8),
    0x0D: ("BOOL", 1),
    0x0E: ("F8_E4M3", 1),
    0x0F: ("F8_E5M2", 1),
}
DTYPE_CODES: dict[str, int] = {name: code for code, (name, _) in DTYPES.items()}
ITEMSIZE: dict[str, int] = {name: size for _, (name, size) in DTYPES.items()}
TERNARY_DTYPES = ("F32", "F16", "BF16", "F64")  # spec 5.4: dtypes a ternary record may stand for

# spec 6.4 Scale_Dtype (Param of the scale block)
SCALE_F32 = 0x00

# spec 5.2 JSON integers: exact in binary64 (I-JSON, RFC 7493)
JSON_INT_MAX = 2**53 - 1

# spec 5.2.1 reserved metadata keys
META_PRODUCER = "compeft.producer"
META_COMPRESSION = "compeft.compression"
META_BASE = "compeft.base"
META_RESERVED_PREFIX = "compeft."


# spec 9.2 Limits
@dataclass(frozen=True)
class ReadLimits:
    """Reader limits of spec 9.2; every one can be raised by the caller.

    Examples
    --------
    >>> from compeft_format import ReadLimits
    >>> ReadLimits(max_numel=2**40).max_numel
    1099511627776
    """

    max_metadata_size: int = 16 * 2**20
    max_metadata_depth: int = 64
    max_index_size: int = 256 * 2**20
    max_tensors: int = 1_000_000
    max_ndim: int = 16
    max_name_length: int = 4096
    max_numel: int = 2**48
    #: bytes one read call may allocate for decoded data; None = max(64 MiB, 64 x file size)
    max_decoded_bytes: int | None = None
    #: bytes of the dense array one ternary tensor may be decoded to (``dense=True``, torch,
    #: ``TernaryTensor.to_numpy``/``to_torch``), checked before it is allocated
    max_dense_bytes: int = 16 * 2**30


DEFAULT_LIMITS = ReadLimits()
DECODE_BUDGET_FLOOR = 64 * 2**20
DECODE_BUDGET_RATIO = 64
