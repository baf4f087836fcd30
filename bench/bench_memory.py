"""Peak resident memory of ``compeft compress`` and ``compeft decompress`` on a large model.

Generates a safetensors file of ``--tensors`` tensors (``--dtype`` F32 or BF16) of
``--numel`` elements each (default 8 x 64M F32 = 2 GiB; written with the streaming writer,
chunk by chunk, so generating it needs little memory either), then runs the command on it in
a child process and reads the child's peak resident set size (``ru_maxrss`` from
``os.wait4``, which counts the file pages it has mapped too). The target: at most twice the
largest tensor plus 300 MB.

Usage::

    python bench/bench_memory.py            # 2 GiB, takes a few minutes
    python bench/bench_memory.py --quick    # 8 x 1M elements, seconds
    python bench/bench_memory.py --with-base  # also compress/decompress against a base

Prints a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compeft_format import dtypes as _dt  # noqa: E402
from compeft_format.safetensors_io import SafetensorsWriter  # noqa: E402

MB = 1e6
CHUNK = 1 << 22  # elements generated at a time


def generate(path: Path, tensors: int, numel: int, seed: int, like: Path | None = None,
             dtype: str = "F32") -> None:
    """Write ``tensors`` tensors of ``numel`` N(0, 1) elements (or ``like`` + noise)."""
    rng = np.random.default_rng(seed)
    names = [f"layers.{i}.weight" for i in range(tensors)]
    base = None
    if like is not None:
        from compeft_format.safetensors_io import open_safetensors

        base = open_safetensors(like)
    with open(path, "wb") as f, SafetensorsWriter(
            f, [(n, dtype, (numel,)) for n in names], metadata={"format": "pt"}) as w:
        for name in w.order:
            for start in range(0, numel, CHUNK):
                n = min(CHUNK, numel - start)
                chunk = rng.standard_normal(n, dtype=np.float32)
                if base is not None:  # a "fine-tune": base plus a small change
                    chunk *= np.float32(0.01)
                    chunk += _dt.to_numpy_values(base.get(name)[0][start : start + n], dtype)
                w.write(name, chunk if dtype == "F32" else _dt.f32_to_bf16_bits(chunk))
            if base is not None:
                base.release()
    if base is not None:
        base.close()


# A child's ru_maxrss starts from its parent's resident size at fork/exec time, so a command
# is run by this small wrapper (a bare Python), never straight from the benchmark process,
# which holds numpy and has generated the model: the figure is then the command's own peak.
_WRAPPER = """
import os, subprocess, sys
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(p.pid, 0)
kib = usage.ru_maxrss if sys.platform != "darwin" else usage.ru_maxrss // 1024
print(os.waitstatus_to_exitcode(status), kib)
"""


def _peak(cmd: list[str]) -> tuple[int, float, float]:
    """Run ``cmd`` under the wrapper; return (exit status, peak RSS in MB, seconds)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return int(out[0]), int(out[1]) * 1024 / MB, time.perf_counter() - t0


def measure(argv: list[str]) -> tuple[float, float]:
    """Run ``python -m compeft_format ARGV``; return (peak RSS in MB, seconds)."""
    code, rss, seconds = _peak([sys.executable, "-m", "compeft_format", *argv, "-q"])
    if code != 0:
        raise SystemExit(f"compeft {' '.join(argv)} failed with status {code}")
    return rss, seconds


def baseline() -> float:
    """Peak RSS of a Python that only imports the command (the floor of any command)."""
    return _peak([sys.executable, "-c", "import compeft_format.cli"])[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="8 tensors of 1M elements")
    p.add_argument("--tensors", type=int, default=8)
    p.add_argument("--numel", type=int, default=64 << 20, help="elements per tensor")
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--dtype", choices=("F32", "BF16"), default="F32", help="of the tensors")
    p.add_argument("--with-base", action="store_true",
                   help="also measure compress/decompress of a fine-tune against a base")
    p.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp)")
    args = p.parse_args(argv)
    if args.quick:
        args.numel = 1 << 20
    work = Path(tempfile.mkdtemp(prefix="bench_memory.", dir=args.dir))
    try:
        largest = args.numel * (4 if args.dtype == "F32" else 2)
        target = (2 * largest + 300e6) / MB
        src = work / "model.safetensors"
        t0 = time.perf_counter()
        generate(src, args.tensors, args.numel, seed=0, dtype=args.dtype)
        gen_s = time.perf_counter() - t0
        d = str(args.density)
        rows = [("compress", src, work / "m.compeft", ["compress", str(src), "-o",
                                                         str(work / "m.compeft"), "--density", d]),
                ("decompress", work / "m.compeft", work / "back.safetensors",
                 ["decompress", str(work / "m.compeft"), "-o", str(work / "back.safetensors")])]
        if args.with_base:
            ft = work / "ft.safetensors"
            generate(ft, args.tensors, args.numel, seed=1, like=src, dtype=args.dtype)
            rows += [("compress --base", ft, work / "ft.compeft",
                      ["compress", str(ft), "-o", str(work / "ft.compeft"), "--base", str(src),
                       "--density", d]),
                     ("decompress --base", work / "ft.compeft", work / "ft_back.safetensors",
                      ["decompress", str(work / "ft.compeft"), "-o",
                       str(work / "ft_back.safetensors"), "--base", str(src)])]
        print(f"model: {args.tensors} {args.dtype} tensors x {args.numel:,} elements = "
              f"{src.stat().st_size / MB:,.0f} MB (largest tensor {largest / MB:,.0f} MB; "
              f"generated in {gen_s:.0f} s); density {args.density}; "
              f"python + package imported: {baseline():.0f} MB; "
              f"target: 2 x largest + 300 MB = {target:,.0f} MB\n")
        print("| command | input MB | output MB | peak RSS MB | target MB | within | seconds |")
        print("|---|---:|---:|---:|---:|---|---:|")
        ok = True
        for label, inp, out, argv_ in rows:
            rss, secs = measure(argv_)
            within = rss <= target
            ok &= within
            print(f"| `compeft {label}` | {inp.stat().st_size / MB:,.1f} | "
                  f"{out.stat().st_size / MB:,.1f} | {rss:,.0f} | {target:,.0f} | "
                  f"{'yes' if within else 'NO'} | {secs:,.1f} |", flush=True)
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
