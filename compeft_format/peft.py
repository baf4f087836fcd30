"""Compressed PEFT adapters straight into models: :func:`from_pretrained`, :func:`load_adapter`.

``compeft compress ADAPTER_DIR -o OUT_DIR`` writes ``OUT_DIR/adapter_config.json`` and
``OUT_DIR/adapter_model.compeft``. These functions load such a folder like
``PeftModel.from_pretrained`` and ``PeftModel.load_adapter`` load a dense one, with the same
result (the same adapter dtypes and values, so the same outputs) as decompressing the folder
and loading that, but without the dense copy: no temporary file, and each tensor is decoded
straight into its adapter parameter, on the parameter's device and in its dtype.

How: the PEFT model is built as PEFT builds it with ``low_cpu_mem_usage=True`` (the adapter
weights are created on the meta device, not initialised), each adapter weight is then
allocated empty on its base layer's device, in the dtype PEFT chose for it, and the decoded
values are written into it (a zero fill and one scatter of the nonzeros for a LoRA tensor).
What the file stores is undone on the way, as ``decompress`` does: an (IA)^3 vector gets its
one back, and an adapter compressed against its saved initial state (``compress --base
INIT``) needs ``base=INIT`` and gets it added, rounded once in the stored dtype (the initial
adapter's names, shapes, dtypes and sha256 hashes are checked first); one compressed from
PEFT's initial state regenerated from its seed (``compress --base peft-init``, the default
for a LoRA adapter where the seed is found) gets that state regenerated on the model's own
config and checked against the file's binding (:mod:`compeft_format.peft_init`). A hi-fi
folder (``compeft compress ADAPTER --hifi``, :mod:`compeft_format.hifi`) is loaded the same way,
each record's integer codes times its step.

Many experts: :class:`CompressedAdapter` holds a compressed folder in host memory; pass it
instead of a path (the README has a serving recipe).

peft and torch are imported when a function here is first called; without them a
:class:`~compeft_format.errors.MissingDependencyError` says what to install.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import dtypes as _dt
from .binding import Reference, check_regenerated_base, holds_its_recipe, read_reference
from .codecs import torch_decode as _td
from .container import CompeftReader, open_file
from .errors import ConvertError, MissingDependencyError
from .hifi import HIFI_KEY, hifi_decode, hifi_layout
from .peft_init import recorded_recipe, regenerated_file
from .safetensors_io import SafetensorsReader
from .sources import ADAPTER_COMPEFT, ADAPTER_CONFIG, base_weights
from .torch import Sparse, add_dense_, add_ternary_, decode, dtype_name

__all__ = ["CompressedAdapter", "from_pretrained", "load_adapter"]


def _peft() -> Any:
    try:
        import peft
        import torch  # noqa: F401  (peft needs it; say so if it is the one missing)
    except ImportError as exc:
        raise MissingDependencyError(f"compeft_format.peft needs peft and torch (pip install "
                                     f"peft torch): {exc}") from exc
    return peft


@dataclass(frozen=True)
class CompressedAdapter:
    """A compressed adapter folder held in memory: its PEFT config and its compeft bytes.

    Build it with :meth:`read`; pass it to :func:`from_pretrained` or :func:`load_adapter`
    instead of a path. A few tens of MB for a 7B-model LoRA at density 0.1, so many experts
    fit in host memory and each is decoded only when it is needed.

    >>> import compeft_format as cf, tempfile, os
    >>> out = os.path.join(tempfile.mkdtemp(), "c")
    >>> _ = cf.compress_file("tests/data/ia3-minilm-vader", out, density=0.1)
    >>> a = CompressedAdapter.read(out)
    >>> a.config.peft_type.value, len(a.data) < 8000
    ('IA3', True)
    """

    config: Any  #: the ``peft.PeftConfig`` of ``adapter_config.json``
    data: bytes  #: the bytes of ``adapter_model.compeft``
    path: str = "<memory>"  #: where it was read from (for messages)

    @classmethod
    def read(cls, path: str | os.PathLike) -> CompressedAdapter:
        """Read a compressed adapter folder (``adapter_config.json`` and
        ``adapter_model.compeft``) into memory."""
        folder = Path(path)
        config = _config(folder)
        data = (folder / ADAPTER_COMPEFT).read_bytes()
        return cls(config, data, str(folder / ADAPTER_COMPEFT))

    @contextmanager
    def _open(self) -> Iterator[CompeftReader]:
        with open_file(self.data) as reader:
            yield reader


def _config_dict(config: Any) -> dict[str, Any]:
    """A PEFT config as adapter_config.json holds it (sets as sorted lists, enums as str)."""
    out = {}
    for k, v in config.to_dict().items():
        if isinstance(v, (set, frozenset)):
            v = sorted(v)
        out[k] = v.value if hasattr(v, "value") and isinstance(v, str) else v
    return out


def _config(folder: Path) -> Any:
    peft = _peft()
    config_file, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_COMPEFT
    if not (config_file.is_file() and weights.is_file()):
        raise ConvertError(f"{folder}: not a compressed adapter folder (it needs "
                           f"{ADAPTER_CONFIG} and {ADAPTER_COMPEFT}, as compeft compress "
                           "writes them)")
    with open(config_file, encoding="utf-8") as f:
        peft_type = json.load(f).get("peft_type")
    if peft_type not in peft.PeftType.__members__:
        raise ConvertError(f"{config_file}: unknown peft_type {peft_type!r}")
    return peft.PeftConfig.from_pretrained(str(folder))


class _Folder:
    """A compressed adapter folder on disk (memory-mapped when opened)."""

    def __init__(self, path: str | os.PathLike) -> None:
        folder = Path(path)
        self.config = _config(folder)
        self.path = str(folder / ADAPTER_COMPEFT)

    @contextmanager
    def _open(self) -> Iterator[CompeftReader]:
        with open_file(self.path) as reader:
            yield reader


def _source(path: Any) -> Any:
    return path if isinstance(path, CompressedAdapter) else _Folder(path)


# ---------------------------------------------------------------------------------------------
def _check_record(reader: CompeftReader, where: Path, base: str | os.PathLike | None
                  ) -> tuple[Reference, dict[str, Any], dict[str, float | None]]:
    """Read what the file was measured from; check ``base`` against it (before any change).

    Returns the reference, the records' infos (for a hi-fi file, with the dtype each code
    record decodes to) and, for a hi-fi file, each record's step (None: stored as it is).
    """
    infos = {n: reader.info(n) for n in reader}
    meta = reader.metadata()
    steps: dict[str, float | None] = {}
    if HIFI_KEY in meta:  # integer codes: decoded with their steps (spec Appendix E)
        layout = hifi_layout(meta, reader.keys(), infos, str(where))
        steps = {n: s for n, (s, _) in layout.items()}
        infos = {n: i if s is None else dataclasses.replace(i, dtype=d or "F32")
                 for (n, i), (s, d) in zip(infos.items(), layout.values(), strict=True)}
        meta = {k: v for k, v in meta.items() if k != HIFI_KEY}
    ref = read_reference(meta, set(infos), where)
    if ref.kind == "checkpoint" and base is None and \
            recorded_recipe(reader.metadata()) is None:
        raise ConvertError(f"{where}: the adapter is stored as a difference from its initial "
                           f"state ({len(ref.hashes or {})} tensors); give it with base= (the "
                           "initial adapter folder or its safetensors file)")
    if ref.kind != "checkpoint" and base is not None:
        with SafetensorsReader(base_weights(base)) as given:
            if holds_its_recipe(ref, given):  # the (IA)^3 init compress was given: all ones
                return ref, infos, steps
        raise ConvertError(f"{where}: holds the adapter as it is (from {ref.kind}), which takes "
                           "no base=")
    return ref, infos, steps


def _materialise(peft_model: Any, adapter_name: str) -> None:
    """Allocate the adapter's meta weights, empty, on each base layer's device, keeping the
    dtype PEFT gave them (what ``PeftModel.from_pretrained`` gets, without initialising)."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in peft_model.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        base_layer = module.get_base_layer()
        device = next((p.device for p in base_layer.parameters() if not p.is_meta), None)
        if device is None:
            continue
        for attr in (*module.adapter_layer_names, *module.other_param_names):
            holder = getattr(module, attr, None)
            if not isinstance(holder, (torch.nn.ModuleDict, torch.nn.ParameterDict)) or \
                    adapter_name not in holder:
                continue
            item = holder[adapter_name]
            if isinstance(item, torch.nn.Module):
                if any(p.is_meta for p in item.parameters()):
                    item.to_empty(device=device)
            elif isinstance(item, torch.Tensor) and item.is_meta:
                holder[adapter_name] = torch.nn.Parameter(
                    torch.empty_like(item, device=device), requires_grad=item.requires_grad)


def _targets(peft_model: Any, adapter_name: str, infos: dict[str, Any],
             where: Path) -> dict[str, Any]:
    """The adapter's weights by file name, each a view of its parameter's memory."""
    peft = _peft()
    left = sorted(n for n, p in peft_model.named_parameters() if p.is_meta)
    if left:
        raise ConvertError(f"{where}: {len(left)} adapter weights could not be placed on a "
                           f"device: {left[:3]}; decompress the adapter and load it with PEFT")
    targets = peft.get_peft_model_state_dict(peft_model, adapter_name=adapter_name,
                                            save_embedding_layers=False)
    missing = sorted(set(targets) - set(infos))
    extra = sorted(set(infos) - set(targets))
    if missing or extra:
        raise ConvertError(f"{where}: the adapter does not match the model and its config: "
                           f"{len(missing)} weights missing from the file {missing[:3]}, "
                           f"{len(extra)} not in the model {extra[:3]}")
    owned = {p.data_ptr() for p in peft_model.parameters()}
    for name, t in targets.items():
        if t.numel() and t.data_ptr() not in owned:
            raise ConvertError(f"{where}: PEFT keeps {name!r} outside the model's parameters; "
                               "decompress the adapter and load it with PEFT", tensor=name)
        info = infos[name]
        if tuple(t.shape) != tuple(info.shape):
            raise ConvertError(f"{where}: {info.dtype}{list(info.shape)} in the file, "
                               f"{dtype_name(t.dtype)}{list(t.shape)} in the model",
                               tensor=name)
    return targets


def _fill(reader: CompeftReader, ref: Reference, targets: dict[str, Any],
          infos: dict[str, Any], init: SafetensorsReader | None,
          steps: dict[str, float | None]) -> None:
    """Decode every record into its target, undoing what it is measured from; a hi-fi
    record (``steps``) is its codes times its step, as ``decompress`` gives it."""
    import torch

    adds = ref.delta if ref.kind != "zero" else set()
    with torch.no_grad():
        for name, target in targets.items():
            rec_dtype = _td.torch_dtype(infos[name].dtype)
            step = steps.get(name)
            if step is not None:
                codes = reader.get(name)
                delta = hifi_decode(codes, step).reshape(tuple(target.shape))
                if name in adds:
                    value = torch.from_numpy(delta)
                else:  # rounded once to the recorded dtype, as decompress writes it
                    value = torch.from_numpy(delta).to(rec_dtype)
            elif name not in adds and _into_numpy(target, rec_dtype, infos[name]):
                # on the CPU the numpy decoder writes straight into the parameter's memory
                reader.get(name, dense=True, out=target.numpy())
                continue
            else:
                value = decode(reader, name, target.device)
            if name not in adds:  # the values themselves, converted as load_state_dict does
                if isinstance(value, Sparse):
                    pos, neg, v = value
                    target.zero_()
                    pair = torch.tensor([v, -v], dtype=torch.float64).to(rec_dtype)
                    target.view(-1)[pos] = pair.to(target.device, target.dtype)[neg.long()]
                else:
                    target.copy_(value)
                continue
            # stored as a difference: from one ((IA)^3) or from the initial adapter, the sum
            # rounded once in the stored dtype, then converted
            work = target if target.dtype == rec_dtype else torch.empty(
                target.shape, dtype=rec_dtype, device=target.device)
            if init is None:
                work.fill_(1)
            else:
                storage, dtype = init.get(name)
                work.copy_(_dt.to_torch(storage, dtype).reshape(work.shape))
            if isinstance(value, Sparse):
                add_ternary_(work, *value)
            else:
                add_dense_(work, value)
            if work is not target:
                target.copy_(work)


def _into_numpy(target: Any, rec_dtype: Any, info: Any) -> bool:
    """Whether the numpy decoder can write a record straight into ``target``: a contiguous
    CPU tensor of the record's own dtype, one numpy has (not BF16), not forced to torch."""
    return (info.kind == "ternary" and target.dtype == rec_dtype
            and info.dtype in ("F32", "F16", "F64") and target.device.type == "cpu"
            and target.is_contiguous() and not _td.on_device(target.device))


def _load(peft_model: Any, source: Any, adapter_name: str, base: Any,
          autocast_adapter_dtype: bool, build: Any, undo: Any = None) -> Any:
    where = Path(source.path)
    with source._open() as reader:
        ref, infos, steps = _check_record(reader, where, base)
        if ref.kind != "checkpoint":
            base = None  # measured from the adapter type's initial values: no base to add
        init = None
        with contextlib.ExitStack() as stack:
            recipe = recorded_recipe(reader.metadata())
            regenerated = None
            if ref.kind == "checkpoint" and base is None and recipe is not None:
                # PEFT's initial adapter, regenerated from the seed on this model's config
                base, regenerated = regenerated_file(
                    recipe, _config_dict(source.config), {n: i.dtype for n, i in infos.items()},
                    stack, base_model=getattr(peft_model, "config", None), where=where)
            if base is not None:
                init = stack.enter_context(SafetensorsReader(base_weights(base)))
                check_regenerated_base(ref, init, infos, False, regenerated=regenerated,
                                       recipe=str(recipe), where=str(where), give="base=")
            peft_model = build()
            try:
                _materialise(peft_model, adapter_name)
                targets = _targets(peft_model, adapter_name, infos, where)
                _fill(reader, ref, targets, infos, init, steps)
            except BaseException:
                if undo is not None:  # no adapter left half loaded (on the meta device)
                    undo()
                raise
    # as PeftModel.load_adapter does after loading: the adapter dtype rule (fp16/bf16 -> fp32)
    if hasattr(peft_model.base_model, "_cast_adapter_dtype"):
        peft_model.base_model._cast_adapter_dtype(
            adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
    return peft_model


def from_pretrained(model: Any, path: str | os.PathLike | CompressedAdapter,
                    adapter_name: str = "default", is_trainable: bool = False, *,
                    base: str | os.PathLike | None = None, config: Any = None,
                    autocast_adapter_dtype: bool = True) -> Any:
    """Like ``PeftModel.from_pretrained(model, path)`` for a compressed adapter folder.

    Parameters
    ----------
    model:
        The base model (modified in place, as PEFT does).
    path:
        A folder written by ``compeft compress`` from an adapter folder
        (``adapter_config.json`` and ``adapter_model.compeft``), or a
        :class:`CompressedAdapter`.
    adapter_name, is_trainable, config, autocast_adapter_dtype:
        As for ``PeftModel.from_pretrained``.
    base:
        For an adapter compressed against its initial state (``compress --base INIT``):
        that initial adapter (its folder or safetensors file), checked against the recorded
        hashes before the model is touched.

    Returns
    -------
    peft.PeftModel
        The same model, with the same outputs, as ``PeftModel.from_pretrained`` of the
        decompressed folder. In eval mode unless ``is_trainable``.

    Raises
    ------
    ConvertError
        Not a compressed adapter folder; a missing or mismatching ``base``; an adapter whose
        weights do not match the model and its config (named).
    MissingDependencyError
        peft or torch is not installed.

    Examples
    --------
    >>> import tempfile, os, transformers, compeft_format as cf
    >>> from compeft_format import peft as cpeft
    >>> out = os.path.join(tempfile.mkdtemp(), "c")
    >>> _ = cf.compress_file("tests/data/ia3-minilm-vader", out, density=0.1)
    >>> bert = transformers.BertModel(transformers.BertConfig(
    ...     hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
    ...     intermediate_size=1536, vocab_size=10))
    >>> m = cpeft.from_pretrained(bert, out)
    >>> type(m).__name__, m.active_adapter
    ('PeftModel', 'default')
    """
    peft = _peft()
    source = _source(path)
    cfg = copy.deepcopy(config if config is not None else source.config)
    if cfg.is_prompt_learning or cfg.is_adaption_prompt:
        raise ConvertError(f"{source.path}: prompt-learning adapters ({cfg.peft_type}) are not "
                           "supported; decompress the adapter and load it with PEFT")
    if getattr(model, "_checkpoint_conversion_mapping", None):
        raise ConvertError(f"{source.path}: the model renames checkpoint keys "
                           "(_checkpoint_conversion_mapping), which is not supported; "
                           "decompress the adapter and load it with PEFT")
    cfg.inference_mode = not is_trainable
    cls = peft.MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(cfg.task_type, peft.PeftModel)

    def build() -> Any:
        return cls(model, cfg, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                   low_cpu_mem_usage=True)

    peft_model = _load(model, source, adapter_name, base, autocast_adapter_dtype, build)
    if not is_trainable:
        peft_model.eval()
    return peft_model


def load_adapter(peft_model: Any, path: str | os.PathLike | CompressedAdapter,
                 adapter_name: str, is_trainable: bool = False, *,
                 base: str | os.PathLike | None = None,
                 autocast_adapter_dtype: bool = True) -> Any:
    """Like ``peft_model.load_adapter(path, adapter_name)`` for a compressed adapter folder.

    Adds another expert to a ``PeftModel`` (made by :func:`from_pretrained` or by PEFT);
    ``peft_model.set_adapter(adapter_name)`` switches to it. An existing ``adapter_name``
    gets the new weights in place. ``base`` as for :func:`from_pretrained`. When the expert
    cannot be loaded (an error is raised), a new ``adapter_name`` is removed again, so the
    model keeps working with the experts it had.

    Returns ``peft_model``.

    >>> import tempfile, os, transformers, compeft_format as cf
    >>> from compeft_format import peft as cpeft
    >>> out = os.path.join(tempfile.mkdtemp(), "c")
    >>> _ = cf.compress_file("tests/data/ia3-minilm-vader", out, density=0.1)
    >>> bert = transformers.BertModel(transformers.BertConfig(
    ...     hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
    ...     intermediate_size=1536, vocab_size=10))
    >>> m = cpeft.from_pretrained(bert, out)
    >>> m = cpeft.load_adapter(m, out, "second")
    >>> m.set_adapter("second"); m.active_adapter
    'second'
    """
    _peft()
    source = _source(path)
    new = adapter_name not in peft_model.peft_config

    def undo() -> None:
        if new and adapter_name in peft_model.peft_config:
            peft_model.delete_adapter(adapter_name)

    def build() -> Any:
        if adapter_name in peft_model.peft_config:
            return peft_model  # new weights into the existing adapter, as PEFT does
        cfg = copy.deepcopy(source.config)
        if hasattr(peft_model, "_check_new_adapter_config"):  # as PeftModel.load_adapter
            peft_model._check_new_adapter_config(cfg, is_trainable=is_trainable)
        cfg.inference_mode = not is_trainable
        peft_model.add_adapter(adapter_name, cfg, low_cpu_mem_usage=True,
                               autocast_adapter_dtype=autocast_adapter_dtype)
        if is_trainable:
            peft_model.set_requires_grad(adapter_name)
        return peft_model

    _load(peft_model, source, adapter_name, base, autocast_adapter_dtype, build, undo)
    if not is_trainable:
        peft_model.eval()
    return peft_model

