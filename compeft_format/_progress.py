"""Progress bars of the converters: a tqdm bar on stderr when asked for, else nothing."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["Bar"]


class Bar:
    """A tqdm bar on stderr when enabled, else nothing (tqdm is imported only then).

    >>> with Bar(False, 3, "compress") as bar:
    ...     bar.update()
    """

    def __init__(self, enabled: bool, total: int, desc: str) -> None:
        self._bar = None
        if enabled and total > 1:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr,
                             leave=False, dynamic_ncols=True)

    def update(self, *_: Any) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

