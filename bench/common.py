"""Helpers shared by the benchmark sections: inputs, reference formulas, timing, the machine."""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

from compeft_format import TernaryTensor  # noqa: E402

MB = 1e6
PHI = (1 + math.sqrt(5)) / 2
#: GGUF's dense ternary packings, bits per weight: TQ1_0 (base-3, 5 trits a byte, plus an
#: F16 scale per 256) and TQ2_0 (2 bits a weight, plus an F16 scale per 256)
GGUF_TQ1_0 = 1.6875
GGUF_TQ2_0 = 2.0625
BF16_BITS = 16.0


# ---------------------------------------------------------------------------------------------
# Reference formulas (docs: /work/shared/notes/paper.md sections 2 and 4)
# ---------------------------------------------------------------------------------------------


def binary_entropy(p: float) -> float:
    """H(p) in bits."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -p * math.log2(p) - (1 - p) * math.log2(1 - p)


def entropy_bound(p: float) -> float:
    """H(p) + p: bits per element of iid positions of density p with unbiased signs."""
    return binary_entropy(p) + p


def stc_golomb_bits(p: float) -> float:
    """The Golomb position cost of the ComPEFT and STC papers, p * (b_pos + 1) bits/element.

    ``b* = 1 + floor(log2(ln(phi - 1) / ln(1 - p)))`` and
    ``b_pos = b* + 1 / (1 - (1 - p)**(2**b*))`` (Sattler et al. 2019); the +1 is the sign.
    """
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 2.0
    b = 1 + math.floor(math.log2(math.log(PHI - 1) / math.log(1 - p)))
    b = max(b, 0)
    b_pos = b + 1 / (1 - (1 - p) ** (2**b))
    return p * (b_pos + 1)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def random_ternary(n: int, p: float, seed: int, dtype: str = "F32",
                   scale: float = 0.0371) -> TernaryTensor:
    """Exactly ``round(p * n)`` uniformly random positions, each sign a fair coin."""
    rng = np.random.default_rng(seed)
    k = round(p * n)
    indices = np.sort(rng.choice(n, k, replace=False))
    return TernaryTensor((n,), indices, rng.random(k) < 0.5, scale, dtype)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Wall-clock seconds of the runs of one operation."""

    runs: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.runs)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)


def time_interleaved(ops: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, Timing]:
    """Run every operation once per round, ``repeats`` rounds; return the times of each.

    Interleaving (a, b, c, a, b, c, ...) rather than (a, a, a, b, b, b) exposes every
    operation to the same background load, so ratios measured in one call are fair on a
    shared, noisy machine. Results are dropped before the clock stops only for the return
    value itself (a fresh array is part of what a decoder costs).
    """
    out = {name: Timing() for name in ops}
    for _ in range(repeats):
        for name, fn in ops.items():
            gc.collect()
            t0 = time.perf_counter()
            result = fn()
            out[name].runs.append(time.perf_counter() - t0)
            del result
    return out


# ---------------------------------------------------------------------------------------------
# Machine description
# ---------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def machine() -> dict[str, str]:
    """CPU model, cores, RAM, OS, Python and library versions, load at the start."""
    import zstandard

    info = {
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "ram": f"{_ram_gib():.1f} GiB" if _ram_gib() else "unknown",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "zstandard": f"{zstandard.__version__} (libzstd "
                     f"{'.'.join(map(str, getattr(zstandard, 'ZSTD_VERSION', ())))})",
    }
    for mod in ("safetensors", "torch", "matplotlib"):
        try:  # the installed version, without importing (torch takes seconds)
            info[mod] = importlib.metadata.version(mod)
        except importlib.metadata.PackageNotFoundError:
            info[mod] = "not installed"
    with contextlib.suppress(OSError):
        info["load average at start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return info


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]],
             align: str | None = None) -> str:
    """Return a markdown table; ``align`` is one character per column (l or r, default r)."""
    align = align or "l" + "r" * (len(header) - 1)
    marks = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ms(seconds: float) -> str:
    """Milliseconds with a sensible number of digits."""
    ms = seconds * 1e3
    return f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"
