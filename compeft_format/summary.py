"""What a conversion did: :class:`CompressSummary` and :class:`DecompressSummary`.

:func:`~compeft_format.convert.compress_file` and
:func:`~compeft_format.convert.decompress_file` return them; their ``format()`` is what the
command prints, their ``to_dict()`` what ``--json`` prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .quality import QualityReport

__all__ = ["CompressSummary", "DecompressSummary"]


def _int(n: int) -> str:
    return f"{n:,}"


def _names(names: tuple[str, ...], shown: int = 3) -> str:
    """``2 tensors ['a', 'b']``, the first few names of many."""
    more = ", ..." if len(names) > shown else ""
    listed = ", ".join(repr(n) for n in names[:shown])
    return f"{len(names)} tensor{'s' if len(names) != 1 else ''} [{listed}{more}]"


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
    only_in_source, only_in_base:
        With a base: the tensors the base lacks (stored as they are, not measured from it),
        and the base's tensors the source lacks (not needed to restore it).
    hifi_step:
        For a hi-fi file (``compress_file(hifi=...)``): its step in root mean squares of the
        task vector; ``ternary`` then counts the tensors stored as codes.
    scale, scale_auto:
        The scale rule used, as the file records it (None for a hi-fi file), and whether it
        was chosen by ``scale="auto"``.

    Examples
    --------
    >>> import os, tempfile
    >>> from compeft_format import compress_file
    >>> d = tempfile.mkdtemp()
    >>> s = compress_file("tests/data/ia3-minilm-vader", os.path.join(d, "c"), density=0.1)
    >>> s.reference, s.tensors, s.ternary, s.dense, s.scale, s.scale_auto
    ('one', 24, 24, 0, 'proj_vcap', True)
    >>> s.file_bytes, s.dense_bytes
    (1269, 64512)
    >>> print(s.format().splitlines()[0])  # doctest: +ELLIPSIS
    compressed tests/data/ia3-minilm-vader -> .../c
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
    only_in_source: tuple[str, ...] = ()
    only_in_base: tuple[str, ...] = ()
    note: str | None = None
    hifi_step: float | None = None
    scale: str | None = None
    scale_auto: bool = False

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
            "base_name": self.base_name, "only_in_source": list(self.only_in_source),
            "only_in_base": list(self.only_in_base), "note": self.note,
            "hifi_step": self.hifi_step, "scale": self.scale, "scale_auto": self.scale_auto,
            "quality": self.quality.to_dict(),
        }

    def format(self, *, verbose: bool = False) -> str:
        """Return the summary as text; ``verbose`` adds the per-tensor quality table."""
        q = self.quality.overall
        hifi = self.hifi_step is not None
        lines = [
            f"compressed {self.source} -> {self.output}"
            + (" (hi-fi: integer codes of every entry)" if hifi else ""),
            f"  tensors       {self.tensors} ({self.ternary} {'hi-fi' if hifi else 'ternary'}, "
            f"{self.dense} dense)",
            f"  measured from {self.reference}"
            + (f" {self.base_name!r} (sha256 of its tensors recorded)" if self.base_name else ""),
        ]
        if self.note:
            lines.append(f"  note          {self.note}")
        if self.only_in_source:
            lines.append(f"  not in base   {_names(self.only_in_source)}: stored as they are")
        if self.only_in_base:
            lines.append(f"  only in base  {_names(self.only_in_base)}: not needed to restore")
        lines.append(
            f"  step          {self.hifi_step:g} x rms of the task vector (each entry within "
            "half a step)" if hifi else
            f"  density       {self.kept_density:.4f} ({_int(self.nnz)} of "
            f"{_int(self.compressed_numel)} entries kept; asked {self.density:g})")
        if self.scale is not None:
            lines.append(f"  scale         {self.scale}"
                         + (" (--scale auto at this density)" if self.scale_auto else ""))
        lines += [
            f"  dense size    {_int(self.dense_bytes)} bytes",
            f"  compressed    {_int(self.file_bytes)} bytes",
            f"  ratio         {self.ratio:.1f}x",
            f"  bits/param    {self.bits_per_param:.3f}",
            f"  quality       rel. error {q.rel_error:.{6 if hifi else 4}f}, cosine "
            f"{q.cosine:.{8 if hifi else 4}f} (compressed task vector against the exact one)",
        ]
        if verbose and self.quality.tensors:
            lines += ["", self.quality.format_table()]
        return "\n".join(lines)


@dataclass(frozen=True)
class DecompressSummary:
    """What :func:`decompress_file` did; :meth:`format` is the command's printout.

    >>> import os, tempfile
    >>> from compeft_format import compress_file, decompress_file
    >>> d = tempfile.mkdtemp()
    >>> _ = compress_file("tests/data/ia3-minilm-vader", os.path.join(d, "c"), density=0.1)
    >>> s = decompress_file(os.path.join(d, "c"), os.path.join(d, "r"))
    >>> s.reference, s.tensors, s.numel, s.base, s.dtype
    ('one', 24, 16128, None, None)
    """

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

