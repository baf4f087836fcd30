"""Merging task vectors: task arithmetic and TIES, straight from sparse ternary tensors.

:func:`merge` combines task vectors held in memory (dicts of :class:`TernaryTensor`, numpy
arrays or torch tensors); :func:`merge_files` does the same from compeft files or compressed
adapter directories, one tensor at a time.

Semantics (per tensor, on the decoded task vectors ``t_1 .. t_n`` with weights ``w_i``)
------------------------------------------------------------------------------------
* ``"sum"``: task arithmetic, ``sum_i w_i t_i``
  (``peft.utils.merge_utils.task_arithmetic``).
* ``"mean"``: the same divided by ``n``.
* ``"ties"``: TIES-Merging with the trim step already done by the compression
  (``peft.utils.merge_utils.ties(..., density=1.0)``): elect the sign of each entry from
  ``sum_i t_i`` (``sign="total"``; a zero sum counts as positive) or from the count of
  positive minus negative entries (``sign="frequency"``), then average ``w_i t_i`` over the
  inputs whose entry is nonzero with the elected sign (zero where there is none). The weights
  take no part in the election, as in PEFT.

Arithmetic is done in float32 (float64 for F64 tensors; BF16 and F16 values widen exactly), in
PEFT's order of operations, adding the inputs one after the other in input order: on the same
float32 inputs the results equal PEFT's wherever PyTorch adds the stacked inputs in that order
(it does for most elements; where it does not, they differ by float rounding).

How it is fast
--------------
A ternary input is a set of positions with signs and one magnitude, so at every position the
merged value depends only on which inputs are nonzero there and with what sign: its *pattern*,
one of ``3^n``. The value of every pattern is computed once, with the very arithmetic above
applied to a table of all patterns, and the tensor is merged by scattering each input's
pattern digit (``3^i`` for plus, ``2 * 3^i`` for minus) into a cache-sized chunk of ``uint16``
codes and looking the codes up in the table: no dense float array of any input is built. For
more than :data:`MAX_PATTERN_INPUTS` inputs, or when an input is dense, the stacked dense
chunk is combined directly (same arithmetic, slower).

Rescaling (a plug-in point)
---------------------------
``rescale`` (a callable, or the name of a rule in :data:`RESCALE_RULES`) is called once per
tensor with a :class:`MergeStats`: the inputs' magnitudes, the weights and, for ternary
inputs, how many entries carry each sign pattern. It returns a factor for the merged tensor,
or a :class:`Rescale` that also multiplies each input's magnitude *before* the election and
the averaging, or the merged value of every sign pattern outright. Rules are data-free: they
see the structure of the inputs, not a model. A rule whose statistics span tensors (as a
compression's global scope does) also has a ``prepare`` attribute: given every tensor's
:class:`MergeStats` before anything is merged, it returns each tensor's answer.

For TIES of compressed experts use ``rescale="expected_ties"`` (:func:`expected_ties`): every
entry gets the expected TIES of the original experts given what their compressions kept,
scaled to keep each expert's projection. ``rescale="dense_divisor"`` (:func:`dense_divisor`)
is the simpler earlier rule. Both are measured in ``bench/results/merge_quality.md``; neither
is the default, which stays PEFT's definition.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any, BinaryIO

import numpy as np

from . import _spec as S
from . import dtypes as _dt
from ._progress import Bar
from ._spec import TERNARY_DTYPES
from .binding import Reference, check_base, read_reference
from .compress import (
    DEFAULT_SCALE,
    SCALES,
    SCOPES,
    TopK,
    compression_metadata,
    iter_compress,
)
from .container import CompeftReader, Writer, open_file
from .convert import DEFAULT_DENSITY, add_rounded, cast_storage, with_path
from .errors import CompeftError, EncodeError
from .outputs import Output, write_fsync
from .peft_init import recorded_recipe, regenerated_file
from .plan import CHUNK, META_SAFETENSORS, META_TASK_VECTOR
from .safetensors_io import SafetensorsReader, SafetensorsWriter
from .sources import (
    ADAPTER_COMPEFT,
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    Source,
    base_weights,
    resolve_source,
)
from .tensor import TernaryTensor, dense_values

__all__ = [
    "EXPECTED_SAMPLES",
    "MAX_PATTERN_INPUTS",
    "METHODS",
    "PATTERN_SCALES",
    "PATTERN_SCOPES",
    "RESCALE_RULES",
    "SIGN_METHODS",
    "MergeError",
    "MergeStats",
    "Rescale",
    "TensorMerge",
    "check_names",
    "check_options",
    "combine",
    "dense_divisor",
    "expected_ties",
    "merge",
    "merge_and_compress",
    "merge_tensor",
]

METHODS = ("ties", "sum", "mean")
SIGN_METHODS = ("total", "frequency")
#: Up to this many ternary inputs a tensor is merged through its table of sign patterns
#: (``3^8 = 6561`` entries; codes fit in ``uint16``); more go through dense chunks.
MAX_PATTERN_INPUTS = 8
_CHUNK = 1 << 16  # elements per chunk: the codes, the lookup's index temporary and the
#                   values of a chunk stay in L2


class MergeError(CompeftError, ValueError):
    """Inputs that do not fit together (names, shapes, dtypes, references), or a bad option."""


# ---------------------------------------------------------------------------------------------
# rescaling hook
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rescale:
    """What a rescaling rule returns for one tensor.

    ``before``: one factor per input, multiplying its magnitude (ternary) or values (dense)
    before the sign election and the averaging (None: all 1). ``after``: a factor multiplying
    the merged tensor. ``zeros`` (TIES only): one count per input, added to an entry's
    divisor where that input is zero (None: all 0, PEFT's divisor; see :func:`dense_divisor`).
    ``table`` (ternary inputs with pattern counts only): the merged value of every sign
    pattern (``3**n`` values, indexed as :attr:`MergeStats.counts`), in place of the merge's
    arithmetic; ``after`` still multiplies it (see :func:`expected_ties`).

    >>> Rescale(after=0.5)
    Rescale(before=None, after=0.5, zeros=None, table=None)
    """

    before: tuple[float, ...] | None = None
    after: float = 1.0
    zeros: tuple[float, ...] | None = None
    table: tuple[float, ...] | None = None


@dataclass(frozen=True)
class MergeStats:
    """What a rescaling rule sees of one tensor (data-free: the inputs' structure only).

    Attributes
    ----------
    name, shape, dtype:
        The tensor.
    method, sign:
        The merge options.
    weights:
        One weight per input (as given, before the cast to the compute dtype).
    magnitudes:
        Each ternary input's magnitude as decoded (its scale rounded to the dtype); None for
        a dense input.
    counts:
        When every input is ternary and there are at most :data:`MAX_PATTERN_INPUTS` of them:
        ``counts[p]`` entries of the tensor have sign pattern ``p``, where digit ``i`` of
        ``p`` in base 3, ``(p // 3**i) % 3``, is 0 if input ``i`` is zero there, 1 if
        positive, 2 if negative (:meth:`digits`). Else None (the rule must then cope without).

    Examples
    --------
    >>> a = TernaryTensor((4,), [0, 1], [False, False], 1.0)
    >>> b = TernaryTensor((4,), [1, 2], [True, False], 1.0)
    >>> seen = []
    >>> _ = merge_tensor([a, b], rescale=lambda s: seen.append(s) or 1.0)
    >>> seen[0].overlap().tolist()   # entries nonzero in 0, 1 and 2 inputs
    [1, 2, 1]
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    method: str
    sign: str
    weights: tuple[float, ...]
    magnitudes: tuple[float | None, ...]
    counts: np.ndarray | None

    @property
    def n(self) -> int:
        """Number of inputs."""
        return len(self.weights)

    @property
    def numel(self) -> int:
        """Elements of the tensor."""
        return math.prod(self.shape)

    def digits(self) -> np.ndarray:
        """``(n, 3**n)`` array: digit ``i`` of every pattern (0 zero, 1 plus, 2 minus)."""
        return _digits(self.n)

    def overlap(self) -> np.ndarray:
        """Entries by how many inputs are nonzero there: an array of ``n + 1`` counts."""
        if self.counts is None:
            raise MergeError("overlap needs ternary inputs (counts is None)", tensor=self.name)
        nonzero = (self.digits() != 0).sum(axis=0)
        return np.bincount(nonzero, weights=self.counts, minlength=self.n + 1).astype(np.int64)

    def values(self, before: Sequence[float] | None = None,
               zeros: Sequence[float] | None = None) -> np.ndarray:
        """The merged value of every pattern (``3**n`` values; ``before``, ``zeros`` as in
        :class:`Rescale`)."""
        if self.counts is None:
            raise MergeError("values needs ternary inputs (counts is None)", tensor=self.name)
        work = _work_dtype(self.dtype)
        mags = _scaled_magnitudes(self.magnitudes, before, work)
        return _pattern_table(mags, _weights_array(self.weights, work), self.method, self.sign,
                              zeros)


RescaleRule = Callable[[MergeStats], float | Rescale]
#: Named data-free rescaling rules (``rescale="name"``, ``compeft merge --rescale NAME``).
RESCALE_RULES: dict[str, RescaleRule] = {}


def dense_divisor(stats: MergeStats) -> Rescale:
    """TIES over compressed inputs, divided as TIES over the uncompressed inputs would be.

    TIES averages each entry over the inputs that agree with its elected sign. Over dense task
    vectors nearly every input is nonzero everywhere, so the divisor is about ``1 + (n-1)/2``;
    over sparse ternary ones an entry is mostly kept by one input alone, so it is about 1,
    and the merge comes out 1.5 to 2 times stronger than the merge of the originals (measured
    in ``bench/results/merge_quality.md``: TIES of three compressed LoRA experts then keeps
    less than a third of the gain the originals' TIES keeps). A zero of a ternary input is an
    entry its compression dropped, with a sign nobody knows: it agrees with the elected sign
    with some chance ``p``, and then counts in the originals' divisor. So each zero adds ``p``
    to the divisor: an entry kept with the elected sign by ``c`` inputs and dropped by ``z``
    divides by ``c + p * z``. ``p`` is estimated from the inputs themselves: the fraction of
    pairs of kept entries at one position that share a sign (plus one agreeing and one
    disagreeing pair, so that ``p = 1/2`` without overlaps; independent inputs give 1/2).

    Inputs with no kept entry in the tensor add nothing (nothing is known of them), nor does a
    dense input (its zeros are real). Identity for ``"sum"`` and ``"mean"`` (their merge of
    compressed inputs already keeps each input's component along its original: the default
    scale preserves it) and where no input is ternary.

    >>> a = TernaryTensor((4,), [0, 1], [False, False], 1.0)   # +1 at 0 and 1
    >>> b = TernaryTensor((4,), [1, 2], [True, False], 1.0)    # -1 at 1, +1 at 2
    >>> merge_tensor([a, b], rescale=None).tolist()        # PEFT's TIES
    [1.0, 1.0, 1.0, 0.0]
    >>> # one overlapping pair, of opposite signs: p = (0 + 1) / (1 + 2) = 1/3; entries 0
    >>> # and 2 are kept by one input and dropped by the other: divided by 1 + 1/3
    >>> merge_tensor([a, b], rescale="dense_divisor").tolist()
    [0.75, 1.0, 0.75, 0.0]
    """
    if stats.method != "ties" or all(m is None for m in stats.magnitudes):
        return Rescale()
    if stats.counts is None:  # too many inputs for pattern counts: independent inputs
        p, present = 0.5, [m is not None and m > 0 for m in stats.magnitudes]
    else:
        d = stats.digits().astype(np.int64)
        plus, minus = (d == 1).sum(0), (d == 2).sum(0)
        c = stats.counts.astype(np.float64)
        same = float(c @ (plus * (plus - 1) + minus * (minus - 1))) / 2
        pairs = float(c @ ((plus + minus) * (plus + minus - 1))) / 2
        p = (same + 1) / (pairs + 2)
        present = (c @ (d != 0).T > 0).tolist()
    return Rescale(zeros=tuple(p if ok and m is not None else 0.0
                               for ok, m in zip(present, stats.magnitudes, strict=True)))


RESCALE_RULES["dense_divisor"] = dense_divisor


#: Samples per input and sign pattern in :func:`expected_ties`'s expectations (equal-
#: probability atoms of each input's distribution; the tables move by well under 1% between
#: 1024 and 8192).
EXPECTED_SAMPLES = 1024


def _normal_atoms(density: float, k: int) -> tuple[float, np.ndarray, np.ndarray]:
    """``(a, kept, dropped)`` for a standard normal ``z`` of which the fraction ``density`` of
    largest ``|z|`` is kept: the threshold ``a`` and ``k`` equal-probability atoms (midpoint
    quantiles) of ``|z|`` given ``|z| > a`` and given ``|z| < a``."""
    nd = NormalDist()
    u = (np.arange(k) + 0.5) / k
    a = nd.inv_cdf(1.0 - density / 2)
    kept = np.array([nd.inv_cdf(1.0 - x * density / 2) for x in u.tolist()])
    dropped = np.array([nd.inv_cdf(0.5 + x * (1.0 - density) / 2) for x in u.tolist()])
    return a, kept, dropped


def _expected_rescales(stats: Mapping[str, MergeStats]) -> dict[str, Rescale]:
    """:func:`expected_ties` for every tensor of a merge at once (its ``prepare``)."""
    out: dict[str, Rescale] = {}
    model = {name: st for name, st in stats.items() if st.method == "ties"
             and st.counts is not None and all(m is not None for m in st.magnitudes)}
    for name, st in stats.items():
        if name not in model:
            out[name] = dense_divisor(st)
    if not model:
        return out
    n = next(iter(model.values())).n
    # each input's kept fraction of each tensor, from the pattern counts
    nnz = {name: np.array([st.counts @ (st.digits()[i] != 0) for i in range(n)], np.int64)
           for name, st in model.items()}
    # the threshold of each input's compression scope (tensors sharing its scale): the
    # proj rule's scale is sum(t^2) / sum(|kept t|) over the scope; with t ~ N(0, sigma_T^2)
    # in tensor T, kept where |t| > tau (a_T = tau / sigma_T, from the kept fraction), that
    # is tau * sum(N_T / a_T^2) / sum(N_T * 2 phi(a_T) / a_T): solved for tau
    atoms: dict[tuple[str, int], tuple[float, np.ndarray, np.ndarray]] = {}
    groups: dict[tuple[int, float], list[str]] = {}
    for name, st in model.items():
        for i in range(n):
            d = int(nnz[name][i]) / st.numel if st.numel else 0.0
            if d > 0:
                d = min(d, 1.0 - 0.5 / st.numel)  # all kept: as if half an entry was dropped
                atoms[name, i] = _normal_atoms(d, EXPECTED_SAMPLES)
                groups.setdefault((i, float(st.magnitudes[i])), []).append(name)
    phi = NormalDist().pdf
    sigma: dict[tuple[str, int], float] = {}
    for (i, scale), names in groups.items():
        num = sum(model[t].numel * 2 * phi(atoms[t, i][0]) / atoms[t, i][0] for t in names)
        den = sum(model[t].numel / atoms[t, i][0] ** 2 for t in names)
        tau = scale * num / den
        for t in names:
            sigma[t, i] = tau / atoms[t, i][0]
    rng = np.random.default_rng(0)  # fixed: the same pairing of atoms every time
    perms = [(rng.permutation(EXPECTED_SAMPLES), rng.permutation(EXPECTED_SAMPLES),
              np.where(rng.permutation(EXPECTED_SAMPLES) % 2 == 0, 1.0, -1.0))
             for _ in range(n)]
    digits = _digits(n).astype(np.int64)
    mirror = (np.where(digits == 0, 0, 3 - digits) * 3 ** np.arange(n)[:, None]).sum(0)
    sums: dict[tuple[float, ...], list[np.ndarray]] = {}
    shares: dict[str, np.ndarray] = {}
    for name, st in model.items():
        assert st.counts is not None
        seen = np.flatnonzero(st.counts)
        pats = np.union1d(seen, mirror[seen])
        d = digits[:, pats]  # (n, patterns)
        rows = np.zeros((n, pats.size, EXPECTED_SAMPLES))
        for i in range(n):
            if (name, i) not in atoms:
                continue  # nothing kept: nothing known of this input here, it counts as zero
            _, kept, dropped = atoms[name, i]
            pk, pd, ps = perms[i]
            k, z = kept[pk] * sigma[name, i], dropped[pd] * ps * sigma[name, i]
            rows[i] = np.where((d[i] == 1)[:, None], k, np.where((d[i] == 2)[:, None], -k, z))
        parts = _ties_parts(rows, np.array(st.weights), st.sign)  # (n, patterns, samples)
        m = parts.sum(0)
        c = st.counts[pats].astype(np.float64)
        # each input's share of the expected merge, odd in the signs as the expectation is
        share = np.zeros((n, 3**n))
        share[:, pats] = parts.mean(2)
        share = (share - share[:, mirror]) / 2
        share[:, 0] = 0.0  # nothing kept anywhere: zero (keeps the merge sparse)
        shares[name] = share
        means = np.where(d != 0, rows.mean(2), 0.0)  # E[t_i | pattern]: 0 where dropped
        key = tuple(float(x) for x in st.magnitudes)
        acc = sums.setdefault(key, [np.zeros(n), np.zeros((n, n))])
        acc[0] += (rows * m).mean(2) @ c  # E <TIES(t), t_i>
        acc[1] += (means * c) @ share[:, pats].T  # <share_j, E[t_i | pattern]>
    for name, st in model.items():
        want, gram = sums[tuple(float(x) for x in st.magnitudes)]
        factors = _projection_factors(want, gram)
        out[name] = Rescale(table=tuple((factors @ shares[name]).tolist()))
    return out


def _ties_parts(rows: np.ndarray, weights: np.ndarray, sign: str) -> np.ndarray:
    """Each input's part of TIES over ``rows`` (inputs on axis 0): ``w_i t_i`` where it agrees
    with the elected sign, over the count that agrees (the parts sum to :func:`combine`)."""
    signs = np.sign(rows)
    elected = (rows if sign == "total" else signs).sum(0)
    mask = signs == np.where(elected >= 0, 1.0, -1.0)
    return rows * weights.reshape((-1,) + (1,) * (rows.ndim - 1)) * mask / np.maximum(
        mask.sum(0), 1)


def _projection_factors(want: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """Factors ``f`` with ``sum_j f_j gram[i, j] = want[i]`` for every input ``i`` (each
    input's projection kept); one common factor where that has no positive solution."""
    live = np.diag(gram) > 0
    f = np.ones(want.size)
    if live.any():
        try:
            sol = np.linalg.solve(gram[np.ix_(live, live)], want[live])
        except np.linalg.LinAlgError:
            sol = None
        if sol is None or not np.all(np.isfinite(sol)) or np.any(sol <= 0):
            total = gram[np.ix_(live, live)].sum()
            sol = np.full(int(live.sum()), want[live].sum() / total if total > 0 else 1.0)
        f[live] = sol
    return f


def expected_ties(stats: MergeStats) -> Rescale:
    """TIES of the originals, as expected from their compressions, kept at its projections.

    A ternary input is what its compression kept of a task vector ``t_i``: the sign of every
    entry with ``|t_i| > tau_i``, and a scale; every other entry (``|t_i| < tau_i``, sign
    unknown) reads 0. What TIES of the original ``t_i`` gives at an entry depends on values
    the compression dropped, so this rule takes its expectation given what was kept: each
    input's entries are modelled as normal, ``N(0, sigma_iT^2)`` in tensor ``T`` (task vector
    entries are close to it, and it is all a kept fraction and a scale can pin down), with
    ``tau_i / sigma_iT`` set by the fraction of ``T`` the input keeps and ``tau_i`` by its
    scale (the ``proj`` rule's ``sum t^2 / sum |kept t|`` over the scale's scope: the tensors
    sharing the input's scale), inputs independent. For every sign pattern ``P`` (which
    inputs keep an entry, and with what sign) the merged value is ``E[TIES(t) | P]``, an
    average over equal-probability atoms of each input's conditional distribution, with the
    merge's weights and sign election. That is the merge the originals' TIES is closest to
    (least squares); like each compression's own kept entries it is shrunk toward zero, and
    the compressor's ``proj`` rule undoes that by keeping each expert's projection on its
    original. The merge is scaled the same way: each input's part of the expectation (what
    it adds where it agrees with the elected sign) gets one factor per scope, solved so that
    the merge's projection on every input, ``<merge, t_i>``, is its expectation
    ``E<TIES(t), t_i>`` over the originals (one common factor if that has no positive
    solution). Sparse in, sparse out: an entry no input keeps stays 0.

    It assumes the inputs' scales follow the ``proj`` rule (the default ``proj_vcap``, and
    ``proj``); under another rule their thresholds, and so the merge's magnitude, are off
    by that rule's ratio to ``proj``.

    Every number comes from the inputs (kept fractions, scales, overlaps): no data and no
    fitted constant. Through :func:`merge`, :func:`merge_files` and
    :func:`merge_and_compress` the scopes span tensors (``expected_ties.prepare`` sees every
    tensor first); called on one tensor it is that tensor's own scope. Where the model does
    not apply it is :func:`dense_divisor`: a dense input, more than
    :data:`MAX_PATTERN_INPUTS` inputs; the identity for ``"sum"`` and ``"mean"``. Measured on
    three compressed LoRA experts in ``bench/results/merge_quality.md``.

    >>> rng = np.random.default_rng(0)
    >>> experts = [{"w": rng.standard_normal(4000).astype(np.float32)} for _ in range(3)]
    >>> from compeft_format.compress import compress
    >>> comp = [compress(t, density=0.2) for t in experts]
    >>> def share(m):  # how strongly each expert comes through: <m, t_i> / ||t_i||^2
    ...     return [round(float(m["w"] @ t["w"] / (t["w"] @ t["w"])), 1) for t in experts]
    >>> share(merge(experts))                       # TIES of the originals
    [0.5, 0.5, 0.5]
    >>> share(merge(comp))                          # PEFT's TIES of the compressions
    [0.8, 1.0, 0.7]
    >>> share(merge(comp, rescale="expected_ties"))
    [0.5, 0.5, 0.5]
    """
    return _expected_rescales({stats.name: stats})[stats.name]


expected_ties.prepare = _expected_rescales  # type: ignore[attr-defined]
RESCALE_RULES["expected_ties"] = expected_ties


def _resolve_rescale(rescale: str | RescaleRule | None) -> RescaleRule | None:
    if rescale is None or callable(rescale):
        return rescale
    try:
        return RESCALE_RULES[rescale]
    except (KeyError, TypeError):
        raise MergeError(f"rescale must be a callable or one of {sorted(RESCALE_RULES)}, "
                         f"got {rescale!r}") from None


def _as_rescale(result: Any, n: int, name: str) -> Rescale:
    if isinstance(result, Rescale):
        out = result
    elif isinstance(result, (int, float, np.integer, np.floating)) and not isinstance(result,
                                                                                       bool):
        out = Rescale(after=float(result))
    else:
        raise MergeError(f"a rescale rule returns a float or a Rescale, got {result!r}",
                         tensor=name)
    factors = [*list(out.before or ()), out.after, *list(out.zeros or ())]
    if out.before is not None and len(out.before) != n:
        raise MergeError(f"rescale gave {len(out.before)} input factors for {n} inputs",
                         tensor=name)
    if out.zeros is not None and (len(out.zeros) != n or min(out.zeros) < 0):
        raise MergeError(f"rescale zeros must be {n} counts >= 0, got {out.zeros}", tensor=name)
    if out.table is not None:
        if len(out.table) != 3**n:
            raise MergeError(f"rescale table must hold 3**{n} = {3**n} pattern values, got "
                             f"{len(out.table)}", tensor=name)
        if not all(math.isfinite(float(v)) for v in out.table):
            raise MergeError("rescale table values must be finite", tensor=name)
    if not all(math.isfinite(float(f)) for f in factors):
        raise MergeError(f"rescale factors must be finite, got {out}", tensor=name)
    return out


def _prepared(rescale: str | RescaleRule | None, names: Sequence[str],
              build: Callable[[str], TensorMerge]) -> dict[str, Rescale]:
    """The answers of a rule with a ``prepare`` (statistics spanning tensors), per tensor.

    ``build(name)`` makes a tensor's :class:`TensorMerge`; the rule sees every tensor's
    :class:`MergeStats` at once (one pass over each tensor's codes). Empty for other rules.
    """
    rule = _resolve_rescale(rescale)
    prepare = getattr(rule, "prepare", None)
    if prepare is None:
        return {}
    stats = {}
    for name in names:
        tm = build(name)
        stats[name] = tm.stats()
    answers = prepare(stats)
    return {name: _as_rescale(answers[name], stats[name].n, name) for name in names}


# ---------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------
def check_options(n: int, method: str, weights: Sequence[float] | None, sign: str
                  ) -> tuple[float, ...]:
    """Check the merge options for ``n`` inputs; return the weights (default all 1).

    >>> check_options(2, "ties", None, "total")
    (1.0, 1.0)
    """
    if method not in METHODS:
        raise MergeError(f"method must be one of {METHODS}, got {method!r}")
    if sign not in SIGN_METHODS:
        raise MergeError(f"sign must be one of {SIGN_METHODS}, got {sign!r}")
    if n < 1:
        raise MergeError("nothing to merge: no inputs")
    if weights is None:
        return (1.0,) * n
    if isinstance(weights, (str, bytes)):
        raise MergeError(f"weights must be a sequence of numbers, got {weights!r}")
    ws = list(weights.tolist() if hasattr(weights, "tolist") else weights)
    if len(ws) != n:
        raise MergeError(f"{len(ws)} weights for {n} inputs")
    out = []
    for w in ws:
        if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)):
            raise MergeError(f"weights must be numbers, got {w!r}")
        if not math.isfinite(float(w)):
            raise MergeError(f"weights must be finite, got {float(w)!r}")
        out.append(float(w))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# the arithmetic (PEFT's, in numpy)
# ---------------------------------------------------------------------------------------------
def _work_dtype(dtype: str) -> np.dtype:
    return np.dtype(np.float64 if dtype == "F64" else np.float32)


def _weights_array(weights: Sequence[float], work: np.dtype) -> np.ndarray:
    return np.array(weights, dtype=np.float64).astype(work)


def _seqsum(rows: np.ndarray) -> np.ndarray:
    """Sum over axis 0, adding the rows one after the other (the order is part of the result)."""
    acc = np.zeros(rows.shape[1:], rows.dtype)
    for r in rows:
        acc += r
    return acc


def combine(stack: np.ndarray, weights: np.ndarray, method: str, sign: str,
            zeros: Sequence[float] | None = None) -> np.ndarray:
    """Merge ``stack`` (``n`` task vectors on axis 0) as PEFT does, in ``stack``'s dtype.

    ``weights`` holds ``n`` values of the same dtype. This is the definition every fast path
    is checked against. ``zeros`` (TIES): input ``i`` adds ``zeros[i]`` to the divisor of
    every entry where it is zero (None: PEFT's divisor, the count of agreeing inputs).

    >>> t = np.array([[1.0, -2.0, 0.0], [3.0, 1.0, 0.0]], np.float32)
    >>> combine(t, np.ones(2, np.float32), "ties", "total").tolist()
    [2.0, -2.0, 0.0]
    >>> combine(t, np.ones(2, np.float32), "sum", "total").tolist()
    [4.0, -1.0, 0.0]
    """
    work = stack.dtype
    w = weights.reshape((-1,) + (1,) * (stack.ndim - 1))
    weighted = stack * w
    if method == "sum":
        return _seqsum(weighted)
    if method == "mean":
        return _seqsum(weighted) / work.type(stack.shape[0])
    signs = np.sign(stack)
    elected = _seqsum(stack) if sign == "total" else _seqsum(signs)
    majority = np.where(elected >= 0, work.type(1), work.type(-1))
    mask = signs == majority
    mixed = _seqsum(weighted * mask)
    kept = mask.sum(axis=0)
    if zeros is not None:
        z = np.array(zeros, dtype=np.float64).astype(work).reshape(w.shape)
        return mixed / np.maximum(kept + _seqsum((stack == 0) * z), 1)
    return mixed / np.maximum(kept, 1).astype(work)


def _digits(n: int) -> np.ndarray:
    """``(n, 3**n)`` uint8: digit i (base 3) of every pattern."""
    p = np.arange(3**n, dtype=np.int64)
    return np.stack([(p // 3**i) % 3 for i in range(n)]).astype(np.uint8) if n else np.zeros(
        (0, 1), np.uint8)


def _pattern_table(mags: np.ndarray, weights: np.ndarray, method: str, sign: str,
                   zeros: Sequence[float] | None = None) -> np.ndarray:
    """The merged value of every sign pattern of ternary inputs with magnitudes ``mags``."""
    d = _digits(mags.size)
    zero = mags.dtype.type(0)
    stack = np.where(d == 1, mags[:, None], np.where(d == 2, -mags[:, None], zero))
    return combine(stack.astype(mags.dtype, copy=False), weights, method, sign, zeros)


def _scaled_magnitudes(mags: Sequence[float | None], before: Sequence[float] | None,
                       work: np.dtype) -> np.ndarray:
    m = np.array([0.0 if v is None else v for v in mags], dtype=np.float64).astype(work)
    if before is not None:
        m = m * np.array(before, dtype=np.float64).astype(work)
    return m


# ---------------------------------------------------------------------------------------------
# one tensor
# ---------------------------------------------------------------------------------------------
class TensorMerge:
    """The merge of one tensor's inputs, produced chunk by chunk.

    ``values``: one per input, a :class:`TernaryTensor` or a flat dense *storage* array of
    the tensor (with ``dtype`` naming it: BF16 as raw ``uint16`` bits). All must have
    ``shape``'s element count. Nothing is computed until asked: :meth:`stats`,
    :meth:`chunks`, :meth:`codes` or :meth:`to_numpy`.

    >>> a = TernaryTensor((3,), [0, 2], [False, True], 0.5)
    >>> b = TernaryTensor((3,), [1, 2], [False, False], 0.25)
    >>> TensorMerge("w", (3,), "F32", [a, b]).to_numpy().tolist()
    [0.5, 0.25, -0.5]
    """

    def __init__(self, name: str, shape: tuple[int, ...], dtype: str,
                 values: Sequence[TernaryTensor | np.ndarray], *, method: str = "ties",
                 weights: Sequence[float] | None = None, sign: str = "total",
                 rescale: str | RescaleRule | Rescale | None = None) -> None:
        self.weights = check_options(len(values), method, weights, sign)
        self.name = name
        self.shape = tuple(shape)
        self.dtype = dtype
        self.method = method
        self.sign = sign
        self.numel = math.prod(self.shape)
        self.values = list(values)
        self.work = _work_dtype(dtype)
        self._w = _weights_array(self.weights, self.work)
        self.patterns = (len(values) <= MAX_PATTERN_INPUTS
                         and all(isinstance(v, TernaryTensor) for v in values))
        self._mags = tuple(
            float(dense_values(v.scale, dtype)[0]) if isinstance(v, TernaryTensor) else None
            for v in values)
        self._rescale: Rescale | None = None
        if isinstance(rescale, Rescale):  # a rule's answer, given again: it need not rerun
            self._rescale = _as_rescale(rescale, len(values), name)
            rescale = None
        self._rule = _resolve_rescale(rescale)
        self._table: np.ndarray | None = None
        self._stats: MergeStats | None = None

    # -- statistics and the rescale rule --
    def stats(self) -> MergeStats:
        """Count the sign patterns (one pass over the codes); cached."""
        if self._stats is None:
            counts = None
            if self.patterns:
                counts = np.zeros(3 ** len(self.values), np.int64)
                for _, codes in self.codes():
                    counts += np.bincount(codes, minlength=counts.size)
            self._stats = MergeStats(self.name, self.shape, self.dtype, self.method, self.sign,
                                     self.weights, self._mags, counts)
        return self._stats

    @property
    def rescale(self) -> Rescale:
        """The rescaling applied (the rule's answer; identity without a rule)."""
        if self._rescale is None:
            self._rescale = (Rescale() if self._rule is None else
                             _as_rescale(self._rule(self.stats()), len(self.values), self.name))
        return self._rescale

    def table(self) -> np.ndarray:
        """The merged value of every sign pattern, rescaling included (pattern path only)."""
        if self._table is None:
            r = self.rescale
            if r.table is not None:
                table = np.array(r.table, dtype=np.float64).astype(self.work)
            else:
                mags = _scaled_magnitudes(self._mags, r.before, self.work)
                table = _pattern_table(mags, self._w, self.method, self.sign, r.zeros)
            if r.after != 1.0:
                table = table * self.work.type(r.after)
            self._table = table
        return self._table

    # -- the passes --
    def codes(self, size: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, codes)``: the sign pattern of each element, ``size`` at a time.

        The codes array is reused from chunk to chunk: use it before the next one.
        """
        if not self.patterns:
            raise MergeError("sign patterns need at most "
                             f"{MAX_PATTERN_INPUTS} ternary inputs", tensor=self.name)
        n = self.numel
        size = size or _CHUNK
        starts = np.arange(0, n, size, dtype=np.int64)
        edges = np.append(starts, n)
        parts = []
        for i, t in enumerate(self.values):
            assert isinstance(t, TernaryTensor)
            digit = np.array([3**i, 2 * 3**i], np.uint16)
            parts.append((t.indices, digit.take(t.signs.view(np.uint8)),
                          np.searchsorted(t.indices, edges)))
        buf = np.zeros(min(size, max(n, 1)), np.uint16)
        for j, a in enumerate(starts.tolist()):
            codes = buf[: min(size, n - a)]
            codes.fill(0)
            for indices, contrib, bounds in parts:
                lo, hi = bounds[j], bounds[j + 1]
                if hi > lo:
                    codes[indices[lo:hi] - a] += contrib[lo:hi]
            yield a, codes

    def chunks(self, size: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, merged values)`` in the compute dtype, ``size`` elements at a time."""
        size = size or _CHUNK
        if self.patterns:
            table = self.table()
            for a, codes in self.codes(size):
                yield a, table.take(codes)
            return
        r = self.rescale
        if r.table is not None:
            raise MergeError("a rescale table needs ternary inputs merged by sign patterns "
                             f"(at most {MAX_PATTERN_INPUTS}, none dense)", tensor=self.name)
        before = (None if r.before is None
                  else _weights_array(r.before, self.work))
        stack = np.empty((len(self.values), min(size, max(self.numel, 1))), self.work)
        for a in range(0, self.numel, size):
            m = min(size, self.numel - a)
            rows = stack[:, :m]
            for i, v in enumerate(self.values):
                self._fill_row(rows[i], v, a, m)
                if before is not None:
                    rows[i] *= before[i]
            out = combine(rows, self._w, self.method, self.sign, r.zeros)
            if r.after != 1.0:
                out *= self.work.type(r.after)
            yield a, out

    def _fill_row(self, row: np.ndarray, v: TernaryTensor | np.ndarray, a: int, m: int) -> None:
        if isinstance(v, TernaryTensor):
            row.fill(0)
            lo, hi = np.searchsorted(v.indices, [a, a + m])
            if hi > lo:
                mag = self.work.type(dense_values(v.scale, self.dtype)[0])
                row[v.indices[lo:hi] - a] = np.where(v.signs[lo:hi], -mag, mag)
        else:
            row[:] = _dt.to_numpy_values(v[a : a + m], self.dtype)

    def to_numpy(self) -> np.ndarray:
        """The merged tensor as one array of the compute dtype (float32; F64: float64)."""
        out = np.empty(self.numel, self.work)
        for a, c in self.chunks():
            out[a : a + c.size] = c
        return out.reshape(self.shape)


# ---------------------------------------------------------------------------------------------
# in memory
# ---------------------------------------------------------------------------------------------
def _describe(value: Any, name: str, where: int) -> tuple[tuple[int, ...], str,
                                                          TernaryTensor | np.ndarray]:
    """``(shape, dtype, value)``: a TernaryTensor as it is, arrays as flat storage."""
    if isinstance(value, TernaryTensor):
        return value.shape, value.dtype, value
    try:
        storage, dtype = _dt.to_storage(value)
    except EncodeError as exc:
        raise MergeError(f"input {where}: {exc.message}", tensor=name) from None
    if dtype not in TERNARY_DTYPES:
        raise MergeError(f"input {where}: dtype {dtype} is not a float dtype "
                         f"{TERNARY_DTYPES}", tensor=name)
    return tuple(storage.shape), dtype, storage.reshape(-1)


def merge_tensor(values: Sequence[Any], *, method: str = "ties",
                 weights: Sequence[float] | None = None, sign: str = "total",
                 rescale: str | RescaleRule | None = None, name: str = "tensor") -> np.ndarray:
    """Merge one tensor's task vectors (TernaryTensor, numpy arrays or torch tensors).

    Returns a numpy array of the inputs' shape in float32 (float64 for F64 inputs).

    >>> a = TernaryTensor((4,), [0, 1], [False, True], 1.0)
    >>> b = TernaryTensor((4,), [1, 3], [False, False], 3.0)
    >>> merge_tensor([a, b]).tolist()            # entry 1: +3 wins the election
    [1.0, 3.0, 0.0, 3.0]
    >>> merge_tensor([a, b], method="sum", weights=[1, 0.5]).tolist()
    [1.0, 0.5, 0.0, 1.5]
    """
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
        raise MergeError("values must be a sequence of tensors")
    described = [_describe(v, name, i) for i, v in enumerate(values)]
    _check_fit(name, [(s, d) for s, d, _ in described])
    shape, dtype = described[0][0], described[0][1]
    return TensorMerge(name, shape, dtype, [v for _, _, v in described], method=method,
                       weights=weights, sign=sign, rescale=rescale).to_numpy()


def _check_fit(name: str, described: Sequence[tuple[tuple[int, ...], str]]) -> None:
    if not described:
        raise MergeError("nothing to merge: no inputs", tensor=name)
    shape, dtype = described[0]
    for i, (s, d) in enumerate(described[1:], start=1):
        if s != shape:
            raise MergeError(f"shape {list(s)} in input {i}, {list(shape)} in input 0",
                             tensor=name)
        if d != dtype:
            raise MergeError(f"dtype {d} in input {i}, {dtype} in input 0", tensor=name)


def check_names(names: Sequence[Sequence[str]], labels: Sequence[str] | None = None) -> None:
    """Raise :class:`MergeError` naming the first tensor not in every input.

    >>> check_names([["a", "b"], ["a"]])
    Traceback (most recent call last):
    ...
    compeft_format.merge.MergeError: tensor 'b': in input 0, missing from input 1
    """
    labels = list(labels) if labels is not None else [f"input {i}" for i in range(len(names))]
    sets = [set(n) for n in names]
    everything = sorted(set().union(*sets), key=lambda s: s.encode("utf-8", "surrogatepass"))
    for name in everything:
        missing = [lab for lab, s in zip(labels, sets, strict=True) if name not in s]
        if missing:
            have = next(lab for lab, s in zip(labels, sets, strict=True) if name in s)
            raise MergeError(f"in {have}, missing from {missing[0]}", tensor=name)


def merge(task_vectors: Sequence[Mapping[str, Any]], *, method: str = "ties",
          weights: Sequence[float] | None = None, sign: str = "total",
          rescale: str | RescaleRule | None = None) -> dict[str, np.ndarray]:
    """Merge task vectors: task arithmetic (``"sum"``, ``"mean"``) or TIES (``"ties"``).

    Parameters
    ----------
    task_vectors:
        One mapping per expert, name -> :class:`TernaryTensor`, numpy array or torch tensor
        (float16, bfloat16, float32, float64): the decoded task vectors (what
        :func:`~compeft_format.load_file` returns, or :func:`~compeft_format.compress`).
        All must hold the same names, with the same shapes and dtypes.
    method:
        ``"ties"`` (default), ``"sum"`` or ``"mean"``; see the module doc.
    weights:
        One finite number per expert (default all 1), applied in the compute dtype.
    sign:
        The TIES sign election: ``"total"`` (sign of the sum; default) or ``"frequency"``
        (sign of the majority; ties count as positive).
    rescale:
        A data-free rescaling rule, per tensor: a callable taking a :class:`MergeStats` and
        returning a factor or a :class:`Rescale`, or the name of one in
        :data:`RESCALE_RULES`.

    Returns
    -------
    dict
        name -> merged numpy array, float32 (float64 for F64 tensors), in the order of the
        first mapping.

    Raises
    ------
    MergeError
        Names, shapes or dtypes that differ (the first mismatch is named), a non-float
        tensor, or a bad option.

    Examples
    --------
    >>> e1 = {"w": TernaryTensor((2, 2), [0, 3], [False, True], 0.5)}
    >>> e2 = {"w": TernaryTensor((2, 2), [0, 1], [True, False], 0.25)}
    >>> merge([e1, e2])["w"].tolist()          # entry 0: +0.5 and -0.25 elect plus
    [[0.5, 0.25], [0.0, -0.5]]
    >>> merge([e1, e2], method="mean")["w"].tolist()
    [[0.125, 0.125], [0.0, -0.25]]
    """
    if isinstance(task_vectors, Mapping) or not isinstance(task_vectors, Sequence):
        raise MergeError("task_vectors must be a sequence of mappings, one per expert")
    ws = check_options(len(task_vectors), method, weights, sign)
    check_names([list(tv.keys()) for tv in task_vectors])
    jobs = []
    for name in task_vectors[0]:  # every mismatch is found before any work is done
        described = [_describe(tv[name], name, i) for i, tv in enumerate(task_vectors)]
        _check_fit(name, [(s, d) for s, d, _ in described])
        jobs.append(TensorMerge(name, described[0][0], described[0][1],
                                [v for _, _, v in described], method=method, weights=ws,
                                sign=sign, rescale=rescale))
    by_name = {job.name: job for job in jobs}
    for name, r in _prepared(rescale, list(by_name), by_name.__getitem__).items():
        by_name[name]._rescale = r
    return {job.name: job.to_numpy() for job in jobs}


# ---------------------------------------------------------------------------------------------
# compressing a merge again (ternary output)
# ---------------------------------------------------------------------------------------------
#: The scale rules the sign-pattern compression computes itself (any other goes through
#: :func:`~compeft_format.compress.iter_compress` on the dense merged tensors).
PATTERN_SCALES = ("proj_vcap", "proj", "norm", "l2", "std")
#: The scopes it computes itself (others, such as ``"role"``, go through ``iter_compress``).
PATTERN_SCOPES = ("global", "tensor")


@dataclass
class _Counted:
    """One merged tensor as distinct values and how many entries hold each."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    values: np.ndarray  # float64: the merged value of each pattern that occurs
    counts: np.ndarray  # int64: entries per value
    rescale: Rescale


def _counted(tm: TensorMerge) -> _Counted:
    stats = tm.stats()
    assert stats.counts is not None
    seen = np.flatnonzero(stats.counts)
    values = tm.table()[seen].astype(np.float64)
    return _Counted(tm.name, tm.shape, tm.dtype, tm.numel, values, stats.counts[seen],
                    tm.rescale)


def _select_counted(items: Sequence[_Counted], k: int) -> TopK:
    """The exact top-k of the entries' magnitudes, as compress's select_topk gives it."""
    n = sum(c.numel for c in items)
    if k <= 0 or n == 0:
        return TopK(math.inf, 0, 0)
    k = min(k, n)
    mags = np.abs(np.concatenate([c.values for c in items]))
    counts = np.concatenate([c.counts for c in items])
    distinct, where = np.unique(mags, return_inverse=True)
    per = np.bincount(where.reshape(-1), weights=counts, minlength=distinct.size)
    per = np.rint(per).astype(np.int64)  # exact: counts are below 2^53
    from_top = np.cumsum(per[::-1])  # entries with magnitude >= distinct[::-1][i]
    i = int(np.searchsorted(from_top, k))
    t = float(distinct[::-1][i])
    greater = int(from_top[i] - per[::-1][i])
    if t == 0.0:  # zeros are never kept
        return TopK(0.0, greater, 0)
    return TopK(t, greater, k - greater)


def _pattern_scale(items: Sequence[_Counted], top: TopK, scale: str, alpha: float) -> float:
    """The scope's scale from the counted values, by compress's rules (float32-exact)."""
    if top.kept == 0:
        return 0.0
    values = np.concatenate([c.values for c in items])
    counts = np.concatenate([c.counts for c in items]).astype(np.float64)
    n = sum(c.numel for c in items)
    mags = np.abs(values)
    sumsq = float(np.dot(counts, values * values))
    kept_sum = float(np.dot(counts[mags > top.threshold], mags[mags > top.threshold]))
    kept_sum += top.n_ties * top.threshold
    if scale in ("proj", "proj_vcap"):
        raw = alpha * (sumsq / kept_sum)
    elif scale == "norm":
        raw = alpha * math.sqrt(sumsq) / math.sqrt(top.kept)
    elif scale == "l2":
        raw = alpha * kept_sum / top.kept
    else:  # std: unbiased, over every entry (zeros included)
        mean = float(np.dot(counts, values)) / n
        m2 = float(np.dot(counts, (values - mean) ** 2))
        raw = alpha * (math.sqrt(max(m2, 0.0) / (n - 1)) if n > 1 else 0.0)
    where = items[0].name if len(items) == 1 else None
    scope = "" if where else f"global scope ({len(items)} tensors): "
    with np.errstate(over="ignore"):
        value = float(np.float32(raw))
    if not math.isfinite(value):
        raise EncodeError(f"{scope}scale {raw!r} overflows float32", tensor=where)
    for c in items:  # the decoder rounds the scale to each tensor's dtype
        if c.numel and not math.isfinite(float(dense_values(value, c.dtype)[0])):
            raise EncodeError(f"{scope}scale {value!r} overflows the tensor's dtype {c.dtype}",
                              tensor=c.name)
    return value


def _is_vector(shape: tuple[int, ...]) -> bool:
    return sum(d > 1 for d in shape) <= 1


def _gather(tm: TensorMerge, top: TopK, ties_left: int, scale: float
            ) -> tuple[TernaryTensor, int]:
    """The kept entries of one merged tensor (ties first come, first kept), from its codes."""
    table = tm.table().astype(np.float64)
    t = top.threshold
    keep = np.abs(table) > t
    tie = np.abs(table) == t
    negative = np.signbit(table)
    idx_parts, sign_parts = [], []
    for a, codes in tm.codes():
        sel = keep.take(codes)
        if ties_left:
            eq = np.flatnonzero(tie.take(codes))[:ties_left]
            sel[eq] = True
            ties_left -= eq.size
        loc = np.flatnonzero(sel)
        if loc.size:
            idx_parts.append(loc + a)
            sign_parts.append(negative.take(codes[loc]))
    idx = np.concatenate(idx_parts) if idx_parts else np.empty(0, np.int64)
    signs = np.concatenate(sign_parts) if sign_parts else np.empty(0, bool)
    return TernaryTensor(tm.shape, idx, signs, scale, tm.dtype, _validated=True), ties_left


def _compress_merged(
    names: Sequence[str],
    make: Callable[[str, Rescale | None], TensorMerge],
    dtypes: Mapping[str, str],
    patterns: bool,
    *,
    density: float,
    alpha: float = 1.0,
    scope: str = "global",
    scale: str = DEFAULT_SCALE,
) -> Iterator[tuple[str, TernaryTensor]]:
    """Compress merged tensors again, yielding ``(name, TernaryTensor)`` in ``names`` order.

    The result is :func:`~compeft_format.compress.iter_compress` of the dense merged tensors
    (the same kept entries and signs; the scale equal up to the rounding of float64 sums);
    ``names`` must be sorted. ``make(name, rescale)`` builds the :class:`TensorMerge` of a
    tensor (``rescale`` None the first time, then the :class:`Rescale` it gave, so that a
    rule runs once per tensor); it is called twice per tensor, and nothing is kept between
    the calls but the counts of the sign patterns. Unless ``patterns`` (every tensor has a
    pattern table), the scale rule is one of :data:`PATTERN_SCALES` and the scope one of
    :data:`PATTERN_SCOPES`, the dense merged tensors go through ``iter_compress`` instead
    (each merged up to four times).
    """
    compression_metadata(density, alpha, scope, scale)  # checks the options
    names = list(names)
    if scale not in PATTERN_SCALES or scope not in PATTERN_SCOPES or not patterns:
        merged = _MergedTensors(names, make, dtypes)
        yield from iter_compress(merged, density=density, alpha=alpha, scope=scope,
                                 scale=scale)
        return
    scopes = [names] if scope == "global" else [[n] for n in names]
    for group in scopes:
        items = [_counted(make(n, None)) for n in group]
        n_total = sum(c.numel for c in items)
        k = max(1, round(density * n_total)) if n_total else 0
        top = _select_counted(items, k)
        value = _pattern_scale(items, top, scale, alpha)
        ties_left = top.n_ties
        for c in items:
            if value == 0.0 or not c.numel or top.kept == 0:
                yield c.name, TernaryTensor.zeros(c.shape, c.dtype)
                continue
            own = value
            if scale == "proj_vcap" and _is_vector(c.shape):
                absmax = float(np.abs(c.values).max(initial=0.0))
                own = min(value, float(np.float32(alpha * absmax)))
            out, ties_left = _gather(make(c.name, c.rescale), top, ties_left, own)
            yield c.name, out


class _MergedTensors(Mapping):
    """The dense merged tensors, computed on access (for iter_compress)."""

    def __init__(self, names: list[str], make: Callable[[str, Rescale | None], TensorMerge],
                 dtypes: Mapping[str, str]) -> None:
        self._names = names
        self._make = make
        self._rescales: dict[str, Rescale] = {}
        self.dtypes = dict(dtypes)  # the tensors' own dtypes (BF16 arrives as float32)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.dtypes:
            raise KeyError(name)
        tm = self._make(name, self._rescales.get(name))
        self._rescales[name] = tm.rescale
        return tm.to_numpy()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def merge_and_compress(task_vectors: Sequence[Mapping[str, Any]], *, density: float,
                       method: str = "ties", weights: Sequence[float] | None = None,
                       sign: str = "total", rescale: str | RescaleRule | None = None,
                       alpha: float = 1.0, scope: str = "global",
                       scale: str = DEFAULT_SCALE) -> dict[str, TernaryTensor]:
    """Merge task vectors (as :func:`merge`) and compress the result (as
    :func:`~compeft_format.compress.compress` with ``density``, ``alpha``, ``scope``,
    ``scale``), without building the dense merged tensors when the inputs are ternary.

    >>> e1 = {"w": TernaryTensor((8,), [0, 1, 2], [False, False, True], 1.0)}
    >>> e2 = {"w": TernaryTensor((8,), [1, 2, 5], [False, False, False], 0.5)}
    >>> out = merge_and_compress([e1, e2], density=0.25)
    >>> out["w"].indices.tolist(), out["w"].signs.tolist()
    ([0, 2], [False, True])
    """
    ws = check_options(len(task_vectors), method, weights, sign)
    check_names([list(tv.keys()) for tv in task_vectors])
    described = {}
    for name in task_vectors[0]:
        d = [_describe(tv[name], name, i) for i, tv in enumerate(task_vectors)]
        _check_fit(name, [(s, dt) for s, dt, _ in d])
        described[name] = d

    def make(name: str, fixed: Rescale | None) -> TensorMerge:
        d = described[name]
        return TensorMerge(name, d[0][0], d[0][1], [v for _, _, v in d], method=method,
                           weights=ws, sign=sign, rescale=fixed or prepared.get(name, rescale))

    prepared: dict[str, Rescale] = {}  # empty while the rule's prepare looks at the tensors
    prepared = _prepared(rescale, list(described), lambda n: make(n, None))
    names = sorted(described)
    dtypes = {n: d[0][1] for n, d in described.items()}
    patterns = all(len(d) <= MAX_PATTERN_INPUTS and all(isinstance(v, TernaryTensor)
                                                        for _, _, v in d)
                   for d in described.values())
    out = dict(_compress_merged(names, make, dtypes, patterns, density=density, alpha=alpha,
                                scope=scope, scale=scale))
    return {name: out[name] for name in task_vectors[0]}


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


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Name the file in a CompeftError raised inside."""
    try:
        yield
    except CompeftError as exc:
        raise with_path(exc, path) from None


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
    ws = check_options(len(inputs), method, weights, sign)
    if len(inputs) < 2:
        raise MergeError(f"merge needs two or more inputs, got {len(inputs)}")
    rule = _resolve_rescale(rescale)
    if density is not None:
        compression_metadata(density, 1.0, "global", DEFAULT_SCALE)  # checks it
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
    base_path = base_weights(base) if base is not None else None
    paths = [p for s in sources for p in (s.path, s.weights)]
    out = Output(dst, is_dir=form == "adapter", force=force,
                 inputs=paths + ([Path(base), base_path] if base_path else []))

    with contextlib.ExitStack() as stack:
        readers = []
        for s in sources:
            with _naming(s.weights):
                readers.append(stack.enter_context(open_file(s.weights)))
        refs = [read_reference(r.metadata(), set(r.keys()), s.weights)
                for s, r in zip(sources, readers, strict=True)]
        _check_inputs(sources, readers, refs)
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
            if base_path is not None and ref.kind != "checkpoint" and (
                    ref.kind == "one" or ref.peft_type is not None):
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
                with _naming(s.weights):
                    v = r.get_raw(name)
                values.append(v if isinstance(v, TernaryTensor) else v[0].reshape(-1))
            info = infos[name]
            tm = TensorMerge(name, tuple(info.shape), info.dtype, values, method=method,
                             weights=ws, sign=sign, rescale=fixed or prepared.get(name, rule))
            return tm

        # a rule whose statistics span tensors sees them all first (one pass over the codes)
        prepared: dict[str, Rescale] = {}  # empty while the rule's prepare runs
        prepared = _prepared(rule, sorted(merged), lambda n: make(n, None))

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
            comp_meta = compression_metadata(density, 1.0, scope, scale)
            ternary = [n for n in order if n in merged and infos[n].kind == "ternary"]
            patterns = n_in <= MAX_PATTERN_INPUTS
            stream = _compress_merged(ternary, make, {n: infos[n].dtype for n in ternary},
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
                with Bar(progress, len(order), "merge") as bar, Writer(f, metadata=metadata) as w:
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
