"""How close a compressed task vector is to the original: relative L2 error and cosine.

:func:`quality_report` compares, per tensor and overall, the dense task vector ``t`` with
its compressed form ``t_hat`` (a :class:`TernaryTensor`, decoded as a decoder would, or a
dense tensor kept lossless by ``exclude``):

* relative error ``||t - t_hat||_2 / ||t||_2`` (0 when both are zero; infinite when only
  ``t`` is zero);
* cosine similarity ``<t, t_hat> / (||t|| ||t_hat||)`` (1.0 when both are zero, 0.0 when
  exactly one is).

Overall figures are those of the concatenation of all tensors, accumulated tensor by tensor
in float64 (nothing is concatenated).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import dtypes as _dt
from ._spec import TERNARY_DTYPES
from .errors import EncodeError
from .tensor import TernaryTensor

__all__ = ["QualityReport", "QualitySums", "TensorQuality", "measure_tensor", "quality_report"]

_CHUNK = 1 << 20


@dataclass(frozen=True)
class TensorQuality:
    """Quality figures of one tensor (or, in :attr:`QualityReport.overall`, of all).

    Attributes
    ----------
    name:
        Tensor name (``"(overall)"`` for the total).
    kind:
        ``"ternary"``, ``"dense"`` (kept lossless) or ``"all"``.
    numel:
        Number of elements.
    nnz:
        Nonzeros of the compressed form (ternary entries; a dense tensor counts its
        nonzero elements).
    norm:
        ``||t||_2`` of the original.
    rel_error:
        ``||t - t_hat|| / ||t||`` (``inf`` when ``t`` is zero and ``t_hat`` is not).
    cosine:
        Cosine similarity of ``t`` and ``t_hat``.

    Examples
    --------
    >>> import numpy as np
    >>> from compeft_format import compress
    >>> t = {"w": np.array([0.5, -0.25, 0.0, 0.01], np.float32)}
    >>> q = quality_report(t, compress(t, density=0.5, scale="std"))["w"]
    >>> q.kind, q.nnz, q.density, round(q.cosine, 4)
    ('ternary', 2, 0.5, 0.9485)
    """

    name: str
    kind: str
    numel: int
    nnz: int
    norm: float
    rel_error: float
    cosine: float

    @property
    def density(self) -> float:
        """``nnz / numel`` (0.0 without elements)."""
        return self.nnz / self.numel if self.numel else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict (a non-finite figure becomes None)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "numel": self.numel,
            "nnz": self.nnz,
            "density": self.density,
            "norm": _json_float(self.norm),
            "rel_error": _json_float(self.rel_error),
            "cosine": _json_float(self.cosine),
        }


@dataclass(frozen=True)
class QualityReport:
    """Per-tensor and overall quality of a compressed task vector.

    Examples
    --------
    >>> import numpy as np
    >>> from compeft_format import TernaryTensor
    >>> t = {"w": np.array([3.0, -4.0, 0.0])}
    >>> r = quality_report(t, {"w": TernaryTensor((3,), [1], [True], 4.0, "F64")})
    >>> round(r.overall.rel_error, 6), round(r.overall.cosine, 6)
    (0.6, 0.8)
    >>> print(r.format_table())
    tensor     kind     numel  nnz  density  rel_error    cosine
    w          ternary      3    1   0.3333   0.600000  0.800000
    (overall)  all          3    1   0.3333   0.600000  0.800000
    """

    tensors: tuple[TensorQuality, ...]
    overall: TensorQuality

    def __getitem__(self, name: str) -> TensorQuality:
        for q in self.tensors:
            if q.name == name:
                return q
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict: ``{"overall": {...}, "tensors": [{...}, ...]}``."""
        return {
            "overall": self.overall.to_dict(),
            "tensors": [q.to_dict() for q in self.tensors],
        }

    def format_table(self) -> str:
        """Return a plain-text table, one row per tensor and a last ``(overall)`` row."""
        header = ("tensor", "kind", "numel", "nnz", "density", "rel_error", "cosine")
        rows = [
            (
                q.name,
                q.kind,
                str(q.numel),
                str(q.nnz),
                f"{q.density:.4f}",
                f"{q.rel_error:.6f}",
                f"{q.cosine:.6f}",
            )
            for q in (*self.tensors, self.overall)
        ]
        widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
        lines = []
        for r in (header, *rows):
            cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
            cells += [c.rjust(w) for c, w in zip(r[2:], widths[2:], strict=True)]
            lines.append("  ".join(cells).rstrip())
        return "\n".join(lines)


def quality_report(original: Mapping[str, Any], compressed: Mapping[str, Any]) -> QualityReport:
    """Compare a task vector with its compressed form, per tensor and overall.

    Parameters
    ----------
    original:
        name -> dense task vector (numpy array or torch tensor, any float dtype; e.g. a
        :class:`~compeft_format.taskvec.TaskVector`). May be lazy: read one name at a time.
    compressed:
        name -> :class:`TernaryTensor` or a dense tensor (an excluded, lossless one), as
        :func:`~compeft_format.compress` returns. Must have the same names and shapes.

    Returns
    -------
    QualityReport
        Tensors in ``compressed``'s order, plus the overall figures.

    Raises
    ------
    EncodeError
        Names missing on either side, a shape mismatch or a non-float tensor (named).

    Examples
    --------
    >>> import numpy as np
    >>> from compeft_format.compress import compress
    >>> tv = {"a": np.array([1.0, -2.0, 0.5, 0.0])}
    >>> report = quality_report(tv, compress(tv, density=0.5))
    >>> round(report["a"].cosine, 4), report["a"].nnz
    (0.9258, 2)
    """
    missing = [n for n in compressed if n not in original]
    extra = [n for n in original if n not in compressed]
    if missing or extra:
        raise EncodeError(
            f"the names differ: {len(missing)} compressed tensors missing from the original "
            f"{missing[:5]}, {len(extra)} original tensors not compressed {extra[:5]}",
            tensor=(missing or extra)[0],
        )
    per: list[TensorQuality] = []
    total = QualitySums()
    for name in compressed:
        kind, sums = measure_tensor(name, original[name], compressed[name])
        per.append(sums.quality(name, kind))
        total.add(sums)
    return QualityReport(tuple(per), total.quality("(overall)", "all"))


# ---------------------------------------------------------------------------------------------
class QualitySums:
    """Float64 sums: ||t||^2, ||t_hat||^2, <t, t_hat>, ||t - t_hat||^2, numel, nnz.

    What :func:`measure_tensor` returns; sums of slices or tensors add up (:meth:`add`), so a
    converter can measure a tensor a slice at a time and a model a tensor at a time.

    >>> import numpy as np
    >>> total = QualitySums()
    >>> total.add(measure_tensor("w", np.array([3.0, 4.0]), np.array([3.0, 0.0]))[1])
    >>> round(total.quality("w", "dense").cosine, 3)
    0.6
    """

    def __init__(self) -> None:
        self.tt = self.hh = self.th = self.ee = 0.0
        self.numel = self.nnz = 0

    def add(self, other: QualitySums) -> None:
        """Add the sums of another slice or tensor."""
        self.tt += other.tt
        self.hh += other.hh
        self.th += other.th
        self.ee += other.ee
        self.numel += other.numel
        self.nnz += other.nnz

    def quality(self, name: str, kind: str) -> TensorQuality:
        """The :class:`TensorQuality` of these sums, named ``name`` of kind ``kind``."""
        if self.tt > 0:
            rel = math.sqrt(max(self.ee, 0.0) / self.tt)
        else:
            rel = 0.0 if self.hh == 0 else math.inf
        if self.tt > 0 and self.hh > 0:
            cos = max(-1.0, min(1.0, self.th / math.sqrt(self.tt * self.hh)))
        else:
            cos = 1.0 if self.tt == 0 and self.hh == 0 else 0.0
        return TensorQuality(name, kind, self.numel, self.nnz, math.sqrt(self.tt), rel, cos)


def _float_flat(name: str, value: Any, what: str) -> tuple[np.ndarray, str, tuple[int, ...]]:
    try:
        store, dname = _dt.to_storage(value)
    except EncodeError as exc:
        raise EncodeError(exc.message, tensor=name) from None
    if dname not in TERNARY_DTYPES:
        raise EncodeError(f"{what} has dtype {dname}; need a float tensor", tensor=name)
    return store.reshape(-1), dname, tuple(store.shape)


def measure_tensor(name: str, orig: Any, comp: Any) -> tuple[str, QualitySums]:
    """``(kind, sums)`` of the original tensor ``orig`` against its compressed ``comp``
    (a :class:`~compeft_format.tensor.TernaryTensor`, kind ``"ternary"``, or an array,
    ``"dense"``); shapes must match (:class:`EncodeError` naming ``name``).

    >>> import numpy as np
    >>> kind, sums = measure_tensor("w", np.array([1.0, -2.0]), np.array([0.0, -2.0]))
    >>> kind, sums.tt, sums.th, sums.ee
    ('dense', 5.0, 4.0, 1.0)
    """
    flat, dname, shape = _float_flat(name, orig, "the original")
    sums = QualitySums()
    sums.numel = flat.size
    for start in range(0, flat.size, _CHUNK):
        c = _dt.to_numpy_values(flat[start : start + _CHUNK], dname).astype(np.float64)
        sums.tt += float(np.dot(c, c))
    if not math.isfinite(sums.tt):  # every figure would be nan, or a wrong 1.0
        raise EncodeError("the original holds NaN or infinity (or values whose squares "
                          "overflow float64)", tensor=name)
    if isinstance(comp, TernaryTensor):
        if comp.shape != shape:
            raise EncodeError(
                f"compressed shape {comp.shape} does not match the original's {shape}",
                tensor=name,
            )
        _ternary_sums(sums, flat, dname, comp)
        return "ternary", sums
    cflat, cname, cshape = _float_flat(name, comp, "the compressed tensor")
    if cshape != shape:
        raise EncodeError(
            f"compressed shape {cshape} does not match the original's {shape}", tensor=name
        )
    for start in range(0, flat.size, _CHUNK):
        a = _dt.to_numpy_values(flat[start : start + _CHUNK], dname).astype(np.float64)
        b = _dt.to_numpy_values(cflat[start : start + _CHUNK], cname).astype(np.float64)
        sums.hh += float(np.dot(b, b))
        sums.th += float(np.dot(a, b))
        a -= b
        sums.ee += float(np.dot(a, a))
        sums.nnz += int(np.count_nonzero(b))
    return "dense", sums


def _ternary_sums(sums: QualitySums, flat: np.ndarray, dname: str, comp: TernaryTensor) -> None:
    """Sparse sums: only the kept positions differ from ``t`` minus the dropped part."""
    sums.nnz = comp.nnz
    if not comp.nnz:
        sums.ee = sums.tt
        return
    # the magnitude a decoder writes (the scale rounded to the tensor's dtype)
    value = float(TernaryTensor((1,), [0], [False], comp.scale, comp.dtype).to_numpy()[0])
    kept = _dt.to_numpy_values(flat[comp.indices], dname).astype(np.float64)
    hat = np.where(comp.signs, -value, value)
    sums.hh = comp.nnz * value * value
    sums.th = float(np.dot(kept, hat))
    dropped = sums.tt - float(np.dot(kept, kept))  # energy of the entries set to zero
    diff = kept - hat
    sums.ee = max(dropped, 0.0) + float(np.dot(diff, diff))


def _json_float(x: float) -> float | None:
    return x if math.isfinite(x) else None
