"""The scale rules of :func:`~compeft_format.compress.compress`: one magnitude for every kept entry.

Each rule maps what the statistics pass and the selection learned about a scope (its sum of
squares, the kept count and the sum of the kept magnitudes, per-matrix metric terms) to one
float32 scale; :func:`~compeft_format.compress.compress`'s docstring gives the formulas and
the evidence behind the default. A vector-shaped tensor is capped at its own largest change
by the :data:`CAPPED` rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from .errors import EncodeError
from .tensor import TernaryTensor

__all__ = [
    "AUTO_GLOBAL_ONLY",
    "AUTO_LORA_DENSITY",
    "AUTO_LORA_RULES",
    "AUTO_SCALE",
    "AUTO_SKETCH_DENSITY",
    "CAPPED",
    "DEFAULT_SCALE",
    "KEPT_SUM_SCALES",
    "METRIC_SCALES",
    "METRIC_TERMS",
    "SCALES",
    "SCALE_CHOICES",
    "SWEEP_SCALES",
    "RowBlocks",
    "Stats",
    "decoded_scale",
    "float32_scale",
    "gram_terms",
    "is_vector",
    "kron_sketch_terms",
    "kron_terms",
    "resolve_scale",
    "scale_value",
]

SCALES = ("proj_vcap", "kron_sketch", "kron", "gram", "proj", "norm", "l2", "std")
#: The exact rules that weigh each matrix by its own Gram matrices: one more pass costing
#: about rows x cols x min(rows, cols) multiply-adds a matrix (seconds for an adapter, hours
#: for a 7B full fine-tune), so sweeps leave them out unless asked. (``"kron_sketch"``
#: estimates ``"kron"`` for about 250 multiply-adds an entry and is swept.)
METRIC_SCALES = ("kron", "gram")
#: The rules a sweep tries by default: every rule without a Gram-matrix pass.
SWEEP_SCALES = tuple(s for s in SCALES if s not in METRIC_SCALES)
#: ``scale="auto"``: one of the rules above, chosen per task vector by :func:`resolve_scale`
#: from the density and the kind of task vector; a file records the rule it resolved to.
AUTO_SCALE = "auto"
#: What ``scale=`` accepts: ``"auto"`` and every rule.
SCALE_CHOICES = (AUTO_SCALE, *SCALES)
#: The default scale: ``"auto"`` (see :func:`resolve_scale` and, for the evidence,
#: ``bench/results/scale_rules.md`` and ``bench/results/lora_scale.md``).
DEFAULT_SCALE = AUTO_SCALE
#: ``"auto"`` on a task vector with a matrix: ``"kron_sketch"`` at and below this density,
#: ``"proj_vcap"`` above. Where ``"proj_vcap"`` misses the tuned scale by more than 0.005
#: on a measured model (0.0115 at 0.01 and 0.02 on a full fine-tune, 0.0146 at 0.01 on a
#: merged LoRA) or holds it by less than the spread between models (0.0047 at 0.05),
#: ``"kron_sketch"`` is within 0.0015; at 0.1 and 0.2 ``"proj_vcap"`` is within 0.0004 at a
#: third to an eighth of the time.
AUTO_SKETCH_DENSITY = 0.05
#: ``"auto"`` on a LoRA adapter's factors (:func:`~compeft_format.convert.compress_file`,
#: which has the adapter and its reference), by what the task vector was measured from
#: (``"checkpoint"``: the initial adapter, given or regenerated; ``"zero"``): ``(highest
#: density, rule)`` bands in order, ``"proj_vcap"`` above the last. Each band's rule is the
#: one measured closest to the tuned single scale there, on 61 adapters (20 trios of experts
#: and ``tests/data``; ``bench/results/lora_scale.md``, "The inputs the training used"):
#:
#: * from the initial adapter, ``"lora_product_out"`` up to 0.05 (at 0.01 / 0.02 / 0.05
#:   within 0.005 on 55 / 46 / 28 of 61, worst 0.035; ``"lora_product_delta"`` gets 34 at
#:   0.05 but is worse at its worst, 0.052), then ``"lora_product_delta"`` up to 0.2 (at 0.1
#:   55 of 61, worst 0.015, where ``"proj_vcap"`` gets 28, worst 0.026; at 0.2 all 61,
#:   worst 0.0046, against 59 and 0.0055), with scope ``"global"`` only (one scale per role
#:   or per module it misses by up to 0.13 at 0.1, where ``"proj_vcap"`` misses by 0.03);
#: * from zero, where ``dA`` is unknown, ``"lora_product_out"`` up to 0.2 (at 0.2 52 of 61,
#:   worst 0.0096, against 42 and 0.0191 for ``"proj_vcap"``).
#:
#: ``"lora_product_kron"`` (the product's own input directions, mostly the random ``A0``)
#: was measured and is not used: its worst gap on a held-out trio was higher.
AUTO_LORA_RULES: dict[str, tuple[tuple[float, str], ...]] = {
    "checkpoint": ((0.05, "lora_product_out"), (0.2, "lora_product_delta")),
    "zero": ((0.2, "lora_product_out"),),
}
#: The rules of :data:`AUTO_LORA_RULES` that ``"auto"`` uses with scope ``"global"`` only:
#: chosen with one scale for every factor, their fits per role or per module land far from
#: the best scale (``bench/results/lora_scale.md``); with another scope their band is left out.
AUTO_GLOBAL_ONLY = frozenset({"lora_product_delta"})
#: The highest density at which ``"auto"`` fits a LoRA adapter's factors on their products,
#: by reference (:data:`AUTO_LORA_RULES`' last band); ``"proj_vcap"`` above.
AUTO_LORA_DENSITY = {ref: bands[-1][0] for ref, bands in AUTO_LORA_RULES.items()}


def resolve_scale(scale: str, density: float, *, matrices: bool = True,
                  lora: str | None = None, scope: str = "global") -> str:
    """The rule ``scale`` stands for: itself, or for ``"auto"`` the one for this task vector.

    ``"auto"`` is ``"proj_vcap"`` for a task vector of vectors only (an (IA)^3 adapter:
    ``matrices=False``), and for a LoRA adapter's factors (``lora``: the reference the task
    vector is measured from, ``"checkpoint"`` or ``"zero"``) the rule of its density's band
    in :data:`AUTO_LORA_RULES` (with a ``scope`` other than ``"global"``, without the bands
    of :data:`AUTO_GLOBAL_ONLY`), ``"proj_vcap"`` above them; for any other task vector
    ``"kron_sketch"`` at and below :data:`AUTO_SKETCH_DENSITY`, else ``"proj_vcap"``. A
    vector in a ``"kron_sketch"`` scope gets ``"proj_vcap"``'s scale (it is capped, and
    without a matrix the rule is ``"proj"``), so a task vector of vectors only gives the
    same bytes either way; the name recorded is then ``"proj_vcap"``.

    >>> [resolve_scale("auto", d) for d in (0.01, 0.05, 0.1)]
    ['kron_sketch', 'kron_sketch', 'proj_vcap']
    >>> resolve_scale("auto", 0.01, matrices=False), resolve_scale("l2", 0.01)
    ('proj_vcap', 'l2')
    >>> [resolve_scale("auto", d, lora="checkpoint") for d in (0.05, 0.1, 0.3)]
    ['lora_product_out', 'lora_product_delta', 'proj_vcap']
    >>> [resolve_scale("auto", d, lora="zero") for d in (0.05, 0.2, 0.3)]
    ['lora_product_out', 'lora_product_out', 'proj_vcap']
    >>> resolve_scale("auto", 0.1, lora="checkpoint", scope="tensor")
    'proj_vcap'
    """
    if scale != AUTO_SCALE:
        return scale
    if lora is not None:
        bands = AUTO_LORA_RULES.get(lora)
        if bands is None:
            raise EncodeError(f"reference must be one of {tuple(AUTO_LORA_RULES)}, "
                              f"got {lora!r}")
        return next((rule for limit, rule in bands if density <= limit
                     and (scope == "global" or rule not in AUTO_GLOBAL_ONLY)), "proj_vcap")
    if not matrices:
        return "proj_vcap"
    return "kron_sketch" if density <= AUTO_SKETCH_DENSITY else "proj_vcap"


def scale_value(scale: str, alpha: float, kept: int, kept_sum: float, stats: Stats,
                tensors: Sequence[tuple[str, str, int]],
                metric: tuple[float, float] = (0.0, 0.0)) -> float:
    """The scale of a scope under rule ``scale``, float32-exact; 0.0 when nothing is kept.

    ``kept`` and ``kept_sum``: the kept count and the float64 sum of their magnitudes;
    ``stats``: the scope's :class:`Stats`; ``tensors``: ``(name, dtype, numel)`` of the
    scope's tensors (for :func:`float32_scale`'s checks); ``metric``: the summed
    ``(numerator, denominator)`` of :data:`METRIC_TERMS` over the scope's matrices
    (``"gram"``, ``"kron"``, ``"kron_sketch"``); without a kept matrix entry those rules
    give ``"proj"``'s.

    >>> s = Stats(need_std=False)
    >>> s.add(np.array([0.1, -0.4, 0.0, 0.3]))
    True
    >>> round(scale_value("proj", 1.0, 2, 0.7, s, [("w", "F64", 4)]), 6)  # 0.26 / 0.7
    0.371429
    """
    if kept == 0:
        return 0.0
    if scale in METRIC_TERMS and metric[0] > 0.0 and metric[1] > 0.0:
        raw = alpha * (metric[0] / metric[1])
    elif scale in ("proj", "proj_vcap", *METRIC_TERMS):
        # kept magnitudes are nonzero, so kept_sum > 0; an overflow to inf is caught below
        raw = alpha * (stats.sumsq / kept_sum)
    elif scale == "norm":
        raw = alpha * math.sqrt(stats.sumsq) / math.sqrt(kept)
    elif scale == "l2":
        raw = alpha * kept_sum / kept
    else:
        raw = alpha * stats.std()
    return float32_scale(raw, tensors)


# the scales that cap a vector at its own largest |t|
CAPPED = ("proj_vcap", "kron_sketch", "kron", "gram")
#: the scales that need the float64 sum of the kept magnitudes
KEPT_SUM_SCALES = ("l2", "proj", "proj_vcap", "kron_sketch", "kron", "gram")


def gram_terms(t: np.ndarray, idx: np.ndarray, signs: np.ndarray) -> tuple[float, float]:
    """The numerator and denominator of the ``"gram"`` scale of one matrix.

    ``t`` is the matrix (rows = outputs, columns = inputs; a tensor of more dimensions is
    read as ``(shape[0], -1)``), ``idx`` the kept flat indices and ``signs`` their sign bits
    (True = negative). With ``S`` the kept signs as a matrix and ``C = t^T t / (||t||^2 /
    columns)`` (the Gram matrix of the fine-tune's own input directions, scaled to a mean
    eigenvalue of 1) it returns ``(tr(S C t^T), tr(S C S^T))``: the scale ``num / den``
    minimises ``||(s S - t) C^(1/2)||``, the error seen by inputs distributed like the ones
    that made the update. Exact, in float64, through the Gram matrix of the smaller side:
    ``3 * rows * columns * min(rows, columns)`` multiply-adds.

    Examples
    --------
    >>> import numpy as np
    >>> t = np.array([[3.0, 0.1], [0.2, -1.0]])
    >>> num, den = gram_terms(t, np.array([0, 3]), np.array([False, True]))
    >>> round(num / den, 4)  # l2 gives 2.0, proj 10.1 / 4 = 2.525
    2.798
    """
    rows, cols = t.shape
    if not idx.size:
        return 0.0, 0.0
    t = np.asarray(t, np.float64)
    total = float(np.einsum("ij,ij->", t, t))
    if total == 0.0:
        return 0.0, 0.0
    smat = np.zeros((rows, cols))
    smat.reshape(-1)[np.asarray(idx, np.int64)] = np.where(signs, -1.0, 1.0)
    if rows <= cols:  # through the rows x rows Gram matrix t t^T
        gram = t @ t.T
        st = smat @ t.T  # S t^T
        num = float(np.einsum("ij,ji->", st, gram))  # tr(S t^T t t^T)
        den = float(np.einsum("ij,ij->", st, st))  # ||S t^T||^2 = tr(S t^T t S^T)
    else:  # through the columns x columns Gram matrix t^T t
        gram = t.T @ t
        num = float(np.einsum("ij,ij->", smat, t @ gram))  # tr(S C t^T), C symmetric
        den = float(np.einsum("ij,ij->", smat, smat @ gram))
    norm = total / cols  # the mean eigenvalue of t^T t
    return num / norm, den / norm


def kron_terms(t: np.ndarray, idx: np.ndarray, signs: np.ndarray) -> tuple[float, float]:
    """The numerator and denominator of the ``"kron"`` scale of one matrix.

    ``t`` is the matrix (rows = outputs, columns = inputs; a tensor of more dimensions is
    read as ``(shape[0], -1)``), ``idx`` the kept flat indices and ``signs`` their sign bits
    (True = negative). With ``S`` the kept signs as a matrix, ``t = U diag(sv) V^T`` and the
    two square-root Gram matrices ``G = (t t^T)^(1/2) = U diag(sv) U^T`` (outputs) and
    ``A = (t^T t)^(1/2) = V diag(sv) V^T`` (inputs), each scaled to a mean eigenvalue of 1,
    it returns ``(tr(G S A t^T), tr(G S A S^T))``: the scale ``num / den`` minimises
    ``||G^(1/2) (s S - t) A^(1/2)||``, the error weighed on both sides by the directions the
    fine-tune itself moved (a Kronecker-factored metric, as K-FAC approximates the Fisher).
    The numerator is ``<S, t t^T t>`` (no decomposition); the denominator needs the
    eigenvectors of the smaller Gram matrix. Exact in float64 up to singular values below
    ``1e-7`` of the largest (they weigh ``sv`` in the metric and are dropped). About
    ``4 * rows * columns * min(rows, columns)`` multiply-adds plus one symmetric
    eigendecomposition of ``min(rows, columns)`` squared.

    Examples
    --------
    >>> import numpy as np
    >>> t = np.array([[3.0, 0.1], [0.2, -1.0]])
    >>> num, den = kron_terms(t, np.array([0, 3]), np.array([False, True]))
    >>> round(num / den, 4)  # l2 gives 2.0, proj 10.1 / 4 = 2.525, gram 2.798
    2.8043
    """
    if not idx.size:
        return 0.0, 0.0
    t = np.asarray(t, np.float64)
    smat = np.zeros(t.shape)
    smat.reshape(-1)[np.asarray(idx, np.int64)] = np.where(signs, -1.0, 1.0)
    if t.shape[0] > t.shape[1]:  # both terms are the same for the transposes: work on the
        t, smat = t.T, smat.T  # wide side, so the Gram matrix below is the small one
    rows, cols = t.shape
    w, u = np.linalg.eigh(t @ t.T)  # t t^T = U diag(sv^2) U^T
    sv = np.sqrt(np.clip(w, 0.0, None))
    keep = sv > 1e-7 * sv.max() if sv.size and sv.max() > 0.0 else np.zeros(sv.size, bool)
    if not keep.any():
        return 0.0, 0.0
    sv, u = sv[keep], u[:, keep]
    v = (t.T @ u) / sv  # right singular vectors, columns x r
    m = u.T @ (smat @ v)  # U^T S V, r x r
    total = float(sv.sum())
    norm = (total / rows) * (total / cols)  # the two mean eigenvalues
    num = float(np.einsum("i,ii->", sv**3, m))  # tr(G S A t^T) = sum sv_i^3 m_ii
    den = float(np.einsum("i,ij,j,ij->", sv, m, sv, m))  # sum sv_i sv_j m_ij^2
    return num / norm, den / norm


#: ``"kron_sketch"``: the rank of the top of each matrix's spectrum it finds (a matrix with
#: no side longer than this gets the exact :func:`kron_terms`), the power iterations of the
#: range finder, the random probes of the tail's trace estimates, and the fixed seed of both
#: (the same matrix and selection always give the same scale).
SKETCH_RANK = 24
SKETCH_POWER = 1
SKETCH_PROBES = 8
SKETCH_SEED = 0


def kron_sketch_terms(t: np.ndarray, idx: np.ndarray, signs: np.ndarray) -> tuple[float, float]:
    """:func:`kron_terms` estimated in about ``250 * rows * columns`` float32 multiply-adds.

    Same arguments and the same quantities, ``(tr(G S A t^T), tr(G S A S^T))`` with the
    square-root Gram matrices ``G``, ``A`` scaled to a mean eigenvalue of 1, but no
    decomposition of a ``min(rows, columns)``-square matrix. A randomized range finder
    (Halko, Martinsson and Tropp 2011: Gaussian test matrix, :data:`SKETCH_RANK` columns,
    :data:`SKETCH_POWER` power iteration) finds the top of the spectrum, ``t = U diag(sv)
    V^T + T``, and every term of the top is exact. The tail ``T`` (what the range misses,
    ``d`` singular values) is known through its energy ``||T||^2`` (exact) and its fourth
    moment ``sum sv_tail^4`` (a Hutchinson estimate ``E ||T T^T z||^2`` over
    :data:`SKETCH_PROBES` Gaussian probes), and enters through two assumptions, both exact
    when the tail's singular values are all equal:

    * in the metric, the tail's singular values are one value ``se``, the one its energy sits
      at (``se^2 = sum sv^4 / sum sv^2``): ``(T T^T)^(1/2) = T T^T / se``, ``(T^T T)^(1/2) =
      T^T T / se`` and ``T T^T T = se^2 T``; what is left are products of ``T`` with thin
      matrices and one more trace estimate, ``||T^T S T^T||^2``;
    * in the mean eigenvalues (the nuclear norm), the squared singular values of the tail
      are Gamma-distributed with its count, energy and fourth moment.

    A matrix whose rank is at most :data:`SKETCH_RANK` (a merged LoRA) has no tail, and one
    with a side of at most :data:`SKETCH_RANK` (LoRA factors) gets :func:`kron_terms`
    itself. Deterministic: the random draws use :data:`SKETCH_SEED`.

    Measured against ``"kron"`` (``bench/results/scale_rules.md``): on the project's full
    fine-tune (all-MiniLM-L6-v2, AdamW, near full rank, 384-wide) the scope's scale is within
    2.5% at densities 0.01 to 0.2. On synthetic updates whose singular values fall off as a
    slow power law (``tests/test_compress.py``) one matrix's scale is within 5% at 90 to 200
    wide, but up to 10.5% off at 1024 wide: the wider the matrix against the rank, the more
    the tail's shape matters, and it is known only by two moments.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(1)
    >>> t = rng.standard_normal((40, 8)) @ rng.standard_normal((8, 60))  # rank 8: no tail
    >>> idx = np.argsort(-np.abs(t), axis=None, kind="stable")[:240]
    >>> signs = np.signbit(t.reshape(-1)[idx])
    >>> num, den = kron_sketch_terms(t, idx, signs)
    >>> exact = kron_terms(t, idx, signs)
    >>> bool(abs(num / den / (exact[0] / exact[1]) - 1) < 1e-4)
    True
    """
    if not idx.size:
        return 0.0, 0.0
    src = t if isinstance(t, RowBlocks) else np.asarray(t)
    if min(src.shape) <= SKETCH_RANK:
        return kron_terms(np.asarray(src), idx, signs)
    blocks = src if isinstance(src, RowBlocks) else RowBlocks.of(src)
    peak = blocks.peak()
    if not peak > 0.0:
        return 0.0, 0.0
    # both terms are homogeneous (num ~ t, den ~ 1): a float32 matrix of moderate values is
    # used as it is; any other is copied as t / 2^e (at most 1, so float32 neither
    # overflows nor underflows; a power of two keeps the scaling exact), a block at a time
    # where the matrix comes in blocks
    c = 1.0
    if blocks.dtype != np.float32 or not 2.0**-20 <= peak <= 2.0**20:
        c = math.ldexp(1.0, -math.frexp(peak)[1])
    work = _Work(blocks, c)
    flat_idx = np.asarray(idx, np.int64)
    smat = _SignMatrix(work.shape, flat_idx, signs)  # never a dense matrix of the full size
    kept_sum = work.kept_abs_sum(flat_idx, smat.idx)
    total = work.sum_squares()
    if work.shape[0] > work.shape[1]:  # both terms are the same for the transposes
        work, smat = work.T, smat.T
    rows, cols = work.shape
    rng = np.random.default_rng(SKETCH_SEED)
    y = work @ rng.standard_normal((cols, SKETCH_RANK), dtype=np.float32)
    for _ in range(SKETCH_POWER):
        y = work @ (work.T @ _orthonormal(y))
    q = _orthonormal(y)  # rows x rank, orthonormal: the range of the top
    b = (work.T @ q).T  # q^T t
    w, ub = np.linalg.eigh(b.astype(np.float64) @ b.T.astype(np.float64))  # b b^T = Ub sv^2 Ub^T
    sv = np.sqrt(np.clip(w, 0.0, None))
    keep = sv > 1e-7 * sv.max() if sv.max() > 0.0 else np.zeros(sv.size, bool)
    sv, ub = sv[keep], ub[:, keep]
    u = q.astype(np.float64) @ ub  # the top's singular vectors, rows x r and cols x r
    v = (b.T.astype(np.float64) @ ub) / sv
    s_u = smat.T @ u.astype(np.float32)  # S^T U
    s_v = smat @ v.astype(np.float32)  # S V
    m = u.T @ s_v.astype(np.float64)  # U^T S V, r x r
    num = float(np.einsum("i,ii->", sv**3, m))  # the top, as kron_terms has it
    den = float(np.einsum("i,ij,j,ij->", sv, m, sv, m))
    nuclear = float(sv.sum())
    # the tail T = t - Q Q^T t, never formed: T x = t x - Q (b x), T^T y = t^T y - b^T (Q^T y).
    # Its energy is ||t||^2 - ||b||^2; below 1e-6 of ||t||^2 that difference is float32
    # rounding (a matrix of rank at most SKETCH_RANK), and the tail is taken as empty.
    energy = total - float(np.einsum("ij,ij->", b, b, dtype=np.float64))
    if energy > 1e-6 * total:
        z = rng.standard_normal((rows, SKETCH_PROBES), dtype=np.float32)
        both = work.T @ np.concatenate([s_v, z], axis=1)  # T^T [S V, z]
        both -= b.T @ (q.T @ np.concatenate([s_v, z], axis=1))
        t_sv, tz = both[:, : sv.size], both[:, sv.size :]
        both = work @ np.concatenate([s_u, tz], axis=1)  # T [S^T U, T^T z]
        both -= q @ (b @ np.concatenate([s_u, tz], axis=1))
        t_su, ttz = both[:, : sv.size], both[:, sv.size :]
        fourth = float(np.einsum("ij,ij->", ttz, ttz, dtype=np.float64)) / SKETCH_PROBES
        if fourth > 0.0:
            se = math.sqrt(fourth / energy)
            nuclear += _gamma_nuclear(rows - sv.size, energy, fourth)
            # <S, T T^T T> = se^2 <S, T>, and <S, T> = <S, t> - <S, U diag(sv) V^T>
            num += se * se * (kept_sum - float(np.einsum("i,ii->", sv, m)))
            for part in (t_su, t_sv):  # the tail on one side, the top on the other
                den += float(np.einsum("j,ij,ij->", sv, part, part, dtype=np.float64)) / se
            stz = smat @ tz  # T^T S T^T z: the tail on both sides
            part = work.T @ stz - b.T @ (q.T @ stz)
            den += float(np.einsum("ij,ij->", part, part, dtype=np.float64)) / (
                SKETCH_PROBES * se * se)
    if not nuclear > 0.0:
        return 0.0, 0.0
    norm = (nuclear / rows) * (nuclear / cols)  # the two mean eigenvalues
    return num / norm / c, den / norm


#: entries of one dense block of a :class:`_SignMatrix` or a :class:`RowBlocks` matrix
#: (16 MiB of float32)
SIGN_BLOCK = 1 << 22


class RowBlocks:
    """A ``rows x cols`` float matrix read a block of rows at a time, never held whole:
    ``rows(r0, r1)`` gives rows ``r0:r1`` (float32 or float64) and ``take(flat)`` the entries
    at flat indices. :func:`kron_sketch_terms` takes it in place of an array, so that a
    matrix stored otherwise (BF16, or made on demand as fine-tuned minus base) costs one
    block of float32 at a time rather than a float32 copy of itself (1 GiB for a 1B model's
    embedding).

    >>> x = np.arange(12, dtype=np.float32).reshape(3, 4)
    >>> rb = RowBlocks((3, 4), np.float32, lambda a, z: x[a:z], lambda i: x.reshape(-1)[i])
    >>> rb.rows(1, 3).tolist(), rb.take(np.array([0, 11])).tolist(), rb.peak()
    ([[4.0, 5.0, 6.0, 7.0], [8.0, 9.0, 10.0, 11.0]], [0.0, 11.0], 11.0)
    """

    def __init__(self, shape: tuple[int, int], dtype: np.dtype,
                 rows: Callable[[int, int], np.ndarray],
                 take: Callable[[np.ndarray], np.ndarray],
                 step: int | None = None) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(dtype)
        self.rows = rows
        self.take = take
        #: rows a block: :data:`SIGN_BLOCK` entries (all rows for :meth:`of` an array)
        self.step = step or max(1, SIGN_BLOCK // max(self.shape[1], 1))

    @classmethod
    def of(cls, a: np.ndarray) -> RowBlocks:
        """An array as one block (the products are then the array's own)."""
        return cls(a.shape, a.dtype, lambda r0, r1: a[r0:r1],
                   lambda i: a.reshape(-1)[i], step=max(1, a.shape[0]))

    def blocks(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(r0, r1, rows r0:r1)`` over the whole matrix."""
        for r0 in range(0, self.shape[0], self.step):
            r1 = min(self.shape[0], r0 + self.step)
            yield r0, r1, self.rows(r0, r1)

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        """The whole matrix (for a matrix with a side of at most :data:`SKETCH_RANK`)."""
        out = np.concatenate([b for _, _, b in self.blocks()]) if self.shape[0] else \
            np.empty(self.shape, self.dtype)
        return out if dtype is None else out.astype(dtype, copy=False)

    def peak(self) -> float:
        """The largest magnitude."""
        return max((max(float(b.max()), -float(b.min())) for _, _, b in self.blocks()
                    if b.size), default=0.0)


class _Work:
    """``c * t`` in float32 (or its transpose) for :func:`kron_sketch_terms`: products with
    thin matrices, block by block of :class:`RowBlocks`."""

    def __init__(self, src: RowBlocks, c: float, transposed: bool = False) -> None:
        self.src, self.c, self.transposed = src, c, transposed
        rows, cols = src.shape
        self.shape = (cols, rows) if transposed else (rows, cols)

    @property
    def T(self) -> _Work:
        return _Work(self.src, self.c, not self.transposed)

    def _blocks(self) -> Iterator[tuple[int, int, np.ndarray]]:
        for r0, r1, b in self.src.blocks():
            if self.c != 1.0 or b.dtype != np.float32:
                b = np.multiply(b, self.c, dtype=np.float64 if b.dtype == np.float64
                                else np.float32).astype(np.float32, copy=False)
            yield r0, r1, b

    def kept_abs_sum(self, flat: np.ndarray, flat_sorted: np.ndarray) -> float:
        """``sum |c t|`` at the flat indices ``flat`` (``flat_sorted``: the same, sorted).

        A matrix in several blocks is summed block by block from its sorted indices: picking
        scattered entries of a matrix made on demand would read (and keep resident) every
        page of its inputs at once."""
        if self.src.step >= self.src.shape[0]:  # one block: the array itself
            vals = np.multiply(self.src.take(flat), self.c).astype(np.float32, copy=False)
            return float(np.abs(vals).sum(dtype=np.float64))
        cols, total = self.src.shape[1], 0.0
        for r0, r1, b in self._blocks():
            a, z = np.searchsorted(flat_sorted, (r0 * cols, r1 * cols))
            total += float(np.abs(b.reshape(-1)[flat_sorted[a:z] - r0 * cols]).sum(
                dtype=np.float64))
        return total

    def sum_squares(self) -> float:
        return sum(float(np.einsum("ij,ij->", b, b, dtype=np.float64))
                   for _, _, b in self._blocks())

    def __matmul__(self, x: np.ndarray) -> np.ndarray:
        right = not self.transposed  # c t @ x: by rows; (c t)^T @ x: summed over row blocks
        if right:
            parts = [b @ x for _, _, b in self._blocks()]
            return parts[0] if len(parts) == 1 else np.concatenate(parts)
        out = None
        for r0, r1, b in self._blocks():
            part = b.T @ x[r0:r1]
            out = part if out is None else out + part
        return out


class _SignMatrix:
    """The kept signs as a ``rows x cols`` float32 matrix ``S`` (-1, 0, +1) for products
    with thin matrices, ``S @ x`` and (through :attr:`T`) ``S^T @ y``, built a block of rows
    at a time (:data:`SIGN_BLOCK` entries): a dense ``S`` of a 7B model's embedding would be
    as large as the matrix itself."""

    def __init__(self, shape: tuple[int, int], idx: np.ndarray, signs: np.ndarray,
                 transposed: bool = False) -> None:
        self.shape = shape  # of S as stored (not transposed)
        order = np.argsort(idx, kind="stable") if idx.size > 1 and np.any(idx[1:] < idx[:-1]) \
            else None
        self.idx = idx if order is None else idx[order]
        signs = signs if order is None else signs[order]
        self.values = np.where(signs, np.float32(-1.0), np.float32(1.0))
        self.transposed = transposed

    @property
    def T(self) -> _SignMatrix:
        out = _SignMatrix.__new__(_SignMatrix)
        out.__dict__.update(self.__dict__, transposed=not self.transposed)
        return out

    def __matmul__(self, x: np.ndarray) -> np.ndarray:
        return self._left(x) if self.transposed else self._right(x)

    def _blocks(self) -> Iterator[tuple[int, int, np.ndarray]]:
        rows, cols = self.shape
        step = max(1, SIGN_BLOCK // max(cols, 1))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            a, b = np.searchsorted(self.idx, (r0 * cols, r1 * cols))
            block = np.zeros((r1 - r0, cols), np.float32)
            block.reshape(-1)[self.idx[a:b] - r0 * cols] = self.values[a:b]
            yield r0, r1, block

    def _right(self, x: np.ndarray) -> np.ndarray:
        """``S @ x``."""
        out = np.empty((self.shape[0], x.shape[1]), np.result_type(np.float32, x.dtype))
        for r0, r1, block in self._blocks():
            out[r0:r1] = block @ x
        return out

    def _left(self, y: np.ndarray) -> np.ndarray:
        """``S^T @ y``."""
        out = np.zeros((self.shape[1], y.shape[1]), np.result_type(np.float32, y.dtype))
        for r0, r1, block in self._blocks():
            out += block.T @ y[r0:r1]
        return out


def _orthonormal(y: np.ndarray) -> np.ndarray:
    """An orthonormal float32 basis of the columns of a thin ``y`` (directions below 1e-6 of
    the largest dropped), through the eigendecomposition of its small Gram matrix, twice
    (CholeskyQR2's accuracy). Not ``np.linalg.qr``: multi-threaded OpenBLAS makes its panel
    factorization of a thin matrix 100x slower on a busy machine."""
    for _ in range(2):
        y64 = y.astype(np.float64)
        w, vec = np.linalg.eigh(y64.T @ y64)
        keep = w > 1e-12 * w.max() if w.max() > 0.0 else np.zeros(w.size, bool)
        y = (y64 @ (vec[:, keep] / np.sqrt(w[keep]))).astype(np.float32)
    return y


def _gamma_nuclear(count: int, energy: float, fourth: float) -> float:
    """``sum sv`` of ``count`` singular values whose squares have the sum ``energy`` and the
    sum of squares ``fourth``, as if the squares were Gamma-distributed (shape ``k = mean^2 /
    variance``): ``count * E[sqrt(x)] = count * sqrt(theta) * Gamma(k + 1/2) / Gamma(k)``;
    ``sqrt(count * energy)`` (all equal) where the variance vanishes.

    >>> round(_gamma_nuclear(4, 4.0, 4.0), 6)  # four singular values of 1
    4.0
    """
    mean = energy / count
    var = fourth / count - mean * mean
    if not var > 1e-12 * mean * mean:
        return math.sqrt(count * energy)
    k = mean * mean / var
    return count * math.sqrt(var / mean) * math.exp(math.lgamma(k + 0.5) - math.lgamma(k))


#: the scales computed from per-matrix metric terms: name -> (matrix, idx, signs) -> (num, den)
METRIC_TERMS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[float, float]]] = {
    "gram": gram_terms,
    "kron": kron_terms,
    "kron_sketch": kron_sketch_terms,
}


def float32_scale(raw: float, tensors: Sequence[tuple[str, str, int]]) -> float:
    """The scale ``raw`` as stored (float32), refused where it overflows float32 or the
    dtype of any of ``tensors`` (``(name, dtype, numel)``, the tensors sharing it), since the
    decoder rounds the scale to each tensor's dtype.

    >>> float32_scale(0.1, [("w", "F32", 4)])
    0.10000000149011612
    """
    where = tensors[0][0] if len(tensors) == 1 else None
    scope = "" if where else f"global scope ({len(tensors)} tensors): "
    with np.errstate(over="ignore"):
        value = float(np.float32(raw))
    if not math.isfinite(value):
        raise EncodeError(f"{scope}scale {raw!r} overflows float32", tensor=where)
    for name, dtype, numel in tensors:
        if numel and not math.isfinite(decoded_scale(value, dtype)):
            raise EncodeError(f"{scope}scale {value!r} overflows the tensor's dtype {dtype}",
                              tensor=name)
    return value


def is_vector(shape: tuple[int, ...]) -> bool:
    """True for a vector-shaped tensor: at most one dimension above 1 (bias, gain, gate)."""
    return sum(d > 1 for d in shape) <= 1


def decoded_scale(scale: float, dtype: str) -> float:
    """The magnitude a decoder writes for ``scale`` in dtype ``dtype``."""
    with np.errstate(over="ignore"):
        one = TernaryTensor((1,), [0], [False], scale, dtype, _validated=True).to_numpy()
    return float(one[0])




class Stats:
    """Float64 streaming count, sum of squares and (optionally) mean/M2 (Chan et al.)."""

    def __init__(self, need_std: bool) -> None:
        self.need_std = need_std
        self.count = 0
        self.sumsq = 0.0
        self.mean = 0.0
        self.m2 = 0.0

    def add(self, c: np.ndarray) -> bool:
        """Add a chunk; return False if it holds a non-finite value (or overflows)."""
        sums = self.part(c)
        if sums is None:
            return False
        self.merge(sums)
        return True

    def part(self, c: np.ndarray) -> tuple[int, float, float, float] | None:
        """The sums of one 1-d chunk, ``(count, sum of squares, mean, M2)``, or None if it
        holds a non-finite value (or overflows). Any thread; :meth:`merge` adds them up."""
        if not c.size:
            return 0, 0.0, 0.0, 0.0
        # float32 squares are exact in float64; einsum widens in small buffers (no float64
        # copy of the chunk) and, unlike np.dot, never calls a multi-threaded BLAS
        with np.errstate(over="ignore", invalid="ignore"):
            s2 = float(np.einsum("i,i->", c, c, dtype=np.float64))
        if not math.isfinite(s2):
            return None
        if not self.need_std:
            return c.size, s2, 0.0, 0.0
        c64 = c.astype(np.float64)
        mean_c = float(c64.sum()) / c.size
        c64 -= mean_c
        return c.size, s2, mean_c, float(np.einsum("i,i->", c64, c64))

    def merge(self, sums: tuple[int, float, float, float]) -> None:
        """Add the sums of a chunk (:meth:`part`), chunks in order."""
        nc, s2, mean_c, m2_c = sums
        if not nc:
            return
        if not self.need_std:
            self.count += nc
            self.sumsq += s2
            return
        total = self.count + nc
        delta = mean_c - self.mean
        self.mean += delta * nc / total
        self.m2 += m2_c + delta * delta * self.count * nc / total
        self.count = total
        self.sumsq += s2

    def std(self) -> float:
        """Unbiased standard deviation; 0 for fewer than two elements."""
        if self.count < 2:
            return 0.0
        return math.sqrt(max(self.m2, 0.0) / (self.count - 1))

