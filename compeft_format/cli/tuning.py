"""``compeft sweep`` and ``compeft tune``: size and quality of many settings."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .. import _spec as S
from ..compress import (
    DEFAULT_DENSITY,
    DEFAULT_SCALE,
    METRIC_SCALES,
    SCALE_CHOICES,
    SCOPES,
    SWEEP_SCALES,
)
from ..errors import CompeftError, ConvertError
from ..outputs import same_path
from ..sweep import DEFAULT_DENSITIES
from ..tuning import DEFAULT_ALPHAS
from .convert import compress_text
from .options import (
    POSITIONS,
    UsageError,
    add_command,
    add_force,
    add_json,
    add_quiet,
    add_verbose,
    add_zstd,
    base_choice,
    density,
    list_of,
    positive,
    scale_rule,
    zstd_choice,
)
from .output import Progress, message, show_progress


def _add_packing(q: argparse.ArgumentParser) -> None:
    """The options that shape the file, as for compress."""
    q.add_argument("--base", metavar="BASE", type=base_choice,
                   help="the base checkpoint (or initial "
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
    w = add_command(
        sub, "sweep", run_sweep, help="size and error at several densities and scale rules",
        description="Compress INPUT (as compress would) at every density with every scale "
        "rule, without writing the files, and print each setting's size (bytes, bits per "
        "parameter, ratio against the dense input) and its error (relative L2 error and "
        "cosine of the compressed task vector against the exact one; --json adds them per "
        "tensor). The error is the parameters', not the rebuilt model's: use tune for that.")
    w.add_argument("input", metavar="INPUT", help="a .safetensors file or a PEFT adapter "
                   "folder, as for compress")
    w.add_argument("--densities", type=list_of(density), default=list(DEFAULT_DENSITIES),
                   metavar="LIST", help="comma-separated densities (default "
                   f"{','.join(f'{d:g}' for d in DEFAULT_DENSITIES)})")
    w.add_argument("--scales", type=list_of(scale_rule), default=list(SWEEP_SCALES),
                   metavar="LIST", help="comma-separated scale rules (default "
                   f"{','.join(SWEEP_SCALES)}; {' and '.join(METRIC_SCALES)} cost a pass of "
                   "rows x cols x min(rows, cols) a matrix: name them to try them)")
    w.add_argument("--alpha", type=positive, default=1.0, metavar="A",
                   help="multiplier of every scale (default 1)")
    _add_packing(w)
    add_json(w, "print JSON instead of the table")
    w.add_argument("--plot", metavar="FILE.png",
                   help="also draw size against error, one curve per scale rule (needs "
                   "matplotlib; the format follows the name: .png, .pdf, .svg...)")
    add_force(w, "replace an existing plot file")
    add_quiet(w, "no progress bar")
    add_verbose(w, "also print the error of every tensor at every setting")

    t = add_command(
        sub, "tune", run_tune, help="choose density and alpha with your own evaluation command",
        description="Try every density with every alpha: each candidate is compressed, "
        "restored (with --base added) to a temporary checkpoint exactly as decompress would "
        "write it, and '--eval' runs on it with {checkpoint} replaced by its path; the "
        "number ending the last line of its output is the score, higher is better. The best "
        "candidate (within --budget-bits-per-param, if given) is written to OUTPUT, the "
        "search recorded in its metadata. A failing command, or one whose last line ends "
        "with no number, stops the search. Equal scores go to alpha 1, then to the smaller "
        "file.")
    t.add_argument("input", metavar="INPUT", help="a .safetensors file or a PEFT adapter "
                   "folder, as for compress")
    t.add_argument("-o", "--output", required=True, metavar="OUTPUT",
                   help="the compeft file (a folder for an adapter folder) of the chosen "
                   "setting; checked before any evaluation")
    t.add_argument("--eval", required=True, metavar="'CMD {checkpoint}'", dest="eval_command",
                   help="the evaluation command (run by the shell)")
    t.add_argument("--densities", type=list_of(density), default=[DEFAULT_DENSITY],
                   metavar="LIST", help=f"comma-separated densities (default {DEFAULT_DENSITY})")
    t.add_argument("--alphas", type=list_of(positive), default=list(DEFAULT_ALPHAS),
                   metavar="LIST", help="comma-separated alphas (default "
                   f"{','.join(f'{a:g}' for a in DEFAULT_ALPHAS)})")
    t.add_argument("--budget-bits-per-param", type=positive, default=None, metavar="B",
                   help="choose the best score among the candidates within this size")
    t.add_argument("--scale", choices=SCALE_CHOICES, default=DEFAULT_SCALE,
                   help=f"the scale rule alpha multiplies (default {DEFAULT_SCALE}: as "
                   "compress --scale auto, at each density)")
    _add_packing(t)
    t.add_argument("--timeout", type=positive, default=None, metavar="S",
                   help="seconds one evaluation may take (default: no limit)")
    add_json(t, "print the search as JSON")
    add_force(t, "replace an existing OUTPUT (never an INPUT)")
    add_quiet(t)
    add_verbose(t, "also print every candidate's score as it comes (on stderr)")


def check_plot(path: Path, force: bool) -> None:
    """Refuse, before any work, a plot that could not be written: matplotlib missing, a
    format it does not know, a folder that does not exist or cannot be written, an existing
    file without ``--force``."""
    if path.exists() and not force:
        raise ConvertError(f"{path}: the plot file exists; use --force to replace it")
    if path.exists() and not path.is_file():
        raise ConvertError(f"{path}: exists and is not a file; not replaced")
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise ConvertError("--plot needs matplotlib (pip install matplotlib)") from None
    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in formats:
        raise UsageError(f"--plot {path}: matplotlib writes {', '.join(sorted(formats))}; "
                         "name the file with one of those suffixes")
    folder = path.parent
    if not folder.is_dir():
        raise ConvertError(f"{path}: cannot write there: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConvertError(f"{path}: cannot write there: {folder} is not writable")


def run_sweep(args: argparse.Namespace) -> int:
    """``compeft sweep``: the table is printed even when the plot then fails."""
    from ..sweep import sweep_file

    if args.input == "-":
        raise UsageError("sweep reads a file or a folder; stdin (-) is not an input here")
    plot = Path(args.plot) if args.plot else None
    if plot is not None:
        check_plot(plot, args.force)
    total = len(args.densities) * len(args.scales)
    with Progress(show_progress(args), total, "sweep") as bar:
        result = sweep_file(args.input, base=args.base, densities=args.densities,
                            scales=args.scales, scope=args.scope, alpha=args.alpha,
                            exclude=args.exclude, positions=args.positions,
                            zstd_level=zstd_choice(args), progress=bar)
    if args.json:
        d = {"input": args.input, "base": args.base, "scope": args.scope, **result.to_dict()}
        print(json.dumps(d, indent=2), flush=True)
    else:
        p0 = result.points[0]
        print(f"sweep of {args.input}: {p0.numel:,} parameters, dense {p0.dense_bytes:,} "
              "bytes; error and cosine of the compressed task vector (not of the rebuilt "
              "model)")
        print(result.format_table())
        if args.verbose:
            for p in result.points:
                print(f"\n{p.scale}, density {p.density:g}, alpha {p.alpha:g}:")
                print(p.quality.format_table())
        sys.stdout.flush()
    if plot is not None:
        try:
            result.plot(plot, title=f"compeft sweep of {Path(args.input).name}")
        except (CompeftError, OSError, ValueError, RuntimeError) as exc:
            # matplotlib raises ValueError/RuntimeError for what it cannot render or save
            raise ConvertError(f"{plot}: the plot failed ({message(exc)}); the table above "
                               "holds every figure") from None
        if not args.json:
            print(f"plot: {plot}")
    return 0


def check_tune_output(args: argparse.Namespace) -> None:
    """Refuse, before any evaluation, an OUTPUT that could not be written at the end."""
    out = Path(args.output)
    for given in (args.input, args.base):
        if given is not None and same_path(out, Path(given)):
            raise ConvertError(f"{out}: the output is an input ({given}); an input is never "
                               "overwritten")
    if (out.exists() or out.is_symlink()) and not args.force:
        raise ConvertError(f"{out}: the output exists; use --force to replace it")
    folder = out.parent
    if not folder.is_dir():
        raise ConvertError(f"{out}: cannot write there: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConvertError(f"{out}: cannot write there: {folder} is not writable")


def run_tune(args: argparse.Namespace) -> int:
    """``compeft tune``."""
    from ..tuning import CHECKPOINT_PLACEHOLDER, tune_file

    if CHECKPOINT_PLACEHOLDER not in args.eval_command:
        raise UsageError(f"--eval must contain {CHECKPOINT_PLACEHOLDER} (the candidate "
                         "checkpoint's path)")
    check_tune_output(args)
    total = len(args.densities) * len(args.alphas)
    with Progress(show_progress(args), total, "tune") as bar:
        def progress(cand: Any) -> None:
            bar()
            if args.verbose:
                what = cand.status if cand.score is None else f"score {cand.score:g}"
                print(f"candidate {cand.label()}: {cand.file_bytes:,} bytes, {what}",
                      file=sys.stderr, flush=True)

        result, summary = tune_file(
            args.input, args.output, args.eval_command, base=args.base,
            densities=args.densities, alphas=args.alphas, scale=args.scale, scope=args.scope,
            budget_bits_per_param=args.budget_bits_per_param, exclude=args.exclude,
            positions=args.positions, zstd_level=zstd_choice(args), force=args.force,
            timeout=args.timeout, progress=progress)
    if args.json:
        print(json.dumps({**result.to_dict(), "output": summary.to_dict()}, indent=2))
        return 0
    if args.quiet:
        return 0
    b = result.best
    print(result.format_table())
    print(f"\nchosen: {b.label()}, score {b.score:g}"
          + (f" (best within {result.budget_bits_per_param:g} bits/param)"
             if result.budget_bits_per_param is not None else " (best score)"))
    print(f"written: {summary.output}, {summary.file_bytes:,} bytes (the candidate's "
          f"{b.file_bytes:,} and the search recorded in its metadata)\n")
    print(compress_text(summary))
    return 0
