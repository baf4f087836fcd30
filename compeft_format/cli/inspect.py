"""``compeft info`` and ``compeft verify``: read compeft files, write nothing."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

from .. import _spec as S
from ..container import inspect, iter_stream
from ..convert import META_TASK_VECTOR, with_path
from ..errors import CompeftError
from .output import compeft_path, message


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``info`` and ``verify`` to the subcommands ``sub``."""
    i = sub.add_parser("info", help="per-tensor layout, sizes and ratio of a compeft file",
                       description="Shape, dtype, density, codecs, bytes and bits per "
                       "parameter of every tensor, and the totals; reads no tensor data.")
    i.set_defaults(run=run_info)
    i.add_argument("file", metavar="FILE")
    i.add_argument("--json", action="store_true", help="print JSON")

    v = sub.add_parser("verify", help="check every checksum and decode everything",
                       description="Check every byte of each file; one line per file. Exit "
                       "status 0 when all are sound, 1 otherwise.")
    v.set_defaults(run=run_verify)
    v.add_argument("files", nargs="+", metavar="FILE")


def _shape(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def run_info(args: argparse.Namespace) -> int:
    """``compeft info``."""
    path = compeft_path(args.file)
    try:
        info = inspect(path)
    except CompeftError as exc:
        raise with_path(exc, path) from None
    if args.json:
        d = info.to_dict()
        d["file"] = str(path)
        print(json.dumps(d, indent=2, sort_keys=True))
        return 0
    rows = [("tensor", "shape", "dtype", "kind", "density", "codecs", "bytes", "bits/param")]
    for t in info.tensors:
        rows.append((t.name, _shape(t.shape), t.dtype, t.kind,
                     "-" if t.density is None else f"{t.density:.4f}", t.codecs,
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
    print(f"{path}: compeft {info.version[0]}.{info.version[1]}, {len(info.tensors)} tensors, "
          f"{info.file_size:,} bytes; dense {info.dense_size:,} bytes; ratio {info.ratio:.1f}x")
    if isinstance(comp, dict) and comp:
        print("compression: " + ", ".join(f"{k} {comp[k]}" for k in
                                          ("method", "density", "scope", "scale", "alpha")
                                          if k in comp))
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
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """``compeft verify``: exit 1 when any file is not sound."""
    status = 0
    for name in args.files:
        path = compeft_path(name)
        try:
            with open(path, "rb") as f:
                count = sum(1 for _ in iter_stream(f))
            print(f"{path}: OK ({count} tensors, {os.path.getsize(path):,} bytes)")
        except (CompeftError, OSError) as exc:
            status = 1
            print(f"{path}: FAILED: {message(exc)}")
    return status
