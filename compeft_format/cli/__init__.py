"""The ``compeft`` command (also ``python -m compeft_format``): ``compeft --help``, and the
README's synopsis (checked against this parser by ``tests/test_cli_readme.py``).

Conventions, as users of zstd and gzip expect them (the README says more):

* without ``-o``, outputs are named after their INPUT, beside it (:mod:`.files`); ``-o DIR/``
  takes several INPUTs (``-j N`` at once); ``-`` is stdin, ``-o -``/``-c`` stdout, byte for
  byte what the file would hold, the summary then on stderr;
* ``-f/--force`` replaces an existing output, never an input; outputs are atomic, and
  SIGTERM/SIGHUP remove them as Ctrl-C does (:func:`.output.on_signals`);
* every subcommand has ``-V/--version`` and ``-v/--verbose`` (:func:`.options.add_command`,
  :func:`.options.add_verbose`); ``-q`` silences progress bars and summaries; ``--json``
  prints one document; options are never abbreviated.

Exit status: 0 on success; 1 on a data error (one line ``compeft: error: ...`` on stderr, no
traceback: a bad or missing file, a base that does not match, an existing output); 2 on a
usage error, one line naming the subcommand's help; 128 + N when signal N stopped it.

A new subcommand module has ``add_parsers(subparsers)`` making its parsers with
:func:`.options.add_command`, and joins :data:`COMMAND_MODULES`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..errors import CompeftError
from . import convert, demo, inspect, merge, tuning
from .options import PROG, Parser, UsageError, version
from .output import Terminated, message, on_signals

__all__ = ["main"]

#: The modules adding subcommands, in the order ``--help`` lists them; each has
#: ``add_parsers(subparsers)``, and every parser it adds sets ``run``: ``run(args) -> int``.
COMMAND_MODULES = (convert, merge, inspect, demo, tuning)


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


#: Options whose value may start with a minus sign (negative weights subtract a task):
#: argparse takes ``-1,1`` for an option, so ``--weights -1,1`` is read as ``--weights=-1,1``.
SIGNED_OPTIONS = ("--weights",)


def _glued(argv: list[str]) -> list[str]:
    """``argv`` with each :data:`SIGNED_OPTIONS` joined to a value that starts with ``-``
    and a digit or a dot (until ``--``).

    >>> _glued(["merge", "a", "b", "--weights", "-1,1", "-o", "m"])
    ['merge', 'a', 'b', '--weights=-1,1', '-o', 'm']
    """
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return out + argv[i:]
        nxt = argv[i + 1] if i + 1 < len(argv) else ""
        if arg in SIGNED_OPTIONS and len(nxt) > 1 and nxt[0] == "-" and \
                (nxt[1].isdigit() or nxt[1] == "."):
            out.append(f"{arg}={nxt}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit status.

    Examples
    --------
    >>> main(["verify", "/nonexistent.compeft"])
    /nonexistent.compeft: FAILED: /nonexistent.compeft: No such file or directory
    1
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser().parse_args(_glued(argv))
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
