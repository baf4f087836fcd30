"""ComPEFT compression: task vectors to sparse ternary tensors (top-k, sign, one scale).

:func:`compress` keeps the ``round(density * n)`` entries of largest magnitude of a task
vector, stores only their signs and replaces every kept magnitude with one scale (spec and
paper: ``alpha * sigma(tau) * sign(topk(tau))``). The selection is exact (the same entries as
a full sort with the documented tie rule) and streams over the tensors: the model is never
concatenated, and a tensor is read a few times, one at a time, in chunks.

The exact top-k selection and its chunk kernels live in :mod:`compeft_format.selection`,
the scale rules in :mod:`compeft_format.scales`; this module runs the passes over a scope.

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
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import dtypes as _dt
from . import kernels as _kernels
from . import selection as _sel
from ._alloc import scratch
from ._spec import META_COMPRESSION, TERNARY_DTYPES
from .errors import EncodeError
from .lora_scale import LORA_SCALES
from .scales import (
    AUTO_SCALE,
    CAPPED,
    DEFAULT_SCALE,
    KEPT_SUM_SCALES,
    METRIC_SCALES,
    METRIC_TERMS,
    SCALE_CHOICES,
    SCALES,
    SWEEP_SCALES,
    RowBlocks,
    Stats,
    float32_scale,
    gram_terms,
    is_vector,
    kron_terms,
    resolve_scale,
    scale_value,
)
from .selection import CHUNK, THREADS_ENV, TopK, compress_threads, select_topk
from .tensor import TernaryTensor

__all__ = [
    "AUTO_SCALE",
    "COMPRESSION_METADATA_KEY",
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
SCOPES = ("global", "tensor", "role")


class ChunkedValues:
    """A tensor's float values made on demand, a slice at a time, never held whole.

    :func:`compress` and :func:`iter_compress` take it wherever they take an array (e.g. a
    fine-tuned tensor minus its base, computed from two memory-mapped files:
    :class:`~compeft_format.plan.FileTaskVector` hands these out). ``chunk(start, stop)``
    returns the flat values ``start:stop`` and ``take(indices)`` those at flat indices, as
    ``dtype`` (float32 or float64); both may be called from several threads at once.

    >>> x = np.arange(6, dtype=np.float32) - 2
    >>> v = ChunkedValues((2, 3), np.float32, lambda a, z: x[a:z], lambda i: x[i])
    >>> compress({"t": v}, density=0.5)["t"].indices.tolist()
    [0, 4, 5]
    >>> np.asarray(v).tolist()  # the whole tensor, where an array is needed
    [[-2.0, -1.0, 0.0], [1.0, 2.0, 3.0]]
    """

    def __init__(self, shape: tuple[int, ...], dtype: Any,
                 chunk: Callable[[int, int], np.ndarray],
                 take: Callable[[np.ndarray], np.ndarray]) -> None:
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise EncodeError(f"ChunkedValues must be float32 or float64, got {self.dtype}")
        self.size = math.prod(self.shape)
        self.chunk = chunk
        self.take = take

    @property
    def dtype_name(self) -> str:
        """``"F32"`` or ``"F64"``."""
        return "F64" if self.dtype == np.float64 else "F32"

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self.shape)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """The whole tensor, for code that needs an array (``np.asarray(values)``)."""
        out = np.empty(self.size, self.dtype)
        for start in range(0, self.size, CHUNK):
            stop = min(self.size, start + CHUNK)
            out[start:stop] = self.chunk(start, stop)
        out = out.reshape(self.shape)
        return out if dtype is None else out.astype(dtype, copy=False)



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
) -> tuple[list[str], set[str], list[str], _Job]:
    """Check the options; return the names, the excluded ones, the sorted rest and the job."""
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
    job = _Job(density, alpha, scale, declared, progress)
    job.stream = stream
    job.proj_scales = proj_scales
    return names, excluded, work_names, job


@dataclass
class _Meta:
    """What pass 1 learns about a tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # output dtype name
    numel: int
    absmax: float = 0.0  # largest |value| (recorded for the capped scales only)


class _Job:
    """The passes of one compression over one scope (sample, statistics, output)."""

    def __init__(
        self,
        density: float,
        alpha: float,
        scale: str,
        declared: Mapping[str, Any],
        progress: Callable[[str], Any] | None,
    ) -> None:
        self.density = density
        self.alpha = alpha
        self.scale = scale
        self.declared = declared
        self.progress = progress
        #: set by iter_compress: hold one output tensor at a time, at the cost of one more
        #: pass for the scales that need the sum of the kept magnitudes (see _pass3)
        self.stream = False
        self._gram_sums = [0.0, 0.0]  # "gram", "kron": summed metric terms of the matrices
        #: the compiled kernels for this scope's size, or None (numpy); same output either way
        self.kernels: _kernels.Kernels | None = None
        #: given (compress's ``proj_scales``): filled with each tensor's scope's "proj" scale
        #: under the metric rules, whose scale is not proj's
        self.proj_scales: dict[str, float] | None = None

    # -- reading ---------------------------------------------------------------------------
    def _read(self, name: str, value: Any) -> tuple[np.ndarray, str]:
        """Return the flat storage array and storage dtype name; reject non-float data.

        A :class:`ChunkedValues` stays as it is (its values are read by :meth:`_chunk`)."""
        if isinstance(value, ChunkedValues):
            return value, value.dtype_name  # type: ignore[return-value]
        try:
            storage, dname = _dt.to_storage(value)
        except EncodeError as exc:
            raise EncodeError(exc.message, tensor=name) from None
        if dname not in TERNARY_DTYPES:
            raise EncodeError(
                f"dtype {dname} is not a float dtype {TERNARY_DTYPES}; exclude it "
                "(exclude=[...]) to keep it dense",
                tensor=name,
            )
        return storage.reshape(-1), dname

    @staticmethod
    def _chunk(flat: np.ndarray, dname: str, work: np.dtype, start: int) -> np.ndarray:
        """The chunk at ``start``, widened to the work dtype (exact)."""
        if isinstance(flat, ChunkedValues):
            c = flat.chunk(start, min(flat.size, start + CHUNK))
            return c if c.dtype == work else c.astype(work)
        c = _dt.to_numpy_values(flat[start : start + CHUNK], dname)
        return c if c.dtype == work else c.astype(work)

    @classmethod
    def _chunks(cls, flat: np.ndarray, dname: str, work: np.dtype
                ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, values)`` chunks widened to the work dtype (exact)."""
        for start in range(0, flat.size, CHUNK):
            yield start, cls._chunk(flat, dname, work, start)

    # -- the passes ------------------------------------------------------------------------
    # Per-tensor work lives in helper methods so that every view of a tensor dies when the
    # helper returns: the next tensor is only fetched once the previous one is unreachable.
    def run(self, names: list[str], fetch: Callable[[str], Any]) -> dict[str, TernaryTensor]:
        """Compress the scope ``names`` (sorted), fetching values with ``fetch(name)``."""
        return dict(self.iter_run(names, fetch))

    def iter_run(
        self, names: list[str], fetch: Callable[[str], Any]
    ) -> Iterator[tuple[str, TernaryTensor]]:
        """:meth:`run`, yielding each tensor as soon as it is built (in ``names`` order).

        The sample comes first (it only steers the speed), so that pass 1 finds the band
        while it adds up the statistics; :func:`compress` also keeps the candidates' positions
        then (:class:`~compeft_format.selection.Candidates`), and builds the output from them.
        """
        metas: list[_Meta] = []
        rng = np.random.default_rng(_sel.SAMPLE_SEED)
        samples = [self._sample_tensor(name, fetch, rng, metas) for name in names]
        n = sum(meta.numel for meta in metas)
        work = np.dtype(np.float64 if any(s.dtype == np.float64 for s in samples) else np.float32)
        sample = np.concatenate([np.empty(0, work)] + [s.astype(work) for s in samples])
        del samples
        k = min(n, max(1, round(self.density * n))) if n else 0
        stats = Stats(need_std=self.scale == "std")
        found = None
        if n:
            lo_open, hi = _sel.band_edges(sample, n, k, work)
            cap = _sel.band_cap(n)
            self.kernels = _kernels.for_size(n, streaming=self.stream)
            found = _sel.Candidates(lo_open, hi, cap, positions=not self.stream, limit=k + cap,
                                    kernels=self.kernels)
        del sample
        for meta in metas:
            self._pass1_tensor(meta, fetch, stats, work, found)
        buf = np.empty(min(CHUNK, max(n, 1)), dtype=work)

        def mags() -> Iterator[np.ndarray]:
            for meta in metas:
                if meta.numel:
                    yield from self._tensor_mags(meta.name, fetch, work, buf)

        if found is None:
            top = TopK(math.inf, 0, 0)
        else:
            top = _sel.from_band(found.band.result(), k, found.lo_open)
            if top is None:  # an unlucky sample: exact, at the cost of more passes
                t, greater = _sel.radix_select(mags, k, work)
                top = _sel.topk_of(t, greater, k)
        if found is not None and found.hold(top):
            yield from self._from_candidates(metas, fetch, top, stats, work, found)
        else:
            yield from self._pass3(metas, fetch, top, stats, work, buf)

    def run_one(self, name: str, tensors: Mapping[str, Any]) -> dict[str, TernaryTensor]:
        """Compress one tensor on its own; it is fetched once and held for the passes."""
        return dict(self.iter_run_one(name, tensors))

    def iter_run_one(
        self, name: str, tensors: Mapping[str, Any]
    ) -> Iterator[tuple[str, TernaryTensor]]:
        """:meth:`run_one`, as a generator."""
        value = tensors[name]
        yield from self.iter_run([name], lambda _name: value)

    def _sample_tensor(
        self, name: str, fetch: Callable[[str], Any], rng: np.random.Generator,
        metas: list[_Meta],
    ) -> np.ndarray:
        """Record shape and dtype; return a sample of the magnitudes (one in 256, at random
        positions with replacement) in the tensor's native float dtype."""
        value = fetch(name)
        flat, dname = self._read(name, value)
        out_dtype = self.declared.get(name, dname)
        if out_dtype not in TERNARY_DTYPES:
            out_dtype = dname
        metas.append(_Meta(name, _shape_of(value), out_dtype, int(flat.size)))
        native = np.dtype(np.float64 if dname == "F64" else np.float32)
        if not flat.size:
            return np.empty(0, native)
        where = rng.integers(0, flat.size, size=-(-flat.size // _sel.SAMPLE_EVERY))
        picked = flat.take(where) if isinstance(flat, ChunkedValues) else flat[where]
        # a non-finite value here only makes the band useless; pass 1 rejects it by name
        with np.errstate(invalid="ignore"):
            return np.abs(_dt.to_numpy_values(picked, dname)).astype(native, copy=False)

    def _pass1_tensor(
        self,
        meta: _Meta,
        fetch: Callable[[str], Any],
        stats: Stats,
        work: np.dtype,
        found: _sel.Candidates | None,
    ) -> None:
        """Check finiteness, add to the statistics and to ``found`` (the band and the
        candidates), chunk by chunk on all cores, while each chunk is in cache."""
        name = meta.name
        flat, dname = self._read(name, fetch(name))
        native = np.dtype(np.float64 if dname == "F64" else np.float32)
        track_max = self.scale in CAPPED and is_vector(meta.shape)
        starts = range(0, flat.size, CHUNK)

        kern = self.kernels if not stats.need_std else None

        def part(start: int) -> tuple[float, Any, Any]:
            c = self._chunk(flat, dname, native, start)
            s2 = kern.sumsq(c) if kern is not None else None
            if s2 is None:
                sums = stats.part(c)
            else:  # what Stats.part returns without need_std, from the compiled sum
                sums = (c.size, s2, 0.0, 0.0) if math.isfinite(s2) else None
            if sums is None:  # not finite: reported in order below
                return 0.0, None, None
            cw = c if native == work else c.astype(work)
            got = found.chunk(cw, start) if found is not None else None
            peak = 0.0
            if track_max and c.size:
                if got is not None and got[0] is not None and got[0][1].size:
                    # the largest |value| is among the candidates whenever there are any
                    peak = float(got[0][1].max())
                else:  # without a temporary |c|
                    peak = max(float(c.max()), -float(c.min()))
            return peak, sums, got

        for start, (peak, sums, got) in zip(starts, _sel.ordered_map(part, starts), strict=True):
            meta.absmax = max(meta.absmax, peak)
            if sums is not None:
                stats.merge(sums)
                if found is not None:
                    found.merge(name, got)
            else:
                c = self._chunk(flat, dname, native, start)
                bad = np.flatnonzero(~np.isfinite(c))
                if bad.size:
                    raise EncodeError(
                        f"value {c[bad[0]]!r} at flat index {start + int(bad[0])} is not "
                        "finite; a task vector must be finite",
                        tensor=name,
                    )
                raise EncodeError(
                    "sum of squares overflows float64 (values near 1e154 or above)", tensor=name
                )

    def _tensor_mags(
        self, name: str, fetch: Callable[[str], Any], work: np.dtype, buf: np.ndarray
    ) -> Iterator[np.ndarray]:
        """Yield the magnitudes of one tensor, chunk by chunk, in ``buf``."""
        flat, dname = self._read(name, fetch(name))
        for _, c in self._chunks(flat, dname, work):
            yield np.abs(c, out=buf[: c.size])

    def _pass3(
        self,
        metas: list[_Meta],
        fetch: Callable[[str], Any],
        top: TopK,
        stats: Stats,
        work: np.dtype,
        buf: np.ndarray,
    ) -> Iterator[tuple[str, TernaryTensor]]:
        """Find the final scale, then build and yield the tensors one at a time.

        ``"norm"`` and ``"std"`` are known from pass 1: each tensor is gathered when it is
        yielded, so only that one is held. The other scales need the sum of every kept
        magnitude first. With :attr:`stream` set (:func:`iter_compress`), a pass of its own
        computes it, gathering exactly as the output pass does (same order, same ties, so
        the same sum); otherwise (:func:`compress`, which holds every output anyway, and
        reads each tensor at most three times) the positions and signs of all tensors are
        gathered together with the sum and held until the scale is known.
        """
        t = work.type(top.threshold)
        kept_sum = 0.0  # float64 sum of the kept magnitudes
        gram = self._gram_sums = [0.0, 0.0]  # "gram", "kron": summed terms, the matrices
        held: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if top.kept and self.scale not in ("norm", "std"):
            ties_left = top.n_ties
            for meta in metas:
                if meta.numel:
                    idx, signs, ties_left, part_sum = self._gather(
                        meta.name, fetch, t, ties_left, work, buf, gram_of=meta
                    )
                    kept_sum += part_sum
                    if not self.stream:
                        held[meta.name] = (idx, signs)
                    del idx, signs
        value = self._scale_value(top.kept, kept_sum, stats, metas, (gram[0], gram[1]))
        ties_left = top.n_ties
        for meta in metas:
            part = held.pop(meta.name, None)
            if value == 0.0 or not meta.numel or top.kept == 0:
                out = TernaryTensor.zeros(meta.shape, meta.dtype)
            else:
                if part is None:
                    idx, signs, ties_left, _ = self._gather(
                        meta.name, fetch, t, ties_left, work, buf
                    )
                else:
                    idx, signs = part
                out = TernaryTensor(
                    meta.shape, idx, signs, self._tensor_scale(value, meta), meta.dtype,
                    _validated=True,
                )
                del idx, signs
            del part
            if self.progress is not None:
                self.progress(meta.name)
            yield meta.name, out
            del out

    def _from_candidates(
        self,
        metas: list[_Meta],
        fetch: Callable[[str], Any],
        top: TopK,
        stats: Stats,
        work: np.dtype,
        found: _sel.Candidates,
    ) -> Iterator[tuple[str, TernaryTensor]]:
        """:meth:`_pass3` from the candidates of pass 1 instead of another pass over the data.

        Each chunk's kept entries are picked from its candidates, which are in position order
        and hold every entry equal to the threshold: the same positions, signs and kept
        magnitude sums (chunk by chunk, in the same order) as :meth:`_gather`, so the same
        output bytes. ``"gram"`` (``"kron"``) reads each matrix once more for its
        :func:`gram_terms` (:func:`kron_terms`).
        """
        t = work.type(top.threshold)
        want_sum = self.scale in KEPT_SUM_SCALES
        kept_sum = 0.0
        gram = self._gram_sums = [0.0, 0.0]
        held: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        ties_left = top.n_ties
        for meta in metas:
            parts = found.parts.pop(meta.name, [])
            if not top.kept or not meta.numel:
                continue
            idx, signs, ties_left, part_sum = self._pick(parts, t, ties_left, want_sum)
            del parts
            kept_sum += part_sum
            if self.scale in METRIC_TERMS and idx.size and not is_vector(meta.shape):
                flat, dname = self._read(meta.name, fetch(meta.name))
                values = _metric_matrix(flat, dname, meta.shape[0], self.scale)
                num, den = METRIC_TERMS[self.scale](values, idx, signs)
                del flat, values
                gram[0] += num
                gram[1] += den
            held[meta.name] = (idx, signs)
        value = self._scale_value(top.kept, kept_sum, stats, metas, (gram[0], gram[1]))
        for meta in metas:
            part = held.pop(meta.name, None)
            if value == 0.0 or part is None:
                out = TernaryTensor.zeros(meta.shape, meta.dtype)
            else:
                out = TernaryTensor(
                    meta.shape, part[0], part[1], self._tensor_scale(value, meta), meta.dtype,
                    _validated=True,
                )
            del part
            if self.progress is not None:
                self.progress(meta.name)
            yield meta.name, out
            del out

    def _pick(
        self, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], t: Any, ties_left: int,
        want_sum: bool,
    ) -> tuple[np.ndarray, np.ndarray, int, float]:
        """:meth:`_gather` of one tensor from its candidates ``(positions, magnitudes, sign
        bits)``, chunk by chunk on all cores: which to keep (the ties in order), then each
        chunk's kept entries straight into their slice of the output."""
        if self.kernels is not None:
            return self._pick_compiled(self.kernels, parts, t, ties_left, want_sum)
        find_ties = ties_left > 0

        def mark(i: int) -> tuple[np.ndarray, int, np.ndarray | None]:
            """A chunk's mask of the candidates above ``t``, its count, and where ``t`` is."""
            m = parts[i][1]
            sel = m > t
            eq = None
            if find_ties:
                at = m == t
                eq = np.flatnonzero(at) if at.any() else None
            return sel, int(np.count_nonzero(sel)), eq

        items = range(len(parts))
        sels: list[np.ndarray] = []
        ends = [0]
        for sel, count, eq in _sel.ordered_map(mark, items):
            if ties_left and eq is not None:  # first come, first kept
                took = eq[:ties_left]
                sel[took] = True
                ties_left -= took.size
                count += took.size
            sels.append(sel)
            ends.append(ends[-1] + count)
        idx = np.empty(ends[-1], np.int64)
        signs = np.empty(ends[-1], bool)

        def fill(i: int) -> float:
            """Write a chunk's kept positions and signs; return the sum of their magnitudes,
            summed as _gather sums them (the kept magnitudes in position order)."""
            a, b = ends[i], ends[i + 1]
            if b == a:
                return 0.0
            pos, m, neg = parts[i]
            loc = np.flatnonzero(sels[i])
            # mode "wrap": the indices are valid, and "raise" buffers a take with out=
            np.take(pos, loc, out=idx[a:b], mode="wrap")
            np.take(neg, loc, out=signs[a:b], mode="wrap")
            return float(m.take(loc).sum(dtype=np.float64)) if want_sum else 0.0

        kept_sum = 0.0
        for part in _sel.ordered_map(fill, items):
            kept_sum += part
        return idx, signs, ties_left, kept_sum

    @staticmethod
    def _pick_compiled(
        kern: _kernels.Kernels, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
        t: Any, ties_left: int, want_sum: bool,
    ) -> tuple[np.ndarray, np.ndarray, int, float]:
        """:meth:`_pick` with the compiled kernels: each chunk's counts above and at ``t``,
        the ties handed out in order, then each chunk's kept entries into their slice; the
        kept magnitudes are summed by numpy, as :meth:`_pick` sums them."""
        items = range(len(parts))
        ties: list[int] = []
        ends = [0]
        for greater, equal in _sel.ordered_map(lambda i: kern.count_at(parts[i][1], t), items):
            took = min(equal, ties_left)  # first come, first kept
            ties_left -= took
            ties.append(took)
            ends.append(ends[-1] + greater + took)
        idx = np.empty(ends[-1], np.int64)
        signs = np.empty(ends[-1], bool)

        def fill(i: int) -> float:
            a, b = ends[i], ends[i + 1]
            if b == a:
                return 0.0
            pos, m, neg = parts[i]
            kept = kern.fill_kept(pos, m, neg, t, ties[i], idx[a:b], signs[a:b])
            return float(kept.sum(dtype=np.float64)) if want_sum else 0.0

        kept_sum = 0.0
        for part in _sel.ordered_map(fill, items):
            kept_sum += part
        return idx, signs, ties_left, kept_sum

    def _gather(
        self,
        name: str,
        fetch: Callable[[str], Any],
        t: Any,
        ties_left: int,
        work: np.dtype,
        buf: np.ndarray,
        gram_of: _Meta | None = None,
    ) -> tuple[np.ndarray, np.ndarray, int, float]:
        """Kept flat indices and signs of one tensor; ties are taken first come, first kept.

        With ``gram_of`` (its meta) and ``scale="gram"`` or ``"kron"``, a matrix's
        :func:`gram_terms` or :func:`kron_terms` are added to ``self._gram_sums`` from the
        same read.
        """
        flat, dname = self._read(name, fetch(name))
        idx_parts: list[np.ndarray] = []
        sign_parts: list[np.ndarray] = []
        kept_sum = 0.0
        want_sum = self.scale in KEPT_SUM_SCALES
        find_ties = ties_left > 0

        kern = self.kernels

        def one(start: int, ties: int = 0) -> tuple[np.ndarray, np.ndarray, float, int, bool]:
            """A chunk's kept positions, signs, magnitude sum, ties taken, ties seen."""
            c = self._chunk(flat, dname, work, start)
            if kern is not None and kern.fits(c) and t > 0:  # one compiled loop, same result
                loc, neg, kept, took, seen = kern.gather(c, t, ties, find_ties)
                part = float(kept.sum(dtype=np.float64)) if want_sum and loc.size else 0.0
                return loc, neg, part, took, bool(find_ties and not ties and seen)
            m = np.abs(c, out=scratch(c.size, work))
            sel = m > t
            took = 0
            if ties:
                eq = np.flatnonzero(m == t)[:ties]
                sel[eq] = True
                took = eq.size
            loc = np.flatnonzero(sel)
            part = float(m[loc].sum(dtype=np.float64)) if want_sum and loc.size else 0.0
            tied = bool(find_ties and not ties and (m == t).any())
            return loc, np.signbit(c[loc]), part, took, tied

        # the chunks on all cores; which ties are kept depends on the chunks before, so a
        # chunk holding one is done again, in order, with the ties still to take
        starts = range(0, flat.size, CHUNK)
        for start, got in zip(starts, _sel.ordered_map(one, starts), strict=True):
            if ties_left and got[4]:
                got = one(start, ties_left)
            loc, signs, part, took, _ = got
            ties_left -= took
            if loc.size:
                idx_parts.append(loc + start)
                sign_parts.append(signs)
                kept_sum += part
        idx = np.concatenate(idx_parts) if idx_parts else np.empty(0, np.int64)
        signs = np.concatenate(sign_parts) if sign_parts else np.empty(0, bool)
        if (gram_of is not None and self.scale in METRIC_TERMS and idx.size
                and not is_vector(gram_of.shape)):
            matrix = _metric_matrix(flat, dname, gram_of.shape[0], self.scale)
            num, den = METRIC_TERMS[self.scale](matrix, idx, signs)
            self._gram_sums[0] += num
            self._gram_sums[1] += den
        return idx, signs, ties_left, kept_sum

    def _tensor_scale(self, value: float, meta: _Meta) -> float:
        """The scale of one tensor: the scope's, or for ``"proj_vcap"`` a vector's own cap.

        The cap ``alpha * max|t|`` is taken only where it is below the scope's scale, so the
        overflow checks of that scale cover it; rounding to float32 is monotonic, so the min
        of the rounded values is the rounded min.
        """
        if self.scale not in CAPPED or not is_vector(meta.shape):
            return value
        return min(value, float(np.float32(self.alpha * meta.absmax)))

    def _scale_value(self, kept: int, kept_sum: float, stats: Stats, metas: list[_Meta],
                     gram: tuple[float, float] = (0.0, 0.0)) -> float:
        """The scope's scale (:func:`~compeft_format.scales.scale_value`); under a metric
        rule, its ``"proj"`` scale goes to :attr:`proj_scales` too."""
        tensors = [(m.name, m.dtype, m.numel) for m in metas]
        if self.proj_scales is not None and self.scale in METRIC_TERMS:
            try:  # the same sums give it; one that overflows a dtype is left out
                proj = scale_value("proj", self.alpha, kept, kept_sum, stats, tensors)
            except EncodeError:
                proj = None
            if proj is not None:
                self.proj_scales.update((m.name, proj) for m in metas)
        return scale_value(self.scale, self.alpha, kept, kept_sum, stats, tensors, gram)


def _metric_matrix(flat: Any, dname: str, rows: int, scale: str) -> np.ndarray | RowBlocks:
    """A matrix's values for :data:`METRIC_TERMS`: for ``"kron_sketch"``, whenever the values
    are not float32 or float64 in memory already (made on demand, or stored as BF16, F16,
    F8), a :class:`RowBlocks` that makes them a block of rows at a time, so that the rule
    needs no float32 copy of the matrix; else the whole array (``"kron"`` and ``"gram"``
    decompose it anyway)."""
    numel = flat.size
    cols = numel // rows if rows else 0
    if scale == "kron_sketch" and isinstance(flat, ChunkedValues):
        return RowBlocks((rows, cols), flat.dtype,
                         lambda a, z: flat.chunk(a * cols, z * cols).reshape(z - a, cols),
                         flat.take)
    if scale == "kron_sketch" and np.dtype(flat.dtype) not in (np.float32, np.float64):
        store = flat.reshape(-1)
        return RowBlocks((rows, cols), np.float32,
                         lambda a, z: _dt.to_numpy_values(store[a * cols : z * cols], dname
                                                          ).reshape(z - a, cols),
                         lambda i: _dt.to_numpy_values(store[i], dname))
    values = np.asarray(flat) if isinstance(flat, ChunkedValues) else _dt.to_numpy_values(
        flat, dname)
    return values.reshape(rows, -1)


def _shape_of(value: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in (value.shape if hasattr(value, "shape") else np.shape(value)))



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
