"""Restoring weights from compeft files: :func:`decompress_file`, the inverse of
:func:`~compeft_format.convert.compress_file`.

It writes a compeft file (or compressed adapter directory, or model folder) back as
safetensors with the original names, shapes and dtypes, adding the base back where the task
vector was measured from one (a checkpoint given with ``base=``, PEFT's regenerated initial
adapter, or the one of (IA)^3), each ``base + task vector`` rounded once. It goes tensor by
tensor and chunk by chunk over memory-mapped inputs: it holds one compressed tensor and a
few MiB of output at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from . import _spec as S
from . import dtypes as _dt
from ._progress import Bar
from .binding import Reference, check_regenerated_base, holds_its_recipe, read_reference
from .container import open_file
from .errors import ConvertError, EncodeError, naming
from .hifi import HIFI_KEY, hifi_decode, hifi_layout
from .outputs import Output, copy_companions, write_fsync
from .peft_init import META_PEFT_INIT, PEFT_INIT, parse_peft_init
from .plan import CHUNK, META_MODEL_FOLDER, META_SAFETENSORS
from .readers import open_weights
from .safetensors_io import SafetensorsWriter
from .sources import (
    ADAPTER_COMPEFT,
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    Source,
    base_weights,
    resolve_source,
)
from .summary import DecompressSummary
from .taskvec import add_rounded, cast_storage
from .tensor import TernaryTensor

__all__ = ["OUTPUT_DTYPES", "decompress_file"]

#: ``dtype=`` of :func:`decompress_file` (``--dtype``): the float dtypes an output can take.
OUTPUT_DTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}


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
    out_dtype = _output_dtype(dtype)
    source = resolve_source(src, ADAPTER_COMPEFT,
                            "decompress reads a compressed adapter directory")
    from_init, _ = parse_peft_init(base)
    base_path = base_weights(base) if base is not None and not from_init else None
    inputs = [source.path, source.weights] + ([Path(base), base_path] if base_path else [])
    out = Output(dst, is_dir=source.is_dir, force=force, inputs=inputs)

    with contextlib.ExitStack() as stack:
        stored = _Stored.open(source, stack)
        ref = read_reference(stored.meta, set(stored.infos), source.weights)
        base_reader, regenerated = _bind_base(source, stored, ref, base_path, from_init,
                                              base_model, progress, stack)
        tensors = _Tensors.plan(stored, ref, base_reader, out_dtype)
        files, index = _output_files(source, stored.metadata.get(META_MODEL_FOLDER),
                                     tensors.layout)
        st_meta = _safetensors_metadata(stored.metadata, source)
        bar = stack.enter_context(Bar(progress, len(tensors.layout), "decompress"))

        def writer(part: Layout) -> Callable[[BinaryIO], None]:
            def write(f: BinaryIO) -> None:
                with SafetensorsWriter(f, part, metadata=st_meta) as w:
                    for n in w.order:
                        for chunk in tensors.produce(n, stored, base_reader):
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
            copy_companions(source, out)
        written = [out.dst / name if name else out.dst for name, _ in files]
        final = out.dst / index[0] if index is not None else written[0]
        return DecompressSummary(
            source=str(source.path), output=str(out.dst), file=str(final),
            tensors=len(tensors.layout), numel=sum(math.prod(s) for _, _, s in tensors.layout),
            file_bytes=sum(p.stat().st_size for p in written),
            reference=ref.kind, base=str(base) if base is not None and not from_init
            else regenerated, dtype=out_dtype)
    raise AssertionError("unreachable")  # pragma: no cover


def _output_dtype(dtype: str | None) -> str | None:
    """``dtype=`` as a safetensors dtype name (``"f16"`` -> ``"F16"``), checked."""
    if dtype is None:
        return None
    out_dtype = OUTPUT_DTYPES.get(str(dtype).lower(), str(dtype).upper())
    if out_dtype not in OUTPUT_DTYPES.values():
        raise EncodeError(f"dtype must be one of {sorted(OUTPUT_DTYPES)}, got {dtype!r}")
    return out_dtype


@dataclasses.dataclass
class _Stored:
    """The compeft file being restored: its reader, tensor infos (hi-fi tensors under the
    dtype their codes stand for), hi-fi steps, and metadata (``meta`` without the hi-fi key,
    as the binding reads it; ``metadata`` as stored)."""

    reader: Any
    infos: dict[str, Any]
    hifi: dict[str, tuple[float | None, str | None]]
    meta: dict[str, Any]
    metadata: dict[str, Any]
    path: Path

    @classmethod
    def open(cls, source: Source, stack: contextlib.ExitStack) -> _Stored:
        with naming(source.weights):
            cf = stack.enter_context(open_file(source.weights))
            infos = {n: cf.info(n) for n in cf}
        meta = cf.metadata()
        hifi: dict[str, tuple[float | None, str | None]] = {}
        if HIFI_KEY in meta:  # integer codes: decoded with their steps, in their dtypes
            hifi = hifi_layout(meta, cf.keys(), infos, str(source.weights))
            infos = {n: i if hifi[n][0] is None else dataclasses.replace(
                i, dtype=hifi[n][1] or "F32") for n, i in infos.items()}
            meta = {k: v for k, v in meta.items() if k != HIFI_KEY}
        return cls(cf, infos, hifi, meta, cf.metadata(), source.weights)

    def part(self, n: str) -> tuple[Callable[[int, int], np.ndarray], str]:
        """``part(a, z)``: flat elements ``a:z`` of tensor ``n`` as stored (a ternary
        tensor's values in its dtype's storage, hi-fi codes decoded), and that dtype."""
        rec_dt = self.infos[n].dtype
        with naming(self.path):
            value = self.reader.get_raw(n)
        step = self.hifi[n][0] if n in self.hifi else None
        if step is not None:
            codes = value[0].reshape(-1)
            return (lambda a, z: hifi_decode(codes[a:z], step)), "F32"
        if isinstance(value, TernaryTensor):
            vals = _signed_values(value, rec_dt)
            return (lambda a, z: _ternary_chunk(value, a, z, vals)), rec_dt
        dense = value[0].reshape(-1)
        return (lambda a, z: dense[a:z]), rec_dt


def _bind_base(source: Source, stored: _Stored, ref: Reference, base_path: Path | None,
               from_init: bool, base_model: str | os.PathLike | None, progress: bool,
               stack: contextlib.ExitStack) -> tuple[Any, str | None]:
    """The base the task vector is added to, opened and checked against the recorded
    binding (given, or regenerated from a ``compeft.base.peft_init`` recipe), or None; and
    the regenerated base's description."""
    label = f" {ref.name!r}" if ref.name else ""
    recorded = stored.metadata.get(S.META_BASE)
    recorded = recorded.get(META_PEFT_INIT) if isinstance(recorded, dict) else None
    if from_init and not (ref.kind == "checkpoint" and recorded is not None):
        raise ConvertError(f"{source.path}: not compressed from PEFT's regenerated initial "
                           f"adapter (no compeft.base.{META_PEFT_INIT}); "
                           f"--base {PEFT_INIT} does not apply")
    regenerated = None
    if ref.kind == "checkpoint" and base_path is None and recorded is not None:
        base_path, regenerated = _regenerated_base(source, recorded, stored.infos, base_model,
                                                   stack)
    if ref.kind == "checkpoint" and base_path is None:
        raise ConvertError(
            f"{source.path}: the task vector is measured from the base{label} "
            f"({len(ref.delta)} tensors); give it with --base (base=) to write "
            "the full tensors")
    if base_path is not None and ref.stored_as_is:
        if ref.kind == "one":
            # the base used at compression, when it held the type's initial values (ones):
            # the file records the recipe instead, and the base adds nothing to it
            with open_weights(base_path) as given:
                if holds_its_recipe(ref, given):
                    return None, None
        raise ConvertError(f"{source.path}: holds a PEFT {ref.peft_type} adapter stored as "
                           "it is (from zero or one), which takes no --base")
    if base_path is None:
        return None, None
    base_reader = stack.enter_context(open_weights(base_path))
    check_regenerated_base(ref, base_reader, stored.infos, progress, regenerated=regenerated,
                           recipe=_versions(recorded) if regenerated else "",
                           where=str(source.path), give="--base")
    return base_reader, regenerated


def _safetensors_metadata(metadata: Mapping[str, Any], source: Source) -> dict[str, str] | None:
    """The source's safetensors metadata, recorded at compression, for the output's header."""
    st_meta = metadata.get(META_SAFETENSORS)
    if not (isinstance(st_meta, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in st_meta.items())):
        st_meta = None
    if source.is_model and st_meta is None:  # from pickled weights: transformers wants it
        st_meta = {"format": "pt"}
    return st_meta


@dataclasses.dataclass
class _Tensors:
    """What a decompress writes: every tensor's name, storage dtype and shape; those that
    get a base added (``adds``); and the output dtype ``out_dtype`` of float tensors."""

    dtypes: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    adds: set[str]
    out_dtype: str | None

    @classmethod
    def plan(cls, stored: _Stored, ref: Reference, base_reader: Any,
             out_dtype: str | None) -> _Tensors:
        # A plain task vector added to a base gives every base tensor, in the base's dtype;
        # otherwise the file's tensors, in their own dtypes, with the base (or the one of
        # (IA)^3) added to those stored as a difference.
        infos = stored.infos
        if base_reader is not None and ref.kind == "zero":
            names = base_reader.keys()
            return cls({n: base_reader.info(n).dtype for n in names},
                       {n: base_reader.info(n).shape for n in names}, set(infos), out_dtype)
        return cls({n: infos[n].dtype for n in infos},
                   {n: tuple(infos[n].shape) for n in infos}, set(ref.delta), out_dtype)

    def out_dt(self, n: str) -> str:
        d = self.dtypes[n]
        return self.out_dtype if self.out_dtype is not None and d in S.TERNARY_DTYPES else d

    @property
    def layout(self) -> Layout:
        return [(n, self.out_dt(n), self.shapes[n]) for n in self.dtypes]

    def _cast(self, n: str, storage: np.ndarray, src: str, dst: str | None) -> np.ndarray:
        """``cast_storage``, refusing a value that the ``dtype`` asked for cannot hold (a
        finite value that would become infinity), rather than writing it."""
        out = cast_storage(storage, src, dst)[0]
        if dst in ("F16", "BF16") and dst != src and src in S.TERNARY_DTYPES:
            inf = np.isinf(_dt.to_numpy_values(out, dst))
            if not inf.any():  # the common case: one look at the output
                return out
            before = _dt.to_numpy_values(storage, src)
            lost = inf & np.isfinite(before)
            if lost.any():
                raise ConvertError(
                    f"tensor {n!r}: {int(lost.sum())} values overflow {dst} (largest "
                    f"{float(np.abs(before[lost]).max()):.6g}); decompress it to a wider "
                    "dtype")
        return out

    def produce(self, n: str, stored: _Stored, base_reader: Any) -> Iterator[np.ndarray]:
        """The output storage of tensor ``n``, chunk by chunk (a few MiB each)."""
        dt, total = self.dtypes[n], math.prod(self.shapes[n])
        if n not in stored.infos:  # a base tensor the task vector does not change
            flat = base_reader.get(n)[0].reshape(-1)
            for a, z in _chunks(total):
                yield self._cast(n, flat[a:z], dt, self.out_dtype)
                base_reader.release(n)
            return
        part, rec_dt = stored.part(n)
        if n not in self.adds:
            for a, z in _chunks(total):
                yield self._cast(n, part(a, z), rec_dt, self.out_dt(n))
            return
        bflat = base_reader.get(n)[0].reshape(-1) if base_reader is not None else None
        for a, z in _chunks(total):
            delta = _dt.to_numpy_values(part(a, z), rec_dt)
            if bflat is not None:
                b = bflat[a:z]
            else:  # reference one: (IA)^3 vectors start at one
                b = cast_storage(np.ones(z - a, np.float32), "F32", dt)[0]
            yield self._cast(n, add_rounded(b, dt, delta), dt, self.out_dtype)
            if base_reader is not None:  # each base chunk is read once
                base_reader.release(n)


def _versions(recipe: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {recipe[k]}" for k in ("peft", "torch", "transformers")
                     if isinstance(recipe.get(k), str))


def _regenerated_base(source: Source, recipe: Any, infos: Mapping[str, Any],
                      base_model: str | os.PathLike | None, stack: contextlib.ExitStack
                      ) -> tuple[Path, str]:
    """The initial adapter a file's ``compeft.base.peft_init`` recipe names, regenerated
    (from the adapter_config.json of the folder, or beside the file)."""
    from .peft_init import regenerated_file

    config = source.config or source.weights.parent / ADAPTER_CONFIG
    if not config.is_file():
        raise ConvertError(f"{source.path}: compressed from PEFT's initial adapter "
                           f"({recipe!r}), which is regenerated from {ADAPTER_CONFIG}: none "
                           "beside the file; give the initial adapter with --base")
    return regenerated_file(recipe, config, {n: i.dtype for n, i in infos.items()}, stack,
                            base_model=base_model, where=source.weights)


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
