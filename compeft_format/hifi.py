"""High-fidelity task vectors: every entry kept, uniformly quantised, entropy-coded by zstd.

A ternary tensor gives every kept entry one magnitude, so however dense it is, a ComPEFT file
levels off near a mean cosine of 0.999 with the true fine-tune. For an expert that must come
back nearly exactly, this module stores the whole task vector as integer codes instead:

* tensor ``t`` gets a step ``s_t``; each entry ``x`` is stored as ``q = rint(x / s_t)`` and
  decoded as ``q * s_t``, so ``|x - q s_t| <= s_t / 2`` (float32 rounding of the product
  aside);
* the codes of a tensor are one dense integer record (``I8``; ``I16`` or ``I32`` for a tensor
  whose codes do not fit), named as the tensor, in its shape, with the zstd stage: zstd's
  Huffman stage codes them within a few percent of their order-0 entropy, which is what
  makes a uniform quantiser efficient (for a Gaussian-like source, entropy-coded uniform
  quantisation is about 0.25 bit above the rate-distortion bound). The file is written at
  zstd level 1: on such codes level 3 finds short useless matches and costs 7 to 20 % more;
* the steps are in the file's metadata, under the key ``compeft_format.hifi``:
  ``{"version": 1, "steps": [s_0, s_1, ...]}``, one step per record in record (name) order;
  ``null`` for a record stored as it is (a non-float tensor, an excluded one). A file that
  ``compeft compress --hifi`` writes also has ``"dtypes"``: each record's original dtype,
  which ``compeft decompress`` writes back (spec, appendix "Hi-fi files").

Nothing here is new to the format: the records are dense records of spec 6.5 and the key is
an ordinary metadata key (``compeft.`` keys are the reserved ones, spec 5.2.1), so any
reader of the file's format version reads it (the writer's default, 1.2, whose compressed
metadata a 1.1 reader refuses); :func:`load_hifi` is the decoder that applies the steps (a
plain reader returns the integer codes).

The step is ``rel_step`` times the root mean square of the whole task vector, divided by a
tensor's weight: equal weights (the default) make one step for every entry, which minimises
the squared error of the task vector for its entropy (high-rate theory: equal slopes). For a
LoRA adapter, what the model sees is the product ``B A``: an error ``e`` in ``A`` reaches the
merged weight as ``B e``, so :func:`lora_weights` weighs each factor by the norm of its
partner, the step that minimises the squared error of the merged weights.

Examples
--------
>>> import os, tempfile, numpy as np
>>> rng = np.random.default_rng(0)
>>> tv = {"w": rng.normal(0, 0.01, (64, 32)).astype(np.float32)}
>>> p = os.path.join(tempfile.mkdtemp(), "expert.compeft")
>>> steps = save_hifi(tv, p, rel_step=0.25)
>>> back = load_hifi(p)
>>> bool(np.abs(back["w"] - tv["w"]).max() <= steps["w"] / 2 * (1 + 1e-6))
True
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from . import _spec as S
from .container import Writer, open_file
from .errors import CompeftError, EncodeError
from .fsio import atomic_write

__all__ = [
    "DEFAULT_REL_STEP",
    "HIFI_KEY",
    "HIFI_ZSTD_LEVEL",
    "HifiError",
    "hifi_codes",
    "hifi_decode",
    "hifi_layout",
    "hifi_original_bytes",
    "hifi_steps",
    "load_hifi",
    "lora_weights",
    "probe_weights",
    "save_hifi",
]

#: the metadata key of a hi-fi file (not ``compeft.``: those are the spec's, spec 5.2.1)
HIFI_KEY = "compeft_format.hifi"
#: the default step, in root-mean-squares of the task vector (``bench/fidelity.py``)
DEFAULT_REL_STEP = 0.2
#: zstd level of a hi-fi file: level 1 codes quantised values within 1 to 4 % of their
#: entropy; level 3 finds short matches in them that cost more than they save
HIFI_ZSTD_LEVEL = 1
_VERSION = 1
_CODE_DTYPES = ("I8", "I16", "I32")
_CHUNK = 1 << 20  # elements per pass over a tensor: temporaries stay small


class HifiError(CompeftError, ValueError):
    """A file that is not a hi-fi file, or whose steps do not match its records.

    >>> from compeft_format import TernaryTensor, dumps
    >>> load_hifi(dumps({"w": TernaryTensor((4,), [1], [0], 0.5)}))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    compeft_format.hifi.HifiError: file: not a hi-fi file: metadata key 'compeft_format.hifi' ...
    """


def _values(value: Any, name: str) -> np.ndarray:
    """A float tensor as a flat float64-ready numpy view (torch tensors through numpy)."""
    if hasattr(value, "detach"):  # torch: bfloat16 has no numpy dtype
        value = value.detach().cpu().float().numpy()
    arr = np.asarray(value)
    if arr.dtype.kind != "f":
        raise EncodeError(f"hi-fi takes float tensors, got {arr.dtype}", tensor=name)
    return arr


def _sum_squares(arr: np.ndarray, name: str) -> float:
    flat = arr.reshape(-1)
    total = 0.0
    for lo in range(0, flat.size, _CHUNK):
        part = flat[lo : lo + _CHUNK].astype(np.float64)
        if not np.isfinite(part).all():
            raise EncodeError("non-finite value in the task vector", tensor=name)
        total += float(np.einsum("i,i->", part, part))
    return total


def hifi_steps(tv: Mapping[str, Any], *, rel_step: float = DEFAULT_REL_STEP,
               step: float | None = None,
               weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """Each tensor's quantisation step: ``step / weights[name]``, to 6 significant digits.

    Parameters
    ----------
    tv:
        name -> float tensor (numpy or torch): the task vector.
    rel_step:
        The step in root mean squares of the whole task vector (one pass over it); ignored
        when ``step`` is given. Smaller is more faithful and larger: about 0.2 reaches a
        mean embedding cosine of 0.9999 on ``bench/fidelity.py``'s LoRA adapter.
    step:
        The step itself (absolute), instead of ``rel_step``.
    weights:
        name -> positive weight (missing names: 1). A tensor whose errors matter ``w**2``
        times more per entry gets a step ``w`` times smaller; see :func:`lora_weights`.

    Examples
    --------
    >>> import numpy as np
    >>> hifi_steps({"a": np.ones(4), "b": -np.ones(4)}, rel_step=0.5, weights={"b": 2.0})
    {'a': 0.5, 'b': 0.25}
    """
    names = sorted(tv, key=lambda n: n.encode())
    if step is None:
        if not (isinstance(rel_step, (int, float)) and 0 < rel_step < math.inf):
            raise EncodeError(f"rel_step must be a positive finite number, got {rel_step!r}")
        sq = n = 0
        for name in names:
            arr = _values(tv[name], name)
            sq += _sum_squares(arr, name)
            n += arr.size
        step = rel_step * math.sqrt(sq / n) if n else 0.0
    elif not (isinstance(step, (int, float)) and 0 <= step < math.inf):
        raise EncodeError(f"step must be a finite number >= 0, got {step!r}")
    out = {}
    for name in names:
        w = 1.0 if weights is None else weights.get(name, 1.0)
        if not (isinstance(w, (int, float)) and 0 < w < math.inf):
            raise EncodeError(f"weight must be a positive finite number, got {w!r}", tensor=name)
        # 6 significant digits: the step is a design choice, and a short one costs ~10 bytes
        # a tensor less in the metadata (0.014 bits per parameter on 4,500-entry tensors)
        out[name] = float(f"{float(step) / float(w):.6g}")
    return out


def hifi_codes(values: Any, step: float, *, name: str = "tensor") -> np.ndarray:
    """The integer codes ``rint(values / step)``, in the smallest of int8, int16, int32.

    A zero step (an all-zero task vector) gives zero codes.

    >>> hifi_codes([0.1, -0.26, 3.0], 0.1).tolist()
    [1, -3, 30]
    """
    arr = _values(values, name)
    flat = arr.reshape(-1)
    codes = np.empty(flat.size, np.int32)  # codes above int32 are refused below
    for lo in range(0, flat.size, _CHUNK):
        part = flat[lo : lo + _CHUNK].astype(np.float64)
        if not np.isfinite(part).all():
            raise EncodeError("non-finite value in the task vector", tensor=name)
        q = np.rint(part / step) if step > 0 else np.zeros_like(part)
        if q.size and np.abs(q).max() > np.iinfo(np.int32).max:
            raise EncodeError(f"code {np.abs(q).max():.3g} above int32 with step {step!r}; "
                              "use a larger step", tensor=name)
        codes[lo : lo + _CHUNK] = q
    top = int(np.abs(codes).max()) if codes.size else 0
    dtype = next(d for d in (np.int8, np.int16, np.int32) if top <= np.iinfo(d).max)
    return codes.astype(dtype).reshape(arr.shape)


def save_hifi(tv: Mapping[str, Any], path: str | os.PathLike, *,
              rel_step: float = DEFAULT_REL_STEP, step: float | None = None,
              weights: Mapping[str, float] | None = None,
              metadata: Mapping[str, Any] | None = None,
              zstd_level: int = HIFI_ZSTD_LEVEL) -> dict[str, float]:
    """Write the task vector ``tv`` as a hi-fi file (atomically); return the steps.

    ``rel_step``, ``step`` and ``weights`` are :func:`hifi_steps`'s. ``metadata`` adds keys
    to the file's metadata (``compeft.base``, for instance); :data:`HIFI_KEY` is this
    module's. Tensors are read one at a time (``tv`` may be lazy), twice when the step comes
    from ``rel_step``.

    >>> import os, tempfile, numpy as np
    >>> p = os.path.join(tempfile.mkdtemp(), "e.compeft")
    >>> save_hifi({"w": np.array([0.5, -1.0, 0.24], np.float32)}, p, step=0.25)
    {'w': 0.25}
    >>> load_hifi(p)["w"].tolist()
    [0.5, -1.0, 0.25]
    """
    steps = hifi_steps(tv, rel_step=rel_step, step=step, weights=weights)
    meta = dict(metadata or {})
    if HIFI_KEY in meta:
        raise EncodeError(f"metadata key {HIFI_KEY!r} is written by save_hifi")
    meta[HIFI_KEY] = {"steps": list(steps.values()), "version": _VERSION}

    def write(f) -> None:
        with Writer(f, metadata=meta, zstd_level=zstd_level) as w:
            for name, codes in _records(tv, steps):
                w.write(name, codes)

    atomic_write(path, write)
    return steps


def _records(tv: Mapping[str, Any], steps: Mapping[str, float]) -> Iterator[tuple[str, Any]]:
    for name, s in steps.items():
        yield name, hifi_codes(tv[name], s, name=name)


def hifi_decode(codes: np.ndarray, step: float) -> np.ndarray:
    """``code * step`` in float32 (computed in float64, rounded once): the decode rule.

    >>> x = hifi_decode(np.array([1, -3, 30], np.int8), 0.25)
    >>> x.dtype, x.tolist()
    (dtype('float32'), [0.25, -0.75, 7.5])
    """
    return np.asarray(np.asarray(codes).astype(np.float64) * step, np.float32)


def hifi_layout(meta: Mapping[str, Any], names: list[str], infos: Mapping[str, Any] | None = None,
                where: str = "file") -> dict[str, tuple[float | None, str | None]]:
    """Parse and check a file's :data:`HIFI_KEY`: name -> ``(step, original dtype)``.

    ``names`` are the file's records in record order; ``infos`` (name -> an object with a
    ``dtype``, as ``Reader.info`` gives) checks that a record with a step holds integer
    codes. A step of None is a record stored as it is; the dtype is None when the file does
    not record it. Raises :class:`HifiError`.

    >>> hifi_layout({HIFI_KEY: {"version": 1, "steps": [0.5, None], "dtypes": ["BF16", None]}},
    ...             ["a", "b"])
    {'a': (0.5, 'BF16'), 'b': (None, None)}
    """
    hifi = meta.get(HIFI_KEY)
    if not isinstance(hifi, dict) or hifi.get("version") != _VERSION:
        raise HifiError(f"{where}: not a hi-fi file: metadata key {HIFI_KEY!r} is "
                        f"{hifi!r}, not a version {_VERSION} object")
    steps = hifi.get("steps")
    if (not isinstance(steps, list) or len(steps) != len(names)
            or not all(s is None or (isinstance(s, (int, float)) and not isinstance(s, bool)
                                     and 0 <= s < math.inf) for s in steps)):
        raise HifiError(f"{where}: {HIFI_KEY} steps: need {len(names)} finite numbers >= 0 "
                        "or null (one per record)")
    dtypes = hifi.get("dtypes", [None] * len(names))
    if (not isinstance(dtypes, list) or len(dtypes) != len(names)
            or not all(d is None or d in S.ITEMSIZE for d in dtypes)):
        raise HifiError(f"{where}: {HIFI_KEY} dtypes: need {len(names)} dtype names or null "
                        "(one per record)")
    for name, s, d in zip(names, steps, dtypes, strict=True):
        if s is None:
            continue
        if d is not None and d not in S.TERNARY_DTYPES:
            raise HifiError(f"{where}: a record with a step must come from a float tensor, "
                            f"got dtype {d}", tensor=name)
        got = infos[name].dtype if infos is not None else None
        if got is not None and got not in _CODE_DTYPES:
            raise HifiError(f"{where}: hi-fi records with a step are integer codes "
                            f"({'/'.join(_CODE_DTYPES)}), got {got}", tensor=name)
    return {n: (None if s is None else float(s), d)
            for n, s, d in zip(names, steps, dtypes, strict=True)}


def hifi_original_bytes(meta: Mapping[str, Any], tensors: Any) -> int | None:
    """Bytes the tensors of a hi-fi file took in their original dtypes (float32 where the
    file does not record them), or None for a file that is not a valid hi-fi file.

    ``tensors``: the file's records in order, objects with ``name``, ``dtype``, ``numel`` and
    ``dense_size`` (``inspect(path).tensors``). ``compeft info`` reports the ratio against
    this: the codes' own dense size (1 byte an entry for I8) says nothing of the original.
    """
    records = list(tensors)
    try:
        layout = hifi_layout(meta, [t.name for t in records], {t.name: t for t in records})
    except HifiError:
        return None
    return sum(t.dense_size if layout[t.name][0] is None
               else t.numel * S.ITEMSIZE[layout[t.name][1] or "F32"] for t in records)


def load_hifi(path: str | os.PathLike | bytes) -> dict[str, np.ndarray]:
    """Decode a hi-fi file (a path or its bytes) to name -> float32 array.

    A record without a step (stored as it is) comes back as the reader decodes it. Raises
    :class:`HifiError` for a file without the :data:`HIFI_KEY` metadata or whose steps do
    not match its records (count, integer dtypes).

    >>> import os, tempfile, numpy as np
    >>> p = os.path.join(tempfile.mkdtemp(), "e.compeft")
    >>> save_hifi({"w": np.array([0.5, -1.0, 0.26], np.float32)}, p, step=0.25)
    {'w': 0.25}
    >>> load_hifi(p)["w"]  # each value within half a step
    array([ 0.5 , -1.  ,  0.25], dtype=float32)
    """
    with open_file(path) as reader:
        names = reader.keys()
        layout = hifi_layout(reader.metadata(), names,
                             where=os.fspath(path) if not isinstance(path, bytes) else "file")
        out = {}
        for name, (s, _) in layout.items():
            codes = reader.get(name)
            if s is None:
                out[name] = codes
                continue
            if not (isinstance(codes, np.ndarray) and codes.dtype.kind == "i"):
                raise HifiError("hi-fi records are dense integer codes, got "
                                f"{getattr(codes, 'dtype', type(codes).__name__)}", tensor=name)
            out[name] = hifi_decode(codes, s)  # 0-d too
        return out


def probe_weights(tv: Mapping[str, Any], distortion: Callable[[dict[str, np.ndarray]], float],
                  *, group: Callable[[str], str] | None = None, rel_step: float = 0.5,
                  weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """Weights for :func:`hifi_steps` from the measured effect of each group's quantisation.

    For each group of tensors (``group(name)``; default one group per tensor), the task
    vector is rebuilt with only that group quantised (at ``rel_step`` and ``weights``) and
    ``distortion`` scores it: for instance ``1 -`` the mean cosine of the model's outputs
    with the fine-tune's on a few calibration inputs (not the ones you evaluate on). The
    distortion of a group grows as its step squared, so the steps that minimise the total
    for a given size make a group's weight ``sqrt(d_g / n_g)`` (``n_g`` its entries) times
    the given ``weights``. A group whose noise is not measurable (``d_g <= 0``) gets the
    per-entry sensitivity of the least sensitive measured group. Costs one call of
    ``distortion`` per group. Weights are scaled to a geometric mean of 1 over the entries.

    >>> import numpy as np
    >>> tv = {"a": np.linspace(-1, 1, 50), "b": np.linspace(-1, 1, 50)}
    >>> def d(t):  # squared errors, those of a weigh 100 times more
    ...     return float(100 * ((t["a"] - tv["a"]) ** 2).sum() + ((t["b"] - tv["b"]) ** 2).sum())
    >>> w = probe_weights(tv, d)
    >>> round(w["a"] / w["b"], 6)  # errors in a cost 100 times more: a step 10 times finer
    10.0
    """
    names = sorted(tv, key=lambda n: n.encode())
    key = group or (lambda n: n)
    steps = hifi_steps(tv, rel_step=rel_step, weights=weights)
    values = {n: _values(tv[n], n) for n in names}
    members: dict[str, list[str]] = {}
    for n in names:
        members.setdefault(key(n), []).append(n)
    per_entry: dict[str, float] = {}
    for g, ns in members.items():
        rebuilt = dict(values)
        for n in ns:
            rebuilt[n] = (hifi_codes(values[n], steps[n], name=n) * steps[n]).astype(
                values[n].dtype)
        d = float(distortion(rebuilt))
        if not math.isfinite(d):
            raise EncodeError(f"distortion of group {g!r} is {d!r}")
        size = sum(values[n].size for n in ns)
        per_entry[g] = d / size if size else 0.0
    measured = [v for v in per_entry.values() if v > 0]
    if not measured:
        raise EncodeError("no group's quantisation changed the distortion; use a larger "
                          f"rel_step than {rel_step!r}")
    least = min(measured)
    raw = {n: math.sqrt(max(per_entry[key(n)], 0) or least)
           * (1.0 if weights is None else weights.get(n, 1.0)) for n in names}
    total = sum(values[n].size for n in names)
    gm = math.exp(sum(values[n].size * math.log(raw[n]) for n in names) / total)
    return {n: raw[n] / gm for n in names}


def lora_weights(adapter: Mapping[str, Any], *, floor: float = 1e-3) -> dict[str, float]:
    """Weights for :func:`hifi_steps` that minimise the error of a LoRA adapter's merged weights.

    ``adapter`` holds the trained factors (the full ``A``, not ``A - A_init``). An error
    ``e_A`` in ``A`` (``r x in``) changes the merged weight by ``B e_A``, whose expected
    squared norm is ``var(e_A) * in * ||B||^2``; the step that minimises the merged error
    for a given size makes ``s_A`` proportional to ``1 / ||B||`` (and ``s_B`` to
    ``1 / ||A||``). Names with ``.lora_A.`` / ``.lora_B.`` are paired; every other tensor
    gets the geometric mean. Weights are scaled to a geometric mean of 1 over the entries,
    so ``rel_step`` keeps its meaning; a factor whose partner is zero (it does not change
    the model) gets ``floor`` times that.

    >>> import numpy as np
    >>> w = lora_weights({"m.lora_A.weight": np.ones((2, 4)),
    ...                   "m.lora_B.weight": np.full((4, 2), 2.0)})
    >>> round(w["m.lora_A.weight"] / w["m.lora_B.weight"], 6)
    2.0
    """
    raw: dict[str, float] = {}
    sizes: dict[str, int] = {}
    for name, value in adapter.items():
        arr = _values(value, name)
        sizes[name] = arr.size
        for mine, other in ((".lora_A.", ".lora_B."), (".lora_B.", ".lora_A.")):
            partner = name.replace(mine, other)
            if mine in name and partner in adapter:
                raw[name] = math.sqrt(_sum_squares(_values(adapter[partner], partner), partner))
    pos = [(v, sizes[n]) for n, v in raw.items() if v > 0]
    total = sum(n for _, n in pos)
    gm = math.exp(sum(n * math.log(v) for v, n in pos) / total) if total else 1.0
    return {name: (raw[name] / gm if raw.get(name, 0) > 0 else floor) if name in raw else 1.0
            for name in adapter}
