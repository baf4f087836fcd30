"""Analysis: which metric would a LoRA product-scale fit need? Scales under a family of metrics.

For every row of ``bench/lora_scale.py`` (an adapter, a reference, a density; the same
selection, compress's ``proj_vcap`` top-k), the one scale ``s`` minimising the error of the
rebuilt products ``sum_m tr(G_m E_m H_m E_m^T)``, ``E = (B0 + s S_B)(A0 + s S_A) - B A``, for
output metrics ``G = (P P^T / mean eigenvalue + lo I) / (1 + lo)`` and input metrics ``H``
the same with ``P^T P`` and ``li`` (``P = B A`` of the module; ``lo``, ``li`` = inf: the
identity). ``lo = 0, li = inf`` is ``lora_product_out``, ``lo = li = 0``
``lora_product_kron``, both inf ``lora_product``. Each scale is given as a ratio to proj's;
with ``--windows`` (the JSON of a ``bench/lora_scale.py --windows`` run on the same
adapters) it counts the rows whose ratio lies in the band within 0.005 of the tuned score,
and prints, per reference and density, whether the bands of all adapters overlap. Numpy
only (no model, no scoring): about a minute for 40 rows. From the repository root::

    python bench/lora_scale_metrics.py --experts /work/cache/experts-seed1 --no-tests-data \\
        --json /tmp/metrics.json --windows bench/results/lora_scale-seed1.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.lora_scale import DENSITIES, EXPERTS, adapters  # noqa: E402
from compeft_format.compress import compress  # noqa: E402
from compeft_format.lora_scale import (  # noqa: E402
    best_scale,
    kron_metric,
    lora_pairs,
    sign_matrix,
)

INF = float("inf")
FLOORS = (0.0, 1.0, 10.0, INF)


def _gram(x: np.ndarray, u: np.ndarray, side: tuple) -> np.ndarray:
    """``x^T M u`` for ``M = (Q diag(w) Q^T + lam I) / (1 + lam)`` (lam = inf: ``I``)."""
    q, w, lam = side
    if lam == INF:
        return x.T @ u
    return (((x.T @ q) * w) @ (q.T @ u) + lam * (x.T @ u)) / (1 + lam)


def _ip(f: list, g: list, out: tuple, inp: tuple) -> float:
    return sum(float(np.einsum("ij,ij->", _gram(x, u, out), _gram(y.T, v.T, inp)))
               for x, y in f for u, v in g)


def rows(experts: Path, tests_data: bool) -> list[dict]:
    from safetensors.numpy import load_file

    names = ["tests-data"] * tests_data + ["sentiment", "frequency", "syllables"]
    out = []
    for label, (folder, init_dir) in adapters(names, experts).items():
        w = load_file(str(folder / "adapter_model.safetensors"))
        init = load_file(str(init_dir / "adapter_model.safetensors"))
        pairs = [(a, b) for a, b in lora_pairs(w) if np.any(w[a]) and np.any(w[b])]
        bases = {a: kron_metric(w[a], w[b]) for a, b in pairs}  # both sides of B A
        pairs = [(a, b) for a, b in pairs if bases[a] is not None]  # B A = 0: no metric
        for ref_kind in ("init", "zero"):
            ref = init if ref_kind == "init" else None
            tv = {n: (w[n] - (ref[n] if ref else 0)).astype(np.float32) for n in w}
            for d in DENSITIES:
                comp = compress(tv, density=d, scale="proj_vcap")
                proj = comp[pairs[0][0]].scale
                quartics: dict[str, np.ndarray] = {}
                for a_n, b_n in pairs:
                    a, b = w[a_n].astype(np.float64), w[b_n].astype(np.float64)
                    sa, sb = sign_matrix(comp[a_n]), sign_matrix(comp[b_n])
                    c0 = [(-b, a)]
                    c1 = [(sb, ref[a_n].astype(np.float64))] if ref else []
                    c2 = [(sb, sa)]
                    qo, wo, qi, wi = bases[a_n]
                    for lo in FLOORS:
                        for li in FLOORS:
                            o, i = (qo, wo, lo), (qi, wi, li)
                            q = np.array([_ip(c0, c0, o, i), 2 * _ip(c0, c1, o, i),
                                          _ip(c1, c1, o, i) + 2 * _ip(c0, c2, o, i),
                                          2 * _ip(c1, c2, o, i), _ip(c2, c2, o, i)])
                            key = f"out{lo:g}/in{li:g}"
                            quartics[key] = quartics.get(key, 0) + q
                out.append({"adapter": label, "ref": ref_kind, "density": d, "proj": proj,
                            "ratios": {k: (best_scale(q) or 0.0) / proj
                                       for k, q in quartics.items()}})
                print(label, ref_kind, d, flush=True)
    return out


def bands(got: list[dict], windows: Path) -> None:
    band = {(r["adapter"], r["ref"], r["density"]): r for r in
            json.loads(windows.read_text())["rows"] if "window" in r}
    have = [r for r in got if (r["adapter"], r["ref"], r["density"]) in band]
    print(f"rows in the band within 0.005 of tuned (of {len(have)}):")
    for key in have[0]["ratios"] if have else []:
        n = sum(band[r["adapter"], r["ref"], r["density"]]["window"][0] <= r["ratios"][key]
                <= band[r["adapter"], r["ref"], r["density"]]["window"][1] for r in have)
        print(f"  {key:16s} {n}")
    for ref in ("init", "zero"):
        for d in DENSITIES:
            ws = [b["window"] for k, b in band.items() if k[1] == ref and k[2] == d]
            if ws:
                lo, hi = max(w[0] for w in ws), min(w[1] for w in ws)
                print(f"  {ref} {d}: bands of {len(ws)} adapters "
                      f"{'overlap' if lo <= hi else 'do not overlap'} ({lo:.2f}, {hi:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=Path, default=EXPERTS)
    ap.add_argument("--no-tests-data", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--windows", type=Path, help="a bench/lora_scale.py --windows JSON")
    args = ap.parse_args()
    got = rows(args.experts, not args.no_tests_data)
    if args.json:
        args.json.write_text(json.dumps(got, indent=1))
    if args.windows:
        bands(got, args.windows)


if __name__ == "__main__":
    main()
