"""Scales fitted on a LoRA adapter's rebuilt products ``B' A'``, not on its factors.

:func:`~compeft_format.compress.compress` gives every kept entry of a scope one magnitude,
chosen from the task vector's own entries. For a LoRA adapter what the model sees is each
module's product: with ``A0``, ``B0`` the reference (the initial adapter; zero when it is
compressed from zero), ``S_A``, ``S_B`` the kept signs and ``s`` the scale, the rebuilt
update is ``(B0 + s S_B)(A0 + s S_A)``, which has a term quadratic in ``s``: at low density
no rule linear in the task vector fits it (``proj_vcap`` gives up to 0.22 of embedding
cosine against the tuned scale at density 0.01, ``bench/results/lora_scale.md``).

:func:`rescale` keeps compress's selection and signs and replaces the scales of the LoRA
factors by the ones minimising the error of the products, summed over the modules,

    ``sum_m c_m^2 || (B0 + s_B S_B)(A0 + s_A S_A) - B A ||_M^2``

(``c_m`` PEFT's scaling of module ``m``; ``|| . ||_M`` the Frobenius norm, or a metric, see
:data:`LORA_SCALES`), one scale per scope of the selection: ``scope="global"`` one ``s`` for
every factor (a quartic in ``s``: the real roots of its derivative, a cubic), ``"role"`` one
``s_A`` for the A factors and one ``s_B`` for the B factors, ``"tensor"`` both per module
(for a given ``s_A`` the best ``s_B`` is linear least squares; the best ``s_A`` is a root of
a degree-5 polynomial). Every term is computed through ``rank x rank`` products of the
factors (``<X Y, U V> = sum((X^T U) * (Y V^T))``), never a full ``out x in`` product, so a
module costs ``O((out + in) rank^2)``. Tensors that are not LoRA factors keep compress's scale.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from . import dtypes as _dt
from .errors import ConvertError, EncodeError
from .scales import float32_scale
from .tensor import TernaryTensor

__all__ = [
    "LORA_SCALES",
    "best_pair_scales",
    "best_scale",
    "delta_metric",
    "kron_metric",
    "lora_pairs",
    "output_metric",
    "pair_polynomials",
    "peft_scaling",
    "product_quartic",
    "rescale",
    "sign_matrix",
]

#: The product-fitted scale rules (see :func:`rescale`).
LORA_SCALES = ("lora_product", "lora_product_out", "lora_product_kron", "lora_product_delta")

Factors = list[tuple[np.ndarray, np.ndarray]]  # sum of X @ Y, X (out x r), Y (r x in)


def lora_pairs(names: Iterable[str]) -> list[tuple[str, str]]:
    """The ``(A name, B name)`` of every LoRA module whose two factors are both in ``names``.

    PEFT's names: ``...lora_A.<adapter>.weight`` with ``...lora_B.<adapter>.weight``, and
    ``lora_embedding_A`` with ``lora_embedding_B``; sorted by the A name.

    >>> lora_pairs(["m.lora_B.weight", "m.lora_A.weight", "m.bias", "n.lora_A.weight"])
    [('m.lora_A.weight', 'm.lora_B.weight')]
    """
    have = set(names)
    out = []
    for a in sorted(have):
        for ka, kb in ((".lora_A.", ".lora_B."), ("lora_embedding_A", "lora_embedding_B")):
            if ka in a:
                b = a.replace(ka, kb)
                if b in have:
                    out.append((a, b))
                break
    return out


def peft_scaling(config: Mapping[str, Any], a_name: str, rank: int,
                 where: object = "adapter_config.json") -> float:
    """PEFT's scaling of the module whose A factor is ``a_name`` (rank ``rank``, its first
    dimension): ``lora_alpha / r``, or ``/ sqrt(r)`` with ``use_rslora``; ``lora_alpha`` from
    ``alpha_pattern`` where a key matches the module's name as PEFT matches it
    (``re.match(rf"(.*\\.)?({key})$", module)``, the first key that matches).

    >>> peft_scaling({"lora_alpha": 16, "alpha_pattern": {"query": 32}},
    ...              "base_model.model.enc.0.query.lora_A.weight", 8)
    4.0
    >>> peft_scaling({"lora_alpha": 16, "use_rslora": True}, "m.lora_A.weight", 4)
    8.0

    A config PEFT would not load (``lora_alpha`` not a number, ``alpha_pattern`` not an
    object of regular expressions) raises :class:`~compeft_format.errors.ConvertError`
    naming ``where``.
    """
    module = a_name.removeprefix("base_model.model.")
    for marker in (".lora_A.", ".lora_embedding_A.", ".lora_A", ".lora_embedding_A"):
        if marker in module:
            module = module.split(marker)[0]
            break
    alpha = config.get("lora_alpha", 8)
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, Mapping):
        raise ConvertError(f"{where}: alpha_pattern must be an object, got {patterns!r}")
    for key, value in patterns.items():
        try:
            hit = re.match(rf"(.*\.)?({key})$", module)
        except re.error as exc:
            raise ConvertError(f"{where}: alpha_pattern key {key!r} is not a regular "
                               f"expression ({exc})") from None
        if hit:
            alpha = value
            break
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or \
            not math.isfinite(alpha):
        raise ConvertError(f"{where}: lora_alpha of {module!r} must be a finite number, got "
                           f"{alpha!r}")
    r = max(int(rank), 1)
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)


# (basis Q, weights w): an output metric G = Q diag(w) Q^T; (Q, w, Q_in, w_in): G and an
# input metric H = Q_in diag(w_in) Q_in^T, the norm then tr(G E H E^T); None: Frobenius
Metric = tuple[np.ndarray, ...] | None


def output_metric(a: np.ndarray, b: np.ndarray) -> Metric:
    """The output-side metric of ``"lora_product_out"``: ``G = P P^T`` for the module's
    product ``P = B A``, scaled to a mean eigenvalue of 1 over the outputs, as ``(Q, w)`` with
    ``G = Q diag(w) Q^T`` (``Q`` the left singular vectors of ``P``, ``w`` its squared
    singular values scaled); None where ``P = 0``. Through QR of the factors and a
    ``rank x rank`` SVD.

    >>> q, w = output_metric(np.array([[1.0, 0.0]]), np.array([[2.0], [0.0]]))
    >>> np.abs(q[:, 0]).tolist(), w.tolist()  # P = [[2, 0], [0, 0]]: all on output 0
    ([1.0, 0.0], [2.0])
    """
    svd = _product_svd(a, b, inputs=False)
    if svd is None:
        return None
    q, w, _ = svd
    return q, w / (w.sum() / b.shape[0])


def _product_svd(a: np.ndarray, b: np.ndarray, inputs: bool
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """``(U, s^2, V)`` of ``P = B A = U diag(s) V^T`` through QR of the factors and a
    ``rank x rank`` SVD (``V`` only with ``inputs``); None where ``P = 0``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    qb, rb = np.linalg.qr(b)
    # A^T = Q_A R_A: P = Q_B (R_B R_A^T) Q_A^T
    qa, ra = np.linalg.qr(a.T) if inputs else (None, np.linalg.qr(a.T, mode="r"))
    u, sv, vt = np.linalg.svd(rb @ ra.T)
    w = sv**2
    if not w.sum() > 0.0:
        return None
    return qb @ u, w, (qa @ vt.T if inputs else None)


def kron_metric(a: np.ndarray, b: np.ndarray) -> Metric:
    """The two-sided metric of ``"lora_product_kron"``: ``G = P P^T`` over the outputs and
    ``H = P^T P`` over the inputs of the module's product ``P = B A``, each scaled to a mean
    eigenvalue of 1, as ``(Q, w, Q_in, w_in)`` (``Q``, ``Q_in`` the left and right singular
    vectors of ``P``; ``w``, ``w_in`` its squared singular values, scaled); None where
    ``P = 0``. A Kronecker-factored metric, as ``"kron"`` weighs a dense matrix by its own
    two Gram matrices (K-FAC's output and input factors of the Fisher). Through QR of the
    factors and a ``rank x rank`` SVD.

    >>> q, w, qi, wi = kron_metric(np.array([[1.0, 0.0]]), np.array([[2.0], [0.0]]))
    >>> w.tolist(), wi.tolist(), np.abs(qi[:, 0]).tolist()  # P = [[2, 0], [0, 0]]
    ([2.0], [2.0], [1.0, 0.0])
    """
    svd = _product_svd(a, b, inputs=True)
    if svd is None:
        return None
    q, w, q_in = svd
    return q, w / (w.sum() / np.shape(b)[0]), q_in, w / (w.sum() / np.shape(a)[1])


def delta_metric(a: np.ndarray, b: np.ndarray, a0: np.ndarray | None) -> Metric:
    """The two-sided metric of ``"lora_product_delta"``: ``G = P P^T`` over the outputs, as
    :func:`output_metric`, and ``H = dA^T dA`` over the inputs, ``dA = A - A0`` the trained
    change of the A factor; each scaled to a mean eigenvalue of 1, as ``(Q, w, Q_in, w_in)``
    (``Q_in`` the right singular vectors of ``dA``, through its ``rank x rank`` Gram
    matrix). Without ``A0`` (compressed from zero), or where training left ``A`` where it
    started, :func:`output_metric` alone; None where ``P = 0``.

    Why ``dA``: training moves ``A`` by sums of (B's output gradient x input) outer products,
    so the row space of ``dA`` holds the input directions the data used, as ``t^T t`` does
    for a dense delta (``"kron"``); the product ``P = B A`` does not show them, its rows
    being mostly the random ``A0``.

    >>> a0 = np.array([[1.0, 0.0, 0.0]]); a = np.array([[1.0, 0.0, 2.0]])
    >>> q, w, qi, wi = delta_metric(a, np.array([[1.0]]), a0)
    >>> np.abs(qi[:, 0]).tolist(), wi.tolist()  # dA = [0, 0, 2]: all on input 2, mean 1
    ([0.0, 0.0, 1.0], [3.0])
    """
    out = output_metric(a, b)
    if out is None or a0 is None:
        return out
    d = np.asarray(a, np.float64) - np.asarray(a0, np.float64)
    # dA^T dA through the rank x rank Gram matrix dA dA^T = U diag(w) U^T: its right
    # singular vectors are dA^T U / sqrt(w) (an SVD of the wide dA costs several times more)
    w_in, u = np.linalg.eigh(d @ d.T)  # ascending
    if not w_in.size or not w_in[-1] > 0.0:
        return out
    keep = w_in > w_in[-1] * 1e-12  # directions dA does not span carry no weight
    w_in, u = w_in[keep], u[:, keep]
    q_in = (d.T @ u) / np.sqrt(w_in)
    return out[0], out[1], q_in, w_in / (w_in.sum() / d.shape[1])


def _ip(f: Factors, g: Factors, metric: Metric = None) -> float:
    """``<sum X Y, sum U V>`` of two sums of factor products: ``tr(G X Y H V^T U^T)``, ``G``
    the output metric and ``H`` the input one (None, or a metric of two members: the
    identity), ``sum((X^T G U) * (Y H V^T))``; both identities: the Frobenius product."""
    total = 0.0
    for x, y in f:
        for u, v in g:
            if metric is None:
                left = x.T @ u
            else:
                q, w = metric[0], metric[1]
                left = (x.T @ q) @ (w[:, None] * (q.T @ u))
            if metric is None or len(metric) == 2:
                right = y @ v.T
            else:
                qi, wi = metric[2], metric[3]
                right = ((y @ qi) * wi) @ (v @ qi).T
            total += float(np.einsum("ij,ij->", left, right))
    return total


def _nonzero(m: np.ndarray | None) -> np.ndarray | None:
    """``m``, or None where it is all zeros (PEFT's initial B): its terms vanish, and the
    products they would cost are the fit's largest on a wide adapter."""
    return None if m is None or not np.any(m) else m


def product_quartic(a0: np.ndarray | None, b0: np.ndarray | None, sa: np.ndarray,
                    sb: np.ndarray, a: np.ndarray, b: np.ndarray,
                    metric: Metric = None) -> np.ndarray:
    """The coefficients ``q[0..4]`` of ``||(B0 + s S_B)(A0 + s S_A) - B A||^2 = sum q_k s^k``.

    ``a0``, ``b0``: the reference factors (None for zero); ``sa``, ``sb``: the kept signs
    (-1, 0, +1) as matrices of the factors' shapes (``A``: rank x in, ``B``: out x rank);
    ``a``, ``b``: the adapter's factors; ``metric``: an output metric ``G``
    (:func:`output_metric`; the norm is then ``tr(G E E^T)``), or ``G`` and an input metric
    ``H`` (:func:`kron_metric`: ``tr(G E H E^T)``), None for Frobenius. In
    float64; ``O((out + in) rank^2)``.

    >>> a, b = np.array([[1.0, 2.0]]), np.array([[3.0]])
    >>> q = product_quartic(None, None, np.array([[0.0, 1.0]]), np.array([[1.0]]), a, b)
    >>> q.tolist()  # ||s^2 [0, 1] - [3, 6]||^2 = 45 - 12 s^2 + s^4
    [45.0, 0.0, -12.0, 0.0, 1.0]
    """
    a, b, sa, sb = (np.asarray(m, np.float64) for m in (a, b, sa, sb))
    b0 = _nonzero(b0)
    c0: Factors = [(-b, a)]
    c1: Factors = []
    if a0 is not None:
        c1.append((sb, np.asarray(a0, np.float64)))
    if b0 is not None:
        b0 = np.asarray(b0, np.float64)
        c1.append((b0, sa))
        if a0 is not None:
            c0.append((b0, np.asarray(a0, np.float64)))
    c2: Factors = [(sb, sa)]

    def ip(f: Factors, g: Factors) -> float:
        return _ip(f, g, metric)

    return np.array([ip(c0, c0), 2 * ip(c0, c1), ip(c1, c1) + 2 * ip(c0, c2),
                     2 * ip(c1, c2), ip(c2, c2)])


def best_scale(q: Sequence[float]) -> float | None:
    """The ``s > 0`` minimising ``sum q_k s^k`` (a quartic), or None when no ``s > 0`` does
    better than ``s -> 0`` (nothing kept, or a product pointing away from the target).

    >>> round(best_scale([45.0, 0.0, -12.0, 0.0, 1.0]), 6)  # s^2 = 6
    2.44949
    """
    P = np.polynomial.polynomial
    q = np.trim_zeros(np.asarray(q, np.float64), "b")
    # q4 = ||S_B S_A||^2 is 0 only when no kept B entry meets a kept A entry; then q3 = 0
    # too and it is a quadratic (or a constant). Bounded below: even degree, leading > 0;
    # then the minimum is at a real root of the derivative
    if q.size < 3 or q.size % 2 == 0 or not q[-1] > 0.0:
        return None
    roots = P.polyroots(P.polyder(q))
    real = [float(r.real) for r in roots if abs(r.imag) <= 1e-9 * max(1.0, abs(r))]
    cands = [r for r in real if r > 0.0]
    if not cands:
        return None
    best = min(cands, key=lambda s: float(P.polyval(s, q)))
    if P.polyval(best, q) >= q[0]:
        return None
    return best


def pair_polynomials(a0: np.ndarray | None, b0: np.ndarray | None, sa: np.ndarray,
                     sb: np.ndarray, a: np.ndarray, b: np.ndarray, metric: Metric = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(n00, n01, n11)``: polynomials in ``s_A`` (coefficients, lowest first) with
    ``||(B0 + s_B S_B)(A0 + s_A S_A) - B A||^2 = n00 + 2 s_B n01 + s_B^2 n11``.

    Writing the error ``D0(s_A) + s_B D1(s_A)`` with ``D0 = B0 A0 - B A + s_A B0 S_A`` and
    ``D1 = S_B A0 + s_A S_B S_A``: ``n00 = ||D0||^2``, ``n01 = <D0, D1>``, ``n11 = ||D1||^2``,
    each of degree 2. Arguments as :func:`product_quartic`.
    """
    a, b, sa, sb = (np.asarray(m, np.float64) for m in (a, b, sa, sb))
    b0 = _nonzero(b0)
    e0: Factors = [(-b, a)]
    e1: Factors = []
    f0: Factors = []
    if b0 is not None:
        b0 = np.asarray(b0, np.float64)
        e1.append((b0, sa))
        if a0 is not None:
            e0.append((b0, np.asarray(a0, np.float64)))
    if a0 is not None:
        f0.append((sb, np.asarray(a0, np.float64)))
    f1: Factors = [(sb, sa)]

    def ip(f: Factors, g: Factors) -> float:
        return _ip(f, g, metric)

    n00 = np.array([ip(e0, e0), 2 * ip(e0, e1), ip(e1, e1)])
    n01 = np.array([ip(e0, f0), ip(e0, f1) + ip(e1, f0), ip(e1, f1)])
    n11 = np.array([ip(f0, f0), 2 * ip(f0, f1), ip(f1, f1)])
    return n00, n01, n11


def best_pair_scales(n00: np.ndarray, n01: np.ndarray, n11: np.ndarray,
                     ratio: float = 1.0) -> tuple[float, float] | None:
    """The ``(s_A, s_B)``, both ``> 0``, minimising ``n00 + 2 s_B n01 + s_B^2 n11``
    (:func:`pair_polynomials`), or None when none does better than zero.

    For a given ``s_A`` the best ``s_B`` is ``-n01 / n11``, leaving ``n00 - n01^2 / n11``,
    whose stationary points are the real roots of ``n00' n11^2 - 2 n01 n01' n11 + n01^2
    n11'`` (degree 5). Where only the product ``s_A s_B`` matters (both references zero:
    ``n11`` and ``n01`` are then ``s_A^2`` and ``s_A`` times a constant), the product is fit
    and split so that ``s_A / s_B = ratio``.

    >>> n = pair_polynomials(None, None, np.array([[0.0, 1.0]]), np.array([[1.0]]),
    ...                      np.array([[1.0, 2.0]]), np.array([[3.0]]))
    >>> [round(x, 6) for x in best_pair_scales(*n, ratio=4.0)]  # s_A s_B = 6, s_A = 4 s_B
    [4.898979, 1.224745]
    """
    P = np.polynomial.polynomial
    if n11[0] == 0.0 and n11[1] == 0.0 and n01[0] == 0.0 and n01[2] == 0.0 \
            and n00[1] == 0.0 and n00[2] == 0.0:  # only the product s_A s_B = p counts
        if not n11[2] > 0.0 or not n01[1] < 0.0:
            return None
        p = -n01[1] / n11[2]
        return math.sqrt(p * ratio), math.sqrt(p / ratio)
    d = P.polysub(P.polyadd(P.polymul(P.polyder(n00), P.polymul(n11, n11)),
                            P.polymul(P.polymul(n01, n01), P.polyder(n11))),
                  2 * P.polymul(P.polymul(n01, P.polyder(n01)), n11))
    d = np.trim_zeros(d, "b")
    roots = P.polyroots(d) if d.size > 1 else np.empty(0)
    best = None
    for r in roots:
        if abs(r.imag) > 1e-9 * max(1.0, abs(r)) or not r.real > 0.0:
            continue
        s_a = float(r.real)
        den = P.polyval(s_a, n11)
        if not den > 0.0:
            continue
        s_b = -P.polyval(s_a, n01) / den
        err = P.polyval(s_a, n00) - P.polyval(s_a, n01) ** 2 / den
        if s_b > 0.0 and (best is None or err < best[0]):
            best = (err, s_a, s_b)
    if best is None or best[0] >= n00[0]:
        return None
    return best[1], best[2]


def sign_matrix(t: TernaryTensor) -> np.ndarray:
    """The kept signs of ``t`` (-1, 0, +1) as a float64 matrix (rows = the first dimension):
    the ``sa``, ``sb`` of :func:`product_quartic`.

    >>> sign_matrix(TernaryTensor((2, 2), [1, 2], [True, False], 0.5)).tolist()
    [[0.0, -1.0], [1.0, 0.0]]
    """
    out = np.zeros(t.numel)
    out[t.indices] = np.where(t.signs, -1.0, 1.0)
    return out.reshape(t.shape[0], -1) if len(t.shape) else out


def _matrix(value: Any) -> np.ndarray:
    """A factor as a float64 matrix (numpy, torch, or ``(storage, dtype)``)."""
    if isinstance(value, tuple):
        value = _dt.to_numpy_values(*value)
    arr = np.asarray(value.detach().cpu().float().numpy() if hasattr(value, "detach")
                     else value, np.float64)
    return arr.reshape(arr.shape[0], -1)


def rescale(
    compressed: Mapping[str, Any],
    adapter: Mapping[str, Any],
    reference: Mapping[str, Any] | None = None,
    *,
    rule: str = "lora_product",
    scope: str = "global",
    alpha: float = 1.0,
    scaling: Mapping[str, float] | Callable[[str], float] | None = None,
) -> dict[str, Any]:
    """``compressed`` (:func:`~compeft_format.compress.compress`'s output for a LoRA adapter)
    with its factors' scales fitted on the rebuilt products ``(B0 + s S_B)(A0 + s S_A)``
    against the adapter's ``B A``; the selection, the signs and every other tensor unchanged.

    Parameters
    ----------
    compressed:
        name -> :class:`TernaryTensor` (or a value kept dense, returned as it is), from
        compress with the same ``scope``.
    adapter:
        The adapter's trained factors (name -> array, torch tensor or ``(storage, dtype)``):
        read once each, for the modules whose A and B are both compressed.
    reference:
        What the task vector was measured from (the initial adapter: ``A0``, ``B0``); None
        (or a missing name) for zero.
    rule:
        One of :data:`LORA_SCALES`: ``"lora_product"`` fits the products in the Frobenius
        norm; ``"lora_product_out"`` measures each module's error ``E`` by ``tr(G E E^T)``
        with ``G = P P^T`` (:func:`output_metric`), the output directions the adapter's own
        product ``P = B A`` moves: the directions the loss gradient used, where the dropped
        entries' effect lines up with the kept ones'; ``"lora_product_kron"`` by
        ``tr(G E H E^T)``, ``H = P^T P`` weighing the input directions the same way
        (:func:`kron_metric`): the product's counterpart of ``"kron"``;
        ``"lora_product_delta"`` by ``tr(G E H E^T)`` with ``H = dA^T dA``, the input
        directions the training moved ``A`` along (:func:`delta_metric`; from zero, where
        ``dA`` is unknown, it is ``"lora_product_out"``).
    scope:
        compress's scope: ``"global"`` (one scale for every factor), ``"role"`` (one for the A
        factors, one for the B factors) or ``"tensor"`` (both per module).
    alpha:
        Multiplies every fitted scale.
    scaling:
        PEFT's scaling of each module (``lora_alpha / r``), by A name (mapping or function):
        weighs the modules' errors (squared). None: every module alike.

    Returns
    -------
    dict
        The same names in the same order. Where no positive scale does better than nothing
        (no kept entry of a module's factors, ...), compress's scale is kept.

    Examples
    --------
    >>> import numpy as np
    >>> from compeft_format.compress import compress
    >>> rng = np.random.default_rng(0)
    >>> a0 = rng.normal(size=(4, 32)); a = a0 + 0.1 * rng.normal(size=(4, 32))
    >>> b = 0.1 * rng.normal(size=(16, 4))
    >>> ad = {"m.lora_A.weight": a, "m.lora_B.weight": b}
    >>> init = {"m.lora_A.weight": a0, "m.lora_B.weight": np.zeros((16, 4))}
    >>> tv = {n: ad[n] - init[n] for n in ad}
    >>> out = rescale(compress(tv, density=0.05), ad, init)
    >>> out["m.lora_A.weight"].scale == out["m.lora_B.weight"].scale
    True
    """
    if rule not in LORA_SCALES:
        raise EncodeError(f"LoRA scale rule must be one of {LORA_SCALES}, got {rule!r}")
    if scope not in ("global", "role", "tensor"):
        raise EncodeError(f"scope must be 'global', 'role' or 'tensor', got {scope!r}")
    ternary = {n: t for n, t in compressed.items() if isinstance(t, TernaryTensor)}
    pairs = lora_pairs(ternary)
    ref = reference or {}

    def weight(a_name: str) -> float:
        if scaling is None:
            return 1.0
        c = scaling(a_name) if callable(scaling) else scaling[a_name]
        return float(c) ** 2

    terms = []  # (A name, B name, weight, quartic or pair polynomials)
    for a_name, b_name in pairs:
        a, b = _matrix(adapter[a_name]), _matrix(adapter[b_name])
        a0 = _matrix(ref[a_name]) if a_name in ref else None
        b0 = _matrix(ref[b_name]) if b_name in ref else None
        sa, sb = sign_matrix(ternary[a_name]), sign_matrix(ternary[b_name])
        if a.shape != sa.shape or b.shape != sb.shape or a.shape[0] != b.shape[1]:
            raise EncodeError(f"LoRA factors {a_name!r} {a.shape} and {b_name!r} {b.shape} "
                              "do not match their compressed tensors or each other")
        metric = (output_metric(a, b) if rule == "lora_product_out" else
                  kron_metric(a, b) if rule == "lora_product_kron" else
                  delta_metric(a, b, a0) if rule == "lora_product_delta" else None)
        if rule != "lora_product" and metric is None:
            continue  # B A = 0: nothing this metric sees (a module the training never moved)
        fit = product_quartic if scope == "global" else pair_polynomials
        got = fit(a0, b0, sa, sb, a, b, metric)
        terms.append((a_name, b_name, weight(a_name), got))

    scales: dict[str, float] = {}
    if scope == "global" and terms:
        s = best_scale(sum(w * q for _, _, w, q in terms))
        if s is not None:
            for a_name, b_name, _, _ in terms:
                scales[a_name] = scales[b_name] = alpha * s
    elif terms:
        groups = [terms] if scope == "role" else [[t] for t in terms]
        for group in groups:
            polys = [sum(w * p[i] for _, _, w, p in group) for i in range(3)]
            a_name, b_name = group[0][0], group[0][1]
            ratio = (ternary[a_name].scale / ternary[b_name].scale
                     if ternary[a_name].scale > 0 and ternary[b_name].scale > 0 else 1.0)
            got = best_pair_scales(*polys, ratio=ratio)
            if got is not None:
                for g_a, g_b, _, _ in group:
                    scales[g_a], scales[g_b] = alpha * got[0], alpha * got[1]

    out: dict[str, Any] = {}
    for name, value in compressed.items():
        if name in scales:
            value = TernaryTensor(value.shape, value.indices, value.signs,
                                  float32_scale(scales[name], [(name, value.dtype, value.numel)]),
                                  value.dtype, _validated=True)
        out[name] = value
    return out
