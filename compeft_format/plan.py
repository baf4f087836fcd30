"""The plan of a compression: what the task vector is measured from, and its values.

:func:`make_plan` decides, for a source (and an optional base), which tensors are compressed
and what each is measured from (metadata ``task_vector``: ``zero``, ``one`` or
``checkpoint``; see :mod:`compeft_format.convert`), with the base's ``compeft.base`` record
(its sha256 hashes). :func:`file_metadata` is the file metadata written from a plan;
:class:`FileTaskVector` computes the task vector tensor by tensor over memory-mapped inputs.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import _spec as S
from . import dtypes as _dt
from ._progress import Bar
from ._version import __version__
from .errors import ConvertError, EncodeError
from .passes import ChunkedValues
from .safetensors_io import SafetensorsReader
from .sources import (
    ADAPTER_WEIGHTS,
    ADAPTER_WEIGHTS_BIN,
    MODEL_WEIGHTS,
    Source,
)
from .taskvec import PEFT_TYPES, peft_task_vector

__all__ = [
    "CHUNK",
    "META_MODEL_FOLDER",
    "META_SAFETENSORS",
    "META_TASK_VECTOR",
    "REFERENCES",
    "FileTaskVector",
    "Plan",
    "base_binding",
    "delta_field",
    "file_metadata",
    "holds_constants",
    "make_plan",
    "tensor_sha256",
    "work_dtype",
]

#: Metadata key holding the source's safetensors ``__metadata__`` (restored on decompress).
META_SAFETENSORS = "safetensors.metadata"
#: Metadata key recording what the task vector is measured from (see the module doc).
META_TASK_VECTOR = "task_vector"
#: Metadata key of a model folder's layout (its shards), restored on decompress.
META_MODEL_FOLDER = "model_folder"
#: The values of ``task_vector["reference"]``.
REFERENCES = ("zero", "one", "checkpoint")
#: Weights files named for their directory: a base given as one records the directory's name.
FOLDER_WEIGHTS = (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN, *MODEL_WEIGHTS)
#: Elements per chunk of a tensor being decoded, added or converted.
CHUNK = 1 << 20


def delta_field(delta: list[str], names: list[str]) -> dict[str, list[str]]:
    """The ``task_vector`` member naming the tensors stored as a difference: ``delta`` (the
    names), or ``delta_all_but`` (the file's other tensors) when that is shorter, as it is
    when every compressed tensor is a difference (names are most of small files' metadata).

    >>> delta_field(["a", "b"], ["a", "b", "c"])
    {'delta_all_but': ['c']}
    """
    chosen = set(delta)
    others = [n for n in names if n not in chosen]
    return {"delta_all_but": others} if len(others) < len(delta) else {"delta": list(delta)}


def base_binding(digests: Mapping[str, str]) -> dict[str, str]:
    """The compact base binding (spec 5.2.1, format 1.1) of ``{tensor: "sha256:<hex>"}``.

    ``sha256``: the sha256 of the tensors' 32-byte sha256 digests, concatenated in increasing
    UTF-8 order of their names: one digest binds the whole base. ``digests``: base64 of the
    first 2 bytes of each tensor's digest, in the same order, so that a check can name the
    tensor that differs. About 3 bytes a tensor instead of 75 plus its name.

    >>> b = base_binding({"w": "sha256:" + "ab" * 32})
    >>> b["digests"], b["sha256"][:15]
    ('q6s=', 'sha256:9a2db2e2')
    """
    order = sorted(digests, key=lambda n: n.encode("utf-8"))
    raw = [bytes.fromhex(digests[n].removeprefix("sha256:")) for n in order]
    return {"sha256": "sha256:" + hashlib.sha256(b"".join(raw)).hexdigest(),
            "digests": base64.b64encode(b"".join(d[:SHORT_DIGEST] for d in raw)).decode()}


#: bytes of each tensor's digest kept in ``compeft.base.digests``
SHORT_DIGEST = 2


def work_dtype(dtype: str) -> np.dtype:
    """The dtype a task vector of ``dtype`` tensors is computed in: float64 for F64, else
    float32 (exact for BF16 and F16).

    >>> work_dtype("BF16"), work_dtype("F64")
    (dtype('float32'), dtype('float64'))
    """
    return np.dtype(np.float64 if dtype == "F64" else np.float32)


def tensor_sha256(reader: SafetensorsReader, name: str) -> str:
    """``"sha256:<hex>"`` of tensor ``name``'s raw bytes, read 16 MiB at a time.

    >>> import os, tempfile, numpy as np
    >>> from compeft_format.safetensors_io import save_safetensors
    >>> p = os.path.join(tempfile.mkdtemp(), "b.safetensors")
    >>> save_safetensors({"w": np.zeros(2, np.float32)}, p)
    >>> with SafetensorsReader(p) as r:
    ...     tensor_sha256(r, "w")[:19]
    'sha256:af5570f5a181'
    """
    h = hashlib.sha256()
    raw = reader.raw(name)
    for start in range(0, len(raw), 1 << 24):
        h.update(raw[start : start + (1 << 24)])
    raw.release()
    reader.release(name)
    return "sha256:" + h.hexdigest()


class FileTaskVector(Mapping):
    """The task vector of the compressible tensors, computed on access, one tensor at a time.

    ``compress`` and ``quality_report`` read it name by name; each access first drops the
    pages of the tensors read before from resident memory, so a pass over a model holds
    about one input tensor. ``.dtypes`` names the original dtypes (BF16 arrives widened).
    ``base`` gives ``tensor - base`` (a :class:`~compeft_format.compress.ChunkedValues`,
    never held whole); else ``peft_type`` gives an adapter's task vector (taskvec's rules:
    LoRA from zero, (IA)^3 from one); else the tensors as they are.

    >>> import os, tempfile, numpy as np
    >>> from compeft_format.safetensors_io import save_safetensors
    >>> p = os.path.join(tempfile.mkdtemp(), "a.safetensors")
    >>> save_safetensors({"ia3_l": np.full(3, 1.5, np.float32)}, p)
    >>> with SafetensorsReader(p) as r:
    ...     FileTaskVector(["ia3_l"], r, None, "IA3")["ia3_l"].tolist()
    [0.5, 0.5, 0.5]
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

    def __getitem__(self, name: str) -> np.ndarray | ChunkedValues:
        if name not in self.dtypes:
            raise KeyError(name)
        self._reader.release()
        if self._base is not None:
            self._base.release()
        if self._on_fetch is not None:
            self._on_fetch(name)
        storage, dtype = self._reader.get(name)
        if self._base is not None:
            return self._chunked_difference(name, storage, dtype)
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
        if self._peft_type is not None and self._base is None:
            whole = self[name].reshape(-1)
            for start in range(0, whole.size, size):
                yield start, whole[start : start + size]
            return
        storage, dtype = self._reader.get(name)
        flat = storage.reshape(-1)
        b_flat = self._base.get(name)[0].reshape(-1) if self._base is not None else None
        work = work_dtype(dtype)
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
        for start in range(0, flat.size, CHUNK):
            out[start : start + CHUNK] = _dt.bf16_bits_to_f32(flat[start : start + CHUNK])
            self._reader.release(name)
        return out.reshape(storage.shape)

    def _chunked_difference(self, name: str, storage: np.ndarray, dtype: str
                            ) -> ChunkedValues:
        """``tensor - base`` as :class:`~compeft_format.compress.ChunkedValues`: made a
        chunk at a time by compress's threads, never held whole (a model's largest
        difference, in float32, would be twice its BF16 tensor)."""
        assert self._base is not None
        base, reader = self._base, self._reader
        flat, b_flat = storage.reshape(-1), base.get(name)[0].reshape(-1)
        work = work_dtype(dtype)

        def values(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            x = _dt.to_numpy_values(a, dtype).astype(work, copy=False)
            return np.subtract(x, _dt.to_numpy_values(b, dtype).astype(work, copy=False),
                               dtype=work)

        def chunk(start: int, stop: int) -> np.ndarray:
            out = values(flat[start:stop], b_flat[start:stop])
            # the inputs are read once a pass: drop the pages each 8 chunks (whatever the
            # caller's chunk size: compress's passes take CHUNK, kron_sketch blocks of rows)
            if stop // (8 * CHUNK) > start // (8 * CHUNK):
                reader.release(name)
                base.release(name)
            return out

        def take(indices: np.ndarray) -> np.ndarray:
            return values(flat[indices], b_flat[indices])

        return ChunkedValues(storage.shape, work, chunk, take)


@dataclass
class Plan:
    """Which tensors are compressed (``compressible``), the ``task_vector`` metadata
    (``reference``) and the ``compeft.base`` metadata (``base``); see :func:`make_plan`."""

    compressible: list[str]
    reference: dict[str, Any]  # the task_vector metadata
    base: dict[str, Any] | None = None  # the compeft.base metadata
    #: a model folder's layout (metadata ``model_folder``): its weights file name, and for
    #: shards the index's ``weight_map`` and ``metadata``
    folder: dict[str, Any] | None = None
    #: with a base: the source's tensors the base lacks (stored as they are), and the
    #: base's tensors the source lacks (not used)
    only_in_source: list[str] = field(default_factory=list)
    only_in_base: list[str] = field(default_factory=list)


def make_plan(source: Source, reader: SafetensorsReader, base: SafetensorsReader | None,
              base_path: Path | None, patterns: tuple[str, ...], bar_enabled: bool,
              partial_init: bool = False) -> Plan:
    """Decide what the task vector of ``source`` is measured from, and which tensors are
    compressed (see :mod:`compeft_format.convert`'s module doc for the three references).

    ``base`` (read from ``base_path``) is the base checkpoint or initial adapter, or None;
    ``patterns`` the fnmatch patterns of names kept dense; ``partial_init``: the base is an
    adapter's initial state that holds only some of its tensors (PEFT's regenerated
    ``lora_*`` ones: :mod:`compeft_format.peft_init`), the others stored as they are. A
    base's sha256 hashes are
    computed here (a progress bar when ``bar_enabled``). Raises
    :class:`~compeft_format.errors.ConvertError` for a base that does not fit the source,
    an adapter type with no known initial value.

    >>> import os, tempfile, numpy as np
    >>> from compeft_format.safetensors_io import save_safetensors
    >>> p = os.path.join(tempfile.mkdtemp(), "tv.safetensors")
    >>> save_safetensors({"w": np.zeros(4, np.float32), "ids": np.arange(2)}, p)
    >>> with SafetensorsReader(p) as r:
    ...     plan = make_plan(Source(Path(p), Path(p)), r, None, None, (), False)
    >>> plan.compressible, plan.reference, plan.base
    (['w'], {'reference': 'zero'}, None)
    """
    plan = _plan(source, reader, base, base_path, patterns, bar_enabled, partial_init)
    if source.is_model:
        plan.folder = {"weights": source.weights.name}
        if hasattr(reader, "weight_map"):
            plan.folder["weight_map"] = dict(reader.weight_map)
            plan.folder["index_metadata"] = dict(reader.index_metadata)
    return plan


def _plan(source: Source, reader: Any, base: Any, base_path: Path | None,
          patterns: tuple[str, ...], bar_enabled: bool, partial_init: bool = False) -> Plan:
    names = reader.keys()
    excluded = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}

    def is_float(n: str, r: SafetensorsReader = reader) -> bool:
        return r.info(n).dtype in S.TERNARY_DTYPES

    if base is None:
        compressible = [n for n in names if n not in excluded and is_float(n)]
        if source.peft_type is None:
            return Plan(compressible, {"reference": "zero"})
        if source.peft_type.upper() not in PEFT_TYPES:
            raise ConvertError(f"{source.config}: peft_type {source.peft_type!r} has no known "
                               f"initial value ({'/'.join(PEFT_TYPES)} do); give the initial "
                               "adapter with --base (base=)")
        return _recipe_plan(source, names, compressible, _from_one(source, compressible))

    assert base_path is not None
    base_names = set(base.keys())
    if source.config is not None:  # an adapter's initial state must have the same tensors
        missing = [] if partial_init else [n for n in names if n not in base_names]
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
    if (source.config is not None and source.peft_type is not None and compressible
            and source.peft_type.upper() in PEFT_TYPES and base_names == set(names)):
        # an initial adapter that is the PEFT type's own constant init (an (IA)^3 adapter's
        # ones): the recipe says it exactly, in a few bytes instead of a digest per tensor,
        # and restoring needs no base (spec 5.2.1)
        from_one = set(_from_one(source, compressible))
        if holds_constants(base, {n: 1.0 if n in from_one else 0.0 for n in compressible}):
            return _recipe_plan(source, names, compressible, sorted(from_one))
    # the base binding: the tensors the task vector is measured from, and only those (a
    # base's other tensors are not needed to restore it)
    digests = {}
    with Bar(bar_enabled, len(compressible), "hash base") as bar:
        for n in compressible:
            digests[n] = tensor_sha256(base, n)
            bar.update()
    ref: dict[str, Any] = {"reference": "checkpoint", **delta_field(compressible, names)}
    if source.peft_type is not None:
        ref["peft_type"] = source.peft_type
    name = base_path.parent.name if base_path.name in FOLDER_WEIGHTS else base_path.name
    return Plan(compressible, ref, {"name": name, **base_binding(digests)},
                only_in_source=[n for n in names if n not in base_names],
                only_in_base=sorted(base_names - set(names)))


def _from_one(source: Source, compressible: list[str]) -> list[str]:
    """The tensors of a PEFT adapter whose initial value is one ((IA)^3's vectors)."""
    # ask taskvec which tensors start at one: it holds the rules (and rejects what it cannot
    # measure, such as a DoRA magnitude, before any work is done)
    assert source.peft_type is not None
    return [n for n in compressible
            if peft_task_vector({n: np.zeros(1, np.float32)}, source.peft_type)[n][0] != 0]


def _recipe_plan(source: Source, names: list[str], compressible: list[str],
                 from_one: list[str]) -> Plan:
    """The plan of an adapter measured from its PEFT type's initial values (no base file)."""
    base_meta = {"name": source.base_model} if source.base_model else None
    ref: dict[str, Any] = {"reference": "one" if from_one else "zero",
                           "peft_type": source.peft_type}
    if from_one:
        ref.update(delta_field(from_one, names))
    return Plan(compressible, ref, base_meta)


def holds_constants(reader: SafetensorsReader, values: Mapping[str, float]) -> bool:
    """Whether ``reader`` holds every tensor of ``values`` with every element equal to its
    value (an adapter's constant initial state: an (IA)^3 adapter's ones); it stops at the
    first tensor that differs, and reads 16 MiB at a time.

    >>> import os, tempfile, numpy as np
    >>> from compeft_format.safetensors_io import save_safetensors
    >>> p = os.path.join(tempfile.mkdtemp(), "b.safetensors")
    >>> save_safetensors({"g": np.ones(3, np.float32), "h": np.zeros(2, np.float32)}, p)
    >>> with SafetensorsReader(p) as r:
    ...     holds_constants(r, {"g": 1.0, "h": 0.0}), holds_constants(r, {"g": 0.0})
    (True, False)
    """
    return bool(values) and all(n in reader and _is_constant(reader, n, v)
                                for n, v in values.items())


def _is_constant(reader: SafetensorsReader, name: str, value: float) -> bool:
    """Whether every element of tensor ``name`` equals ``value`` (read 16 MiB at a time)."""
    raw = reader.raw(name)
    try:
        dtype = reader.info(name).dtype
        item = S.ITEMSIZE[dtype]
        want = None
        for start in range(0, len(raw), 1 << 24):
            chunk = raw[start : start + (1 << 24)]
            if want is None:  # the constant's bytes in the tensor's own dtype
                first = _dt.to_numpy_values(
                    np.frombuffer(chunk[:item], dtype=_dt.storage_dtype(dtype)), dtype)
                if first.size == 0 or float(first[0]) != value:
                    return False
                want = bytes(chunk[:item])
            if bytes(chunk) != want * (len(chunk) // item):
                return False
        return True
    finally:
        raw.release()


def file_metadata(plan: Plan, reader: SafetensorsReader, comp_meta: dict[str, Any],
                  patterns: tuple[str, ...],
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The metadata :func:`~compeft_format.convert.compress_file` writes (``compeft sweep``
    counts the same bytes): producer, compression options, ``task_vector``, ``compeft.base``,
    the source's safetensors metadata, then ``extra`` (its keys may not clash with these).

    >>> class R:
    ...     metadata = {}
    >>> file_metadata(Plan(["w"], {"reference": "zero"}), R(), {}, ())["task_vector"]
    {'reference': 'zero', 'exclude': []}
    """
    metadata: dict[str, Any] = {
        S.META_PRODUCER: f"compeft_format {__version__}",
        S.META_COMPRESSION: comp_meta,
        META_TASK_VECTOR: {**plan.reference, "exclude": list(patterns)},
    }
    if plan.base is not None:
        metadata[S.META_BASE] = plan.base
    if reader.metadata:
        metadata[META_SAFETENSORS] = dict(reader.metadata)
    if plan.folder is not None:
        metadata[META_MODEL_FOLDER] = plan.folder
    for key, value in (extra or {}).items():
        if not isinstance(key, str):  # JSON object keys are strings (spec 5.2)
            raise EncodeError(f"extra metadata keys must be strings, got {key!r}")
        if key in metadata or key in (S.META_BASE, META_SAFETENSORS, META_MODEL_FOLDER) or \
                key.startswith(S.META_RESERVED_PREFIX):
            raise EncodeError(f"extra metadata key {key!r} is written by compress_file itself "
                              "or reserved")
        metadata[key] = value
    return metadata

