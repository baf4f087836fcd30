"""ComPEFT compression: task vectors to sparse ternary tensors (top-k, sign, one scale).

:func:`compress` keeps the ``round(density * n)`` entries of largest magnitude of a task
vector, stores only their signs and replaces every kept magnitude with one scale (spec and
paper: ``alpha * sigma(tau) * sign(topk(tau))``). The selection is exact (the same entries as
a full sort with the documented tie rule) and streams over the tensors: the model is never
concatenated, and a tensor is read a few times, one at a time, in chunks.

The exact top-k selection and its chunk kernels live in :mod:`compeft_format.selection`,
the scale rules in :mod:`compeft_format.scales`, and the passes over one scope (sample,
statistics, output) in :mod:`compeft_format.passes`; this module checks the options, splits
the tensors into scopes (global, per tensor, per LoRA role) and runs the passes on each.

:func:`compress` draws the sample first, so that step 2 happens in the pass that adds up the
statistics (the scale's sums, finiteness), chunk by chunk while each chunk is in cache, on
all cores. It also keeps the position and value of every entry above ``lo`` (the kept ones
and the band), so once the threshold is known the output is picked from those: the task
vector is read once in full (plus the sparse sample) instead of three times.
:func:`iter_compress`, which holds one output tensor at a time, collects only the band.
Where numba is installed, the per-chunk loops run compiled (:mod:`compeft_format.kernels`,
``$COMPEFT_KERNELS``), with the same output bytes.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from ._spec import META_COMPRESSION
from .errors import EncodeError
from .lora_scale import LORA_SCALES
from .passes import ChunkedValues, ScopePasses
from .scales import (
    AUTO_SCALE,
    DEFAULT_SCALE,
    METRIC_SCALES,
    SCALE_CHOICES,
    SCALES,
    SWEEP_SCALES,
    float32_scale,
    gram_terms,
    kron_terms,
    resolve_scale,
)
from .selection import THREADS_ENV, TopK, compress_threads, select_topk

__all__ = [
    "AUTO_SCALE",
    "COMPRESSION_METADATA_KEY",
    "DEFAULT_DENSITY",
    "DEFAULT_SCALE",
    "METRIC_SCALES",
    "SCALES",
    "SCALE_CHOICES",
    "SCOPES",
    "SWEEP_SCALES",
    "THREADS_ENV",
    "ChunkedValues",
    "TopK",
    "check_alpha",
    "check_choice",
    "check_density",
    "compress",
    "compress_threads",
    "compression_metadata",
    "float32_scale",
    "gram_terms",
    "iter_compress",
    "kron_terms",
    "role_groups",
    "select_topk",
]

#: File metadata key under which :func:`compression_metadata` is stored.
COMPRESSION_METADATA_KEY = META_COMPRESSION  # "compeft.compression"
#: The density a file compress uses when none is given: keep the top 10% of the entries.
DEFAULT_DENSITY = 0.1
SCOPES = ("global", "tensor", "role")


# ---------------------------------------------------------------------------------------------
# compress
# ---------------------------------------------------------------------------------------------
def compression_metadata(density: float, alpha: float, scope: str, scale: str) -> dict[str, Any]:
    """Return the JSON-safe record of the compression parameters.

    Store it in the file metadata under :data:`COMPRESSION_METADATA_KEY`
    (``"compeft.compression"``). The arguments are checked as :func:`compress` checks them.

    Examples
    --------
    >>> compression_metadata(0.1, 1.0, "global", "norm")
    {'method': 'compeft', 'density': 0.1, 'alpha': 1.0, 'scope': 'global', 'scale': 'norm'}
    """
    return {
        "method": "compeft",
        "density": check_density(density),
        "alpha": check_alpha(alpha),
        "scope": check_choice("scope", scope, SCOPES),
        # the LoRA product scales (lora_scale.rescale, after compress) are recorded here too
        "scale": check_choice("scale", scale, SCALES + LORA_SCALES),
    }


def compress(
    tensors: Mapping[str, Any],
    *,
    density: float,
    alpha: float = 1.0,
    scope: str = "global",
    scale: str = DEFAULT_SCALE,
    exclude: str | Iterable[str] = (),
    progress: Callable[[str], Any] | None = None,
    proj_scales: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Compress a task vector to sparse ternary tensors (ComPEFT).

    In every *scope* (the whole task vector, or each tensor) the ``round(density * n)``
    entries of largest magnitude are kept (Python's ``round``, half to even; at least one
    when the scope has elements and is not all zero; zeros are never kept, so an all-but-zero
    scope keeps only its nonzeros). Each kept entry becomes ``+scale`` or ``-scale`` with
    its own sign; the rest become 0.

    **Ties** at the threshold magnitude are broken by position: lowest flat (C-order) index
    first, and for ``scope="global"`` tensors in sorted name order (``sorted(names)``,
    Python string order), as if the scope were the sorted-name concatenation of the
    flattened tensors, as in the paper's code. So the selection equals a stable sort by
    descending magnitude.

    **Scale** (statistics in float64; ``t`` is the task vector over the scope, ``K`` its
    kept entries, ``k = |K|``, ``t_hat`` the compressed vector):

    * ``"auto"`` (default): ``"kron_sketch"`` at density 0.05 and below
      (:data:`~compeft_format.scales.AUTO_SKETCH_DENSITY`), ``"proj_vcap"`` above
      (:func:`~compeft_format.scales.resolve_scale`): within 0.0015 of the tuned scale at
      every density from 0.01 to 0.2 on the measured dense deltas, and at 0.1 and up as fast
      as ``"proj_vcap"``. The output is exactly that rule's. (A task vector of vectors only
      gets ``"proj_vcap"``'s scales either way; :func:`~compeft_format.convert.compress_file`
      also picks the LoRA rules for a LoRA adapter, and records the rule it resolved to.)
    * ``"proj_vcap"``: ``"proj"``, except that a vector-shaped tensor (at most one
      dimension above 1: a bias, a norm gain, an (IA)^3 vector) gets at most
      ``alpha * max|t|`` over its own entries: one scale per tensor, one selection.
    * ``"kron"``: least squares under a Kronecker-factored metric made of each matrix's own
      two Gram matrices: ``alpha * sum num_i / sum den_i`` over the matrices (:func:`kron_terms`:
      ``num_i = tr(G_i S_i A_i t_i^T)``, ``den_i = tr(G_i S_i A_i S_i^T)`` with ``G_i = (t_i
      t_i^T)^(1/2)`` on the outputs and ``A_i = (t_i^T t_i)^(1/2)`` on the inputs, each scaled
      to a mean eigenvalue of 1); vectors capped and the no-matrix case as in ``"gram"``. A
      fine-tune's update is a sum of (output gradient x input) outer products, so its two
      Gram matrices say which inputs the data used and which output directions the loss was
      sensitive to (the two factors K-FAC uses for the Fisher); the error that counts is the
      one those directions see. On a rank-one matrix it is ``"proj"``. Where the kept entries
      hold little of a near-full-rank update (an AdamW full fine-tune at density 0.01) it
      goes above ``"proj"`` (1.25x), on a low-rank dense update below it (0.7x), as the tuned
      scale does (``bench/results/scale_rules.md``). Costs about ``4 * rows * columns *
      min(rows, columns)`` multiply-adds and one ``min(rows, columns)``-square symmetric
      eigendecomposition per matrix, in float64: cheap for adapters (``min`` is the rank),
      seconds for a 22M-parameter model, hours on a few cores for a 7B full fine-tune.
    * ``"kron_sketch"``: ``"kron"``'s terms estimated per matrix by
      :func:`~compeft_format.scales.kron_sketch_terms` (a randomized range finder of rank 24
      with one power iteration finds the top of the spectrum, whose terms are exact; the rest
      is modelled from its energy and a sketched fourth moment); exact ``"kron"`` for a
      matrix with a side of at most 24 (LoRA factors) or of rank at most 24 (a merged LoRA).
      About ``250 * rows * columns`` float32 multiply-adds a matrix instead of ``"kron"``'s
      ``4 * rows * columns * min(rows, columns)`` in float64; within 2.5% of ``"kron"``'s
      scale on the project's full fine-tune (``bench/results/scale_rules.md``). Deterministic
      (fixed seed).
    * ``"gram"``: the least-squares scale under the metric of the fine-tune's own input
      directions: ``alpha * sum num_i / sum den_i`` over the matrices ``t_i`` of the scope
      (:func:`gram_terms`: with ``S_i`` the kept signs and ``C_i = t_i^T t_i`` scaled to a
      mean eigenvalue of 1, ``num_i = tr(S_i C_i t_i^T)``, ``den_i = tr(S_i C_i S_i^T)``); a
      vector-shaped tensor is capped as in ``"proj_vcap"``; without a kept matrix entry it
      is ``"proj_vcap"``. A fine-tune's update of a weight is a sum of (output gradient x
      input) outer products, so ``t^T t`` weighs the input directions the data used: the
      scale that rebuilds what those inputs see, not every parameter. It overshoots the
      least-squares ``"l2"`` like ``"proj"`` does where the kept entries hold most of the
      task vector, and less where they hold little (low densities). Costs one more product
      per matrix (``3 * rows * columns * min(rows, columns)`` multiply-adds).
    * ``"proj"``: ``alpha * ||t||_2^2 / sum(|t_K|)``, projection-preserving: then
      ``<t, t_hat> = ||t||^2``, so the rebuilt vector is unbiased along ``t``.
    * ``"norm"``: ``alpha * ||t||_2 / sqrt(k)``, so ``||t_hat|| = ||t||``.
    * ``"l2"``: ``alpha * mean(|t_K|)``, the least-squares scale for the kept signs.
    * ``"std"``: ``alpha * std(t)`` (unbiased, N-1) of the dense task vector over the scope,
      as in the paper (its alpha is tuned per task).

    Always ``l2 <= norm <= proj`` (``norm`` is the geometric mean of the other two).

    **Why ``"proj_vcap"``.** What matters is how close the rebuilt *model* comes to the
    fine-tuned one, not ``t_hat`` to ``t``: the dropped entries moved the model too, mostly
    in the same direction as the kept ones, so the best scale overshoots the least-squares
    ``"l2"`` by 1.2x to 3x; ``"proj"`` puts back exactly the component along ``t``. A vector
    entry, though, acts on its own channel alone (it cannot carry the effect of dropped
    entries of other channels through a shared fan-in sum, as a matrix entry does), and an
    (IA)^3 gate overshot to ``1 - 0.78`` nearly switches its channel off: so a vector never
    gets more than the largest change the fine-tune itself made in it. Measured with
    ``bench/scale_rules.py`` on all-MiniLM-L6-v2 (22M parameters; mean cosine of the rebuilt
    model's sentence embeddings with the true fine-tune's over 40 sentences; one global
    selection; alpha 1), as the worst gap to the best alpha found by brute force (with
    data) over densities 0.05, 0.1 and 0.2:

    =====================  ======  ======  ======  ======  ===========
    task vector            std     l2      norm    proj    proj_vcap
    =====================  ======  ======  ======  ======  ===========
    LoRA adapter (r=8)     0.1954  0.1304  0.0623  0.0024  0.0024
    (IA)^3 adapter         0.0230  0.0098  0.0004  0.0330  0.0034
    full fine-tunes (x3)   0.3068  0.1601  0.0809  0.0077  0.0084
    =====================  ======  ======  ======  ======  ===========

    Within 0.005 of the tuned scale: both adapters at every density, the full fine-tunes
    (learning rates 2e-5, 5e-5, 1e-4) at 0.1 and 0.2 for two of the three. Where a gap is
    left, the best scale sits 13-17% above ``"proj"`` (about 8% in a third-party full
    fine-tune of the same model, where at density 0.1 ``"std"`` at alpha 1 scored 0.60,
    ``"l2"`` 0.86, ``"norm"`` 0.96 and the tuned scale 0.998), while LoRA's best is 0.93-1.04
    and (IA)^3's 0.55-0.86 times ``"proj"``'s: no data-free rule tried fits all three (see
    ``bench/results/scale_rules.md`` and the README's "Choosing density and scale").
    :func:`compeft_format.tuning.tune` finds the last bit from your own evaluation. (The
    full-fine-tune rows were later found scored against the wrong target, a bug of the
    benchmark since fixed.) At densities 0.01 to 0.05 ``"kron"`` is within 0.0015 of the
    tuned scale on a full fine-tune and on a merged (dense) LoRA, where the default misses
    by up to 0.012 and 0.015; on LoRA factors below 0.05 ``"gram"`` comes closest, and no
    rule is within 0.005 there. ``"kron"`` is not the default: it costs an
    ``O(rows * columns * min(rows, columns))`` pass per matrix and gives up to 0.001 where
    both are within 0.005 (``bench/results/scale_rules.md``). ``"kron_sketch"`` estimates it
    (within 0.0015 of the tuned scale at every density on both dense deltas) for about 250
    multiply-adds an entry, 3x to 9x the time of a compression with ``"proj_vcap"`` on a
    7B model's shapes: so the default, ``"auto"``, spends it only at density 0.05 and below,
    where ``"proj_vcap"`` gives up to 0.015 (at 0.1 and 0.2 it is within 0.0004).

    Parameters
    ----------
    tensors:
        Mapping name -> numpy array or torch tensor (float16, bfloat16, float32, float64):
        the task vector (fine-tuned minus base; see :mod:`compeft_format.taskvec`). It may be
        lazy: values are fetched one at a time, ``tensors[name]``, up to three times each
        for ``scope="global"`` (sample; statistics and selection; the matrices again for
        ``"gram"``, ``"kron"`` and ``"kron_sketch"``, or the output where the sample was
        unlucky) and once each
        for ``scope="tensor"``; none is kept between fetches, and the model is never
        concatenated. If ``tensors`` has a ``dtypes`` mapping attribute (as
        :class:`~compeft_format.taskvec.TaskVector` has), it names the original dtype of
        each tensor (``"BF16"`` for float32 values of a bfloat16 model).
    density:
        Fraction of entries to keep, in ``(0, 1]``.
    alpha:
        Multiplier of the scale, finite and ``> 0``.
    scope:
        ``"global"`` (one selection and one scale over all non-excluded tensors together),
        ``"tensor"`` (each tensor on its own) or ``"role"`` (one selection and one scale
        for a LoRA's A tensors, one for its B tensors, one for the rest: see
        :func:`role_groups`; B starts at zero and A at random, so from zero their kept
        entries mean different things; for anything but LoRA it is ``"global"``).
        :func:`iter_compress` holds a role's output tensors until they are yielded.
    scale:
        ``"auto"`` (default), ``"proj_vcap"``, ``"kron_sketch"``, ``"kron"``, ``"gram"``,
        ``"proj"``, ``"norm"``, ``"l2"`` or ``"std"``, see above.
    exclude:
        ``fnmatch`` patterns (case-sensitive) of names kept dense and lossless: their value
        is returned untouched and takes no part in the selection or the scale. Non-float
        tensors must be excluded.
    progress:
        Called as ``progress(name)`` once per tensor when its output is ready.
    proj_scales:
        A dict to fill, for the rules whose scale is not ``"proj"``'s (``"kron_sketch"``,
        ``"kron"``, ``"gram"``), with ``name -> the "proj" scale of its scope`` (before a
        vector's cap), each as soon as its scope's scale is known (:func:`iter_compress`:
        before that scope's first tensor is yielded): what a reader assuming ``"proj"``
        needs (:mod:`~compeft_format.convert` records it). Left empty under other rules.

    Returns
    -------
    dict
        name -> :class:`TernaryTensor` (same shape, original dtype name) or the untouched
        value for excluded names, in the input's order. A scope whose scale is 0 (all zero,
        or constant with ``scale="std"``) gives empty ternary tensors with scale 0.

    Raises
    ------
    EncodeError
        A bad option; a non-float, NaN or infinite tensor (named); a scale that overflows
        float32 or the tensor dtype.

    Examples
    --------
    >>> import numpy as np
    >>> tv = {"a": np.array([0.1, -0.4, 0.0, 0.3]), "b": np.array([[-0.2, 0.05]])}
    >>> out = compress(tv, density=0.5)  # keeps round(0.5 * 6) = 3 entries
    >>> out["a"]  # proj: ||t||^2 / (0.4 + 0.3 + 0.2) = 0.3025 / 0.9
    TernaryTensor(shape=(4,), nnz=2, scale=0.3361110985279083, dtype='F64')
    >>> out["b"].scale  # "b" is a vector: capped at its own largest |t|, 0.2
    0.20000000298023224
    >>> compress(tv, density=0.5, scale="norm")["a"].to_numpy().round(4)
    array([ 0.    , -0.3175,  0.    ,  0.3175])
    >>> compress(tv, density=0.5, scale="l2")["b"].scale  # mean of 0.4, 0.3, 0.2
    0.30000001192092896
    """
    names, excluded, work_names, job = _setup(
        tensors, density, alpha, scope, scale, exclude, progress, proj_scales=proj_scales
    )
    results: dict[str, Any] = {}
    for name in names:
        if name in excluded:
            results[name] = tensors[name]
            if progress is not None:
                progress(name)
    if scope == "global":
        results.update(job.run(work_names, tensors.__getitem__))
    elif scope == "role":
        for group in role_groups(work_names):
            results.update(job.run(group, tensors.__getitem__))
    else:
        for name in work_names:
            results.update(job.run_one(name, tensors))
    return {name: results[name] for name in names}


def role_groups(names: Iterable[str]) -> list[list[str]]:
    """The scopes of ``scope="role"``: LoRA's A tensors, its B tensors, then the rest.

    A tensor is a LoRA A (B) when its name holds ``.lora_A.`` (``.lora_B.``) or
    ``lora_embedding_A`` (``_B``), PEFT's names. Empty groups are left out; each group is
    in sorted name order.

    >>> role_groups(["m.lora_B.weight", "m.lora_A.weight", "m.bias"])
    [['m.lora_A.weight'], ['m.lora_B.weight'], ['m.bias']]
    """
    groups: dict[str, list[str]] = {"A": [], "B": [], "": []}
    for name in sorted(names):
        if ".lora_A." in name or "lora_embedding_A" in name:
            groups["A"].append(name)
        elif ".lora_B." in name or "lora_embedding_B" in name:
            groups["B"].append(name)
        else:
            groups[""].append(name)
    return [g for g in groups.values() if g]


def iter_compress(
    tensors: Mapping[str, Any],
    *,
    density: float,
    alpha: float = 1.0,
    scope: str = "global",
    scale: str = DEFAULT_SCALE,
    exclude: str | Iterable[str] = (),
    progress: Callable[[str], Any] | None = None,
    proj_scales: dict[str, float] | None = None,
) -> Iterator[tuple[str, Any]]:
    """Compress like :func:`compress`, yielding ``(name, value)`` one tensor at a time.

    The values are exactly :func:`compress`'s, yielded in sorted name order (``sorted``,
    Python string order, which is also the order of the names' UTF-8 bytes, the order of a
    compeft file's records). Once the threshold and the scale are known, each tensor is
    gathered, yielded and dropped, so only the tensor being consumed is held, where
    :func:`compress` returns them all at once: for a model larger than memory, write each
    tensor as it comes (``compeft_format.convert`` does). A scale other than ``"norm"`` and
    ``"std"`` needs the sum of every kept magnitude before the first tensor can be built:
    one more pass over the data. Each tensor is read in full twice (statistics with the
    threshold's band; output) or three times (that sum), plus a sparse sample, where
    :func:`compress` reads it once.

    The options are checked at the call; the work starts with the first ``next()``.

    Examples
    --------
    >>> import numpy as np
    >>> tv = {"b": np.array([0.1, -0.4, 0.0]), "a": np.array([0.3, 0.2]), "n": np.arange(2)}
    >>> [(name, getattr(v, "nnz", v)) for name, v in iter_compress(tv, density=0.5,
    ...                                                            exclude="n")]
    [('a', 1), ('b', 1), ('n', array([0, 1]))]
    """
    names, excluded, work_names, job = _setup(
        tensors, density, alpha, scope, scale, exclude, progress, stream=True,
        proj_scales=proj_scales,
    )

    def stream() -> Iterator[tuple[str, Any]]:
        if scope == "global":
            work = job.iter_run(work_names, tensors.__getitem__)
        elif scope == "role":  # the groups interleave in name order: each is held until used
            done: dict[str, Any] = {}
            for group in role_groups(work_names):
                done.update(job.run(group, tensors.__getitem__))
            work = ((name, done.pop(name)) for name in work_names)
        else:
            work = (item for name in work_names for item in job.iter_run_one(name, tensors))
        for name in sorted(names):
            if name in excluded:
                value = tensors[name]
                if progress is not None:
                    progress(name)
                yield name, value
                continue
            got, value = next(work)
            assert got == name, (got, name)  # both walk the sorted names
            yield name, value
            del value  # hold nothing once the consumer has moved on

    return stream()


def _setup(
    tensors: Mapping[str, Any],
    density: float,
    alpha: float,
    scope: str,
    scale: str,
    exclude: str | Iterable[str],
    progress: Callable[[str], Any] | None,
    stream: bool = False,
    proj_scales: dict[str, float] | None = None,
) -> tuple[list[str], set[str], list[str], ScopePasses]:
    """Check the options; return the names, the excluded ones, the sorted rest and the job."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"compress takes a mapping of name -> tensor, got "
                        f"{type(tensors).__name__}")
    density = check_density(density)
    alpha = check_alpha(alpha)
    scope = check_choice("scope", scope, SCOPES)
    # "auto" is resolved here, per call: a scope of vectors only gets the same bytes from
    # "kron_sketch" as from "proj_vcap" (see resolve_scale), so the density decides
    scale = resolve_scale(check_choice("scale", scale, SCALE_CHOICES), density)
    patterns = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    for p in patterns:
        if not isinstance(p, str):
            raise EncodeError(f"exclude patterns must be strings, got {p!r}")
    names = list(tensors.keys())
    excluded = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    work_names = sorted(n for n in names if n not in excluded)
    declared = getattr(tensors, "dtypes", None)
    declared = declared if isinstance(declared, Mapping) else {}
    job = ScopePasses(density, alpha, scale, declared, progress)
    job.stream = stream
    job.proj_scales = proj_scales
    return names, excluded, work_names, job




# ---------------------------------------------------------------------------------------------
# option checks
# ---------------------------------------------------------------------------------------------
def check_density(density: Any) -> float:
    """``density`` as a float in (0, 1], or :class:`EncodeError`.

    >>> check_density(0.1)
    0.1
    """
    if isinstance(density, bool) or not isinstance(density, (int, float, np.integer, np.floating)):
        raise EncodeError(f"density must be a number in (0, 1], got {density!r}")
    d = float(density)
    if not (0.0 < d <= 1.0):  # also rejects NaN
        raise EncodeError(f"density must be in (0, 1], got {d!r}")
    return d


def check_alpha(alpha: Any) -> float:
    """``alpha`` as a finite float > 0, or :class:`EncodeError`.

    >>> check_alpha(2)
    2.0
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)):
        raise EncodeError(f"alpha must be a finite number > 0, got {alpha!r}")
    a = float(alpha)
    if not (math.isfinite(a) and a > 0.0):
        raise EncodeError(f"alpha must be a finite number > 0, got {a!r}")
    return a


def check_choice(what: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else :class:`EncodeError` naming ``what``.

    >>> check_choice("scope", "global", ("global", "tensor"))
    'global'
    """
    if value not in choices:
        raise EncodeError(f"{what} must be one of {choices}, got {value!r}")
    return value
