"""The ``compeft`` command (also ``python -m compeft_format``).

::

    compeft compress INPUT -o OUTPUT [--base BASE] [--density K] [--alpha A]
                     [--scope global|tensor] [--scale RULE] [--exclude GLOB]...
                     [--positions auto|bitmask|golomb|rice] [--zstd LEVEL | --no-zstd]
                     [--force] [--quiet] [--verbose]
    compeft decompress INPUT -o OUTPUT [--dtype f32|f16|bf16] [--base BASE] [--force] [--quiet]
    compeft info FILE [--json]
    compeft verify FILE...
    compeft demo [--quiet]
    compeft sweep INPUT [--base BASE] [--densities LIST] [--scales LIST] [--scope ...]
                  [--alpha A] [--exclude GLOB]... [--json] [--plot FILE.png] [--force]
    compeft tune INPUT [--base BASE] -o OUTPUT --eval 'CMD {checkpoint}' [--densities LIST]
                 [--alphas LIST] [--budget-bits-per-param B] [--scale RULE] [--scope ...]
                 [--timeout S] [--json] [--force]

Exit status: 0 on success; 1 on a data error (one line ``compeft: error: ...`` on stderr, no
traceback: a bad or missing file, a base that does not match, an existing output); 2 on a
usage error, bad option values included (a density outside ``(0, 1]``...). ``verify`` exits
1 when any file is not sound. Outputs are written atomically and never over an input; an
existing output is replaced only with ``--force``. Progress bars go to stderr when it is a
terminal (``--quiet`` silences them); the summaries go to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import _spec as S
from .compress import DEFAULT_SCALE, SCALES
from .container import inspect, iter_stream
from .convert import (
    ADAPTER_COMPEFT,
    ADAPTER_CONFIG,
    DEFAULT_DENSITY,
    META_TASK_VECTOR,
    OUTPUT_DTYPES,
    ConvertError,
    compress_file,
    decompress_file,
    with_path,
)
from .errors import CompeftError
from .tuning import DEFAULT_ALPHAS, DEFAULT_DENSITIES

__all__ = ["main"]

PROG = "compeft"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``compeft compress: error: ...``), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _density(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value <= 1.0:  # also NaN
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _scale_rule(text: str) -> str:
    if text not in SCALES:
        raise argparse.ArgumentTypeError(f"unknown scale rule {text!r} (choose from "
                                         f"{', '.join(SCALES)})")
    return text


def _list_of(item: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    """A comma-separated list of ``item`` values, at least one."""
    def parse(text: str) -> list[Any]:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError("give at least one value")
        return [item(p) for p in parts]

    return parse


def _zstd_level(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not -7 <= value <= 22:
        raise argparse.ArgumentTypeError(f"must be in [-7, 22], got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog=PROG, description="Compress fine-tuned experts (PEFT adapters, task "
                "vectors) to sparse ternary compeft files, and back.")
    p.add_argument("--version", action="version",
                   version=f"%(prog)s {__version__} (format {S.VERSION_MAJOR}.{S.VERSION_MINOR})")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    c = sub.add_parser(
        "compress", help="safetensors file or PEFT adapter directory -> compeft",
        description="Keep the top-k entries of a task vector by magnitude, their signs and one "
        "scale (ComPEFT), and write them as a compeft file. INPUT is a .safetensors file or a "
        "PEFT adapter directory; for a directory, OUTPUT is a directory holding "
        f"{ADAPTER_CONFIG} and {ADAPTER_COMPEFT}.")
    c.add_argument("input", metavar="INPUT")
    c.add_argument("-o", "--output", required=True, metavar="OUTPUT")
    c.add_argument("--base", metavar="BASE", help="the base checkpoint (or initial adapter) "
                   "the task vector is measured from; needed again to decompress")
    c.add_argument("--density", type=_density, default=DEFAULT_DENSITY, metavar="K",
                   help=f"fraction of entries kept, in (0, 1] (default {DEFAULT_DENSITY})")
    c.add_argument("--alpha", type=_positive, default=1.0, metavar="A",
                   help="multiplier of the scale (default 1)")
    c.add_argument("--scope", choices=("global", "tensor"), default="global",
                   help="top-k over all tensors together, or each on its own (default global)")
    c.add_argument("--scale", choices=SCALES, default=DEFAULT_SCALE,
                   help=f"how the one magnitude is chosen (default {DEFAULT_SCALE}: the most "
                   "faithful rebuilt model measured without data; see the README)")
    c.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="tensor names kept dense and lossless (repeatable)")
    c.add_argument("--positions", choices=("auto", "bitmask", "golomb", "rice"),
                   default="auto", help="how nonzero positions are coded (default auto: the "
                   "smaller; rice = golomb)")
    z = c.add_mutually_exclusive_group()
    # default None, not the level: argparse sees an option given its default value as absent,
    # and would let `--zstd 3 --no-zstd` through
    z.add_argument("--zstd", type=_zstd_level, default=None, metavar="LEVEL",
                   help=f"zstd level tried on every block (default {S.DEFAULT_ZSTD_LEVEL})")
    z.add_argument("--no-zstd", action="store_true", help="no zstd stage")
    c.add_argument("--force", action="store_true", help="replace an existing OUTPUT")
    c.add_argument("-v", "--verbose", action="store_true",
                   help="also print the quality of every tensor")
    common(c)

    d = sub.add_parser(
        "decompress", help="compeft -> safetensors (or a PEFT adapter directory)",
        description="Write a compeft file back as safetensors with the original names, shapes "
        "and dtypes; a compressed adapter directory comes back as a PEFT adapter directory.")
    d.add_argument("input", metavar="INPUT")
    d.add_argument("-o", "--output", required=True, metavar="OUTPUT")
    d.add_argument("--dtype", choices=sorted(OUTPUT_DTYPES), help="convert float tensors")
    d.add_argument("--base", metavar="BASE", help="add the task vector to this base "
                   "checkpoint (or initial adapter) and write the full tensors")
    d.add_argument("--force", action="store_true", help="replace an existing OUTPUT")
    common(d)

    i = sub.add_parser("info", help="per-tensor layout, sizes and ratio of a compeft file",
                       description="Shape, dtype, density, codecs, bytes and bits per "
                       "parameter of every tensor, and the totals; reads no tensor data.")
    i.add_argument("file", metavar="FILE")
    i.add_argument("--json", action="store_true", help="print JSON")

    v = sub.add_parser("verify", help="check every checksum and decode everything",
                       description="Check every byte of each file; one line per file. Exit "
                       "status 0 when all are sound, 1 otherwise.")
    v.add_argument("files", nargs="+", metavar="FILE")

    m = sub.add_parser("demo", help="compress and restore a small real LoRA adapter",
                       description="Compress the LoRA adapter shipped in the package "
                       "(all-MiniLM-L6-v2, trained on VADER sentiment) from its initial "
                       "state, restore it, and print the summaries.")
    common(m)

    def packing(q: argparse.ArgumentParser) -> None:
        q.add_argument("--base", metavar="BASE", help="the base checkpoint (or initial "
                       "adapter) the task vector is measured from, as for compress")
        q.add_argument("--scope", choices=("global", "tensor"), default="global",
                       help="top-k over all tensors together, or each on its own")
        q.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                       help="tensor names kept dense and lossless (repeatable)")
        q.add_argument("--positions", choices=("auto", "bitmask", "golomb", "rice"),
                       default="auto", help="how nonzero positions are coded")
        zz = q.add_mutually_exclusive_group()
        zz.add_argument("--zstd", type=_zstd_level, default=None, metavar="LEVEL",
                        help=f"zstd level (default {S.DEFAULT_ZSTD_LEVEL})")
        zz.add_argument("--no-zstd", action="store_true", help="no zstd stage")

    w = sub.add_parser(
        "sweep", help="size and error at several densities and scale rules",
        description="Compress INPUT (as compress would) at every density with every scale "
        "rule, without writing the files, and print each setting's size (bytes, bits per "
        "parameter, ratio against the dense input) and its error (relative L2 error and "
        "cosine of the compressed task vector against the exact one; --json adds them per "
        "tensor). The error is the parameters', not the rebuilt model's: use tune for that.")
    w.add_argument("input", metavar="INPUT")
    w.add_argument("--densities", type=_list_of(_density), default=list(DEFAULT_DENSITIES),
                   metavar="LIST", help="comma-separated densities (default "
                   f"{','.join(f'{d:g}' for d in DEFAULT_DENSITIES)})")
    w.add_argument("--scales", type=_list_of(_scale_rule), default=list(SCALES),
                   metavar="LIST", help=f"comma-separated scale rules (default {','.join(SCALES)})")
    w.add_argument("--alpha", type=_positive, default=1.0, metavar="A",
                   help="multiplier of every scale (default 1)")
    packing(w)
    w.add_argument("--json", action="store_true", help="print JSON instead of the table")
    w.add_argument("--plot", metavar="FILE.png",
                   help="also draw size against error, one curve per scale rule (matplotlib)")
    w.add_argument("--force", action="store_true", help="replace an existing plot file")
    common(w)

    t = sub.add_parser(
        "tune", help="choose density and alpha with your own evaluation command",
        description="Try every density with every alpha: each candidate is compressed, "
        "restored (with --base added) to a temporary checkpoint exactly as decompress would "
        "write it, and '--eval' runs on it with {checkpoint} replaced by its path; the "
        "number ending the last line of its output is the score, higher is better. The best "
        "candidate (within --budget-bits-per-param, if given) is written to OUTPUT, the "
        "search recorded in its metadata. A failing command, or one whose last line ends "
        "with no number, stops the search.")
    t.add_argument("input", metavar="INPUT")
    t.add_argument("-o", "--output", required=True, metavar="OUTPUT")
    t.add_argument("--eval", required=True, metavar="'CMD {checkpoint}'", dest="eval_command",
                   help="the evaluation command (run by the shell)")
    t.add_argument("--densities", type=_list_of(_density), default=[DEFAULT_DENSITY],
                   metavar="LIST", help=f"comma-separated densities (default {DEFAULT_DENSITY})")
    t.add_argument("--alphas", type=_list_of(_positive), default=list(DEFAULT_ALPHAS),
                   metavar="LIST", help="comma-separated alphas (default "
                   f"{','.join(f'{a:g}' for a in DEFAULT_ALPHAS)})")
    t.add_argument("--budget-bits-per-param", type=_positive, default=None, metavar="B",
                   help="choose the best score among the candidates within this size")
    t.add_argument("--scale", choices=SCALES, default=DEFAULT_SCALE,
                   help=f"the scale rule alpha multiplies (default {DEFAULT_SCALE})")
    packing(t)
    t.add_argument("--timeout", type=_positive, default=None, metavar="S",
                   help="seconds one evaluation may take (default: no limit)")
    t.add_argument("--json", action="store_true", help="print the search as JSON")
    t.add_argument("--force", action="store_true", help="replace an existing OUTPUT")
    common(t)
    return p


def _compeft_path(path: str) -> Path:
    """A compeft file, or the one inside a compressed adapter directory."""
    p = Path(path)
    return p / ADAPTER_COMPEFT if p.is_dir() else p


def _show_progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def _cmd_compress(args: argparse.Namespace) -> int:
    summary = compress_file(
        args.input, args.output, density=args.density, alpha=args.alpha, scope=args.scope,
        scale=args.scale, exclude=args.exclude, base=args.base, positions=args.positions,
        zstd_level=None if args.no_zstd else S.DEFAULT_ZSTD_LEVEL if args.zstd is None
        else args.zstd, force=args.force,
        progress=_show_progress(args))
    print(summary.format(verbose=args.verbose))
    return 0


def _cmd_decompress(args: argparse.Namespace) -> int:
    summary = decompress_file(args.input, args.output, dtype=args.dtype, base=args.base,
                              force=args.force, progress=_show_progress(args))
    print(summary.format())
    return 0


def _shape(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _cmd_info(args: argparse.Namespace) -> int:
    path = _compeft_path(args.file)
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


def _cmd_verify(args: argparse.Namespace) -> int:
    status = 0
    for name in args.files:
        path = _compeft_path(name)
        try:
            with open(path, "rb") as f:
                count = sum(1 for _ in iter_stream(f))
            print(f"{path}: OK ({count} tensors, {os.path.getsize(path):,} bytes)")
        except (CompeftError, OSError) as exc:
            status = 1
            print(f"{path}: FAILED: {_message(exc)}")
    return status


def _cmd_demo(args: argparse.Namespace) -> int:
    from importlib import resources

    root = resources.files("compeft_format") / "demo" / "lora-minilm-vader"
    with resources.as_file(root) as adapter, tempfile.TemporaryDirectory() as tmp:
        if not (adapter / ADAPTER_CONFIG).is_file():
            raise CompeftError(f"{adapter}: the demo adapter is not installed")
        show = _show_progress(args)
        print("demo: a LoRA adapter (r=8, 74 tensors) of all-MiniLM-L6-v2 trained on VADER "
              "sentiment, measured from its saved initial state\n")
        out = Path(tmp) / "compressed"
        s = compress_file(adapter, out, base=adapter / "init", progress=show)
        print(s.format())
        print()
        d = decompress_file(out, Path(tmp) / "restored", base=adapter / "init", progress=show)
        print(d.format())
        print(f"\nThe restored directory is a PEFT adapter: {ADAPTER_CONFIG} and "
              "adapter_model.safetensors, ready for PeftModel.from_pretrained.")
    return 0


class _Progress:
    """A tqdm bar on stderr counting settings or candidates, when enabled."""

    def __init__(self, enabled: bool, total: int, desc: str) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False,
                             dynamic_ncols=True)

    def __call__(self, *_: Any) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()


def _zstd_arg(args: argparse.Namespace) -> int | None:
    return None if args.no_zstd else S.DEFAULT_ZSTD_LEVEL if args.zstd is None else args.zstd


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .tuning import sweep_file

    plot = Path(args.plot) if args.plot else None
    if plot is not None and (plot.exists() and not args.force):
        raise ConvertError(f"{plot}: the plot file exists; use --force to replace it")
    total = len(args.densities) * len(args.scales)
    with _Progress(_show_progress(args), total, "sweep") as bar:
        result = sweep_file(args.input, base=args.base, densities=args.densities,
                            scales=args.scales, scope=args.scope, alpha=args.alpha,
                            exclude=args.exclude, positions=args.positions,
                            zstd_level=_zstd_arg(args), progress=bar)
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


def _cmd_tune(args: argparse.Namespace) -> int:
    from .tuning import CHECKPOINT_PLACEHOLDER, tune_file

    if CHECKPOINT_PLACEHOLDER not in args.eval_command:
        print(f"{PROG} tune: error: --eval must contain {CHECKPOINT_PLACEHOLDER} (the "
              "candidate checkpoint's path)", file=sys.stderr)
        return 2
    total = len(args.densities) * len(args.alphas)
    with _Progress(_show_progress(args), total, "tune") as bar:
        result, summary = tune_file(
            args.input, args.output, args.eval_command, base=args.base,
            densities=args.densities, alphas=args.alphas, scale=args.scale, scope=args.scope,
            budget_bits_per_param=args.budget_bits_per_param, exclude=args.exclude,
            positions=args.positions, zstd_level=_zstd_arg(args), force=args.force,
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


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename is not None else ""
        return f"{where}{exc.strerror}"
    return " ".join(str(exc).split()) or type(exc).__name__  # one line


_COMMANDS = {"compress": _cmd_compress, "decompress": _cmd_decompress, "info": _cmd_info,
             "verify": _cmd_verify, "demo": _cmd_demo, "sweep": _cmd_sweep, "tune": _cmd_tune}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit status.

    Examples
    --------
    >>> main(["verify", "/nonexistent.compeft"])
    /nonexistent.compeft: FAILED: /nonexistent.compeft: No such file or directory
    1
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return _COMMANDS[args.command](args)
    except BrokenPipeError:  # `compeft info ... | head`: the reader left; stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (CompeftError, OSError) as exc:
        print(f"{PROG}: error: {_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
