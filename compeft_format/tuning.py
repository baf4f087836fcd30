"""Tuning density and ``alpha`` against your own evaluation of the rebuilt model.

:func:`tune` searches the density and ``alpha`` against a score that *you* compute on the
rebuilt model (higher is better), optionally within a size budget, and returns the best
setting, every score and the chosen compressed tensors; :func:`tune_file` does it for a file
or adapter directory with an evaluation command (``compeft tune``). Each candidate is
measured as a sweep point is (:func:`compeft_format.sweep.measure_setting`); the sweep's
names are re-exported here (:func:`sweep`, :func:`count_file_bytes`, ...), where users of
earlier versions found them.

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> tv = {"w": rng.normal(size=(64, 64)).astype(np.float32)}
>>> def score(rebuilt):  # your evaluation; here: how close the rebuilt tensor is
...     return -float(np.linalg.norm(rebuilt["w"] - tv["w"]))
>>> result = tune(tv, score, densities=[0.05, 0.2], alphas=[0.8, 1.0])
>>> result.best.density, len(result.candidates)
(0.2, 4)
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import _spec as S
from .compress import (
    DEFAULT_SCALE,
    SCALE_CHOICES,
    check_choice,
    compression_metadata,
)
from .errors import CompeftError, EncodeError
from .scales import resolve_scale
from .sweep import (
    DEFAULT_DENSITIES,
    SweepPoint,
    SweepResult,
    SweepSource,
    check_list,
    count_file_bytes,
    measure_setting,
    sweep,
    sweep_file,
    text_table,
)
from .taskvec import apply_task_vector
from .tensor import TernaryTensor

# the sweep's names are re-exported: users found them here before the sweep had its module
__all__ = [
    "CHECKPOINT_PLACEHOLDER",
    "DEFAULT_ALPHAS",
    "DEFAULT_DENSITIES",
    "TUNING_METADATA_KEY",
    "Candidate",
    "SweepPoint",
    "SweepResult",
    "TuneError",
    "TuneResult",
    "count_file_bytes",
    "run_eval_command",
    "sweep",
    "sweep_file",
    "tune",
    "tune_file",
]

#: Alphas :func:`tune` tries when none are given: around the default scale, whose best
#: alpha was 0.93 to 1.17 in the measurements of :func:`~compeft_format.compress.compress`.
DEFAULT_ALPHAS = (0.7, 0.85, 1.0, 1.1, 1.2, 1.35, 1.5)


class TuneError(CompeftError):
    """A search that cannot go on: a bad score, no candidate within the budget."""


# ---------------------------------------------------------------------------------------------
# tune
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """One setting tried by a search.

    Attributes
    ----------
    density, alpha, scale, scope:
        The setting.
    file_bytes, numel:
        Size of its file and elements of its tensors.
    score:
        What the evaluation returned (higher is better); None when not evaluated.
    status:
        ``"scored"``, or ``"over budget"`` (not evaluated).
    """

    density: float
    alpha: float
    scale: str
    scope: str
    file_bytes: int
    numel: int
    score: float | None
    status: str = "scored"

    @property
    def bits_per_param(self) -> float:
        """File bits per element."""
        return 8 * self.file_bytes / self.numel if self.numel else 0.0

    def label(self) -> str:
        """A short name for messages: ``density 0.1, alpha 1.2 (proj_vcap, global)``."""
        return f"density {self.density:g}, alpha {self.alpha:g} ({self.scale}, {self.scope})"

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict."""
        return {"density": self.density, "alpha": self.alpha, "scale": self.scale,
                "scope": self.scope, "file_bytes": self.file_bytes,
                "bits_per_param": self.bits_per_param, "score": self.score,
                "status": self.status}


@dataclass(frozen=True)
class TuneResult:
    """What :func:`tune` found.

    Attributes
    ----------
    best:
        The chosen candidate: the best score (within the budget, if any); ties go to
        alpha 1, then to the smaller file, then to the earlier candidate.
    candidates:
        Every candidate, in the order tried (density by density, alpha by alpha).
    compressed:
        The compressed tensors of the chosen setting (as
        :func:`~compeft_format.compress.compress` returns them); empty from the command.
    budget_bits_per_param:
        The size budget, or None.
    """

    best: Candidate
    candidates: tuple[Candidate, ...]
    compressed: dict[str, Any] = field(repr=False, default_factory=dict)
    budget_bits_per_param: float | None = None

    def record(self) -> dict[str, Any]:
        """The search as JSON-safe file metadata (``compeft tune`` stores it as ``"tuning"``)."""
        return {
            "chosen": {"density": self.best.density, "alpha": self.best.alpha,
                       "scale": self.best.scale, "scope": self.best.scope,
                       "score": self.best.score},
            "budget_bits_per_param": self.budget_bits_per_param,
            "rule": "best score" + (" within the budget" if self.budget_bits_per_param
                                    is not None else ""),
            "candidates": [
                {"density": c.density, "alpha": c.alpha, "file_bytes": c.file_bytes,
                 "bits_per_param": round(c.bits_per_param, 6), "score": c.score}
                for c in self.candidates
            ],
        }

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict: the chosen candidate and every candidate."""
        return {"best": self.best.to_dict(), "budget_bits_per_param": self.budget_bits_per_param,
                "candidates": [c.to_dict() for c in self.candidates]}

    def format_table(self) -> str:
        """Return a plain-text table of the candidates; the chosen one is marked ``*``."""
        header = ("", "density", "alpha", "bytes", "bits/param", "score")
        rows = [
            ("*" if c is self.best else "", f"{c.density:.4f}", f"{c.alpha:.3f}",
             f"{c.file_bytes:,}", f"{c.bits_per_param:.4f}",
             c.status if c.score is None else f"{c.score:.6g}")
            for c in self.candidates
        ]
        return text_table(header, rows)


def _grid(densities: Iterable[float], alphas: Iterable[float],
          budget: float | None) -> tuple[list[float], list[float], float | None]:
    from .compress import check_alpha, check_density

    ds = check_list("densities", densities, check_density)
    alist = check_list("alphas", alphas, check_alpha)
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not (
                math.isfinite(budget) and budget > 0):
            raise EncodeError(f"budget_bits_per_param must be a number > 0, got {budget!r}")
        budget = float(budget)
    return ds, alist, budget


def _check_score(value: Any, cand: Candidate) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TuneError(f"candidate {cand.label()}: the evaluation returned {value!r}, "
                        "not a number")
    score = float(value)
    if not math.isfinite(score):
        raise TuneError(f"candidate {cand.label()}: the evaluation returned {score!r}")
    return score


def _search(
    grid: Iterable[tuple[float, float]],
    *,
    scale: str,
    scope: str,
    budget: float | None,
    measure: Callable[[float, float], tuple[int, int, Any]],
    evaluate: Callable[[Any, Candidate], Any],
    progress: Callable[[Candidate], Any] | None,
) -> tuple[list[Candidate], int, Any]:
    """Try every ``(density, alpha)``; return the candidates, the chosen index and its payload.

    ``measure(d, a)`` compresses and returns ``(file_bytes, numel, payload)``;
    ``evaluate(payload, candidate)`` returns the score. A candidate over the budget is not
    evaluated. Only the best payload so far is kept.
    """
    cands: list[Candidate] = []
    best_i, best_key, best_payload = -1, None, None
    for d, a in grid:
        size, numel, payload = measure(d, a)
        cand = Candidate(d, a, scale, scope, size, numel, None)
        if budget is not None and cand.bits_per_param > budget:
            cand = Candidate(d, a, scale, scope, size, numel, None, "over budget")
        else:
            cand = Candidate(d, a, scale, scope, size, numel,
                             _check_score(evaluate(payload, cand), cand))
            # ties: alpha 1 (the scale rule as it is, no tuning needed), then the smaller
            # file, then the earlier candidate
            key = (cand.score, a == 1.0, -size)
            if best_key is None or key > best_key:
                best_i, best_key, best_payload = len(cands), key, payload
        del payload
        cands.append(cand)
        if progress is not None:
            progress(cand)
    if best_i < 0:
        smallest = min(cands, key=lambda c: c.file_bytes)
        raise TuneError(f"no candidate fits the budget of {budget:g} bits per parameter; "
                        f"the smallest, {smallest.label()}, takes "
                        f"{smallest.bits_per_param:.4f}")
    return cands, best_i, best_payload


def tune(
    tensors: Mapping[str, Any],
    evaluate: Callable[[dict[str, Any]], float],
    *,
    base: Mapping[str, Any] | None = None,
    densities: Iterable[float] = (0.1,),
    alphas: Iterable[float] = DEFAULT_ALPHAS,
    scale: str = DEFAULT_SCALE,
    scope: str = "global",
    budget_bits_per_param: float | None = None,
    exclude: str | Iterable[str] = (),
    metadata: Mapping[str, Any] | Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
    positions: str = "auto",
    zstd_level: int | None = S.DEFAULT_ZSTD_LEVEL,
    progress: Callable[[Candidate], Any] | None = None,
) -> TuneResult:
    """Choose the density and alpha that score best on your own evaluation.

    Every ``(density, alpha)`` is compressed with
    :func:`~compeft_format.compress.compress`; its file size is counted (as in
    :func:`sweep`); if it fits the budget, the task vector is rebuilt and passed to
    ``evaluate``. The chosen setting is the one with the best score (within the budget);
    ties go to alpha 1, then to the smaller file, then to the earlier candidate.

    Parameters
    ----------
    tensors:
        The task vector (see :func:`~compeft_format.compress.compress`).
    evaluate:
        Called once per candidate with the rebuilt tensors, name -> numpy array (the
        decoded task vector; with ``base``, the full checkpoint ``base + task vector``,
        every base tensor, as :func:`~compeft_format.taskvec.apply_task_vector` returns
        it); returns a finite number, higher is better. Its exceptions propagate.
    base:
        The base checkpoint, or None.
    densities, alphas:
        The grid: every density with every alpha (``alphas`` multiplies ``scale``'s scale).
    scale, scope, exclude:
        As :func:`~compeft_format.compress.compress`.
    budget_bits_per_param:
        If given, candidates whose file takes more bits per parameter are not evaluated,
        and the choice is among the others.
    metadata, positions, zstd_level:
        The file the sizes are counted for, as in :func:`sweep`.
    progress:
        Called with each :class:`Candidate` when it is done.

    Returns
    -------
    TuneResult
        The chosen candidate, all candidates, and the chosen compressed tensors.

    Raises
    ------
    TuneError
        ``evaluate`` returned something that is not a finite number (the candidate is
        named); no candidate fits the budget.
    EncodeError
        A bad option.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> tv = {"w": rng.normal(size=200)}
    >>> from compeft_format.compress import compress
    >>> target = 1.3 * compress(tv, density=0.1)["w"].to_numpy()  # a score peaked at 1.3
    >>> r = tune(tv, lambda t: -float(np.abs(t["w"] - target).sum()), alphas=[1.0, 1.3, 1.6])
    >>> r.best.alpha, [c.alpha for c in r.candidates]
    (1.3, [1.0, 1.3, 1.6])
    """
    ds, alist, budget = _grid(densities, alphas, budget_bits_per_param)
    scale = check_choice("scale", scale, SCALE_CHOICES)
    patterns = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    src = SweepSource(tensors, patterns)

    def measure(d: float, a: float) -> tuple[int, int, Any]:
        point, out = measure_setting(src, density=d, alpha=a, scope=scope, scale=scale,
                              metadata=metadata, positions=positions, zstd_level=zstd_level,
                              quality=False)
        return point.file_bytes, point.numel, out

    def run(out: dict[str, Any], cand: Candidate) -> Any:
        decoded = {n: v.to_numpy() if isinstance(v, TernaryTensor) else v
                   for n, v in out.items()}
        return evaluate(decoded if base is None else apply_task_vector(base, decoded))

    cands, best_i, best_out = _search(((d, a) for d in ds for a in alist), scale=scale,
                                      scope=scope, budget=budget, measure=measure,
                                      evaluate=run, progress=progress)
    return TuneResult(cands[best_i], tuple(cands), best_out, budget)



#: The placeholder of ``compeft tune --eval`` replaced by the candidate checkpoint's path.
CHECKPOINT_PLACEHOLDER = "{checkpoint}"


def run_eval_command(command: str, checkpoint: str | os.PathLike, *, label: str = "",
                     timeout: float | None = None) -> float:
    """Run ``command`` with ``{checkpoint}`` replaced (shell-quoted); return its score.

    The score is the number that ends the last non-empty line of the command's standard
    output (``0.93``, ``accuracy 0.93``). The command runs through the shell.

    Raises
    ------
    TuneError
        The command fails (exit status not 0; the message holds the last line of its
        standard error), times out, prints nothing, or its last line does not end with a
        finite number. ``label`` (the candidate) starts the message.

    Examples
    --------
    >>> import sys
    >>> run_eval_command(f"{sys.executable} -c 'print(\\"loss 3\\"); print(0.5)' {{checkpoint}}",
    ...                  "/tmp/x")
    0.5
    """
    where = f"candidate {label}: " if label else ""
    cmd = command.replace(CHECKPOINT_PLACEHOLDER, shlex.quote(os.fspath(checkpoint)))
    try:
        proc = subprocess.run(cmd, shell=True, capture_output=True, stdin=subprocess.DEVNULL,
                              text=True, errors="replace", timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise TuneError(f"{where}the evaluation command timed out after {timeout:g} s") from None
    if proc.returncode != 0:
        err = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        tail = f": {err[-1][:300]}" if err else ""
        raise TuneError(f"{where}the evaluation command failed with exit status "
                        f"{proc.returncode}{tail}")
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    if not lines:
        raise TuneError(f"{where}the evaluation command printed nothing; its last line must "
                        "be the score")
    token = lines[-1].split()[-1]
    try:
        score = float(token)
    except ValueError:
        score = math.nan
    if not math.isfinite(score):
        raise TuneError(f"{where}the last line of the evaluation command's output, "
                        f"{lines[-1][:200]!r}, does not end with a finite number (the score)")
    return score


def tune_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    command: str,
    *,
    base: str | os.PathLike | None = None,
    densities: Iterable[float] = (0.1,),
    alphas: Iterable[float] = DEFAULT_ALPHAS,
    scale: str = DEFAULT_SCALE,
    scope: str = "global",
    budget_bits_per_param: float | None = None,
    exclude: str | Iterable[str] = (),
    positions: str = "auto",
    zstd_level: int | None = S.DEFAULT_ZSTD_LEVEL,
    force: bool = False,
    timeout: float | None = None,
    progress: Callable[[Candidate], Any] | None = None,
) -> tuple[TuneResult, Any]:
    """Tune density and alpha with an evaluation command; write the chosen setting to ``dst``.

    Each candidate is compressed with :func:`~compeft_format.convert.compress_file` and
    restored with :func:`~compeft_format.convert.decompress_file` (``base`` added, when
    given) into a temporary checkpoint, exactly as ``compeft compress`` then ``compeft
    decompress`` would: a safetensors file, or a PEFT adapter directory for an adapter.
    ``command`` runs on it (see :func:`run_eval_command`) and the temporary files are
    removed. The chosen setting is compressed to ``dst`` with the search recorded in the
    file metadata under ``"tuning"``. Sizes are those of the candidate files, without that
    record (a few hundred bytes).

    Returns
    -------
    (TuneResult, CompressSummary)
        The search (its ``compressed`` is empty) and the summary of the file written.

    Raises
    ------
    TuneError
        A failing evaluation (named), no candidate within the budget. Nothing is written.
    """
    from . import convert as C

    ds, alist, budget = _grid(densities, alphas, budget_bits_per_param)
    compression_metadata(ds[0], alist[0], scope,  # check the options first
                         resolve_scale(check_choice("scale", scale, SCALE_CHOICES), ds[0]))
    if CHECKPOINT_PLACEHOLDER not in command:
        raise EncodeError(f"the evaluation command must contain {CHECKPOINT_PLACEHOLDER}, "
                          "replaced by the candidate checkpoint's path")
    from .outputs import Output
    from .sources import ADAPTER_WEIGHTS, base_weights, resolve_source

    source = resolve_source(src, ADAPTER_WEIGHTS, "tune reads a PEFT adapter's safetensors")
    # the output is checked before any evaluation (compress_file checks it again at the end):
    # an output that cannot be written would lose the whole search
    base_path = base_weights(base) if base is not None else None
    Output(dst, is_dir=source.is_dir, force=force,
           inputs=[source.path, source.weights, *([Path(base), base_path] if base_path else [])])
    opts = {"scale": scale, "scope": scope, "exclude": exclude, "base": base,
            "positions": positions, "zstd_level": zstd_level}
    with tempfile.TemporaryDirectory(prefix="compeft-tune-") as tmp:
        packed = Path(tmp) / ("compressed" if source.is_dir else "candidate.compeft")
        ckpt = Path(tmp) / ("checkpoint" if source.is_dir else "checkpoint.safetensors")

        def measure(d: float, a: float) -> tuple[int, int, Any]:
            s = C.compress_file(src, packed, density=d, alpha=a, force=True, **opts)
            return s.file_bytes, s.numel, None

        def evaluate(_payload: Any, cand: Candidate) -> float:
            C.decompress_file(packed, ckpt, base=base, force=True)
            try:
                return run_eval_command(command, ckpt, label=cand.label(), timeout=timeout)
            finally:
                _remove(ckpt)

        cands, best_i, _ = _search(((d, a) for d in ds for a in alist), scale=scale,
                                   scope=scope, budget=budget, measure=measure,
                                   evaluate=evaluate, progress=progress)
    result = TuneResult(cands[best_i], tuple(cands), {}, budget)
    record = {**result.record(), "eval": command}
    summary = C.compress_file(src, dst, density=result.best.density, alpha=result.best.alpha,
                              force=force, extra_metadata={TUNING_METADATA_KEY: record}, **opts)
    return result, summary


#: File metadata key under which ``compeft tune`` records its search.
TUNING_METADATA_KEY = "tuning"


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
