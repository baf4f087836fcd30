"""Input resolution: what a path given to compress or decompress (or as a base) holds.

* A file: itself (a ``.safetensors`` or ``.compeft`` file).
* A PEFT adapter directory: ``adapter_config.json`` (its ``peft_type`` and
  ``base_model_name_or_path``) and the weights file the caller reads
  (``adapter_model.safetensors`` to compress, ``adapter_model.compeft`` to decompress).
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
    "Source",
    "base_weights",
    "resolve_source",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_COMPEFT = "adapter_model.compeft"


@dataclass
class Source:
    """A resolved input: a file, or the weights file and config of an adapter directory.

    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> open(os.path.join(d, "tv.safetensors"), "wb").close()
    >>> s = resolve_source(os.path.join(d, "tv.safetensors"), ADAPTER_WEIGHTS, "")
    >>> s.is_dir, s.peft_type, s.weights.name
    (False, None, 'tv.safetensors')
    """

    path: Path  # what the user gave
    weights: Path  # the tensor file
    config: Path | None = None  # adapter_config.json of a directory
    peft_type: str | None = None
    base_model: str | None = None  # an adapter's base_model_name_or_path

    @property
    def is_dir(self) -> bool:
        return self.config is not None


def resolve_source(path: str | os.PathLike, weights_name: str, what: str) -> Source:
    """Resolve a file, or an adapter directory holding ``weights_name`` and its config.

    ``what`` ends the message of a directory that lacks ``weights_name`` (what the caller
    reads). Raises :class:`~compeft_format.errors.ConvertError` for a directory that is not
    an adapter, FileNotFoundError for a path that does not exist. Example: :class:`Source`.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(2, "No such file or directory", str(p))
    if not p.is_dir():
        return Source(p, p)
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
    return Source(p, weights, config, peft_type,
                   base_model if isinstance(base_model, str) and base_model else None)


def base_weights(base: str | os.PathLike) -> Path:
    """The tensor file of a base: a safetensors file, or an adapter directory's weights.

    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> open(os.path.join(d, ADAPTER_WEIGHTS), "wb").close()
    >>> base_weights(d).name
    'adapter_model.safetensors'
    """
    p = Path(base)
    if p.is_dir():
        w = p / ADAPTER_WEIGHTS
        if not w.is_file():
            raise ConvertError(f"{p}: the base directory has no {ADAPTER_WEIGHTS}")
        return w
    if not p.exists():
        raise FileNotFoundError(2, "No such file or directory", str(p))
    return p

