"""Reader limits (spec 9.2) and the allocation bound they give.

Three parts:

* every field of :class:`ReadLimits` raises :class:`LimitExceededError` with a message that
  names the limit and the numbers, in every reader, and raising that one limit makes the same
  file load;
* declared sizes are compared with the bytes present (and zstd content sizes with the block's
  bounds) before anything is allocated, and ``iter_stream`` on a non-seekable stream reads in
  chunks of at most 1 MiB, never by a declared size;
* the headline property, measured in a subprocess with ``tracemalloc`` (numpy reports its
  buffers to it): **no file under 1 MB makes a reader allocate more than 64 MiB** unless the
  caller raised a limit. The hostile files below are built to maximise allocation: zstd bombs
  in every block type, dense records of zstd'd zeros (widened BF16/F8 included), max-density
  bitmask and golomb blocks just under and over the decode budget, blocks whose popcount
  exceeds the declared nnz, a huge numel with nnz 0, tens of thousands of records or index
  entries, and metadata built for the largest Python object graph per byte.
"""

from __future__ import annotations

import functools
import io
import json
import re
import struct
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zstandard

import compeft_format as cf
from compeft_format import LimitExceededError, ReadLimits, TernaryTensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "fuzz"))
import _craft as C  # noqa: E402

MiB = 2**20
BUDGET = 64 * MiB  #: the default decode budget of any file under 1 MiB (spec 9.2)
ONE_MB = 10**6  #: hostile files stay under this many bytes
#: the decode budget counts decoded data, not the Python objects that hold it (array and
#: bytes headers, the result dict, an exception): this much on top of 64 MiB is allowed
OBJECT_SLACK = 256 * 1024
BULK_FRACTION = 1 / 32  #: bulk files are measured at 1/32 of 1 MB and scaled up
VERBOSE = False
SCALE = C.block(C.SCALE, payload=struct.pack("<f", 0.5))


# ---------------------------------------------------------------------------------------------
# Readers, all three
# ---------------------------------------------------------------------------------------------


class Pipe(io.RawIOBase):
    """A non-seekable stream that records the largest read it was asked for."""

    def __init__(self, data: bytes) -> None:
        self._src = io.BytesIO(data)
        self.largest_read = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        self.largest_read = max(self.largest_read, n)
        return self._src.read(n)


DEFAULT = ReadLimits()


def read_loads(data: bytes, limits: ReadLimits = DEFAULT) -> dict:
    return cf.loads(data, limits=limits)


def read_stream(data: bytes, limits: ReadLimits = DEFAULT) -> dict:
    return dict(cf.iter_stream(Pipe(data), limits=limits))


def read_random(data: bytes, limits: ReadLimits = DEFAULT) -> dict:
    with cf.open_file(data, limits=limits) as f:
        f.metadata()
        return {k: f.get(k) for k in f}


READERS = pytest.mark.parametrize("read", [read_loads, read_stream, read_random],
                                  ids=["loads", "iter_stream", "open_file"])


def _same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(
        (a[k] == b[k]) if isinstance(a[k], TernaryTensor) else np.array_equal(a[k], b[k])
        for k in a)


# ---------------------------------------------------------------------------------------------
# Each limit: a clear error, and raising it loads the same file
# ---------------------------------------------------------------------------------------------

SMALL = {"a.weight": TernaryTensor((4, 5, 6), [1, 7, 100], [True, False, True], 0.25),
         "b.bias": np.arange(1000, dtype=np.float32) * 0,  # zstd'd: 4000 decoded bytes
         "c": TernaryTensor((2, 1, 1, 3), [0], [False], 1.0)}
SMALL_META = {"compeft.producer": "test", "nested": {"a": {"b": [1, [2, [3]]]}}}
SMALL_FILE = cf.dumps(SMALL, metadata=SMALL_META)
# the decoded sizes of SMALL_FILE: what each limit must be to just pass
EXACT = {
    "max_metadata_size": len(json.dumps(SMALL_META, sort_keys=True, separators=(",", ":"))),
    "max_metadata_depth": 6,
    "max_tensors": 3,
    "max_ndim": 4,
    "max_name_length": len("a.weight"),
    "max_numel": 1000,
}


@READERS
@pytest.mark.parametrize(("field", "pattern"), [
    ("max_metadata_size", r"metadata is \d+ bytes; limit \d+"),
    ("max_metadata_depth", r"metadata nests deeper than 5"),
    ("max_tensors", r"(more than 2 records|3 tensors; limit 2)"),
    ("max_ndim", r"4 dimensions; limit 3"),
    ("max_name_length", r"name length 8 outside \[1, 7\]"),
    ("max_numel", r"shape \[1000\] has 1000 elements; limit 999"),
])
def test_each_limit_raises_then_raising_it_loads(read, field, pattern):
    too_low = ReadLimits(**{field: EXACT[field] - 1})
    with pytest.raises(LimitExceededError, match=pattern):
        read(SMALL_FILE, too_low)
    assert _same(read(SMALL_FILE, ReadLimits(**{field: EXACT[field]})), read(SMALL_FILE))


@READERS
def test_decode_budget_raises_then_raising_it_loads(read):
    # b.bias is 4000 bytes of zstd'd zeros: decoding it alone passes the first limit
    with pytest.raises(LimitExceededError, match=r"decoding needs \d+ bytes, above the limit "
                                                 r"of 3999 \(raise ReadLimits.max_decoded_bytes"):
        read(SMALL_FILE, ReadLimits(max_decoded_bytes=3999))
    assert _same(read(SMALL_FILE, ReadLimits(max_decoded_bytes=10**6)), read(SMALL_FILE))


def test_index_size_limit_raises_then_raising_it_loads():
    """Random access bounds the index before parsing it (spec 9.2: random access only)."""
    index_size = struct.unpack("<I", SMALL_FILE[-12:-8])[0]  # spec 5.7: the 1.7 trailer
    with pytest.raises(LimitExceededError, match=rf"index is {index_size} bytes; limit "
                                                 rf"{index_size - 1}"):
        read_random(SMALL_FILE, ReadLimits(max_index_size=index_size - 1))
    assert _same(read_random(SMALL_FILE, ReadLimits(max_index_size=index_size)),
                 read_random(SMALL_FILE))
    # the sequential readers hold the index to the records already read instead
    assert _same(read_loads(SMALL_FILE, ReadLimits(max_index_size=1)), read_loads(SMALL_FILE))


def test_defaults_are_documented():
    """The defaults of spec 9.2; a change here is a spec change."""
    d = ReadLimits()
    assert (d.max_metadata_size, d.max_metadata_depth, d.max_index_size, d.max_tensors,
            d.max_ndim, d.max_name_length, d.max_numel, d.max_decoded_bytes) == (
        16 * MiB, 64, 256 * MiB, 1_000_000, 16, 4096, 2**48, None)


# ---------------------------------------------------------------------------------------------
# Hostile files: each under 1 MB, each built to make a reader allocate as much as it can
# ---------------------------------------------------------------------------------------------


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3, write_content_size=True).compress(data)


@functools.lru_cache(maxsize=4)
def _zeros_frame(n: int) -> bytes:
    """A zstd frame of ``n`` zero bytes that declares its size, without holding ``n`` bytes."""
    cobj = zstandard.ZstdCompressor(level=1, write_content_size=True).compressobj(size=n)
    chunk = bytes(min(n, 1 << 20))
    out = [cobj.compress(chunk[: min(len(chunk), n - i)]) for i in range(0, n, len(chunk))]
    return b"".join(out) + cobj.flush()


def _zblock(btype: int, decoded: bytes, param: int = 0) -> C.Block:
    """A block whose payload goes through the zstd stage."""
    if not decoded:
        return C.block(btype, param=param)
    return C.block(btype, stage=C.STAGE_ZSTD, param=param, payload=_zstd(decoded),
                   decoded=len(decoded))


def _ternary(name: bytes, numel: int, nnz: int, positions: C.Block, **kw) -> C.Record:
    signs = _zblock(C.SIGNS, bytes((nnz + 7) // 8))
    return C.record(name, shape=kw.pop("shape", (numel,)), nnz=nnz,
                    blocks=[positions, signs, SCALE], **kw)


def _golomb_stream(m: int, n: int, ones: int | None = None) -> bytes:
    """A golomb block of ``n`` codes with gap 0 and remainder 0, then ``ones`` unary ones.

    Planes and extension bits are zero; ``ones`` (default ``n``) more than ``n`` makes a
    block whose unary part holds more codes than the declared nnz.
    """
    b = (m - 1).bit_length()
    u = (1 << b) - m
    w = max(b - 1, 0)
    n_long = n if (b >= 1 and u == 0) else 0  # v = 0 is long only when u = 0
    zeros = w * n + n_long
    ones = n if ones is None else ones
    assert zeros % 8 == 0, "keep the parts byte-aligned: n a multiple of 8"
    tail = bytes([(1 << (ones % 8)) - 1]) if ones % 8 else b""
    return bytes(zeros // 8) + b"\xff" * (ones // 8) + tail


def _golomb_bits_per_code(m: int) -> int:
    b = (m - 1).bit_length()
    return max(b - 1, 0) + (1 if b >= 1 and (1 << b) == m else 0) + 1


@functools.lru_cache(maxsize=1)
def bomb_files() -> dict[str, bytes]:
    """Return ``{name: bytes}``: files under 1 MB that push allocation to the budget or past.

    Sizes are chosen against the default decode budget of 64 MiB so that each kind of block
    is decoded once just under what the budget lets through, and once past it.
    """
    out: dict[str, bytes] = {}
    # a huge tensor with no nonzeros: nothing to allocate unless the caller densifies
    out["numel-2^48-nnz-0"] = C.build_file([_ternary(b"w", 2**48, 0, C.block(C.GOLOMB, param=1),
                                                     shape=(2**24, 2**24))])
    # max-density bitmask: numel = nnz = 8 * D; unpacked bits D*8, indices 64*D, signs 8*D
    for tag, d in (("under", BUDGET // 82), ("over", BUDGET // 60)):
        n = 8 * d
        out[f"bitmask-max-density-{tag}"] = C.build_file([_ternary(
            b"w", n, n, _zblock(C.BITMASK, b"\xff" * d))])
    # popcount far above the declared nnz: the indices must not be materialised
    d = BUDGET // 10
    out["bitmask-popcount-bomb"] = C.build_file([_ternary(b"w", 8 * d, 0,
                                                          _zblock(C.BITMASK, b"\xff" * d))])
    out["bitmask-popcount-bomb-raw"] = C.build_file([_ternary(b"w", 8 * 900_000, 1, C.block(
        C.BITMASK, payload=b"\xff" * 900_000))])
    # max-density golomb for several code shapes (M = 1: unary only; 2: + extension bits;
    # 3: a plane of short codes; 4: a plane of long codes; 256: seven planes)
    for m in (1, 2, 3, 4, 256):
        for tag, factor in (("under", 1.0), ("over", 1.6)):
            bits = _golomb_bits_per_code(m)
            n = int(factor * BUDGET / (9 + 1 + bits * 1.125 / 8 * 9)) // 8 * 8
            stream = _golomb_stream(m, n)
            out[f"golomb-m{m}-max-density-{tag}"] = C.build_file([_ternary(
                b"w", n, n, _zblock(C.GOLOMB, stream, param=m))])
    # more unary codes than nnz: the terminators must not be materialised
    out["golomb-count-bomb"] = C.build_file([_ternary(
        b"w", 8 * BUDGET // 10, 1, _zblock(C.GOLOMB, _golomb_stream(1, 1, 8 * BUDGET // 10),
                                           param=1))])
    out["golomb-count-bomb-raw"] = C.build_file([_ternary(
        b"w", 8 * 900_000, 1, C.block(C.GOLOMB, param=1, payload=b"\xff" * 900_000))])
    # dense records through zstd of zeros: F32 as is; BF16 and F8 are widened to float32
    # (charged per element: the stored bytes, plus the widening for BF16 (8) and F8 (4))
    for dtype, code, cost in (("f32", C.F32, 4), ("bf16", C.BF16, 10), ("f8", 0x0E, 5),
                              ("u8", C.U8, 1)):
        size = {C.F32: 4, C.BF16: 2}.get(code, 1)
        for tag, numel in (("under", BUDGET * 95 // 100 // cost), ("over", BUDGET // cost + 8)):
            out[f"dense-{dtype}-zeros-{tag}"] = C.build_file([C.record(
                b"d", kind=C.KIND_DENSE, dtype=code, shape=(numel,), nnz=None,
                blocks=[_zblock(C.DENSE, bytes(numel * size))])])
    # several bombs in one file: the budget is per call, not per block
    out["dense-eight-bombs"] = C.build_file([C.record(
        b"d%d" % i, kind=C.KIND_DENSE, dtype=C.U8, shape=(BUDGET // 4,), nnz=None,
        blocks=[_zblock(C.DENSE, bytes(BUDGET // 4))]) for i in range(8)])
    # declared sizes far beyond the bytes present
    out["declared-metadata-16MiB"] = C.file_header(b"{}", metadata_size=16 * MiB)
    big = C.record(b"w", kind=C.KIND_DENSE, dtype=C.U8, shape=(2**40,), nnz=None,
                   blocks=[C.block(C.DENSE, stored_size=2**40)], data_size=2**40)
    out["declared-data-2^40"] = C.build_file([big])
    return out


@functools.lru_cache(maxsize=2)
def bulk_files(fraction: float) -> dict[str, bytes]:
    """Files whose allocation grows linearly with their size, at ``fraction`` of 1 MB.

    Many records, many index entries, metadata with the most Python objects per byte. Their
    peaks are measured at a fraction of the size (tracemalloc makes per-object work slow)
    and scaled up to 1 MB by :func:`test_no_file_under_1_mb_allocates_more_than_64_mib`.
    """
    out: dict[str, bytes] = {}
    # small records (alignment 1 keeps them tiny); each decodes to a few Python objects
    n = int(fraction * 21_000)
    tiny = [_ternary(b"%05d" % i, 1, 0, C.block(C.GOLOMB, param=1)) for i in range(n)]
    out["many-ternary-records"] = C.build_file(tiny, alignment_log2=0)
    n = int(fraction * 29_000)
    empty = [C.record(b"%05d" % i, kind=C.KIND_DENSE, dtype=C.U8, shape=(0,), nnz=None,
                      blocks=[C.block(C.DENSE)]) for i in range(n)]
    out["many-dense-records"] = C.build_file(empty, alignment_log2=0)
    # an index of many entries over a junk record area (open_file parses the whole index)
    n = int(fraction * 120_000)
    head = C.file_header(b"", alignment_log2=0)
    index = bytearray([C.KIND_END]) + C.varint(n)
    for i in range(n):
        name = bytes([1 + i // 127**2, 1 + i // 127 % 127, 1 + i % 127])  # ASCII, no NUL
        index += C.varint(3) + name + C.varint(len(head) + i)
    out["index-entries"] = (head + b"\x01" * n + index + struct.pack(
        "<QI4s", len(head) + n, C.crc(index), C.TAIL_MAGIC))
    # metadata: "{}" is 3 bytes of JSON and a 64-byte dict; "[]" a 56-byte list
    n = int(fraction * 330_000)
    for tag, item in (("objects", b"{}"), ("lists", b"[]")):
        out[f"metadata-empty-{tag}"] = C.build_file([], b'{"a":[' + b",".join([item] * n) + b"]}")
    deep = b"[" * 63 + b"]" * 63  # depth 64 with the top object: the deepest allowed
    n = int(fraction * 7_400)
    out["metadata-deep"] = C.build_file([], b"{" + b",".join(b'"%d":%s' % (i, deep)
                                                          for i in range(n)) + b"}")
    return out



def test_hostile_files_are_small():
    for name, data in bomb_files().items():
        assert len(data) < ONE_MB, (name, len(data))
    for name, data in bulk_files(BULK_FRACTION).items():  # full size: 32x, less one header
        assert len(data) / BULK_FRACTION < ONE_MB, (name, len(data))


# ---------------------------------------------------------------------------------------------
# The allocation bound, measured in a fresh interpreter
# ---------------------------------------------------------------------------------------------

_MEASURE = textwrap.dedent(r'''
    import gc, io, json, sys, time, tracemalloc
    sys.path.insert(0, sys.argv[1])
    import compeft_format as cf
    from compeft_format import CompeftError

    class Pipe(io.RawIOBase):  # a file seen as a pipe: no seek, no size
        def __init__(self, f): self.f = f
        def readable(self): return True
        def read(self, n=-1): return self.f.read(n)

    def loads(path, data):
        return cf.loads(data)

    def stream(path, data):  # every tensor kept: the budget covers the whole stream
        with open(path, "rb", buffering=0) as f:
            return list(cf.iter_stream(Pipe(f)))

    def measure(fn, *args, collect=True):
        if collect:
            gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        try:
            result = fn(*args)
            outcome = "ok"
        except CompeftError as exc:
            result, outcome = None, type(exc).__name__
        peak = tracemalloc.get_traced_memory()[1] - base
        del result
        return peak, outcome

    def random_access(path):  # one call at a time: the budget is per call (spec 9.3)
        readers = []
        worst, outcomes = measure(lambda: readers.append(cf.open_file(path)))  # the index
        if not readers:
            return worst, outcomes
        reader = readers.pop()
        keys = reader.keys()
        peak, outcome = measure(reader.file_info)
        worst = max(worst, peak)
        outcomes = outcome if outcome != "ok" else outcomes
        for key in keys:
            for fn in (reader.info, reader.get):
                peak, outcome = measure(fn, key, collect=False)
                worst = max(worst, peak)
                outcomes = outcome if outcome != "ok" else outcomes
        reader.close()
        return worst, outcomes

    tracemalloc.start()
    out = {}
    for path in sys.argv[2:]:
        with open(path, "rb") as f:
            data = f.read()
        t = time.perf_counter()
        out[path] = {"loads": measure(loads, path, data),
                     "iter_stream": measure(stream, path, data),
                     "open_file": random_access(path)}
        print(path, round(time.perf_counter() - t, 2), file=sys.stderr)
    print(json.dumps(out))
''')


def measure_peaks(paths: list[Path]) -> dict[str, dict[str, tuple[int, str]]]:
    """Run every reader on every file in a fresh interpreter; return tracemalloc peaks."""
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(ROOT), *map(str, paths)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if VERBOSE:
        print(proc.stderr, file=sys.stderr)
    return {Path(k).name: v for k, v in json.loads(proc.stdout).items()}


def test_no_file_under_1_mb_allocates_more_than_64_mib(tmp_path):
    """The headline bound: hostile files under 1 MB, every reader, peak <= 64 MiB.

    (Plus :data:`OBJECT_SLACK` for object headers: four 16 MiB bombs pass the budget exactly
    and their arrays, dict and exception add about 10 KB.)

    Bombs are measured at full size. Bulk files (allocation linear in their size) are
    measured at 1/32 of 1 MB and their peaks scaled by ``1 MB / size``. ``open_file`` is
    measured per call (``info``/``get`` of each key, the result dropped): its budget is per
    call (spec 9.3), so a caller who keeps every tensor of a file holds the sum.
    """
    files = {**bomb_files(), **bulk_files(BULK_FRACTION)}
    bulk = set(bulk_files(0.001))
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    peaks = measure_peaks([tmp_path / name for name in files])
    rows, worst = [], (0, "")
    for name, modes in peaks.items():
        scale = ONE_MB / len(files[name]) if name in bulk else 1.0
        for mode, (peak, outcome) in modes.items():
            estimate = peak * scale
            worst = max(worst, (estimate, f"{name} / {mode}"))
            rows.append(f"{name:32s} {mode:11s} {estimate / MiB:7.1f} MiB "
                        f"{estimate:11.0f} B  {outcome}")
            # the files sized just under the budget decode; those over it are refused
            valid = name.endswith("-under") or name in bulk or name == "numel-2^48-nnz-0"
            if valid and name != "index-entries":  # (its records are junk)
                assert outcome == "ok", (name, mode, outcome)
            if name.endswith("-over"):
                assert outcome == "LimitExceededError", (name, mode, outcome)
    (tmp_path / "peaks.txt").write_text("\n".join(rows))
    print("\n".join(rows), f"\nworst: {worst[0] / MiB:.1f} MiB ({worst[1]})")
    too_big = [r for r in rows if float(r.split()[4]) > BUDGET + OBJECT_SLACK]
    assert not too_big, "\n".join(too_big)
    # the measurement does see large allocations: the max-density bitmask decodes ~57 MiB
    assert peaks["bitmask-max-density-under"]["loads"][0] > 40 * MiB


# ---------------------------------------------------------------------------------------------
# Declared sizes against the bytes present; zstd sizes before decompressing; stream chunks
# ---------------------------------------------------------------------------------------------


def _peak(fn) -> tuple[int, BaseException | None]:
    """Run ``fn`` under tracemalloc; return (peak bytes above the start, exception)."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        try:
            fn()
            exc = None
        except cf.CompeftError as e:
            exc = e
        return tracemalloc.get_traced_memory()[1] - base, exc
    finally:
        tracemalloc.stop()


LYING = {
    # Metadata_Size says 16 MiB (the limit), 2 bytes follow
    "metadata": C.file_header(b"{}", metadata_size=16 * MiB),
    # Data_Size and Stored_Size say 1 TiB, nothing follows the header
    "record data": C.build_file([C.record(
        b"w", kind=C.KIND_DENSE, dtype=C.U8, shape=(2**40,), nnz=None,
        blocks=[C.block(C.DENSE, stored_size=2**40)], data_size=2**40)])[:-60],
    # a name length of 4096 (the limit) with 3 bytes present
    "name": C.build_file([C.record(b"w", body=C.varint(4096) + b"abc")])[:60],
}


@READERS
@pytest.mark.parametrize("what", list(LYING))
def test_declared_sizes_are_checked_against_the_bytes_present(read, what):
    peak, exc = _peak(lambda: read(LYING[what]))
    assert isinstance(exc, cf.FormatError), exc
    assert peak < 2 * MiB, f"{what}: {peak} bytes allocated for a {len(LYING[what])}-byte file"


def test_stream_reads_in_chunks_never_by_a_declared_size():
    """A 3 MiB record arrives in reads of at most 1 MiB; a lying size is never requested."""
    big = cf.dumps({"x": np.random.default_rng(0).integers(0, 255, 3 * MiB, dtype=np.uint8)},
                   zstd_level=None)
    pipe = Pipe(big)
    assert list(dict(cf.iter_stream(pipe))) == ["x"]
    assert pipe.largest_read <= MiB
    for data in LYING.values():
        pipe = Pipe(data)
        with pytest.raises(cf.FormatError):
            dict(cf.iter_stream(pipe))
        assert pipe.largest_read <= MiB


def _one_zstd_block(frame: bytes, decoded: int, numel: int) -> bytes:
    return C.build_file([C.record(b"d", kind=C.KIND_DENSE, dtype=C.U8, shape=(numel,), nnz=None,
                                  blocks=[C.block(C.DENSE, stage=C.STAGE_ZSTD, payload=frame,
                                                  decoded=decoded)])])


@READERS
@pytest.mark.parametrize(("case", "pattern"), [
    ("frame declares more than the block", r"frame declares 1073741824 bytes, block declares 1000"),
    ("frame without a content size", r"frame declares -1 bytes|content size|bad frame"),
    ("block declares more than its codec bound", r"decoded size 2000 exceeds the dense block "
                                                 r"bound 1000"),
    ("block within the bound, over the budget", r"decoding needs 1073741824 bytes"),
])
def test_zstd_sizes_are_checked_before_decompressing(read, case, pattern):
    gib = 2**30
    if case == "frame declares more than the block":
        data = _one_zstd_block(_zeros_frame(gib), 1000, 1000)
    elif case == "frame without a content size":
        frame = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1000))
        data = _one_zstd_block(frame, 1000, 1000)
    elif case == "block declares more than its codec bound":
        data = _one_zstd_block(_zstd(bytes(2000)), 2000, 1000)
    else:
        data = _one_zstd_block(_zeros_frame(gib), gib, gib)
    assert len(data) < 64 * 1024
    peak, exc = _peak(lambda: read(data))
    assert isinstance(exc, cf.FormatError), exc
    assert re.search(pattern, str(exc)), str(exc)
    assert peak < MiB, f"{case}: {peak} bytes allocated"


def test_budget_default_grows_with_the_file():
    """max(64 MiB, 64 x file size): the same 66 MiB zstd block passes in a 1.1 MiB file."""
    bomb = C.block(C.DENSE, stage=C.STAGE_ZSTD, payload=_zeros_frame(66 * MiB), decoded=66 * MiB)
    filler = np.random.default_rng(1).integers(0, 256, 1100 * 1024, dtype=np.uint8).tobytes()
    small = C.build_file([C.record(b"b", kind=C.KIND_DENSE, dtype=C.U8, shape=(66 * MiB,),
                                   nnz=None, blocks=[bomb])])
    large = C.build_file([
        C.record(b"a", kind=C.KIND_DENSE, dtype=C.U8, shape=(len(filler),), nnz=None,
                 blocks=[C.block(C.DENSE, payload=filler)]),
        C.record(b"b", kind=C.KIND_DENSE, dtype=C.U8, shape=(66 * MiB,), nnz=None,
                 blocks=[bomb])])
    with pytest.raises(LimitExceededError, match="above the limit of 67108864"):
        cf.loads(small)
    assert cf.loads(large)["b"].size == 66 * MiB
    assert cf.loads(small, limits=ReadLimits(max_decoded_bytes=66 * MiB))["b"].size == 66 * MiB


# ---------------------------------------------------------------------------------------------
# Regressions
# ---------------------------------------------------------------------------------------------


@READERS
def test_empty_shape_with_huge_dimensions_is_a_limit(read):
    """(0, 2**62) has no element, but no array can have that shape: to_numpy, dense=True and
    torch raised numpy's ValueError. Its nonzero dimensions count against max_numel."""
    data = C.build_file([C.record(b"w", shape=(0, 2**62), nnz=0, blocks=[
        C.block(C.GOLOMB, param=1), C.block(C.SIGNS), SCALE])])
    with pytest.raises(LimitExceededError, match=r"nonzero dimensions multiply to "
                                                 r"4611686018427387904; limit 281474976710656"):
        read(data)
    assert read(data, ReadLimits(max_numel=2**62))["w"].shape == (0, 2**62)
    ok = C.build_file([C.record(b"w", shape=(0, 2**48), nnz=0, blocks=[
        C.block(C.GOLOMB, param=1), C.block(C.SIGNS), SCALE])])
    assert read(ok)["w"].to_numpy().shape == (0, 2**48)


@pytest.mark.parametrize(("dtype", "code", "itemsize", "extra"), [
    ("BF16", C.BF16, 2, 8), ("F8_E4M3", 0x0E, 1, 4), ("F8_E5M2", 0x0F, 1, 4)])
def test_widening_to_float32_is_charged(dtype, code, itemsize, extra):
    """Regression: a 2 KB file of zstd'd BF16 zeros made loads allocate 304 MiB. Widening
    to float32 costs ``extra`` bytes an element, charged with the decoded bytes."""
    n = 1000
    data = C.build_file([C.record(b"d", kind=C.KIND_DENSE, dtype=code, shape=(n,), nnz=None,
                                  blocks=[_zblock(C.DENSE, bytes(n * itemsize))])])
    need = n * itemsize + n * extra
    for read in (read_loads, read_stream, read_random):
        with pytest.raises(LimitExceededError, match=f"decoding needs {need} bytes"):
            read(data, ReadLimits(max_decoded_bytes=need - 1))
        got = read(data, ReadLimits(max_decoded_bytes=need))["d"]
        assert got.dtype == np.float32
        assert not got.any()
    with cf.open_file(data, limits=ReadLimits(max_decoded_bytes=n * itemsize)) as f:
        assert f.get_raw("d")[1] == dtype  # raw storage is not widened, not charged
