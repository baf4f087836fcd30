"""Experiment: do compressed experts merge as well as the originals, and what makes them?

Three LoRA experts (``bench/experts.py``: r = 8 on all attention and dense layers of
all-MiniLM-L6-v2, one shared initial adapter, three word-level tasks each with its own head)
are merged from their task vectors (adapter minus initial adapter, A and B alike), either the
originals or each expert compressed first (``compress``, global scope, default scale) at
densities 0.2, 0.1 and 0.05, with task arithmetic (``sum``) and TIES (``ties``), through
:func:`compeft_format.merge.merge`. A model is scored on each task with that task's head;
the score of a model is the mean over tasks of ``(model - base) / (expert - base)``.

TIES is measured as PEFT defines it and with the data-free rules of ``compeft_format.merge``
for compressed inputs, ``dense_divisor`` and ``expected_ties`` (and ``expected_ties`` as first
landed, for the before/after). Every model is scored on 500 sentiment and, by default, 5,000
frequency and 5,000 syllables held-out words (``--words``; the first 500 of each are the
experts' own held-out words, ``--words 500`` the first measure). The scores' sampling noise
is estimated by a paired bootstrap over the held-out words (every model scored on the same
resampled words, base and experts included), with each task's part of it.

It also measures the LoRA caveat: merging the A and B matrices separately (what PEFT's
non-SVD ``ties`` and the paper's code do) against merging each expert's product
``scaling * B @ A``, the change it makes to the base weights.

Run from the repository root (the experts are trained first if ``/work/cache/experts`` is
empty; see ``bench/experts.py`` for the packages they need)::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/merge_quality.py     # ~16 min on a quiet core

Further trios of experts (``bench/experts.py --seed N``, same recipe, another draw of the
training) are scored with the rows that decide the target and pooled with the first
(``--experts DIR DIR ...``, the first gets every measurement; ~5 min per further trio on a
quiet core, ~30 min on busy ones)::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/experts.py --seed 1  # -> /work/cache/experts-seed1
    HF_HUB_OFFLINE=1 .venv/bin/python bench/merge_quality.py \\
        --experts /work/cache/experts /work/cache/experts-seed1

Writes ``bench/results/merge_quality.md``, ``.json`` and ``.png`` (``--out``). Every model's
per-word scores are kept in a reuse cache (``--items``, outside git), keyed by a digest of the
experts (their trio) and of the model's weights: a second run scores only what is new or
changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.experts import (  # noqa: E402
    CACHE,
    N_TEST,
    N_TRAIN_MAX,
    SEED,
    TASKS,
    Experts,
    _length_batches,
    load_task,
    lora_deltas,
)
from compeft_format import lora_scale  # noqa: E402
from compeft_format.compress import compress  # noqa: E402
from compeft_format.merge import (  # noqa: E402
    MergeStats,
    Rescale,
    merge,
)
from compeft_format.merge_rescale import expected_rescales  # noqa: E402
from compeft_format.tensor import TernaryTensor  # noqa: E402

DENSITIES = (0.2, 0.1, 0.05)
METHODS = ("sum", "ties")
SCALE = "proj_vcap"  # the experts' compression scale (pinned: the rules model its proj rule)
BOOTSTRAP = 2000  # resamples of the held-out words
#: Held-out words per task (default of ``--words``): each task's own N_TEST, then, for the
#: tasks that have more (:data:`EXTRA_TASKS`: words the experts never saw, after the first
#: N_TEST + N_TRAIN_MAX of each task's shuffled list), further words up to this many. The
#: sentiment lexicon has none left: it keeps its 500.
WORDS = 5000
EXTRA_TASKS = ("frequency", "syllables")
#: Merge variants measured: name -> keyword arguments of ``merge``.
VARIANTS: dict[str, dict[str, str]] = {
    "sum": {"method": "sum"},
    "ties": {"method": "ties"},
    "ties-freq": {"method": "ties", "sign": "frequency"},
}


def _expected_ties_v1(stats: MergeStats) -> Rescale:
    """``expected_ties`` as first landed: each input's part of the conditional mean scaled by
    one factor per scope (the "before" of the benchmark's before/after)."""
    return expected_rescales({stats.name: stats}, fit="scaled")[stats.name]


_expected_ties_v1.prepare = lambda stats: expected_rescales(  # type: ignore[attr-defined]
    stats, fit="scaled")
#: The merge-aware rules for TIES of compressed inputs: label -> ``rescale`` argument.
RULES: dict[str, Any] = {"dense_divisor": "dense_divisor",
                         "expected_ties_v1": _expected_ties_v1,
                         "expected_ties": "expected_ties"}
FIX = "expected_ties"  # the one the target is judged on
BEFORE = "expected_ties_v1"  # what it replaced
TARGET = 0.02
#: The rows that decide the target, scored on every further trio (``--experts A B ...``):
#: TIES with each sign rule (the target's is the sum's), of the originals and of the
#: compressed experts, plain (PEFT) and with these rules.
TARGET_ROWS = ("ties", "ties-freq")
TARGET_RULES = ("dense_divisor", "expected_ties")
#: PEFT's scaling of the experts' modules (lora_alpha / r = 16 / 8), as compress_file weighs
#: them in a LoRA product fit.
LORA_SCALING = 2.0
#: Per-word scores of every model scored, keyed by a digest of what was scored (a model's
#: weights): rules can change without stale scores being reused. Outside git.
ITEMS = CACHE.parent / "merge_quality_scores.npz"


def _flat(tv: Mapping[str, Any], names: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(tv[n].to_numpy() if isinstance(tv[n], TernaryTensor)
                                      else tv[n], np.float64).ravel() for n in names])


def structure(originals: list[dict], compressed: dict[float, list[dict]], names: list[str]
              ) -> dict:
    """Data-free diagnostics: TIES divisors and each expert's share in the merges."""
    dense = np.stack([_flat(t, names) for t in originals])
    sq = (dense * dense).sum(1)

    def divisors(stack: np.ndarray) -> list[float]:
        elected = np.where(stack.sum(0) >= 0, 1.0, -1.0)
        agree = (np.sign(stack) == elected).sum(0)
        nz = (stack != 0).any(0)
        return (np.bincount(agree[nz], minlength=stack.shape[0] + 1)[1:] / nz.sum()).tolist()

    def share(merged: Mapping[str, np.ndarray]) -> list[float]:
        m = _flat(merged, names)
        return (dense @ m / sq).tolist()  # <merged, t_i> / ||t_i||^2

    out: dict = {"dense": {"ties_divisors": divisors(dense)}, "sparse": {}}
    for method in METHODS:
        out["dense"][f"{method}_share"] = share(merge(originals, method=method, rescale=None))
    for d, comp in compressed.items():
        stack = np.stack([_flat(t, names) for t in comp])
        row = {"ties_divisors": divisors(stack),
               "alone_share": [float(a @ t / (t @ t)) for a, t in zip(stack, dense,
                                                                       strict=True)],
               "norm_ratio": [float(np.linalg.norm(a) / np.linalg.norm(t))
                              for a, t in zip(stack, dense, strict=True)]}
        for method in METHODS:
            row[f"{method}_share"] = share(merge(comp, method=method, rescale=None))
        for label, rule in RULES.items():
            row[f"ties_{label}_share"] = share(merge(comp, method="ties", rescale=rule))
        out["sparse"][str(d)] = row
    return out


def expected_parts(comp: list[dict], mu: np.ndarray) -> dict[str, np.ndarray]:
    """``expected_ties``'s table with given multipliers: ``mu[0]`` times the conditional
    mean ``E[TIES(t) | P]`` plus ``sum_i mu[i + 1] E[t_i | P]`` (each a basis part when
    ``mu`` is a unit vector)."""
    def rule(stats: MergeStats) -> Rescale:
        return prep({stats.name: stats})[stats.name]

    def prep(stats: Mapping[str, MergeStats]) -> dict[str, Rescale]:
        zero = expected_rescales(stats, mu=np.zeros(len(mu) - 1))
        if mu[0] == 1.0 and not mu[1:].any():
            return zero
        with_mu = expected_rescales(stats, mu=mu[1:])
        return {k: Rescale(table=tuple((np.array(with_mu[k].table) - (1 - mu[0]) * np.array(
            zero[k].table)).tolist())) for k in stats}

    rule.prepare = prep  # type: ignore[attr-defined]
    return merge(comp, method="ties", rescale=rule)


def oracle_merge(originals: list[dict], parts: list[np.ndarray], names: list[str]
                 ) -> dict[str, np.ndarray]:
    """The least-squares table at the originals' true projections: ``parts[0] + sum_i mu_i
    parts[i + 1]`` with ``<merge, t_i> = <TIES(t), t_i>`` for every expert (reads the
    originals: a bound on what matching projections can do, not a data-free rule). One
    ``mu`` for all tensors: every input is one compression scope (one scale), as here."""
    dense = np.stack([_flat(t, names) for t in originals])
    want = dense @ _flat(merge(originals, method="ties"), names)
    basis = np.stack(parts[1:])
    mu = np.linalg.solve(dense @ basis.T, want - dense @ parts[0])
    flat = parts[0] + mu @ basis
    out, at = {}, 0
    for n in names:
        size = originals[0][n].size
        out[n] = flat[at : at + size].reshape(originals[0][n].shape).astype(np.float32)
        at += size
    return out


def oracle_groups(originals: list[dict], parts: list[np.ndarray], names: list[str],
                  group: Callable[[str], str]) -> dict[str, np.ndarray]:
    """:func:`oracle_merge` with one ``mu`` per group of tensors (``group(name)``): each
    expert's true projection kept per tensor or per LoRA role instead of over the scope (a
    bound, not a rule)."""
    dense = np.stack([_flat(t, names) for t in originals])
    want = _flat(merge(originals, method="ties"), names)
    gid = np.repeat([group(n) for n in names], [originals[0][n].size for n in names])
    basis, flat = np.stack(parts[1:]), parts[0].copy()
    for g in np.unique(gid):
        s = gid == g
        mu = np.linalg.lstsq(dense[:, s] @ basis[:, s].T,
                             dense[:, s] @ (want[s] - parts[0][s]), rcond=None)[0]
        flat[s] = parts[0][s] + mu @ basis[:, s]
    return _unflat(flat, originals[0], names)


def _unflat(flat: np.ndarray, like: Mapping[str, np.ndarray], names: list[str]
            ) -> dict[str, np.ndarray]:
    out, at = {}, 0
    for n in names:
        out[n] = flat[at : at + like[n].size].reshape(like[n].shape).astype(np.float32)
        at += like[n].size
    return out


def product_fit(merged: Mapping[str, np.ndarray], originals: list[dict],
                init: Mapping[str, np.ndarray], grid: np.ndarray | None = None
                ) -> dict[str, np.ndarray]:
    """Per LoRA module, the merged factors scaled by ``(c_B, c_A)`` so that the rebuilt
    product ``c_B M_B (A0 + c_A M_A)`` is closest (least squares) to that of TIES of the
    originals: the best any product-aware scale pair can do in that sense (a bound that reads
    the originals; ``c_A`` on a grid, ``c_B`` exact)."""
    grid = np.linspace(0, 2, 81) if grid is None else grid
    target = merge(originals, method="ties")
    out = dict(merged)
    for a in (n for n in merged if ".lora_A." in n):
        b = a.replace(".lora_A.", ".lora_B.")
        a0 = np.asarray(init[a], np.float64)
        ma, mb = np.asarray(merged[a], np.float64), np.asarray(merged[b], np.float64)
        p = np.asarray(target[b], np.float64) @ (a0 + np.asarray(target[a], np.float64))
        best = (np.inf, 1.0, 1.0)
        for ca in grid:
            q = mb @ (a0 + ca * ma)
            qq = float((q * q).sum())
            cb = float((q * p).sum()) / qq if qq > 0 else 1.0
            err = float(((cb * q - p) ** 2).sum())
            if err < best[0]:
                best = (err, float(ca), cb)
        out[a], out[b] = (best[1] * ma).astype(np.float32), (best[2] * mb).astype(np.float32)
    return out


def _variant(**options: Any) -> Any:
    """``expected_ties`` with :func:`expected_rescales` options (a variant measured)."""
    def rule(stats: MergeStats) -> Rescale:
        return expected_rescales({stats.name: stats}, **options)[stats.name]

    rule.prepare = lambda stats: expected_rescales(stats, **options)  # type: ignore[attr-defined]
    return rule


#: Further ideas measured for issue 10 (2026-12-07; none became a rule): label -> densities.
#: "lora_product_out experts": each expert's compression with its LoRA factors' scale fitted
#: on the products, as ``compress_file(scale="lora_product_out")`` does (the selection is
#: proj_vcap's; ``expected_ties`` reads the proj scale it replaced, so its merge is the
#: proj_vcap one).
EXPERIMENTS: dict[str, tuple[float, ...]] = {
    "conditional mean (mu = 0)": (0.2, 0.05),
    "expected_ties, one factor (fit common)": (0.2, 0.1, 0.05),
    "expected_ties, projections per tensor": (0.2, 0.05),
    "expected_ties x 0.85": (0.05,),
    "expected_ties x 1.15": (0.05,),
    "oracle per tensor": (0.2, 0.05),
    "oracle per role": (0.2, 0.05),
    "product fit on expected_ties (oracle)": (0.05,),
    "product fit on dense_divisor (oracle)": (0.05,),
    "scope tensor, expected_ties": (0.05,),
    "scope tensor, dense_divisor": (0.05,),
    "scope role, expected_ties": (0.05,),
    "scope role, dense_divisor": (0.05,),
    "lora_product_out experts, PEFT": (0.05,),
    "lora_product_out experts, dense_divisor": (0.1, 0.05),
    "lora_product_out experts, dense_divisor at the stored scale": (0.1, 0.05),
    "lora_product_out experts, expected_ties": (0.05,),
}
#: Of those, the ones measured with ``sign="frequency"`` too.
EXPERIMENTS_FREQ = ("expected_ties, one factor (fit common)",)


def experiments(d: float, comp: list[dict], originals: list[dict], parts: list[np.ndarray],
                names: list[str], init: Mapping[str, np.ndarray]
                ) -> Iterator[tuple[str, str, dict[str, np.ndarray]]]:
    """The merges of :data:`EXPERIMENTS` at density ``d``: ``(variant, label, merged task
    vector)``."""
    for label in EXPERIMENTS_FREQ:
        if d in EXPERIMENTS[label]:
            yield "ties-freq", label, merge(comp, method="ties", sign="frequency",
                                            rescale=_variant(fit="common"))
    for label, m in _experiments(d, comp, originals, parts, names, init):
        yield "ties", label, m


def _experiments(d: float, comp: list[dict], originals: list[dict], parts: list[np.ndarray],
                 names: list[str], init: Mapping[str, np.ndarray]
                 ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    todo = [k for k, ds in EXPERIMENTS.items() if d in ds]
    et = merge(comp, method="ties", rescale="expected_ties")
    scoped: dict[str, list[dict]] = {}
    fitted: list[dict] | None = None
    for label in todo:
        if label.startswith("conditional mean"):
            yield label, _unflat(parts[0], originals[0], names)
        elif label.startswith("expected_ties, one"):
            yield label, merge(comp, method="ties", rescale=_variant(fit="common"))
        elif label.startswith("expected_ties, projections"):
            yield label, merge(comp, method="ties", rescale=_variant(by_tensor=True))
        elif label.startswith("expected_ties x "):
            c = float(label.rsplit(" ", 1)[1])
            yield label, {n: np.asarray(v) * c for n, v in et.items()}
        elif label.startswith("oracle per "):
            by = label.rsplit(" ", 1)[1]
            yield label, oracle_groups(originals, parts, names, (lambda n: n) if by == "tensor"
                                       else (lambda n: "A" if ".lora_A." in n else "B"))
        elif label.startswith("product fit"):
            rule = label.split(" on ")[1].split(" ")[0]
            yield label, product_fit(merge(comp, method="ties", rescale=rule), originals, init)
        elif label.startswith("scope "):
            scope, rule = label[len("scope "):].split(", ")
            if scope not in scoped:
                scoped[scope] = [compress(tv, density=d, scale=SCALE, scope=scope)
                                 for tv in originals]
            yield label, merge(scoped[scope], method="ties", rescale=rule)
        elif label.startswith("lora_product_out"):
            if fitted is None:  # as compress_file fits them: PEFT's scaling weighs modules
                fitted = [lora_scale.rescale(c, {n: init[n] + tv[n] for n in tv}, init,
                                             rule="lora_product_out",
                                             scaling=lambda _: LORA_SCALING)
                          for c, tv in zip(comp, originals, strict=True)]
            rule, stored, _ = label.split(", ")[1].partition(" at the stored scale")
            yield label, merge(fitted, method="ties",
                               rescale=None if rule == "PEFT" else rule,
                               proj_scales=None if stored else
                               [{n: v.scale for n, v in c.items()} for c in comp])


def lora_products(tv: Mapping[str, np.ndarray], init: Mapping[str, np.ndarray]
                  ) -> dict[str, np.ndarray]:
    """An expert as the change it makes to the base weights: ``scaling * B @ A`` per module."""
    adapter = {n: init[n] + tv[n] for n in init}
    return {k: v.numpy() for k, v in lora_deltas(adapter).items()}


class Bench:
    """Scores merges of the cached experts; every evaluation is logged."""

    def __init__(self, ex: Experts) -> None:
        self.ex = ex
        self.tasks = ex.tasks
        self.names = sorted(ex.init)
        self.base = ex.base_scores()
        self.own = {t: ex.scores(ex.adapters[t]) for t in self.tasks}
        self.expert = {t: self.own[t][t] for t in self.tasks}

    def ratios(self, scores: Mapping[str, float]) -> dict[str, float]:
        r = {t: (scores[t] - self.base[t]) / (self.expert[t] - self.base[t]) for t in scores}
        if len(r) == len(self.tasks):
            r["mean"] = float(np.mean([r[t] for t in self.tasks]))
        return r

    def items(self, deltas: Mapping[str, torch.Tensor], tasks: tuple[str, ...] | None = None,
              tests: Mapping[str, list] | None = None) -> dict[str, np.ndarray]:
        """Each held-out word's score on each task (their mean is ``Experts.scores_deltas``):
        minus the squared error (regression) or 1 if right (classification). ``tests``:
        other held-out batches per task (default the experts' own)."""
        ex = self.ex
        tasks = tasks or self.tasks
        tests = tests or ex.tests
        preds = ex.enc.embed_batches([b for t in tasks for b, _ in tests[t]], deltas)
        out = {}
        for t in tasks:
            emb = torch.cat([preds.pop(0) for _ in tests[t]])
            y = torch.cat([y for _, y in tests[t]])
            with torch.no_grad():
                pred = ex.heads[t](emb)
            if ex.info[t]["kind"] == "regression":
                v = -((pred.squeeze(-1) - y) ** 2)
            else:
                v = (pred.argmax(-1) == y.long()).to(torch.float64)
            out[t] = v.numpy().astype(np.float64)
        return out

    def task_vector_items(self, m: Mapping[str, np.ndarray],
                          tasks: tuple[str, ...] | None = None,
                          tests: Mapping[str, list] | None = None) -> dict[str, np.ndarray]:
        adapter = {n: self.ex.init[n] + np.asarray(m[n], np.float32) for n in self.names}
        return self.items(lora_deltas(adapter), tasks, tests)

    def extra_tests(self, n: int) -> dict[str, list]:
        """Batches of ``n`` further held-out words for each of :data:`EXTRA_TASKS`, with the
        targets standardised as the experts' own held-out words are."""
        out = {}
        for t in EXTRA_TASKS:  # the trio's own split (bench/experts.py --seed)
            task = load_task(t, None, seed=self.ex.info[t].get("seed", SEED))
            own = json.loads((self.ex.cache / t / "test.json").read_text())
            if task.words[:N_TEST] != own["words"]:
                raise SystemExit(f"{t}: the word list is not the one the experts were made "
                                 "from")
            lo = N_TEST + N_TRAIN_MAX
            words, y = task.words[lo : lo + n], task.targets[lo : lo + n]
            mu, sd = own.get("mean", 0.0), own.get("std", 1.0)
            z = [(v - mu) / sd for v in y] if self.ex.info[t]["kind"] == "regression" else y
            out[t] = _length_batches(self.ex.enc, words, z)
        return out

    def delta_items(self, deltas: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.items({k: torch.from_numpy(np.asarray(v, np.float32))
                           for k, v in deltas.items()})


def _same(a: np.ndarray | None, b: np.ndarray) -> bool:
    return a is not None and a.shape == b.shape and bool(np.array_equal(a, b))


class ItemCache:
    """Per-word scores of every model measured, in an ``.npz`` outside git, keyed by the
    experts (:func:`experts_id`: several trios share one file without colliding) and by what
    was scored (a digest of the weights: a changed rule is scored again, not reused).

    Valid only for the same experts and scorer: a fingerprint of each trio's per-word scores
    on its own tasks is stored with it; where it does not match, that trio's entries (and
    only those) are dropped. A file written before the key named the experts (one
    ``fingerprint``, bare keys) is taken over by the trio whose fingerprint it holds.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.data: dict[str, np.ndarray] = {}
        if path is not None and path.exists():
            with np.load(path) as z:
                self.data = {k: z[k] for k in z.files}
        self.used: set[str] = set()
        self.trio: str | None = None

    def use(self, experts: str, fingerprint: np.ndarray) -> None:
        """Score the trio ``experts`` (its :func:`experts_id`) from now on."""
        if _same(self.data.get("fingerprint"), fingerprint):  # the old layout: these experts'
            for k in [k for k in self.data if not k.startswith(("experts:", "fingerprint"))]:
                self.data[f"{experts}|{k}"] = self.data.pop(k)
            del self.data["fingerprint"]
            self.data[f"fingerprint|{experts}"] = fingerprint
        if not _same(self.data.get(f"fingerprint|{experts}"), fingerprint):
            for k in [k for k in self.data if k.startswith(f"{experts}|")]:
                del self.data[k]
        self.data[f"fingerprint|{experts}"] = fingerprint
        self.trio = experts

    def get(self, key: str, tasks: tuple[str, ...],
            make: Callable[[], Mapping[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], bool]:
        if self.trio is None:
            raise RuntimeError("ItemCache.use(experts, fingerprint) first")
        names = [f"{self.trio}|{key}|{t}" for t in tasks]
        hit = all(n in self.data for n in names)
        if not hit:
            got = make()
            for n, t in zip(names, tasks, strict=True):
                self.data[n] = np.asarray(got[t], np.float64)
            self.save()
        self.used.add(key)
        return {t: self.data[n] for n, t in zip(names, tasks, strict=True)}, hit

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp.npz")
            np.savez(tmp, **self.data)
            os.replace(tmp, self.path)


def digest(tensors: Mapping[str, Any]) -> str:
    """A digest of a model's weights (name -> array), the key of its scores in the cache."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        v = tensors[name]
        a = np.ascontiguousarray(v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v),
                                 np.float32)
        h.update(f"{name}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:20]


def experts_id(ex: Experts) -> str:
    """The key of a trio of experts in the score cache: a digest of its initial adapter, its
    adapters and its heads (``"experts:<hex>"``)."""
    weights: dict[str, Any] = {f"init/{n}": v for n, v in ex.init.items()}
    for t in ex.tasks:
        weights |= {f"{t}/{n}": v for n, v in ex.adapters[t].items()}
        weights |= {f"{t}/head.{n}": p.detach() for n, p in ex.heads[t].named_parameters()}
    return f"experts:{digest(weights)}"


def bootstrap(items: Mapping[str, Mapping[str, np.ndarray]], tasks: tuple[str, ...],
              experts: Mapping[str, str], reps: int = BOOTSTRAP, seed: int = 0
              ) -> dict[str, dict[str, np.ndarray]]:
    """Normalised scores of every model on ``reps`` paired resamples of the held-out words
    (each task's words drawn with replacement; the same draw for every model, the base and
    the experts, so differences between models are paired).

    ``items``: row key -> task -> per-word scores, with ``"base"`` and ``experts[t]`` (the
    key of task t's expert) among them. Returns row key -> task or ``"mean"`` -> ``reps``
    scores (the mean over the tasks; tasks are drawn independently of each other).

    >>> rng = np.random.default_rng(0)
    >>> it = {"base": {"a": rng.normal(0, 1, 50)}, "e": {"a": rng.normal(1, 1, 50)}}
    >>> it["m"] = {"a": it["e"]["a"] * 0.5 + it["base"]["a"] * 0.5}
    >>> b = bootstrap(it, ("a",), {"a": "e"}, reps=20)
    >>> np.allclose(b["m"]["mean"], 0.5), b["m"]["a"].shape
    (True, (20,))
    """
    rng = np.random.default_rng(seed)
    draws = {t: rng.integers(0, items["base"][t].size, (reps, items["base"][t].size))
             for t in tasks}

    def means(key: str, t: str) -> np.ndarray:
        return items[key][t][draws[t]].mean(1)

    base = {t: means("base", t) for t in tasks}
    gain = {t: means(experts[t], t) - base[t] for t in tasks}
    out = {}
    for key, it in items.items():
        if all(t in it for t in tasks):
            per = {t: (means(key, t) - base[t]) / gain[t] for t in tasks}
            per["mean"] = np.mean([per[t] for t in tasks], axis=0)
            out[key] = per
    return out


def normalised_mean(items: Mapping[str, Mapping[str, np.ndarray]], key: str,
                    tasks: tuple[str, ...], experts: Mapping[str, str]) -> float:
    """The score of row ``key`` on all its words: the mean over ``tasks`` of ``(model -
    base) / (expert - base)`` (as :func:`bootstrap` computes it on each resample)."""
    return float(np.mean([(items[key][t].mean() - items["base"][t].mean())
                          / (items[experts[t]][t].mean() - items["base"][t].mean())
                          for t in tasks]))


def pooled_gaps(trios: list[Mapping[str, Mapping[str, np.ndarray]]], tasks: tuple[str, ...],
                pairs: Mapping[str, tuple[str, str]], reps: int = BOOTSTRAP) -> dict[str, dict]:
    """Gaps of row against reference (``pairs``: name -> (row key, reference key)) on each
    trio of experts and pooled over the trios: the pooled gap is the mean of the per-trio
    gaps, its 95% interval that of the mean over a bootstrap that resamples each trio's
    held-out words on its own (:func:`bootstrap`, paired within a trio; the trios' words
    and experts are independent draws). Trio ``k``'s draws are :func:`bootstrap`'s with
    ``seed=k``, so trio 0's interval is the one its own tables give.

    ``trios``: each trio's per-word scores (row key -> task -> scores, with ``"base"`` and
    ``"expert <task>"``). The interval covers the words' sampling noise only, not how much
    the gap varies from one trio of experts to another: ``sd_between`` is the SD of the
    per-trio gaps (ddof 1; None for one trio), and ``interval95_trios`` the 95% Student t
    interval of their mean (:func:`t_interval`), which treats each trio (its training
    draw and its words) as one independent sample: the interval for the claim "over
    trios made this way".

    >>> rng = np.random.default_rng(0)
    >>> def trio(shift):
    ...     base = {"a": rng.normal(0, 1, 400)}
    ...     ref = {"a": base["a"] + 0.5 + rng.normal(0, 0.3, 400)}
    ...     return {"base": base, "expert a": {"a": base["a"] + 1}, "ref": ref,
    ...             "row": {"a": ref["a"] + shift}}
    >>> p = pooled_gaps([trio(-0.1), trio(-0.3)], ("a",), {"g": ("row", "ref")}, reps=50)
    >>> [round(g, 3) for g in p["g"]["gaps"]], round(p["g"]["gap"], 3)
    ([-0.1, -0.3], -0.2)
    >>> [round(x, 2) for x in p["g"]["interval95_trios"]]   # -0.2 -+ 12.706 * 0.1
    [-1.47, 1.07]
    """
    experts = {t: f"expert {t}" for t in tasks}
    out: dict[str, dict] = {name: {"gaps": [], "intervals95": []} for name in pairs}
    total = {name: np.zeros(reps) for name in pairs}
    for k, items in enumerate(trios):
        keep = {"base", *experts.values(), *(x for pair in pairs.values() for x in pair)}
        boot = bootstrap({key: items[key] for key in keep}, tasks, experts, reps, seed=k)
        for name, (row, ref) in pairs.items():
            diff = boot[row]["mean"] - boot[ref]["mean"]
            total[name] += diff / len(trios)
            out[name]["gaps"].append(normalised_mean(items, row, tasks, experts)
                                     - normalised_mean(items, ref, tasks, experts))
            out[name]["intervals95"].append(interval(diff))
    for name in pairs:
        out[name]["gap"] = float(np.mean(out[name]["gaps"]))
        out[name]["interval95"] = interval(total[name])
        out[name]["sd"] = float(total[name].std(ddof=1))
        out[name]["sd_between"] = (float(np.std(out[name]["gaps"], ddof=1))
                                   if len(trios) > 1 else None)
        out[name]["interval95_trios"] = t_interval(out[name]["gaps"])
    return out


#: Student t's 97.5% quantiles by degrees of freedom (1 to 30; the two-sided 95% interval).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_interval(values: list[float]) -> list[float] | None:
    """The 95% Student t interval of the mean of independent ``values`` (None for fewer
    than 2; at most 31 values, the quantiles :data:`T975` holds).

    >>> t_interval([0.1, 0.3])      # 0.2 -+ 12.706 * 0.1414 / sqrt(2)
    [-1.0706, 1.4706]
    """
    n = len(values)
    if n < 2:
        return None
    if n - 1 > len(T975):
        raise ValueError(f"t_interval holds quantiles for up to {len(T975) + 1} values, got {n}")
    half = T975[n - 2] * float(np.std(values, ddof=1)) / math.sqrt(n)
    mean = float(np.mean(values))
    return [round(mean - half, 10), round(mean + half, 10)]


def interval(x: np.ndarray) -> list[float]:
    """The 95% percentile interval of bootstrap values."""
    return [float(v) for v in np.percentile(x, [2.5, 97.5])]


def noise_shares(diff: Mapping[str, np.ndarray], tasks: tuple[str, ...]) -> dict[str, float]:
    """Each task's part of the bootstrap variance of a paired difference of mean scores.

    The tasks' words are drawn independently, so the variance of the mean over tasks is the
    sum of each task's variance over ``len(tasks)**2``: its parts add up to 1.

    >>> d = {"a": np.array([0.0, 2.0]), "b": np.array([1.0, 1.0])}
    >>> d["mean"] = (d["a"] + d["b"]) / 2
    >>> noise_shares(d, ("a", "b"))
    {'a': 1.0, 'b': 0.0}
    """
    var = {t: float(np.var(diff[t], ddof=1)) for t in tasks}
    total = sum(var.values())
    return {t: var[t] / total if total > 0 else 0.0 for t in tasks}


def run(cache: Path, densities: tuple[float, ...], items_path: Path | None = ITEMS,
        words: int = WORDS, log=print) -> dict:
    """Every measurement, on ``words`` held-out words per task where the task has them;
    per-word scores already in the cache at ``items_path`` (the same experts, the same
    weights) are taken from it instead of being evaluated again."""
    return measure(cache, densities, ItemCache(items_path), words, log)[0]


def measure(cache: Path, densities: tuple[float, ...], store: ItemCache, words: int = WORDS,
            log=print, target_only: bool = False
            ) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """:func:`run` on the trio in ``cache``, and every model's per-word scores (row key ->
    task -> scores). ``target_only``: only the rows that decide the target
    (:data:`TARGET_ROWS`: the originals' TIES and TIES of the compressed experts with each
    sign rule, plain and with :data:`TARGET_RULES`), with their gaps' intervals."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if not all((Path(cache) / t / "head.safetensors").exists() for t in TASKS) and (
            Path(cache) != CACHE):
        raise SystemExit(f"{cache}: no trio of experts there; train one first "
                         "(bench/experts.py --seed N --cache DIR)")
    ex = Experts.load(cache)
    b = Bench(ex)
    tasks = b.tasks
    own = {t: b.task_vector_items(ex.task_vector(t), (t,))[t] for t in tasks}
    store.use(experts_id(ex), np.concatenate([own[t] for t in tasks]))
    more = max(words - N_TEST, 0)
    extra = b.extra_tests(more) if more else {}
    reused = 0

    def score(kind: str, weights: Mapping[str, Any], row_tasks: tuple[str, ...] = tasks
              ) -> dict[str, np.ndarray]:
        """Per-word scores of a model: ``kind`` "tv" (a task vector of the adapter) or
        "deltas" (changes to the base weights), on each task's held-out words."""
        nonlocal reused
        key = f"{kind}:{digest(weights)}"

        def evaluate(ts: tuple[str, ...], tests: Mapping[str, list] | None
                     ) -> dict[str, np.ndarray]:
            if kind == "tv":
                return b.task_vector_items(weights, ts, tests)
            return b.items({k: torch.from_numpy(np.asarray(v, np.float32))
                            for k, v in weights.items()}, ts, tests)

        got, hit = store.get(key, row_tasks, lambda: evaluate(row_tasks, None))
        ext = tuple(t for t in row_tasks if t in extra)
        if ext:
            further, hit2 = store.get(f"extra {more}|{key}", ext, lambda: evaluate(ext, extra))
            got = {t: np.concatenate([got[t], further[t]]) if t in further else got[t]
                   for t in row_tasks}
            hit = hit and hit2
        reused += hit
        return got

    items: dict[str, dict[str, np.ndarray]] = {"base": score("deltas", {})}
    for t in tasks:
        items[f"expert {t}"] = score("tv", ex.task_vector(t))
    means = {k: {t: float(v[t].mean()) for t in tasks} for k, v in items.items()}
    b.base = means["base"]
    b.own = {t: means[f"expert {t}"] for t in tasks}
    b.expert = {t: b.own[t][t] for t in tasks}
    originals = [ex.task_vector(t) for t in tasks]
    out: dict = {"tasks": list(tasks), "base": b.base, "experts": b.own,
                 "experts_normalised": {t: b.ratios(b.own[t]) for t in tasks},
                 "train_info": ex.info, "scale": SCALE, "rules": list(RULES), "fix": FIX,
                 "before": BEFORE, "target": TARGET, "rows": [],
                 "words": {t: int(items["base"][t].size) for t in tasks},
                 "experts_dir": str(cache), "experts_id": store.trio,
                 "seed": ex.info[tasks[0]].get("seed", SEED), "target_only": target_only}

    def row(source: str, method: str, rule: str, kind: str, weights: Mapping[str, Any]
            ) -> None:
        key = f"{source}|{method}|{rule}"
        got = items[key] = score(kind, weights)
        scores = {t: float(v.mean()) for t, v in got.items()}
        r = {"source": source, "method": method, "rule": rule, "scores": scores,
             "normalised": b.ratios(scores)}
        out["rows"].append(r)
        log(f"{source:>16} {method:>9} {rule:>16}: " + " ".join(
            f"{k} {v:.3f}" for k, v in r["normalised"].items()) +
            f"  ({time.perf_counter() - t0:.0f} s)")

    def merged(inputs: list, variant: str, rule: str = "none") -> dict[str, np.ndarray]:
        return merge(inputs, **VARIANTS[variant], rescale=None if rule == "none"
                     else RULES[rule])

    if target_only:
        for v in TARGET_ROWS:
            row("originals", v, "none", "tv", merged(originals, v))
        for d in densities:
            comp = [compress(tv, density=d, scale=SCALE) for tv in originals]
            for v in TARGET_ROWS:
                for rule in ("none", *TARGET_RULES):
                    row(f"compressed {d}", v, rule, "tv", merged(comp, v, rule))
        out["reused_rows"] = reused  # the intervals: trios(), pooled with the other trios
        out["models"] = len(out["rows"]) + 1 + len(tasks)
        out["seconds"] = round(time.perf_counter() - t0, 1)
        return out, items
    for v in VARIANTS:
        # the rules are the identity on dense inputs: one row serves all
        row("originals", v, "none", "tv", merged(originals, v))
    compressed = {}
    for d in densities:
        comp = compressed[d] = [compress(tv, density=d, scale=SCALE) for tv in originals]
        for c, t in zip(comp, tasks, strict=True):
            row(f"compressed {d}", f"alone {t}", "none", "tv",
                {n: c[n].to_numpy() for n in b.names})
        for v in VARIANTS:
            for rule in ("none", *RULES) if VARIANTS[v]["method"] == "ties" else ("none",):
                row(f"compressed {d}", v, rule, "tv", merged(comp, v, rule))
        # a bound, not a rule (it reads the originals): the least-squares table at the
        # originals' own projections <TIES(t), t_i>, not at their expectation
        parts = [_flat(expected_parts(comp, mu), b.names) for mu in np.eye(len(tasks) + 1)]
        row(f"compressed {d}", "ties", "oracle", "tv", oracle_merge(
            originals, parts, b.names))
        for variant, label, m in experiments(d, comp, originals, parts, b.names, ex.init):
            row(f"compressed {d}", variant, label, "tv", m)
    # the LoRA caveat: merging A and B separately is not merging the products B @ A
    products = [lora_products(tv, ex.init) for tv in originals]
    for v in ("sum", "ties"):
        row("originals BA", v, "none", "deltas", merged(products, v))
    out["structure"] = structure(originals, compressed, b.names)
    out["bootstrap"] = noise(items, tasks, out["rows"])
    first = {k: {t: v[t][:N_TEST] for t in v} for k, v in items.items()}
    out["bootstrap_first"] = noise(first, tasks, out["rows"])
    for r in out["rows"]:
        scores = {t: float(first[f"{r['source']}|{r['method']}|{r['rule']}"][t].mean())
                  for t in tasks}
        base = {t: float(first["base"][t].mean()) for t in tasks}
        gain = {t: float(first[f"expert {t}"][t].mean()) - base[t] for t in tasks}
        r["normalised_first"] = {t: (scores[t] - base[t]) / gain[t] for t in tasks}
        r["normalised_first"]["mean"] = float(np.mean([r["normalised_first"][t]
                                                       for t in tasks]))
    out["reused_rows"] = reused
    out["models"] = len(out["rows"]) + 1 + len(tasks)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out, items


def noise(items: Mapping[str, Mapping[str, np.ndarray]], tasks: tuple[str, ...],
          rows: list[dict]) -> dict:
    """Bootstrap SDs, the 95% interval of every gap to the originals' merge and of the rules'
    paired differences, and each task's part of a gap's variance."""
    boot = bootstrap(items, tasks, {t: f"expert {t}" for t in tasks})
    out: dict = {"reps": BOOTSTRAP, "words": {t: int(items["base"][t].size) for t in tasks},
                 "sd": {k: float(v["mean"].std(ddof=1)) for k, v in boot.items()},
                 "gaps": {}, "rule_differences": {}}
    for r in rows:
        if not (r["source"].startswith("compressed") and r["method"] in VARIANTS):
            continue
        k = f"{r['source']}|{r['method']}|{r['rule']}"
        o = boot[f"originals|{r['method']}|none"]
        g = {t: boot[k][t] - o[t] for t in (*tasks, "mean")}
        out["gaps"][k] = {"sd": float(g["mean"].std(ddof=1)), "interval95": interval(g["mean"]),
                          "task_sd": {t: float(g[t].std(ddof=1)) for t in tasks},
                          "variance_share": noise_shares(g, tasks)}
        if r["rule"] in EXPERIMENTS:  # paired against the rule the target is judged on
            diff = boot[k]["mean"] - boot[f"{r['source']}|{r['method']}|{FIX}"]["mean"]
            out["rule_differences"][f"{k}|{FIX}"] = {
                "sd": float(diff.std(ddof=1)), "interval95": interval(diff)}
        if r["rule"] in RULES:
            for against in ("none", *RULES):
                if against == r["rule"]:
                    break
                if f"{r['source']}|{r['method']}|{against}" not in boot:
                    continue  # not scored (--experts beyond the first: the target's rows)
                diff = boot[k]["mean"] - boot[f"{r['source']}|{r['method']}|{against}"]["mean"]
                out["rule_differences"][f"{k}|{against}"] = {
                    "sd": float(diff.std(ddof=1)), "interval95": interval(diff)}
    return out


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def _find(res: dict, source: str, method: str, rule: str = "none") -> dict | None:
    for r in res["rows"]:
        if (r["source"], r["method"], r["rule"]) == (source, method, rule):
            return r
    return None


def _mean(res: dict, source: str, method: str, rule: str = "none") -> float:
    return _find(res, source, method, rule)["normalised"]["mean"]


def _rule_of(res: dict, source: str, method: str, rule: str) -> dict:
    """The row of ``rule``, or the plain row where the rule is the identity (sum, originals)."""
    return _find(res, source, method, rule) or _find(res, source, method, "none")


def verdict(gap: float, iv: list[float], target: float) -> str:
    """Met / not met of a gap, and whether its interval resolves it.

    >>> verdict(-0.01, [-0.015, 0.0], 0.02), verdict(-0.01, [-0.05, 0.03], 0.02)
    ('within, resolved', 'within, not resolved')
    >>> verdict(-0.1, [-0.2, -0.05], 0.02), verdict(-0.03, [-0.06, 0.0], 0.02)
    ('misses, resolved', 'misses, not resolved')
    """
    inside = abs(gap) <= target
    resolved = (-target <= iv[0] and iv[1] <= target) if inside else (
        iv[1] < -target or iv[0] > target)
    return ("within" if inside else "misses") + (", resolved" if resolved else
                                                 ", not resolved")


def below_verdict(iv: list[float] | None, target: float) -> str:
    """Whether an interval of a gap settles that it is no more than ``target`` below 0 (the
    paper's claim is that compressed experts merge at least as well as the originals, so a
    merge better than the target is no miss here).

    >>> below_verdict([-0.015, 0.08], 0.02), below_verdict([-0.05, 0.01], 0.02)
    ('not below, resolved', 'not resolved')
    >>> below_verdict([-0.09, -0.03], 0.02), below_verdict(None, 0.02)
    ('below, resolved', '-')
    """
    if iv is None:
        return "-"
    if iv[0] >= -target:
        return "not below, resolved"
    return "below, resolved" if iv[1] < -target else "not resolved"


def _iv(noise: dict, source: str, method: str, rule: str) -> str:
    g = noise["gaps"][f"{source}|{method}|{rule}"]["interval95"]
    return f"{g[0]:+.3f}, {g[1]:+.3f}"


def markdown(res: dict, densities: tuple[float, ...], load: str) -> str:
    tasks = res["tasks"]
    f3 = "{:.3f}".format
    rules = ("none", *res["rules"])
    label = {"none": "PEFT", **{r: f"`{r}`" for r in res["rules"]},
             "expected_ties_v1": "`expected_ties` before (scaled parts)"}
    boot = res["bootstrap"]
    words = ", ".join(f"{res['words'][t]:,} {t}" for t in tasks) + " held-out words"
    lines = [
        "# Merging compressed experts: quality (bench/merge_quality.py)",
        "",
        "Three LoRA experts (r = 8, lora_alpha = 16, on query/key/value/dense of "
        "all-MiniLM-L6-v2; one shared seeded initial adapter; `bench/experts.py`), one "
        f"word-level task each, scored on {words} with each task's own "
        "head: -MSE on standardised targets (sentiment: VADER ratings; frequency: wordfreq "
        "Zipf) or accuracy (syllables: CMU dictionary, 5 classes). Normalised score of a "
        "model on a task: (model - base) / (expert - base), where base is the base model "
        "with the same head; a merge's score is the mean over the three tasks. The first "
        f"{N_TEST} words of each task are the experts' own held-out words; the further "
        "frequency and syllables words (CMU dictionary words after the first "
        f"{N_TEST + N_TRAIN_MAX} of each task's shuffled list) were never used in training; "
        "the sentiment lexicon has no more words. `--words 500` gives the first measure.",
        "",
        f"Task vectors: adapter - initial adapter (A and B). Compressed: "
        f"`compress(tv, density=d, scale=\"{res['scale']}\")` (global scope; the default "
        f"scale (`auto`) for these experts at 0.1 and 0.2; at 0.05 `auto` gives a LoRA "
        f"adapter compressed from its initial adapter `lora_product_out` "
        f"(`scales.AUTO_LORA_DENSITY`), measured in *Other ideas measured*: with "
        f"`expected_ties` it merges exactly as these rows). Merged: "
        f"`compeft_format.merge.merge` with `rescale=None` (PEFT's "
        f"definitions) or a rule for TIES of compressed inputs: "
        + ", ".join(f"`rescale=\"{r}\"`" for r in res["rules"] if r != res["before"])
        + f" and {label[res['before']]} (`expected_rescales(fit=\"scaled\")`, the rule as "
        "first landed)" +
        f". Machine: {platform.platform()}, torch {torch.__version__}, 1 thread, load "
        f"average at start {load}; {res['seconds']:.0f} s"
        + (f" ({res['reused_rows']} of {res['models']} models' per-word scores taken from "
           "the reuse cache of an earlier run on the same experts and weights, `--items`)."
           if res.get("reused_rows") else "."),
        "",
        "## Each expert on each task",
        "",
        "| model | " + " | ".join(tasks) + " | " + " | ".join(f"{t} (normalised)" for t in tasks)
        + " |",
        "|---|" + "---|" * (2 * len(tasks)),
        "| base | " + " | ".join(f3(res["base"][t]) for t in tasks) + " | "
        + " | ".join("0" for _ in tasks) + " |",
    ]
    for e in tasks:
        lines.append(f"| expert {e} | " + " | ".join(f3(res["experts"][e][t]) for t in tasks)
                     + " | " + " | ".join(f3(res["experts_normalised"][e][t]) for t in tasks)
                     + " |")
    for d in densities:
        for e in tasks:
            r = _find(res, f"compressed {d}", f"alone {e}")
            if r:
                lines.append(f"| expert {e}, compressed {d} | " + " | ".join(
                    f3(r["scores"][t]) for t in tasks) + " | " + " | ".join(
                    f3(r["normalised"][t]) for t in tasks) + " |")
    lines += [
        "",
        "An expert helps its own task and hurts the others: the experts interfere, which is "
        "what a merge has to manage. Compressed alone, each keeps most of its own gain and "
        "hurts the others about as the original does.",
        "",
        "## Merges (normalised scores; mean over tasks)",
        "",
        "| merged from | method | " + " | ".join(label[r] for r in rules) + " | "
        + " | ".join(f"{t}: " + " / ".join(label[r] for r in rules) for t in tasks) + " |",
        "|---|---|" + "---|" * (len(rules) + len(tasks)),
    ]
    sources = ["originals"] + [f"compressed {d}" for d in densities]
    for src in sources:
        for method in VARIANTS:
            rows = [_rule_of(res, src, method, r) for r in rules]
            lines.append(
                f"| {src} | {method} | " + " | ".join(
                    f"**{f3(r['normalised']['mean'])}**" for r in rows) + " | " + " | ".join(
                    " / ".join(f3(r["normalised"][t]) for r in rows) for t in tasks) + " |")
    lines += ["", "(`originals`: the rules are the identity on dense inputs; `sum`: the rules "
              "are the identity for task arithmetic. `ties-freq`: TIES with "
              "`sign=\"frequency\"`.)", ""]
    # the target: every gap, with its interval
    first = res["bootstrap_first"]
    lines += ["## Against the merge of the originals (the target)", "",
              f"Gap = merge of the compressed experts - the same merge of the originals, on "
              f"{words}; in brackets its 95% interval over the paired bootstrap (*Noise* "
              f"below). Target: TIES of the compressed experts within {res['target']} of "
              "TIES of the originals. *Resolved* means the whole interval is on one side of "
              f"+-{res['target']}.", "",
              "| method | density | rule | score | gap [95% interval] | gap SD | verdict |",
              "|---|---|---|---|---|---|---|"]
    for method in VARIANTS:
        o = _mean(res, "originals", method)
        lines.append(f"| {method} | originals | - | {f3(o)} | - | - | - |")
        for d in densities:
            for rule in rules:
                r = _find(res, f"compressed {d}", method, rule)
                if r is None:
                    continue  # the rules are the identity for sum
                g = boot["gaps"][f"compressed {d}|{method}|{rule}"]
                gap = r["normalised"]["mean"] - o
                lines.append(f"| {method} | {d} | {label[rule]} | {f3(r['normalised']['mean'])} "
                             f"| {gap:+.3f} [{g['interval95'][0]:+.3f}, "
                             f"{g['interval95'][1]:+.3f}] | {g['sd']:.3f} | "
                             f"{verdict(gap, g['interval95'], res['target'])} |")
    lines.append("")
    # before / after
    fix, before = res["fix"], res["before"]
    diffs = boot["rule_differences"]
    lines += [f"### `{fix}`: before and after", "",
              f"Before: {label[before]}, as landed last session. After: {label[fix]}. Same "
              "compressed inputs, so the differences are paired; the first-measure columns "
              f"are the same models on the first {N_TEST} words of each task only (last "
              "session's measure).", "",
              "| method | density | gap before | gap after | after - before [95%] | after - "
              "`dense_divisor` [95%] | gap before, first measure | gap after, first measure |",
              "|---|---|---|---|---|---|---|---|"]
    for method in ("ties", "ties-freq"):
        o = _mean(res, "originals", method)
        o1 = _find(res, "originals", method)["normalised_first"]["mean"]
        for d in densities:
            src = f"compressed {d}"
            a, bf = _find(res, src, method, fix), _find(res, src, method, before)
            ab = diffs[f"{src}|{method}|{fix}|{before}"]
            ad = diffs[f"{src}|{method}|{fix}|dense_divisor"]
            lines.append(
                f"| {method} | {d} | {bf['normalised']['mean'] - o:+.3f} | "
                f"{a['normalised']['mean'] - o:+.3f} | "
                f"{a['normalised']['mean'] - bf['normalised']['mean']:+.3f} "
                f"[{ab['interval95'][0]:+.3f}, {ab['interval95'][1]:+.3f}] | "
                f"{a['normalised']['mean'] - _mean(res, src, method, 'dense_divisor'):+.3f} "
                f"[{ad['interval95'][0]:+.3f}, {ad['interval95'][1]:+.3f}] | "
                f"{bf['normalised_first']['mean'] - o1:+.3f} "
                f"[{_iv(first, src, method, before)}] | "
                f"{a['normalised_first']['mean'] - o1:+.3f} [{_iv(first, src, method, fix)}] |")
    lines.append("")
    if res.get("trios"):
        lines += trios_section(res, densities)
    # noise
    ruled = [k for k in boot["gaps"] if k.split("|")[2] in res["rules"]]
    at = {d: [boot["gaps"][k]["sd"] for k in ruled if k.startswith(f"compressed {d}|")]
          for d in densities}
    at1 = {d: [first["gaps"][k]["sd"] for k in ruled if k.startswith(f"compressed {d}|")]
           for d in densities}
    dsd = [v["sd"] for k, v in diffs.items() if not k.endswith("|none")]
    fixed = [f"compressed {d}|ties|{fix}" for d in densities]
    share = {t: np.mean([boot["gaps"][k]["variance_share"][t] for k in fixed]) for t in tasks}
    share1 = {t: np.mean([first["gaps"][k]["variance_share"][t] for k in fixed])
              for t in tasks}
    sd0 = float(np.median(at[densities[0]]))
    floor = sd0 * np.sqrt(share.get("sentiment", 0.0))
    lines += [
        "## Noise: what the held-out words resolve",
        "",
        f"Paired bootstrap: {boot['reps']} resamples of each task's held-out words (with "
        "replacement; the same draw for every model, the base and the experts included, so "
        "the normalisation is resampled too and differences between models are paired; the "
        "tasks are drawn independently). The per-word scores are the only noise here: the "
        "experts, the compressions and the merges are deterministic (the experts' training "
        "seed is another source, not measured: it needs new experts).",
        "",
        f"| quantity | bootstrap SD, {words} | bootstrap SD, first {N_TEST} words per task |",
        "|---|---|---|",
        f"| TIES of the originals | {boot['sd']['originals|ties|none']:.3f} | "
        f"{first['sd']['originals|ties|none']:.3f} |",
        *(f"| gap to the originals, compressed {d} with a rule (paired) | "
          f"{min(at[d]):.3f} - {max(at[d]):.3f} | {min(at1[d]):.3f} - {max(at1[d]):.3f} |"
          for d in densities),
        f"| difference between two of the rules on the same inputs (paired) | {min(dsd):.3f} - "
        f"{max(dsd):.3f} | - |",
        "",
        f"Each task's part of the variance of the target's gap (TIES, `{fix}`, mean over the "
        "densities; the parts add up to 1 because the tasks' words are drawn independently):",
        "",
        "| held-out words | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
        f"| {words} | " + " | ".join(f"{share[t]:.2f}" for t in tasks) + " |",
        f"| first {N_TEST} of each | " + " | ".join(f"{share1[t]:.2f}" for t in tasks) + " |",
        "",
        f"On the first {N_TEST} words of each task the gap's variance came from sentiment, "
        "frequency and syllables in the parts of the second row; with the further frequency "
        f"and syllables words the gap's SD at {densities[0]} is {sd0:.3f} (first measure: "
        f"{float(np.median(at1[densities[0]])):.3f}), so its 95% interval is about "
        f"+-{2 * sd0:.3f}: a gap is resolved against +-{res['target']} only when it lies "
        "more than that from the target's edge. Sentiment has no more words; it is "
        f"{share.get('sentiment', 0.0):.0%} of that variance, so with unlimited frequency "
        f"and syllables words the SD would still be about {floor:.3f}. No task is dropped: "
        "the score is the mean over all three.",
        "",
    ]
    st = res["structure"]

    o_ties = _mean(res, "originals", "ties")

    def fmt(xs: list[float]) -> str:
        return ", ".join(f"{x:.2f}" for x in xs)

    lines += [
        "",
        "## Why: TIES divides by the number of agreeing inputs, and compression changes it",
        "",
        "TIES averages each entry over the inputs that agree with its elected sign. Dense "
        "task vectors are nonzero almost everywhere, so that count is mostly 2 or 3 for "
        "three experts; sparse ternary ones are mostly alone at an entry, so it is mostly 1, "
        "and TIES of compressed experts is a near-sum: each expert comes through about twice "
        "as strong as in the originals' TIES. The default scale (`proj_vcap`) makes each "
        "compressed expert's component along its original exactly the original's "
        "(`<t_hat, t> = ||t||^2`), so *share* = `<merge, t_i> / ||t_i||^2` measures how "
        "strongly expert i comes through a merge (sentiment, frequency, syllables):",
        "",
        "| inputs | TIES divisor 1 / 2 / 3 (fraction of entries) | TIES share: " + ", ".join(
            label[r] for r in rules) + " | sum share |",
        "|---|---|---|---|",
        f"| originals | {' / '.join(f'{x:.2f}' for x in st['dense']['ties_divisors'])} | "
        f"{fmt(st['dense']['ties_share'])} | {fmt(st['dense']['sum_share'])} |",
    ]
    for d in densities:
        r = st["sparse"][str(d)]
        lines.append(
            f"| compressed {d} | {' / '.join(f'{x:.2f}' for x in r['ties_divisors'])} | "
            + "; ".join(fmt(r["ties_share"] if rule == "none" else r[f"ties_{rule}_share"])
                        for rule in rules) + f" | {fmt(r['sum_share'])} |")
    extra = ", ".join(f"{_extra_energy(st, d):.2f} ||t||^2 at {d}" for d in densities)
    lines += [
        "",
        "**`dense_divisor`** treats a zero of a ternary input as what it is, an entry dropped "
        "by the compression whose sign is unknown: it agrees with the elected sign with chance "
        "p (estimated from the inputs' overlapping kept entries; about 1/2 here) and would "
        "then have counted in the originals' divisor, so each zero adds p to the divisor. It "
        "brings the shares near the originals' but not to them: it ignores what the dropped "
        "entries would add to the numerator, and elects signs by the inputs' scales alone, "
        "so the weakest expert (frequency) loses most overlaps and comes through too weakly.",
        "",
        "**`expected_ties`** computes, for every sign pattern (which inputs keep an entry, "
        "and with what sign), the expected value of TIES over the *originals* given that "
        "pattern: each input's entries are modelled as normal in each tensor (the experts' "
        "per-tensor excess kurtosis is about 0.5), with the threshold the compression used "
        "inferred from the fraction of the tensor it kept and from its scale (the proj rule: "
        "scale = sum t^2 / sum |kept t| over the scope); dropped entries are below the "
        "threshold with unknown sign, kept ones above it with their sign; the expectation "
        "runs over equal-probability atoms of those distributions, with the merge's own "
        "weights and sign election. That conditional mean is shrunk toward zero, as each "
        "compression's kept entries would be without the proj rule, so it is brought back "
        "the compressor's way: the merge's projection on each input, `<merge, t_i>`, is set "
        "to its expectation `E<TIES(t), t_i>` (per compression scope: the whole model "
        "here). Before, each input's part of the conditional mean was scaled by one factor "
        "to get there; now the table is the one closest to the conditional mean among those "
        "with these projections (`E[TIES(t) | P] + sum_i mu_i E[t_i | P]`, Lagrange's "
        "condition), which is also the closest to TIES of the originals in expected squared "
        "error. No data and no fitted constant: its shares (table above) are the originals' "
        "TIES shares to within a few hundredths, and it predicts those shares from the "
        "compressed files alone.",
        "",
        "**What matching the projections can reach.** The `oracle` merge is the same "
        "least-squares table at the originals' *true* projections `<TIES(t), t_i>` (it reads "
        "the originals, so it is a bound, not a rule): " + "; ".join(
            f"gap {_mean(res, f'compressed {d}', 'ties', 'oracle') - o_ties:+.3f} "
            f"[{_iv(boot, f'compressed {d}', 'ties', 'oracle')}] at {d}"
            for d in densities if _find(res, f"compressed {d}", "ties", "oracle")) +
        f". Against `{res['fix']}` that is " + ", ".join(
            f"{_mean(res, src, 'ties', 'oracle') - _mean(res, src, 'ties', res['fix']):+.3f}"
            f" at {src.split()[1]}" for src in (f"compressed {d}" for d in densities)
            if _find(res, src, "ties", "oracle"))
        + ": a better model of the dropped entries (heavier tails, per-row statistics, "
        "dependence between the experts) mostly moves the rule's projections toward the "
        "true ones, and getting them exactly right is worth no more than this here. At low "
        "density nearly every kept entry is kept by one expert alone, so every rule is close "
        "to a weighted sum of the compressed experts, and the score depends on those weights "
        "in a way the projections do not capture: `dense_divisor` passes the two stronger "
        "experts (sentiment, syllables) through more weakly than the originals' TIES does "
        "(shares below), and at 0.05 it scores higher than `expected_ties` (the before/after "
        "table has the paired difference).",
        "",
        "What no rule can undo is the compression error itself: each compressed expert "
        "carries, besides its original component, an orthogonal part of energy "
        f"||t_hat||^2 - ||t||^2 = {extra}; alone it costs an expert little, merged it adds "
        "to the interference between experts, more so the lower the density (it is also why "
        "`sum` of compressed experts stays far below `sum` of the originals: its shares are "
        "the originals', 1 each, and the extra energy is not divided at all).",
        "",
    ]
    lines += experiments_section(res, densities)
    # LoRA caveat
    lines += ["## LoRA caveat: merging A and B separately is not merging B A", ""]
    lines.append("| method | A and B merged separately | products B A merged | "
                 + " | ".join(f"{t} separately / products" for t in tasks) + " |")
    lines.append("|---|---|---|" + "---|" * len(tasks))
    for method in METHODS:
        sep = _find(res, "originals", method)["normalised"]
        prod = _find(res, "originals BA", method)["normalised"]
        lines.append(f"| {method} | {f3(sep['mean'])} | {f3(prod['mean'])} | " + " | ".join(
            f"{f3(sep[t])} / {f3(prod[t])}" for t in tasks) + " |")
    lines += [
        "",
        "Merging the A and B matrices separately (PEFT's non-SVD `ties`, the paper's code, "
        "and `compeft merge` on adapter folders) gives `(sum B_i)(A0 + sum dA_j)`, which "
        "adds cross terms `B_i dA_j` (i != j) to the sum of the experts' products and, for "
        "TIES, elects signs and divides per factor, not per weight change. Merging the "
        "products `scaling * B_i A_i` (dense weight deltas, rank up to 3 x 8: no longer a "
        "rank-8 LoRA) is the task arithmetic the method means.",
        "",
    ]
    return "\n".join(lines)


def trios(measured: list[tuple[dict, Mapping[str, Mapping[str, np.ndarray]]]],
          densities: tuple[float, ...], reps: int = BOOTSTRAP
          ) -> tuple[list[dict], dict, dict]:
    """Each trio's target rows, the gaps pooled over the trios (:func:`pooled_gaps`), and
    the paired difference between the two rules pooled the same way (which rule to
    recommend): ``measured`` is :func:`measure`'s output for each trio (the first may be
    the full run)."""
    tasks = tuple(measured[0][0]["tasks"])
    pairs = {f"compressed {d}|{v}|{rule}": (f"compressed {d}|{v}|{rule}", f"originals|{v}|none")
             for v in TARGET_ROWS for d in densities for rule in ("none", *TARGET_RULES)}
    a, b = TARGET_RULES[1], TARGET_RULES[0]
    rule_pairs = {f"compressed {d}|{v}|{a} - {b}": (f"compressed {d}|{v}|{a}",
                                                     f"compressed {d}|{v}|{b}")
                  for v in TARGET_ROWS for d in densities}
    everything = pooled_gaps([items for _, items in measured], tasks, pairs | rule_pairs,
                             reps)
    pooled = {k: everything[k] for k in pairs}
    rules = {k: everything[k] for k in rule_pairs}
    summary = []
    for k, (res, _) in enumerate(measured):
        summary.append({
            "experts_dir": res["experts_dir"], "experts_id": res["experts_id"],
            "seed": res["seed"], "words": res["words"], "base": res["base"],
            "experts": res["experts"], "seconds": res["seconds"],
            "models": res["models"], "reused_rows": res["reused_rows"],
            "scores": {f"{r['source']}|{r['method']}|{r['rule']}": r["normalised"]["mean"]
                       for r in res["rows"] if r["source"] == "originals"
                       or f"{r['source']}|{r['method']}|{r['rule']}" in pairs},
            "gaps": {name: {"gap": p["gaps"][k], "interval95": p["intervals95"][k]}
                     for name, p in pooled.items()}})
    for p in pooled.values():  # a miss says which side: above is a merge better than the target
        p["verdict"] = verdict(p["gap"], p["interval95"], TARGET).replace(
            "misses", "misses above" if p["gap"] > 0 else "misses below")
    return summary, pooled, rules


def _span(iv: list[float] | None) -> str:
    return "-" if iv is None else f"[{iv[0]:+.3f}, {iv[1]:+.3f}]"


def trios_section(res: dict, densities: tuple[float, ...]) -> list[str]:
    """The per-trio and pooled tables of the target's rows (``res["trios"]``)."""
    trio, pooled = res["trios"], res["pooled"]
    tasks = res["tasks"]
    label = {"none": "PEFT", **{r: f"`{r}`" for r in TARGET_RULES}}
    n = len(trio)
    seeds = ", ".join(str(t["seed"]) for t in trio)
    f3 = "{:.3f}".format
    words = ", ".join(f"{trio[0]['words'][t]:,} {t}" for t in tasks)
    dirs = " ".join(t["experts_dir"] for t in trio)
    lines = [
        f"## Across {n} trios of experts (seeds {seeds}): is the miss real?",
        "",
        "One trio of experts cannot settle a gap that is a few thousandths from the target "
        "when its interval is +-0.03: the experts' training (initial adapter, heads, batch "
        "order, data split) is itself a draw. Further trios are made by the same recipe with "
        "another seed (`bench/experts.py --seed N`: `bench.experts.derived_seeds`; seed 0 is "
        "the trio above) and scored on the same counts of their own held-out words "
        f"({words}) with the rows that decide the target. Pooled: the mean over the trios "
        "of each trio's gap; its 95% interval is that of the mean over a bootstrap that "
        "resamples each trio's words on its own (paired within a trio). It covers the "
        "words' noise, not the spread from one trio to another, which the per-trio columns "
        "show. The first trio's gaps and intervals are those of the tables above.",
        "",
        "| trio (seed) | experts | " + " | ".join(f"expert {t} on {t} (base)" for t in tasks)
        + " | TIES of the originals | the same, sign frequency |",
        "|---|---|" + "---|" * (len(tasks) + 2),
    ]
    for t in trio:
        lines.append(
            f"| {t['seed']} | `{t['experts_dir']}` | " + " | ".join(
                f"{f3(t['experts'][e][e])} ({f3(t['base'][e])})" for e in tasks)
            + f" | {f3(t['scores']['originals|ties|none'])} | "
            f"{f3(t['scores']['originals|ties-freq|none'])} |")
    lines += [
        "",
        "Gap = TIES of the compressed experts - TIES of the originals (same sign rule), "
        "normalised scores, [95% interval]; verdict on the pooled gap against "
        f"+-{res['target']}.",
        "",
        "| sign | density | rule | " + " | ".join(f"trio {t['seed']}" for t in trio)
        + " | pooled | SD between trios | verdict (pooled, words) | 95% over trios (t) | "
        f"more than {res['target']} below? (over trios) |",
        "|---|---|---|" + "---|" * (n + 5),
    ]
    for v in TARGET_ROWS:
        for d in densities:
            for rule in ("none", *TARGET_RULES):
                p = pooled[f"compressed {d}|{v}|{rule}"]
                lines.append(
                    f"| {'sum' if v == 'ties' else 'frequency'} | {d} | {label[rule]} | "
                    + " | ".join(f"{g:+.3f} [{a:+.3f}, {b:+.3f}]" for g, (a, b) in
                                 zip(p["gaps"], p["intervals95"], strict=True))
                    + f" | **{p['gap']:+.3f}** [{p['interval95'][0]:+.3f}, "
                    f"{p['interval95'][1]:+.3f}] | {p['sd_between']:.3f} | {p['verdict']} | "
                    f"{_span(p.get('interval95_trios'))} | "
                    f"{below_verdict(p.get('interval95_trios'), res['target'])} |")
    d0 = densities[0]
    key = f"compressed {d0}|ties|{res['fix']}"
    p = pooled[key]
    one = verdict(p["gaps"][0], p["intervals95"][0], res["target"])
    lines += [
        "", f"**The target's row** (TIES with the sign of the sum, `{res['fix']}`, density "
        f"{d0}): trio {trio[0]['seed']} alone {p['gaps'][0]:+.3f} [{p['intervals95'][0][0]:+.3f}"
        f", {p['intervals95'][0][1]:+.3f}] ({one}); the other trios " + ", ".join(
            f"{g:+.3f}" for g in p["gaps"][1:]) + f"; pooled over {n} trios **{p['gap']:+.3f} "
        f"[{p['interval95'][0]:+.3f}, {p['interval95'][1]:+.3f}]** ({p['verdict']}), with "
        f"an SD of {p['sd_between']:.3f} between the trios' gaps: the trio drawn moves the "
        "gap far more than the held-out words do. *Above* is a merge of compressed experts "
        "that keeps more of the experts' gains than TIES of the originals. Treating each "
        f"trio as one draw, the mean gap's 95% t interval over the {n} trios is "
        f"**{_span(p.get('interval95_trios'))}** "
        f"({below_verdict(p.get('interval95_trios'), res['target'])} against -{res['target']}"
        ": the paper's claim, that compressed experts merge no worse than the originals, "
        f"read with the target's {res['target']} as the margin).",
        "", f"Which rule, over the trios: `{TARGET_RULES[1]}` - `{TARGET_RULES[0]}` on the "
        "same compressed experts (paired; positive: `expected_ties` better):", "",
        "| sign | density | " + " | ".join(f"trio {t['seed']}" for t in trio)
        + " | pooled | SD between trios |", "|---|---|" + "---|" * (n + 2)]
    for v in TARGET_ROWS:
        for d in densities:
            r = res["pooled_rules"][f"compressed {d}|{v}|{TARGET_RULES[1]} - {TARGET_RULES[0]}"]
            lines.append(
                f"| {'sum' if v == 'ties' else 'frequency'} | {d} | " + " | ".join(
                    f"{g:+.3f} [{a:+.3f}, {b:+.3f}]" for g, (a, b) in
                    zip(r["gaps"], r["intervals95"], strict=True))
                + f" | **{r['gap']:+.3f}** [{r['interval95'][0]:+.3f}, "
                f"{r['interval95'][1]:+.3f}] | {r['sd_between']:.3f} |")
    lines += [
        "", "Made with (the further trios trained first, about 0.5-5 min per expert on one "
        "core; their scores are cached with the others', keyed on the experts):", "",
        "    HF_HUB_OFFLINE=1 .venv/bin/python bench/experts.py --seed 1   # and --seed 2 ...",
        f"    HF_HUB_OFFLINE=1 .venv/bin/python bench/merge_quality.py --experts {dirs}",
        ""]
    return lines


def _extra_energy(st: dict, d: float) -> float:
    """The compression error's energy at density ``d`` as a multiple of the expert's,
    ``||t_hat||^2 / ||t||^2 - 1`` averaged over the experts (``res["structure"]``)."""
    return float(np.mean([x * x - 1 for x in st["sparse"][str(d)]["norm_ratio"]]))


def experiments_section(res: dict, densities: tuple[float, ...]) -> list[str]:
    """The table and findings of :data:`EXPERIMENTS`."""
    f3 = "{:.3f}".format
    boot = res["bootstrap"]
    tasks = res["tasks"]
    lines = ["## Other ideas measured (2026-12-07): none does better", "",
             "TIES with the sign of the sum (unless marked), on the same words and bootstrap; "
             "gap to the originals' TIES with the same sign rule, and the paired difference "
             "from `expected_ties` at the same density and sign rule (positive: better). "
             "Oracles read the originals (bounds, not rules).", "",
             "| density | idea | score | gap [95%] | minus `expected_ties` [95%] | "
             + " / ".join(tasks) + " |", "|---|---|---|---|---|---|"]
    for method, d in ((m, d) for m in ("ties", "ties-freq") for d in densities):
        o = _mean(res, "originals", method)
        for label in (k for k, ds in EXPERIMENTS.items() if d in ds):
            r = _find(res, f"compressed {d}", method, label)
            if r is None:
                continue
            k = f"compressed {d}|{method}|{label}"
            diff = boot["rule_differences"][f"{k}|{res['fix']}"]
            gap = r["normalised"]["mean"] - o
            et = _mean(res, f"compressed {d}", method, res["fix"])
            lines.append(
                f"| {d} | {label}" + (", sign frequency" if method != "ties" else "")
                + f" | {f3(r['normalised']['mean'])} | {gap:+.3f} "
                f"[{_iv(boot, f'compressed {d}', method, label)}] | "
                f"{r['normalised']['mean'] - et:+.3f} [{diff['interval95'][0]:+.3f}, "
                f"{diff['interval95'][1]:+.3f}] | "
                + " / ".join(f3(r["normalised"][t]) for t in tasks) + " |")
    # the findings' figures, read from the rows above (a rerun on other experts or another
    # machine moves them, and the text with them)
    def sc(d: float, label: str, method: str = "ties") -> float:
        return _mean(res, f"compressed {d}", method, label)

    def vs(d: float, label: str, method: str = "ties") -> float:  # minus expected_ties
        return sc(d, label, method) - sc(d, res["fix"], method)

    def iv(d: float, label: str, method: str = "ties") -> str:
        return _span(boot["rule_differences"][f"compressed {d}|{method}|{label}|{res['fix']}"][
            "interval95"])

    st = res["structure"]
    energy = " / ".join(f"{_extra_energy(st, d):.1f}x" for d in densities)
    dd = "dense_divisor"
    lp = "lora_product_out experts, "
    common = "expected_ties, one factor (fit common)"
    lines += [
        "",
        "* **Shrinking toward the least-squares estimate loses.** Under the error model "
        f"(each compression's orthogonal error {energy} its expert's energy at "
        f"{' / '.join(map(str, densities))}) the squared-error-optimal merge is the "
        "conditional mean `E[TIES(t) | P]` (mu = 0): it scores "
        f"{-vs(0.2, 'conditional mean (mu = 0)'):.2f} (0.2) and "
        f"{-vs(0.05, 'conditional mean (mu = 0)'):.2f} (0.05) below `expected_ties`. So "
        "does the least-squares fit of each module's rebuilt *product* `c_B M_B (A0 + c_A "
        "M_A)` to the originals' TIES product, a per-module scale pair fitted with the "
        f"originals themselves: {-vs(0.05, 'product fit on expected_ties (oracle)'):.2f} "
        "below at 0.05. Scaling `expected_ties` as a whole by 0.85 changes it by "
        f"{vs(0.05, 'expected_ties x 0.85'):+.3f} {iv(0.05, 'expected_ties x 0.85')} and by "
        f"1.15 by {vs(0.05, 'expected_ties x 1.15'):+.3f} "
        f"{iv(0.05, 'expected_ties x 1.15')}: the score peaks near the level the rule keeps "
        "(each expert's projection), and the compression noise costs the network less than "
        "the signal a shrinkage removes.",
        "* **Finer projections do not help a data-free rule.** The model's projections kept "
        "per tensor change the score by "
        f"{vs(0.2, 'expected_ties, projections per tensor'):+.3f} "
        f"{iv(0.2, 'expected_ties, projections per tensor')} at 0.2 and "
        f"{vs(0.05, 'expected_ties, projections per tensor'):+.3f} "
        f"{iv(0.05, 'expected_ties, projections per tensor')} at 0.05. The *true* "
        "per-tensor projections (an oracle) change it by "
        f"{vs(0.05, 'oracle per tensor'):+.3f} {iv(0.05, 'oracle per tensor')} at 0.05 and "
        f"{vs(0.2, 'oracle per tensor'):+.3f} {iv(0.2, 'oracle per tensor')} at 0.2; per "
        f"LoRA role by {vs(0.2, 'oracle per role'):+.3f} and "
        f"{vs(0.05, 'oracle per role'):+.3f}. The conditional mean times one common factor "
        "per scope (`fit=\"common\"`: the sum of the projections kept, each expert's "
        "relative strength as the model has it) changes it by " + ", ".join(
            f"{vs(d, common):+.3f} {iv(d, common)} at {d}" for d in densities)
        + " with the sign of the sum, and by " + ", ".join(
            f"{vs(d, common, 'ties-freq'):+.3f}" for d in densities)
        + " with `sign=\"frequency\"`: one of some twenty comparisons, not replicated "
        "across the sign rules, so it is not adopted.",
        "* **Compression-side changes do not help the merge.** Compressing the experts with "
        "scope `tensor` or `role` gives no better merge than the default global scope "
        f"(`dense_divisor` {sc(0.05, 'scope tensor, dense_divisor'):.3f} and "
        f"{sc(0.05, 'scope role, dense_divisor'):.3f} against {sc(0.05, dd):.3f} at 0.05). "
        "With the LoRA product scale `lora_product_out` (0.6x-0.7x proj's scale here; what "
        "`compeft compress` gives these experts at 0.05 by default) PEFT's TIES is far less "
        f"broken ({sc(0.05, lp + 'PEFT'):.3f} against {sc(0.05, 'none'):.3f} at 0.05: the "
        "smaller scale tames TIES's near-sum) but below both rules, and `dense_divisor` at "
        "the stored magnitudes passes the shrunken experts too weakly ("
        f"{sc(0.05, lp + dd + ' at the stored scale'):.3f} against {sc(0.05, dd):.3f} at "
        f"0.05, {sc(0.1, lp + dd + ' at the stored scale'):.3f} against {sc(0.1, dd):.3f} at "
        "0.1). So both rules read the proj scale the compression records (the selection is "
        "the same) and merge a `lora_product_out` expert exactly as its `proj_vcap` "
        "compression: its rows are the `expected_ties` and `dense_divisor` rows.",
        "",
    ]
    return lines


def plot(res: dict, densities: tuple[float, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=120)
    ds = list(densities)
    for method, color in zip(VARIANTS, ("C0", "C1", "C2"), strict=True):
        o = _find(res, "originals", method)["normalised"]["mean"]
        ax.axhline(o, color=color, ls=":", lw=1.5, label=f"{method}, originals")
        styles = (("--", "x"), ("-.", "s"), (":", "^"), ("-", "o"))
        for rule, (ls, mk) in zip(("none", *res["rules"]), styles, strict=True):
            if _find(res, f"compressed {ds[0]}", method, rule) is None:
                continue  # the rules are the identity for sum
            y = [_find(res, f"compressed {d}", method, rule)["normalised"]["mean"] for d in ds]
            label = f"{method}, compressed, " + ("PEFT" if rule == "none" else rule)
            if rule == res["fix"]:  # its 95% interval, from the paired bootstrap
                iv = [res["bootstrap"]["gaps"][f"compressed {d}|{method}|{rule}"]["interval95"]
                      for d in ds]
                ax.fill_between(ds, [o + a for a, _ in iv], [o + b for _, b in iv],
                                color=color, alpha=0.12)
            ax.plot(ds, y, color=color, ls=ls, marker=mk, label=label)
    alone = [np.mean([_find(res, f"compressed {d}", f"alone {t}")["normalised"][t]
                      for t in res["tasks"]]) for d in ds]
    ax.plot(ds, alone, color="k", ls=":", marker=".", label="each compressed expert alone "
            "(own task)")
    o = _find(res, "originals", "ties")["normalised"]["mean"]
    ax.axhspan(o - res["target"], o + res["target"], color="C1", alpha=0.15,
               label=f"ties, originals +- {res['target']} (the target); shaded bands: "
               f"95% interval of {res['fix']}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xticks(ds, [str(d) for d in ds])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("density of each compressed expert")
    ax.set_ylabel("mean over tasks of (model - base) / (expert - base)")
    ax.set_title("Three LoRA experts merged: originals vs compressed (all-MiniLM-L6-v2)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=Path, nargs="+", default=[CACHE], metavar="DIR",
                    help="trios of experts (bench/experts.py --cache): the first gets every "
                    "measurement (default %(default)s); each further one (bench/experts.py "
                    "--seed N) the rows that decide the target, pooled with the first's")
    ap.add_argument("--cache", dest="experts", type=lambda p: [Path(p)],
                    help=argparse.SUPPRESS)  # the first trio, as --experts DIR (older name)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--densities", default=",".join(map(str, DENSITIES)))
    ap.add_argument("--items", type=Path, default=ITEMS, help="reuse cache of every model's "
                    "per-word scores (.npz, outside git; default %(default)s): models in it "
                    "are not scored again")
    ap.add_argument("--words", type=int, default=WORDS, metavar="N",
                    help=f"held-out words per task, where the task has them ("
                    f"{', '.join(EXTRA_TASKS)}; sentiment has {N_TEST}); {N_TEST} is the "
                    "first measure (default %(default)s)")
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="only write the report and plot again from a result JSON")
    args = ap.parse_args()
    densities = tuple(float(x) for x in args.densities.split(","))
    if args.render:
        res = json.loads(args.render.read_text())
        load = res["load_at_start"]
    else:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        store = ItemCache(args.items)
        measured = [measure(args.experts[0], densities, store, args.words)]
        for more in args.experts[1:]:
            measured.append(measure(more, densities, store, args.words, target_only=True))
        res = measured[0][0]
        if len(measured) > 1:
            res["trios"], res["pooled"], res["pooled_rules"] = trios(measured, densities)
        res["load_at_start"] = load
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "merge_quality.json").write_text(json.dumps(res, indent=1, default=float))
    (args.out / "merge_quality.md").write_text(markdown(res, densities, load))
    plot(res, densities, args.out / "merge_quality.png")
    print(f"wrote {args.out / 'merge_quality.md'}")


if __name__ == "__main__":
    main()
