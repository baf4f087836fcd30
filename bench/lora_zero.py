"""LoRA adapters without their initial state: representations of an adapter compressed from zero.

PEFT starts LoRA's ``A`` random (kaiming-uniform) and ``B`` at zero, and does not save the
initial adapter. Compressed *from zero* (as the paper's code and the package's default for an
adapter folder do), most of what is kept of ``A`` is initialisation noise; compressed *from
its initial adapter*, ``A``'s random part costs nothing. This module builds, from an adapter
``{A, B}`` (and, for the reference, its initial adapter), the compressed adapters of several
representations, each as the records of a real file (sizes counted by the package's
``Writer``):

* ``init``: the task vector ``adapter - init`` (the reference; needs the initial adapter);
* ``zero``: ``adapter - 0``, one global selection, the default scale (the package today);
* ``zero_roles``: from zero, ``A``'s and ``B``'s each their own global selection and scale
  (``B`` holds the learned part, ``A`` mostly noise of another magnitude);
* ``zero_balanced``: from zero, each module's factors first re-balanced (``B A = (B D)
  (D^-1 A)`` with ``D`` diagonal, so that column ``i`` of ``B`` and row ``i`` of ``A`` have the
  same norm): a top-k selection by magnitude then ranks entries by what they move in ``B A``;
* ``zero_refit``: from zero, ``A`` compressed first, then ``B`` refitted to the compressed
  ``A`` by least squares (``B* = B A pinv(A_hat)``, the best ``B`` for the product) and
  compressed;
* ``seed`` (``--files``): the initial adapter regenerated from its seed, as the package does
  it (``compress_file(base="peft-init")``: :mod:`compeft_format.peft_init` finds the seed,
  PEFT regenerates the initial state, the file records the recipe, decompress regenerates
  it), against ``init`` and ``zero`` made the same way: real files through
  ``compress_file``/``decompress_file``, sizes of the files on disk (metadata included).

Each function returns ``(adapter_hat, items)``: the rebuilt adapter (PEFT names -> float32
arrays) and the file's records.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from compeft_format.compress import compress

Adapter = Mapping[str, np.ndarray]


def _pairs(adapter: Adapter) -> list[tuple[str, str]]:
    return [(a, a.replace(".lora_A.", ".lora_B.")) for a in sorted(adapter) if ".lora_A." in a]


def _compress(tv: Mapping[str, np.ndarray], density: float, **kw):
    comp = compress(tv, density=density, **kw)
    recon = {n: t.to_numpy().astype(np.float32) for n, t in comp.items()}
    return recon, [(n, t, None) for n, t in comp.items()]


def rep_init(adapter: Adapter, init: Adapter, density: float, **kw):
    tv = {n: (adapter[n] - init[n]).astype(np.float32) for n in adapter}
    recon, items = _compress(tv, density, **kw)
    return {n: init[n] + recon[n] for n in adapter}, items


def rep_zero(adapter: Adapter, density: float, **kw):
    recon, items = _compress({n: np.asarray(v, np.float32) for n, v in adapter.items()},
                             density, **kw)
    return recon, items


def rep_zero_roles(adapter: Adapter, density: float, density_a: float | None = None, **kw):
    a_names = [n for n in adapter if ".lora_A." in n]
    b_names = [n for n in adapter if n not in a_names]
    ra, ia = _compress({n: adapter[n] for n in a_names}, density_a or density, **kw)
    rb, ib = _compress({n: adapter[n] for n in b_names}, density, **kw)
    return {**ra, **rb}, ia + ib


def balance(adapter: Adapter) -> dict[str, np.ndarray]:
    """Each module's ``(B D, D^-1 A)`` with column ``i`` of ``B`` as long as row ``i`` of ``A``."""
    out = {}
    for a, b in _pairs(adapter):
        A, B = np.asarray(adapter[a], np.float64), np.asarray(adapter[b], np.float64)
        ra, cb = np.linalg.norm(A, axis=1), np.linalg.norm(B, axis=0)
        d = np.sqrt(np.where((ra > 0) & (cb > 0), ra / np.maximum(cb, 1e-300), 1.0))
        out[a] = (A / d[:, None]).astype(np.float32)
        out[b] = (B * d[None, :]).astype(np.float32)
    for n in adapter:
        out.setdefault(n, np.asarray(adapter[n], np.float32))
    return out


def rep_zero_balanced(adapter: Adapter, density: float):
    return rep_zero(balance(adapter), density)


def rep_zero_refit(adapter: Adapter, density: float):
    a_names = [n for n in adapter if ".lora_A." in n]
    ra, ia = _compress({n: adapter[n] for n in a_names}, density)
    refit = {}
    for a, b in _pairs(adapter):
        A, B = np.asarray(adapter[a], np.float64), np.asarray(adapter[b], np.float64)
        Ah = ra[a].astype(np.float64)
        refit[b] = (B @ A @ np.linalg.pinv(Ah)).astype(np.float32)
    rb, ib = _compress(refit, density)
    return {**ra, **rb}, ia + ib


def product_error(adapter: Adapter, hat: Adapter) -> float:
    """Relative Frobenius error of ``sum over modules of B A`` (the merged weight deltas)."""
    num = den = 0.0
    for a, b in _pairs(adapter):
        p = np.asarray(adapter[b], np.float64) @ np.asarray(adapter[a], np.float64)
        q = np.asarray(hat[b], np.float64) @ np.asarray(hat[a], np.float64)
        num += float(((q - p) ** 2).sum())
        den += float((p**2).sum())
    return (num / den) ** 0.5


def product_cosine(adapter: Adapter, hat: Adapter) -> float:
    """Cosine of the merged weight deltas ``B A`` (all modules together) with the exact ones."""
    dot = pp = qq = 0.0
    for a, b in _pairs(adapter):
        p = np.asarray(adapter[b], np.float64) @ np.asarray(adapter[a], np.float64)
        q = np.asarray(hat[b], np.float64) @ np.asarray(hat[a], np.float64)
        dot += float((p * q).sum())
        pp += float((p * p).sum())
        qq += float((q * q).sum())
    return dot / (pp * qq) ** 0.5 if pp and qq else 0.0


# ---------------------------------------------------------------------------------------------
# the experiment: every representation on the LoRA experts of bench/experts.py
# ---------------------------------------------------------------------------------------------
REPS = {
    "init": lambda w, init, d: rep_init(w, init, d),
    "init_gram": lambda w, init, d: rep_init(w, init, d, scale="gram"),
    "zero": lambda w, init, d: rep_zero(w, d),
    "zero_gram": lambda w, init, d: rep_zero(w, d, scale="gram"),
    "zero_roles": lambda w, init, d: rep_zero_roles(w, d),
    "zero_roles_gram": lambda w, init, d: rep_zero_roles(w, d, scale="gram"),
    "zero_balanced": lambda w, init, d: rep_zero_balanced(w, d),
    "zero_refit": lambda w, init, d: rep_zero_refit(w, d),
}


def file_rows(folder, init_dir, densities, score, base_model=None, label=""):
    """``zero``, ``init`` and ``seed`` as real files of the adapter ``folder``: compressed
    by ``compress_file`` (``"zero"``; the saved initial adapter ``init_dir``; ``"peft-init"``),
    decompressed by ``decompress_file``, scored by ``score(adapter) -> (score, kept)``.
    Yields one dict a file; ``same_as_init``: the seed's decompressed adapter equals the
    initial adapter's bit for bit."""
    import tempfile
    import time
    from pathlib import Path

    from safetensors.numpy import load_file

    import compeft_format as cf

    n = sum(v.size for v in load_file(str(Path(folder) / "adapter_model.safetensors")).values())
    with tempfile.TemporaryDirectory() as tmp:
        for d in densities:
            got, sizes = {}, {}
            # base "zero": from zero without trying the seed (the default for a LoRA
            # folder is the seed's where it is found)
            for rep, base in (("zero", "zero"), ("init", init_dir), ("seed", "peft-init")):
                out, back = Path(tmp) / f"{rep}-{d}", Path(tmp) / f"{rep}-{d}-r"
                t0 = time.perf_counter()
                s = cf.compress_file(folder, out, density=d, base=base, base_model=base_model)
                seconds = time.perf_counter() - t0
                cf.decompress_file(out, back, base=init_dir if rep == "init" else None,
                                   base_model=base_model)
                got[rep] = load_file(str(back / "adapter_model.safetensors"))
                sc, kept = score(got[rep])
                row = {"adapter": label, "density": d, "rep": rep, "file_bytes": s.file_bytes,
                       "bits_per_param": 8 * s.file_bytes / n, "score": sc, "kept": kept,
                       "compress_seconds": seconds, "note": s.note}
                if rep == "seed":
                    row["same_as_init"] = sorted(got["seed"]) == sorted(got["init"]) and all(
                        np.array_equal(got["seed"][k], got["init"][k]) for k in got["init"])
                yield row
                sizes[rep] = s.file_bytes
            # from zero at the seed file's size (its files are smaller at equal density):
            # the density scaled by the size ratio, twice (the size is nearly linear in it)
            dz, bz = d, sizes["zero"]
            for _ in range(2):
                dz = min(1.0, dz * sizes["seed"] / bz)
                out, back = Path(tmp) / f"zeq-{d}", Path(tmp) / f"zeq-{d}-r"
                bz = cf.compress_file(folder, out, density=dz, base="zero",
                                      force=True).file_bytes
            cf.decompress_file(out, back, force=True)
            sc, kept = score(load_file(str(back / "adapter_model.safetensors")))
            yield {"adapter": label, "density": d, "rep": "zero_eqsize", "zero_density": dz,
                   "file_bytes": bz, "bits_per_param": 8 * bz / n, "score": sc, "kept": kept}


def main_files(args) -> None:
    """``--files``: zero / init / seed as real files, on the experts and tests/data's LoRA."""
    import json
    import os
    import sys
    from pathlib import Path

    import torch

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    from bench.experts import CACHE, Experts, model_dir
    from bench.scale_rules import Scorer, merge_adapter

    densities = [float(x) for x in args.densities.split(",")]
    out = []

    def emit(row):
        out.append(row)
        print(json.dumps(row), flush=True)
        args.json.write_text(json.dumps(out, indent=1))

    which = args.tasks.split(",") if args.tasks else ["sentiment", "frequency", "syllables",
                                                      "tests-data"]
    experts = [t for t in which if t != "tests-data"]
    if experts:
        ex = Experts.load()
        base = ex.base_scores()
        for task in experts:
            full = ex.scores(ex.adapters[task], (task,))[task]

            def score(adapter, task=task, full=full):
                s = ex.scores(adapter, (task,))[task]
                return s, (s - base[task]) / (full - base[task])

            for row in file_rows(CACHE / task, CACHE / "init", densities, score,
                                 label=f"expert {task}"):
                emit(row)
    if "tests-data" in which:
        folder = root / "tests" / "data" / "lora-minilm-vader"
        mdir = model_dir(None)  # the same model as the config's hub name, from the wheel
        scorer = Scorer(mdir, "cpu")
        cfg = json.loads((folder / "adapter_config.json").read_text())
        scaling = cfg["lora_alpha"] / cfg["r"]

        def merged(adapter):
            t = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in adapter.items()}
            return merge_adapter("lora", scorer.base, t, scaling)

        full = load_file_np(folder / "adapter_model.safetensors")
        scorer.target = scorer.embed(merged(full))
        b = scorer.score({})

        def score_t(adapter):
            s = scorer.score(merged(adapter))
            return s, (s - b) / (1 - b)

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        for row in file_rows(folder, folder / "init", densities, score_t, base_model=mdir,
                             label="tests/data LoRA"):
            emit(row)


def load_file_np(path):
    from safetensors.numpy import load_file

    return load_file(str(path))


def main() -> None:
    """Score every representation on each expert's own task; print JSON lines."""
    import argparse
    import json
    import sys
    import time
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.experts import Experts
    from compeft_format.sweep import count_file_bytes

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", default="init,zero,zero_gram,zero_roles")
    ap.add_argument("--densities", default="0.05,0.1,0.2")
    ap.add_argument("--tasks", help="comma-separated tasks (default: every expert)")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--files", action="store_true", help="zero / init / seed (peft-init) as "
                    "real files through compress_file, on the experts and tests/data's LoRA "
                    "(--tasks may name tests-data)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.files:
        main_files(args)
        return
    ex = Experts.load()
    base = ex.base_scores()
    out = []
    for task in args.tasks.split(",") if args.tasks else ex.tasks:
        w = ex.adapters[task]
        n = sum(v.size for v in w.values())
        full = ex.scores(w, (task,))[task]
        for d in map(float, args.densities.split(",")):
            for rep in args.reps.split(","):
                t0 = time.perf_counter()
                hat, items = REPS[rep](w, ex.init, d)
                size = count_file_bytes(sorted(items, key=lambda it: it[0].encode()))[0]
                s = ex.scores(hat, (task,))[task]
                row = {"task": task, "density": d, "rep": rep, "bits_per_param": 8 * size / n,
                       "score": s, "kept": (s - base[task]) / (full - base[task]),
                       "product_cosine": product_cosine(w, hat),
                       "seconds": time.perf_counter() - t0}
                out.append(row)
                print(json.dumps(row), flush=True)
                args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
