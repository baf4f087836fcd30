"""Input resolution: what a path given to compress or decompress (or as a base) holds.

* A file: itself (``.safetensors``; pickled torch weights ``.bin``/``.pt``/``.pth``; a
  ``.compeft`` file to decompress). An adapter's weights file (``adapter_model.*``) with
  ``adapter_config.json`` beside it is that adapter: measured as its type requires.
* A PEFT adapter directory: ``adapter_config.json`` (its ``peft_type`` and
  ``base_model_name_or_path``) and its weights (``adapter_model.safetensors`` or
  ``adapter_model.bin`` to compress, ``adapter_model.compeft`` to decompress).
* A Hugging Face model folder: ``model.safetensors``, or shards with
  ``model.safetensors.index.json`` (or the pickled ``pytorch_model.bin`` and its index), to
  compress; ``model.compeft`` to decompress. Its other files (config, tokenizer...) travel
  with it (:func:`companion_files`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ConvertError

__all__ = [
    "ADAPTER_COMPEFT",
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "ADAPTER_WEIGHTS_BIN",
    "MODEL_COMPEFT",
    "MODEL_WEIGHTS",
    "Source",
    "base_weights",
    "companion_files",
    "resolve_source",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
ADAPTER_COMPEFT = "adapter_model.compeft"
#: A model folder's weights, in the order transformers prefers them.
MODEL_WEIGHTS = ("model.safetensors.index.json", "model.safetensors",
                 "pytorch_model.bin.index.json", "pytorch_model.bin")
MODEL_COMPEFT = "model.compeft"
#: Files of weights: never copied along with a model folder's small files.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack",
                   ".gguf", ".onnx", ".compeft", ".index.json")


@dataclass
class Source:
    """A resolved input: a file, an adapter directory or a model folder.

    ``weights`` is the file to read (a shards index for sharded weights); ``folder`` is
    ``"adapter"`` or ``"model"`` for a directory (the output is then a directory too), None
    for a file; ``config`` the adapter's ``adapter_config.json`` (of its directory, or beside
    its weights file given alone).

    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> open(os.path.join(d, "tv.safetensors"), "wb").close()
    >>> s = resolve_source(os.path.join(d, "tv.safetensors"), ADAPTER_WEIGHTS, "")
    >>> s.is_dir, s.peft_type, s.weights.name
    (False, None, 'tv.safetensors')
    """

    path: Path  # what the user gave
    weights: Path  # the tensor file (or shards index)
    config: Path | None = None  # adapter_config.json of an adapter
    peft_type: str | None = None
    base_model: str | None = None  # an adapter's base_model_name_or_path
    folder: str | None = None  # "adapter" or "model" for a directory

    @property
    def is_dir(self) -> bool:
        """A directory in, a directory out."""
        return self.folder is not None

    @property
    def is_model(self) -> bool:
        """A Hugging Face model folder."""
        return self.folder == "model"


def _adapter(p: Path, weights: Path, config: Path, folder: str | None) -> Source:
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
    return Source(p, weights, config, peft_type,
                  base_model if isinstance(base_model, str) and base_model else None, folder)


def resolve_source(path: str | os.PathLike, weights_name: str, what: str) -> Source:
    """Resolve a file, an adapter directory or a model folder (see the module doc).

    ``weights_name`` is the adapter weights the caller reads: :data:`ADAPTER_WEIGHTS` to
    compress (``adapter_model.bin`` is taken too), :data:`ADAPTER_COMPEFT` to decompress
    (and ``model.compeft`` in a model folder). ``what`` ends the message of a directory that
    lacks them. Raises :class:`~compeft_format.errors.ConvertError` for a directory that is
    neither, FileNotFoundError for a path that does not exist. Example: :class:`Source`.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(2, "No such file or directory", str(p))
    compressed = weights_name == ADAPTER_COMPEFT
    if not p.is_dir():
        config = p.parent / ADAPTER_CONFIG
        if not compressed and p.name in (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN) \
                and config.is_file():  # an adapter's weights given alone: still that adapter
            return _adapter(p, p, config, None)
        return Source(p, p)
    config = p / ADAPTER_CONFIG
    if config.is_file():
        names = (weights_name,) if compressed else (weights_name, ADAPTER_WEIGHTS_BIN)
        for name in names:
            if (p / name).is_file():
                return _adapter(p, p / name, config, "adapter")
        other = [n for n in (ADAPTER_WEIGHTS_BIN, ADAPTER_WEIGHTS, ADAPTER_COMPEFT)
                 if n not in names and (p / n).is_file()]
        hint = f" (it has {other[0]})" if other else ""
        raise ConvertError(f"{p}: {weights_name} is missing{hint}; {what}")
    for name in (MODEL_COMPEFT,) if compressed else MODEL_WEIGHTS:
        if (p / name).is_file():
            return Source(p, p / name, folder="model")
    if compressed and any((p / n).is_file() for n in MODEL_WEIGHTS):
        raise ConvertError(f"{p}: a model folder without {MODEL_COMPEFT}: not compressed; "
                           f"{what}")
    if not compressed and (p / MODEL_COMPEFT).is_file():
        raise ConvertError(f"{p}: holds {MODEL_COMPEFT}, a compressed model folder; "
                           "decompress it")
    want = MODEL_COMPEFT if compressed else ", ".join(MODEL_WEIGHTS)
    raise ConvertError(f"{p}: not a PEFT adapter directory: {ADAPTER_CONFIG} is missing; "
                       f"nor a model folder: no {want}")


def base_weights(base: str | os.PathLike) -> Path:
    """The tensor file of a base: a weights file, an adapter directory's weights, or a model
    folder's (its shards index when sharded).

    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> open(os.path.join(d, ADAPTER_WEIGHTS), "wb").close()
    >>> base_weights(d).name
    'adapter_model.safetensors'
    """
    p = Path(base)
    if p.is_dir():
        for name in (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN, *MODEL_WEIGHTS):
            if (p / name).is_file():
                return p / name
        raise ConvertError(f"{p}: the base directory has no {ADAPTER_WEIGHTS}, "
                           f"{ADAPTER_WEIGHTS_BIN} nor model weights ({', '.join(MODEL_WEIGHTS)})")
    if not p.exists():
        raise FileNotFoundError(2, "No such file or directory", str(p))
    return p


def companion_files(folder: str | os.PathLike) -> list[Path]:
    """The files of a model folder that travel with its weights: every regular file at its
    top level that is not weights (config, generation config, tokenizer, README...).

    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> for n in ("config.json", "model.safetensors", "tokenizer.json", "x.index.json"):
    ...     open(os.path.join(d, n), "wb").close()
    >>> [p.name for p in companion_files(d)]
    ['config.json', 'tokenizer.json']
    """
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES))
