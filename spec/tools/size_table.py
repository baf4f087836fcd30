#!/usr/bin/env python
"""Measure the size table of spec/FORMAT.md Appendix B: bits per element of each position codec.

For each density p, a tensor of n = 2**22 elements gets exactly round(p * n) nonzeros at
positions drawn uniformly without replacement (a fixed seed), random signs. The table gives
bits per element (8 x bytes / n) of:

* the bitmask block, raw and through the zstd stage (the writer's default level 3);
* the golomb block with the encoder's M, raw and through zstd;
* H(p), the entropy of the positions (the bound for any positions codec on such data);
* the whole record written with ``positions="auto"`` (header, positions, signs, scale and
  padding), against H(p) + p, the bound for positions plus one sign bit per nonzero.

Usage: ``.venv/bin/python spec/tools/size_table.py`` (prints a Markdown table; a few seconds).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from compeft_format import TernaryTensor, dumps, inspect
from compeft_format.codecs import ZSTD, BitmaskCodec, BlockContext, GolombCodec

N = 2**22
DENSITIES = (0.001, 0.01, 0.05, 0.1, 0.2, 0.35, 0.5)
LEVEL = 3  # the writer's default zstd level
SEED = 20240601


def entropy(p: float) -> float:
    """Binary entropy H(p) in bits."""
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) if 0 < p < 1 else 0.0


def bpe(nbytes: int) -> float:
    """Bits per element of ``nbytes`` over N elements."""
    return 8 * nbytes / N


def row(p: float, rng: np.random.Generator) -> dict[str, float | int | str]:
    """Measure one density."""
    k = round(p * N)
    indices = np.sort(rng.choice(N, size=k, replace=False))
    signs = rng.random(k) < 0.5
    ctx = BlockContext("t", N, k, "F32", (N,))
    _, bitmask = BitmaskCodec().encode(indices, ctx)
    m, golomb = GolombCodec().encode(indices, ctx)
    record = dumps({"t": TernaryTensor((N,), indices, signs, 1.0)})
    info = inspect(record).tensors[0]
    h = entropy(k / N)
    return {
        "p": p, "M": m, "H": h,
        "bitmask": bpe(len(bitmask)), "bitmask_zstd": bpe(len(ZSTD.encode(bitmask, LEVEL))),
        "golomb": bpe(len(golomb)), "golomb_zstd": bpe(len(ZSTD.encode(golomb, LEVEL))),
        "auto": info.codecs, "record": 8 * info.record_size / N, "bound": h + k / N,
    }


def main() -> None:
    """Print the table."""
    rng = np.random.default_rng(SEED)
    print(f"n = 2**22 = {N} elements, zstd level {LEVEL}, seed {SEED}\n")
    print("| p | M | H(p) | bitmask | bitmask+zstd | golomb | golomb+zstd | golomb / H(p) "
          "| auto picks | record | H(p)+p | record / (H(p)+p) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for p in DENSITIES:
        r = row(p, rng)
        print(f"| {r['p']} | {r['M']} | {r['H']:.4f} | {r['bitmask']:.4f} "
              f"| {r['bitmask_zstd']:.4f} | {r['golomb']:.4f} | {r['golomb_zstd']:.4f} "
              f"| {r['golomb'] / r['H']:.3f} | {r['auto']} | {r['record']:.4f} "
              f"| {r['bound']:.4f} | {r['record'] / r['bound']:.3f} |")


if __name__ == "__main__":
    main()
