"""What the ``compeft`` command shows: progress bars, error lines, paths it reads."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..convert import ADAPTER_COMPEFT


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
    return " ".join(str(exc).split()) or type(exc).__name__  # one line
