"""Converters: checkpoints (files, adapters, model folders) to compeft files, and back.

:func:`compress_file` measures a task vector, compresses it with
:func:`~compeft_format.compress.compress` and writes a compeft file; :func:`decompress_file`
writes it back as safetensors, with the original names, shapes and dtypes. Both go tensor by
tensor over memory-mapped inputs (:mod:`compeft_format.safetensors_io`), so a model is never
held in memory: a compress holds the compressed tensors plus about one input tensor; a
decompress holds one compressed tensor and a few MiB of output at a time.

Inputs and outputs
------------------
* A ``.safetensors`` file (or pickled torch weights, ``.bin``...) <-> a ``.compeft`` file.
  An adapter's weights file with its ``adapter_config.json`` beside it is that adapter.
* A PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors`` or
  ``adapter_model.bin``) <-> a directory holding the copied ``adapter_config.json`` and
  ``adapter_model.compeft``.
* A Hugging Face model folder (``model.safetensors``, or shards and
  ``model.safetensors.index.json``; or the pickled ``pytorch_model*.bin``) <-> a folder
  holding ``model.compeft`` and the folder's other small files (config, tokenizer...); the
  shards are recorded (metadata ``model_folder``) and written back as they were, as
  safetensors, so that ``from_pretrained`` loads the result.

Pickled weights are read only with ``torch.load(weights_only=True)``
(:mod:`compeft_format.readers`): a file whose unpickling would call anything but the
tensor builders is refused, and never executed.

What the task vector is measured from (metadata key ``task_vector``)
---------------------------------------------------------------------
``{"reference": ..., "delta": [names], "peft_type": ..., "exclude": [patterns]}`` with
(``"delta_all_but": [names]`` instead of ``"delta"`` when shorter: every tensor of the file
but those; files before 2026-12 always list ``"delta"``)

* ``"zero"``: the tensors are stored as they are: a LoRA adapter (``B`` starts at zero; as in
  the ComPEFT paper, ``A`` is taken as is too), or a file that already is a task vector.
* ``"one"``: an (IA)^3 adapter; the names in ``"delta"`` (its scaling vectors, which start at
  one) are stored minus one, and :func:`decompress_file` adds the one back.
* ``"checkpoint"``: the names in ``"delta"`` are stored as ``tensor - base[name]``, measured
  from a base checkpoint or an adapter's saved initial state (``base=``/``--base``).

``"peft_type"`` names an adapter's type. Tensors not in ``"delta"`` are stored as they are:
non-float tensors, the ``exclude`` patterns (dense records, lossless), and tensors the base
does not have. The spec's own key ``compeft.base`` (spec 5.2.1) names the base: for a
checkpoint, ``{"name": its file or directory name, "sha256": ..., "digests": ...}`` (see
:func:`~compeft_format.plan.base_binding`: one sha256 over the sha256 of every tensor the
task vector is measured from, and 2 bytes of each of those, so that :func:`decompress_file`
refuses a base with other names, shapes, dtypes or contents and names the tensor that
differs; files before 2026-12 hold ``"hashes": {tensor: "sha256:<hex>"}``, still checked);
for an adapter, ``{"name": base_model_name_or_path}``.
(``task_vector`` is not a ``compeft.`` key: the spec reserves those.)

The parts live in their own modules, public for other converters: :mod:`.sources` (what a
path holds), :mod:`.plan` (what is measured from what, the lazy task vector),
:mod:`.binding` (the recorded base and its check), :mod:`.outputs` (atomic outputs) and
:mod:`.summary`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from . import _spec as S
from . import dtypes as _dt
from ._progress import Bar, PassesBar
from .binding import Reference, check_base, read_reference
from .compress import DEFAULT_SCALE, compression_metadata, iter_compress
from .container import POSITIONS_CHOICES, Writer, open_file
from .errors import CompeftError, ConvertError, EncodeError
from .outputs import Output, write_fsync
from .peft_init import DEFAULT_SEEDS, META_PEFT_INIT, PEFT_INIT, find_seed, parse_peft_init
from .plan import (
    CHUNK,
    META_MODEL_FOLDER,
    META_SAFETENSORS,
    META_TASK_VECTOR,
    REFERENCES,
    FileTaskVector,
    Plan,
    file_metadata,
    make_plan,
)
from .quality import QualityReport, _measure, _Sums  # its sums, added up slice by slice
from .readers import open_weights
from .safetensors_io import SafetensorsWriter
from .sources import (
    ADAPTER_COMPEFT,
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MODEL_COMPEFT,
    Source,
    base_weights,
    companion_files,
    resolve_source,
)
from .summary import CompressSummary, DecompressSummary
from .taskvec import _round_sum
from .tensor import TernaryTensor

__all__ = [
    "ADAPTER_COMPEFT",
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "DEFAULT_DENSITY",
    "META_SAFETENSORS",
    "META_TASK_VECTOR",
    "OUTPUT_DTYPES",
    "REFERENCES",
    "CompressSummary",
    "ConvertError",
    "DecompressSummary",
    "Plan",
    "Reference",
    "add_rounded",
    "cast_storage",
    "compress_file",
    "decompress_file",
    "with_path",
]

#: The density used when none is given: keep the top 10% of the entries.
DEFAULT_DENSITY = 0.1
OUTPUT_DTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
_QUALITY_SLICE = 1 << 23  # elements per slice of the quality figures (temporaries ~30 B each)


# ---------------------------------------------------------------------------------------------
# compress
# ---------------------------------------------------------------------------------------------
def _quality(tv: FileTaskVector, written: Any, names: list[str]) -> QualityReport:
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
    base_model: str | os.PathLike | None = None,
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
        A ``.safetensors`` or pickled torch weights file, a PEFT adapter directory
        (``adapter_config.json`` and ``adapter_model.safetensors`` or ``.bin``), or a model
        folder (``model.safetensors``, shards with their index, ``pytorch_model*.bin``).
    dst:
        The compeft file to write; for a directory, a directory that will hold
        ``adapter_model.compeft`` (or ``model.compeft``) and the copied small files.
    density, alpha, scope, scale, exclude:
        As :func:`~compeft_format.compress.compress` (``exclude``: fnmatch patterns of names
        kept dense and lossless).
    base:
        The base checkpoint (a weights file or a model folder) or initial adapter (a
        directory or its weights file) the task vector is measured from; the sha256 hashes
        of the tensors measured from it are recorded. Names on one side only are in the
        summary (``only_in_source``: stored as they are; ``only_in_base``: not used).
        ``"peft-init"`` (or ``"peft-init:SEED"``) for a LoRA adapter: its initial state as
        PEFT's default initialisation made it, regenerated from the seed
        (:mod:`compeft_format.peft_init`; the seed is found when not given, a wrong one
        refused); the file records the seed, and decompress regenerates it.
    base_model:
        With ``"peft-init"``: the base model's folder (or ``config.json``) when the adapter's
        ``base_model_name_or_path`` is neither a local folder nor in the Hugging Face cache.
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
    source = resolve_source(src, ADAPTER_WEIGHTS, "compress reads a PEFT adapter's weights")
    from_init, init_seed = parse_peft_init(base)
    base_path = base_weights(base) if base is not None and not from_init else None
    inputs = [source.path, source.weights] + ([Path(base), base_path] if base_path else [])
    out = Output(dst, is_dir=source.is_dir, force=force, inputs=inputs)

    with contextlib.ExitStack() as stack:
        reader = stack.enter_context(open_weights(source.weights))
        note = recipe = None
        if from_init:
            base_path, recipe, note = _peft_init_base(source, reader, init_seed, base_model,
                                                      stack)
        base_reader = (stack.enter_context(open_weights(base_path))
                       if base_path is not None else None)
        plan = make_plan(source, reader, base_reader, base_path, patterns, progress,
                         partial_init=recipe is not None)
        if recipe is not None and plan.base is not None:  # the recipe, not a temporary file
            plan.base = {**plan.base, "name": f"{PEFT_INIT}:{recipe['seed']}",
                         META_PEFT_INIT: recipe}
        # compress reads each tensor three times (global scope; once per tensor scope; one
        # more for the scales that need the sum of the kept magnitudes), the quality once
        passes = (1 if scope == "tensor" else 3 if scale in ("norm", "std") else 4) + 1
        bar = stack.enter_context(PassesBar(progress, len(plan.compressible), passes,
                                            "compress"))
        tv = FileTaskVector(plan.compressible, reader, base_reader, source.peft_type, bar.update)
        # one tensor at a time, in the file's (sorted) order: nothing is held once written
        stream = iter_compress(tv, density=density, alpha=alpha, scope=scope, scale=scale)

        metadata = file_metadata(plan, reader, comp_meta, patterns, extra_metadata)
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

        inside = _COMPEFT_IN.get(source.folder)  # the file's name in an output directory
        with out:
            target = out.file(inside)
            write_fsync(target, write)
            # the quality of what was written, read back from it one tensor at a time
            with open_file(target) as written:
                quality = _quality(tv, written, plan.compressible)
            bar.close()
            _copy_companions(source, out)
        reader.release()
        if base_reader is not None:
            base_reader.release()
        final = out.dst / inside if inside else out.dst
        return CompressSummary(
            source=str(source.path), output=str(out.dst), file=str(final),
            tensors=len(names), ternary=len(plan.compressible),
            dense=len(names) - len(plan.compressible), numel=counts["numel"],
            compressed_numel=counts["cnumel"], nnz=counts["nnz"], density=float(density),
            dense_bytes=counts["dense_bytes"], file_bytes=final.stat().st_size,
            reference=plan.reference["reference"], quality=quality,
            base_name=plan.base["name"] if plan.reference["reference"] == "checkpoint"
            and plan.base else None,
            only_in_source=tuple(plan.only_in_source), only_in_base=tuple(plan.only_in_base),
            note=note)
    raise AssertionError("unreachable")  # pragma: no cover


def _peft_init_base(source: Source, reader: Any, seed: int | None,
                    base_model: str | os.PathLike | None, stack: contextlib.ExitStack
                    ) -> tuple[Path, dict[str, Any], str]:
    """A LoRA adapter's initial state regenerated by PEFT (seed found or checked), saved in a
    temporary file: ``(its path, the compeft.base.peft_init recipe, the summary's note)``."""
    from .peft_init import recipe as make_recipe
    from .peft_init import write_init

    if source.config is None or str(source.peft_type).upper() != "LORA":
        what = f"a {source.peft_type} adapter" if source.config else "not a PEFT adapter"
        raise ConvertError(f"{source.path}: base {PEFT_INIT!r} regenerates a LoRA adapter's "
                           f"initial state; this is {what}")
    trained = {n: _dt.to_numpy_values(*reader.get(n)) for n in reader if ".lora_A." in n}
    match = find_seed(source.config, trained, base_model=base_model,
                      candidates=DEFAULT_SEEDS if seed is None else (seed,))
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="compeft-peft-init-")))
    path = tmp / ADAPTER_WEIGHTS
    write_init(match.init, {n: reader.info(n).dtype for n in match.init if n in reader}, path)
    how = (f"given; cosine {match.cosine:.2f}" if seed is not None else
           f"found among {match.tried} seeds in {match.seconds:.1f} s; cosine "
           f"{match.cosine:.2f}")
    note = (f"initial adapter regenerated: PEFT's default LoRA init from seed {match.seed} "
            f"({how} with the trained A)")
    return path, make_recipe(match.seed), note


#: The name of the compeft file inside an output directory, by the kind of input folder.
_COMPEFT_IN = {"adapter": ADAPTER_COMPEFT, "model": MODEL_COMPEFT}


def _copy_companions(source: Source, out: Output) -> None:
    """Copy what travels with the weights: an adapter's config, a model folder's small files
    (config, generation config, tokenizer...), into the output directory."""
    if source.folder == "adapter":
        assert source.config is not None
        shutil.copyfile(source.config, out.file(ADAPTER_CONFIG))
    elif source.folder == "model":
        for p in companion_files(source.path):
            shutil.copyfile(p, out.file(p.name))


# ---------------------------------------------------------------------------------------------
# decompress
# ---------------------------------------------------------------------------------------------

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


def add_rounded(base: np.ndarray, dtype: str, delta: np.ndarray) -> np.ndarray:
    """``base + delta`` rounded once to ``dtype`` (storage in and out), as apply_task_vector.

    (apply_task_vector itself takes BF16 only as torch tensors; this works on raw bits.)

    >>> add_rounded(np.ones(2, np.float16), "F16", np.array([0.5, 1e-4], np.float32))
    array([1.5, 1. ], dtype=float16)
    """
    a = _dt.to_numpy_values(base, dtype).astype(np.float64)
    b = delta.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        s = a + b
        bb = s - a
        err = (a - (s - bb)) + (b - bb)  # TwoSum: s + err == a + b exactly
    return _round_sum(s, err, dtype)


def cast_storage(storage: np.ndarray, src: str, dst: str | None) -> tuple[np.ndarray, str]:
    """Convert float storage to dtype ``dst`` (rounded once, to nearest even).

    Returns ``(storage, dtype)``; ``dst`` None, the same dtype, or a non-float ``src`` give
    the input back.

    >>> cast_storage(np.array([1.0, 2.5], np.float32), "F32", "BF16")
    (array([16256, 16416], dtype=uint16), 'BF16')
    """
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
    for start in range(0, numel, CHUNK):
        yield start, min(numel, start + CHUNK)


def decompress_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: str | None = None,
    base: str | os.PathLike | None = None,
    base_model: str | os.PathLike | None = None,
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
        ``adapter_config.json``, or ``model.compeft`` (a compressed model folder).
    dst:
        The safetensors file to write; for a directory input, the directory to create (a
        model folder gets its shards back, with ``model.safetensors.index.json``).
    dtype:
        Convert every float tensor to ``"f32"``, ``"f16"`` or ``"bf16"`` (or ``"F32"``...).
    base:
        The base checkpoint (weights file or model folder) or initial adapter (directory).
        Required for a task vector measured from a checkpoint: it must hold the tensors the
        task vector was measured from, with the recorded shapes, dtypes and sha256 hashes
        (its other tensors do not matter). For a plain task vector (reference zero, not an
        adapter) it gives ``base + task vector`` over every tensor of the base. Not needed
        for an adapter compressed from PEFT's regenerated initial state (metadata
        ``compeft.base.peft_init``): it is regenerated (``adapter_config.json`` must be
        beside the file) and checked against the recorded digests.
    base_model:
        For a regenerated initial state: the base model's folder (or ``config.json``) when
        the adapter's ``base_model_name_or_path`` is neither local nor in the HF cache.
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
    source = resolve_source(src, ADAPTER_COMPEFT,
                            "decompress reads a compressed adapter directory")
    from_init, _ = parse_peft_init(base)
    base_path = base_weights(base) if base is not None and not from_init else None
    inputs = [source.path, source.weights] + ([Path(base), base_path] if base_path else [])
    out = Output(dst, is_dir=source.is_dir, force=force, inputs=inputs)

    with contextlib.ExitStack() as stack:
        with _naming(source.weights):
            cf = stack.enter_context(open_file(source.weights))
            infos = {n: cf.info(n) for n in cf}
        ref = read_reference(cf.metadata(), set(infos), source.weights)
        label = f" {ref.name!r}" if ref.name else ""
        recorded = cf.metadata().get(S.META_BASE)
        recorded = recorded.get(META_PEFT_INIT) if isinstance(recorded, dict) else None
        if from_init and not (ref.kind == "checkpoint" and recorded is not None):
            raise ConvertError(f"{source.path}: not compressed from PEFT's regenerated initial "
                               f"adapter (no compeft.base.{META_PEFT_INIT}); "
                               f"--base {PEFT_INIT} does not apply")
        regenerated = None
        if ref.kind == "checkpoint" and base_path is None and recorded is not None:
            base_path, regenerated = _regenerated_base(source, recorded, infos, base_model,
                                                       stack)
        if ref.kind == "checkpoint" and base_path is None:
            raise ConvertError(
                f"{source.path}: the task vector is measured from the base{label} "
                f"({len(ref.delta)} tensors); give it with --base (base=) to write "
                "the full tensors")
        if base_path is not None and ref.kind != "checkpoint" and (
                ref.kind == "one" or ref.peft_type is not None):
            raise ConvertError(f"{source.path}: holds a PEFT {ref.peft_type} adapter stored as "
                               "it is (from zero or one), which takes no --base")
        base_reader = None
        if base_path is not None:
            base_reader = stack.enter_context(open_weights(base_path))
            try:
                check_base(ref, base_reader, infos, progress)
            except ConvertError as exc:
                if regenerated is None:
                    raise
                raise ConvertError(f"{source.path}: {regenerated} is not the initial adapter the "
                                   f"file was compressed from ({_versions(recorded)}): {exc}; "
                                   "give that initial adapter with --base") from None
        st_meta = cf.metadata().get(META_SAFETENSORS)
        if not (isinstance(st_meta, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in st_meta.items())):
            st_meta = None
        if source.is_model and st_meta is None:  # from pickled weights: transformers wants it
            st_meta = {"format": "pt"}

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
        files, index = _output_files(source, cf.metadata().get(META_MODEL_FOLDER), layout)

        def produce(n: str) -> Iterator[np.ndarray]:
            """The output storage of tensor ``n``, chunk by chunk (a few MiB each)."""
            dt, total = dtypes[n], math.prod(shapes[n])
            if n not in infos:  # a base tensor the task vector does not change
                assert base_reader is not None
                flat = base_reader.get(n)[0].reshape(-1)
                for a, z in _chunks(total):
                    yield cast_storage(flat[a:z], dt, out_dtype)[0]
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
                    yield cast_storage(part(a, z), rec_dt, out_dtype)[0]
                return
            bflat = base_reader.get(n)[0].reshape(-1) if base_reader is not None else None
            for a, z in _chunks(total):
                delta = _dt.to_numpy_values(part(a, z), rec_dt)
                if bflat is not None:
                    b = bflat[a:z]
                else:  # reference one: (IA)^3 vectors start at one
                    b = cast_storage(np.ones(z - a, np.float32), "F32", dt)[0]
                yield cast_storage(add_rounded(b, dt, delta), dt, out_dtype)[0]
                if base_reader is not None:  # each base chunk is read once
                    base_reader.release(n)

        bar = stack.enter_context(Bar(progress, len(layout), "decompress"))

        def writer(part: list[tuple[str, str, tuple[int, ...]]]) -> Callable[[BinaryIO], None]:
            def write(f: BinaryIO) -> None:
                with SafetensorsWriter(f, part, metadata=st_meta) as w:
                    for n in w.order:
                        for chunk in produce(n):
                            w.write(n, chunk)
                        if base_reader is not None and n in base_reader:
                            base_reader.release(n)
                        bar.update()
            return write

        with out:
            for name, part in files:
                write_fsync(out.file(name), writer(part))
            if index is not None:
                write_fsync(out.file(index[0]), lambda f: f.write(index[1]))
            bar.close()
            _copy_companions(source, out)
        written = [out.dst / name if name else out.dst for name, _ in files]
        final = out.dst / index[0] if index is not None else written[0]
        return DecompressSummary(
            source=str(source.path), output=str(out.dst), file=str(final), tensors=len(layout),
            numel=sum(math.prod(s) for _, _, s in layout),
            file_bytes=sum(p.stat().st_size for p in written),
            reference=ref.kind, base=str(base) if base is not None and not from_init
            else regenerated, dtype=out_dtype)
    raise AssertionError("unreachable")  # pragma: no cover


def _versions(recipe: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {recipe[k]}" for k in ("peft", "torch", "transformers")
                     if isinstance(recipe.get(k), str))


def _regenerated_base(source: Source, recipe: Any, infos: Mapping[str, Any],
                      base_model: str | os.PathLike | None, stack: contextlib.ExitStack
                      ) -> tuple[Path, str]:
    """The initial adapter a file's ``compeft.base.peft_init`` recipe names, regenerated
    into a temporary file: ``(its path, a description for messages and the summary)``."""
    from .peft_init import _stack, regenerate_init, write_init

    seed = recipe.get("seed") if isinstance(recipe, dict) else None
    if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0) or \
            recipe.get("init_lora_weights") is not True:
        raise ConvertError(f"{source.weights}: metadata compeft.base.{META_PEFT_INIT} must "
                           "hold a seed (an integer >= 0) and init_lora_weights true, got "
                           f"{recipe!r}")
    config = source.config or source.weights.parent / ADAPTER_CONFIG
    if not config.is_file():
        raise ConvertError(f"{source.path}: compressed from PEFT's initial adapter of seed "
                           f"{seed}, which is regenerated from {ADAPTER_CONFIG}: none beside "
                           "the file; give the initial adapter with --base")
    init = regenerate_init(config, seed, base_model=base_model)
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="compeft-peft-init-")))
    path = tmp / ADAPTER_WEIGHTS
    write_init(init, {n: infos[n].dtype for n in init if n in infos}, path)
    torch, _, peft = _stack()
    return path, (f"{PEFT_INIT}:{seed} (regenerated by peft {peft.__version__}, torch "
                  f"{torch.__version__})")


Layout = list[tuple[str, str, tuple[int, ...]]]


def _output_files(source: Source, folder: Any, layout: Layout
                  ) -> tuple[list[tuple[str | None, Layout]], tuple[str, bytes] | None]:
    """The safetensors files a decompress writes: ``[(name in the output directory, or None
    for the output file itself; its tensors)]``, and a shards index ``(name, bytes)``.

    A model folder comes back as transformers saves one: ``model.safetensors``, or the
    original's shards (``pytorch_model-00001-of-00002.bin`` becomes
    ``model-00001-of-00002.safetensors``) with ``model.safetensors.index.json``.
    """
    if source.folder == "adapter":
        return [(ADAPTER_WEIGHTS, layout)], None
    if source.folder != "model":
        return [(None, layout)], None
    weight_map = folder.get("weight_map") if isinstance(folder, dict) else None
    if not (isinstance(weight_map, dict) and weight_map and all(
            isinstance(v, str) and Path(v).name == v and v not in ("", ".", "..")
            for v in weight_map.values())):
        return [("model.safetensors", layout)], None

    def renamed(shard: str) -> str:
        if shard.endswith(".bin"):
            shard = shard.removesuffix(".bin") + ".safetensors"
            if shard.startswith("pytorch_model"):
                shard = "model" + shard.removeprefix("pytorch_model")
        return shard

    shards = sorted({renamed(v) for v in weight_map.values()})
    parts: dict[str, Layout] = {s: [] for s in shards}
    out_map = {}
    for entry in layout:  # a tensor the original did not map (a base's): the last shard
        shard = renamed(weight_map[entry[0]]) if entry[0] in weight_map else shards[-1]
        parts[shard].append(entry)
        out_map[entry[0]] = shard
    meta = folder.get("index_metadata")
    meta = dict(meta) if isinstance(meta, dict) else {}
    meta["total_size"] = sum(math.prod(s) * S.ITEMSIZE[d] for _, d, s in layout)
    text = json.dumps({"metadata": meta, "weight_map": out_map}, indent=2, sort_keys=True)
    return ([(s, parts[s]) for s in shards if parts[s]],
            ("model.safetensors.index.json", (text + "\n").encode("utf-8")))
