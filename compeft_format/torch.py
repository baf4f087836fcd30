"""Compressed task vectors straight into torch models: :func:`apply` adds one in place.

``apply(model, "ft.compeft")`` turns a base model into the fine-tuned one without a
decompressed copy on disk or in memory: tensor by tensor, each task vector tensor is decoded
on its parameter's own device (the compressed blocks are copied there, see
:mod:`compeft_format.codecs.torch_decode`) and added to the parameter in place, in the
parameter's dtype. Only the changed elements are touched (a gather, an add and a scatter of
the nonzeros), so the extra memory is about the nonzeros of one tensor.

Rounding. Each changed element becomes ``base + weight * d`` rounded once, to nearest even, to
the parameter's dtype, where ``d`` is the task vector element as the decoder gives it in its
stored dtype (``+v``, ``-v`` or 0 for a ternary tensor, ``v`` the scale rounded to that dtype),
and ``weight * d`` is taken in float64 (exact for ``weight`` = +-1 and any power of two). With
``weight=1`` on the recorded base this is what ``compeft decompress --base`` writes, bit for
bit, except that the elements a ternary tensor leaves at zero keep their bits (a ``-0.0`` stays
``-0.0``, where the dense sum of ``decompress`` writes ``+0.0``).

Taking an expert back out: ``apply(model, path, weight=-1, verify_base=False)`` after
``apply(model, path)`` (the model is no longer the recorded base, so the check must be off).
Each changed element comes back within one unit in the last place of its dtype (two roundings;
exactly where both sums were exact). Tensors the file stores whole (excluded from compression)
keep the fine-tuned values.

Torch is imported lazily; a missing torch raises :class:`~compeft_format.errors.
MissingDependencyError`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from . import _spec as S
from .binding import check_base, read_reference
from .codecs import torch_decode as _td
from .container import open_file
from .errors import ConvertError, MissingDependencyError
from .tensor import dense_values

__all__ = ["Sparse", "add_dense_", "add_ternary_", "apply", "decode", "dtype_name"]

_NAMES = {f"torch.{v}": k for k, v in _td.TORCH_DTYPES.items()}


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError("compeft_format.torch needs torch (pip install torch)") \
            from exc
    return torch


def dtype_name(dtype: Any) -> str:
    """The safetensors name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``).

    >>> import torch
    >>> dtype_name(torch.float16)
    'F16'
    """
    return _NAMES.get(str(dtype), str(dtype))


# ---------------------------------------------------------------------------------------------
# exact in-place addition
# ---------------------------------------------------------------------------------------------
def _exact(a: Any, t: Any, dtype: Any) -> Any:
    """``a + t`` (float64 tensors) rounded once to ``dtype``: TwoSum, then round to odd.

    Rounding the exact sum to odd at a precision two bits above the target's, then to nearest,
    is rounding to nearest of the exact sum (as ``taskvec.apply_task_vector`` does in numpy).
    """
    torch = _torch()
    s = a + t
    if dtype == torch.float64:
        return s
    bb = s - a
    err = (a - (s - bb)) + (t - bb)  # TwoSum: s + err == a + t exactly (when finite)
    fix = torch.isfinite(err) & (err != 0)
    toward_zero = (torch.signbit(s) != torch.signbit(err)) & fix  # |exact| < |s|
    bits = s.view(torch.int64) - toward_zero.to(torch.int64)
    odd = torch.where(fix, bits | 1, bits).view(torch.float64)
    if dtype == torch.float32:
        return odd.to(torch.float32)
    r = odd.to(torch.float32)  # then to odd at float32 (24 bits >= 11 + 2 and 8 + 2)
    r64 = r.to(torch.float64)
    inexact = torch.isfinite(odd) & (r64 != odd)
    above = r64.abs() > odd.abs()  # rounded away from zero
    rbits = r.view(torch.int32) - (above & inexact).to(torch.int32)
    return torch.where(inexact, rbits | 1, rbits).view(torch.float32).to(dtype)


def _representable(value: float, dtype: Any) -> bool:
    torch = _torch()
    return float(torch.tensor(value, dtype=torch.float64).to(dtype).double()) == value


def _sum(a: Any, d: Any) -> Any:
    """``a + d`` in ``a``'s dtype, rounded once; ``d`` is float64 (same shape, same device).

    When every ``d`` is exact in ``a``'s dtype the dtype's own addition is used: IEEE addition
    rounds once, and half types add in float32, whose 24 bits are at least twice theirs plus
    two, so the double rounding is harmless. Otherwise float64 with round to odd.
    """
    torch = _torch()
    if a.dtype == torch.float64:
        return a + d
    narrow = d.to(a.dtype)
    if bool(torch.equal(narrow.to(torch.float64), d)):
        return a + narrow
    return _exact(a.to(torch.float64), d, a.dtype)


def add_ternary_(target: Any, positions: Any, negative: Any, value: float, *,
                 weight: float = 1.0) -> Any:
    """Add ``weight * (+-value)`` at the flat ``positions`` of ``target``, in place, rounded once.

    ``positions`` (int64, unique) and ``negative`` (bool) are on ``target``'s device;
    ``value`` is the decoded magnitude (the scale rounded to the stored dtype). Only the
    elements at ``positions`` are read and written. Returns ``target``.

    >>> import torch
    >>> w = torch.ones(4, dtype=torch.bfloat16)
    >>> add_ternary_(w, torch.tensor([1, 3]), torch.tensor([False, True]), 0.5)
    tensor([1.0000, 1.5000, 1.0000, 0.5000], dtype=torch.bfloat16)
    """
    torch = _torch()
    _check_float(target)
    if not positions.numel():
        return target
    t = float(weight) * float(value)  # float64, exact for weight +-1
    with torch.no_grad():
        flat = target.view(-1) if target.is_contiguous() else target.reshape(-1).clone()
        pair = torch.tensor([t, -t], dtype=torch.float64, device=flat.device)
        which = negative.to(torch.int64)
        if target.dtype != torch.float64 and _representable(t, target.dtype):
            d = pair.to(target.dtype)[which]
            flat[positions] = flat[positions] + d  # one rounding (see _sum)
        else:
            flat[positions] = _exact(flat[positions].to(torch.float64), pair[which],
                                     target.dtype)
        if not target.is_contiguous():
            target.copy_(flat.view(target.shape))
    return target


def add_dense_(target: Any, delta: Any, *, weight: float = 1.0) -> Any:
    """``target += weight * delta`` in place, each element rounded once to ``target``'s dtype.

    ``delta`` is a float tensor of ``target``'s shape (any float dtype, any device: it is
    moved to ``target``'s). Returns ``target``.

    >>> import torch
    >>> add_dense_(torch.ones(2, dtype=torch.float16), torch.tensor([2.0**-11, 1.0]))
    tensor([1., 2.], dtype=torch.float16)
    """
    torch = _torch()
    _check_float(target)
    with torch.no_grad():
        d = delta.to(device=target.device, dtype=torch.float64) * float(weight)
        target.copy_(_sum(target, d.reshape(target.shape)))
    return target


def _check_float(target: Any) -> None:
    if not target.is_floating_point():
        raise ConvertError(f"cannot add a task vector to a {dtype_name(target.dtype)} tensor")


# ---------------------------------------------------------------------------------------------
# a model seen as a base checkpoint
# ---------------------------------------------------------------------------------------------
class _Entry:
    __slots__ = ("dtype", "shape")

    def __init__(self, dtype: str, shape: tuple[int, ...]) -> None:
        self.dtype, self.shape = dtype, shape


class _ModelBase:
    """A model's tensors with the reading interface the base check uses (names, ``info``,
    ``raw`` bytes for the hashes, ``release``), as if it were the base safetensors file.

    Names that alias an earlier tensor (tied weights) are left out unless ``keep`` names them.
    """

    path = "the model"

    def __init__(self, tensors: Mapping[str, Any], keep: set[str]) -> None:
        self.tensors: dict[str, Any] = {}
        seen: dict[tuple, str] = {}
        for name, t in tensors.items():
            key = (t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
            if t.numel() and key in seen and name not in keep:
                continue  # a tied copy the checkpoint does not hold
            seen.setdefault(key, name)
            self.tensors[name] = t

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self):
        return iter(self.tensors)

    def info(self, name: str) -> _Entry:
        t = self.tensors[name]
        return _Entry(dtype_name(t.dtype), tuple(t.shape))

    def raw(self, name: str) -> memoryview:
        torch = _torch()
        t = self.tensors[name].detach()
        host = t.to("cpu").contiguous().reshape(-1)
        return memoryview(host.view(torch.uint8).numpy()) if host.numel() else memoryview(b"")

    def release(self, name: str | None = None) -> None:
        """Nothing to release: the model's memory is the model's."""


def _tensors(model: Any) -> dict[str, Any]:
    torch = _torch()
    if isinstance(model, torch.nn.Module):
        return dict(model.state_dict(keep_vars=True))
    if isinstance(model, Mapping):
        bad = [n for n, t in model.items() if not isinstance(t, torch.Tensor)]
        if bad:
            raise TypeError(f"model must map names to torch tensors; {bad[0]!r} is "
                            f"{type(model[bad[0]]).__name__}")
        return dict(model)
    raise TypeError(f"model must be a torch.nn.Module or a state dict, got {type(model).__name__}")


# ---------------------------------------------------------------------------------------------
# apply
# ---------------------------------------------------------------------------------------------
class Sparse(NamedTuple):
    """A ternary tensor decoded on a device: its flat positions (int64), their signs (bool,
    True = negative) and the magnitude ``value`` (the scale rounded to the stored dtype)."""

    positions: Any
    negative: Any
    value: float


def decode(reader: Any, name: str, device: Any) -> Any:
    """Decode record ``name`` of an open compeft file on ``device``.

    A ternary record gives a :class:`Sparse` (nothing dense is built), a dense record its
    tensor in its stored dtype. On a device other than the CPU the compressed blocks are
    copied there and decoded by :mod:`compeft_format.codecs.torch_decode`.

    >>> import compeft_format as cf
    >>> f = cf.open_file(cf.dumps({"w": cf.TernaryTensor((4,), [1, 3], [True, False], 0.5)}))
    >>> decode(f, "w", "cpu")
    Sparse(positions=tensor([1, 3]), negative=tensor([ True, False]), value=0.5)
    """
    _torch()
    value = reader.get_raw(name, device=device)
    if isinstance(value, _td.DeviceTernary):
        v = float(dense_values(value.scale, value.dtype)[0])
        return Sparse(value.positions, value.negative, v)
    return value


def apply(model: Any, path: str | os.PathLike, *, weight: float = 1.0,
          verify_base: bool = True) -> Any:
    """Add a compressed task vector to ``model`` in place and return ``model``.

    Parameters
    ----------
    model:
        A ``torch.nn.Module`` (its ``state_dict`` names are the file's tensor names) or a
        state dict (name -> tensor), e.g. of a base model loaded on any devices and dtypes.
    path:
        A compeft file, typically from ``compeft compress FINETUNED --base BASE``.
    weight:
        Scales the task vector. ``-1`` takes an expert back out after ``weight=1``, up to the
        rounding of the two additions (module doc; for a file measured from a checkpoint,
        with ``verify_base=False``: the model is no longer that base); ``0.5`` adds half.
    verify_base:
        Check, before anything changes, that ``model`` is the recorded base: for a file
        measured from a checkpoint, the same tensor names, shapes, dtypes and sha256 hashes
        (hashing copies each tensor to the host once); for a plain task vector, every tensor
        with the same shape and dtype. Without it only names and shapes are checked and a
        parameter may have another float dtype (the sum is rounded to the parameter's).

    Every record is checked against ``model`` before any parameter changes: a mismatch
    raises :class:`~compeft_format.errors.ConvertError` naming the tensor, and leaves the
    model as it was. Tensors the file stores whole (excluded from compression, or not
    float) are copied in; they cannot be scaled, so with ``weight != 1`` they must already
    hold the stored values. A corrupt record found while applying raises
    a :class:`~compeft_format.errors.FormatError`; the tensors before it are changed then.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> import compeft_format as cf
    >>> from compeft_format.torch import apply
    >>> d = tempfile.mkdtemp()
    >>> cf.save_file({"w": cf.TernaryTensor((3,), [0, 2], [False, True], 0.5)},
    ...              os.path.join(d, "tv.compeft"))
    >>> m = torch.nn.ParameterDict({"w": torch.nn.Parameter(torch.ones(3))})
    >>> apply(m, os.path.join(d, "tv.compeft"))["w"].data
    tensor([1.5000, 1.0000, 0.5000])
    >>> apply(m, os.path.join(d, "tv.compeft"), weight=-1)["w"].data
    tensor([1., 1., 1.])
    """
    torch = _torch()
    tensors = _tensors(model)
    where = Path(path)
    with open_file(path) as reader:
        infos = {n: reader.info(n) for n in reader}
        ref = read_reference(reader.metadata(), set(infos), where)
        if ref.kind == "one" or (ref.kind == "zero" and ref.peft_type is not None):
            raise ConvertError(f"{where}: holds a PEFT {ref.peft_type} adapter as it is, not a "
                               "task vector of a model; load it with compeft_format.peft")
        adds = ref.delta if ref.kind == "checkpoint" else set(infos)
        base = _ModelBase(tensors, set(ref.hashes or ()) | set(infos))
        _check_structure(base, infos, adds, where)
        if verify_base:
            check_base(ref, base, infos, False)
        copies = [n for n in infos if n not in adds]
        if weight != 1 and copies:
            with torch.no_grad():
                for n in copies:
                    stored = _dense(decode(reader, n, tensors[n].device), infos[n])
                    if not torch.equal(stored.to(tensors[n].dtype), tensors[n].detach()):
                        raise ConvertError(
                            f"{where}: stored whole (not as a difference), so it cannot be "
                            f"applied with weight {weight}; the model holds other values",
                            tensor=n)
        with torch.no_grad():
            for n in infos:
                target = tensors[n]
                if weight != 1 and n in copies:
                    continue  # checked equal above
                value = decode(reader, n, target.device)
                if n not in adds:
                    target.copy_(_dense(value, infos[n]))
                elif isinstance(value, Sparse):
                    add_ternary_(target, *value, weight=weight)
                else:
                    add_dense_(target, value, weight=weight)
    return model


def _dense(value: Any, info: Any) -> Any:
    """The dense tensor (stored dtype) of what :func:`decode` gave."""
    if not isinstance(value, Sparse):
        return value
    dtype = _td.torch_dtype(info.dtype)
    return _td.ternary_dense(value.positions, value.negative,
                             dense_values(value.value, info.dtype), info.dtype,
                             tuple(info.shape), dtype)


def _check_structure(base: _ModelBase, infos: Mapping[str, Any], adds: set[str],
                     where: Path) -> None:
    """What every apply needs: each record's name in the model with its shape; float targets."""
    missing = sorted(n for n in infos if n not in base)
    if missing:
        raise ConvertError(f"{where}: the model lacks {len(missing)} tensors of the task vector: "
                           f"{missing[:5]}", tensor=missing[0])
    for n, info in infos.items():
        have = base.info(n)
        if tuple(have.shape) != tuple(info.shape):
            raise ConvertError(f"{where}: {have.dtype}{list(have.shape)} in the model, "
                               f"{info.dtype}{list(info.shape)} in the task vector", tensor=n)
        if n in adds and have.dtype not in S.TERNARY_DTYPES:
            raise ConvertError(f"{where}: cannot add a task vector to a {have.dtype} tensor",
                               tensor=n)
