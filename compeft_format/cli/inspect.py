"""``compeft info`` and ``compeft verify``: read compeft files, write nothing."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from .. import _spec as S
from ..container import inspect, iter_stream
from ..convert import META_TASK_VECTOR, with_path
from ..errors import CompeftError
from ..hifi import HIFI_KEY, hifi_original_bytes
from ..sources import ADAPTER_COMPEFT, resolve_source
from .convert import STDIN_NAME
from .files import STDIO, Job, refuse_terminal
from .options import PROG, add_command, add_json, add_quiet, add_verbose
from .output import compeft_path, message


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``info`` and ``verify`` to the subcommands ``sub``."""
    i = add_command(sub, "info", run_info,
                    help="per-tensor layout, sizes and ratio of a compeft file",
                    description="Shape, dtype, density, codecs, bytes and bits per parameter "
                    "of every tensor, and the totals; reads no tensor data.")
    i.add_argument("files", nargs="+", metavar="FILE", help="a .compeft file, a compressed "
                   "adapter folder, or - (stdin); several are shown one after another")
    add_json(i, "print JSON (an array for several FILEs)")
    add_verbose(i, "also print the file's metadata (JSON)")

    v = add_command(sub, "verify", run_verify,
                    help="check every checksum and decode everything",
                    description="Check every byte of each file; one line per file. Exit "
                    "status 0 when all are sound, 1 otherwise.")
    v.add_argument("files", nargs="+", metavar="FILE", help="a .compeft file, a compressed "
                   "adapter folder, or - (stdin, read as a stream)")
    add_json(v, "print one JSON document (an array for several FILEs)")
    add_quiet(v, "print only the files that are not sound")
    add_verbose(v, "also print every tensor checked")


def _shape(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def run_info(args: argparse.Namespace) -> int:
    """``compeft info``: exit 1 when any file cannot be read."""
    refuse_terminal([Job(n, "") for n in args.files])
    status, docs, first = 0, [], True
    for name in args.files:
        try:
            with _stdin_spooled(name) as spooled:
                path = compeft_path(spooled)
                try:
                    info = inspect(path)
                except CompeftError as exc:
                    raise with_path(exc, STDIN_NAME if name == STDIO else path) from None
        except (CompeftError, OSError) as exc:
            print(f"{PROG}: error: {message(exc)}", file=sys.stderr, flush=True)
            status = 1
            if args.json:  # as verify --json: every FILE has its entry
                docs.append({"file": STDIN_NAME if name == STDIO else name,
                             "error": message(exc)})
            continue
        shown = STDIN_NAME if name == STDIO else str(path)
        if args.json:
            d = info.to_dict()
            d["file"] = shown
            original = (hifi_original_bytes(info.metadata, info.tensors)
                        if HIFI_KEY in info.metadata else None)
            if original is not None:  # ratio against the original dtypes, not the codes'
                d["hifi"] = {"original_bytes": original,
                             "ratio": original / info.file_size if info.file_size else 0.0}
            docs.append(d)
            continue
        if not first:
            print()
        first = False
        _print_info(info, shown, args.verbose)
    if args.json and docs:
        print(json.dumps(docs[0] if len(args.files) == 1 else docs, indent=2, sort_keys=True))
    return status


@contextlib.contextmanager
def _stdin_spooled(name: str) -> Iterator[str]:
    """``name``, or for ``-`` a temporary copy of stdin (info needs to seek)."""
    if name != STDIO:
        yield name
        return
    with tempfile.TemporaryDirectory(prefix="compeft-stdin-") as tmp:
        path = os.path.join(tmp, "stdin.compeft")
        with open(path, "wb") as f:
            shutil.copyfileobj(sys.stdin.buffer, f, 1 << 20)
        yield path


def _print_info(info: Any, shown: str, verbose: bool) -> None:
    rows = [("tensor", "shape", "dtype", "kind", "density", "codecs", "bytes", "bits/param")]
    for t in info.tensors:
        rows.append((t.name, _shape(t.shape), t.dtype, t.kind,
                     "-" if t.density is None else f"{t.density:.4f}",
                     "twin" if t.twin_of else t.codecs,  # spec 5.14: its source's streams
                     f"{t.record_size:,}", f"{t.bits_per_element:.3f}"))
    bits = 8 * info.file_size / info.numel if info.numel else 0.0
    rows.append(("total", f"{info.numel:,} params", "", "", "", "", f"{info.file_size:,}",
                 f"{bits:.3f}"))
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    right = {4, 6, 7}
    meta = info.metadata
    comp = meta.get(S.META_COMPRESSION, {})
    base = meta.get(S.META_BASE, {})
    tv = meta.get(META_TASK_VECTOR, {})
    original = hifi_original_bytes(meta, info.tensors) if HIFI_KEY in meta else None
    if original is None:
        sizes = f"dense {info.dense_size:,} bytes; ratio {info.ratio:.1f}x"
    else:  # the I8 codes' dense size is 1 byte an entry: the ratio is against the original
        sizes = (f"original {original:,} bytes; ratio {original / info.file_size:.1f}x" if
                 info.file_size else f"original {original:,} bytes")
    print(f"{shown}: compeft {info.version[0]}.{info.version[1]}, {len(info.tensors)} tensors, "
          f"{info.file_size:,} bytes; {sizes}")
    if original is not None:
        print(f"hi-fi file: integer codes of every entry, decoded as code * step (steps in "
              f"metadata {HIFI_KEY!r}; compeft decompress decodes it)")
    if isinstance(comp, dict) and comp:
        cal = comp.get("calibration")
        # informative metadata (spec 5.2.1): shown only when it has the expected shape
        calibrated = (f", calibrated x {cal['multiplier']:.3f} on {cal.get('sentences')} "
                      f"sentences ({cal.get('text')})"
                      if isinstance(cal, dict) and isinstance(cal.get("multiplier"), float)
                      else "")
        print("compression: " + ", ".join(f"{k} {comp[k]}" for k in
                                          ("method", "density", "scope", "scale", "alpha")
                                          if k in comp) + calibrated)
    name = base.get("name") if isinstance(base, dict) else None
    if isinstance(tv, dict) and tv:
        ref = tv.get("reference")
        extra = f" {name!r}" if ref == "checkpoint" and isinstance(name, str) else ""
        peft = f" (PEFT {tv['peft_type']})" if isinstance(tv.get("peft_type"), str) else ""
        print(f"measured from: {ref}{extra}{peft}")
    if isinstance(name, str) and not (isinstance(tv, dict) and tv.get("reference") == "checkpoint"):
        print(f"base model: {name}")
    for r in rows:
        print("  ".join(c.rjust(w) if k in right else c.ljust(w)
                        for k, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip())
    if verbose:
        print("metadata:")
        print(json.dumps(meta, indent=2, sort_keys=True))


def run_verify(args: argparse.Namespace) -> int:
    """``compeft verify``: exit 1 when any file is not sound."""
    refuse_terminal([Job(n, "") for n in args.files])
    status, docs = 0, []
    for name in args.files:
        shown = STDIN_NAME if name == STDIO else str(compeft_path(name))
        tensors: list[str] = []
        size = 0
        try:
            with contextlib.ExitStack() as stack:
                if name == STDIO:
                    f: BinaryIO = sys.stdin.buffer
                else:
                    f = stack.enter_context(open(compeft_path(name), "rb"))
                for tensor, _ in iter_stream(f):
                    tensors.append(tensor)
                size = f.tell() if f.seekable() else -1
            if name != STDIO and Path(name).is_dir():  # its config, as decompress reads it
                resolve_source(name, ADAPTER_COMPEFT, "verify reads compressed adapters")
        except (CompeftError, OSError) as exc:
            status = 1
            docs.append({"file": shown, "ok": False, "error": message(exc),
                         "tensors_checked": len(tensors)})
            if not args.json:
                print(f"{shown}: FAILED: {message(exc)}", flush=True)
            continue
        docs.append({"file": shown, "ok": True, "tensors": len(tensors),
                     **({"bytes": size} if size >= 0 else {})})
        if args.json or args.quiet:
            continue
        where = f", {size:,} bytes" if size >= 0 else ""
        print(f"{shown}: OK ({len(tensors)} tensors{where})")
        if args.verbose:
            for tensor in tensors:
                print(f"  {tensor}: OK")
    if args.json:
        print(json.dumps(docs[0] if len(args.files) == 1 else docs, indent=2))
    return status
