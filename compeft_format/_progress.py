"""Progress bars of the converters: a tqdm bar on stderr when asked for, else nothing."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["Bar", "PassesBar"]


class Bar:
    """A tqdm bar on stderr when enabled, else nothing (tqdm is imported only then).

    >>> with Bar(False, 3, "compress") as bar:
    ...     bar.update()
    """

    def __init__(self, enabled: bool, total: int, desc: str, *, unit: str = "tensor") -> None:
        self._bar = None
        if enabled and total > 1:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr,
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



class PassesBar(Bar):
    """A bar counting ``tensors`` once per pass over them: ``compress (pass 2/5)`` goes from 0
    to the number of tensors, then the next pass starts at 0 (a user counts tensors, and a
    total of passes times tensors reads as more tensors than the model has).

    >>> with PassesBar(False, 3, 2, "compress") as bar:
    ...     bar.update()
    """

    def __init__(self, enabled: bool, tensors: int, passes: int, desc: str) -> None:
        super().__init__(enabled, tensors, f"{desc} (pass 1/{passes})")
        self._desc, self._tensors, self._passes = desc, tensors, passes
        self._done = self._pass = 0

    def update(self, *_: Any) -> None:
        if self._bar is None:
            return
        if self._done == self._tensors and self._pass + 1 < self._passes:
            self._pass += 1
            self._done = 0
            self._bar.reset(total=self._tensors)
            self._bar.set_description(f"{self._desc} (pass {self._pass + 1}/{self._passes})",
                                      refresh=False)
        self._done += 1
        self._bar.update(1)
