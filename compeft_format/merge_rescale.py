"""The rescaling hook of a merge, and its data-free rules.

``rescale`` (a callable, or the name of a rule in :data:`RESCALE_RULES`) is called once per
tensor with a :class:`MergeStats`: the inputs' magnitudes, the weights and, for ternary
inputs, how many entries carry each sign pattern. It returns a factor for the merged tensor,
or a :class:`Rescale` that also multiplies each input's magnitude *before* the election and
the averaging, or the merged value of every sign pattern outright. Rules are data-free: they
see the structure of the inputs, not a model. A rule whose statistics span tensors (as a
compression's global scope does) also has a ``prepare`` attribute: given every tensor's
:class:`MergeStats` before anything is merged, it returns each tensor's answer
(:func:`prepared_rescales` asks it).

The rules: :func:`expected_ties` (for TIES of compressed experts) and the simpler earlier
:func:`dense_divisor`, both measured in ``bench/results/merge_quality.md``. The merge itself,
which calls the hook, is :mod:`compeft_format.merge`.

>>> sorted(RESCALE_RULES)
['dense_divisor', 'expected_ties']
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from .errors import MergeError
from .merge_math import pattern_digits, pattern_table, scaled_magnitudes, weights_array, work_dtype

__all__ = [
    "EXPECTED_SAMPLES",
    "RESCALE_RULES",
    "MergeStats",
    "Rescale",
    "RescaleRule",
    "as_rescale",
    "dense_divisor",
    "expected_rescales",
    "expected_ties",
    "prepared_rescales",
    "resolve_rescale",
]

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
    >>> from compeft_format import TernaryTensor
    >>> from compeft_format.merge import merge_tensor
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
        return pattern_digits(self.n)

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
        work = work_dtype(self.dtype)
        mags = scaled_magnitudes(self.magnitudes, before, work)
        return pattern_table(mags, weights_array(self.weights, work), self.method, self.sign,
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

    >>> from compeft_format import TernaryTensor
    >>> from compeft_format.merge import merge_tensor
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


def expected_rescales(stats: Mapping[str, MergeStats], fit: str = "least_squares",
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

    >>> from compeft_format import TernaryTensor
    >>> from compeft_format.merge import TensorMerge
    >>> a = TernaryTensor((6,), [0, 1], [False, False], 1.0)
    >>> b = TernaryTensor((6,), [1, 2], [True, False], 1.0)
    >>> answers = expected_rescales({"w": TensorMerge("w", (6,), "F32", [a, b]).stats()})
    >>> len(answers["w"].table), answers["w"].table[0]   # 3**2 patterns; none kept: 0
    (9, 0.0)
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
    digits = pattern_digits(n).astype(np.int64)
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
    >>> from compeft_format.merge import merge
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
    return expected_rescales({stats.name: stats})[stats.name]


expected_ties.prepare = expected_rescales  # type: ignore[attr-defined]
RESCALE_RULES["expected_ties"] = expected_ties


def resolve_rescale(rescale: str | RescaleRule | None) -> RescaleRule | None:
    """The rule ``rescale`` names (a callable or None is itself); an unknown name is a
    MergeError.

    >>> resolve_rescale("dense_divisor") is dense_divisor
    True
    """
    if rescale is None or callable(rescale):
        return rescale
    try:
        return RESCALE_RULES[rescale]
    except (KeyError, TypeError):
        raise MergeError(f"rescale must be a callable or one of {sorted(RESCALE_RULES)}, "
                         f"got {rescale!r}") from None


def as_rescale(result: Any, n: int, name: str) -> Rescale:
    """A rule's answer for tensor ``name`` of ``n`` inputs as a checked :class:`Rescale`.

    A number is a factor on the merged tensor; factors must be finite and sized for ``n``.

    >>> as_rescale(0.5, 2, "w")
    Rescale(before=None, after=0.5, zeros=None, table=None)
    """
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
                      stats_of: Callable[[str], MergeStats]) -> dict[str, Rescale]:
    """The answers of a rule with a ``prepare`` (statistics spanning tensors), per tensor.

    ``stats_of(name)`` gives a tensor's :class:`MergeStats` (``TensorMerge.stats``: one pass
    over its codes), called only for such a rule; the rule sees every tensor's at once.
    Empty for other rules.

    >>> prepared_rescales("dense_divisor", ["w"], lambda name: 1 / 0)   # no prepare: no stats
    {}
    """
    rule = resolve_rescale(rescale)
    prepare = getattr(rule, "prepare", None)
    if prepare is None:
        return {}
    stats = {name: stats_of(name) for name in names}
    answers = prepare(stats)
    return {name: as_rescale(answers[name], stats[name].n, name) for name in names}
