"""Merging task vectors: task arithmetic and TIES, straight from sparse ternary tensors.

:func:`merge` combines task vectors held in memory (dicts of :class:`TernaryTensor`, numpy
arrays or torch tensors). :mod:`compeft_format.merge_io` does the same from compeft files or
compressed adapter directories, one tensor at a time (``merge_files``), and compresses a
merge again (``merge_and_compress``).

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

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from . import dtypes as _dt
from ._spec import TERNARY_DTYPES
from .errors import CompeftError, EncodeError
from .tensor import TernaryTensor, dense_values

__all__ = [
    "EXPECTED_SAMPLES",
    "MAX_PATTERN_INPUTS",
    "METHODS",
    "RESCALE_RULES",
    "SIGN_METHODS",
    "MergeError",
    "MergeStats",
    "Rescale",
    "TensorMerge",
    "check_fit",
    "check_names",
    "check_options",
    "combine",
    "dense_divisor",
    "describe_value",
    "expected_ties",
    "merge",
    "merge_tensor",
    "prepared_rescales",
    "resolve_rescale",
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
    proj_scales:
        Each ternary input's scale under the ``proj`` rule, where a later rule replaced it
        and its file recorded it (a LoRA product scale's ``lora_fit.proj_scale``, spec
        5.2.1); None (all, or one input's) where the magnitude is that scale. For rules that
        infer a compression's threshold from it (:func:`expected_ties`) or merge at that
        scale (:func:`dense_divisor`).

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
    proj_scales: tuple[float | None, ...] | None = None

    def threshold_scales(self) -> tuple[float | None, ...]:
        """Each input's ``proj`` scale: :attr:`proj_scales` where recorded, else its
        magnitude."""
        given = self.proj_scales or (None,) * self.n
        return tuple(m if p is None else float(p)
                     for m, p in zip(self.magnitudes, given, strict=True))

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
    compressed inputs already keeps each input's component along its original: the ``proj``
    scale preserves it) and where no input is ternary.

    An input whose file records the ``proj`` scale another rule replaced
    (:attr:`MergeStats.proj_scales`: the default ``auto`` picks ``lora_product_out`` or
    ``kron_sketch`` at low densities) is merged at that scale, as its ``proj_vcap``
    compression would be, for every method: the rule's premise is magnitudes that keep each
    input's projection, and a LoRA product scale (fitted to one adapter's own products, 0.6x
    to 0.7x ``proj`` on the measured experts) makes the merge of separately merged factors too
    weak (``bench/results/merge_quality.md``: 0.387 against 0.480 at density 0.05).

    >>> a = TernaryTensor((4,), [0, 1], [False, False], 1.0)   # +1 at 0 and 1
    >>> b = TernaryTensor((4,), [1, 2], [True, False], 1.0)    # -1 at 1, +1 at 2
    >>> merge_tensor([a, b], rescale=None).tolist()        # PEFT's TIES
    [1.0, 1.0, 1.0, 0.0]
    >>> # one overlapping pair, of opposite signs: p = (0 + 1) / (1 + 2) = 1/3; entries 0
    >>> # and 2 are kept by one input and dropped by the other: divided by 1 + 1/3
    >>> merge_tensor([a, b], rescale="dense_divisor").tolist()
    [0.75, 1.0, 0.75, 0.0]
    """
    before = _to_proj(stats)
    if stats.method != "ties" or all(m is None for m in stats.magnitudes):
        return Rescale(before=before)
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
    return Rescale(before=before,
                   zeros=tuple(p if ok and m is not None else 0.0
                               for ok, m in zip(present, stats.magnitudes, strict=True)))


def _to_proj(stats: MergeStats) -> tuple[float, ...] | None:
    """Factors taking each input's magnitude to its recorded ``proj`` scale (None: none
    recorded, all 1)."""
    if stats.proj_scales is None or all(p is None for p in stats.proj_scales):
        return None
    return tuple(t / m if p is not None and m else 1.0 for m, p, t in zip(
        stats.magnitudes, stats.proj_scales, stats.threshold_scales(), strict=True))


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


def _expected_rescales(stats: Mapping[str, MergeStats], fit: str = "least_squares",
                       mu: Sequence[float] | None = None, by_tensor: bool = False
                       ) -> dict[str, Rescale]:
    """:func:`expected_ties` for every tensor of a merge at once (its ``prepare``).

    ``fit``: how the expectation is brought to the projections. ``"least_squares"`` (the
    rule): the table closest to the conditional mean among those keeping them.
    ``"scaled"``: each input's part of the conditional mean times one factor (the rule's
    first version, kept for the benchmark's before/after comparison). ``mu`` (diagnostics,
    least squares only): the multipliers given instead of solved for (the table is
    ``E[TIES(t) | P] + sum_i mu_i E[t_i | P]``, linear in them).

    Variants the benchmark measured and the rule does not use (``bench/merge_quality.py``):
    ``fit="common"``, the conditional mean times one factor per scope (the sum of the
    inputs' projections kept, each input's relative strength left as the model has it);
    ``by_tensor``, the projections kept per tensor instead of per compression scope.
    """
    if fit not in ("least_squares", "scaled", "common"):
        raise MergeError(f"fit must be 'least_squares', 'scaled' or 'common', got {fit!r}")
    out: dict[str, Rescale] = {}
    model = {name: st for name, st in stats.items() if st.method == "ties"
             and st.counts is not None and all(m is not None for m in st.magnitudes)}
    for name, st in stats.items():
        if name not in model:
            out[name] = dense_divisor(st)
    if not model:
        return out
    n = next(iter(model.values())).n
    scales = {name: st.threshold_scales() for name, st in model.items()}
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
                groups.setdefault((i, float(scales[name][i])), []).append(name)
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
    given: dict[str, np.ndarray] = {}  # E[t_i | pattern] of every pattern, per tensor
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
        # E[t_i | pattern]: 0 where dropped (its sign is unknown), odd like the shares
        means = np.zeros((n, 3**n))
        means[:, pats] = np.where(d != 0, rows.mean(2), 0.0)
        means = (means - means[:, mirror]) / 2
        given[name] = means
        mean = share.sum(0)  # E[TIES(t) | pattern]
        key = (name,) if by_tensor else tuple(float(x) for x in scales[name])
        acc = sums.setdefault(key, [np.zeros(n), np.zeros((n, n)), np.zeros((n, n)),
                                    np.zeros(n)])
        acc[0] += (rows * m).mean(2) @ c  # E <TIES(t), t_i>
        acc[1] += (means[:, pats] * c) @ share[:, pats].T  # <share_j, E[t_i | pattern]>
        acc[2] += (means[:, pats] * c) @ means[:, pats].T  # <E[t_j | .], E[t_i | .]>
        acc[3] += (means[:, pats] * c) @ mean[pats]  # <E[TIES(t) | .], E[t_i | .]>
    for name in model:
        want, gram, inner, got = sums[(name,) if by_tensor
                                      else tuple(float(x) for x in scales[name])]
        if fit == "scaled":
            table = _projection_factors(want, gram) @ shares[name]
        elif fit == "common":
            table = shares[name].sum(0) * (want.sum() / got.sum() if got.sum() > 0 else 1.0)
        else:
            # the least-squares fit under the projections: minimise E||merge - TIES(t)||^2
            # = sum_p count_p (v_p - mean_p)^2 + const subject to sum_p count_p v_p
            # E[t_i | p] = want_i; Lagrange: v = mean + sum_i mu_i E[t_i | .]
            m = (np.linalg.lstsq(inner, want - got, rcond=None)[0] if mu is None
                 else np.array(mu, np.float64))
            table = shares[name].sum(0) + m @ given[name]
        # odd by construction, as the shares and means are: a matrix product's rounding
        # may differ by column (BLAS kernels, FMA), and flipping every sign must flip the merge
        table = (table - table[mirror]) / 2
        out[name] = Rescale(table=tuple(table.tolist()))
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
    original. The merge keeps them the same way: the merge's projection on every input,
    ``<merge, t_i>``, is its expectation ``E<TIES(t), t_i>`` over the originals (per scope),
    and among the tables that do so it takes the one closest to the conditional mean, which
    is also the closest to TIES of the originals in expected squared error: ``v = E[TIES(t)
    | P] + sum_i mu_i E[t_i | P]``, one ``mu_i`` per input and scope from an ``n x n``
    linear system (Lagrange's condition for that constrained least squares). Sparse in,
    sparse out: an entry no input keeps stays 0.

    It assumes the inputs' scales follow the ``proj`` rule (``proj_vcap``, ``proj``), or
    that the proj scale a later rule replaced is given (:attr:`MergeStats.proj_scales`:
    :func:`~compeft_format.merge_io.merge_files` reads the one a LoRA product or metric
    scale records, the default ``auto`` at low density included, so such a file merges as
    its ``proj_vcap`` compression would). Under another rule the thresholds, and so the
    merge's magnitude, would be off by that rule's ratio to ``proj``: ``merge_files``
    refuses such a file.

    Every number comes from the inputs (kept fractions, scales, overlaps): no data and no
    fitted constant. Through :func:`merge`, ``merge_files`` and ``merge_and_compress``
    (:mod:`compeft_format.merge_io`) the scopes span tensors (``expected_ties.prepare`` sees every
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


def resolve_rescale(rescale: str | RescaleRule | None) -> RescaleRule | None:
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


def prepared_rescales(rescale: str | RescaleRule | None, names: Sequence[str],
              build: Callable[[str], TensorMerge]) -> dict[str, Rescale]:
    """The answers of a rule with a ``prepare`` (statistics spanning tensors), per tensor.

    ``build(name)`` makes a tensor's :class:`TensorMerge`; the rule sees every tensor's
    :class:`MergeStats` at once (one pass over each tensor's codes). Empty for other rules.
    """
    rule = resolve_rescale(rescale)
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


def _weights_array(weights: Sequence[float], work: np.dtype, name: str = "tensor"
                   ) -> np.ndarray:
    big = [w for w in weights if abs(w) > float(np.finfo(work).max)]
    if big:  # it would be inf in the arithmetic, and the merge inf or nan
        raise MergeError(f"weight {big[0]!r} overflows {work.name}, the dtype the merge "
                         "computes in", tensor=name)
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
                 rescale: str | RescaleRule | Rescale | None = None,
                 proj_scales: Sequence[float | None] | None = None) -> None:
        self.weights = check_options(len(values), method, weights, sign)
        if proj_scales is not None and len(proj_scales) != len(values):
            raise MergeError(f"proj_scales gives {len(proj_scales)} scales for {len(values)} "
                             "inputs", tensor=name)
        self._proj = None if proj_scales is None else tuple(
            None if p is None else float(p) for p in proj_scales)
        self.name = name
        self.shape = tuple(shape)
        self.dtype = dtype
        self.method = method
        self.sign = sign
        self.numel = math.prod(self.shape)
        self.values = list(values)
        self.work = _work_dtype(dtype)
        self._w = _weights_array(self.weights, self.work, name)
        self.patterns = (len(values) <= MAX_PATTERN_INPUTS
                         and all(isinstance(v, TernaryTensor) for v in values))
        self._mags = tuple(
            float(dense_values(v.scale, dtype)[0]) if isinstance(v, TernaryTensor) else None
            for v in values)
        self._rescale: Rescale | None = None
        if isinstance(rescale, Rescale):  # a rule's answer, given again: it need not rerun
            self._rescale = _as_rescale(rescale, len(values), name)
            rescale = None
        self._rule = resolve_rescale(rescale)
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
                                     self.weights, self._mags, counts, self._proj)
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
            with np.errstate(over="ignore", invalid="ignore"):  # users check_finite theirs
                if r.table is not None:
                    table = np.array(r.table, dtype=np.float64).astype(self.work)
                else:
                    mags = _scaled_magnitudes(self._mags, r.before, self.work)
                    table = _pattern_table(mags, self._w, self.method, self.sign, r.zeros)
                if r.after != 1.0:
                    table = table * self.work.type(r.after)
            self._table = table  # a pattern may overflow: check_finite what is used of it
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
            finite = bool(np.isfinite(table).all())
            for a, codes in self.codes(size):
                out = table.take(codes)
                if not finite:
                    self.check_finite(out, f"entries {a} to {a + out.size - 1}")
                yield a, out
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
            with np.errstate(over="ignore", invalid="ignore"):  # checked next
                out = combine(rows, self._w, self.method, self.sign, r.zeros)
                if r.after != 1.0:
                    out *= self.work.type(r.after)
            self.check_finite(out, f"entries {a} to {a + m - 1}")
            yield a, out

    def check_finite(self, values: np.ndarray, where: str) -> None:
        """Refuse merged ``values`` (``where``: which, for the message) that overflowed the
        compute dtype: a :class:`MergeError` naming the tensor, before anything is written.

        >>> big = TernaryTensor((2,), [0], [False], 3e38)
        >>> TensorMerge("w", (2,), "F32", [big, big], method="sum").to_numpy()
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        compeft_format.merge.MergeError: tensor 'w': the merge is not finite in float32: 1 of 2...
        """
        if not np.isfinite(values).all():
            bad = int(np.count_nonzero(~np.isfinite(values)))
            raise MergeError(f"the merge is not finite in {self.work.name}: {bad} of "
                             f"{values.size} {where} are inf or nan (weights "
                             f"{list(self.weights)}; are they, or the inputs' values, too "
                             "large?)", tensor=self.name)

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
def describe_value(value: Any, name: str, where: int) -> tuple[tuple[int, ...], str,
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
    described = [describe_value(v, name, i) for i, v in enumerate(values)]
    check_fit(name, [(s, d) for s, d, _ in described])
    shape, dtype = described[0][0], described[0][1]
    return TensorMerge(name, shape, dtype, [v for _, _, v in described], method=method,
                       weights=weights, sign=sign, rescale=rescale).to_numpy()


def check_fit(name: str, described: Sequence[tuple[tuple[int, ...], str]]) -> None:
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
          rescale: str | RescaleRule | None = None,
          proj_scales: Sequence[Mapping[str, float] | None] | None = None
          ) -> dict[str, np.ndarray]:
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
    proj_scales:
        Per expert, None or name -> the ``proj`` scale a later scale rule replaced in its
        compression (:attr:`MergeStats.proj_scales`; what a file records, spec 5.2.1), for
        rules that infer thresholds from it (:func:`expected_ties`).

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
    if proj_scales is not None and len(proj_scales) != len(task_vectors):
        raise MergeError(f"proj_scales gives {len(proj_scales)} mappings for "
                         f"{len(task_vectors)} experts")
    jobs = []
    for name in task_vectors[0]:  # every mismatch is found before any work is done
        described = [describe_value(tv[name], name, i) for i, tv in enumerate(task_vectors)]
        check_fit(name, [(s, d) for s, d, _ in described])
        proj = (None if proj_scales is None
                else [p.get(name) if p else None for p in proj_scales])
        jobs.append(TensorMerge(name, described[0][0], described[0][1],
                                [v for _, _, v in described], method=method, weights=ws,
                                sign=sign, rescale=rescale, proj_scales=proj))
    by_name = {job.name: job for job in jobs}
    for name, r in prepared_rescales(rescale, list(by_name), by_name.__getitem__).items():
        by_name[name]._rescale = r
    return {job.name: job.to_numpy() for job in jobs}
