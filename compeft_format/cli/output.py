"""What the ``compeft`` command shows: progress bars, error lines, paths it reads."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..convert import ADAPTER_COMPEFT
from .options import PROG


def compeft_path(path: str) -> Path:
    """A compeft file, or the one inside a compressed adapter directory."""
    p = Path(path)
    return p / ADAPTER_COMPEFT if p.is_dir() else p


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars: on stderr when it is a terminal, unless ``--quiet``."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


class Progress:
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

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()


def message(exc: BaseException) -> str:
    """One line saying what went wrong (an OSError as ``path: reason``)."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename is not None else ""
        return f"{where}{exc.strerror}"
    text = " ".join(str(exc).split()) or type(exc).__name__  # one line
    # the library's messages name an option both ways ("use --force (force=True)"): the
    # command line speaks of its options only
    return _PYTHON_HINT.sub("", text)


_PYTHON_HINT = re.compile(r" \([a-z_]+=[^()]*\)")


class Report:
    """What a command that writes files prints: a summary per INPUT, or one JSON document.

    Summaries go to stdout, or to stderr when stdout carries the data (``-o -``); ``-q``
    silences them (``--json`` still prints its document); a failure is one
    ``compeft: error: ...`` line on stderr (and an ``"error"`` entry in the JSON document).
    """

    def __init__(self, args: argparse.Namespace, *, data_on_stdout: bool) -> None:
        self.stream = sys.stderr if data_on_stdout else sys.stdout
        self.quiet = bool(getattr(args, "quiet", False))
        self.json = bool(getattr(args, "json", False))
        self.docs: list[dict[str, Any]] = []
        self._printed = False

    def add(self, doc: dict[str, Any], text: Callable[[], str]) -> None:
        """One INPUT done: its JSON ``doc``, or its ``text()`` printed now."""
        if self.json:
            self.docs.append(doc)
        elif not self.quiet:
            if self._printed:
                print(file=self.stream)
            print(text(), file=self.stream, flush=True)
            self._printed = True

    def fail(self, job: Any, exc: BaseException, names: dict[str, str] | None = None) -> None:
        """One INPUT failed: say so on stderr, and in the JSON document; ``names`` maps the
        temporary files behind stdin and stdout to the names the user knows."""
        text = message(exc)
        for path, shown in (names or {}).items():
            text = text.replace(path, shown)
        sys.stdout.flush()
        print(f"{PROG}: error: {text}", file=sys.stderr, flush=True)
        if self.json:
            self.docs.append({"source": job.src, "output": job.dst, "error": text})

    def close(self) -> None:
        """Print the JSON document (an object for one INPUT, an array for several)."""
        if self.json and self.docs:
            doc = self.docs[0] if len(self.docs) == 1 else self.docs
            print(json.dumps(doc, indent=2), file=self.stream, flush=True)


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: raised where the command was, so that every ``with`` and
    ``finally`` on the way out removes what it was writing (as for Ctrl-C). A BaseException,
    like KeyboardInterrupt, so that no ``except Exception`` swallows it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"terminated by {signal.Signals(signum).name}")


@contextlib.contextmanager
def on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into :class:`Terminated` while the block runs (main thread
    only: elsewhere Python cannot set handlers; the previous handlers come back after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum: int, _frame: Any) -> None:
        raise Terminated(signum)

    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
