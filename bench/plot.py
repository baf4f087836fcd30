"""The size plot: bits per parameter against density (matplotlib, optional)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import BF16_BITS, GGUF_TQ1_0, GGUF_TQ2_0


def plot_sizes(rows: list[dict[str, Any]], path: Path) -> str | None:
    """Write the PNG; return None, or why it was not written (matplotlib missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install '.[bench]'); no plot written"
    p = [r["density"] for r in rows]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 10), dpi=120, height_ratios=(3, 2))
    styles: list[tuple[str, dict[str, Any]]] = [
        ("auto", {"color": "C0", "lw": 2.5, "marker": "o", "label": "this format, auto (default)"}),
        ("golomb", {"color": "C1", "ls": "--", "marker": ".", "label": "golomb forced"}),
        ("golomb+zstd", {"color": "C1", "ls": ":", "label": "golomb forced + zstd"}),
        ("bitmask", {"color": "C2", "ls": "--", "marker": ".", "label": "bitmask forced"}),
        ("bitmask+zstd", {"color": "C2", "ls": ":", "label": "bitmask forced + zstd"}),
        ("H(p)+p", {"color": "k", "lw": 1.2, "label": "entropy bound H(p) + p"}),
        ("STC Golomb", {"color": "C3", "ls": "-.",
                        "label": "Golomb cost of the ComPEFT/STC papers"}),
    ]
    for key, kw in styles:
        ax.plot(p, [r[key] for r in rows], **kw)
    for key, ls in zip([k for k in rows[0] if k.startswith("BF16+zstd")], ("--", ":"),
                       strict=False):
        ax.plot(p, [r[key] for r in rows], color="C4", ls=ls, marker="x",
                label=f"dense BF16 through {key.split('+')[1]}")
    for y, label, color in ((BF16_BITS, "dense BF16", "C5"),
                            (GGUF_TQ2_0, "GGUF TQ2_0 (2.0625)", "C6"),
                            (GGUF_TQ1_0, "GGUF TQ1_0 (1.6875)", "C7")):
        ax.axhline(y, color=color, lw=1, ls=(0, (5, 3)), label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("density p (fraction of nonzeros)")
    ax.set_ylabel("bits per parameter (whole file)")
    ax.set_title(f"Sparse ternary tensors of {rows[0]['numel']:,} elements: size against density")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    # the lines near the bound overlap on a log scale: their ratio to it, on a linear one
    for key, kw in styles[:4] + styles[6:]:
        ax2.plot(p, [r[key] / r["H(p)+p"] for r in rows], **kw)
    ax2.axhline(1.0, color="k", lw=1.2, label="entropy bound H(p) + p")
    ax2.axhline(1.025, color="C0", lw=1, ls=(0, (2, 2)), label="size target 1.025 x bound")
    ax2.set_xscale("log")
    ax2.set_ylim(0.99, 1.12)
    ax2.set_xlabel("density p")
    ax2.set_ylabel("size / (H(p) + p)")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return None
