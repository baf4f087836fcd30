"""The parser of the ``compeft`` command: its class, option types and shared option groups.

Every subcommand module adds its parsers with these, so that the same option means the same
thing (and reads the same in ``--help``) wherever it appears.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from typing import Any, NoReturn

from .. import _spec as S
from .._version import __version__
from ..compress import SCALES

PROG = "compeft"
POSITIONS = ("auto", "bitmask", "golomb", "rice")


class UsageError(Exception):
    """A command line that cannot be run as given (exit status 2), found after parsing."""


class Parser(argparse.ArgumentParser):
    """argparse, with the conventions of the whole command.

    A usage error is one line naming the (sub)command's help (``compeft compress: error: ...
    (see compeft compress --help)``), exit 2; options are never abbreviated (``--dens`` is an
    error, not ``--density``); a subcommand rejects the arguments it does not know itself, so
    that its own help is named.
    """

    def __init__(self, *args: Any, strict: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._strict = strict

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        ns, extras = super().parse_known_args(args, namespace)
        if self._strict and extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def version() -> str:
    """What ``--version`` prints."""
    return f"{PROG} {__version__} (format {S.VERSION_MAJOR}.{S.VERSION_MINOR})"


def add_command(sub: argparse._SubParsersAction, name: str, run: Callable[..., int], *,
                help: str, description: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand ``name`` whose ``run(args) -> int`` runs it, with ``-V/--version``
    (``kwargs``: more of ``ArgumentParser``'s, such as ``epilog``)."""
    q = sub.add_parser(name, help=help, description=description, strict=True,
                       allow_abbrev=False, **kwargs)
    q.set_defaults(run=run)
    q.add_argument("-V", "--version", action="version", version=version(),
                   help="print the version and exit")
    return q


def _number(text: str, kind: Callable[[str], Any], ok: Callable[[Any], bool],
            rule: str) -> Any:
    """``text`` read as ``kind`` (int or float), refused unless ``ok``; ``rule`` says why."""
    try:
        value = kind(text)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"not {noun}: {text!r}") from None
    if not ok(value):  # a NaN fails every comparison, so it is refused here too
        raise argparse.ArgumentTypeError(f"{rule}, got {text if kind is float else value}")
    return value


def density(text: str) -> float:
    """A density in ``(0, 1]``."""
    return _number(text, float, lambda v: 0.0 < v <= 1.0, "must be in (0, 1]")


def positive(text: str) -> float:
    """A finite number above zero."""
    return _number(text, float, lambda v: math.isfinite(v) and v > 0,
                   "must be a finite number > 0")


def base_choice(text: str) -> str:
    """A ``--base``: a path, ``zero``, or ``peft-init[:SEED]`` with a valid seed (a bad one
    is a usage error, before any work).

    >>> base_choice("peft-init:7"), base_choice("init/")
    ('peft-init:7', 'init/')
    """
    from ..errors import ConvertError
    from ..peft_init import parse_peft_init

    try:
        parse_peft_init(text)
    except ConvertError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def scale_rule(text: str) -> str:
    """One of the scale rules."""
    if text not in SCALES:
        raise argparse.ArgumentTypeError(f"unknown scale rule {text!r} (choose from "
                                         f"{', '.join(SCALES)})")
    return text


def list_of(item: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    """A comma-separated list of ``item`` values, at least one."""
    def parse(text: str) -> list[Any]:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError("give at least one value")
        return [item(p) for p in parts]

    return parse


def zstd_level(text: str) -> int:
    """A zstd level in ``[-7, 22]``."""
    return _number(text, int, lambda v: -7 <= v <= 22, "must be in [-7, 22]")


def add_quiet(q: argparse.ArgumentParser, what: str = "no progress bars, no summary") -> None:
    """``-q/--quiet``."""
    q.add_argument("-q", "--quiet", action="store_true", help=what)


def add_verbose(q: argparse.ArgumentParser, what: str) -> None:
    """``-v/--verbose``."""
    q.add_argument("-v", "--verbose", action="store_true", help=what)


def add_force(q: argparse.ArgumentParser, what: str = "replace an existing OUTPUT") -> None:
    """``-f/--force``."""
    q.add_argument("-f", "--force", action="store_true", help=what)


def add_json(q: argparse.ArgumentParser, what: str) -> None:
    """``--json``."""
    q.add_argument("--json", action="store_true", help=what)


def jobs(text: str) -> int:
    """A number of worker processes, at least 1; 0 means one per CPU."""
    value = _number(text, int, lambda v: v >= 0, "must be 0 (one per CPU) or more")
    return value or (os.cpu_count() or 1)


def add_zstd(q: argparse.ArgumentParser, help_level: str) -> None:
    """``--zstd LEVEL | --no-zstd``; read the choice back with :func:`zstd_choice`."""
    z = q.add_mutually_exclusive_group()
    # default None, not the level: argparse sees an option given its default value as absent,
    # and would let `--zstd 3 --no-zstd` through
    z.add_argument("--zstd", type=zstd_level, default=None, metavar="LEVEL", help=help_level)
    z.add_argument("--no-zstd", action="store_true", help="no zstd stage")


#: the format versions a writer can be asked for, oldest first ("1.0" ... "1.7")
FORMAT_VERSIONS = tuple(f"{a}.{b}" for a, b in S.VERSIONS)


def add_format_version(q: argparse.ArgumentParser, what: str) -> None:
    """``--format-version V``: the format version of the compeft file written."""
    q.add_argument("--format-version", choices=FORMAT_VERSIONS, default=None, metavar="V",
                   help=f"write {what} in format V ({', '.join(FORMAT_VERSIONS)}), for "
                   f"readers of an older version (default {FORMAT_VERSIONS[-1]}, the "
                   "newest: its files are the smallest)")


def zstd_choice(args: argparse.Namespace) -> int | None:
    """The zstd level that ``--zstd``/``--no-zstd`` ask for (None: no zstd stage)."""
    return None if args.no_zstd else S.DEFAULT_ZSTD_LEVEL if args.zstd is None else args.zstd
