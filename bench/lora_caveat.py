"""LoRA caveat: merging A and B each on its own is not merging the products B A.

A LoRA expert changes a weight by ``dW = s (B A - B0 A0)`` (``s = lora_alpha / r``; ``A0``,
``B0`` the shared initial adapter). The ComPEFT paper's code, PEFT's non-SVD ``ties`` and
``compeft merge`` merge the task vectors of ``A`` and of ``B`` separately, so the merged
model's change is ``s (B_m A_m - B0 A0)`` with ``A_m = A0 + merge(A_i - A0)`` and likewise
``B_m``: the product of merges, with cross terms ``B_i A_j``. Merging the experts' weight
changes ``dW_i`` themselves (the products) is what task arithmetic and TIES mean on the
model. This script measures how far apart the two are, over all LoRA modules together:
relative Frobenius distance ``||dW_params - dW_products|| / ||dW_products||`` and cosine,
for sum, mean and TIES, on the uncompressed experts and on the experts compressed from the
initial adapter (global scope, default scale).

Experts: ``bench/experts.py``'s cache (three LoRA r=8 experts of all-MiniLM-L6-v2 trained on
three word-level tasks from one initial adapter). Usage::

    python bench/lora_caveat.py [--experts /work/cache/experts] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import compeft_format as cf  # noqa: E402
from compeft_format.merge import merge  # noqa: E402

TASKS = ("sentiment", "frequency", "syllables")


def _load(path: Path) -> dict[str, np.ndarray]:
    with cf.open_safetensors(path / "adapter_model.safetensors") as r:
        return {n: np.array(r.values(n), dtype=np.float64) for n in r}


def _modules(names) -> list[str]:
    return sorted({n.removesuffix(".lora_A.weight") for n in names if n.endswith(".lora_A.weight")})


def _products(a: dict, b: dict, init: dict, scaling: float, modules: list[str]) -> dict:
    """``s (B A - B0 A0)`` per module, float32 (the merge's compute dtype)."""
    out = {}
    for m in modules:
        ka, kb = f"{m}.lora_A.weight", f"{m}.lora_B.weight"
        dw = scaling * (b[kb] @ a[ka] - init[kb] @ init[ka])
        out[m] = dw.astype(np.float32)
    return out


def measure(experts: Path, densities=(0.05, 0.1, 0.2)) -> list[dict]:
    init = _load(experts / "init")
    cfg = json.loads((experts / "init" / "adapter_config.json").read_text())
    scaling = cfg["lora_alpha"] / cfg["r"]
    modules = _modules(init)
    adapters = {t: _load(experts / t) for t in TASKS}
    taus = {t: {n: (adapters[t][n] - init[n]).astype(np.float32) for n in init} for t in TASKS}
    settings = [("original", None)] + [(f"compressed {d:g}", d) for d in densities]
    rows = []
    for label, density in settings:
        if density is None:
            tvs = [taus[t] for t in TASKS]
        else:
            tvs = [{n: v.to_numpy() for n, v in cf.compress(taus[t], density=density).items()}
                   for t in TASKS]
        # each expert's own weight changes, from its (possibly compressed) A and B
        dws = [_products({n: init[n] + tv[n] for n in init}, {n: init[n] + tv[n] for n in init},
                         init, scaling, modules) for tv in tvs]
        for method in ("sum", "mean", "ties"):
            merged_tv = merge(tvs, method=method)
            params = {n: init[n] + merged_tv[n] for n in init}
            via_params = _products(params, params, init, scaling, modules)
            via_products = merge(dws, method=method)
            x = np.concatenate([via_params[m].ravel() for m in modules]).astype(np.float64)
            y = np.concatenate([via_products[m].ravel() for m in modules]).astype(np.float64)
            rows.append({
                "experts": label, "method": method,
                "rel_distance": float(np.linalg.norm(x - y) / np.linalg.norm(y)),
                "cosine": float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))),
                "norm_ratio": float(np.linalg.norm(x) / np.linalg.norm(y)),
            })
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| experts | method | rel. distance | cosine | norm ratio (params / products) |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['experts']} | {r['method']} | {r['rel_distance']:.3f} | "
                     f"{r['cosine']:.3f} | {r['norm_ratio']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=Path, default=Path("/work/cache/experts"))
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    if not all((args.experts / t / "adapter_model.safetensors").is_file()
               for t in (*TASKS, "init")):
        raise SystemExit(f"{args.experts}: no experts; make them with bench/experts.py")
    text = ("Merged LoRA weight change from merging A and B separately, against merging the "
            f"experts' products B A ({', '.join(TASKS)}; all modules together):\n\n"
            + table(measure(args.experts)))
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
