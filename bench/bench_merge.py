"""Speed and peak memory of ``compeft merge`` on compressed experts.

Speed: 4 experts of a model of about 10^8 parameters (12 F32 tensors: 4 of 4096 x 4096 and 8
of 4096 x 1024), each a compressed task vector at density 0.1 (random positions and signs,
which is what ComPEFT makes of a random task vector), merged with TIES into a ``.compeft``
(compressed again at density 0.1, the default scale rule) and into a dense ``.safetensors``;
against the time of compressing one task vector of the same model (``compress_file`` from a
dense F32 safetensors file to ``.compeft``, everything it does included). Runs are
interleaved (each operation once per round) so that all share the machine's load; the
target is the ratio of the medians, merge into ``.compeft`` over compress, at most 2.

Memory: the peak resident set (``ru_maxrss`` of a child process, mapped file pages
included) of ``compeft merge`` of 4 experts of a 2 GB model (8 F32 tensors of 64M
elements, density 0.1) into ``.compeft`` and into ``.safetensors``; the target is
``(n + 2)`` times the largest tensor plus 300 MB.

Usage::

    python bench/bench_merge.py              # both; several minutes on 2 cores
    python bench/bench_merge.py --quick      # small sizes, seconds
    python bench/bench_merge.py --skip memory --repeats 5

Prints markdown on stdout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import compeft_format as cf  # noqa: E402
from bench.bench_memory import baseline, generate, measure  # noqa: E402
from compeft_format.merge_io import merge_files  # noqa: E402

MB = 1e6
N_EXPERTS = 4
DENSITY = 0.1


def layout(scale: int) -> dict[str, tuple[int, ...]]:
    """About 10^8 parameters at scale 1 (divided by ``scale`` in both dimensions' product)."""
    out = {}
    for i in range(4):
        out[f"layers.{i}.attn.weight"] = (4096 // scale, 4096)
    for i in range(8):
        out[f"layers.{i}.mlp.weight"] = (4096 // scale, 1024)
    return out


def write_expert(path: Path, shapes: dict[str, tuple[int, ...]], seed: int,
                 density: float = DENSITY) -> None:
    """A compressed expert: random positions (density ``density``), signs and scales."""
    rng = np.random.default_rng(seed)
    meta = {"compeft.compression": cf.compression_metadata(density, 1.0, "global",
                                                           "proj_vcap"),
            "task_vector": {"reference": "zero", "exclude": []}}
    scale = float(rng.uniform(0.005, 0.02))
    with open(path, "wb") as f, cf.Writer(f, metadata=meta) as w:
        for name in sorted(shapes):
            numel = int(np.prod(shapes[name]))
            idx = np.flatnonzero(rng.random(numel) < density)
            w.write(name, cf.TernaryTensor(shapes[name], idx, rng.random(idx.size) < 0.5,
                                           scale))


def write_dense(path: Path, shapes: dict[str, tuple[int, ...]], seed: int) -> None:
    rng = np.random.default_rng(seed)
    cf.save_safetensors({n: rng.standard_normal(s, dtype=np.float32) * np.float32(0.01)
                         for n, s in shapes.items()}, path)


def speed(work: Path, scale: int, repeats: int) -> bool:
    shapes = layout(scale)
    numel = sum(int(np.prod(s)) for s in shapes.values())
    experts = [work / f"e{i}.compeft" for i in range(N_EXPERTS)]
    for i, p in enumerate(experts):
        write_expert(p, shapes, seed=i)
    dense = work / "tv.safetensors"
    write_dense(dense, shapes, seed=99)
    ops = {
        "compress one expert (compress_file, dense F32 -> .compeft)":
            lambda: cf.compress_file(dense, work / "c.compeft", density=DENSITY, force=True),
        f"merge {N_EXPERTS} experts -> .compeft (ties)":
            lambda: merge_files(experts, work / "m.compeft", force=True),
        f"merge {N_EXPERTS} experts -> .safetensors (ties, dense F32)":
            lambda: merge_files(experts, work / "m.safetensors", force=True),
    }
    times: dict[str, list[float]] = {k: [] for k in ops}
    cpu: dict[str, list[float]] = {k: [] for k in ops}
    for _ in range(repeats):
        for label, op in ops.items():
            t0, c0 = time.perf_counter(), time.process_time()
            op()
            times[label].append(time.perf_counter() - t0)
            cpu[label].append(time.process_time() - c0)
    print(f"## Speed\n\n{N_EXPERTS} experts of {numel:,} parameters ({len(shapes)} F32 tensors), "
          f"density {DENSITY}; {repeats} interleaved rounds; load before: "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| operation | best s | median s | median CPU s |")
    print("|---|---:|---:|---:|")
    for label in ops:
        print(f"| {label} | {min(times[label]):.2f} | {statistics.median(times[label]):.2f} | "
              f"{statistics.median(cpu[label]):.2f} |")
    keys = list(ops)
    ratio = statistics.median(times[keys[1]]) / statistics.median(times[keys[0]])
    per_round = statistics.median(m / c for m, c in zip(times[keys[1]], times[keys[0]],
                                                         strict=True))
    cpu_ratio = statistics.median(cpu[keys[1]]) / statistics.median(cpu[keys[0]])
    ok = ratio <= 2.0
    print(f"\nmerge -> .compeft / compress one: {ratio:.2f} (medians of wall time; per-round "
          f"median {per_round:.2f}; CPU time {cpu_ratio:.2f}); target <= 2: "
          f"{'met' if ok else 'NOT met'}\n")
    return ok


def memory(work: Path, tensors: int, numel: int) -> bool:
    shapes = {f"layers.{i}.weight": (numel,) for i in range(tensors)}
    experts = [work / f"big{i}.compeft" for i in range(N_EXPERTS)]
    t0 = time.perf_counter()
    for i, p in enumerate(experts):
        write_expert(p, shapes, seed=10 + i)
    base = work / "base.safetensors"
    generate(base, tensors, numel, seed=0)
    gen_s = time.perf_counter() - t0
    largest = numel * 4
    target = ((N_EXPERTS + 2) * largest + 300e6) / MB
    print(f"## Memory\n\n{N_EXPERTS} experts of {tensors} F32 tensors x {numel:,} elements "
          f"({tensors * numel * 4 / MB:,.0f} MB dense; experts "
          f"{sum(p.stat().st_size for p in experts) / MB:,.1f} MB in all; generated in "
          f"{gen_s:.0f} s); density {DENSITY}; python + package imported: {baseline():.0f} MB; "
          f"target: (n + 2) x largest + 300 MB = {target:,.0f} MB; load "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| command | output MB | peak RSS MB | target MB | within | seconds |")
    print("|---|---:|---:|---:|---|---:|")
    ins = [str(p) for p in experts]
    rows = [("merge -> .compeft", work / "big.compeft", []),
            ("merge -> .safetensors", work / "big.safetensors", []),
            ("merge -> .safetensors --base", work / "full.safetensors", ["--base", str(base)])]
    ok = True
    for label, out, extra in rows:
        rss, secs = measure(["merge", *ins, "-o", str(out), *extra])
        within = rss <= target
        ok &= within
        print(f"| `compeft {label}` | {out.stat().st_size / MB:,.1f} | {rss:,.0f} | "
              f"{target:,.0f} | {'yes' if within else 'NO'} | {secs:,.1f} |", flush=True)
        out.unlink()
    print()
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (speed)")
    p.add_argument("--skip", action="append", default=[], choices=("speed", "memory"))
    p.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp)")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_merge.", dir=args.dir))
    ok = True
    try:
        if "speed" not in args.skip:
            ok &= speed(work, 64 if args.quick else 1, args.repeats)
        if "memory" not in args.skip:
            ok &= memory(work, 8, (1 << 20) if args.quick else (64 << 20))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
