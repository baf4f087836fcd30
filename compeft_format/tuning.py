"""Choosing density and scale: sweep the settings, or tune them against your own evaluation.

* :func:`sweep` compresses a task vector at every density and scale rule asked for and
  reports, for each setting, the size of the file it would make (bytes, bits per parameter,
  ratio against the dense tensors) and its quality (relative L2 error and cosine against the
  exact task vector, per tensor and overall). Nothing is written: the bytes go through a
  :class:`~compeft_format.container.Writer` into a sink that only counts them, so the sizes
  are those of :func:`~compeft_format.container.save_file` with the same metadata.
* :func:`tune` searches the density and ``alpha`` against a score that *you* compute on the
  rebuilt model (higher is better), optionally within a size budget, and returns the best
  setting, every score and the chosen compressed tensors.

The quality a sweep reports is measured on the parameters. It is not the quality of the
rebuilt model: ``"l2"`` minimises the parameter error by construction, while the default
``"proj_vcap"`` overshoots on purpose and rebuilds the model more faithfully (see
:func:`~compeft_format.compress.compress` for the measurements). To judge a model, tune
against an evaluation of the model.

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> tv = {"w": rng.normal(size=(64, 64)).astype(np.float32)}
>>> result = sweep(tv, densities=[0.05, 0.2], scales=["proj_vcap", "l2"])
>>> [(p.scale, p.density, p.nnz) for p in result.points]
[('proj_vcap', 0.05, 205), ('proj_vcap', 0.2, 819), ('l2', 0.05, 205), ('l2', 0.2, 819)]
>>> result.points[0].file_bytes < result.points[1].file_bytes
True
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import _spec as S
from . import dtypes as _dt
from .compress import (
    COMPRESSION_METADATA_KEY,
    DEFAULT_SCALE,
    SCALE_CHOICES,
    SWEEP_SCALES,
    check_choice,
    compress,
    compression_metadata,
)
from .container import Writer
from .errors import CompeftError, EncodeError
from .quality import QualityReport, quality_report
from .scales import resolve_scale
from .taskvec import apply_task_vector
from .tensor import TernaryTensor

__all__ = [
    "DEFAULT_ALPHAS",
    "DEFAULT_DENSITIES",
    "TUNING_METADATA_KEY",
    "Candidate",
    "SweepPoint",
    "SweepResult",
    "TuneError",
    "TuneResult",
    "count_file_bytes",
    "run_eval_command",
    "sweep",
    "sweep_file",
    "tune",
    "tune_file",
]

#: Densities a sweep tries when none are given.
DEFAULT_DENSITIES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3)
#: Alphas :func:`tune` tries when none are given: around the default scale, whose best
#: alpha was 0.93 to 1.17 in the measurements of :func:`~compeft_format.compress.compress`.
DEFAULT_ALPHAS = (0.7, 0.85, 1.0, 1.1, 1.2, 1.35, 1.5)


class TuneError(CompeftError):
    """A search that cannot go on: a bad score, no candidate within the budget."""


# ---------------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------------
class _CountingSink:
    """A write-only file object that keeps only the number of bytes written."""

    def __init__(self) -> None:
        self.count = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = len(memoryview(data).cast("B"))
        self.count += n
        return n


def _sorted_names(names: Iterable[str]) -> list[str]:
    """The record order of a file: by UTF-8 bytes (as ``dumps`` and ``compress_file`` sort)."""
    return sorted(names, key=lambda n: n.encode("utf-8", "surrogatepass"))


def count_file_bytes(
    items: Iterable[tuple[str, Any, str | None]],
    *,
    metadata: Mapping[str, Any] | None = None,
    positions: str = "auto",
    zstd_level: int | None = S.DEFAULT_ZSTD_LEVEL,
) -> tuple[int, dict[str, int]]:
    """Return the size of the file these records make, and each record's size, writing nothing.

    Parameters
    ----------
    items:
        ``(name, value, dtype)`` in record order (increasing UTF-8 bytes): a
        :class:`~compeft_format.TernaryTensor` or a dense array, and the dtype name of a dense
        storage array whose numpy dtype cannot say it (else None), as ``Writer.write`` takes.
    metadata, positions, zstd_level:
        As :func:`~compeft_format.container.save_file`.

    Returns
    -------
    (int, dict)
        The file's bytes, and name -> bytes of its record (header, blocks and padding), or
        for a tensor in a pack its data (``TensorInfo.record_size``: positions and signs, and
        in a 1.1 or 1.2 pack its scale; a compact pack keeps scales in its table).

    Examples
    --------
    >>> from compeft_format import TernaryTensor, dumps
    >>> t = TernaryTensor((4,), [1], [True], 0.5)
    >>> size, records = count_file_bytes([("a", t, None)])
    >>> size == len(dumps({"a": t})), records
    (True, {'a': 2})
    """
    sink = _CountingSink()
    with Writer(sink, metadata=metadata, positions=positions,  # type: ignore[arg-type]
                zstd_level=zstd_level) as w:
        for name, value, dtype in items:
            w.write(name, value, dtype=dtype)
    return sink.count, w.sizes


def _dense_bytes(value: Any) -> tuple[int, int]:
    """``(numel, bytes)`` of a tensor stored dense in its dtype."""
    if isinstance(value, TernaryTensor):
        return value.numel, value.numel * S.ITEMSIZE[value.dtype]
    storage, _ = _dt.to_storage(value)
    return int(storage.size), int(storage.nbytes)


# ---------------------------------------------------------------------------------------------
# sweep
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepPoint:
    """One setting of a sweep: its file size and its quality.

    Attributes
    ----------
    density, scale, alpha, scope:
        The setting (as :func:`~compeft_format.compress.compress` takes them).
    file_bytes:
        Bytes of the file (metadata, every record, index and trailer).
    numel:
        Elements of every tensor in the file.
    dense_bytes:
        Bytes of every tensor stored dense in its dtype (the size of the input's data).
    nnz:
        Entries kept in the ternary tensors.
    quality:
        Relative L2 error and cosine against the exact task vector, per compressed tensor
        and overall.
    record_bytes:
        name -> bytes of its record.
    """

    density: float
    scale: str
    alpha: float
    scope: str
    file_bytes: int
    numel: int
    dense_bytes: int
    nnz: int
    quality: QualityReport = field(repr=False)
    record_bytes: Mapping[str, int] = field(repr=False, default_factory=dict)

    @property
    def bits_per_param(self) -> float:
        """File bits per element, everything included."""
        return 8 * self.file_bytes / self.numel if self.numel else 0.0

    @property
    def ratio(self) -> float:
        """Dense size over file size."""
        return self.dense_bytes / self.file_bytes if self.file_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict (the quality's tensors carry their ``record_bytes``)."""
        q = self.quality.to_dict()
        for t in q["tensors"]:
            t["record_bytes"] = self.record_bytes.get(t["name"])
        return {
            "density": self.density, "scale": self.scale, "alpha": self.alpha,
            "scope": self.scope, "file_bytes": self.file_bytes, "numel": self.numel,
            "dense_bytes": self.dense_bytes, "bits_per_param": self.bits_per_param,
            "ratio": self.ratio, "nnz": self.nnz, "rel_error": q["overall"]["rel_error"],
            "cosine": q["overall"]["cosine"], "quality": q,
        }


@dataclass(frozen=True)
class SweepResult:
    """Every point of a sweep, in the order run (scale by scale, density by density)."""

    points: tuple[SweepPoint, ...]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict: ``{"points": [...]}``."""
        return {"points": [p.to_dict() for p in self.points]}

    def format_table(self) -> str:
        """Return a plain-text table, one row per setting (overall quality).

        Examples
        --------
        >>> import numpy as np
        >>> tv = {"w": np.linspace(-1, 1, 1000)}
        >>> print(sweep(tv, densities=[0.1], scales=["l2"]).format_table())
        scale  density  alpha  nnz  bytes  bits/param  ratio  rel_error    cosine
        l2      0.1000  1.000  100    173      1.3840   46.2   0.853961  0.520337
        """
        header = ("scale", "density", "alpha", "nnz", "bytes", "bits/param", "ratio",
                  "rel_error", "cosine")
        rows = [
            (p.scale, f"{p.density:.4f}", f"{p.alpha:.3f}", f"{p.nnz:,}", f"{p.file_bytes:,}",
             f"{p.bits_per_param:.4f}", f"{p.ratio:.1f}", f"{p.quality.overall.rel_error:.6f}",
             f"{p.quality.overall.cosine:.6f}")
            for p in self.points
        ]
        return _table(header, rows)

    def plot(self, path: Any, *, title: str | None = None) -> None:
        """Save a PNG: size (bits per parameter) against error, one curve per scale rule.

        Two panels: the relative L2 error and the cosine of the compressed task vector,
        each point labelled with its density. Needs matplotlib.
        """
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError:  # pragma: no cover - matplotlib is in the test extras
            raise CompeftError("plotting needs matplotlib (pip install matplotlib)") from None
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        by_scale: dict[str, list[SweepPoint]] = {}
        for p in self.points:
            by_scale.setdefault(f"{p.scale} (alpha {p.alpha:g})", []).append(p)
        for label, pts in by_scale.items():
            pts = sorted(pts, key=lambda p: p.bits_per_param)
            x = [p.bits_per_param for p in pts]
            for ax, y in ((axes[0], [p.quality.overall.rel_error for p in pts]),
                          (axes[1], [p.quality.overall.cosine for p in pts])):
                ax.plot(x, y, marker="o", label=label)
                for p, xv, yv in zip(pts, x, y, strict=True):
                    ax.annotate(f"{p.density:g}", (xv, yv), textcoords="offset points",
                                xytext=(3, 3), fontsize=7)
        axes[0].set_ylabel("relative L2 error of the task vector")
        axes[1].set_ylabel("cosine with the task vector")
        bits = [p.bits_per_param for p in self.points if p.bits_per_param > 0]
        wide = bool(bits) and max(bits) > 4 * min(bits)
        for ax in axes:
            ax.set_xlabel("bits per parameter (file size)")
            if wide:  # many octaves of size: a log axis, with plain numbers
                from matplotlib.ticker import NullFormatter, ScalarFormatter

                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(ScalarFormatter())
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.grid(True, alpha=0.3)
        axes[1].legend(fontsize=8)
        fig.suptitle((title or "compeft sweep: size against error") + " (labels: density)\n"
                     "errors of the parameters: the least-squares l2 is lowest by construction;"
                     " the rebuilt model is another matter", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = []
    for r in (header, *rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:],
                                                                    strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _check_list(what: str, values: Iterable[Any], check: Callable[[Any], Any]) -> list[Any]:
    out = [check(v) for v in values]
    if not out:
        raise EncodeError(f"{what}: give at least one value")
    return out


def _compression_record(
    metadata: Mapping[str, Any] | Callable[[dict[str, Any]], Mapping[str, Any]] | None,
    comp: dict[str, Any],
) -> dict[str, Any]:
    """The file metadata for one setting: ``metadata`` (a mapping, or a function of the
    compression record) with the compression record under ``compeft.compression``."""
    if callable(metadata):
        return dict(metadata(comp))
    return {**(metadata or {}), COMPRESSION_METADATA_KEY: comp}



class _Subset(Mapping):
    """A read-only view of ``tensors`` restricted to ``names`` (values fetched on access)."""

    def __init__(self, tensors: Mapping[str, Any], names: Iterable[str]) -> None:
        self._tensors = tensors
        self._names = list(names)
        self._set = set(self._names)

    def __getitem__(self, name: str) -> Any:
        if name not in self._set:
            raise KeyError(name)
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


@dataclass
class _Source:
    """What a sweep or a search compresses: a task vector, plus records passed through.

    ``passthrough`` maps the name of every record written as it is (besides the compressed
    ones and their excluded values) to a function returning ``(value, dtype)``, and
    ``passthrough_sizes`` to its ``(numel, dense bytes)``.
    """

    tensors: Mapping[str, Any]
    exclude: tuple[str, ...] = ()
    passthrough: Mapping[str, Callable[[], tuple[Any, str | None]]] = field(default_factory=dict)
    passthrough_sizes: Mapping[str, tuple[int, int]] = field(default_factory=dict)


def _measure(
    src: _Source,
    *,
    density: float,
    alpha: float,
    scope: str,
    scale: str,
    metadata: Any,
    positions: str,
    zstd_level: int | None,
    quality: bool = True,
) -> tuple[SweepPoint, dict[str, Any]]:
    """Compress one setting in memory; return its point and the compressed tensors."""
    scale = resolve_scale(scale, density)  # "auto": the rule it gives here, as recorded
    comp_meta = compression_metadata(density, alpha, scope, scale)
    out = compress(src.tensors, density=density, alpha=alpha, scope=scope, scale=scale,
                   exclude=src.exclude)
    names = _sorted_names([*out, *src.passthrough])

    def items() -> Iterator[tuple[str, Any, str | None]]:
        for name in names:  # one passed-through value is read at a time
            if name in out:
                yield name, out[name], None
            else:
                yield (name, *src.passthrough[name]())

    size, records = count_file_bytes(items(), metadata=_compression_record(metadata, comp_meta),
                                     positions=positions, zstd_level=zstd_level)
    numel = dense = nnz = 0
    for name in names:
        n, b = src.passthrough_sizes[name] if name not in out else _dense_bytes(out[name])
        numel += n
        dense += b
        nnz += out[name].nnz if isinstance(out.get(name), TernaryTensor) else 0
    ternary = {n: v for n, v in out.items() if isinstance(v, TernaryTensor)}
    report = quality_report(_Subset(src.tensors, ternary), ternary) if quality else None
    point = SweepPoint(density, scale, alpha, scope, size, numel, dense, nnz,
                       report if report is not None else _EMPTY_REPORT, records)
    return point, out


_EMPTY_REPORT = quality_report({}, {})


def _run_sweep(src: _Source, *, densities: Iterable[float], scales: Iterable[str],
               scope: str, alpha: float, metadata: Any, positions: str,
               zstd_level: int | None, progress: Callable[[SweepPoint], Any] | None
               ) -> SweepResult:
    from .compress import check_alpha, check_density

    ds = _check_list("densities", densities, check_density)
    ss = _check_list("scales", scales, lambda s: check_choice("scale", s, SCALE_CHOICES))
    alpha = check_alpha(alpha)
    points = []
    for scale in ss:
        for d in ds:
            point, _ = _measure(src, density=d, alpha=alpha, scope=scope, scale=scale,
                                metadata=metadata, positions=positions, zstd_level=zstd_level)
            points.append(point)
            if progress is not None:
                progress(point)
    return SweepResult(tuple(points))


def sweep(
    tensors: Mapping[str, Any],
    *,
    densities: Iterable[float] = DEFAULT_DENSITIES,
    scales: Iterable[str] = SWEEP_SCALES,
    scope: str = "global",
    alpha: float = 1.0,
    exclude: str | Iterable[str] = (),
    metadata: Mapping[str, Any] | Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
    positions: str = "auto",
    zstd_level: int | None = S.DEFAULT_ZSTD_LEVEL,
    progress: Callable[[SweepPoint], Any] | None = None,
) -> SweepResult:
    """Size and quality of a task vector compressed at every density and scale rule.

    For each setting, :func:`~compeft_format.compress.compress` runs in memory and the file
    :func:`~compeft_format.container.save_file` would write (with the same ``metadata``,
    ``positions`` and ``zstd_level``) is counted, not written: the sizes are exact.

    Parameters
    ----------
    tensors:
        The task vector, as :func:`~compeft_format.compress.compress` takes it (it may be
        lazy; each setting reads it again).
    densities, scales:
        The settings: every density with every scale rule (by default every rule but the
        Gram-matrix ones, :data:`~compeft_format.compress.METRIC_SCALES`, which cost a pass
        of about rows x cols x min(rows, cols) a matrix: ask for them by name).
    scope, alpha, exclude:
        As :func:`~compeft_format.compress.compress`. Excluded tensors are written dense and
        count in the sizes; the quality covers the compressed tensors.
    metadata:
        The file metadata: a mapping, to which each setting's
        :func:`~compeft_format.compress.compression_metadata` is added under
        ``"compeft.compression"``; or a function of that record returning the whole
        metadata. None: the compression record alone.
    positions, zstd_level:
        As :func:`~compeft_format.container.save_file`.
    progress:
        Called with each :class:`SweepPoint` when it is done.

    Returns
    -------
    SweepResult

    Examples
    --------
    >>> import numpy as np
    >>> from compeft_format import dumps
    >>> from compeft_format.compress import compress, compression_metadata
    >>> tv = {"w": np.random.default_rng(1).normal(size=(32, 32))}
    >>> p = sweep(tv, densities=[0.1], scales=["norm"]).points[0]
    >>> meta = {"compeft.compression": compression_metadata(0.1, 1.0, "global", "norm")}
    >>> p.file_bytes == len(dumps(compress(tv, density=0.1, scale="norm"), metadata=meta))
    True
    """
    patterns = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    src = _Source(tensors, patterns)
    return _run_sweep(src, densities=densities, scales=scales, scope=scope, alpha=alpha,
                      metadata=metadata, positions=positions, zstd_level=zstd_level,
                      progress=progress)


# ---------------------------------------------------------------------------------------------
# tune
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """One setting tried by a search.

    Attributes
    ----------
    density, alpha, scale, scope:
        The setting.
    file_bytes, numel:
        Size of its file and elements of its tensors.
    score:
        What the evaluation returned (higher is better); None when not evaluated.
    status:
        ``"scored"``, or ``"over budget"`` (not evaluated).
    """

    density: float
    alpha: float
    scale: str
    scope: str
    file_bytes: int
    numel: int
    score: float | None
    status: str = "scored"

    @property
    def bits_per_param(self) -> float:
        """File bits per element."""
        return 8 * self.file_bytes / self.numel if self.numel else 0.0

    def label(self) -> str:
        """A short name for messages: ``density 0.1, alpha 1.2 (proj_vcap, global)``."""
        return f"density {self.density:g}, alpha {self.alpha:g} ({self.scale}, {self.scope})"

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict."""
        return {"density": self.density, "alpha": self.alpha, "scale": self.scale,
                "scope": self.scope, "file_bytes": self.file_bytes,
                "bits_per_param": self.bits_per_param, "score": self.score,
                "status": self.status}


@dataclass(frozen=True)
class TuneResult:
    """What :func:`tune` found.

    Attributes
    ----------
    best:
        The chosen candidate: the best score (within the budget, if any); ties go to
        alpha 1, then to the smaller file, then to the earlier candidate.
    candidates:
        Every candidate, in the order tried (density by density, alpha by alpha).
    compressed:
        The compressed tensors of the chosen setting (as
        :func:`~compeft_format.compress.compress` returns them); empty from the command.
    budget_bits_per_param:
        The size budget, or None.
    """

    best: Candidate
    candidates: tuple[Candidate, ...]
    compressed: dict[str, Any] = field(repr=False, default_factory=dict)
    budget_bits_per_param: float | None = None

    def record(self) -> dict[str, Any]:
        """The search as JSON-safe file metadata (``compeft tune`` stores it as ``"tuning"``)."""
        return {
            "chosen": {"density": self.best.density, "alpha": self.best.alpha,
                       "scale": self.best.scale, "scope": self.best.scope,
                       "score": self.best.score},
            "budget_bits_per_param": self.budget_bits_per_param,
            "rule": "best score" + (" within the budget" if self.budget_bits_per_param
                                    is not None else ""),
            "candidates": [
                {"density": c.density, "alpha": c.alpha, "file_bytes": c.file_bytes,
                 "bits_per_param": round(c.bits_per_param, 6), "score": c.score}
                for c in self.candidates
            ],
        }

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict: the chosen candidate and every candidate."""
        return {"best": self.best.to_dict(), "budget_bits_per_param": self.budget_bits_per_param,
                "candidates": [c.to_dict() for c in self.candidates]}

    def format_table(self) -> str:
        """Return a plain-text table of the candidates; the chosen one is marked ``*``."""
        header = ("", "density", "alpha", "bytes", "bits/param", "score")
        rows = [
            ("*" if c is self.best else "", f"{c.density:.4f}", f"{c.alpha:.3f}",
             f"{c.file_bytes:,}", f"{c.bits_per_param:.4f}",
             c.status if c.score is None else f"{c.score:.6g}")
            for c in self.candidates
        ]
        return _table(header, rows)


def _grid(densities: Iterable[float], alphas: Iterable[float],
          budget: float | None) -> tuple[list[float], list[float], float | None]:
    from .compress import check_alpha, check_density

    ds = _check_list("densities", densities, check_density)
    alist = _check_list("alphas", alphas, check_alpha)
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not (
                math.isfinite(budget) and budget > 0):
            raise EncodeError(f"budget_bits_per_param must be a number > 0, got {budget!r}")
        budget = float(budget)
    return ds, alist, budget


def _check_score(value: Any, cand: Candidate) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TuneError(f"candidate {cand.label()}: the evaluation returned {value!r}, "
                        "not a number")
    score = float(value)
    if not math.isfinite(score):
        raise TuneError(f"candidate {cand.label()}: the evaluation returned {score!r}")
    return score


def _search(
    grid: Iterable[tuple[float, float]],
    *,
    scale: str,
    scope: str,
    budget: float | None,
    measure: Callable[[float, float], tuple[int, int, Any]],
    evaluate: Callable[[Any, Candidate], Any],
    progress: Callable[[Candidate], Any] | None,
) -> tuple[list[Candidate], int, Any]:
    """Try every ``(density, alpha)``; return the candidates, the chosen index and its payload.

    ``measure(d, a)`` compresses and returns ``(file_bytes, numel, payload)``;
    ``evaluate(payload, candidate)`` returns the score. A candidate over the budget is not
    evaluated. Only the best payload so far is kept.
    """
    cands: list[Candidate] = []
    best_i, best_key, best_payload = -1, None, None
    for d, a in grid:
        size, numel, payload = measure(d, a)
        cand = Candidate(d, a, scale, scope, size, numel, None)
        if budget is not None and cand.bits_per_param > budget:
            cand = Candidate(d, a, scale, scope, size, numel, None, "over budget")
        else:
            cand = Candidate(d, a, scale, scope, size, numel,
                             _check_score(evaluate(payload, cand), cand))
            # ties: alpha 1 (the scale rule as it is, no tuning needed), then the smaller
            # file, then the earlier candidate
            key = (cand.score, a == 1.0, -size)
            if best_key is None or key > best_key:
                best_i, best_key, best_payload = len(cands), key, payload
        del payload
        cands.append(cand)
        if progress is not None:
            progress(cand)
    if best_i < 0:
        smallest = min(cands, key=lambda c: c.file_bytes)
        raise TuneError(f"no candidate fits the budget of {budget:g} bits per parameter; "
                        f"the smallest, {smallest.label()}, takes "
                        f"{smallest.bits_per_param:.4f}")
    return cands, best_i, best_payload


def tune(
    tensors: Mapping[str, Any],
    evaluate: Callable[[dict[str, Any]], float],
    *,
    base: Mapping[str, Any] | None = None,
    densities: Iterable[float] = (0.1,),
    alphas: Iterable[float] = DEFAULT_ALPHAS,
    scale: str = DEFAULT_SCALE,
    scope: str = "global",
    budget_bits_per_param: float | None = None,
    exclude: str | Iterable[str] = (),
    metadata: Mapping[str, Any] | Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
    positions: str = "auto",
    zstd_level: int | None = S.DEFAULT_ZSTD_LEVEL,
    progress: Callable[[Candidate], Any] | None = None,
) -> TuneResult:
    """Choose the density and alpha that score best on your own evaluation.

    Every ``(density, alpha)`` is compressed with
    :func:`~compeft_format.compress.compress`; its file size is counted (as in
    :func:`sweep`); if it fits the budget, the task vector is rebuilt and passed to
    ``evaluate``. The chosen setting is the one with the best score (within the budget);
    ties go to alpha 1, then to the smaller file, then to the earlier candidate.

    Parameters
    ----------
    tensors:
        The task vector (see :func:`~compeft_format.compress.compress`).
    evaluate:
        Called once per candidate with the rebuilt tensors, name -> numpy array (the
        decoded task vector; with ``base``, the full checkpoint ``base + task vector``,
        every base tensor, as :func:`~compeft_format.taskvec.apply_task_vector` returns
        it); returns a finite number, higher is better. Its exceptions propagate.
    base:
        The base checkpoint, or None.
    densities, alphas:
        The grid: every density with every alpha (``alphas`` multiplies ``scale``'s scale).
    scale, scope, exclude:
        As :func:`~compeft_format.compress.compress`.
    budget_bits_per_param:
        If given, candidates whose file takes more bits per parameter are not evaluated,
        and the choice is among the others.
    metadata, positions, zstd_level:
        The file the sizes are counted for, as in :func:`sweep`.
    progress:
        Called with each :class:`Candidate` when it is done.

    Returns
    -------
    TuneResult
        The chosen candidate, all candidates, and the chosen compressed tensors.

    Raises
    ------
    TuneError
        ``evaluate`` returned something that is not a finite number (the candidate is
        named); no candidate fits the budget.
    EncodeError
        A bad option.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> tv = {"w": rng.normal(size=200)}
    >>> target = 1.3 * compress(tv, density=0.1)["w"].to_numpy()  # a score peaked at 1.3
    >>> r = tune(tv, lambda t: -float(np.abs(t["w"] - target).sum()), alphas=[1.0, 1.3, 1.6])
    >>> r.best.alpha, [c.alpha for c in r.candidates]
    (1.3, [1.0, 1.3, 1.6])
    """
    ds, alist, budget = _grid(densities, alphas, budget_bits_per_param)
    scale = check_choice("scale", scale, SCALE_CHOICES)
    patterns = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    src = _Source(tensors, patterns)

    def measure(d: float, a: float) -> tuple[int, int, Any]:
        point, out = _measure(src, density=d, alpha=a, scope=scope, scale=scale,
                              metadata=metadata, positions=positions, zstd_level=zstd_level,
                              quality=False)
        return point.file_bytes, point.numel, out

    def run(out: dict[str, Any], cand: Candidate) -> Any:
        decoded = {n: v.to_numpy() if isinstance(v, TernaryTensor) else v
                   for n, v in out.items()}
        return evaluate(decoded if base is None else apply_task_vector(base, decoded))

    cands, best_i, best_out = _search(((d, a) for d in ds for a in alist), scale=scale,
                                      scope=scope, budget=budget, measure=measure,
                                      evaluate=run, progress=progress)
    return TuneResult(cands[best_i], tuple(cands), best_out, budget)


# ---------------------------------------------------------------------------------------------
# files (the ``compeft sweep`` and ``compeft tune`` commands)
# ---------------------------------------------------------------------------------------------
def sweep_file(
    src: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    densities: Iterable[float] = DEFAULT_DENSITIES,
    scales: Iterable[str] = SWEEP_SCALES,
    scope: str = "global",
    alpha: float = 1.0,
    exclude: str | Iterable[str] = (),
    positions: str = "auto",
    zstd_level: int | None = S.DEFAULT_ZSTD_LEVEL,
    progress: Callable[[SweepPoint], Any] | None = None,
) -> SweepResult:
    """:func:`sweep` over a safetensors file or PEFT adapter directory, as ``compeft compress``
    would compress it.

    The task vector, the tensors kept as they are and the file metadata are those of
    :func:`~compeft_format.convert.compress_file` with the same arguments, so each point's
    ``file_bytes`` is the size of the file that ``compress_file`` (``compeft compress``)
    writes for that setting; nothing is written.

    Examples
    --------
    >>> import os, tempfile, numpy as np
    >>> from compeft_format.convert import compress_file
    >>> from compeft_format.safetensors_io import save_safetensors
    >>> d = tempfile.mkdtemp()
    >>> path = os.path.join(d, "tv.safetensors")
    >>> save_safetensors({"w": np.random.default_rng(0).normal(size=(64, 64)).astype(
    ...     np.float32), "ids": np.arange(4)}, path)
    >>> p = sweep_file(path, densities=[0.1], scales=["l2"]).points[0]
    >>> s = compress_file(path, os.path.join(d, "tv.compeft"), density=0.1, scale="l2")
    >>> p.file_bytes == s.file_bytes, p.numel == s.numel, p.dense_bytes == s.dense_bytes
    (True, True, True)
    """
    from .plan import FileTaskVector, file_metadata, make_plan
    from .readers import open_weights
    from .sources import ADAPTER_WEIGHTS, base_weights, resolve_source

    patterns = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    if positions == "rice":
        positions = "golomb"
    source = resolve_source(src, ADAPTER_WEIGHTS, "sweep reads a PEFT adapter's safetensors")
    base_path = base_weights(base) if base is not None else None
    with contextlib.ExitStack() as stack:
        reader = stack.enter_context(open_weights(source.weights))
        base_reader = (stack.enter_context(open_weights(base_path))
                       if base_path is not None else None)
        plan = make_plan(source, reader, base_reader, base_path, patterns, False)
        tv = FileTaskVector(plan.compressible, reader, base_reader, source.peft_type)
        kept = set(plan.compressible)
        rest = [n for n in reader if n not in kept]
        passthrough = {n: functools.partial(reader.get, n) for n in rest}
        sizes = {n: (reader.info(n).numel, reader.info(n).nbytes) for n in rest}

        def metadata(comp: dict[str, Any]) -> dict[str, Any]:
            return file_metadata(plan, reader, comp, patterns)

        return _run_sweep(_Source(tv, (), passthrough, sizes), densities=densities,
                          scales=scales, scope=scope, alpha=alpha, metadata=metadata,
                          positions=positions, zstd_level=zstd_level, progress=progress)
    raise AssertionError("unreachable")  # pragma: no cover


#: The placeholder of ``compeft tune --eval`` replaced by the candidate checkpoint's path.
CHECKPOINT_PLACEHOLDER = "{checkpoint}"


def run_eval_command(command: str, checkpoint: str | os.PathLike, *, label: str = "",
                     timeout: float | None = None) -> float:
    """Run ``command`` with ``{checkpoint}`` replaced (shell-quoted); return its score.

    The score is the number that ends the last non-empty line of the command's standard
    output (``0.93``, ``accuracy 0.93``). The command runs through the shell.

    Raises
    ------
    TuneError
        The command fails (exit status not 0; the message holds the last line of its
        standard error), times out, prints nothing, or its last line does not end with a
        finite number. ``label`` (the candidate) starts the message.

    Examples
    --------
    >>> import sys
    >>> run_eval_command(f"{sys.executable} -c 'print(\\"loss 3\\"); print(0.5)' {{checkpoint}}",
    ...                  "/tmp/x")
    0.5
    """
    where = f"candidate {label}: " if label else ""
    cmd = command.replace(CHECKPOINT_PLACEHOLDER, shlex.quote(os.fspath(checkpoint)))
    try:
        proc = subprocess.run(cmd, shell=True, capture_output=True, stdin=subprocess.DEVNULL,
                              text=True, errors="replace", timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise TuneError(f"{where}the evaluation command timed out after {timeout:g} s") from None
    if proc.returncode != 0:
        err = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        tail = f": {err[-1][:300]}" if err else ""
        raise TuneError(f"{where}the evaluation command failed with exit status "
                        f"{proc.returncode}{tail}")
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    if not lines:
        raise TuneError(f"{where}the evaluation command printed nothing; its last line must "
                        "be the score")
    token = lines[-1].split()[-1]
    try:
        score = float(token)
    except ValueError:
        score = math.nan
    if not math.isfinite(score):
        raise TuneError(f"{where}the last line of the evaluation command's output, "
                        f"{lines[-1][:200]!r}, does not end with a finite number (the score)")
    return score


def tune_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    command: str,
    *,
    base: str | os.PathLike | None = None,
    densities: Iterable[float] = (0.1,),
    alphas: Iterable[float] = DEFAULT_ALPHAS,
    scale: str = DEFAULT_SCALE,
    scope: str = "global",
    budget_bits_per_param: float | None = None,
    exclude: str | Iterable[str] = (),
    positions: str = "auto",
    zstd_level: int | None = S.DEFAULT_ZSTD_LEVEL,
    force: bool = False,
    timeout: float | None = None,
    progress: Callable[[Candidate], Any] | None = None,
) -> tuple[TuneResult, Any]:
    """Tune density and alpha with an evaluation command; write the chosen setting to ``dst``.

    Each candidate is compressed with :func:`~compeft_format.convert.compress_file` and
    restored with :func:`~compeft_format.convert.decompress_file` (``base`` added, when
    given) into a temporary checkpoint, exactly as ``compeft compress`` then ``compeft
    decompress`` would: a safetensors file, or a PEFT adapter directory for an adapter.
    ``command`` runs on it (see :func:`run_eval_command`) and the temporary files are
    removed. The chosen setting is compressed to ``dst`` with the search recorded in the
    file metadata under ``"tuning"``. Sizes are those of the candidate files, without that
    record (a few hundred bytes).

    Returns
    -------
    (TuneResult, CompressSummary)
        The search (its ``compressed`` is empty) and the summary of the file written.

    Raises
    ------
    TuneError
        A failing evaluation (named), no candidate within the budget. Nothing is written.
    """
    from . import convert as C

    ds, alist, budget = _grid(densities, alphas, budget_bits_per_param)
    compression_metadata(ds[0], alist[0], scope,  # check the options first
                         resolve_scale(check_choice("scale", scale, SCALE_CHOICES), ds[0]))
    if CHECKPOINT_PLACEHOLDER not in command:
        raise EncodeError(f"the evaluation command must contain {CHECKPOINT_PLACEHOLDER}, "
                          "replaced by the candidate checkpoint's path")
    from .outputs import Output
    from .sources import ADAPTER_WEIGHTS, base_weights, resolve_source

    source = resolve_source(src, ADAPTER_WEIGHTS, "tune reads a PEFT adapter's safetensors")
    # the output is checked before any evaluation (compress_file checks it again at the end):
    # an output that cannot be written would lose the whole search
    base_path = base_weights(base) if base is not None else None
    Output(dst, is_dir=source.is_dir, force=force,
           inputs=[source.path, source.weights, *([Path(base), base_path] if base_path else [])])
    opts = {"scale": scale, "scope": scope, "exclude": exclude, "base": base,
            "positions": positions, "zstd_level": zstd_level}
    with tempfile.TemporaryDirectory(prefix="compeft-tune-") as tmp:
        packed = Path(tmp) / ("compressed" if source.is_dir else "candidate.compeft")
        ckpt = Path(tmp) / ("checkpoint" if source.is_dir else "checkpoint.safetensors")

        def measure(d: float, a: float) -> tuple[int, int, Any]:
            s = C.compress_file(src, packed, density=d, alpha=a, force=True, **opts)
            return s.file_bytes, s.numel, None

        def evaluate(_payload: Any, cand: Candidate) -> float:
            C.decompress_file(packed, ckpt, base=base, force=True)
            try:
                return run_eval_command(command, ckpt, label=cand.label(), timeout=timeout)
            finally:
                _remove(ckpt)

        cands, best_i, _ = _search(((d, a) for d in ds for a in alist), scale=scale,
                                   scope=scope, budget=budget, measure=measure,
                                   evaluate=evaluate, progress=progress)
    result = TuneResult(cands[best_i], tuple(cands), {}, budget)
    record = {**result.record(), "eval": command}
    summary = C.compress_file(src, dst, density=result.best.density, alpha=result.best.alpha,
                              force=force, extra_metadata={TUNING_METADATA_KEY: record}, **opts)
    return result, summary


#: File metadata key under which ``compeft tune`` records its search.
TUNING_METADATA_KEY = "tuning"


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
