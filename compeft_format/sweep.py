"""Sweeping the settings: what each density and scale rule would make of a task vector.

:func:`sweep` compresses a task vector at every density and scale rule asked for and reports,
for each setting, the size of the file it would make (bytes, bits per parameter, ratio
against the dense tensors) and its quality (relative L2 error and cosine against the exact
task vector, per tensor and overall). Nothing is written: the bytes go through a
:class:`~compeft_format.container.Writer` into a sink that only counts them
(:func:`count_file_bytes`), so the sizes are those of
:func:`~compeft_format.container.save_file` with the same metadata. :func:`sweep_file` does
it for a file or adapter directory, as ``compeft compress`` would compress it.

The quality a sweep reports is measured on the parameters. It is not the quality of the
rebuilt model: ``"l2"`` minimises the parameter error by construction, while the default
``"proj_vcap"`` overshoots on purpose and rebuilds the model more faithfully (see
:func:`~compeft_format.compress.compress` for the measurements). To judge a model, tune
against an evaluation of the model (:mod:`compeft_format.tuning`, which measures each of its
candidates with :func:`measure_setting`).

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
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import _spec as S
from . import dtypes as _dt
from .compress import (
    COMPRESSION_METADATA_KEY,
    SCALE_CHOICES,
    SWEEP_SCALES,
    check_choice,
    compress,
    compression_metadata,
)
from .container import Writer, file_alignment
from .errors import CompeftError, EncodeError
from .quality import QualityReport, quality_report
from .scales import resolve_scale
from .tensor import TernaryTensor

__all__ = [
    "DEFAULT_DENSITIES",
    "SweepPoint",
    "SweepResult",
    "SweepSource",
    "check_list",
    "count_file_bytes",
    "measure_setting",
    "sweep",
    "sweep_file",
    "text_table",
]

#: Densities a sweep tries when none are given.
DEFAULT_DENSITIES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3)


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
    alignment: int = 1 << S.DEFAULT_ALIGNMENT_LOG2,
) -> tuple[int, dict[str, int]]:
    """Return the size of the file these records make, and each record's size, writing nothing.

    Parameters
    ----------
    items:
        ``(name, value, dtype)`` in record order (increasing UTF-8 bytes): a
        :class:`~compeft_format.TernaryTensor` or a dense array, and the dtype name of a dense
        storage array whose numpy dtype cannot say it (else None), as ``Writer.write`` takes.
    metadata, positions, zstd_level, alignment:
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
    (True, {'a': 1})
    """
    sink = _CountingSink()
    with Writer(sink, metadata=metadata, positions=positions,  # type: ignore[arg-type]
                zstd_level=zstd_level, alignment=alignment) as w:
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
        l2      0.1000  1.000  100    152      1.2160   52.6   0.853961  0.520337
        """
        header = ("scale", "density", "alpha", "nnz", "bytes", "bits/param", "ratio",
                  "rel_error", "cosine")
        rows = [
            (p.scale, f"{p.density:.4f}", f"{p.alpha:.3f}", f"{p.nnz:,}", f"{p.file_bytes:,}",
             f"{p.bits_per_param:.4f}", f"{p.ratio:.1f}", f"{p.quality.overall.rel_error:.6f}",
             f"{p.quality.overall.cosine:.6f}")
            for p in self.points
        ]
        return text_table(header, rows)

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


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned.

    >>> print(text_table(["scale", "bytes"], [["l2", "1,024"], ["proj_vcap", "980"]]))
    scale      bytes
    l2         1,024
    proj_vcap    980
    """
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = []
    for r in (header, *rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:],
                                                                    strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def check_list(what: str, values: Iterable[Any], check: Callable[[Any], Any]) -> list[Any]:
    """``check(v)`` of every value, in order; an empty list is an EncodeError naming ``what``.

    >>> check_list("densities", [0.1, "0.2"], float)
    [0.1, 0.2]
    """
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
class SweepSource:
    """What a sweep or a search compresses: a task vector, plus records passed through.

    ``passthrough`` maps the name of every record written as it is (besides the compressed
    ones and their excluded values) to a function returning ``(value, dtype)``, and
    ``passthrough_sizes`` to its ``(numel, dense bytes)``.
    """

    tensors: Mapping[str, Any]
    exclude: tuple[str, ...] = ()
    passthrough: Mapping[str, Callable[[], tuple[Any, str | None]]] = field(default_factory=dict)
    passthrough_sizes: Mapping[str, tuple[int, int]] = field(default_factory=dict)


def measure_setting(
    src: SweepSource,
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
    """Compress one setting in memory; return its point and the compressed tensors.

    >>> import numpy as np
    >>> src = SweepSource({"w": np.linspace(-1, 1, 1000, dtype=np.float32)})
    >>> point, out = measure_setting(src, density=0.1, alpha=1.0, scope="global",
    ...                              scale="proj_vcap", metadata=None, positions="auto",
    ...                              zstd_level=3)
    >>> point.nnz, out["w"].nnz, point.file_bytes > 0
    (100, 100, True)
    """
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

    # as compress_file writes it: alignment 1 unless a tensor stays dense (Appendix D 2)
    dense = any(not isinstance(out.get(n), TernaryTensor) for n in names)
    size, records = count_file_bytes(items(), metadata=_compression_record(metadata, comp_meta),
                                     positions=positions, zstd_level=zstd_level,
                                     alignment=file_alignment(dense))
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


def _run_sweep(src: SweepSource, *, densities: Iterable[float], scales: Iterable[str],
               scope: str, alpha: float, metadata: Any, positions: str,
               zstd_level: int | None, progress: Callable[[SweepPoint], Any] | None
               ) -> SweepResult:
    from .compress import check_alpha, check_density

    ds = check_list("densities", densities, check_density)
    ss = check_list("scales", scales, lambda s: check_choice("scale", s, SCALE_CHOICES))
    alpha = check_alpha(alpha)
    points = []
    for scale in ss:
        for d in ds:
            point, _ = measure_setting(src, density=d, alpha=alpha, scope=scope, scale=scale,
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
    >>> out = compress(tv, density=0.1, scale="norm")  # as compress_file writes it (alignment 1)
    >>> p.file_bytes == len(dumps(out, metadata=meta, alignment=1))
    True
    """
    patterns = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    src = SweepSource(tensors, patterns)
    return _run_sweep(src, densities=densities, scales=scales, scope=scope, alpha=alpha,
                      metadata=metadata, positions=positions, zstd_level=zstd_level,
                      progress=progress)



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

        return _run_sweep(SweepSource(tv, (), passthrough, sizes), densities=densities,
                          scales=scales, scope=scope, alpha=alpha, metadata=metadata,
                          positions=positions, zstd_level=zstd_level, progress=progress)
    raise AssertionError("unreachable")  # pragma: no cover

