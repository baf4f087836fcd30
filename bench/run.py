"""Run the benchmark suite: sizes, real adapters, speed, memory and shipping time.

Usage, from the repository root::

    python -m bench                     # full run (a few minutes), results in
                                        # bench/results/<date>/ and README.md's size table
    python -m bench --quick             # small sizes, seconds; writes nothing unless --out
    python bench/run.py --quick --out /tmp/b   # the same as a script

Prints markdown on stdout and writes ``results.md`` (everything printed, with the machine
description), ``results.json`` (every number) and ``sizes.png`` (the size plot) to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as _datetime
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the bench package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import sizes, speed
from bench.common import ROOT, machine, md_table
from bench.plot import plot_sizes

SECTIONS = ("sizes", "adapters", "speed", "memory", "shipping")
README_BEGIN, README_END = "<!-- sizes:begin -->", "<!-- sizes:end -->"


class Report:
    """Collects the markdown of every section; prints it as it goes."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, text: str) -> None:
        self.parts.append(text)
        print(text + "\n", flush=True)

    def text(self) -> str:
        return "\n\n".join(self.parts) + "\n"


def _config(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        return {"size_numel": 1 << 14, "speed_numel": 200_000, "repeats": args.repeats or 2,
                "adapter_densities": (0.1,), "bf16_levels": (3,), "memory_args": ["--quick"]}
    return {"size_numel": 1 << 22, "speed_numel": 10**8, "repeats": args.repeats or 5,
            "adapter_densities": sizes.ADAPTER_DENSITIES, "bf16_levels": (3, 19),
            "memory_args": []}


def run_memory(args: list[str], timeout: float) -> str:
    """Run bench/bench_memory.py; return its output as the memory section's text."""
    script = ROOT / "bench" / "bench_memory.py"
    try:
        res = subprocess.run([sys.executable, str(script), *args], capture_output=True,
                             text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return f"bench/bench_memory.py did not finish within {timeout:.0f} s."
    out = res.stdout.strip()
    if res.returncode not in (0, 1):  # 1 = ran, but a target was missed: still a result
        tail = res.stderr.strip().splitlines()[-5:]
        return (f"bench/bench_memory.py failed (exit {res.returncode}):\n\n```\n"
                + "\n".join(tail) + "\n```\n\n" + out)
    return ("Peak resident memory of `compeft compress` and `compeft decompress` (from "
            f"`python bench/bench_memory.py {' '.join(args)}`):\n\n{out}")


def readme_block(size_rows: list[dict[str, Any]], adapter_rows: list[dict[str, Any]],
                 stamp: str, out: Path | None, command: str = "python -m bench") -> str:
    """The README's size tables, compact, from this run's numbers (``command``: the run's)."""
    from compeft_format import FORMAT_VERSION

    n = size_rows[0]["numel"]
    # the strongest zstd level measured: the fairest general-purpose comparison
    best_bf16 = max((k for k in size_rows[0] if k.startswith("BF16+zstd")),
                    key=lambda k: int(k.rsplit("-", 1)[1]))
    body = [[f"{r['density']:g}", f"{r['auto']:.4f}", f"{r['H(p)+p']:.4f}",
             f"{r['auto / (H(p)+p)']:.3f}", f"{r['STC Golomb']:.4f}", f"{r[best_bf16]:.3f}",
             f"{32 / r['auto']:,.0f}x", f"{16 / r['auto']:,.0f}x"] for r in size_rows]
    lines = [f"Measured by `{command}` ({stamp}, format {FORMAT_VERSION}"
             + (f"; full output in `{out.relative_to(ROOT)}`" if out and out.is_relative_to(ROOT)
                else "") + "). Whole files, all overhead included, in bits per parameter.", "",
             f"Random sparse ternary tensors of {n:,} elements:", "",
             md_table(["density", "this format", "entropy H(p)+p", "ratio to entropy",
                       "Golomb (ComPEFT/STC papers)", f"dense BF16 + {best_bf16.split('+')[1]}",
                       "vs F32", "vs BF16"], body)]
    if adapter_rows:
        rows = [r for r in adapter_rows if r["reference"] == "init/" and r["scope"] == "global"]
        lines += ["", "Real adapters, files as `compeft compress --base init --density K` writes "
                  f"them (global top-k, scale `{rows[0]['scale'] if rows else '?'}`, metadata "
                  "and base binding included):", "",
                  md_table(["adapter", "density", "bytes", "dense bytes", "ratio", "bits/param",
                            "cosine"],
                           [[r["adapter"], f"{r['density']:g}", f"{r['bytes']:,}",
                             f"{r['dense bytes']:,}", f"{r['ratio']:.1f}x",
                             f"{r['bits/param']:.3f}", f"{r['cosine']:.3f}"] for r in rows],
                           "lrrrrrr")]
    return "\n".join(lines)


def update_readme(block: str, readme: Path) -> str:
    """Replace the text between the size markers of README.md; return what happened."""
    if not readme.exists():
        return "README.md not found; size table not written"
    text = readme.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(README_BEGIN) + r".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        return f"README.md has no {README_BEGIN} ... {README_END} markers; not updated"
    new = pattern.sub(lambda _m: f"{README_BEGIN}\n{block}\n{README_END}", text, count=1)
    readme.write_text(new, encoding="utf-8")
    return "README.md size table updated"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="small sizes (seconds); results are written only with --out")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default for a full run: bench/results/<date>)")
    p.add_argument("--link-mbps", type=float, default=100.0,
                   help="link speed of the shipping-time section, Mbit/s (default 100)")
    p.add_argument("--repeats", type=int, default=0, help="runs per timing (default 5, quick 2)")
    p.add_argument("--skip", action="append", default=[], choices=SECTIONS,
                   help="leave a section out (repeatable)")
    p.add_argument("--readme", action=argparse.BooleanOptionalAction, default=None,
                   help="rewrite README.md's size table (default: on for a full run)")
    p.add_argument("--memory-timeout", type=float, default=1800.0)
    args = p.parse_args(argv)
    cfg = _config(args)
    stamp = _datetime.date.today().isoformat()
    out = args.out if args.out is not None else (None if args.quick else
                                                 ROOT / "bench" / "results" / stamp)
    do_readme = (not args.quick) if args.readme is None else args.readme
    skip = set(args.skip)
    t_start = time.perf_counter()

    rep = Report()
    mach = machine()
    rep.add(f"# compeft_format benchmark ({stamp}{', quick' if args.quick else ''})")
    rep.add("## Machine\n\n" + md_table(["", ""], [[k, v] for k, v in mach.items()], "ll"))
    results: dict[str, Any] = {"date": stamp, "quick": args.quick, "machine": mach,
                               "config": {k: list(v) if isinstance(v, tuple) else v
                                          for k, v in cfg.items()}}
    size_rows: list[dict[str, Any]] = []
    adapter_rows: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="compeft-bench."))
    try:
        if "sizes" not in skip:
            size_rows = sizes.random_sizes(cfg["size_numel"], sizes.DENSITIES, seed=0,
                                           bf16_levels=cfg["bf16_levels"])
            results["sizes"] = size_rows
            rep.add("## Size: bits per parameter on random ternary tensors\n\n"
                    + sizes.random_sizes_md(size_rows))
            if out is not None:
                why = plot_sizes(size_rows, out / "sizes.png")
                rep.add(f"Plot: {why}" if why else "Plot: `sizes.png` (log-log).")
        if "adapters" not in skip:
            adapter_rows = sizes.adapter_sizes(cfg["adapter_densities"])
            results["adapters"] = adapter_rows
            rep.add("## Size on real adapters\n\n" + sizes.adapter_sizes_md(adapter_rows))
        experts: list[dict[str, Any]] = []
        if "speed" not in skip:
            sp = speed.speed(cfg["speed_numel"], speed.DENSITIES, cfg["repeats"], work)
            results["speed"] = sp["rows"]
            experts += sp["shipping"]
            rep.add("## Speed\n\n" + speed.speed_md(sp))
        if "memory" not in skip:
            rep.add("## Memory\n\n" + run_memory(cfg["memory_args"], args.memory_timeout))
        if "shipping" not in skip:
            experts = speed.adapter_shipping(work, repeats=max(cfg["repeats"], 3)) + experts
            results["shipping"] = {"link_mbps": args.link_mbps, "experts": experts}
            rep.add("## Shipping time\n\n" + speed.shipping_md(experts, args.link_mbps))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rep.add(f"(Benchmark ran in {time.perf_counter() - t_start:,.0f} s.)")
    if do_readme and size_rows:
        command = " ".join(["python -m bench", *(f"--skip {s}" for s in args.skip)])
        print(update_readme(readme_block(size_rows, adapter_rows, stamp, out, command),
                            ROOT / "README.md"))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(rep.text(), encoding="utf-8")
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n",
                                          encoding="utf-8")
        print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
