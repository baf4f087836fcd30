"""The golden vectors of spec/FORMAT.md §12 against the implementation and the spec itself.

* every valid vector decodes (``loads``, ``iter_stream`` on a non-seekable stream,
  ``open_file``) to its JSON and re-encodes from it to the same bytes;
* every accepted vector decodes to its JSON;
* every invalid vector raises the recorded class and exact message on each read path;
* the rule table of FORMAT.md §9.1 and the invalid catalogue cover each other, and every
  recorded message fits its rule's template;
* the hex dump of Appendix A rebuilds the example file byte for byte;
* the dtype and limit tables of the spec match the code;
* the independent reader ``spec/tools/reference_reader.py`` agrees with every vector.
"""

from __future__ import annotations

import importlib.util
import json
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

import compeft_format as cf
from compeft_format import ReadLimits, TernaryTensor, _spec, errors
from compeft_format import dtypes as cf_dtypes

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "spec" / "FORMAT.md"
VECTORS = ROOT / "spec" / "vectors"
TOOLS = ROOT / "spec" / "tools"


def _load(name: str, path: Path) -> ModuleType:
    """Import a tool by path (spec/tools is not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


rules_mod = _load("spec_rules", TOOLS / "_rules.py")
ref = _load("spec_reference_reader", TOOLS / "reference_reader.py")
ShortReads = _load("spec_make_vectors", TOOLS / "make_vectors.py").ShortReads  # a raw pipe
RULES = rules_mod.load_rules(SPEC)


def _vectors(group: str) -> list[tuple[str, dict[str, Any], bytes, Path]]:
    out = []
    for js in sorted((VECTORS / group).glob("*.json")):
        path = js.with_suffix(".compeft")
        out.append((js.stem, json.loads(js.read_text(encoding="utf-8")), path.read_bytes(), path))
    return out


VALID = _vectors("valid")
ACCEPTED = _vectors("accepted")
INVALID = _vectors("invalid")


def _ids(vectors: list[tuple[str, Any, Any, Any]]) -> list[str]:
    return [v[0] for v in vectors]




# ---------------------------------------------------------------------------------------------
# The JSON form of tensors (spec §12)
# ---------------------------------------------------------------------------------------------

_STORAGE = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "i1", "I16": "<i2", "I32": "<i4",
            "I64": "<i8", "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8", "BOOL": "?"}


def _bits(scale: float) -> str:
    return f"0x{struct.unpack('<I', struct.pack('<f', scale))[0]:08x}"


def _ternary_json(name: str, t: TernaryTensor) -> dict[str, Any]:
    return {"name": name, "kind": "ternary", "shape": list(t.shape), "dtype": t.dtype,
            "nnz": t.nnz, "indices": t.indices.tolist(), "signs": t.signs.astype(int).tolist(),
            "scale": t.scale, "scale_bits": _bits(t.scale)}


def _dense_json(name: str, shape: tuple[int, ...], dtype: str, raw: bytes) -> dict[str, Any]:
    return {"name": name, "kind": "dense", "shape": list(shape), "dtype": dtype,
            "data_hex": raw.hex()}


def _torch_bytes(t: Any) -> bytes:
    import torch

    if not t.numel():  # an empty tensor's stride cannot be reinterpreted
        return b""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _numpy_json(name: str, value: Any, dtype: str) -> dict[str, Any]:
    """The JSON form of a value from the numpy path.

    numpy has no BF16 or F8: those come back widened to float32, so their form holds the
    float32 bytes (compared as bytes, which keeps NaNs comparable).
    """
    if isinstance(value, TernaryTensor):
        return _ternary_json(name, value)
    if dtype in _STORAGE:
        return _dense_json(name, value.shape, dtype, value.tobytes())
    return {"name": name, "kind": "dense", "shape": list(value.shape), "dtype": dtype,
            "float32_hex": np.ascontiguousarray(value, "<f4").tobytes().hex()}


def _numpy_expected(tensors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The vector's tensors as the numpy path shows them (see :func:`_numpy_json`)."""
    out = []
    for e in tensors:
        if e["kind"] == "dense" and e["dtype"] not in _STORAGE:
            bits = np.frombuffer(bytes.fromhex(e["data_hex"]),
                                 np.uint16 if e["dtype"] == "BF16" else np.uint8)
            value = cf_dtypes.to_numpy_values(bits, e["dtype"]).reshape(e["shape"])
            out.append(_numpy_json(e["name"], value, e["dtype"]))
        else:
            out.append(e)
    return out


def _dense_value(e: dict[str, Any]) -> Any:
    """A numpy array (or, for BF16 and F8, a torch tensor) holding a dense JSON tensor."""
    raw = bytes.fromhex(e["data_hex"])
    if e["dtype"] in _STORAGE:
        return np.frombuffer(raw, _STORAGE[e["dtype"]]).reshape(e["shape"])
    import torch

    if e["dtype"] == "BF16":
        bits = torch.from_numpy(np.frombuffer(raw, np.int16).copy())
        return bits.view(torch.bfloat16).reshape(e["shape"])
    t = torch.from_numpy(np.frombuffer(raw, np.uint8).copy())
    return t.view(torch.float8_e4m3fn if e["dtype"] == "F8_E4M3" else torch.float8_e5m2
                  ).reshape(e["shape"])


def _tensors_from_json(tensors: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for e in tensors:
        if e["kind"] == "ternary":
            scale = struct.unpack("<f", struct.pack("<I", int(e["scale_bits"], 16)))[0]
            assert scale == e["scale"]
            out[e["name"]] = TernaryTensor(e["shape"], e["indices"], e["signs"], scale, e["dtype"])
        else:
            out[e["name"]] = _dense_value(e)
    return out


def _loads_json(data: bytes, tensors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    dtypes = {e["name"]: e["dtype"] for e in tensors}
    return [_numpy_json(n, v, dtypes[n]) for n, v in cf.loads(data).items()]


def _check_decodes(doc: dict[str, Any], data: bytes, path: Path) -> None:
    """Every read path gives the vector's metadata and tensors."""
    tensors = doc["tensors"]
    dtypes = {e["name"]: e["dtype"] for e in tensors}
    expected_numpy = _numpy_expected(tensors)
    assert _loads_json(data, tensors) == expected_numpy
    # torch gives every dtype natively: compare the raw bytes of the dense tensors
    dense = {e["name"] for e in tensors if e["kind"] == "dense"}
    got_torch = cf.loads(data, framework="torch")
    assert [_dense_json(n, tuple(v.shape), dtypes[n], _torch_bytes(v))
            for n, v in got_torch.items() if n in dense] == [
        e for e in tensors if e["kind"] == "dense"]
    # iter_stream on a stream that cannot seek and returns short reads
    streamed = [_numpy_json(n, v, dtypes[n]) for n, v in cf.iter_stream(ShortReads(data))]
    assert streamed == expected_numpy
    # load_file and random access on the file (memory-mapped)
    loaded = cf.load_file(path)
    assert [_numpy_json(n, v, dtypes[n]) for n, v in loaded.items()] == expected_numpy
    with cf.open_file(path) as f:
        assert f.metadata() == doc["metadata"]
        assert f.keys() == [e["name"] for e in tensors]
        items = []
        for name in f:
            raw = f.get_raw(name)
            if isinstance(raw, TernaryTensor):
                items.append(_ternary_json(name, raw))
            else:
                arr, dtype = raw
                items.append(_dense_json(name, arr.shape, dtype, arr.tobytes()))
        assert items == tensors
    assert cf.inspect(path).metadata == doc["metadata"]


# ---------------------------------------------------------------------------------------------
# Valid and accepted vectors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("slug", "doc", "data", "path"), VALID, ids=_ids(VALID))
def test_valid_vector_decodes(slug: str, doc: dict[str, Any], data: bytes, path: Path) -> None:
    """A valid vector decodes to its JSON on every read path."""
    _check_decodes(doc, data, path)


@pytest.mark.parametrize(("slug", "doc", "data", "path"), VALID, ids=_ids(VALID))
def test_valid_vector_reencodes(slug: str, doc: dict[str, Any], data: bytes, path: Path) -> None:
    """The reference encoder rebuilds a valid vector byte for byte from its JSON."""
    rebuilt = cf.dumps(_tensors_from_json(doc["tensors"]), metadata=doc["metadata"],
                       **{"version": "1.0", **doc["options"]})  # no version given: 1.0
    assert rebuilt == data


@pytest.mark.parametrize(("slug", "doc", "data", "path"), VALID, ids=_ids(VALID))
def test_valid_vector_layout(slug: str, doc: dict[str, Any], data: bytes, path: Path) -> None:
    """The blocks of each record are the ones the vector says it pins."""
    info = cf.inspect(data)
    layout = [{"name": t.name, "blocks": [
        {"codec": b.codec, "stage": b.stage, "param": b.param, "stored_size": b.stored_size,
         "decoded_size": b.decoded_size} for b in t.blocks]} for t in info.tensors]
    assert layout == doc["layout"]


@pytest.mark.parametrize(("slug", "doc", "data", "path"), ACCEPTED, ids=_ids(ACCEPTED))
def test_accepted_vector_decodes(slug: str, doc: dict[str, Any], data: bytes,
                                 path: Path) -> None:
    """A valid file the encoder never writes decodes to its JSON on every read path."""
    _check_decodes(doc, data, path)
    # the encoder writes a different, canonical file with the same content
    canonical = cf.dumps(_tensors_from_json(doc["tensors"]), metadata=doc["metadata"])
    assert canonical != data
    assert _loads_json(canonical, doc["tensors"]) == _loads_json(data, doc["tensors"])


# ---------------------------------------------------------------------------------------------
# Invalid vectors
# ---------------------------------------------------------------------------------------------


def _error(fn: Any) -> dict[str, str] | None:
    """Return ``{"error", "message"}`` of the CompeftError that ``fn`` raises, or None."""
    try:
        fn()
    except cf.CompeftError as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    return None


def _strip(expected: dict[str, Any] | None) -> dict[str, str] | None:
    if expected is None or expected.get("error") is None:
        return None
    return {"error": expected["error"], "message": expected["message"]}


def _read_random(path: Path, limits: ReadLimits) -> None:
    with cf.open_file(path, limits=limits) as f:
        for name in f:
            f.get(name)


@pytest.mark.parametrize(("slug", "doc", "data", "path"), INVALID, ids=_ids(INVALID))
def test_invalid_vector(slug: str, doc: dict[str, Any], data: bytes, path: Path) -> None:
    """Each read path raises the recorded class and exact message (or accepts, where null)."""
    limits = ReadLimits(**doc.get("limits", {}))
    assert _error(lambda: cf.loads(data, limits=limits)) == _strip(doc)
    assert _error(lambda: cf.load_file(path, limits=limits)) == _strip(doc)
    stream = doc.get("iter_stream", doc)
    assert _error(lambda: list(cf.iter_stream(ShortReads(data), limits=limits))) == _strip(stream)
    assert _error(lambda: _read_random(path, limits)) == _strip(doc["open_file"])


@pytest.mark.parametrize(("slug", "doc", "data", "path"), INVALID, ids=_ids(INVALID))
def test_invalid_vector_matches_rule(slug: str, doc: dict[str, Any], data: bytes,
                                     path: Path) -> None:
    """Each recorded error is its rule's class, fits its message template, on a listed path."""
    results = [("S", doc), ("S", doc.get("iter_stream")), ("R", doc["open_file"])]
    assert any(r and r.get("rule") for _, r in results)
    for path_kind, result in results:
        if not result or result.get("rule") is None:
            continue
        rule = RULES[result["rule"]]
        assert result["error"] == rule.error
        assert rule.matches(result["message"]), (result["message"], rule.templates)
        assert path_kind in rule.paths


def test_rule_table_and_catalogue_cover_each_other() -> None:
    """Every rule has a vector on each path it lists; every vector's rule is in the table."""
    seen: set[tuple[str, str]] = set()
    for _, doc, _, _ in INVALID:
        for path_kind, result in (("S", doc), ("S", doc.get("iter_stream")),
                                  ("R", doc["open_file"])):
            if result and result.get("rule"):
                assert result["rule"] in RULES
                seen.add((result["rule"], path_kind))
    missing = sorted((r.id, p) for r in RULES.values() for p in r.paths if (r.id, p) not in seen)
    assert not missing, f"rules without an invalid vector on a path they list: {missing}"
    assert len(RULES) >= 80


def test_rule_table_is_well_formed() -> None:
    """IDs are unique and ordered by group; classes exist; sections are headings of the spec."""
    text = SPEC.read_text(encoding="utf-8")
    headings = set(re.findall(r"^#{2,4} (\d+(?:\.\d+)*) ", text, re.M))
    for rule in RULES.values():
        assert isinstance(getattr(errors, rule.error), type), rule.id
        assert issubclass(getattr(errors, rule.error), errors.CompeftError)
        assert rule.paths, rule.id
        assert rule.paths <= {"S", "R"}, rule.id
        assert rule.templates, rule.id
        for section in rule.section.split(", "):
            assert section in headings, (rule.id, section)
    # every rule ID the text mentions is in the table
    mentioned = set(re.findall(r"R-[A-Z]+-\d+", text))
    assert mentioned <= set(RULES), mentioned - set(RULES)


# ---------------------------------------------------------------------------------------------
# The spec's tables and example against the code
# ---------------------------------------------------------------------------------------------


def _hexdump() -> list[tuple[int, bytes, str]]:
    block = re.search(r"```hexdump\n(.*?)```", SPEC.read_text(encoding="utf-8"), re.S)
    assert block, "FORMAT.md has no hexdump block"
    rows = []
    for line in block.group(1).splitlines():
        m = re.fullmatch(r"([0-9a-f]{4}): ((?:[0-9a-f]{2} )*[0-9a-f]{2}) +\| (.+)", line)
        assert m, f"bad hexdump line: {line!r}"
        rows.append((int(m.group(1), 16), bytes.fromhex(m.group(2)), m.group(3)))
    return rows


def test_hexdump_rebuilds_the_example() -> None:
    """Appendix A: offsets are contiguous, every byte is commented, the bytes are the file."""
    rows = _hexdump()
    data = b""
    for offset, chunk, comment in rows:
        assert offset == len(data)
        assert comment.strip()
        data += chunk
    example = cf.dumps({"w": TernaryTensor((2, 8), [0, 3, 14], [False, True, False], 0.5)},
                       metadata={"compeft.producer": "spec"}, positions="golomb",
                       version="1.0")
    assert data == example == (VECTORS / "valid" / "002-spec-example.compeft").read_bytes()
    # the checksums the comments quote are the real ones
    for _, _, comment in rows:
        m = re.search(r"= (0x[0-9a-f]{8}), CRC-32 of bytes (0x[0-9a-f]+)\.\.(0x[0-9a-f]+)",
                      comment)
        if m:
            lo, hi = int(m.group(2), 16), int(m.group(3), 16)
            assert zlib.crc32(data[lo : hi + 1]) == int(m.group(1), 16), comment


def test_crc_check_value() -> None:
    """§2.4: the check value of CRC-32/ISO-HDLC."""
    assert "`0xCBF43926`" in SPEC.read_text(encoding="utf-8")
    assert zlib.crc32(b"123456789") == 0xCBF43926


def test_dtype_table_matches_code() -> None:
    """§5.4.2 lists exactly the codes, names, item sizes and ternary dtypes of the code."""
    text = SPEC.read_text(encoding="utf-8")
    rows = re.findall(r"^\| `0x([0-9A-F]{2})` \| `([A-Z0-9_]+)` \| (\d) \| (yes|no) \|", text,
                      re.M)
    table = {int(code, 16): (name, int(size)) for code, name, size, _ in rows}
    assert table == _spec.DTYPES
    assert tuple(name for _, name, _, t in rows if t == "yes") == _spec.TERNARY_DTYPES


def test_limits_table_matches_code() -> None:
    """§9.2 gives the defaults of ReadLimits."""
    text = SPEC.read_text(encoding="utf-8")
    section = text[text.index("### 9.2 Limits") : text.index("### 9.3")]
    names = re.findall(r"^\| `(max_[a-z_]+)` \|", section, re.M)
    assert names == list(ReadLimits.__dataclass_fields__)
    d = ReadLimits()
    assert (d.max_metadata_size, d.max_metadata_depth, d.max_index_size, d.max_tensors,
            d.max_ndim, d.max_name_length, d.max_numel, d.max_decoded_bytes,
            d.max_dense_bytes) == (
        16 * 2**20, 64, 256 * 2**20, 1_000_000, 16, 4096, 2**48, None, 16 * 2**30)
    for n in ("16 777 216", "268 435 456", "1 000 000", "2^48", "max(64 MiB, 64 × file size)",
              "17 179 869 184"):
        assert n in section
    assert (_spec.DECODE_BUDGET_FLOOR, _spec.DECODE_BUDGET_RATIO) == (64 * 2**20, 64)


def test_header_constants_match_code() -> None:
    """§5.1 and §5.7: the magics and fixed sizes."""
    text = SPEC.read_text(encoding="utf-8")
    assert "`89 43 50 46 54 0D 0A 1A`" in text
    assert bytes.fromhex("89 43 50 46 54 0D 0A 1A") == _spec.MAGIC
    assert "`43 50 46 45`" in text
    assert bytes.fromhex("43504645") == _spec.TAIL_MAGIC
    assert (_spec.FILE_HEADER_SIZE, _spec.TRAILER_SIZE, _spec.SHORT_TRAILER.size) == (16, 16, 12)
    assert "the trailer is the last\n12 bytes instead" in text
    version = re.search(r"Format version \*\*(\d+)\.(\d+)\*\*", text)
    assert version is not None
    assert tuple(map(int, version.groups())) == (_spec.VERSION_MAJOR, _spec.VERSION_MINOR)
    assert (_spec.VERSION_MAJOR, _spec.VERSION_MINOR, _spec.DEFAULT_ALIGNMENT_LOG2) == (1, 7, 3)
    assert "bit 0 (`0x01`, 1.2): `Metadata_Zstd`" in text
    assert _spec.FLAG_METADATA_ZSTD == 0x01
    assert "bit 1 (`0x02`, 1.6): `Metadata_Bare`" in text
    assert _spec.FLAG_METADATA_BARE == 0x02
    assert "bit 2 (`0x04`, 1.7): `Metadata_Unsized`" in text
    assert _spec.FLAG_METADATA_UNSIZED == 0x04
    assert "bit 3 (`0x08`, 1.7): `Short_Trailer`" in text
    assert _spec.FLAG_SHORT_TRAILER == 0x08
    assert "`28 B5 2F FD`" in text
    assert bytes.fromhex("28 B5 2F FD") == _spec.ZSTD_MAGIC


# ---------------------------------------------------------------------------------------------
# The independent reader
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("slug", "doc", "data", "path"), VALID + ACCEPTED,
                         ids=_ids(VALID) + [f"accepted-{s}" for s in _ids(ACCEPTED)])
def test_reference_reader_decodes(slug: str, doc: dict[str, Any], data: bytes,
                                  path: Path) -> None:
    """The reader written from the spec alone decodes valid files to their JSON, both ways."""
    for read in (ref.read_stream, ref.read_random):
        assert read(data) == {"metadata": doc["metadata"], "tensors": doc["tensors"]}


@pytest.mark.parametrize(("slug", "doc", "data", "path"), INVALID, ids=_ids(INVALID))
def test_reference_reader_rejects(slug: str, doc: dict[str, Any], data: bytes,
                                  path: Path) -> None:
    """The reader written from the spec alone reports the same rule on each path."""
    limits = ref.Limits(**doc.get("limits", {}))
    for read, expected in ((ref.read_stream, doc), (ref.read_random, doc["open_file"])):
        want = expected["rule"] if expected else None
        try:
            read(data, limits)
            got = None
        except ref.SpecError as exc:
            got = exc.rule
        assert got == want, read.__name__


@pytest.mark.slow
def test_generator_reproduces_the_vectors() -> None:
    """make_vectors.py, run with --check, rebuilds every released vector identically."""
    run = subprocess.run([sys.executable, str(TOOLS / "make_vectors.py"), "--check"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
