"""Size sections: bits per parameter on random ternary tensors, and on the real adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from bench.common import (
    BF16_BITS,
    GGUF_TQ1_0,
    GGUF_TQ2_0,
    ROOT,
    entropy_bound,
    md_table,
    random_ternary,
    stc_golomb_bits,
)
from compeft_format import dtypes as _dt
from compeft_format import dumps
from compeft_format.compress import DEFAULT_SCALE

DENSITIES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5)
#: the densities of the format's size target: auto <= 1.025 x (H(p) + p)
TARGET_DENSITIES = (0.001, 0.01, 0.05, 0.1, 0.2, 0.35, 0.5)
TARGET_RATIO = 1.025
TARGET_NUMEL = 1 << 22
#: (column, positions option, zstd level) of the file variants measured
VARIANTS = (
    ("auto", "auto", 3),
    ("auto, no zstd", "auto", None),
    ("golomb", "golomb", None),
    ("golomb+zstd", "golomb", 3),
    ("bitmask", "bitmask", None),
    ("bitmask+zstd", "bitmask", 3),
)
ADAPTERS = (
    ("LoRA r=8", "tests/data/lora-minilm-vader", "LORA"),
    ("(IA)^3", "tests/data/ia3-minilm-vader", "IA3"),
)
ADAPTER_DENSITIES = (0.05, 0.1, 0.2)
SCOPES = ("global", "tensor")


def random_sizes(n: int, densities: tuple[float, ...], seed: int,
                 bf16_levels: tuple[int, ...]) -> list[dict[str, Any]]:
    """Bits per element of whole files (all overhead included) and of the references."""
    rows = []
    for i, p in enumerate(densities):
        t = random_ternary(n, p, seed + i, dtype="BF16")
        row: dict[str, Any] = {"density": p, "numel": n, "nnz": t.nnz}
        for label, positions, level in VARIANTS:
            data = dumps({"t": t}, positions=positions, zstd_level=level)
            row[label] = 8 * len(data) / n
        row["H(p)+p"] = entropy_bound(t.density)
        row["STC Golomb"] = stc_golomb_bits(t.density)
        row["GGUF TQ1_0"] = GGUF_TQ1_0
        row["GGUF TQ2_0"] = GGUF_TQ2_0
        row["BF16"] = BF16_BITS
        # a general-purpose compressor on the same information: the dense BF16 tensor's bytes
        bf16 = _dt.f32_to_bf16_bits(t.to_numpy()).tobytes()
        for level in bf16_levels:
            frame = zstandard.ZstdCompressor(level=level).compress(bf16)
            row[f"BF16+zstd-{level}"] = 8 * len(frame) / n
        row["auto / (H(p)+p)"] = row["auto"] / row["H(p)+p"]
        rows.append(row)
    return rows


def random_sizes_md(rows: list[dict[str, Any]]) -> str:
    """The size table (bits per parameter) and the target check."""
    n = rows[0]["numel"]
    bf16_cols = [k for k in rows[0] if k.startswith("BF16+zstd")]
    cols = [v[0] for v in VARIANTS] + ["H(p)+p", "STC Golomb", *bf16_cols]
    header = ["density", *cols, "auto / (H(p)+p)"]
    body = [[f"{r['density']:g}", *(f"{r[c]:.4f}" for c in cols),
             f"{r['auto / (H(p)+p)']:.4f}"] for r in rows]
    out = [f"Random ternary tensors of {n:,} elements (exactly round(p n) random positions, "
           "random signs, dtype BF16); whole files written by `dumps` (header, metadata, "
           "record, index and trailer included), in bits per parameter. Constant "
           f"references: GGUF TQ1_0 {GGUF_TQ1_0}, TQ2_0 {GGUF_TQ2_0}, dense BF16 {BF16_BITS:g}.",
           "", md_table(header, body)]
    checked = [r for r in rows if any(abs(r["density"] - p) < 1e-12 for p in TARGET_DENSITIES)]
    if n < TARGET_NUMEL:
        out += ["", f"(The size target is defined on {TARGET_NUMEL:,} elements; at {n:,} the "
                "fixed overhead of a file weighs more, so it is not checked here.)"]
    elif checked:
        worst = max(checked, key=lambda r: r["auto / (H(p)+p)"])
        ok = all(r["auto / (H(p)+p)"] <= TARGET_RATIO for r in checked)
        where = ", ".join(f"{r['density']:g}" for r in checked)
        out += ["", f"Target auto <= {TARGET_RATIO} x (H(p) + p) at p in {{{where}}}: "
                f"**{'met' if ok else 'NOT met'}** (worst {worst['auto / (H(p)+p)']:.4f} at "
                f"p = {worst['density']:g})."]
    return "\n".join(out)


def _load(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def adapter_sizes(densities: tuple[float, ...] = ADAPTER_DENSITIES,
                  scopes: tuple[str, ...] = SCOPES) -> list[dict[str, Any]]:
    """Compress the real adapters of tests/data at each density and scope; sizes and quality.

    Every file is written exactly as ``compeft compress`` writes it (:func:`compress_file`,
    default scale rule and options, metadata and base binding included): the task vector is
    measured from the saved initial adapter (``--base init``); for LoRA also from zero, the
    convention of the ComPEFT reference code (A and B compressed as they are).
    """
    import tempfile

    from compeft_format.convert import compress_file

    rows = []
    for label, folder, peft_type in ADAPTERS:
        d = ROOT / folder
        model = d / "adapter_model.safetensors"
        if not model.exists():
            continue
        weights = _load(model)
        refs: list[tuple[str, Path | None]] = [("init/", d / "init")] if (d / "init").exists() \
            else []
        if peft_type == "LORA" or not refs:
            refs.append(("zero" if peft_type == "LORA" else "PEFT init", None))
        params = sum(v.size for v in weights.values())
        for ref, base in refs:
            for scope in scopes:
                for p in densities:
                    with tempfile.TemporaryDirectory() as tmp:
                        s = compress_file(d, Path(tmp) / "out", density=p, scope=scope,
                                          base=base)
                        size = Path(s.file).stat().st_size
                    q = s.quality.overall
                    rows.append({
                        "adapter": label, "reference": ref, "scope": scope, "density": p,
                        "scale": DEFAULT_SCALE, "params": params, "tensors": len(weights),
                        "bytes": size, "dense bytes": model.stat().st_size,
                        "ratio": model.stat().st_size / size, "bits/param": 8 * size / params,
                        "kept": q.nnz, "rel_error": q.rel_error, "cosine": q.cosine,
                    })
    return rows


def adapter_sizes_md(rows: list[dict[str, Any]]) -> str:
    """The real-adapter table."""
    if not rows:
        return "(no adapters found under tests/data)"
    header = ["adapter", "task vector from", "scope", "density", "file bytes",
              "dense adapter bytes", "ratio", "bits/param", "rel. L2 error", "cosine"]
    body = [[r["adapter"], r["reference"], r["scope"], f"{r['density']:g}", f"{r['bytes']:,}",
             f"{r['dense bytes']:,}", f"{r['ratio']:.1f}x", f"{r['bits/param']:.3f}",
             f"{r['rel_error']:.4f}", f"{r['cosine']:.4f}"] for r in rows]
    firsts = {}
    for r in rows:
        firsts.setdefault(r["adapter"], r)
    desc = "; ".join(f"{a}: {r['tensors']} tensors, {r['params']:,} parameters (F32)"
                     for a, r in firsts.items())
    return "\n".join([
        f"The adapters of tests/data (all-MiniLM-L6-v2 trained on VADER sentiment; {desc}), "
        "written exactly as `compeft compress --density K --scope S [--base init]` writes them "
        f"(`compress_file`, default scale rule `{DEFAULT_SCALE}`, alpha 1, metadata and base "
        "binding included). Ratio: the "
        "adapter's `adapter_model.safetensors` as stored over the `.compeft` file. Quality: "
        "`quality_report(task vector, compressed)`, overall relative L2 error and cosine.",
        "", md_table(header, body, "lllrrrrrrr")])
