"""``compeft sweep`` and ``compeft tune``: size and quality of many settings."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import _spec as S
from ..compress import DEFAULT_SCALE, SCALES, SCOPES
from ..convert import DEFAULT_DENSITY, ConvertError
from ..tuning import DEFAULT_ALPHAS, DEFAULT_DENSITIES
from .options import (
    POSITIONS,
    PROG,
    add_quiet,
    add_zstd,
    density,
    list_of,
    positive,
    scale_rule,
    zstd_choice,
)
from .output import Progress, show_progress


def _add_packing(q: argparse.ArgumentParser) -> None:
    """The options that shape the file, as for compress."""
    q.add_argument("--base", metavar="BASE", help="the base checkpoint (or initial "
                   "adapter) the task vector is measured from, as for compress")
    q.add_argument("--scope", choices=SCOPES, default="global",
                   help="top-k over all tensors together, each on its own, or per LoRA role")
    q.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="tensor names kept dense and lossless (repeatable)")
    q.add_argument("--positions", choices=POSITIONS, default="auto",
                   help="how nonzero positions are coded")
    add_zstd(q, f"zstd level (default {S.DEFAULT_ZSTD_LEVEL})")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``sweep`` and ``tune`` to the subcommands ``sub``."""
    w = sub.add_parser(
        "sweep", help="size and error at several densities and scale rules",
        description="Compress INPUT (as compress would) at every density with every scale "
        "rule, without writing the files, and print each setting's size (bytes, bits per "
        "parameter, ratio against the dense input) and its error (relative L2 error and "
        "cosine of the compressed task vector against the exact one; --json adds them per "
        "tensor). The error is the parameters', not the rebuilt model's: use tune for that.")
    w.set_defaults(run=run_sweep)
    w.add_argument("input", metavar="INPUT")
    w.add_argument("--densities", type=list_of(density), default=list(DEFAULT_DENSITIES),
                   metavar="LIST", help="comma-separated densities (default "
                   f"{','.join(f'{d:g}' for d in DEFAULT_DENSITIES)})")
    w.add_argument("--scales", type=list_of(scale_rule), default=list(SCALES),
                   metavar="LIST", help=f"comma-separated scale rules (default {','.join(SCALES)})")
    w.add_argument("--alpha", type=positive, default=1.0, metavar="A",
                   help="multiplier of every scale (default 1)")
    _add_packing(w)
    w.add_argument("--json", action="store_true", help="print JSON instead of the table")
    w.add_argument("--plot", metavar="FILE.png",
                   help="also draw size against error, one curve per scale rule (matplotlib)")
    w.add_argument("--force", action="store_true", help="replace an existing plot file")
    add_quiet(w)

    t = sub.add_parser(
        "tune", help="choose density and alpha with your own evaluation command",
        description="Try every density with every alpha: each candidate is compressed, "
        "restored (with --base added) to a temporary checkpoint exactly as decompress would "
        "write it, and '--eval' runs on it with {checkpoint} replaced by its path; the "
        "number ending the last line of its output is the score, higher is better. The best "
        "candidate (within --budget-bits-per-param, if given) is written to OUTPUT, the "
        "search recorded in its metadata. A failing command, or one whose last line ends "
        "with no number, stops the search.")
    t.set_defaults(run=run_tune)
    t.add_argument("input", metavar="INPUT")
    t.add_argument("-o", "--output", required=True, metavar="OUTPUT")
    t.add_argument("--eval", required=True, metavar="'CMD {checkpoint}'", dest="eval_command",
                   help="the evaluation command (run by the shell)")
    t.add_argument("--densities", type=list_of(density), default=[DEFAULT_DENSITY],
                   metavar="LIST", help=f"comma-separated densities (default {DEFAULT_DENSITY})")
    t.add_argument("--alphas", type=list_of(positive), default=list(DEFAULT_ALPHAS),
                   metavar="LIST", help="comma-separated alphas (default "
                   f"{','.join(f'{a:g}' for a in DEFAULT_ALPHAS)})")
    t.add_argument("--budget-bits-per-param", type=positive, default=None, metavar="B",
                   help="choose the best score among the candidates within this size")
    t.add_argument("--scale", choices=SCALES, default=DEFAULT_SCALE,
                   help=f"the scale rule alpha multiplies (default {DEFAULT_SCALE})")
    _add_packing(t)
    t.add_argument("--timeout", type=positive, default=None, metavar="S",
                   help="seconds one evaluation may take (default: no limit)")
    t.add_argument("--json", action="store_true", help="print the search as JSON")
    t.add_argument("--force", action="store_true", help="replace an existing OUTPUT")
    add_quiet(t)


def run_sweep(args: argparse.Namespace) -> int:
    """``compeft sweep``."""
    from ..tuning import sweep_file

    plot = Path(args.plot) if args.plot else None
    if plot is not None and (plot.exists() and not args.force):
        raise ConvertError(f"{plot}: the plot file exists; use --force to replace it")
    total = len(args.densities) * len(args.scales)
    with Progress(show_progress(args), total, "sweep") as bar:
        result = sweep_file(args.input, base=args.base, densities=args.densities,
                            scales=args.scales, scope=args.scope, alpha=args.alpha,
                            exclude=args.exclude, positions=args.positions,
                            zstd_level=zstd_choice(args), progress=bar)
    if plot is not None:
        result.plot(plot, title=f"compeft sweep of {Path(args.input).name}")
    if args.json:
        d = {"input": args.input, "base": args.base, "scope": args.scope, **result.to_dict()}
        print(json.dumps(d, indent=2))
        return 0
    p0 = result.points[0]
    print(f"sweep of {args.input}: {p0.numel:,} parameters, dense {p0.dense_bytes:,} bytes; "
          "error and cosine of the compressed task vector (not of the rebuilt model)")
    print(result.format_table())
    if plot is not None:
        print(f"plot: {plot}")
    return 0


def run_tune(args: argparse.Namespace) -> int:
    """``compeft tune``."""
    from ..tuning import CHECKPOINT_PLACEHOLDER, tune_file

    if CHECKPOINT_PLACEHOLDER not in args.eval_command:
        print(f"{PROG} tune: error: --eval must contain {CHECKPOINT_PLACEHOLDER} (the "
              "candidate checkpoint's path)", file=sys.stderr)
        return 2
    total = len(args.densities) * len(args.alphas)
    with Progress(show_progress(args), total, "tune") as bar:
        result, summary = tune_file(
            args.input, args.output, args.eval_command, base=args.base,
            densities=args.densities, alphas=args.alphas, scale=args.scale, scope=args.scope,
            budget_bits_per_param=args.budget_bits_per_param, exclude=args.exclude,
            positions=args.positions, zstd_level=zstd_choice(args), force=args.force,
            timeout=args.timeout, progress=bar)
    if args.json:
        print(json.dumps({**result.to_dict(), "output": summary.to_dict()}, indent=2))
        return 0
    b = result.best
    print(result.format_table())
    print(f"\nchosen: {b.label()}, score {b.score:g}"
          + (f" (best within {result.budget_bits_per_param:g} bits/param)"
             if result.budget_bits_per_param is not None else " (best score)"))
    print(summary.format())
    return 0
