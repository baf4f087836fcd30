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
import os
import sys
from collections.abc import Sequence

from ..errors import CompeftError
from . import convert, demo, inspect, tuning
from .options import PROG, Parser, UsageError, version
from .output import Terminated, message, on_signals

__all__ = ["main"]

#: The modules adding subcommands, in the order ``--help`` lists them; each has
#: ``add_parsers(subparsers)``, and every parser it adds sets ``run``: ``run(args) -> int``.
COMMAND_MODULES = (convert, inspect, demo, tuning)


def parser() -> argparse.ArgumentParser:
    """The parser of the whole command."""
    p = Parser(prog=PROG, description="Compress fine-tuned experts (PEFT adapters, task "
               "vectors) to sparse ternary compeft files, and back.")
    p.add_argument("-V", "--version", action="version", version=version(),
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.add_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit status.

    Examples
    --------
    >>> main(["verify", "/nonexistent.compeft"])
    /nonexistent.compeft: FAILED: /nonexistent.compeft: No such file or directory
    1
    """
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        with on_signals():
            return args.run(args)
    except UsageError as exc:
        prog = f"{PROG} {args.command}"
        print(f"{prog}: error: {exc} (see {prog} --help)", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `compeft info ... | head`: the reader left; stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (CompeftError, OSError) as exc:
        print(f"{PROG}: error: {message(exc)}", file=sys.stderr)
        return 1
    except Terminated as exc:  # SIGTERM, SIGHUP: the outputs in progress were removed
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
