"""Tensor readers besides one safetensors file: pickled torch weights, and shards.

Every reader offers what the converters use of
:class:`~compeft_format.safetensors_io.SafetensorsReader`: ``keys()``, ``info(name)``
(``dtype``, ``shape``, ``numel``, ``nbytes``), ``get(name)`` (the storage array and its
dtype name), ``raw(name)``, ``release(name)``, ``metadata``, ``path`` and ``close()``.

* :class:`TorchReader`: a ``pytorch_model.bin`` / ``adapter_model.bin`` (any ``torch.save``
  of a flat ``{name: tensor}`` dict) read with ``torch.load(weights_only=True)``, the
  restricted unpickler that builds tensors and plain containers and nothing else: a file
  whose unpickling would call anything else is refused (:class:`UnsafePickleError`) and that
  code never runs. The file is memory-mapped where its format allows (``mmap=True``).
* :class:`ShardedReader`: the shards of a Hugging Face checkpoint, by the ``weight_map`` of
  its ``*.index.json``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import dtypes as _dt
from .errors import ConvertError
from .safetensors_io import SafetensorsReader, TensorEntry, WeightsReader

__all__ = ["ShardedReader", "TorchReader", "UnsafePickleError", "open_weights"]

class UnsafePickleError(ConvertError):
    """A pickled weights file needs more than tensors to load; it was not loaded."""


def _one_line(exc: BaseException) -> str:
    """The line of torch's (long, multi-line) refusal that says what was refused."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if "Unsupported" in ln or "unsupported" in ln or "not an allowed global" in ln:
            return ln.removeprefix("WeightsUnpickler error: ")
    return lines[0] if lines else type(exc).__name__


class TorchReader(WeightsReader):
    """A pickled torch state dict, loaded with ``torch.load(weights_only=True)``.

    Tensors are viewed as numpy storage (BF16 and F8 as their raw bits) on access; with a
    zip-format file (every ``torch.save`` since torch 1.6) the data stays memory-mapped.
    Tensors sharing storage (tied weights) are read as separate tensors.

    >>> import os, tempfile, torch
    >>> p = os.path.join(tempfile.mkdtemp(), "adapter_model.bin")
    >>> torch.save({"w": torch.ones(2, 3, dtype=torch.bfloat16)}, p)
    >>> with TorchReader(p) as r:
    ...     r.keys(), r.info("w").dtype, r.info("w").shape, r.values("w").sum()
    (['w'], 'BF16', (2, 3), np.float32(6.0))
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._tensors: dict[str, Any] = {}
        self._entries: dict[str, TensorEntry] = {}
        self._names = self._entries  # WeightsReader's names
        self.metadata: dict[str, str] = {}
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a test dependency
            raise ConvertError(f"{self.path}: reading pickled torch weights needs torch "
                               "(pip install torch)") from None
        if not os.path.isfile(self.path):
            raise FileNotFoundError(2, "No such file or directory", self.path)
        try:
            with warnings.catch_warnings():  # e.g. "pickle protocol 4": refused or not, below
                warnings.simplefilter("ignore")
                try:
                    state = torch.load(self.path, map_location="cpu", weights_only=True,
                                       mmap=True)
                except RuntimeError as exc:  # a legacy (pre-zip) file cannot be mapped
                    if "mmap" not in str(exc) and "zip" not in str(exc):
                        raise
                    state = torch.load(self.path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "global" not in str(exc).lower():  # an opcode the safe loader does not read
                raise ConvertError(f"{self.path}: not a torch weights file ({_one_line(exc)}; "
                                   "read with torch.load(weights_only=True))") from None
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            what = found.group(1) if found else _one_line(exc)
            raise UnsafePickleError(
                f"{self.path}: refused: its pickle would call {what}, not only build tensors; "
                "it is read only with torch.load(weights_only=True), never executed") from None
        except OSError:
            raise
        except Exception as exc:  # torch raises many types for a file that is not its own
            raise ConvertError(f"{self.path}: not a torch weights file "
                               f"({type(exc).__name__}: {_one_line(exc)})") from None
        if not isinstance(state, Mapping):
            raise ConvertError(f"{self.path}: holds a {type(state).__name__}, not a "
                               "{name: tensor} state dict")
        for name, t in state.items():
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise ConvertError(f"{self.path}: entry {name!r} is a {type(t).__name__}, "
                                   "not a tensor (a flat state dict is needed)")
            if t.layout != torch.strided or t.is_quantized:
                raise ConvertError(f"{self.path}: a {t.layout} tensor is not supported",
                                   tensor=name)
            dname = _dt.torch_dtype_name(t.dtype)
            if dname is None:
                raise ConvertError(f"{self.path}: torch dtype {t.dtype} has no safetensors "
                                   "equivalent", tensor=name)
            self._tensors[name] = t
            shape = tuple(int(d) for d in t.shape)
            self._entries[name] = TensorEntry(name, dname, shape, 0,
                                              t.numel() * t.element_size())

    def info(self, name: str) -> TensorEntry:
        """The tensor's entry (``offset`` is 0: a pickle has no fixed layout)."""
        return self._entries[name]

    def get(self, name: str) -> tuple[np.ndarray, str]:
        """``(storage array, dtype name)``, read-only; a view of the mapped data when the
        tensor is contiguous."""
        arr, dname = _dt.to_storage(self._tensors[name])
        arr.flags.writeable = False
        return arr, dname

    def values(self, name: str) -> np.ndarray:
        """The numeric values (float32 for BF16/F8)."""
        arr, dtype = self.get(name)
        return _dt.to_numpy_values(arr, dtype)

    def raw(self, name: str) -> memoryview:
        """The tensor's bytes, little-endian, C order."""
        return memoryview(self.get(name)[0].reshape(-1).view(np.uint8))

    def release(self, name: str | None = None) -> None:
        """Nothing to do: torch owns the mapping (its pages are dropped under pressure)."""

    def close(self) -> None:
        """Drop the tensors."""
        self._tensors.clear()

    def __repr__(self) -> str:
        return f"TorchReader({self.path!r}, {len(self)} tensors)"


def read_index(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, Any]]:
    """``(weight_map, metadata)`` of a Hugging Face ``*.index.json``, checked.

    >>> import os, pathlib, tempfile, json
    >>> p = os.path.join(tempfile.mkdtemp(), "model.safetensors.index.json")
    >>> _ = pathlib.Path(p).write_text(json.dumps({"metadata": {"total_size": 8},
    ...                                    "weight_map": {"w": "model-1.safetensors"}}))
    >>> read_index(p)
    ({'w': 'model-1.safetensors'}, {'total_size': 8})
    """
    p = Path(path)
    try:
        index = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConvertError(f"{p}: not valid JSON: {exc}") from None
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise ConvertError(f"{p}: no weight_map object of tensor name -> shard file")
    for shard in set(wm.values()):
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise ConvertError(f"{p}: shard {shard!r} is not a file name in the folder")
    meta = index.get("metadata")
    return dict(wm), dict(meta) if isinstance(meta, dict) else {}


class ShardedReader(WeightsReader):
    """The shards of one checkpoint as one reader, by the ``weight_map`` of its index.

    Every shard must hold exactly the tensors the index maps to it. ``metadata`` is the
    first shard's (``{"format": "pt"}`` for a transformers checkpoint); ``index_metadata``
    the index's own (``total_size``...).

    >>> import os, pathlib, tempfile, json, numpy as np
    >>> from compeft_format.safetensors_io import save_safetensors
    >>> d = tempfile.mkdtemp()
    >>> save_safetensors({"a": np.ones(2, np.float32)}, os.path.join(d, "m-1.safetensors"))
    >>> save_safetensors({"b": np.zeros(3, np.float32)}, os.path.join(d, "m-2.safetensors"))
    >>> idx = os.path.join(d, "model.safetensors.index.json")
    >>> _ = pathlib.Path(idx).write_text(json.dumps({"weight_map": {"a": "m-1.safetensors",
    ...                                                     "b": "m-2.safetensors"}}))
    >>> with ShardedReader(idx) as r:
    ...     r.keys(), r.shard_of("b"), r.values("b").shape
    (['a', 'b'], 'm-2.safetensors', (3,))
    """

    def __init__(self, index: str | os.PathLike) -> None:
        self.path = os.fspath(index)
        self.weight_map, self.index_metadata = read_index(index)
        self._names = self.weight_map  # WeightsReader's names
        folder = Path(index).parent
        self.shards: list[str] = sorted(set(self.weight_map.values()))
        self._readers: dict[str, Any] = {}
        try:
            for shard in self.shards:
                r = open_weights(folder / shard)
                self._readers[shard] = r
                want = sorted(n for n, s in self.weight_map.items() if s == shard)
                if r.keys() != want:
                    missing = sorted(set(want) - set(r.keys()))
                    extra = sorted(set(r.keys()) - set(want))
                    raise ConvertError(f"{r.path}: does not hold what {self.path} maps to it: "
                                       f"{len(missing)} missing {missing[:3]}, {len(extra)} "
                                       f"not in the index {extra[:3]}")
        except BaseException:
            self.close()
            raise
        first = self._readers[self.shards[0]] if self.shards else None
        self.metadata: dict[str, str] = dict(first.metadata) if first is not None else {}

    def shard_of(self, name: str) -> str:
        """The shard file name holding ``name``."""
        return self.weight_map[name]

    def _reader(self, name: str) -> Any:
        return self._readers[self.weight_map[name]]

    def info(self, name: str) -> TensorEntry:
        """The tensor's entry in its shard."""
        return self._reader(name).info(name)

    def get(self, name: str) -> tuple[np.ndarray, str]:
        """``(storage array, dtype name)`` from its shard."""
        return self._reader(name).get(name)

    def values(self, name: str) -> np.ndarray:
        """The numeric values (float32 for BF16/F8)."""
        return self._reader(name).values(name)

    def raw(self, name: str) -> memoryview:
        """The tensor's bytes."""
        return self._reader(name).raw(name)

    def release(self, name: str | None = None) -> None:
        """Drop the pages of ``name`` (or of every shard) from resident memory."""
        if name is not None:
            self._reader(name).release(name)
            return
        for r in self._readers.values():
            r.release()

    def close(self) -> None:
        """Close every shard."""
        for r in self._readers.values():
            r.close()

    def __repr__(self) -> str:
        return f"ShardedReader({self.path!r}, {len(self.shards)} shards, {len(self)} tensors)"


def _is_torch_file(path: str) -> bool:
    """What ``torch.save`` writes: a zip archive, or (before torch 1.6) a pickle stream."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: u64 header length, then JSON
        return False
    return head.startswith((b"PK\x03\x04", b"\x80"))


def open_weights(path: str | os.PathLike) -> Any:
    """A reader of one weights file: an ``*.index.json`` (its shards), a pickled torch file
    (what ``torch.save`` writes, whatever its name: ``.bin``, ``.pt``...), else a safetensors
    file (which reports what is wrong with anything else).

    >>> import os, tempfile, numpy as np
    >>> from compeft_format.safetensors_io import save_safetensors
    >>> p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> save_safetensors({"w": np.ones(2, np.float32)}, p)
    >>> open_weights(p)
    SafetensorsReader('...m.safetensors', 1 tensors)
    """
    name = os.fspath(path)
    if name.endswith(".index.json"):
        return ShardedReader(name)
    if _is_torch_file(name):
        return TorchReader(name)
    return SafetensorsReader(name)
