"""``compeft compress`` and ``compeft decompress``."""

from __future__ import annotations

import argparse

from .. import _spec as S
from ..compress import DEFAULT_SCALE, SCALES, SCOPES
from ..convert import (
    ADAPTER_COMPEFT,
    ADAPTER_CONFIG,
    DEFAULT_DENSITY,
    OUTPUT_DTYPES,
    compress_file,
    decompress_file,
)
from .options import POSITIONS, add_quiet, add_zstd, density, positive, zstd_choice
from .output import show_progress


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``compress`` and ``decompress`` to the subcommands ``sub``."""
    c = sub.add_parser(
        "compress", help="safetensors file or PEFT adapter directory -> compeft",
        description="Keep the top-k entries of a task vector by magnitude, their signs and one "
        "scale (ComPEFT), and write them as a compeft file. INPUT is a .safetensors file or a "
        "PEFT adapter directory; for a directory, OUTPUT is a directory holding "
        f"{ADAPTER_CONFIG} and {ADAPTER_COMPEFT}.")
    c.set_defaults(run=run_compress)
    c.add_argument("input", metavar="INPUT")
    c.add_argument("-o", "--output", required=True, metavar="OUTPUT")
    c.add_argument("--base", metavar="BASE", help="the base checkpoint (or initial adapter) "
                   "the task vector is measured from; needed again to decompress")
    c.add_argument("--density", type=density, default=DEFAULT_DENSITY, metavar="K",
                   help=f"fraction of entries kept, in (0, 1] (default {DEFAULT_DENSITY})")
    c.add_argument("--alpha", type=positive, default=1.0, metavar="A",
                   help="multiplier of the scale (default 1)")
    c.add_argument("--scope", choices=SCOPES, default="global",
                   help="top-k over all tensors together, each on its own, or per LoRA "
                   "role (A's together, B's together) (default global)")
    c.add_argument("--scale", choices=SCALES, default=DEFAULT_SCALE,
                   help=f"how the one magnitude is chosen (default {DEFAULT_SCALE}: the most "
                   "faithful rebuilt model measured without data; see the README)")
    c.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="tensor names kept dense and lossless (repeatable)")
    c.add_argument("--positions", choices=POSITIONS, default="auto",
                   help="how nonzero positions are coded (default auto: the smaller; "
                   "rice = golomb)")
    add_zstd(c, f"zstd level tried on every block (default {S.DEFAULT_ZSTD_LEVEL})")
    c.add_argument("--force", action="store_true", help="replace an existing OUTPUT")
    c.add_argument("-v", "--verbose", action="store_true",
                   help="also print the quality of every tensor")
    add_quiet(c)

    d = sub.add_parser(
        "decompress", help="compeft -> safetensors (or a PEFT adapter directory)",
        description="Write a compeft file back as safetensors with the original names, shapes "
        "and dtypes; a compressed adapter directory comes back as a PEFT adapter directory.")
    d.set_defaults(run=run_decompress)
    d.add_argument("input", metavar="INPUT")
    d.add_argument("-o", "--output", required=True, metavar="OUTPUT")
    d.add_argument("--dtype", choices=sorted(OUTPUT_DTYPES), help="convert float tensors")
    d.add_argument("--base", metavar="BASE", help="add the task vector to this base "
                   "checkpoint (or initial adapter) and write the full tensors")
    d.add_argument("--force", action="store_true", help="replace an existing OUTPUT")
    add_quiet(d)


def run_compress(args: argparse.Namespace) -> int:
    """``compeft compress``."""
    summary = compress_file(
        args.input, args.output, density=args.density, alpha=args.alpha, scope=args.scope,
        scale=args.scale, exclude=args.exclude, base=args.base, positions=args.positions,
        zstd_level=zstd_choice(args), force=args.force, progress=show_progress(args))
    print(summary.format(verbose=args.verbose))
    return 0


def run_decompress(args: argparse.Namespace) -> int:
    """``compeft decompress``."""
    summary = decompress_file(args.input, args.output, dtype=args.dtype, base=args.base,
                              force=args.force, progress=show_progress(args))
    print(summary.format())
    return 0
