"""The Metadata JSON of spec 5.2: canonical encoding, strict decoding, the reserved keys.

The container places these bytes in the file header and checks their checksum; this module
only knows what the bytes mean, and how a 1.2 header compresses them (spec 5.2, 7.3):
:func:`stage_metadata` and :func:`unstage_metadata`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from . import _spec as S
from ._io import BufferSource, encode_varint
from .codecs import BlockContext, ZstdStage
from .errors import CorruptDataError, EncodeError, LimitExceededError

__all__ = ["METADATA_ZSTD", "decode_metadata", "encode_metadata", "stage_metadata",
           "unstage_metadata"]

#: zstd with the metadata dictionary of spec 7.3
METADATA_ZSTD = ZstdStage(S.METADATA_DICTIONARY, "metadata frame")
_ZSTD_MIN = 64  # as the blocks' zstd rule (Appendix D 5): below it a frame rarely wins


def _too_deep(obj: Any, limit: int) -> bool:
    """Return True if a JSON value nests deeper than ``limit`` (a scalar is depth 0).

    Iterative, and it stops at the first container past the limit: a recursive walk raised
    RecursionError (not a CompeftError) on metadata a few hundred levels deep that json.loads
    still accepts, and never returned on a self-referencing dict given to the writer.
    """
    stack = [(obj, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth >= limit:
                return True
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children
                         if isinstance(child, (dict, list)))
    return False


def _lone_surrogate(obj: Any) -> str | None:
    """The first string (key or value) holding a lone surrogate, as its escape, or None.

    Strict UTF-8 cannot carry one; only a ``\\udXXX`` escape can (spec 5.2, R-META-13).
    """
    stack = [obj]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str):
            for ch in value:
                if 0xD800 <= ord(ch) <= 0xDFFF:
                    return f"\\u{ord(ch):04x}"
    return None


def _big_integer(obj: Any) -> int | None:
    """The first integer outside +-(2**53 - 1), or None (spec 5.2, R-META-12)."""
    stack = [obj]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > S.JSON_INT_MAX:
            return value
    return None


def _check_reserved(meta: Mapping[str, Any], error: type[Exception]) -> None:
    """Enforce the types of the reserved keys (spec 5.2.1)."""
    def bad(key: str, want: str) -> Exception:
        return error(f"metadata key {key!r} must be {want}")

    if S.META_PRODUCER in meta and not isinstance(meta[S.META_PRODUCER], str):
        raise bad(S.META_PRODUCER, "a string")
    if S.META_COMPRESSION in meta and not isinstance(meta[S.META_COMPRESSION], dict):
        raise bad(S.META_COMPRESSION, "an object")
    if S.META_BASE in meta:
        base = meta[S.META_BASE]
        if not isinstance(base, dict):
            raise bad(S.META_BASE, "an object")
        for key in ("name", "revision"):
            if key in base and not isinstance(base[key], str):
                raise bad(f"{S.META_BASE}.{key}", "a string")
        hashes = base.get("hashes", {})
        if not isinstance(hashes, dict) or not all(isinstance(v, str) for v in hashes.values()):
            raise bad(f"{S.META_BASE}.hashes", "an object of strings")


def encode_metadata(metadata: Mapping[str, Any] | None) -> bytes:
    """Return the canonical JSON bytes of ``metadata`` (spec 5.2): sorted, compact, UTF-8."""
    if not metadata:
        return b""
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
        raise EncodeError("metadata must be a mapping with string keys")
    _check_reserved(metadata, EncodeError)
    if _too_deep(dict(metadata), S.DEFAULT_LIMITS.max_metadata_depth):
        raise EncodeError(f"metadata nests deeper than {S.DEFAULT_LIMITS.max_metadata_depth}")
    big = _big_integer(dict(metadata))
    if big is not None:  # spec 5.2: integers are exact in binary64 (I-JSON, RFC 7493)
        raise EncodeError(f"metadata integer {str(big)[:40]} is outside +-(2**53 - 1); store "
                          "it as a string")
    try:
        text = json.dumps(dict(metadata), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise EncodeError(f"metadata is not JSON-serialisable: {exc}") from None
    try:
        data = text.encode("utf-8", "strict")
    except UnicodeEncodeError as exc:  # a lone surrogate, e.g. read back from "\ud800"
        raise EncodeError(f"metadata is not valid Unicode: {exc}") from None
    if len(data) > S.DEFAULT_LIMITS.max_metadata_size:
        raise EncodeError(f"metadata is {len(data)} bytes; limit "
                          f"{S.DEFAULT_LIMITS.max_metadata_size}")
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key {dup!r}")
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _exact_int(text: str) -> int:
    value = int(text)
    if abs(value) > S.JSON_INT_MAX:  # spec 5.2: every JSON parser reads it exactly
        raise ValueError(f"integer {text[:40]} is outside +-(2**53 - 1)")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 would sneak infinity past the NaN/Infinity rule
        raise ValueError(f"number {text} is out of range")
    return value


def decode_metadata(data: memoryview, offset: int, limits: S.ReadLimits) -> dict[str, Any]:
    """Parse and validate the Metadata bytes (spec 5.2)."""
    if not len(data):
        return {}
    try:
        text = bytes(data).decode("utf-8", "strict")
        meta = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant,
                          parse_float=_finite_float, parse_int=_exact_int)
    except RecursionError:
        raise LimitExceededError(f"metadata nests deeper than {limits.max_metadata_depth}",
                                 offset=offset) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptDataError(f"metadata is not valid JSON: {exc}", offset=offset) from None
    lone = _lone_surrogate(meta)
    if lone is not None:  # spec 5.2: strings are Unicode text, as in UTF-8 (R-META-13)
        raise CorruptDataError(f"metadata is not valid JSON: lone surrogate {lone}",
                               offset=offset)
    if not isinstance(meta, dict):
        raise CorruptDataError(f"metadata must be a JSON object, got {type(meta).__name__}",
                               offset=offset)
    if _too_deep(meta, limits.max_metadata_depth):
        raise LimitExceededError(f"metadata nests deeper than {limits.max_metadata_depth}",
                                 offset=offset)
    _check_reserved(meta, lambda m: CorruptDataError(m, offset=offset))
    return meta



def stage_metadata(data: bytes, level: int | None, bare: bool = False,
                   sized: bool = True) -> tuple[int, bytes]:
    """Return ``(flags, stored)``: the JSON ``data`` as a 1.2 header stores it (Appendix D 2).

    With zstd enabled, JSON of at least 64 bytes becomes ``Metadata_Decoded_Size`` and one
    frame made with the metadata dictionary (spec 5.2, 7.3), at level 19 up to 1 MiB, kept
    where it is smaller. ``bare`` (1.6): the frame is stored without its magic number, and
    ``Flags`` bit 1 says so (spec 5.1, 7.1). ``sized=False`` (1.7, with ``bare``): without
    ``Metadata_Decoded_Size``, which the frame's content size gives, and ``Flags`` bit 2
    says so (spec 5.2).

    >>> flags, stored = stage_metadata(b'{"compeft.producer":"compeft_format 0.1.0"}' * 2, 3)
    >>> flags, len(stored) < 86
    (1, True)
    >>> stage_metadata(b'{"a":1}', 3)
    (0, b'{"a":1}')
    """
    if level is None or len(data) < _ZSTD_MIN:
        return 0, data
    frame = METADATA_ZSTD.encode(data, S.SMALL_ZSTD_LEVEL if len(data) <= S.SMALL_ZSTD_MAX
                                 else level, bare)
    stored = (encode_varint(len(data)) if sized else b"") + frame
    flags = (S.FLAG_METADATA_ZSTD | (S.FLAG_METADATA_BARE if bare else 0)
             | (0 if sized else S.FLAG_METADATA_UNSIZED))
    return (flags, stored) if len(stored) < len(data) else (0, data)


def unstage_metadata(stored: memoryview, offset: int, limits: S.ReadLimits,
                     charge: Callable[[int, BlockContext], None], bare: bool = False,
                     sized: bool = True) -> bytes:
    """Return the JSON of compressed metadata (spec 5.2, 8.1 step 3a), checked on the way.

    ``offset`` is where ``stored`` starts in the file; ``charge(n, ctx)`` charges the decoded
    size to the decode budget (spec 9.3) before anything is decompressed. ``bare``: the
    frame is stored without its magic number (``Flags`` bit 1, 1.6). ``sized=False``
    (``Flags`` bit 2, 1.7): no ``Metadata_Decoded_Size``; the frame header's content size
    is it.
    """
    src = BufferSource(stored, base=offset)
    if sized:
        decoded = src.varint("metadata decoded size")
    else:  # spec 5.2 (1.7): the frame's own Frame_Content_Size (R-ZST-2, R-ZST-3 first)
        decoded = METADATA_ZSTD.declared_size(stored, BlockContext(None, 0, 0, "F32", (),
                                                                   offset), bare)
    if decoded > limits.max_metadata_size:
        raise LimitExceededError(f"metadata decodes to {decoded} bytes; limit "
                                 f"{limits.max_metadata_size}", offset=offset)
    ctx = BlockContext(None, 0, 0, "F32", (), src.pos)
    charge(decoded, ctx)
    return METADATA_ZSTD.decode(stored[src.pos - offset:], decoded, ctx, bare)
