"""Speed and shipping-time sections: compress, encode and decode against safetensors and a copy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from bench.common import ROOT, Timing, fmt_ms, md_table, time_interleaved
from compeft_format import dumps, load_file, save_file
from compeft_format.compress import compress

DENSITIES = (0.01, 0.05, 0.2)
ENCODE_TARGET_GBPS = 1.0  # encode: at least 1 GB/s of float32-equivalent input
SHIP_ZSTD_LEVEL = 3


def _st_save(tensors: dict[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file as st_save

    st_save(tensors, str(path))


def _st_load(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file as st_load

    return st_load(str(path))


def _st_load_bytes(data: bytes) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    return load(data)


def speed(n: int, densities: tuple[float, ...], repeats: int, work: Path,
          seed: int = 0) -> dict[str, Any]:
    """Time every operation on one ``n``-element float32 task vector at each density.

    Per density, in one interleaved loop (so the ratios share the machine's load): compress
    (selection included), encode (TernaryTensor -> file bytes, default options), decode
    (file in page cache -> dense float32 array), and the baselines on the same dense tensor:
    ``safetensors.numpy.save_file``, ``safetensors.numpy.load_file`` and a numpy copy.
    The shipping inputs (zstd-compressed safetensors, their decode times) are measured in
    the same loop.
    """
    rng = np.random.default_rng(seed)
    tau = rng.standard_normal(n, dtype=np.float32)  # a fine-tuning residual: dense, Gaussian
    tau_st = work / "tau.safetensors"
    _st_save({"t": tau}, tau_st)
    tau_zst = zstandard.ZstdCompressor(level=SHIP_ZSTD_LEVEL).compress(tau_st.read_bytes())
    rows, ship = [], []
    for p in densities:
        t = compress({"t": tau}, density=p)["t"]
        dense = t.to_numpy()  # what decoding produces: the ComPEFT tensor, dense float32
        cpath, spath, spath2 = work / "t.compeft", work / "t.safetensors", work / "w.safetensors"
        save_file({"t": t}, cpath)
        _st_save({"t": dense}, spath)
        st_zst = zstandard.ZstdCompressor(level=SHIP_ZSTD_LEVEL).compress(spath.read_bytes())
        dctx = zstandard.ZstdDecompressor()
        ops = {
            "compress": lambda t=tau, p=p: compress({"t": t}, density=p),
            "encode": lambda t=t: dumps({"t": t}),
            "decode": lambda c=cpath: load_file(c, dense=True)["t"],
            "decode to TernaryTensor": lambda c=cpath: load_file(c)["t"],
            "safetensors save": lambda d=dense, s=spath2: _st_save({"t": d}, s),
            "safetensors load": lambda s=spath: _st_load(s)["t"],
            "numpy copy": lambda d=dense: d.copy(),
            "zstd safetensors load (ComPEFT tensor)":
                lambda z=st_zst, x=dctx: _st_load_bytes(x.decompress(z))["t"],
            "zstd safetensors load (dense original)":
                lambda x=dctx: _st_load_bytes(x.decompress(tau_zst))["t"],
        }
        times = time_interleaved(ops, repeats)
        rows.append({"density": p, "numel": n, "nnz": t.nnz,
                     "times": {k: v.runs for k, v in times.items()}})
        ship.append({"expert": f"{n:,} parameters, density {p:g}", "density": p,
                     "compeft": (cpath.stat().st_size, times["decode"].best),
                     "safetensors": (tau_st.stat().st_size, times["safetensors load"].best),
                     "safetensors+zstd": (len(tau_zst),
                                          times["zstd safetensors load (dense original)"].best),
                     "ternary safetensors+zstd": (len(st_zst),
                                                  times["zstd safetensors load (ComPEFT tensor)"]
                                                  .best)})
        for f in (cpath, spath, spath2):
            f.unlink(missing_ok=True)
    tau_st.unlink(missing_ok=True)
    return {"rows": rows, "shipping": ship}


def _best(row: dict[str, Any], op: str) -> float:
    return Timing(row["times"][op]).best


def speed_md(result: dict[str, Any]) -> str:
    """The speed table (best of N) with the ratios and the two speed targets."""
    rows = result["rows"]
    n = rows[0]["numel"]
    reps = len(rows[0]["times"]["encode"])
    ops = [("compress", "safetensors save"), ("encode", "safetensors save"),
           ("decode", "safetensors load"), ("decode to TernaryTensor", "safetensors load"),
           ("safetensors save", None), ("safetensors load", None), ("numpy copy", None)]
    body = []
    verdict = []
    for r in rows:
        copy = _best(r, "numpy copy")
        for op, base in ops:
            best = _best(r, op)
            med = Timing(r["times"][op]).median
            vs = f"{best / _best(r, base):.2f}" if base else ""
            body.append([f"{r['density']:g}", op, fmt_ms(best), fmt_ms(med),
                         f"{4 * n / best / 1e9:.2f}", vs, f"{best / copy:.2f}"])
        enc = 4 * n / _best(r, "encode") / 1e9
        dec = _best(r, "decode") / _best(r, "safetensors load")
        verdict.append(f"p = {r['density']:g}: encode {enc:.2f} GB/s "
                       f"({'met' if enc >= ENCODE_TARGET_GBPS else 'NOT met'}); decode "
                       f"{fmt_ms(_best(r, 'decode'))} ms = {dec:.2f} x safetensors load "
                       f"({'met' if dec <= 1.0 else 'NOT met'})")
    header = ["density", "operation", "best ms", "median ms", "GB/s (f32 equiv.)",
              "x safetensors (save / load)", "x numpy copy"]
    return "\n".join([
        f"One float32 task vector of {n:,} elements (standard normal), compressed at each "
        f"density; best and median of {reps} interleaved runs (every operation once per round, "
        "so all share the same background load); files in the page cache. compress = "
        "`compress({'t': tau}, density=p)` (selection included); encode = `dumps` of the "
        "ternary tensor (default options: positions auto, zstd 3); decode = "
        "`load_file(path, dense=True)['t']` (dense float32 array); decode to TernaryTensor = "
        "`load_file(path)['t']`. Ratios: compress and encode against safetensors save, decode "
        "against safetensors load, of the same dense float32 tensor; and against a numpy copy "
        "of it. GB/s = 4 bytes x numel / time.", "",
        md_table(header, body, "llrrrrr"), "",
        f"Targets (encode >= {ENCODE_TARGET_GBPS:g} GB/s; decode no slower than safetensors "
        "load): " + "; ".join(verdict) + "."])


def adapter_shipping(work: Path, density: float = 0.1, repeats: int = 5) -> list[dict[str, Any]]:
    """The real adapters as experts: compeft file (global, ``density``) vs their safetensors."""
    from bench.sizes import ADAPTERS
    from compeft_format.taskvec import peft_task_vector

    out = []
    for label, folder, peft_type in ADAPTERS:
        d = ROOT / folder
        model = d / "adapter_model.safetensors"
        if not model.exists():
            continue
        weights = _st_load(model)
        init_path = d / "init" / "adapter_model.safetensors"
        init = _st_load(init_path) if init_path.exists() else None
        comp = compress(peft_task_vector(weights, peft_type, init=init), density=density)
        cpath = work / "adapter.compeft"
        save_file(comp, cpath)
        raw = model.read_bytes()
        zst = zstandard.ZstdCompressor(level=SHIP_ZSTD_LEVEL).compress(raw)
        dctx = zstandard.ZstdDecompressor()
        times = time_interleaved({
            "compeft": lambda c=cpath: load_file(c, dense=True),
            "safetensors": lambda m=model: _st_load(m),
            "safetensors+zstd": lambda z=zst, x=dctx: _st_load_bytes(x.decompress(z)),
        }, repeats)
        out.append({"expert": f"{label} adapter, density {density:g} (global)",
                    "density": density,
                    "compeft": (cpath.stat().st_size, times["compeft"].best),
                    "safetensors": (len(raw), times["safetensors"].best),
                    "safetensors+zstd": (len(zst), times["safetensors+zstd"].best)})
        cpath.unlink(missing_ok=True)
    return out


def shipping_md(experts: list[dict[str, Any]], link_mbps: float) -> str:
    """Fetch (bytes / link speed) plus decode (measured) per expert and form."""
    forms = [("compeft", "this format (decode to dense)"),
             ("safetensors", "dense safetensors (F32 original)"),
             ("safetensors+zstd", f"zstd-{SHIP_ZSTD_LEVEL} safetensors (F32 original)"),
             ("ternary safetensors+zstd", f"zstd-{SHIP_ZSTD_LEVEL} safetensors of the ComPEFT "
                                          "tensor (dense F32)")]
    body = []
    for e in experts:
        base = None
        for key, label in forms:
            if key not in e:
                continue
            size, decode = e[key]
            fetch = 8 * size / (link_mbps * 1e6)
            total = fetch + decode
            base = base if base is not None else total
            body.append([e["expert"], label, f"{size / 1e6:,.3f}", f"{fetch:,.3f}",
                         f"{decode:,.3f}", f"{total:,.3f}", f"{total / base:.1f}"])
    header = ["expert", "form", "MB", "fetch s", "decode s", "total s", "x this format"]
    return "\n".join([
        f"Time to fetch and decode one expert over a {link_mbps:g} Mbit/s link: fetch = bytes / "
        "link speed; decode = best measured time from bytes in memory or the page cache to dense "
        "numpy arrays (`load_file(dense=True)`; `safetensors.numpy.load_file`; zstd decompress "
        "then `safetensors.numpy.load`). The original of the synthetic experts is the Gaussian "
        "float32 task vector (zstd gains little on it); the last form ships the ComPEFT tensor "
        "itself as dense safetensors through zstd, a general-purpose route to the same "
        "information.", "", md_table(header, body, "llrrrrr")])

