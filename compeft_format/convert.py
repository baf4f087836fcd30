"""Converters: safetensors files and PEFT adapter directories to compeft files, and back.

:func:`compress_file` measures a task vector, compresses it with
:func:`~compeft_format.compress.compress` and writes a compeft file; :func:`decompress_file`
writes it back as safetensors, with the original names, shapes and dtypes. Both go tensor by
tensor over memory-mapped inputs (:mod:`compeft_format.safetensors_io`), so a model is never
held in memory: a compress holds the compressed tensors plus about one input tensor; a
decompress holds one compressed tensor and a few MiB of output at a time.

Inputs and outputs
------------------
* A ``.safetensors`` file <-> a ``.compeft`` file.
* A PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) <-> a
  directory holding the copied ``adapter_config.json`` and ``adapter_model.compeft``.

What the task vector is measured from (metadata key ``task_vector``)
---------------------------------------------------------------------
``{"reference": ..., "delta": [names], "peft_type": ..., "exclude": [patterns]}`` with

* ``"zero"``: the tensors are stored as they are: a LoRA adapter (``B`` starts at zero; as in
  the ComPEFT paper, ``A`` is taken as is too), or a file that already is a task vector.
* ``"one"``: an (IA)^3 adapter; the names in ``"delta"`` (its scaling vectors, which start at
  one) are stored minus one, and :func:`decompress_file` adds the one back.
* ``"checkpoint"``: the names in ``"delta"`` are stored as ``tensor - base[name]``, measured
  from a base checkpoint or an adapter's saved initial state (``base=``/``--base``).

``"peft_type"`` names an adapter's type. Tensors not in ``"delta"`` are stored as they are:
non-float tensors, the ``exclude`` patterns (dense records, lossless), and tensors the base
does not have. The spec's own key ``compeft.base`` (spec 5.2.1) names the base: for a
checkpoint, ``{"name": its file or directory name, "hashes": {tensor: "sha256:<hex>"}}`` over
*every* base tensor's raw bytes, so that :func:`decompress_file` refuses a base with other
names, shapes, dtypes or contents; for an adapter, ``{"name": base_model_name_or_path}``.
(``task_vector`` is not a ``compeft.`` key: the spec reserves those.)
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from . import _spec as S
from . import dtypes as _dt
from .compress import DEFAULT_SCALE, compression_metadata, iter_compress
from .container import POSITIONS_CHOICES, Writer, open_file
from .errors import CompeftError, CorruptDataError, EncodeError
from .quality import QualityReport, _measure, _Sums  # its sums, added up slice by slice
from .safetensors_io import SafetensorsReader, SafetensorsWriter
from .taskvec import PEFT_TYPES, _round_sum, peft_task_vector
from .tensor import TernaryTensor

__all__ = [
    "DEFAULT_DENSITY",
    "CompressSummary",
    "ConvertError",
    "DecompressSummary",
    "compress_file",
    "decompress_file",
]

#: The density used when none is given: keep the top 10% of the entries.
DEFAULT_DENSITY = 0.1
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_COMPEFT = "adapter_model.compeft"
#: Metadata key holding the source's safetensors ``__metadata__`` (restored on decompress).
META_SAFETENSORS = "safetensors.metadata"
#: Metadata key recording what the task vector is measured from (see the module doc).
META_TASK_VECTOR = "task_vector"
REFERENCES = ("zero", "one", "checkpoint")
OUTPUT_DTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
_CHUNK = 1 << 20  # elements per chunk of a tensor being decoded, added or converted
_QUALITY_SLICE = 1 << 23  # elements per slice of the quality figures (temporaries ~30 B each)


class ConvertError(CompeftError, ValueError):
    """An input or output of a conversion cannot be used.

    A directory that is not a PEFT adapter, a base that does not match the one the task
    vector was measured from, an output that exists, a file that needs ``base``...
    """


# ---------------------------------------------------------------------------------------------
# summaries
# ---------------------------------------------------------------------------------------------
def _int(n: int) -> str:
    return f"{n:,}"


@dataclass(frozen=True)
class CompressSummary:
    """What :func:`compress_file` did; :meth:`format` is the command's printout.

    Attributes
    ----------
    source, output:
        The paths given.
    file:
        The compeft file written (``output`` itself, or the ``.compeft`` inside it).
    tensors, ternary, dense:
        Tensors written, of which compressed (ternary) and kept dense (lossless).
    numel:
        Elements of all tensors.
    compressed_numel, nnz:
        Elements of the ternary tensors, and how many of them are nonzero.
    density:
        The density asked for.
    dense_bytes:
        Bytes of all tensors stored dense in their dtypes (the safetensors data).
    file_bytes:
        Bytes of the compeft file.
    reference:
        What the task vector is measured from: ``"zero"``, ``"one"`` or ``"checkpoint"``.
    quality:
        Relative error and cosine of the compressed task vector, per ternary tensor.
    base_name:
        The name recorded for a base checkpoint (its file or directory name), or None.
    """

    source: str
    output: str
    file: str
    tensors: int
    ternary: int
    dense: int
    numel: int
    compressed_numel: int
    nnz: int
    density: float
    dense_bytes: int
    file_bytes: int
    reference: str
    quality: QualityReport = field(repr=False)
    base_name: str | None = None

    @property
    def kept_density(self) -> float:
        """``nnz / compressed_numel``: the density reached."""
        return self.nnz / self.compressed_numel if self.compressed_numel else 0.0

    @property
    def ratio(self) -> float:
        """Dense size over file size."""
        return self.dense_bytes / self.file_bytes if self.file_bytes else 0.0

    @property
    def bits_per_param(self) -> float:
        """File bits per element, everything included."""
        return 8 * self.file_bytes / self.numel if self.numel else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict."""
        return {
            "source": self.source, "output": self.output, "file": self.file,
            "tensors": self.tensors, "ternary": self.ternary, "dense": self.dense,
            "numel": self.numel, "compressed_numel": self.compressed_numel, "nnz": self.nnz,
            "density": self.density, "kept_density": self.kept_density,
            "dense_bytes": self.dense_bytes, "file_bytes": self.file_bytes, "ratio": self.ratio,
            "bits_per_param": self.bits_per_param, "reference": self.reference,
            "base_name": self.base_name, "quality": self.quality.to_dict(),
        }

    def format(self, *, verbose: bool = False) -> str:
        """Return the summary as text; ``verbose`` adds the per-tensor quality table."""
        q = self.quality.overall
        lines = [
            f"compressed {self.source} -> {self.output}",
            f"  tensors       {self.tensors} ({self.ternary} ternary, {self.dense} dense)",
            f"  measured from {self.reference}"
            + (f" {self.base_name!r} (sha256 of its tensors recorded)" if self.base_name else ""),
            f"  density       {self.kept_density:.4f} ({_int(self.nnz)} of "
            f"{_int(self.compressed_numel)} entries kept; asked {self.density:g})",
            f"  dense size    {_int(self.dense_bytes)} bytes",
            f"  compressed    {_int(self.file_bytes)} bytes",
            f"  ratio         {self.ratio:.1f}x",
            f"  bits/param    {self.bits_per_param:.3f}",
            f"  quality       rel. error {q.rel_error:.4f}, cosine {q.cosine:.4f} "
            "(compressed task vector against the exact one)",
        ]
        if verbose and self.quality.tensors:
            lines += ["", self.quality.format_table()]
        return "\n".join(lines)


@dataclass(frozen=True)
class DecompressSummary:
    """What :func:`decompress_file` did; :meth:`format` is the command's printout."""

    source: str
    output: str
    file: str  #: the safetensors file written
    tensors: int
    numel: int
    file_bytes: int
    reference: str
    base: str | None
    dtype: str | None  #: the ``dtype`` asked for, or None (original dtypes)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict."""
        return dict(self.__dict__)

    def format(self) -> str:
        """Return the summary as text."""
        lines = [
            f"decompressed {self.source} -> {self.output}",
            f"  tensors       {self.tensors} ({_int(self.numel)} parameters)",
            f"  size          {_int(self.file_bytes)} bytes",
            f"  dtypes        {self.dtype or 'original'}",
        ]
        if self.base is not None:
            lines.append(f"  base          {self.base} added (full tensors written)")
        elif self.reference == "one":
            lines.append("  base          one added to the (IA)^3 vectors")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# inputs and outputs
# ---------------------------------------------------------------------------------------------
@dataclass
class _Source:
    """A resolved input: a file, or the weights file and config of an adapter directory."""

    path: Path  # what the user gave
    weights: Path  # the tensor file
    config: Path | None = None  # adapter_config.json of a directory
    peft_type: str | None = None
    base_model: str | None = None  # an adapter's base_model_name_or_path

    @property
    def is_dir(self) -> bool:
        return self.config is not None


def _resolve(path: str | os.PathLike, weights_name: str, what: str) -> _Source:
    """Resolve a file, or an adapter directory holding ``weights_name`` and its config."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(2, "No such file or directory", str(p))
    if not p.is_dir():
        return _Source(p, p)
    config = p / ADAPTER_CONFIG
    if not config.is_file():
        raise ConvertError(f"{p}: not a PEFT adapter directory: {ADAPTER_CONFIG} is missing")
    weights = p / weights_name
    if not weights.is_file():
        other = [n for n in ("adapter_model.bin", ADAPTER_WEIGHTS, ADAPTER_COMPEFT)
                 if n != weights_name and (p / n).is_file()]
        hint = f" (it has {other[0]})" if other else ""
        raise ConvertError(f"{p}: {weights_name} is missing{hint}; {what}")
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConvertError(f"{config}: not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise ConvertError(f"{config}: not a JSON object")
    peft_type = cfg.get("peft_type")
    if not isinstance(peft_type, str):
        raise ConvertError(f"{config}: no peft_type string")
    base_model = cfg.get("base_model_name_or_path")
    return _Source(p, weights, config, peft_type,
                   base_model if isinstance(base_model, str) and base_model else None)


def _base_weights(base: str | os.PathLike) -> Path:
    """The tensor file of a base: a safetensors file, or an adapter directory's weights."""
    p = Path(base)
    if p.is_dir():
        w = p / ADAPTER_WEIGHTS
        if not w.is_file():
            raise ConvertError(f"{p}: the base directory has no {ADAPTER_WEIGHTS}")
        return w
    if not p.exists():
        raise FileNotFoundError(2, "No such file or directory", str(p))
    return p


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


class _Output:
    """An output written atomically: a temporary file or directory beside it, then a rename.

    Refuses an output that is an input, and an existing one unless ``force``. On any error
    the temporary is removed, so nothing partial is ever left behind.
    """

    def __init__(self, dst: str | os.PathLike, *, is_dir: bool, force: bool,
                 inputs: Iterable[Path]) -> None:
        self.dst = Path(dst)
        self.is_dir = is_dir
        self.force = force
        for p in inputs:
            if _same(self.dst, p):
                raise ConvertError(f"{self.dst}: the output is an input ({p}); "
                                   "an input is never overwritten")
        self._check_free()
        parent = self.dst.parent
        if not parent.is_dir():
            raise ConvertError(f"{self.dst}: cannot write there: {parent} is not a directory")
        self.tmp: Path | None = None

    def _check_free(self) -> None:
        if self.dst.exists() or self.dst.is_symlink():
            if not self.force:
                raise ConvertError(f"{self.dst}: the output exists; use --force (force=True) "
                                   "to replace it")
            if self.dst.is_dir() != self.is_dir:
                want = "directory" if self.is_dir else "file"
                raise ConvertError(f"{self.dst}: exists and is not a {want}; not replaced")

    def __enter__(self) -> _Output:
        prefix = f".{self.dst.name}."
        if self.is_dir:
            self.tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=self.dst.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=self.dst.parent)
            os.close(fd)
            self.tmp = Path(name)
        # mkstemp/mkdtemp make private (0600/0700) entries; an output gets the usual mode
        mask = os.umask(0)
        os.umask(mask)
        self.tmp.chmod((0o777 if self.is_dir else 0o666) & ~mask)
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is None:
            self._commit()
        else:
            self._discard()

    def _discard(self) -> None:
        if self.tmp is None:
            return
        with contextlib.suppress(OSError):
            if self.tmp.is_dir():
                shutil.rmtree(self.tmp)
            else:
                self.tmp.unlink()
        self.tmp = None

    def _commit(self) -> None:
        assert self.tmp is not None
        try:
            self._check_free()  # again: it may have appeared meanwhile
            if not self.is_dir:
                os.replace(self.tmp, self.dst)
            elif self.dst.exists():  # force: swap the old directory out, then remove it
                trash = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.", suffix=".old",
                                              dir=self.dst.parent))
                os.replace(self.dst, trash / "old")
                os.replace(self.tmp, self.dst)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(self.tmp, self.dst)
        except BaseException:
            self._discard()
            raise
        self.tmp = None

    def file(self, name: str | None = None) -> Path:
        """The temporary path to write: the file itself, or ``name`` in the directory."""
        assert self.tmp is not None
        return self.tmp / name if name is not None else self.tmp


def _write_fsync(path: Path, write: Callable[[BinaryIO], None]) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------
class _Bar:
    """A tqdm bar on stderr when enabled, else nothing (tqdm is imported only then)."""

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

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# compress
# ---------------------------------------------------------------------------------------------
def _work(dtype: str) -> np.dtype:
    return np.dtype(np.float64 if dtype == "F64" else np.float32)


def _sha256(reader: SafetensorsReader, name: str) -> str:
    h = hashlib.sha256()
    raw = reader.raw(name)
    for start in range(0, len(raw), 1 << 24):
        h.update(raw[start : start + (1 << 24)])
    raw.release()
    reader.release(name)
    return "sha256:" + h.hexdigest()


class _TaskVector(Mapping):
    """The task vector of the compressible tensors, computed on access, one tensor at a time.

    ``compress`` and ``quality_report`` read it name by name; each access first drops the
    pages of the tensors read before from resident memory, so a pass over a model holds
    about one input tensor. ``.dtypes`` names the original dtypes (BF16 arrives widened).
    """

    def __init__(self, names: list[str], reader: SafetensorsReader,
                 base: SafetensorsReader | None, peft_type: str | None,
                 on_fetch: Callable[[str], Any] | None = None) -> None:
        self._names = names
        self._reader = reader
        self._base = base
        self._peft_type = peft_type
        self._on_fetch = on_fetch
        self.dtypes = {n: reader.info(n).dtype for n in names}

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self.dtypes

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.dtypes:
            raise KeyError(name)
        self._reader.release()
        if self._base is not None:
            self._base.release()
        if self._on_fetch is not None:
            self._on_fetch(name)
        storage, dtype = self._reader.get(name)
        if self._base is not None:
            return self._difference(name, storage, dtype)
        if self._peft_type is not None:  # taskvec's rules: LoRA from zero, (IA)^3 from one
            delta = peft_task_vector({name: _dt.to_numpy_values(storage, dtype)},
                                     self._peft_type)[name]
            self._reader.release(name)  # a copy: the mapped pages are not needed again
            return delta
        if dtype == "BF16":  # compress reads float arrays; BF16 widens exactly
            return self._widen(name, storage)
        return storage  # the mapped data itself: no copy

    def slices(self, name: str, size: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, values)``: the flat task vector of ``name``, ``size`` at a time.

        The same values as ``self[name]`` without ever holding the whole tensor (except for
        an adapter's, which is small).
        """
        if name not in self.dtypes:
            raise KeyError(name)
        self._reader.release()
        if self._base is not None:
            self._base.release()
        if self._peft_type is not None:
            whole = self[name].reshape(-1)
            for start in range(0, whole.size, size):
                yield start, whole[start : start + size]
            return
        storage, dtype = self._reader.get(name)
        flat = storage.reshape(-1)
        b_flat = self._base.get(name)[0].reshape(-1) if self._base is not None else None
        work = _work(dtype)
        for start in range(0, flat.size, size):
            values = _dt.to_numpy_values(flat[start : start + size], dtype)
            if b_flat is not None:
                values = values.astype(work) - _dt.to_numpy_values(
                    b_flat[start : start + size], dtype).astype(work, copy=False)
            yield start, values
            del values
            self._reader.release(name)
            if self._base is not None:
                self._base.release(name)

    def _widen(self, name: str, storage: np.ndarray) -> np.ndarray:
        """BF16 bits to float32, chunk by chunk into one array (widening it whole makes two
        temporaries of the float32 size), dropping the mapped pages as they are read."""
        flat = storage.reshape(-1)
        out = np.empty(flat.size, np.float32)
        for start in range(0, flat.size, _CHUNK):
            out[start : start + _CHUNK] = _dt.bf16_bits_to_f32(flat[start : start + _CHUNK])
            self._reader.release(name)
        return out.reshape(storage.shape)

    def _difference(self, name: str, storage: np.ndarray, dtype: str) -> np.ndarray:
        """``tensor - base`` in float32 (float64 for F64), chunk by chunk (as taskvec does)."""
        assert self._base is not None
        b_storage, _ = self._base.get(name)
        work = _work(dtype)
        flat, b_flat = storage.reshape(-1), b_storage.reshape(-1)
        out = np.empty(flat.size, work)
        for start in range(0, flat.size, _CHUNK):
            stop = start + _CHUNK
            a = _dt.to_numpy_values(flat[start:stop], dtype).astype(work, copy=False)
            b = _dt.to_numpy_values(b_flat[start:stop], dtype).astype(work, copy=False)
            np.subtract(a, b, out=out[start:stop])
            # the inputs are read once: drop their pages as we go, so that the two mapped
            # tensors do not stay resident beside the difference
            self._reader.release(name)
            self._base.release(name)
        return out.reshape(storage.shape)


def _quality(tv: _TaskVector, written: Any, names: list[str]) -> QualityReport:
    """``quality_report(tv, the ternary tensors of written)``, computed slice by slice.

    quality_report takes whole tensors and makes float64 temporaries of their kept entries;
    for a large tensor (a BF16 one is widened to float32 first) that is the peak of a
    compress. Here each tensor goes in slices of ``_QUALITY_SLICE`` elements through
    quality's own per-tensor sums, added up as quality_report adds tensors: the same figures.
    """
    per = []
    total = _Sums()
    for name in names:
        t = written.get(name)
        sums = _Sums()
        for start, values in tv.slices(name, _QUALITY_SLICE):
            stop = start + values.size
            lo, hi = np.searchsorted(t.indices, [start, stop])
            part = TernaryTensor((stop - start,), t.indices[lo:hi] - start, t.signs[lo:hi],
                                 t.scale, t.dtype, _validated=True)
            sums.add(_measure(name, values, part)[1])
        per.append(sums.quality(name, "ternary"))
        total.add(sums)
    return QualityReport(tuple(per), total.quality("(overall)", "all"))


@dataclass
class _Plan:
    """Which tensors are compressed, and the ``compeft.base`` metadata."""

    compressible: list[str]
    reference: dict[str, Any]  # the task_vector metadata
    base: dict[str, Any] | None = None  # the compeft.base metadata


def _plan(source: _Source, reader: SafetensorsReader, base: SafetensorsReader | None,
          base_path: Path | None, patterns: tuple[str, ...], bar_enabled: bool) -> _Plan:
    names = reader.keys()
    excluded = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}

    def is_float(n: str, r: SafetensorsReader = reader) -> bool:
        return r.info(n).dtype in S.TERNARY_DTYPES

    if base is None:
        compressible = [n for n in names if n not in excluded and is_float(n)]
        if source.peft_type is None:
            return _Plan(compressible, {"reference": "zero"})
        base_meta = {"name": source.base_model} if source.base_model else None
        if source.peft_type.upper() not in PEFT_TYPES:
            raise ConvertError(f"{source.config}: peft_type {source.peft_type!r} has no known "
                               f"initial value ({'/'.join(PEFT_TYPES)} do); give the initial "
                               "adapter with --base (base=)")
        # ask taskvec which tensors start at one: it holds the rules (and rejects what it
        # cannot measure, such as a DoRA magnitude, before any work is done)
        from_one = []
        for n in compressible:
            probe = peft_task_vector({n: np.zeros(1, np.float32)}, source.peft_type)[n]
            if probe[0] != 0:
                from_one.append(n)
        ref: dict[str, Any] = {"reference": "one" if from_one else "zero",
                               "peft_type": source.peft_type}
        if from_one:
            ref["delta"] = from_one
        return _Plan(compressible, ref, base_meta)

    assert base_path is not None
    base_names = set(base.keys())
    if source.is_dir:  # an adapter's initial state must have the very same tensors
        missing = [n for n in names if n not in base_names]
        extra = sorted(base_names - set(names))
        if missing or extra:
            raise ConvertError(f"{base_path}: the initial adapter does not match "
                               f"{source.weights}: {len(missing)} tensors missing {missing[:5]}, "
                               f"{len(extra)} not in the adapter {extra[:5]}")
    for n in names:
        if n in base_names:
            a, b = reader.info(n), base.info(n)
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ConvertError(f"{base_path}: {b.dtype}{list(b.shape)} in the base, "
                                   f"{a.dtype}{list(a.shape)} in {source.weights}",
                                   tensor=n)
    compressible = [n for n in names
                    if n in base_names and n not in excluded and is_float(n)]
    hashes = {}
    with _Bar(bar_enabled, len(base_names), "hash base") as bar:
        for n in base:
            hashes[n] = _sha256(base, n)
            bar.update()
    ref: dict[str, Any] = {"reference": "checkpoint", "delta": compressible}
    if source.peft_type is not None:
        ref["peft_type"] = source.peft_type
    name = base_path.parent.name if base_path.name == ADAPTER_WEIGHTS else base_path.name
    return _Plan(compressible, ref, {"name": name, "hashes": hashes})


def _file_metadata(plan: _Plan, reader: SafetensorsReader, comp_meta: dict[str, Any],
                   patterns: tuple[str, ...],
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The metadata :func:`compress_file` writes (``compeft sweep`` counts the same bytes)."""
    from . import __version__

    metadata: dict[str, Any] = {
        S.META_PRODUCER: f"compeft_format {__version__}",
        S.META_COMPRESSION: comp_meta,
        META_TASK_VECTOR: {**plan.reference, "exclude": list(patterns)},
    }
    if plan.base is not None:
        metadata[S.META_BASE] = plan.base
    if reader.metadata:
        metadata[META_SAFETENSORS] = dict(reader.metadata)
    for key, value in (extra or {}).items():
        if key in metadata or key in (S.META_BASE, META_SAFETENSORS) or key.startswith(
                S.META_RESERVED_PREFIX):
            raise EncodeError(f"extra metadata key {key!r} is written by compress_file itself "
                              "or reserved")
        metadata[key] = value
    return metadata


def compress_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    density: float = DEFAULT_DENSITY,
    alpha: float = 1.0,
    scope: str = "global",
    scale: str = DEFAULT_SCALE,
    exclude: str | Iterable[str] = (),
    base: str | os.PathLike | None = None,
    positions: str = "auto",
    zstd_level: int | None = S.DEFAULT_ZSTD_LEVEL,
    force: bool = False,
    progress: bool = False,
    extra_metadata: Mapping[str, Any] | None = None,
) -> CompressSummary:
    """Compress a safetensors file or a PEFT adapter directory to compeft.

    The task vector (see the module doc for what it is measured from) of every float tensor
    not excluded is compressed with :func:`~compeft_format.compress.compress` (top-k by
    magnitude, signs, one scale); the other tensors are stored dense, losslessly. The output
    is written atomically.

    Parameters
    ----------
    src:
        A ``.safetensors`` file, or a PEFT adapter directory (``adapter_config.json`` and
        ``adapter_model.safetensors``).
    dst:
        The compeft file to write; for an adapter directory, a directory that will hold the
        copied ``adapter_config.json`` and ``adapter_model.compeft``.
    density, alpha, scope, scale, exclude:
        As :func:`~compeft_format.compress.compress` (``exclude``: fnmatch patterns of names
        kept dense and lossless).
    base:
        The base checkpoint (a safetensors file) or initial adapter (a directory or its
        weights file) the task vector is measured from; its sha256 hashes are recorded.
    positions:
        ``"auto"``, ``"bitmask"`` or ``"golomb"`` (``"rice"`` is accepted for golomb).
    zstd_level:
        zstd level tried on every block, None for none.
    force:
        Replace an existing output (never an input).
    progress:
        Show progress bars on stderr.
    extra_metadata:
        More file metadata (e.g. ``{"tuning": ...}``, the search that ``compeft tune``
        records); keys that this function writes itself, or that start with ``compeft.``,
        are refused.

    Returns
    -------
    CompressSummary

    Raises
    ------
    CompeftError
        A bad option, input, base or output (:class:`ConvertError`, ``EncodeError``,
        ``FormatError`` of a bad safetensors file); nothing is written then.
    OSError
        A file that cannot be read or written.

    Examples
    --------
    >>> import os, tempfile, numpy as np
    >>> from compeft_format.safetensors_io import save_safetensors
    >>> d = tempfile.mkdtemp()
    >>> rng = np.random.default_rng(0)
    >>> save_safetensors({"w": rng.normal(size=(64, 64)).astype(np.float32),
    ...                   "ids": np.arange(4)}, os.path.join(d, "tv.safetensors"))
    >>> s = compress_file(os.path.join(d, "tv.safetensors"), os.path.join(d, "tv.compeft"),
    ...                   density=0.1)
    >>> s.ternary, s.dense, s.nnz, round(s.quality.overall.cosine, 2)
    (1, 1, 410, 0.65)
    """
    comp_meta = compression_metadata(density, alpha, scope, scale)  # checks them first
    positions = "golomb" if positions == "rice" else positions
    if positions not in POSITIONS_CHOICES:
        raise EncodeError(f"positions must be one of {POSITIONS_CHOICES} or 'rice', "
                          f"got {positions!r}")
    if zstd_level is not None and not (
            isinstance(zstd_level, int) and not isinstance(zstd_level, bool)
            and -7 <= zstd_level <= 22):
        raise EncodeError(f"zstd level must be an integer in [-7, 22], got {zstd_level!r}")
    patterns = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    source = _resolve(src, ADAPTER_WEIGHTS, "compress reads a PEFT adapter's safetensors")
    base_path = _base_weights(base) if base is not None else None
    inputs = [source.path, source.weights] + ([Path(base), base_path] if base_path else [])
    out = _Output(dst, is_dir=source.is_dir, force=force, inputs=inputs)

    with contextlib.ExitStack() as stack:
        reader = stack.enter_context(SafetensorsReader(source.weights))
        base_reader = (stack.enter_context(SafetensorsReader(base_path))
                       if base_path is not None else None)
        plan = _plan(source, reader, base_reader, base_path, patterns, progress)
        # compress reads each tensor three times (global scope; once per tensor scope; one
        # more for the scales that need the sum of the kept magnitudes), the quality once
        passes = (1 if scope == "tensor" else 3 if scale in ("norm", "std") else 4) + 1
        bar = stack.enter_context(_Bar(progress, passes * len(plan.compressible), "compress"))
        tv = _TaskVector(plan.compressible, reader, base_reader, source.peft_type, bar.update)
        # one tensor at a time, in the file's (sorted) order: nothing is held once written
        stream = iter_compress(tv, density=density, alpha=alpha, scope=scope, scale=scale)

        metadata = _file_metadata(plan, reader, comp_meta, patterns, extra_metadata)
        counts = {"nnz": 0, "cnumel": 0, "numel": 0, "dense_bytes": 0}
        # the file's record order; a name that is not UTF-8 is refused by the Writer
        names = sorted(reader.keys(), key=lambda n: n.encode("utf-8", "surrogatepass"))
        compressible = set(plan.compressible)

        def write(f: BinaryIO) -> None:
            with Writer(f, metadata=metadata, positions=positions, zstd_level=zstd_level) as w:
                for name in names:
                    info = reader.info(name)
                    counts["numel"] += info.numel
                    counts["dense_bytes"] += info.nbytes
                    if name in compressible:
                        got, t = next(stream)
                        if got != name:  # both walk the names in sorted order
                            raise AssertionError(f"compress yielded {got!r}, expected {name!r}")
                        # its input was read for the last time: drop those pages before
                        # the encoder's temporaries join them
                        reader.release()
                        if base_reader is not None:
                            base_reader.release()
                        counts["nnz"] += t.nnz
                        counts["cnumel"] += t.numel
                        w.write(name, t)
                        del t
                    else:
                        arr, dtype = reader.get(name)
                        w.write(name, arr, dtype=dtype)
                        del arr
                        reader.release(name)

        with out:
            target = out.file(ADAPTER_COMPEFT if source.is_dir else None)
            _write_fsync(target, write)
            # the quality of what was written, read back from it one tensor at a time
            with open_file(target) as written:
                quality = _quality(tv, written, plan.compressible)
            bar.close()
            if source.config is not None:
                shutil.copyfile(source.config, out.file(ADAPTER_CONFIG))
        reader.release()
        if base_reader is not None:
            base_reader.release()
        final = out.dst / ADAPTER_COMPEFT if source.is_dir else out.dst
        return CompressSummary(
            source=str(source.path), output=str(out.dst), file=str(final),
            tensors=len(names), ternary=len(plan.compressible),
            dense=len(names) - len(plan.compressible), numel=counts["numel"],
            compressed_numel=counts["cnumel"], nnz=counts["nnz"], density=float(density),
            dense_bytes=counts["dense_bytes"], file_bytes=final.stat().st_size,
            reference=plan.reference["reference"], quality=quality,
            base_name=plan.base["name"] if plan.reference["reference"] == "checkpoint"
            and plan.base else None)
    raise AssertionError("unreachable")  # pragma: no cover


# ---------------------------------------------------------------------------------------------
# decompress
# ---------------------------------------------------------------------------------------------
@dataclass
class _Reference:
    kind: str
    delta: set[str]
    name: str | None
    hashes: dict[str, str] | None
    peft_type: str | None


def _read_reference(meta: Mapping[str, Any], records: set[str], where: Path) -> _Reference:
    """Parse and check ``task_vector`` (and ``compeft.base``); absent: a task vector from zero."""
    ref = meta.get(META_TASK_VECTOR)
    base = meta.get(S.META_BASE)  # its types are checked by the reader (spec 5.2.1)
    base = base if isinstance(base, dict) else {}
    if ref is None:
        return _Reference("zero", set(), None, None, None)

    def bad(message: str) -> CorruptDataError:
        return CorruptDataError(f"{where}: metadata {META_TASK_VECTOR!r}: {message}")

    if not isinstance(ref, dict):
        raise bad("must be an object")
    kind = ref.get("reference")
    if kind not in REFERENCES:
        raise bad(f"reference must be one of {REFERENCES}, got {kind!r}")
    delta = ref.get("delta", [])
    if not isinstance(delta, list) or not all(isinstance(n, str) for n in delta):
        raise bad("delta must be a list of tensor names")
    unknown = [n for n in delta if n not in records]
    if unknown:
        raise bad(f"delta names {len(unknown)} tensors the file does not hold: {unknown[:5]}")
    hashes = base.get("hashes")
    if kind == "checkpoint" and not isinstance(hashes, dict):
        raise CorruptDataError(f"{where}: a task vector measured from a checkpoint needs the "
                               f"base's hashes in metadata {S.META_BASE!r}")
    name = base.get("name")
    peft_type = ref.get("peft_type")
    return _Reference(kind, set(delta), name if isinstance(name, str) else None,
                      hashes if kind == "checkpoint" else None,
                      peft_type if isinstance(peft_type, str) else None)


def _check_base(ref: _Reference, base: SafetensorsReader, infos: Mapping[str, Any],
                bar_enabled: bool) -> None:
    """Refuse a base other than the recorded one: names, then shapes and dtypes, then bytes."""
    where = base.path
    label = f" {ref.name!r}" if ref.name else ""
    if ref.kind == "checkpoint":
        assert ref.hashes is not None
        recorded, have = set(ref.hashes), set(base.keys())
        missing, extra = sorted(recorded - have), sorted(have - recorded)
        if missing or extra:
            raise ConvertError(
                f"{where}: not the base{label} the task vector was measured from: "
                f"{len(missing)} of its tensors missing {missing[:3]}, {len(extra)} others "
                f"{extra[:3]}")
        needed = ref.delta
    else:  # a task vector from zero added to a base: every record must be in it
        missing = sorted(n for n in infos if n not in base)
        if missing:
            raise ConvertError(f"{where}: the base lacks {len(missing)} tensors of the task "
                               f"vector: {missing[:5]}")
        needed = set(infos)
    for n in sorted(needed):
        b, t = base.info(n), infos[n]
        if tuple(b.shape) != tuple(t.shape) or b.dtype != t.dtype:
            raise ConvertError(f"{where}: {b.dtype}{list(b.shape)} in the base, "
                               f"{t.dtype}{list(t.shape)} in the task vector", tensor=n)
        if ref.kind == "zero" and b.dtype not in S.TERNARY_DTYPES:
            raise ConvertError(f"{where}: cannot add a task vector to a {b.dtype} tensor",
                               tensor=n)
    if ref.kind == "checkpoint":
        assert ref.hashes is not None
        with _Bar(bar_enabled, len(ref.hashes), "check base") as bar:
            for n in sorted(ref.hashes):
                got = _sha256(base, n)
                if got != ref.hashes[n]:
                    raise ConvertError(f"{where}: the data differs from the base{label} the "
                                       f"task vector was measured from ({got[:19]}..., "
                                       f"recorded {str(ref.hashes[n])[:19]}...)", tensor=n)
                bar.update()


def with_path(exc: CompeftError, path: str | os.PathLike) -> CompeftError:
    """Return ``exc`` as the same error type whose message starts with the file name.

    The message reads ``FILE: tensor 'x': byte 12: what``; ``tensor`` and ``offset`` keep
    their values.
    """
    new = type(exc)(f"{os.fspath(path)}: {exc}")
    new.tensor, new.offset = exc.tensor, exc.offset
    return new


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Name the file in a CompeftError raised inside."""
    try:
        yield
    except CompeftError as exc:
        raise with_path(exc, path) from None


def _signed_values(t: TernaryTensor, dtype: str) -> np.ndarray:
    """``[+v, -v]`` in ``dtype``'s storage: v is the scale as a decoder rounds it."""
    if t.nnz == 0:
        return np.zeros(2, _dt.storage_dtype(dtype))
    one = TernaryTensor((1,), [0], [False], t.scale, dtype, _validated=True)
    if dtype == "BF16":
        bits = _dt.f32_to_bf16_bits(one.to_numpy())[0]
        return np.array([bits, bits | 0x8000], np.uint16)
    v = one.to_numpy()[0]
    return np.array([v, -v], _dt.storage_dtype(dtype))


def _ternary_chunk(t: TernaryTensor, start: int, stop: int, vals: np.ndarray) -> np.ndarray:
    """Elements ``start:stop`` (flat) of the decoded tensor, in the storage of ``vals``."""
    out = np.zeros(stop - start, vals.dtype)
    lo, hi = np.searchsorted(t.indices, [start, stop])
    if hi > lo:
        out[t.indices[lo:hi] - start] = vals[t.signs[lo:hi].view(np.uint8)]
    return out


def _add(base: np.ndarray, dtype: str, delta: np.ndarray) -> np.ndarray:
    """``base + delta`` rounded once to ``dtype`` (storage in and out), as apply_task_vector.

    (apply_task_vector itself takes BF16 only as torch tensors; this works on raw bits.)
    """
    a = _dt.to_numpy_values(base, dtype).astype(np.float64)
    b = delta.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        s = a + b
        bb = s - a
        err = (a - (s - bb)) + (b - bb)  # TwoSum: s + err == a + b exactly
    return _round_sum(s, err, dtype)


def _cast(storage: np.ndarray, src: str, dst: str | None) -> tuple[np.ndarray, str]:
    """Convert float storage to dtype ``dst`` (rounded once, to nearest even)."""
    if dst is None or dst == src or src not in S.TERNARY_DTYPES:
        return storage, src
    vals = _dt.to_numpy_values(storage, src)
    if dst == "BF16":
        if vals.dtype == np.float64:
            return _round_sum(vals, np.zeros_like(vals), "BF16"), dst
        return _dt.f32_to_bf16_bits(vals.astype(np.float32, copy=False)), dst
    with np.errstate(over="ignore"):
        return vals.astype(_dt.storage_dtype(dst)), dst


def _chunks(numel: int) -> Iterator[tuple[int, int]]:
    for start in range(0, numel, _CHUNK):
        yield start, min(numel, start + _CHUNK)


def decompress_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: str | None = None,
    base: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = False,
) -> DecompressSummary:
    """Write a compeft file (or compressed adapter directory) back as safetensors.

    Tensors keep their names, shapes and dtypes (BF16 and F16 included) and the source's
    safetensors metadata; an adapter directory comes back as a directory PEFT loads. An
    (IA)^3 adapter gets its one added back. A task vector measured from a checkpoint needs
    that checkpoint as ``base``: the output is then the full fine-tuned tensors, each
    ``base + task vector`` rounded once. The output is written tensor by tensor, atomically.

    Parameters
    ----------
    src:
        A compeft file, or a directory holding ``adapter_model.compeft`` and
        ``adapter_config.json``.
    dst:
        The safetensors file to write; for a directory input, the directory to create.
    dtype:
        Convert every float tensor to ``"f32"``, ``"f16"`` or ``"bf16"`` (or ``"F32"``...).
    base:
        The base checkpoint (safetensors file) or initial adapter (directory). Required for a
        task vector measured from a checkpoint, and checked against the recorded names,
        shapes, dtypes and sha256 hashes. For a plain task vector (reference zero, not an
        adapter) it gives ``base + task vector`` over every tensor of the base.
    force:
        Replace an existing output (never an input).
    progress:
        Show progress bars on stderr.

    Returns
    -------
    DecompressSummary

    Raises
    ------
    CompeftError
        A corrupt file, a missing or mismatching base, an existing output
        (:class:`ConvertError`); nothing is written then.
    OSError
        A file that cannot be read or written.

    Examples
    --------
    >>> import os, tempfile, numpy as np
    >>> from compeft_format import TernaryTensor, save_file
    >>> from compeft_format.safetensors_io import open_safetensors
    >>> d = tempfile.mkdtemp()
    >>> save_file({"w": TernaryTensor((2, 2), [1], [True], 0.5, "BF16")},
    ...           os.path.join(d, "tv.compeft"))
    >>> s = decompress_file(os.path.join(d, "tv.compeft"), os.path.join(d, "tv.safetensors"))
    >>> r = open_safetensors(s.file)
    >>> r.info("w").dtype, r.values("w").tolist()
    ('BF16', [[0.0, -0.5], [0.0, 0.0]])
    """
    out_dtype = None
    if dtype is not None:
        out_dtype = OUTPUT_DTYPES.get(str(dtype).lower(), str(dtype).upper())
        if out_dtype not in OUTPUT_DTYPES.values():
            raise EncodeError(f"dtype must be one of {sorted(OUTPUT_DTYPES)}, got {dtype!r}")
    source = _resolve(src, ADAPTER_COMPEFT, "decompress reads a compressed adapter directory")
    base_path = _base_weights(base) if base is not None else None
    inputs = [source.path, source.weights] + ([Path(base), base_path] if base_path else [])
    out = _Output(dst, is_dir=source.is_dir, force=force, inputs=inputs)

    with contextlib.ExitStack() as stack:
        with _naming(source.weights):
            cf = stack.enter_context(open_file(source.weights))
            infos = {n: cf.info(n) for n in cf}
        ref = _read_reference(cf.metadata(), set(infos), source.weights)
        label = f" {ref.name!r}" if ref.name else ""
        if ref.kind == "checkpoint" and base_path is None:
            raise ConvertError(
                f"{source.path}: the task vector is measured from the base{label} "
                f"({len(ref.hashes or {})} tensors); give it with --base (base=) to write "
                "the full tensors")
        if base_path is not None and ref.kind != "checkpoint" and (
                ref.kind == "one" or ref.peft_type is not None):
            raise ConvertError(f"{source.path}: holds a PEFT {ref.peft_type} adapter stored as "
                               "it is (from zero or one), which takes no --base")
        base_reader = None
        if base_path is not None:
            base_reader = stack.enter_context(SafetensorsReader(base_path))
            _check_base(ref, base_reader, infos, progress)
        st_meta = cf.metadata().get(META_SAFETENSORS)
        if not (isinstance(st_meta, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in st_meta.items())):
            st_meta = None

        # What to write. A plain task vector added to a base gives every base tensor, in
        # the base's dtype; otherwise the file's tensors, in their own dtypes, with the base
        # (or the one of (IA)^3) added to those stored as a difference.
        if base_reader is not None and ref.kind == "zero":
            names = base_reader.keys()
            adds = set(infos)
            dtypes = {n: base_reader.info(n).dtype for n in names}
            shapes = {n: base_reader.info(n).shape for n in names}
        else:
            names = list(infos)
            adds = set(ref.delta)
            dtypes = {n: infos[n].dtype for n in names}
            shapes = {n: tuple(infos[n].shape) for n in names}

        def out_dt(n: str) -> str:
            d = dtypes[n]
            return out_dtype if out_dtype is not None and d in S.TERNARY_DTYPES else d

        layout = [(n, out_dt(n), shapes[n]) for n in names]

        def produce(n: str) -> Iterator[np.ndarray]:
            """The output storage of tensor ``n``, chunk by chunk (a few MiB each)."""
            dt, total = dtypes[n], math.prod(shapes[n])
            if n not in infos:  # a base tensor the task vector does not change
                assert base_reader is not None
                flat = base_reader.get(n)[0].reshape(-1)
                for a, z in _chunks(total):
                    yield _cast(flat[a:z], dt, out_dtype)[0]
                    base_reader.release(n)
                return
            rec_dt = infos[n].dtype
            with _naming(source.weights):
                value = cf.get_raw(n)
            if isinstance(value, TernaryTensor):
                vals = _signed_values(value, rec_dt)

                def part(a: int, z: int) -> np.ndarray:
                    return _ternary_chunk(value, a, z, vals)
            else:
                dense = value[0].reshape(-1)

                def part(a: int, z: int) -> np.ndarray:
                    return dense[a:z]
            if n not in adds:
                for a, z in _chunks(total):
                    yield _cast(part(a, z), rec_dt, out_dtype)[0]
                return
            bflat = base_reader.get(n)[0].reshape(-1) if base_reader is not None else None
            for a, z in _chunks(total):
                delta = _dt.to_numpy_values(part(a, z), rec_dt)
                if bflat is not None:
                    b = bflat[a:z]
                else:  # reference one: (IA)^3 vectors start at one
                    b = _cast(np.ones(z - a, np.float32), "F32", dt)[0]
                yield _cast(_add(b, dt, delta), dt, out_dtype)[0]
                if base_reader is not None:  # each base chunk is read once
                    base_reader.release(n)

        def write(f: BinaryIO) -> None:
            with _Bar(progress, len(layout), "decompress") as bar, SafetensorsWriter(
                    f, layout, metadata=st_meta) as w:
                for n in w.order:
                    for chunk in produce(n):
                        w.write(n, chunk)
                    if base_reader is not None and n in base_reader:
                        base_reader.release(n)
                    bar.update()

        with out:
            target = out.file(ADAPTER_WEIGHTS if source.is_dir else None)
            _write_fsync(target, write)
            if source.config is not None:
                shutil.copyfile(source.config, out.file(ADAPTER_CONFIG))
        final = out.dst / ADAPTER_WEIGHTS if source.is_dir else out.dst
        return DecompressSummary(
            source=str(source.path), output=str(out.dst), file=str(final), tensors=len(layout),
            numel=sum(math.prod(s) for _, _, s in layout), file_bytes=final.stat().st_size,
            reference=ref.kind, base=str(base) if base is not None else None, dtype=out_dtype)
    raise AssertionError("unreachable")  # pragma: no cover
