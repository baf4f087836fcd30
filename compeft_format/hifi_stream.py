"""A hi-fi compress of a file's task vector (``compress_file(..., hifi=...)``).

:mod:`compeft_format.hifi` is the codec and its file layer; this is the converter's side of
it: the ``compeft.compression`` record of a hi-fi file (:func:`hifi_compression`) and the
codes of a lazily read task vector, tensor by tensor, with their quality
(:class:`HifiStream`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from . import dtypes as _dt
from .compress import DEFAULT_DENSITY, DEFAULT_SCALE, compression_metadata
from .errors import EncodeError
from .hifi import hifi_codes, hifi_decode, hifi_steps, lora_weights
from .plan import FileTaskVector
from .quality import QualityReport, QualitySums, measure_tensor

__all__ = ["HifiStream", "hifi_compression"]


def hifi_compression(rel_step: Any, checked: Mapping[str, Any], scale: str) -> dict[str, Any]:
    """``compeft.compression`` of a hi-fi file; refuses the ternary options changed
    (``checked``: the ternary record compress would write, ``scale`` the rule asked for).

    >>> hifi_compression(0.01, compression_metadata(0.1, 1.0, "global", "proj_vcap"), "auto")
    {'method': 'hifi', 'rel_step': 0.01}
    """
    defaults = compression_metadata(DEFAULT_DENSITY, 1.0, "global", "proj_vcap")
    changed = [k for k in ("density", "alpha", "scope") if checked[k] != defaults[k]]
    changed += ["scale"] if scale != DEFAULT_SCALE else []
    if changed:
        raise EncodeError(f"hifi keeps every entry at a step: {', '.join(changed)} "
                          "do not apply")
    if not (isinstance(rel_step, (int, float)) and not isinstance(rel_step, bool)
            and 0 < rel_step < math.inf):
        raise EncodeError(f"hifi step must be a positive finite number, got {rel_step!r}")
    return {"method": "hifi", "rel_step": float(rel_step)}


class HifiStream:
    """The hi-fi codes of a task vector, tensor by tensor, with their quality.

    The steps come from one pass over ``tv`` (:func:`~compeft_format.hifi.hifi_steps`; a
    LoRA adapter's factors (``lora=True``) weighed by
    :func:`~compeft_format.hifi.lora_weights` of its trained factors, read from ``reader``);
    iterating yields ``(name, codes)`` in ``tv``'s order, measuring each decoded tensor
    against the exact one as it goes.
    """

    def __init__(self, tv: FileTaskVector, rel_step: float, reader: Any, lora: bool = False):
        weights = None
        if lora:
            factors = {n: _dt.to_numpy_values(*reader.get(n)) for n in tv if ".lora_" in n}
            weights = lora_weights(factors)
        self.tv = tv
        self.steps = hifi_steps(tv, rel_step=rel_step, weights=weights)
        self._per: list[Any] = []
        self._total = QualitySums()

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.tv:
            values = np.asarray(self.tv[name])
            codes = hifi_codes(values, self.steps[name], name=name)
            sums = measure_tensor(name, values, hifi_decode(codes, self.steps[name]))[1]
            self._per.append(sums.quality(name, "hifi"))
            self._total.add(sums)
            del values
            yield name, codes

    def metadata(self, names: list[str], dtypes: Mapping[str, str]) -> dict[str, Any]:
        """The :data:`~compeft_format.hifi.HIFI_KEY` value for records ``names`` (in order):
        a step for each hi-fi record, null for those stored as they are, and the original
        dtypes of the hi-fi records (null for the others, which keep theirs), left out when
        all are F32, the default (74 LoRA tensors: 0.012 bits a parameter)."""
        value: dict[str, Any] = {"version": 1, "steps": [self.steps.get(n) for n in names]}
        coded = [dtypes[n] if n in self.steps else None for n in names]
        if any(d not in (None, "F32") for d in coded):
            value["dtypes"] = coded
        return value

    def quality(self) -> QualityReport:
        """Every hi-fi tensor's quality and the overall one, once the stream is exhausted."""
        return QualityReport(tuple(self._per), self._total.quality("(overall)", "all"))
