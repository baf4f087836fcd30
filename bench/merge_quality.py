"""Experiment: do compressed experts merge as well as the originals, and what makes them?

Three LoRA experts (``bench/experts.py``: r = 8 on all attention and dense layers of
all-MiniLM-L6-v2, one shared initial adapter, three word-level tasks each with its own head)
are merged from their task vectors (adapter minus initial adapter, A and B alike), either the
originals or each expert compressed first (``compress``, global scope, default scale) at
densities 0.2, 0.1 and 0.05, with task arithmetic (``sum``) and TIES (``ties``), through
:func:`compeft_format.merge.merge`. A model is scored on each task with that task's head;
the score of a model is the mean over tasks of ``(model - base) / (expert - base)``.

It also measures the LoRA caveat: merging the A and B matrices separately (what PEFT's
non-SVD ``ties`` and the paper's code do) against merging each expert's product
``scaling * B @ A``, the change it makes to the base weights.

Run from the repository root (the experts are trained first if ``/work/cache/experts`` is
empty; see ``bench/experts.py`` for the packages they need)::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/merge_quality.py     # ~15 min on 2 busy cores

Writes ``bench/results/merge_quality.md``, ``.json`` and ``.png`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.experts import CACHE, Experts, lora_deltas  # noqa: E402
from compeft_format.compress import compress  # noqa: E402
from compeft_format.merge import merge  # noqa: E402
from compeft_format.tensor import TernaryTensor  # noqa: E402

DENSITIES = (0.2, 0.1, 0.05)
METHODS = ("sum", "ties")
#: Merge variants measured: name -> keyword arguments of ``merge``.
VARIANTS: dict[str, dict[str, str]] = {
    "sum": {"method": "sum"},
    "ties": {"method": "ties"},
    "ties-freq": {"method": "ties", "sign": "frequency"},
}
FIX = "dense_divisor"  # the merge-aware rule (compeft_format.merge.dense_divisor)


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
        row["ties_fix_share"] = share(merge(comp, method="ties", rescale=FIX))
        out["sparse"][str(d)] = row
    return out


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

    def task_vector_scores(self, m: Mapping[str, np.ndarray],
                           tasks: tuple[str, ...] | None = None) -> dict[str, float]:
        adapter = {n: self.ex.init[n] + np.asarray(m[n], np.float32) for n in self.names}
        return self.ex.scores(adapter, tasks)

    def delta_scores(self, deltas: Mapping[str, np.ndarray]) -> dict[str, float]:
        return self.ex.scores_deltas({k: torch.from_numpy(np.asarray(v, np.float32))
                                      for k, v in deltas.items()})


def run(cache: Path, densities: tuple[float, ...], reuse: dict | None = None, log=print) -> dict:
    """Every measurement; rows already in ``reuse`` (an earlier result on the same experts)
    are taken from it instead of being evaluated again."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ex = Experts.load(cache)
    b = Bench(ex)
    tasks = b.tasks
    originals = [ex.task_vector(t) for t in tasks]
    out: dict = {"tasks": list(tasks), "base": b.base, "experts": b.own,
                 "experts_normalised": {t: b.ratios(b.own[t]) for t in tasks},
                 "train_info": ex.info, "rows": []}
    old = {}
    if reuse and reuse.get("experts") == b.own:
        old = {(r["source"], r["method"], r["rule"]): r["scores"] for r in reuse["rows"]}

    def row(source: str, method: str, rule: str, scores: Callable[[], Mapping[str, float]]
            ) -> None:
        key = (source, method, rule)
        got = old[key] if key in old else scores()
        r = {"source": source, "method": method, "rule": rule, "scores": dict(got),
             "normalised": b.ratios(got), "reused": key in old}
        out["rows"].append(r)
        log(f"{source:>16} {method:>9} {rule:>13}: " + " ".join(
            f"{k} {v:.3f}" for k, v in r["normalised"].items()) +
            f"  ({time.perf_counter() - t0:.0f} s)")

    def merged(inputs: list, variant: str, rule: str = "none") -> dict[str, np.ndarray]:
        return merge(inputs, **VARIANTS[variant], rescale=None if rule == "none" else rule)

    for v in VARIANTS:
        # the rule is the identity on dense inputs: one row serves both
        row("originals", v, "none", lambda v=v: b.task_vector_scores(merged(originals, v)))
    compressed = {}
    for d in densities:
        comp = compressed[d] = [compress(tv, density=d) for tv in originals]
        row(f"compressed {d}", "alone", "none", lambda comp=comp: {
            t: b.task_vector_scores({n: c[n].to_numpy() for n in b.names}, (t,))[t]
            for c, t in zip(comp, tasks, strict=True)})
        for v in VARIANTS:
            for rule in ("none", FIX) if VARIANTS[v]["method"] == "ties" else ("none",):
                row(f"compressed {d}", v, rule, lambda comp=comp, v=v, rule=rule:
                    b.task_vector_scores(merged(comp, v, rule)))
    # the LoRA caveat: merging A and B separately is not merging the products B @ A
    products = [lora_products(tv, ex.init) for tv in originals]
    for v in ("sum", "ties"):
        row("originals BA", v, "none", lambda v=v: b.delta_scores(merged(products, v)))
    out["structure"] = structure(originals, compressed, b.names)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def _find(res: dict, source: str, method: str, rule: str = "none") -> dict | None:
    for r in res["rows"]:
        if (r["source"], r["method"], r["rule"]) == (source, method, rule):
            return r
    return None


def markdown(res: dict, densities: tuple[float, ...], load: str) -> str:
    tasks = res["tasks"]
    f3 = "{:.3f}".format
    lines = [
        "# Merging compressed experts: quality (bench/merge_quality.py)",
        "",
        "Three LoRA experts (r = 8, lora_alpha = 16, on query/key/value/dense of "
        "all-MiniLM-L6-v2; one shared seeded initial adapter; `bench/experts.py`), one "
        "word-level task each, scored on 500 held-out words per task with that task's own "
        "head: -MSE on standardised targets (sentiment: VADER ratings; frequency: wordfreq "
        "Zipf) or accuracy (syllables: CMU dictionary, 5 classes). Normalised score of a "
        "model on a task: (model - base) / (expert - base), where base is the base model "
        "with the same head; a merge's score is the mean over the three tasks.",
        "",
        f"Task vectors: adapter - initial adapter (A and B). Compressed: "
        f"`compress(tv, density=d)` (global scope, default scale `proj_vcap`). Merged: "
        f"`compeft_format.merge.merge` with `rescale=None` (PEFT's definitions: \"before\") "
        f"or `rescale=\"{FIX}\"` (\"after\"). Machine: {platform.platform()}, torch "
        f"{torch.__version__}, 1 thread, load average at start {load}; "
        f"{res['seconds']:.0f} s"
        + (f" ({sum(r.get('reused', False) for r in res['rows'])} of {len(res['rows'])} rows "
           "taken from an earlier run on the same experts, `--reuse`)." if any(
               r.get("reused") for r in res["rows"]) else "."),
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
    lines += [
        "",
        "An expert helps its own task and hurts the others: the experts interfere, which is "
        "what a merge has to manage.",
        "",
        "## Merges (normalised scores; mean over tasks in bold)",
        "",
        "| merged from | method | before (PEFT) | after (`" + FIX + "`) | " +
        " | ".join(f"{t} before / after" for t in tasks) + " |",
        "|---|---|---|---|" + "---|" * len(tasks),
    ]
    sources = ["originals"] + [f"compressed {d}" for d in densities]
    for src in sources:
        if src != "originals":
            a = _find(res, src, "alone")
            if a:
                mean = f3(np.mean([a["normalised"][t] for t in tasks]))
                lines.append(f"| {src}, each alone (own task) | - | **{mean}** | - | "
                             + " | ".join(f3(a["normalised"][t]) for t in tasks) + " |")
        for method in VARIANTS:
            bef = _find(res, src, method, "none")
            aft = _find(res, src, method, FIX) or bef
            lines.append(
                f"| {src} | {method} | **{f3(bef['normalised']['mean'])}** | "
                f"**{f3(aft['normalised']['mean'])}** | " + " | ".join(
                    f"{f3(bef['normalised'][t])} / {f3(aft['normalised'][t])}" for t in tasks)
                + " |")
    lines += ["", "(`originals`: the rule is the identity on dense inputs, before = after; `sum`: "
              "the rule is the identity for task arithmetic, after = before. `ties-freq`: "
              "TIES with `sign=\"frequency\"`.)", ""]
    # the target
    lines += ["## Against the merge of the originals", "",
              "| density | method | originals | compressed, before | compressed, after | "
              "gap after |", "|---|---|---|---|---|---|"]
    for method in VARIANTS:
        o = _find(res, "originals", method)["normalised"]["mean"]
        for d in densities:
            bef = _find(res, f"compressed {d}", method, "none")["normalised"]["mean"]
            aft = (_find(res, f"compressed {d}", method, FIX) or
                   _find(res, f"compressed {d}", method, "none"))["normalised"]["mean"]
            lines.append(f"| {d} | {method} | {f3(o)} | {f3(bef)} | {f3(aft)} | "
                         f"{aft - o:+.3f} |")
    lines.append("")
    for method in ("ties", "ties-freq"):
        o = _find(res, "originals", method)["normalised"]["mean"]
        gaps = {d: _find(res, f"compressed {d}", method, FIX)["normalised"]["mean"] - o
                for d in densities}
        verdict = "; ".join(
            f"{d}: {g:+.3f} ({'within' if abs(g) <= 0.02 else 'misses'} 0.02"
            + ("" if abs(g) <= 0.02 else f" by {abs(g) - 0.02:.3f}") + ")"
            for d, g in gaps.items())
        lines.append(f"Target (TIES of compressed within 0.02 of TIES of the originals), "
                     f"`{method}` after `{FIX}`: {verdict}.")
        lines.append("")
    st = res["structure"]
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
        "strongly expert i comes through a merge:",
        "",
        "| inputs | TIES divisor 1 / 2 / 3 (fraction of entries) | TIES share per expert | "
        "sum share per expert |",
        "|---|---|---|---|",
        f"| originals | {' / '.join(f'{x:.2f}' for x in st['dense']['ties_divisors'])} | "
        f"{', '.join(f'{x:.2f}' for x in st['dense']['ties_share'])} | "
        f"{', '.join(f'{x:.2f}' for x in st['dense']['sum_share'])} |",
    ]
    for d in densities:
        r = st["sparse"][str(d)]
        lines.append(
            f"| compressed {d} | {' / '.join(f'{x:.2f}' for x in r['ties_divisors'])} | "
            f"{', '.join(f'{x:.2f}' for x in r['ties_share'])} (after: "
            f"{', '.join(f'{x:.2f}' for x in r['ties_fix_share'])}) | "
            f"{', '.join(f'{x:.2f}' for x in r['sum_share'])} |")
    lines += [
        "",
        f"`{FIX}` (in `compeft_format.merge`) treats a zero of a ternary input as what it is, "
        "an entry dropped by the compression whose sign is unknown: it agrees with the elected "
        "sign with chance p (estimated from the inputs: the fraction of overlapping kept "
        "entries that share a sign; about 1/2 here, as for independent experts) and would "
        "then have counted in the originals' divisor, so each zero adds p to the divisor. "
        "It brings each expert's share back to the originals' TIES share (table above) with "
        "no data and no fitted constant. What it cannot undo is the compression error itself: "
        "each compressed expert carries, besides its original component, an orthogonal part "
        "of energy ||t_hat||^2 - ||t||^2 = " + ", ".join(
            f"{np.mean([x * x - 1 for x in st['sparse'][str(d)]['norm_ratio']]):.2f}"
            f" ||t||^2 at {d}" for d in densities) +
        "; alone it costs an expert little (\"each alone\" rows), merged it adds to the "
        "interference between experts, more so the lower the density. `sum` needs no divisor "
        "fix (its shares already equal the originals'), and the rule leaves it unchanged.",
        "",
    ]
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


def plot(res: dict, densities: tuple[float, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=120)
    ds = list(densities)
    for method, color in zip(VARIANTS, ("C0", "C1", "C2"), strict=True):
        o = _find(res, "originals", method)["normalised"]["mean"]
        ax.axhline(o, color=color, ls=":", lw=1.5, label=f"{method}, originals")
        for rule, ls, mk in (("none", "--", "x"), (FIX, "-", "o")):
            if _find(res, f"compressed {ds[0]}", method, rule) is None:
                continue  # the rule is the identity for sum
            y = [_find(res, f"compressed {d}", method, rule)["normalised"]["mean"] for d in ds]
            label = f"{method}, compressed, " + ("before (PEFT)" if rule == "none"
                                                 else f"after ({FIX})")
            ax.plot(ds, y, color=color, ls=ls, marker=mk, label=label)
    alone = [np.mean([_find(res, f"compressed {d}", "alone")["normalised"][t]
                      for t in res["tasks"]]) for d in ds]
    ax.plot(ds, alone, color="k", ls="-.", marker=".", label="each compressed expert alone")
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
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--densities", default=",".join(map(str, DENSITIES)))
    ap.add_argument("--reuse", type=Path, help="an earlier merge_quality.json on the same "
                    "experts: its rows are taken, only missing ones are evaluated")
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="only write the report and plot again from a result JSON")
    args = ap.parse_args()
    densities = tuple(float(x) for x in args.densities.split(","))
    if args.render:
        res = json.loads(args.render.read_text())
        load = res["load_at_start"]
    else:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        reuse = json.loads(args.reuse.read_text()) if args.reuse else None
        res = run(args.cache, densities, reuse)
        res["load_at_start"] = load
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "merge_quality.json").write_text(json.dumps(res, indent=1, default=float))
    (args.out / "merge_quality.md").write_text(markdown(res, densities, load))
    plot(res, densities, args.out / "merge_quality.png")
    print(f"wrote {args.out / 'merge_quality.md'}")


if __name__ == "__main__":
    main()
