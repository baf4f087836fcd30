"""Hostile tensor names and metadata, on the write path and on every read path.

On write, what the format cannot hold raises :class:`EncodeError`; on read, files crafted
with *valid* checksums (so that the rule under test is what stops them, not a CRC) raise a
:class:`FormatError` subclass from ``loads``, ``iter_stream`` and ``open_file`` alike.

Names are data, never paths (spec 11): a name may contain ``/``, ``..``, control characters
other than NUL, or look like another name after Unicode normalisation. Such names round-trip
as they are, and nothing in this package turns a tensor name into a file path: ``save_file``
and the converters write only at the paths their caller gives (checked below for
``save_file``). An application that builds paths, URLs or commands from tensor names must
validate them for that purpose itself.
"""

from __future__ import annotations

import io
import json
import math
import struct
import sys
from pathlib import Path

import pytest

import compeft_format as cf
from compeft_format import (
    CorruptDataError,
    EncodeError,
    FormatError,
    LimitExceededError,
    ReadLimits,
    TernaryTensor,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "fuzz"))
import _craft as C  # noqa: E402

T = TernaryTensor((8,), [2], [True], 0.5)
SCALE = C.block(C.SCALE, payload=struct.pack("<f", 0.5))


def _rec(name: bytes) -> C.Record:
    """A valid ternary record named ``name`` (any bytes)."""
    return C.record(name, shape=(8,), nnz=1, blocks=[
        C.block(C.BITMASK, payload=b"\x04"), C.block(C.SIGNS, payload=b"\x01"), SCALE])


DEFAULT = ReadLimits()


def _read_all(data: bytes, limits: ReadLimits = DEFAULT) -> list[dict]:
    """Read ``data`` with all three readers; return their results (they must agree)."""
    out = [cf.loads(data, limits=limits), dict(cf.iter_stream(io.BytesIO(data), limits=limits))]
    with cf.open_file(data, limits=limits) as f:
        f.metadata()
        out.append({k: f.get(k) for k in f})
    return out


def _reject_all(data: bytes, cls: type[FormatError], pattern: str,
                limits: ReadLimits = DEFAULT) -> None:
    """Every reader raises ``cls`` with a message matching ``pattern``."""
    with pytest.raises(cls, match=pattern):
        cf.loads(data, limits=limits)
    with pytest.raises(cls, match=pattern):
        dict(cf.iter_stream(io.BytesIO(data), limits=limits))
    with pytest.raises(cls, match=pattern):  # at open (index, header) or at get
        _get_all(data, limits)


def _get_all(data: bytes, limits: ReadLimits) -> None:
    with cf.open_file(data, limits=limits) as f:
        for k in f:
            f.get(k)


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------

PATHLIKE = ["a/b", "../x", "..", ".", "/etc/passwd", "..\\..\\win", "C:\\x", "~/.ssh/id",
            "a\nb\tc\x7f", "\u202eevil", "e\u0301", "\u00e9", "x" * 4096, "名前/テンソル"]


def test_pathlike_names_round_trip_as_data(tmp_path, monkeypatch):
    """Names are data: separators, '..', controls, bidi overrides, both Unicode forms."""
    tensors = dict.fromkeys(PATHLIKE, T)
    monkeypatch.chdir(tmp_path)  # a name that became a path would land here
    (tmp_path / "out").mkdir()
    path = tmp_path / "out" / "model.compeft"
    cf.save_file(tensors, path)
    for got in (*_read_all(path.read_bytes()), cf.load_file(path)):
        assert sorted(got) == sorted(tensors)  # NFC and NFD forms stay two names
        assert all(got[k] == T for k in tensors)
    # nothing but the one file the caller named was written, anywhere under tmp_path
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "out", "out/model.compeft"]


@pytest.mark.parametrize(("name", "pattern"), [
    ("", r"names must be 1\.\.4096 UTF-8 bytes without NUL"),
    ("a\x00b", r"without NUL"),
    ("x" * 4097, r"names must be 1\.\.4096"),
    ("é" * 2049, r"names must be 1\.\.4096"),  # 4098 UTF-8 bytes
    ("\udcff", r"not valid UTF-8"),  # a lone surrogate (surrogateescape of byte 0xff)
])
def test_bad_names_are_refused_on_write(name, pattern):
    with pytest.raises(EncodeError, match=pattern):
        cf.dumps({name: T})
    with pytest.raises(EncodeError, match=pattern), cf.Writer(io.BytesIO()) as w:
        w.write(name, T)


def test_duplicate_and_unordered_names_are_refused_on_write():
    with cf.Writer(io.BytesIO()) as w:
        w.write("a", T)
        with pytest.raises(EncodeError, match="unique and written in increasing order"):
            w.write("a", T)
        with pytest.raises(EncodeError, match="unique and written in increasing order"):
            w.write("0", T)
    with pytest.raises(TypeError, match="tensor names are str"):
        cf.dumps({b"bytes": T})


@pytest.mark.parametrize(("name", "cls", "pattern"), [
    (b"a\x00b", CorruptDataError, r"name contains NUL"),
    (b"\x00", CorruptDataError, r"name contains NUL"),
    (b"\xff\xfe", CorruptDataError, r"name is not valid UTF-8"),
    (b"\xc0\xaf", CorruptDataError, r"name is not valid UTF-8"),  # overlong '/'
    (b"\xed\xa0\x80", CorruptDataError, r"name is not valid UTF-8"),  # a UTF-8 surrogate
    (b"a\xe9", CorruptDataError, r"name is not valid UTF-8"),  # Latin-1, not UTF-8
    (b"x" * 4097, LimitExceededError, r"name length 4097 outside \[1, 4096\]"),
    (b"", LimitExceededError, r"name length 0 outside \[1, 4096\]"),
])
def test_bad_names_are_refused_on_read(name, cls, pattern):
    _reject_all(C.build_file([_rec(name)]), cls, pattern)


def test_long_name_within_a_raised_limit_reads():
    data = C.build_file([_rec(b"x" * 5000)])
    _reject_all(data, LimitExceededError, r"name length 5000 outside \[1, 4096\]")
    for got in _read_all(data, ReadLimits(max_name_length=5000)):
        assert list(got) == ["x" * 5000]


def test_bad_name_in_the_index_only_is_refused():
    """A valid record, with the index entry's name broken (NUL, non-UTF-8)."""
    for bad, pattern in ((b"a\x00", "name contains NUL"), (b"a\xff", "not valid UTF-8")):
        rec = _rec(b"a")
        rec.index_name = bad
        _reject_all(C.build_file([rec]), CorruptDataError, pattern)


def test_mutated_name_with_recomputed_checksums_is_refused():
    """A name byte changed in place in a real file, every CRC made right again."""
    data = bytearray(cf.dumps({"layer.0": T, "layer.1": T}, version="1.0"))  # two records
    at = data.index(b"layer.1")
    for byte, pattern in ((0x00, "name contains NUL"), (0xFF, "not valid UTF-8"),
                          (ord("0"), "record names must increase|index names must increase|"
                                     "does not match|the index says")):
        bad = bytearray(data)
        bad[at + 6] = byte  # record name only: the index still says layer.1
        fixed = C.fix_checksums(bytes(bad))
        assert fixed is not None
        _reject_all(fixed, CorruptDataError, pattern)


@pytest.mark.parametrize("case", ["same record twice", "index lists a name twice",
                                  "records out of order", "index names another record"])
def test_duplicate_and_mismatched_names_are_refused_on_read(case):
    if case == "same record twice":
        data = C.build_file([_rec(b"a"), _rec(b"a")])
        pattern = r"record names must increase|index names must increase"
    elif case == "index lists a name twice":
        a, b = _rec(b"a"), _rec(b"b")
        b.index_name = b"a"
        data = C.build_file([a, b])
        pattern = r"index names must increase|does not match"
    elif case == "records out of order":
        data = C.build_file([_rec(b"b"), _rec(b"a")])
        pattern = r"names must increase"
    else:
        a, b = _rec(b"a"), _rec(b"b")
        b.index_name = b"c"
        data = C.build_file([a, b])
        pattern = r"is named 'b', the index says 'c'|does not match"
    _reject_all(data, CorruptDataError, pattern)


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------


def _nest(depth: int) -> dict:
    """An object nested ``depth`` deep, the top object counting 1."""
    value: object = {}
    for _ in range(depth - 1):
        value = {"k": value}
    return value  # type: ignore[return-value]


def test_metadata_depth_limit_on_write():
    assert cf.loads(cf.dumps({}, metadata=_nest(64))) == {}
    with pytest.raises(EncodeError, match="nests deeper than 64"):
        cf.dumps({}, metadata=_nest(65))
    deep_list: list = []
    for _ in range(5000):  # far past Python's recursion limit
        deep_list = [deep_list]
    with pytest.raises(EncodeError, match="nests deeper than 64"):
        cf.dumps({}, metadata={"a": deep_list})
    circular: dict = {}
    circular["self"] = circular
    with pytest.raises(EncodeError, match="nests deeper than 64"):
        cf.dumps({}, metadata=circular)


@pytest.mark.parametrize("depth", [65, 100, 500, 700, 900, 990, 5000, 200_000])
def test_metadata_depth_limit_on_read(depth):
    """Regression: 500..990 deep raised RecursionError (a recursive depth walk) before."""
    text = b'{"a":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"
    data = C.build_file([_rec(b"t")], text)
    _reject_all(data, LimitExceededError, r"metadata nests deeper than 64")
    if depth <= 500:  # within a raised limit the same file reads
        for got in _read_all(data, ReadLimits(max_metadata_depth=depth)):
            assert list(got) == ["t"]


@pytest.mark.parametrize(("text", "pattern"), [
    (b'{"a":1,"a":2}', r"duplicate key 'a'"),
    (b'{"x":{"b":1,"b":1}}', r"duplicate key 'b'"),
    (b'{"x":[{"c":1,"c":{}}]}', r"duplicate key 'c'"),
    (b'{"a":NaN}', r"NaN is not JSON"),
    (b'{"a":Infinity}', r"Infinity is not JSON"),
    (b'{"a":[-Infinity]}', r"-Infinity is not JSON"),
    (b'{"a":1e400}', r"out of range"),
    (b"[]", r"must be a JSON object, got list"),
    (b'"text"', r"must be a JSON object, got str"),
    (b"1", r"must be a JSON object, got int"),
    (b"null", r"must be a JSON object, got NoneType"),
    (b"{} {}", r"not valid JSON"),
    (b"{", r"not valid JSON"),
    (b"\xef\xbb\xbf{}", r"not valid JSON"),  # a byte order mark
    (b'{"a":"\xff"}', r"not valid JSON"),  # not UTF-8
    (b'{"compeft.producer":1}', r"'compeft.producer' must be a string"),
    (b'{"compeft.compression":"topk"}', r"'compeft.compression' must be an object"),
    (b'{"compeft.base":[]}', r"'compeft.base' must be an object"),
    (b'{"compeft.base":{"name":1}}', r"'compeft.base.name' must be a string"),
    (b'{"compeft.base":{"revision":null}}', r"'compeft.base.revision' must be a string"),
    (b'{"compeft.base":{"hashes":{"a":1}}}', r"'compeft.base.hashes' must be an object of str"),
    (b'{"compeft.base":{"hashes":["x"]}}', r"'compeft.base.hashes' must be an object of str"),
])
def test_bad_metadata_is_refused_on_read(text, pattern):
    _reject_all(C.build_file([_rec(b"t")], text), CorruptDataError, pattern)


def test_noncanonical_but_valid_metadata_is_accepted_on_read():
    """Whitespace, key order and escapes are the writer's business (spec 5.2)."""
    text = b'{ "z" : 1,\n "a" : [ 1.5 , "\\u00e9" ], "compeft.unknown": {"x": null} }'
    data = C.build_file([_rec(b"t")], text)
    with cf.open_file(data) as f:
        assert f.metadata() == {"z": 1, "a": [1.5, "é"], "compeft.unknown": {"x": None}}
    _read_all(data)


@pytest.mark.parametrize(("meta", "pattern"), [
    ({"a": math.nan}, r"not JSON-serialisable"),
    ({"a": [math.inf]}, r"not JSON-serialisable"),
    ({1: "int key"}, r"mapping with string keys"),
    ({"a": object()}, r"not JSON-serialisable"),
    ({"a": b"bytes"}, r"not JSON-serialisable"),
    ({"compeft.producer": 1}, r"'compeft.producer' must be a string"),
    ({"compeft.compression": "topk"}, r"'compeft.compression' must be an object"),
    ({"compeft.base": ["m"]}, r"'compeft.base' must be an object"),
    ({"compeft.base": {"name": 1}}, r"'compeft.base.name' must be a string"),
    ({"compeft.base": {"hashes": {"a": 1}}}, r"'compeft.base.hashes' must be an object of"),
])
def test_bad_metadata_is_refused_on_write(meta, pattern):
    with pytest.raises(EncodeError, match=pattern):
        cf.dumps({"t": T}, metadata=meta)


@pytest.mark.parametrize("meta", [["a", "list"], "text", 42])
def test_metadata_that_is_not_a_mapping_is_refused_on_write(meta):
    with pytest.raises(EncodeError, match="must be a mapping"):
        cf.dumps({"t": T}, metadata=meta)


def test_metadata_round_trips_with_hostile_strings():
    """Keys and values with quotes, controls, NUL, bidi overrides and astral characters."""
    meta = {"\x00key": "v\x00", "quote\"\\": ["\u202e", "\U0001f600", "\x1f\n"],
            "compeft.base": {"name": "../../etc", "hashes": {"a/b": "sha256:00"}}}
    for version in ("1.2", "1.1"):
        data = cf.dumps({"t": T}, metadata=meta, version=version)
        with cf.open_file(data) as f:
            assert f.metadata() == meta
    assert data[11] == 0  # 1.1: the metadata is stored as it is
    raw = data[16 : 16 + struct.unpack("<I", data[12:16])[0]]
    assert json.loads(raw) == meta  # plain JSON any parser reads the same way
