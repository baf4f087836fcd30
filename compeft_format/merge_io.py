"""Merging from and to files.

:func:`merge_files` merges compeft files or compressed adapter folders one tensor at a time
(inputs memory-mapped, checked to fit together before any output is written) into a
``.compeft`` file, a ``.safetensors`` file or an adapter folder, with the semantics and
rescaling rules of :mod:`compeft_format.merge` unchanged; a ternary output is compressed
again by :func:`~compeft_format.merge_compress.compress_merged`, straight from the
sign-pattern tables (:func:`~compeft_format.merge_compress.merge_and_compress` does the
same for task vectors held in memory).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from . import _spec as S
from ._progress import Bar
from ._spec import TERNARY_DTYPES
from .binding import Reference, check_base, read_reference
from .compress import (
    DEFAULT_DENSITY,
    DEFAULT_SCALE,
    SCALE_CHOICES,
    SCALES,
    SCOPES,
    check_choice,
    check_density,
    compression_metadata,
)
from .container import CompeftReader, Writer, open_file
from .errors import naming
from .lora_scale import LORA_SCALES, lora_pairs
from .merge import (
    MAX_PATTERN_INPUTS,
    MergeError,
    Rescale,
    RescaleRule,
    TensorMerge,
    check_names,
    check_options,
    dense_divisor,
    expected_ties,
    prepared_rescales,
    resolve_rescale,
)
from .merge_compress import compress_merged
from .outputs import Output, write_fsync
from .peft_init import recorded_recipe, regenerated_file
from .plan import CHUNK, META_SAFETENSORS, META_TASK_VECTOR
from .safetensors_io import SafetensorsReader, SafetensorsWriter
from .scale_plan import LORA_SCALE_KEY, PROJ_SCALE_KEY
from .scales import METRIC_TERMS, is_vector, resolve_scale
from .sources import (
    ADAPTER_COMPEFT,
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    Source,
    base_weights,
    resolve_source,
)
from .taskvec import add_rounded, cast_storage
from .tensor import TernaryTensor
from .writer import parse_version

__all__ = [
    "ADAPTER_KEYS",
    "META_MERGE",
    "OUTPUT_FORMS",
    "MergeSummary",
    "merge_files",
]

# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
#: Keys of ``adapter_config.json`` that adapters merged together must share (first mismatch
#: named): what the tensors mean depends on them.
ADAPTER_KEYS = ("peft_type", "base_model_name_or_path", "target_modules", "r", "lora_alpha",
                "use_rslora", "use_dora", "fan_in_fan_out", "feedforward_modules",
                "modules_to_save")
#: File metadata key recording a merge (method, sign, weights, inputs, rescale).
META_MERGE = "merge"
OUTPUT_FORMS = ("compeft", "safetensors", "adapter")


@dataclass(frozen=True)
class MergeSummary:
    """What :func:`merge_files` did; :meth:`format` is the command's printout (example:
    :func:`merge_files`).

    ``form`` is ``"compeft"`` (compressed again), ``"safetensors"`` or ``"adapter"`` (a PEFT
    adapter directory); ``merged``/``copied`` count the task-vector tensors merged and the
    tensors copied unchanged (equal in every input); ``density``, ``nnz`` describe a
    compeft output (None otherwise).

    >>> import os, tempfile
    >>> from compeft_format import compress_file, merge_files
    >>> d = tempfile.mkdtemp()
    >>> ins = [os.path.join(d, f"e{a}") for a in (1, 2)]
    >>> for path, alpha in zip(ins, (1.0, 0.8)):
    ...     _ = compress_file("tests/data/ia3-minilm-vader", path, density=0.1, alpha=alpha)
    >>> s = merge_files(ins, os.path.join(d, "m.safetensors"))
    >>> s.form, s.method, s.merged, s.copied
    ('safetensors', 'ties', 24, 0)
    >>> s.reference
    "one 'sentence-transformers/all-MiniLM-L6-v2' (PEFT IA3)"
    """

    inputs: tuple[str, ...]
    output: str
    file: str
    form: str
    method: str
    sign: str
    weights: tuple[float, ...]
    tensors: int
    merged: int
    copied: int
    numel: int
    file_bytes: int
    reference: str
    base: str | None = None
    density: float | None = None
    nnz: int | None = None
    rescale: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}

    def format(self) -> str:
        """Return the summary as text."""
        how = self.method + (f" (sign {self.sign})" if self.method == "ties" else "")
        lines = [
            f"merged {len(self.inputs)} inputs -> {self.output}",
            f"  method        {how}, weights {', '.join(f'{w:g}' for w in self.weights)}"
            + (f", rescale {self.rescale}" if self.rescale else ""),
            f"  tensors       {self.tensors} ({self.merged} merged, {self.copied} copied)",
            f"  measured from {self.reference}"
            + (f"; {self.base} added" if self.base else ""),
        ]
        if self.form == "compeft":
            lines.append(f"  compressed    density {self.density:g} ({self.nnz:,} of "
                         f"{self.numel:,} entries kept)")
        else:
            lines.append(f"  written       {self.form} ({self.numel:,} parameters)")
        lines.append(f"  size          {self.file_bytes:,} bytes")
        return "\n".join(lines)


def _output_form(output: Path, adapters: bool) -> str:
    suffix = output.suffix.lower()
    if suffix == ".compeft":
        return "compeft"
    if suffix == ".safetensors":
        return "safetensors"
    if adapters:
        return "adapter"
    raise MergeError(f"{output}: the output must end in .compeft (compressed again) or "
                     ".safetensors (dense); a PEFT adapter directory is written only for "
                     "adapter inputs")


def _config_of(source: Source) -> dict[str, Any]:
    assert source.config is not None
    cfg = json.loads(source.config.read_text(encoding="utf-8"))  # resolve_source checked it
    out = {}
    for key in ADAPTER_KEYS:
        value = cfg.get(key)
        out[key] = sorted(value) if isinstance(value, list) else value
    return out


def _describe_reference(ref: Reference) -> str:
    kind = {"zero": "zero", "one": "one", "checkpoint": "a checkpoint"}[ref.kind]
    name = f" {ref.name!r}" if ref.name else ""
    peft = f" (PEFT {ref.peft_type})" if ref.peft_type else ""
    return f"{kind}{name}{peft}"


def _check_inputs(sources: Sequence[Source], readers: Sequence[CompeftReader],
                  refs: Sequence[Reference]) -> None:
    """Raise :class:`MergeError` naming the first way the inputs do not fit together."""
    first = sources[0]
    if first.is_dir:
        want = _config_of(first)
        for s in sources[1:]:
            got = _config_of(s)
            for key in ADAPTER_KEYS:
                if got[key] != want[key]:
                    raise MergeError(f"{s.config}: {key} is {got[key]!r}, {want[key]!r} in "
                                     f"{first.config}; adapters merge only with the same "
                                     f"{key}")
    r0 = refs[0]
    for s, r in zip(sources[1:], refs[1:], strict=True):
        # the base binding: hex hashes (files before 1.1) or the compact digest
        same = (r.kind, r.peft_type, r.name, r.hashes, r.digest, sorted(r.delta)) == (
            r0.kind, r0.peft_type, r0.name, r0.hashes, r0.digest, sorted(r0.delta))
        if not same:
            what = ("the recorded base hashes differ" if (r.hashes, r.digest) != (
                    r0.hashes, r0.digest)
                    and r.kind == r0.kind == "checkpoint" and r.name == r0.name
                    else "the tensors stored as a difference differ"
                    if sorted(r.delta) != sorted(r0.delta) and r.kind == r0.kind
                    else f"measured from {_describe_reference(r)}, {first.weights} from "
                    f"{_describe_reference(r0)}")
            raise MergeError(f"{s.weights}: not measured from the same reference as "
                             f"{first.weights}: {what}")
    labels = [str(s.weights) for s in sources]
    check_names([r.keys() for r in readers], labels)
    for name in readers[0]:
        i0 = readers[0].info(name)
        for s, r in zip(sources[1:], readers[1:], strict=True):
            info = r.info(name)
            if tuple(info.shape) != tuple(i0.shape):
                raise MergeError(f"{s.weights}: shape {list(info.shape)}, "
                                 f"{list(i0.shape)} in {first.weights}", tensor=name)
            if info.dtype != i0.dtype:
                raise MergeError(f"{s.weights}: dtype {info.dtype}, {i0.dtype} in "
                                 f"{first.weights}", tensor=name)
            if info.kind != i0.kind:
                raise MergeError(f"{s.weights}: a {info.kind} record, {i0.kind} in "
                                 f"{first.weights} (compress the inputs with the same "
                                 "--exclude)", tensor=name)


def _same_everywhere(name: str, readers: Sequence[CompeftReader],
                     sources: Sequence[Source]) -> None:
    """A tensor copied unchanged (not a task vector) must be equal in every input."""
    first = readers[0].get_raw(name)
    for s, r in zip(sources[1:], readers[1:], strict=True):
        other = r.get_raw(name)
        if isinstance(first, TernaryTensor) or isinstance(other, TernaryTensor):
            same = first == other
        else:
            same = other[1] == first[1] and other[0].tobytes() == first[0].tobytes()
        if not same:
            raise MergeError(f"{s.weights}: differs from {sources[0].weights}, and it is not "
                             "a task vector (stored as it is), so it cannot be merged",
                             tensor=name)


def _copied(reader: CompeftReader, name: str) -> tuple[np.ndarray, str]:
    """The storage of a tensor copied unchanged."""
    value = reader.get_raw(name)
    if isinstance(value, TernaryTensor):  # not a task vector, yet stored ternary
        return _to_storage(value.to_numpy(_work_name(value.dtype)), value.dtype), value.dtype
    return value


def _work_name(dtype: str) -> str:
    return "F64" if dtype == "F64" else "F32"


#: The scale rules ``expected_ties`` can read a threshold from (:func:`merge.expected_ties`).
PROJ_SCALES = ("proj", "proj_vcap")


def _proj_scales(sources: Sequence[Source], readers: Sequence[CompeftReader],
                 strict: bool = True) -> dict[str, tuple[float | None, ...]]:
    """Each input's ``proj`` scale where its file records one in place of its magnitude,
    by tensor (:attr:`merge.MergeStats.proj_scales`); refuse an input of another rule
    (``strict``, for ``expected_ties``; else, for ``dense_divisor``, which merges an input
    at its proj scale where one is recorded, such an input keeps its magnitudes).

    ``expected_ties`` infers each input's threshold from the proj rule's scale (spec 5.2.1
    names where a file keeps it when its stored scale is another rule's):

    * a LoRA product scale (``lora_product``, ``lora_product_out``, ``lora_product_kron``,
      ``lora_product_delta``) keeps compress's selection and records the proj scale of the
      LoRA factors (``lora_fit.proj_scale``: one number, ``{"A": .., "B": ..}`` for scope
      ``role``, or by tensor name); its other tensors keep proj_vcap's scale as stored; a calibrated
      ``proj``/``proj_vcap`` file (``compress_file(calibrate=...)``) records its LoRA
      factors' scales before calibration there too;
    * a metric rule (``kron_sketch``, ``kron``, ``gram``) records each scope's proj scale
      before a vector's cap (``proj_scale``: one number, or by tensor name); a vector's
      proj_vcap scale is the smaller of that and its cap, and its stored scale is the
      smaller of the rule's and its cap, so where the rule's scale is at least proj's (as at
      the low densities that choose these rules) it is the smaller of the two recorded.

    Such a file merges as its proj_vcap compression would. A file of another rule, or
    without that record, is refused (its thresholds would be off by the rule's ratio to
    proj, 0.4x to 1.3x for the rules measured), before any output.
    """
    out: dict[str, list[float | None]] = {}
    for i, (s, r) in enumerate(zip(sources, readers, strict=True)):
        meta = r.metadata().get(S.META_COMPRESSION)
        meta = meta if isinstance(meta, dict) else {}
        scale = meta.get("scale")
        # a calibrated file (spec 5.2.1) records its LoRA factors' scales before calibration
        calibrated = scale in PROJ_SCALES and LORA_SCALE_KEY in meta
        if scale is None or (scale in PROJ_SCALES and not calibrated):
            continue
        if scale in LORA_SCALES or calibrated:
            fit = meta.get(LORA_SCALE_KEY)
            proj = fit.get("proj_scale") if isinstance(fit, dict) else None
            where = f"{LORA_SCALE_KEY}.proj_scale"
            tensors = {n: role for pair in lora_pairs(r.keys())
                       for n, role in zip(pair, "AB", strict=True)}
        elif scale in METRIC_TERMS:
            proj, where = meta.get(PROJ_SCALE_KEY), PROJ_SCALE_KEY
            tensors = {n: "" for n in r if r.info(n).kind == "ternary"}
        elif not strict:
            continue
        else:
            raise MergeError(f"{s.path}: compressed with scale {scale!r}; rescale "
                             f"'expected_ties' reads thresholds from {' or '.join(PROJ_SCALES)} "
                             "scales, or from the proj scale a LoRA product or metric scale "
                             "records, only (merge without it, with 'dense_divisor', or "
                             "compress the inputs with such a scale)")

        def number(v: Any, what: str, path: Path = s.path, where: str = where,
                   scale: str = scale) -> float:
            if (isinstance(v, bool) or not isinstance(v, (int, float))
                    or not 0 <= v < math.inf):  # 0: a tensor with nothing kept
                raise MergeError(f"{path}: compressed with scale {scale!r}; its compression "
                                 f"record's {where}{what} must be a number >= 0 for rescale "
                                 f"{'expected_ties' if strict else 'dense_divisor'!r}, "
                                 f"got {v!r}")
            return float(v)

        if proj is None and not strict:
            continue
        if not isinstance(proj, dict):
            got = {n: number(proj, "") for n in tensors}
        elif scale in LORA_SCALES and meta.get("scope") == "role":
            got = {n: number(proj.get(role), f"[{role!r}]") for n, role in tensors.items()}
        else:
            got = {n: number(proj.get(n), f"[{n!r}]") for n in tensors}
        if scale in METRIC_TERMS:  # a vector's cap (see above)
            for n in got:
                if is_vector(tuple(r.info(n).shape)):
                    got[n] = min(got[n], float(r.get_raw(n).scale))
        for name, value in got.items():
            out.setdefault(name, [None] * len(readers))[i] = value
    return {name: tuple(v) for name, v in out.items()}


def _default_compression(readers: Sequence[CompeftReader]) -> tuple[float, str, str]:
    """``(density, scope, scale)``: the largest input density; scope and scale where all agree.

    An input's density is the one recorded in its metadata, else the fraction of its
    ternary entries that are nonzero.
    """
    densities, scopes, scales = [], set(), set()
    for r in readers:
        meta = r.metadata().get(S.META_COMPRESSION)
        meta = meta if isinstance(meta, dict) else {}
        d = meta.get("density")
        if isinstance(d, (int, float)) and not isinstance(d, bool) and 0 < d <= 1:
            densities.append(float(d))
        else:
            nnz = numel = 0
            for name in r:
                info = r.info(name)
                if info.nnz is not None:
                    nnz, numel = nnz + info.nnz, numel + info.numel
            densities.append(nnz / numel if nnz else DEFAULT_DENSITY)
        scopes.add(meta.get("scope"))
        scales.add(meta.get("scale"))
    scope = scopes.pop() if len(scopes) == 1 and None not in scopes else "global"
    scale = scales.pop() if len(scales) == 1 and None not in scales else DEFAULT_SCALE
    scope = scope if scope in SCOPES else "global"
    scale = scale if scale in SCALES else DEFAULT_SCALE
    return max(densities), scope, scale


def _to_storage(values: np.ndarray, dtype: str) -> np.ndarray:
    """Merged values (float32/float64) as ``dtype``'s storage, rounded once."""
    src = "F64" if values.dtype == np.float64 else "F32"
    return cast_storage(values, src, dtype)[0]


def merge_files(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    method: str = "ties",
    weights: Sequence[float] | None = None,
    sign: str = "total",
    density: float | None = None,
    base: str | os.PathLike | None = None,
    rescale: str | RescaleRule | None = None,
    scope: str | None = None,
    scale: str | None = None,
    force: bool = False,
    progress: bool = False,
    format_version: str | tuple[int, int] | None = None,
) -> MergeSummary:
    """Merge compressed experts straight from their files, one tensor at a time.

    Parameters
    ----------
    inputs:
        Two or more compeft files, or compressed adapter directories as
        :func:`~compeft_format.compress_file` writes them. They must fit together: the same
        tensor names, shapes, dtypes and record kinds, measured from the same reference (the
        same recorded base, or the same PEFT type), and for adapters the same
        ``adapter_config.json`` keys :data:`ADAPTER_KEYS` (PEFT type, base model, target
        modules, rank, alpha...). The first mismatch is named before anything is written.
    output:
        ``*.compeft``: the merged task vector compressed again (ternary, at ``density``),
        keeping the inputs' base binding. ``*.safetensors``: the dense merged task vector,
        or with ``base`` base plus merged task vector. Any other name, for adapter inputs:
        a PEFT adapter directory (``adapter_config.json`` copied from the first input and
        ``adapter_model.safetensors``) that ``PeftModel.from_pretrained`` loads: a LoRA's
        weights are the merged task vector (measured from zero), an (IA)^3's have the one
        added back, and adapters compressed from their initial state need it as ``base``.
    method, weights, sign, rescale:
        As :func:`merge`.
    density:
        The density of a compeft output (default: the largest input density, as recorded in
        the inputs' metadata).
    base:
        The base the inputs were compressed against (``compeft compress --base``), for a
        dense output: checked against the recorded hashes, and added to the merged task
        vector. For task vectors from zero (not adapters), a base to add them to.
    scope, scale:
        Of a compeft output (default: the inputs' own, where they all agree; else
        ``"global"`` and the default scale rule). ``alpha`` is 1.
    force:
        Replace an existing output (never an input).
    progress:
        Progress bars on stderr.
    format_version:
        Of a compeft output: the format version to write, ``"1.0"`` to ``"1.7"``, for
        readers of an older version (spec 10.1); None (the default): the newest.

    Returns
    -------
    MergeSummary

    Raises
    ------
    MergeError
        Inputs that do not fit together, or a bad option.
    CompeftError
        A corrupt input, a base that does not match, an output that exists
        (:class:`~compeft_format.errors.ConvertError`); nothing is written then.
    OSError
        A file that cannot be read or written.

    Examples
    --------
    >>> import os, tempfile
    >>> from compeft_format import save_file, load_file
    >>> d = tempfile.mkdtemp()
    >>> for i, signs in enumerate([[False, True], [False, False]]):
    ...     save_file({"w": TernaryTensor((2, 2), [0, 3], signs, 0.5 * (i + 1))},
    ...               os.path.join(d, f"e{i}.compeft"))
    >>> s = merge_files([os.path.join(d, "e0.compeft"), os.path.join(d, "e1.compeft")],
    ...                 os.path.join(d, "merged.safetensors"))
    >>> from compeft_format import open_safetensors
    >>> open_safetensors(s.file).values("w").tolist()
    [[0.75, 0.0], [0.0, 1.0]]
    """
    if isinstance(inputs, (str, bytes, os.PathLike)):  # not a list of one path's characters
        raise TypeError(f"merge_files takes a sequence of inputs, got one path {inputs!r}")
    ws = check_options(len(inputs), method, weights, sign)
    if len(inputs) < 2:
        raise MergeError(f"merge needs two or more inputs, got {len(inputs)}")
    rule = resolve_rescale(rescale)
    if density is not None:
        check_density(density)
    sources = [resolve_source(p, ADAPTER_COMPEFT, "merge reads compressed adapter "
                              "directories, as compeft compress writes them") for p in inputs]
    for s in sources[1:]:
        if s.is_dir != sources[0].is_dir:
            kind = "an adapter directory" if s.is_dir else "a file"
            raise MergeError(f"{s.path}: {kind}, while {sources[0].path} is not; merge "
                             "inputs of one form")
    dst = Path(output)
    form = _output_form(dst, sources[0].is_dir)
    if base is not None and form == "compeft":
        raise MergeError(f"{dst}: a compeft output keeps the inputs' base binding and takes "
                         "no --base (base=); give it when decompressing")
    given = [k for k, v in (("density", density), ("scope", scope), ("scale", scale),
                            ("format_version", format_version)) if v is not None]
    version = parse_version(format_version)
    if given and form != "compeft":  # they choose how the merge is compressed again
        named = ", ".join(f"{k} (--{k.replace('_', '-')})" for k in given)
        raise MergeError(f"{dst}: {named} {'applies' if len(given) == 1 else 'apply'} to a "
                         ".compeft output; this one is dense")
    base_path = base_weights(base) if base is not None else None
    paths = [p for s in sources for p in (s.path, s.weights)]
    out = Output(dst, is_dir=form == "adapter", force=force,
                 inputs=paths + ([Path(base), base_path] if base_path else []))

    with contextlib.ExitStack() as stack:
        readers = []
        for s in sources:
            with naming(s.weights):
                readers.append(stack.enter_context(open_file(s.weights)))
        refs = [read_reference(r.metadata(), set(r.keys()), s.weights)
                for s, r in zip(sources, readers, strict=True)]
        _check_inputs(sources, readers, refs)
        proj = (_proj_scales(sources, readers, strict=rule is expected_ties)
                if rule in (expected_ties, dense_divisor) else {})
        ref = refs[0]
        infos = {n: readers[0].info(n) for n in readers[0]}
        base_reader = None
        if form != "compeft":
            label = f" {ref.name!r}" if ref.name else ""
            recipe = recorded_recipe(readers[0].metadata())
            if ref.kind == "checkpoint" and base_path is None and recipe is not None:
                # PEFT's initial adapter, regenerated from the seed (checked just below)
                config = sources[0].config or sources[0].weights.parent / "adapter_config.json"
                base_path, _ = regenerated_file(recipe, config,
                                                {n: i.dtype for n, i in infos.items()}, stack,
                                                where=sources[0].weights)
            if ref.kind == "checkpoint" and base_path is None:
                raise MergeError(f"{sources[0].path}: the inputs are measured from the "
                                 f"base{label}; give it with --base (base=) to write the "
                                 "merged tensors, or write a .compeft")
            if base_path is not None and ref.stored_as_is:
                raise MergeError(f"{sources[0].path}: PEFT {ref.peft_type} adapters stored "
                                 "as they are (from zero or one) take no --base")
            if base_path is not None:
                base_reader = stack.enter_context(SafetensorsReader(base_path))
                check_base(ref, base_reader, infos, progress)
        # the task vectors: what is measured from a reference (every float tensor when that
        # is zero or one); the rest is stored as it is and must be the same everywhere
        merged = {n for n, i in infos.items() if (n in ref.delta if ref.kind == "checkpoint"
                                                  else i.dtype in TERNARY_DTYPES)}
        for name in infos:  # copied tensors must agree: checked before anything is written
            if name not in merged:
                _same_everywhere(name, readers, sources)
        n_in = len(readers)

        def make(name: str, fixed: Rescale | None) -> TensorMerge:
            values = []
            for s, r in zip(sources, readers, strict=True):
                with naming(s.weights):
                    v = r.get_raw(name)
                values.append(v if isinstance(v, TernaryTensor) else v[0].reshape(-1))
            info = infos[name]
            tm = TensorMerge(name, tuple(info.shape), info.dtype, values, method=method,
                             weights=ws, sign=sign, rescale=fixed or prepared.get(name, rule),
                             proj_scales=proj.get(name))
            return tm

        # a rule whose statistics span tensors sees them all first (one pass over the codes)
        prepared: dict[str, Rescale] = {}  # empty while the rule's prepare runs
        prepared = prepared_rescales(rule, sorted(merged), lambda n: make(n, None).stats())

        st_meta = [r.metadata().get(META_SAFETENSORS) for r in readers]
        st_meta = st_meta[0] if all(m == st_meta[0] for m in st_meta) else None
        if not (isinstance(st_meta, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in st_meta.items())):
            st_meta = None
        counts = {"numel": 0, "nnz": 0}
        order = sorted(infos, key=lambda n: n.encode("utf-8", "surrogatepass"))

        if form == "compeft":
            d0, scope0, scale0 = _default_compression(readers)
            density = d0 if density is None else density
            scope = scope0 if scope is None else scope
            scale = scale0 if scale is None else scale
            scale = resolve_scale(check_choice("scale", scale, SCALE_CHOICES), density)
            comp_meta = compression_metadata(density, 1.0, scope, scale)
            ternary = [n for n in order if n in merged and infos[n].kind == "ternary"]
            patterns = n_in <= MAX_PATTERN_INPUTS
            stream = compress_merged(ternary, make, {n: infos[n].dtype for n in ternary},
                                      patterns, density=density, scope=scope, scale=scale)
            from . import __version__

            metadata: dict[str, Any] = {
                S.META_PRODUCER: f"compeft_format {__version__}",
                S.META_COMPRESSION: comp_meta,
                META_MERGE: {"method": method, "sign": sign, "weights": list(ws),
                             "inputs": [str(s.path) for s in sources],
                             "rescale": rescale if isinstance(rescale, str) else None},
            }
            for key in (META_TASK_VECTOR, S.META_BASE):
                if key in readers[0].metadata():
                    metadata[key] = readers[0].metadata()[key]
            if st_meta is not None:
                metadata[META_SAFETENSORS] = st_meta
            ternary_set = set(ternary)

            def write(f: BinaryIO) -> None:
                with Bar(progress, len(order), "merge") as bar, Writer(
                        f, metadata=metadata, version=version) as w:
                    for name in order:
                        info = infos[name]
                        counts["numel"] += info.numel
                        if name in ternary_set:
                            got, t = next(stream)
                            assert got == name, (got, name)  # both walk the sorted names
                            counts["nnz"] += t.nnz
                            w.write(name, t)
                        elif name in merged:
                            w.write(name, _to_storage(make(name, None).to_numpy(),
                                                      info.dtype), dtype=info.dtype)
                        else:
                            arr, dtype = _copied(readers[0], name)
                            w.write(name, arr, dtype=dtype)
                        bar.update()
            target_name = None
        else:
            density = None
            if base_reader is not None and ref.kind == "zero":
                names = base_reader.keys()
                adds = set(infos)
                dtypes = {n: base_reader.info(n).dtype for n in names}
                shapes = {n: tuple(base_reader.info(n).shape) for n in names}
            else:
                names = list(infos)
                adds = set(ref.delta) if base_reader is not None or ref.kind == "one" else set()
                dtypes = {n: infos[n].dtype for n in names}
                shapes = {n: tuple(infos[n].shape) for n in names}
            layout = [(n, dtypes[n], shapes[n]) for n in names]

            def produce(name: str) -> Iterator[np.ndarray]:
                dtype = dtypes[name]
                if name not in infos:  # a base tensor the task vectors do not change
                    assert base_reader is not None
                    flat = base_reader.get(name)[0].reshape(-1)
                    for a in range(0, flat.size, CHUNK):
                        yield flat[a : a + CHUNK]
                        base_reader.release(name)
                    return
                if name not in merged:
                    yield _copied(readers[0], name)[0]
                    return
                tm = make(name, None)
                bflat = (base_reader.get(name)[0].reshape(-1)
                         if base_reader is not None and name in adds else None)
                for a, vals in tm.chunks(CHUNK):
                    if name not in adds:
                        yield _to_storage(vals, dtype)
                        continue
                    if bflat is not None:
                        b = bflat[a : a + vals.size]
                    else:  # reference one: (IA)^3 vectors start at one
                        b = cast_storage(np.ones(vals.size, np.float32), "F32", dtype)[0]
                    yield add_rounded(b, dtype, vals)
                    if base_reader is not None:
                        base_reader.release(name)

            def write(f: BinaryIO) -> None:
                with Bar(progress, len(layout), "merge") as bar, SafetensorsWriter(
                        f, layout, metadata=st_meta) as w:
                    for name in w.order:
                        counts["numel"] += math.prod(shapes[name])
                        for chunk in produce(name):
                            w.write(name, chunk)
                        bar.update()
            target_name = ADAPTER_WEIGHTS if form == "adapter" else None

        with out:
            target = out.file(target_name)
            write_fsync(target, write)
            if form == "adapter":
                assert sources[0].config is not None
                shutil.copyfile(sources[0].config, out.file(ADAPTER_CONFIG))
        final = out.dst / ADAPTER_WEIGHTS if form == "adapter" else out.dst
        return MergeSummary(
            inputs=tuple(str(s.path) for s in sources), output=str(out.dst), file=str(final),
            form=form, method=method, sign=sign, weights=ws, tensors=len(order),
            merged=len(merged), copied=len(order) - len(merged), numel=counts["numel"],
            file_bytes=final.stat().st_size, reference=_describe_reference(ref),
            base=str(base) if base is not None else None, density=density,
            nnz=counts["nnz"] if form == "compeft" else None,
            rescale=rescale if isinstance(rescale, str) else
            (getattr(rescale, "__name__", "custom") if rescale is not None else None))
    raise AssertionError("unreachable")  # pragma: no cover
