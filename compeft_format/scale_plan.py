"""The scale a file compress gives its tensors: the rule ``auto`` picks, and the fits after it.

:func:`~compeft_format.convert.compress_file` selects with
:func:`~compeft_format.compress.iter_compress`; what scale each kept entry gets is decided
here, from what the task vector is (:func:`resolved_scale`), and, for a LoRA adapter, after
the selection: the factors' scales fitted on their products (:func:`lora_refit`,
:mod:`compeft_format.lora_scale`) or calibrated on the network's response
(:func:`calibrate_adapter`, :mod:`compeft_format.calibrate`). :func:`ternary_stream` puts
these together, tensor by tensor where it can, and adds to the ``compeft.compression`` record
what a reader needs to recover the ``proj`` scale (:data:`LORA_SCALE_KEY`,
:data:`PROJ_SCALE_KEY`, spec 5.2.1): merge's ``expected_ties`` reads them
(:mod:`compeft_format.merge_io`).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .calibrate import CALIBRATION_KEY, Calibration, calibrate_scales
from .compress import AUTO_SCALE, iter_compress
from .errors import CompeftError, ConvertError
from .lora_scale import LORA_SCALES, lora_pairs, peft_scaling, rescale
from .plan import FileTaskVector, Plan
from .scales import METRIC_TERMS, is_vector, resolve_scale
from .sources import Source

__all__ = [
    "LORA_LOW_DENSITY",
    "LORA_SCALE_KEY",
    "LORA_SELECTION",
    "PROJ_SCALE_KEY",
    "calibrate_adapter",
    "is_lora",
    "lora_refit",
    "low_density_hint",
    "one_or_each",
    "require_lora",
    "resolved_scale",
    "ternary_stream",
]

#: At or below this density the default scale rebuilds a LoRA adapter's factors worse than
#: leaving the adapter out, on every adapter measured, and ``lora_product_out`` keeps most of
#: its gain (``bench/results/lora_scale.md``): the summary's note says so.
LORA_LOW_DENSITY = 0.02

#: The rule a LoRA product scale's selection (and its other tensors' scales) is made with.
LORA_SELECTION = "proj_vcap"

#: Member of ``compeft.compression`` written with a rule whose scale is not ``proj``'s
#: (``"kron_sketch"``, ``"kron"``, ``"gram"``: :data:`~compeft_format.scales.METRIC_TERMS`):
#: the ``"proj"`` scale of each scope, before a vector's cap (a vector's ``"proj_vcap"``
#: scale is the smaller of that and its own largest change), one number where every
#: tensor's scope had the same (scope ``"global"``), else by tensor name; so that a reader
#: assuming ``proj`` (merge's ``expected_ties``) can recover it. Informative (spec 5.2.1).
PROJ_SCALE_KEY = "proj_scale"

#: Member of ``compeft.compression`` written with a LoRA product scale
#: (:mod:`compeft_format.lora_scale`) or a calibration of ``proj``/``proj_vcap``:
#: ``{"selection": the rule compress chose the scales with, "proj_scale": what it gave the
#: factors}`` (one number where they shared one; else ``{"A": ..., "B": ...}`` for scope
#: "role", or by tensor name), so that a reader assuming that rule (merge's
#: ``expected_ties``) can recover it.
LORA_SCALE_KEY = "lora_fit"


def one_or_each(scales: Mapping[str, float]) -> float | dict[str, float]:
    """One number where every tensor has the same scale, else the scales by name (sorted).

    >>> one_or_each({"b": 0.5, "a": 0.5}), one_or_each({"b": 0.5, "a": 0.25})
    (0.5, {'a': 0.25, 'b': 0.5})
    """
    values = set(scales.values())
    return values.pop() if len(values) == 1 else {n: scales[n] for n in sorted(scales)}


def is_lora(source: Source) -> bool:
    """Whether ``source`` is a PEFT LoRA adapter (a folder with its config)."""
    return source.config is not None and str(source.peft_type).upper() == "LORA"


def require_lora(source: Source, why: str, error: type[CompeftError] = ConvertError) -> None:
    """Refuse anything but a LoRA adapter: ``PATH: WHY; this is WHAT`` (before any work)."""
    if not is_lora(source):
        what = (f"an adapter of PEFT type {source.peft_type}" if source.config
                else "not a PEFT adapter")
        raise error(f"{source.path}: {why}; this is {what}")


def resolved_scale(scale: str, density: float, source: Source, plan: Plan, reader: Any,
                   scope: str = "global") -> str:
    """The rule ``scale`` stands for (:func:`~compeft_format.scales.resolve_scale`): for
    ``"auto"``, a LoRA adapter's factors get the LoRA rule by what they are measured from,
    an (IA)^3 adapter and a task vector of vectors only ``"proj_vcap"``, the rest the dense
    rule; any other rule is itself."""
    if scale != AUTO_SCALE:
        return scale
    peft_type = str(source.peft_type).upper() if source.config is not None else None
    if peft_type == "LORA" and lora_pairs(plan.compressible):
        ref = "checkpoint" if plan.reference["reference"] == "checkpoint" else "zero"
        return resolve_scale(scale, density, lora=ref, scope=scope)
    matrices = peft_type != "IA3" and any(not is_vector(tuple(reader.info(n).shape))
                                          for n in plan.compressible)
    return resolve_scale(scale, density, matrices=matrices)


def _factor_names(done: Mapping[str, Any]) -> tuple[list[tuple[str, str]], list[str]]:
    """The LoRA ``(A, B)`` pairs among the ternary tensors of ``done``, and their names."""
    pairs = lora_pairs(n for n, v in done.items() if hasattr(v, "scale"))
    return pairs, [n for pair in pairs for n in pair]


class _Read(Mapping):
    """``name -> reader.get(name)`` for ``names``, read on access as a copy whose pages of
    the memory map are then released: the fit holds one module's factors at a time, and the
    adapter's file does not stay resident (with the reference, twice the adapter's size)."""

    def __init__(self, names: Iterable[str], reader: Any) -> None:
        self._names = list(names)
        self._set = set(self._names)
        self._reader = reader

    def __getitem__(self, name: str) -> Any:
        if name not in self._set:
            raise KeyError(name)
        storage, dtype = self._reader.get(name)
        copy = np.array(storage)
        release = getattr(self._reader, "release", None)
        if release is not None:
            release(name)
        return copy, dtype

    def __contains__(self, name: object) -> bool:  # without reading the tensor
        return name in self._set

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def lora_refit(done: dict[str, Any], source: Source, reader: Any, base_reader: Any,
               measured: Iterable[str], rule: str, scope: str, alpha: float
               ) -> dict[str, Any]:
    """Fit the LoRA factors' scales of ``done`` in place (:func:`lora_scale.rescale`) against
    the adapter's factors, from the base where the task vector was measured from it (else
    zero), PEFT's scaling weighing the modules; return the record's :data:`LORA_SCALE_KEY`."""
    pairs, names = _factor_names(done)
    from_base = set(measured) if base_reader is not None else set()
    config = json.loads(Path(source.config).read_text()) if source.config else {}
    fitted = rescale(done, _Read(names, reader),
                     _Read([n for n in names if n in from_base], base_reader)
                     if base_reader is not None else {},
                     rule=rule, scope=scope, alpha=alpha,
                     scaling=lambda a: peft_scaling(config, a, reader.info(a).shape[0],
                                                    source.config))
    before = {n: done[n].scale for n in names}
    done.update(fitted)
    proj: Any = one_or_each(before) if before else 0.0
    if scope == "role" and isinstance(proj, dict):  # one scale per role
        proj = {"A": before[pairs[0][0]], "B": before[pairs[0][1]]}
    return {"selection": LORA_SELECTION, "proj_scale": proj}


def calibrate_adapter(done: dict[str, Any], source: Source, reader: Any, base_reader: Any,
                      measured: Iterable[str], text: tuple[list[str], str], base_model: Any
                      ) -> tuple[Calibration, Any]:
    """:func:`calibrate.calibrate_scales` on the compressed tensors ``done`` of the LoRA
    adapter ``source`` (checked before any work), from the base where the task vector was
    measured from it: the calibration and the factors' scales before it
    (:data:`LORA_SCALE_KEY`'s ``proj_scale``)."""
    _, names = _factor_names(done)
    from_base = set(measured) if base_reader is not None else set()
    cal, before = calibrate_scales(
        done, {n: reader.values(n) for n in names},
        {n: base_reader.values(n) for n in names if n in from_base} or None,
        json.loads(Path(source.config).read_text()), base_model=base_model, text=text[0],
        text_name=text[1], where=source.path)
    return cal, one_or_each(before) if before else 0.0


def ternary_stream(tv: FileTaskVector, comp_meta: dict[str, Any], *, density: float,
                   alpha: float, scope: str, rule: str, source: Source, reader: Any,
                   base_reader: Any, calibration_text: tuple[list[str], str] | None = None,
                   base_model: Any = None
                   ) -> tuple[Iterator[tuple[str, Any]], Calibration | None]:
    """The ternary tensors of ``tv`` at scale ``rule`` (resolved), in ``tv``'s order, and the
    calibration made (None without ``calibration_text``).

    What a reader needs to recover ``proj`` goes into ``comp_meta`` before the first tensor
    is yielded (the file header is written first): a LoRA product rule's or a calibration's
    :data:`LORA_SCALE_KEY` and the calibration's record hold every tensor (an adapter); a
    metric rule's :data:`PROJ_SCALE_KEY` is known at the first tensor of one scope (scope
    ``"tensor"`` holds them all); the other rules stream.
    """
    if rule in LORA_SCALES or calibration_text is not None:
        done = dict(iter_compress(tv, density=density, alpha=alpha, scope=scope,
                                  scale=LORA_SELECTION if rule in LORA_SCALES else rule))
        calibration = None
        if rule in LORA_SCALES:
            comp_meta[LORA_SCALE_KEY] = lora_refit(done, source, reader, base_reader,
                                                   tv, rule, scope, alpha)
        if calibration_text is not None:
            calibration, uncalibrated = calibrate_adapter(
                done, source, reader, base_reader, tv, calibration_text, base_model)
            comp_meta[CALIBRATION_KEY] = calibration.record()
            # merging reads the uncalibrated proj scale (a LoRA product rule's own record
            # already holds it; other rules record none, and expected_ties refuses them as it
            # does uncalibrated)
            if rule in ("proj", "proj_vcap"):
                comp_meta[LORA_SCALE_KEY] = {"selection": rule, "proj_scale": uncalibrated}
        return iter(done.items()), calibration
    if rule in METRIC_TERMS:
        proj: dict[str, float] = {}
        stream = iter_compress(tv, density=density, alpha=alpha, scope=scope, scale=rule,
                               proj_scales=proj)
        ahead = list(stream) if scope == "tensor" else list(itertools.islice(stream, 1))
        if proj:
            comp_meta[PROJ_SCALE_KEY] = one_or_each(proj)
        return itertools.chain(ahead, stream), None
    return iter_compress(tv, density=density, alpha=alpha, scope=scope, scale=rule), None


def low_density_hint(rule: str, density: float, source: Source) -> str | None:
    """The summary's hint where ``proj_vcap`` was asked for a LoRA adapter at low density."""
    if rule == "proj_vcap" and density <= LORA_LOW_DENSITY and is_lora(source):
        return (f"at density <= {LORA_LOW_DENSITY} proj_vcap keeps little of a LoRA's gain "
                "(bench/results/lora_scale.md); --scale lora_product_out (the default, "
                "--scale auto, picks it here) keeps most of it")
    return None
