"""Quality against true size: structures beyond one ternary scale, and the high-fidelity end.

Every structure starts from the same ComPEFT selection (global top-k by magnitude) or adds to
it, rebuilds the task vector, and is scored by the rebuilt model (``bench/scale_rules.py``'s
score: mean cosine of the sentence embeddings with the true fine-tune's). Its size is the
size of a real file: every record goes through the package's ``Writer`` into a counting sink
(:func:`compeft_format.sweep.count_file_bytes`, all overhead included). Structures the format
cannot yet *decode as one tensor* are written as the records it would need today:

* ``single``: one ternary record per tensor, the default scale (``proj_vcap``); the baseline.
* ``per_tensor``: the same selection, each tensor its own scale ``l2_t * (proj / l2)`` (the
  tensor's least-squares magnitude times the global overshoot; the format stores one scale
  per record already, so this is storable today at the same size).
* ``levels``: every kept entry gets one of ``L`` magnitudes (a Lloyd-Max codebook over the
  kept magnitudes of the whole task vector); stored as the ternary record (its scale the
  smallest level) plus a dense ``U8`` record per tensor with the level codes bit-packed
  (``ceil(log2 L)`` bits per kept entry, zstd stage on), plus the codebook as a small dense
  ``F32`` record. ``L = 2`` is "a second magnitude level".
* ``outliers``: the ``m`` largest entries exact (a ternary record for their positions and
  signs, a dense ``F16`` record for their magnitudes), the rest of the kept entries ternary.
* ``residual``: a second ternary pass on what the first one left (two ternary records per
  tensor, summed on decoding).
* ``hifi``: every entry kept, ``rint(x / step)`` as integer codes, entropy-coded
  (:mod:`compeft_format.hifi`: a real file written by ``save_hifi`` and decoded by
  ``load_hifi``; size = the file's). Swept over the step, in root-mean-squares of the task
  vector (``rel_step``). ``hifi_lora``: the same with ``lora_weights`` (each LoRA factor's
  step divided by its partner's norm: the merged-weight error); ``hifi_probe``: with
  ``probe_weights`` measured on 40 *calibration* sentences (synthetic, seed 123; never the
  evaluation sentences), one group per LoRA module or per tensor: uses data, as a tuned
  scale does.

Every multi-part structure scales its parts so that the rebuilt vector keeps the projection
on the task vector (``<t, t_hat> = ||t||^2``, as ``proj`` does for one scale): the parts get
their least-squares magnitudes, then one common factor. Run from the repository root::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/fidelity.py --quick --json /tmp/f.json
    # the committed results: the tests/data LoRA, and the project's full fine-tune (100
    # AdamW steps at lr 1e-4, as bench/scale_rules.py trains it; cached in --cache)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/fidelity.py --only lora --json lora.json
    HF_HUB_OFFLINE=1 .venv/bin/python bench/fidelity.py --only full-lr0.0001 --steps 100 \
        --json full.json
    .venv/bin/python bench/fidelity.py --report-from lora.json full.json \
        --out bench/results/fidelity.md --plot bench/results/fidelity.png
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from compeft_format.compress import compress
from compeft_format.hifi import hifi_codes, load_hifi, lora_weights, probe_weights, save_hifi
from compeft_format.sweep import count_file_bytes
from compeft_format.tensor import TernaryTensor


@dataclass
class Built:
    """A rebuilt task vector and the records its file would hold."""

    recon: dict[str, np.ndarray]
    items: list[tuple[str, object, str | None]]
    nbytes: int | None = None  # the size of a file written and read back (``hifi``)
    entropy_bits: float | None = None  # the codes' order-0 entropy per parameter (``hifi``)

    def file_bytes(self) -> int:
        if self.nbytes is not None:
            return self.nbytes
        items = sorted(self.items, key=lambda it: it[0].encode())
        return count_file_bytes(items)[0]


def _flat(tv: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: np.asarray(v, np.float64).reshape(-1) for n, v in tv.items()}


def _ternary(shape, idx, neg, scale) -> TernaryTensor:
    return TernaryTensor(tuple(shape), np.asarray(idx, np.int64), np.asarray(neg, bool),
                         float(scale), "F32")


def _selection(tv: Mapping[str, np.ndarray], density: float) -> dict[str, np.ndarray]:
    """The global top-k flat indices of every tensor (the package's exact selection)."""
    comp = compress(tv, density=density, scale="l2")
    return {n: comp[n].indices for n in tv}


def _proj_factor(flat: Mapping[str, np.ndarray], parts: Mapping[str, np.ndarray]) -> float:
    """The factor c making ``<t, c * parts> = ||t||^2``."""
    num = sum(float(f @ f) for f in flat.values())
    den = sum(float(flat[n] @ parts[n]) for n in flat)
    return num / den if den > 0 else 1.0


def single(tv, density: float, alpha: float = 1.0) -> Built:
    """One ternary record per tensor at the default scale."""
    comp = compress(tv, density=density, alpha=alpha)
    recon = {n: t.to_numpy().astype(np.float64).reshape(-1) for n, t in comp.items()}
    return Built(recon, [(n, t, None) for n, t in comp.items()])


def per_tensor(tv, density: float) -> Built:
    """Global selection, each tensor ``l2_t`` times the global ``proj / l2`` factor."""
    flat = _flat(tv)
    sel = _selection(tv, density)
    parts = {}
    for n, f in flat.items():
        p = np.zeros_like(f)
        if sel[n].size:
            p[sel[n]] = np.sign(f[sel[n]]) * np.abs(f[sel[n]]).mean()
        parts[n] = p
    c = _proj_factor(flat, parts)
    recon, items = {}, []
    for n, f in flat.items():
        idx = sel[n]
        s = c * (float(np.abs(f[idx]).mean()) if idx.size else 0.0)
        t = _ternary(tv[n].shape, idx, f[idx] < 0, s)
        recon[n] = t.to_numpy().astype(np.float64).reshape(-1)
        items.append((n, t, None))
    return Built(recon, items)


def lloyd_max(x: np.ndarray, levels: int, iters: int = 30) -> np.ndarray:
    """A ``levels``-point codebook minimising the squared error of ``x`` (sorted)."""
    x = np.sort(x)
    cb = np.quantile(x, (np.arange(levels) + 0.5) / levels)
    for _ in range(iters):
        edges = (cb[1:] + cb[:-1]) / 2
        cut = np.searchsorted(x, edges)
        sums = np.add.reduceat(x, np.r_[0, cut]) if x.size else np.zeros(levels)
        counts = np.diff(np.r_[0, cut, x.size])
        # reduceat repeats a value for an empty bin: keep the old centre there
        cb = np.where(counts > 0, sums / np.maximum(counts, 1), cb)
        cb.sort()
    return cb


def _pack_codes(codes: np.ndarray, levels: int) -> np.ndarray:
    """Level codes as ``ceil(log2 levels)`` bit planes, packed 8 to a byte."""
    bits = max(1, math.ceil(math.log2(levels)))
    planes = [((codes >> b) & 1).astype(np.uint8) for b in range(bits)]
    return np.packbits(np.concatenate(planes)) if codes.size else np.zeros(0, np.uint8)


def levels(tv, density: float, n_levels: int) -> Built:
    """Kept entries quantised to a ``n_levels``-point global codebook of magnitudes."""
    flat = _flat(tv)
    sel = _selection(tv, density)
    mags = np.concatenate([np.abs(flat[n][sel[n]]) for n in flat])
    cb = lloyd_max(mags, n_levels)
    edges = (cb[1:] + cb[:-1]) / 2
    codes, parts = {}, {}
    for n, f in flat.items():
        m = np.abs(f[sel[n]])
        codes[n] = np.searchsorted(edges, m).astype(np.uint8)
        p = np.zeros_like(f)
        p[sel[n]] = np.sign(f[sel[n]]) * cb[codes[n]]
        parts[n] = p
    c = _proj_factor(flat, parts)
    recon, items = {}, [("~codebook", (c * cb).astype(np.float32), None)]
    for n, f in flat.items():
        recon[n] = c * parts[n]
        items.append((n, _ternary(tv[n].shape, sel[n], f[sel[n]] < 0, c * cb[0]), None))
    # every tensor's codes in one record, in record order (as one block per record would be)
    order = sorted(flat, key=lambda n: n.encode())
    all_codes = np.concatenate([codes[n] for n in order])
    items.append(("~levels", _pack_codes(all_codes, n_levels), None))
    return Built(recon, items)


def outliers(tv, density: float, frac: float) -> Built:
    """The ``frac`` largest entries of the task vector exact (F16), the rest of the kept
    entries ternary with a projection-preserving scale."""
    flat = _flat(tv)
    sel = _selection(tv, density)
    top = _selection(tv, frac)
    recon, items = {}, []
    out_sq = sum(float(flat[n][top[n]] @ flat[n][top[n]]) for n in flat)
    rest = {n: np.setdiff1d(sel[n], top[n], assume_unique=True) for n in flat}
    rest_sum = sum(float(np.abs(flat[n][rest[n]]).sum()) for n in flat)
    total = sum(float(f @ f) for f in flat.values())
    s = (total - out_sq) / rest_sum if rest_sum else 0.0
    order = sorted(flat, key=lambda n: n.encode())
    offsets = dict(zip(order, np.cumsum([0] + [flat[n].size for n in order[:-1]]), strict=True))
    pos, neg, vals = [], [], []
    for n, f in flat.items():
        t = _ternary(tv[n].shape, rest[n], f[rest[n]] < 0, s)
        v = np.abs(f[top[n]]).astype(np.float16)
        r = t.to_numpy().astype(np.float64).reshape(-1)
        r[top[n]] = np.sign(f[top[n]]) * v.astype(np.float64)
        recon[n] = r
        items.append((n, t, None))
    for n in order:  # all outliers in two records: positions + signs, and F16 magnitudes
        pos.append(top[n] + offsets[n])
        neg.append(flat[n][top[n]] < 0)
        vals.append(np.abs(flat[n][top[n]]).astype(np.float16))
    total_n = sum(f.size for f in flat.values())
    items += [("~outliers", _ternary((total_n,), np.concatenate(pos), np.concatenate(neg), 1.0),
               None), ("~outlier_values", np.concatenate(vals), None)]
    return Built(recon, items)


def residual(tv, densities: Iterable[float], n_levels: int = 1) -> Built:
    """Successive passes, each on what the previous ones left (``levels`` when
    ``n_levels > 1``, else one least-squares scale per pass), then one common factor."""
    flat = _flat(tv)
    left = dict(tv)
    total = {n: np.zeros_like(f) for n, f in flat.items()}
    items: list = []
    for i, d in enumerate(densities):
        part = levels(left, d, n_levels) if n_levels > 1 else _ls_pass(left, d)
        for n in flat:
            total[n] += part.recon[n]
            left[n] = (flat[n] - total[n]).reshape(np.shape(tv[n]))
        items += [(f"{name}.r{i}", v, dt) for name, v, dt in part.items]
    c = _proj_factor(flat, total)
    return Built({n: c * v for n, v in total.items()}, items)


def _ls_pass(tv, density: float) -> Built:
    """One global selection, one least-squares scale per tensor (a residual pass)."""
    comp = compress(tv, density=density, scale="l2", scope="global")
    flat = _flat(tv)
    recon, items = {}, []
    for n, t in comp.items():
        idx = t.indices
        s = float(np.abs(flat[n][idx]).mean()) if idx.size else 0.0
        tt = _ternary(t.shape, idx, t.signs, s)
        recon[n] = tt.to_numpy().astype(np.float64).reshape(-1)
        items.append((n, tt, None))
    return Built(recon, items)


def hifi(tv, rel_step: float, weights: Mapping[str, float] | None = None) -> Built:
    """The task vector through :func:`compeft_format.hifi.save_hifi` into a real file and
    back through :func:`~compeft_format.hifi.load_hifi`: size and values are the file's."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "expert.compeft")
        steps = save_hifi(tv, path, rel_step=rel_step, weights=weights)
        back = load_hifi(path)
        nbytes = os.path.getsize(path)
    bits = 0.0
    for name, s in steps.items():
        _, counts = np.unique(hifi_codes(tv[name], s, name=name), return_counts=True)
        p = counts / counts.sum()
        bits -= float(counts @ np.log2(p))
    recon = {n: v.astype(np.float64).reshape(-1) for n, v in back.items()}
    return Built(recon, [], nbytes=nbytes, entropy_bits=bits / numel(tv))


def calibration_probe(scorer, case, lora: Mapping[str, np.ndarray] | None,
                      n: int = 40, seed: int = 123, rel_step: float = 0.5):
    """A function of the task vector giving :func:`~compeft_format.hifi.probe_weights`'s
    weights (computed once): distortion = 1 - the mean cosine of the rebuilt model's
    embeddings with the fine-tune's on ``n`` synthetic calibration sentences
    (``scale_rules.synthetic_sentences``, ``seed``), never the evaluation sentences; groups:
    a LoRA module's two factors together, every other tensor alone; each group quantised at
    ``rel_step`` (its noise must move the score above float32's resolution, ~1e-7)."""
    import copy

    import torch

    from bench import scale_rules as sr

    texts, _ = sr.synthetic_sentences(n, seed)
    cal = copy.copy(scorer)  # same model and tokenizer, other inputs and target
    enc = scorer.tokenizer(texts, padding=True, return_tensors="pt")
    cal.enc = {k: v.to(scorer.device) for k, v in enc.items()}
    cal.mask = cal.enc["attention_mask"].unsqueeze(-1).float()
    shapes = {name: np.shape(v) for name, v in case.tv.items()}

    def state(tv):
        return case.to_state({name: torch.from_numpy(np.asarray(v, np.float32).reshape(
            shapes[name])).to(scorer.device) for name, v in tv.items()})

    cal.target = cal.embed(state(case.tv))
    cache: dict[str, dict[str, float]] = {}

    def weights(tv) -> dict[str, float]:
        if "w" not in cache:
            base = lora_weights(lora) if lora is not None else None
            cache["w"] = probe_weights(tv, lambda rebuilt: 1 - cal.score(state(rebuilt)),
                                       group=lambda name: name.split(".lora_")[0],
                                       rel_step=rel_step, weights=base)
        return cache["w"]

    return weights


def numel(tv: Mapping[str, np.ndarray]) -> int:
    return sum(int(np.size(v)) for v in tv.values())


# ---------------------------------------------------------------------------------------------
# the experiment
# ---------------------------------------------------------------------------------------------
#: (structure, label, function of the task vector) for every point measured
def settings(quick: bool, lora: Mapping[str, np.ndarray] | None = None,
             probe: object = None) -> list[tuple[str, str, object]]:
    """Every point: ``lora`` (the trained adapter, when the task vector is one) adds the
    hi-fi points with :func:`~compeft_format.hifi.lora_weights`; ``probe`` (a function of
    the task vector giving :func:`~compeft_format.hifi.probe_weights`'s weights from
    calibration data) those with measured weights."""
    dens = (0.02, 0.05, 0.1, 0.2) if not quick else (0.05, 0.2)
    out: list[tuple[str, str, object]] = []
    for d in (0.01, *dens, 0.5, 1.0):
        out.append(("single", f"d={d:g}", lambda tv, d=d: single(tv, d)))
    for d in dens:
        out.append(("per_tensor", f"d={d:g}", lambda tv, d=d: per_tensor(tv, d)))
        out.append(("levels2", f"d={d:g}", lambda tv, d=d: levels(tv, d, 2)))
        out.append(("outliers", f"d={d:g}, 0.1%", lambda tv, d=d: outliers(tv, d, 0.001)))
        out.append(("residual", f"d={d:g}+{d / 2:g}",
                    lambda tv, d=d: residual(tv, (d, d / 2))))
    for d in (0.2, 0.5, 1.0):
        out.append(("levels4", f"d={d:g}", lambda tv, d=d: levels(tv, d, 4)))
        out.append(("levels8", f"d={d:g}", lambda tv, d=d: levels(tv, d, 8)))
    for d in (0.5, 1.0):
        out.append(("residual_levels4", f"d={d:g}+{d:g}",
                    lambda tv, d=d: residual(tv, (d, d), n_levels=4)))
    rel = (0.2, 0.3) if quick else (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.6, 1, 1.5, 2, 3, 5)
    for r in rel:
        out.append(("hifi", f"step {r:g} rms", lambda tv, r=r: hifi(tv, r)))
    if lora is not None:
        w = lora_weights(lora)
        for r in rel:
            out.append(("hifi_lora", f"step {r:g} rms, lora_weights",
                        lambda tv, r=r: hifi(tv, r, w)))
    if probe is not None:
        for r in rel:
            out.append(("hifi_probe", f"step {r:g} rms, probe_weights (calibration data)",
                        lambda tv, r=r: hifi(tv, r, probe(tv))))
    return out


def main() -> None:
    import argparse
    import json
    import os
    import sys
    import time
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench import scale_rules as sr

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer densities")
    ap.add_argument("--only", action="append", help="lora, ia3 or full-lrX (repeatable)")
    ap.add_argument("--structures", help="comma-separated structures to measure (default all)")
    ap.add_argument("--probe-step", type=float, default=0.5,
                    help="rel_step at which hifi_probe measures each group (default 0.5)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (shared machine: 1)")
    ap.add_argument("--steps", type=int, default=300, help="training steps of a full fine-tune")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get(
        "COMPEFT_BENCH_CACHE", Path.home() / ".cache" / "compeft-bench")))
    ap.add_argument("--json", type=Path, help="where the points go (required to measure)")
    ap.add_argument("--report-from", type=Path, nargs="+", metavar="JSON",
                    help="only write the table (--out) and plot (--plot) of earlier runs")
    ap.add_argument("--out", type=Path, help="markdown table of the points")
    ap.add_argument("--plot", type=Path, help="PNG of quality against size")
    args = ap.parse_args()
    if not args.report_from and args.json is None:
        ap.error("--json is required to measure (or --report-from to report)")
    if args.report_from:
        points = [p for path in args.report_from for p in json.loads(path.read_text())]
        if args.out:
            args.out.write_text(crossings(points) + "\n" + table(points))
        if args.plot:
            plot(points, args.plot, peer=(4.1, 0.99999))
        return
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    scorer = sr.Scorer(sr.model_dir(None), "cpu")
    points = []
    for which in args.only or ["lora"]:
        lora = None
        if which in ("lora", "ia3"):
            case = sr.adapter_case(which, scorer)
            if which == "lora":
                from safetensors.numpy import load_file

                lora = load_file(str(sr.ROOT / "tests" / "data" / "lora-minilm-vader"
                                     / "adapter_model.safetensors"))
        else:
            case = sr.full_case(which, scorer, args.steps, float(which.split("lr")[1]),
                                args.cache)
            case.label = f"{which}-steps{args.steps}"
        case.activate()
        base = scorer.score()
        n = numel(case.tv)
        wanted = set(args.structures.split(",")) if args.structures else None
        probe = calibration_probe(scorer, case, lora, rel_step=args.probe_step)
        for structure, label, fn in settings(args.quick, lora, probe):
            if wanted is not None and structure not in wanted:
                continue
            t0 = time.perf_counter()
            built = fn(case.tv)
            delta = {name: torch.from_numpy(np.asarray(v, np.float32).reshape(
                np.shape(case.tv[name]))) for name, v in built.recon.items()}
            score = scorer.score(case.to_state(delta))
            size = built.file_bytes()
            p = {"model": case.label, "structure": structure, "setting": label,
                 "bits_per_param": 8 * size / n, "file_bytes": size, "score": score,
                 "base": base, "seconds": time.perf_counter() - t0}
            if built.entropy_bits is not None:
                p["entropy_bits"] = built.entropy_bits
            points.append(p)
            print(json.dumps(p), flush=True)
            args.json.write_text(json.dumps(points, indent=1))
        del case


def table(points: list[dict]) -> str:
    """Markdown: one row per point, by model, structure and size (``entropy``: the hi-fi
    codes' order-0 entropy per parameter, what an ideal entropy coder would need)."""
    lines = ["| model | structure | setting | bits/param | entropy | file bytes | score | "
             "1 - score |", "|---|---|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (p["model"], p["structure"], p["bits_per_param"])):
        ent = f"{p['entropy_bits']:.3f}" if "entropy_bits" in p else ""
        lines.append(f"| {p['model']} | {p['structure']} | {p['setting']} | "
                     f"{p['bits_per_param']:.3f} | {ent} | {p['file_bytes']:,} | "
                     f"{p['score']:.7f} | {1 - p['score']:.2e} |")
    return "\n".join(lines) + "\n"


def crossings(points: list[dict], goal: float = 0.9999, budget: float = 4.1) -> str:
    """Markdown: per model and structure, the smallest file reaching ``goal`` and the best
    score under ``budget`` bits per parameter (measured points only, no interpolation)."""
    lines = [f"| model | structure | fewest bits/param with score >= {goal} | "
             f"best score under {budget} bits |", "|---|---|---|---|"]
    for key in dict.fromkeys((p["model"], p["structure"]) for p in points):
        mine = [p for p in points if (p["model"], p["structure"]) == key]
        hit = min((p for p in mine if p["score"] >= goal), default=None,
                  key=lambda p: p["bits_per_param"])
        under = max((p for p in mine if p["bits_per_param"] < budget), default=None,
                    key=lambda p: p["score"])
        a = f"{hit['bits_per_param']:.3f} ({hit['setting']}: {hit['score']:.7f})" if hit else "none"
        b = (f"{under['score']:.7f} ({under['setting']}, {under['bits_per_param']:.3f} bits)"
             if under else "none")
        lines.append(f"| {key[0]} | {key[1]} | {a} | {b} |")
    return "\n".join(lines) + "\n"


def plot(points: list[dict], path, peer: tuple[float, float] | None = None) -> None:
    """Quality (1 - score, log) against bits per parameter (log), one panel per model."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(p["model"] for p in points))
    # one colour per structure on every panel; the hi-fi curves dashed and thicker
    others = [st for st in dict.fromkeys(p["structure"] for p in points) if st != "single"]
    palette = plt.get_cmap("tab20").colors
    colors = {st: palette[(2 * i) % 20 + (2 * i) // 20] for i, st in enumerate(others)}
    colors["single"] = "black"
    fig, axes = plt.subplots(1, len(models), figsize=(6.2 * len(models), 4.6), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [p for p in points if p["model"] == model]
        for structure in dict.fromkeys(p["structure"] for p in mine):
            pts = sorted((p for p in mine if p["structure"] == structure),
                         key=lambda p: p["bits_per_param"])
            hi = structure.startswith("hifi")
            ax.plot([p["bits_per_param"] for p in pts], [1 - p["score"] for p in pts],
                    marker="o", ms=4, lw=2.2 if structure == "single" or hi else 1.2,
                    ls="--" if hi else "-", label=structure, color=colors[structure])
        if peer is not None and model.startswith("full"):
            ax.scatter([peer[0]], [1 - peer[1]], marker="*", s=120, color="red",
                       label="peer 4-bit + outliers (third-party model)")
        ax.axhline(1e-4, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("bits per parameter (file size, all overhead)")
        ax.set_ylabel("1 - mean cosine with the fine-tune (lower is better)")
        ax.set_title(f"{model} (untouched base: 1 - {mine[0]['base']:.3f})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("bench/fidelity.py: one scale (black), richer structures, and hi-fi "
                 "(dashed: every entry, entropy-coded)\ndotted line: cosine 0.9999", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
