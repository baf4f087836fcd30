"""Many LoRA experts in one model: compressed (compeft_format.peft) against dense (PEFT).

A Llama-7B-shaped model (hidden 4096, MLP 11008, 32 heads) with ``--layers`` decoder layers,
and ``--experts`` synthetic LoRA experts of rank 64 on all seven linear layers of every decoder
layer (q, k, v, o, gate, up, down: 5.0M adapter parameters a layer, 160M for the 32 layers of
Llama-7B), saved as PEFT saves them (float32) and compressed with ``compeft compress`` at
``--density``. The base model is built on the meta device and given uninitialised memory
(``to_empty``): PEFT only reads its shapes, dtypes and devices, so its pages are never touched
and the memory measured is the adapters'. Synthetic values: A ~ N(0, 1/in), B ~ N(0, 0.02^2),
as a trained adapter's.

Each method runs in its own child process (``--child``), on a warm page cache (every file is
read once before), and reports:

* ``from_pretrained``: the first expert into the bare model, median over ``--repeats`` fresh
  models (PEFT's ``PeftModel.from_pretrained`` of the dense folder, with its default
  ``low_cpu_mem_usage=False`` and with ``True``; ours of the compressed folder);
* ``load_adapter``: each further expert added (median over the experts);
* ``set_adapter``: switching between loaded experts (median over 50 switches);
* ``swap``: ``delete_adapter`` of one expert and ``load_adapter`` of another, what a server
  holding one expert on the device does per request (median over the experts);
* peak resident memory of the child (``ru_maxrss``, mapped file pages included) and the
  memory the compressed and the dense experts take at rest.

Usage::

    python bench/bench_serving.py                  # 4 layers, 10 experts, density 0.1
    python bench/bench_serving.py --layers 2 --experts 3 --repeats 2   # quicker
    python bench/bench_serving.py --quick          # tiny shapes, a smoke test

Writes ``bench/results/serving.md`` and ``serving.json`` (``--out`` to change), and prints the
table. Times scale with the adapter size, so with the number of layers: the 32-layer figures
are the measured ones times ``32 / layers`` (the fixed costs, a few ms, are kept in).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MB = 1e6
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("peft", "peft-lowmem", "compeft")


def _shapes(hidden: int, mlp: int) -> dict[str, tuple[int, int]]:
    """(in, out) features of each target linear layer."""
    return {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
            "o_proj": (hidden, hidden), "gate_proj": (hidden, mlp), "up_proj": (hidden, mlp),
            "down_proj": (mlp, hidden)}


def _llama_config(args: argparse.Namespace):
    import transformers

    return transformers.LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.mlp, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=256)


def _base_model(args: argparse.Namespace):
    """The Llama-shaped model in BF16 with uninitialised, untouched memory."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(_llama_config(args)).to(torch.bfloat16)
    return model.to_empty(device="cpu").eval()


def _lora_config(args: argparse.Namespace):
    import peft

    return peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS,
                           lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")


def make_experts(args: argparse.Namespace, work: Path) -> list[tuple[Path, Path]]:
    """Write ``args.experts`` dense adapter folders and their compressed folders."""
    import numpy as np

    from compeft_format import compress_file
    from compeft_format.safetensors_io import SafetensorsWriter

    shapes = _shapes(args.hidden, args.mlp)
    layout = []
    for i in range(args.layers):
        for t in TARGETS:
            fin, fout = shapes[t]
            mod = "self_attn" if t.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            stem = f"base_model.model.model.layers.{i}.{mod}.{t}"
            layout += [(f"{stem}.lora_A.weight", "F32", (args.rank, fin)),
                       (f"{stem}.lora_B.weight", "F32", (fout, args.rank))]
    shape_of = {n: s for n, _, s in layout}
    out = []
    for e in range(args.experts):
        dense, comp = work / f"dense-{e}", work / f"compeft-{e}"
        out.append((dense, comp))
        if (comp / "adapter_model.compeft").is_file():
            continue
        dense.mkdir(parents=True, exist_ok=True)
        _lora_config(args).save_pretrained(dense)
        rng = np.random.default_rng(1000 + e)
        with open(dense / "adapter_model.safetensors", "wb") as f, \
                SafetensorsWriter(f, layout) as w:
            for name in w.order:
                shape = shape_of[name]
                std = 0.02 if ".lora_B." in name else 1.0 / np.sqrt(shape[1])
                w.write(name, rng.standard_normal(shape, dtype=np.float32) * np.float32(std))
        compress_file(dense, comp, density=args.density)
    return out


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


def child(args: argparse.Namespace) -> dict:
    """Run one method in this process and return its measurements."""
    import peft
    import torch

    from compeft_format import peft as cpeft

    torch.set_num_threads(args.threads)
    experts = [Path(p) for p in args.paths]

    def first(model, path):
        if args.method == "compeft":
            return cpeft.from_pretrained(model, path)
        return peft.PeftModel.from_pretrained(model, path,
                                              low_cpu_mem_usage=args.method == "peft-lowmem")

    def add(pm, path, name):
        if args.method == "compeft":
            cpeft.load_adapter(pm, path, name)
        else:
            pm.load_adapter(path, name, low_cpu_mem_usage=args.method == "peft-lowmem")

    rss_start = _rss_mb()
    loads, loads_cpu = [], []
    for r in range(args.repeats):
        model = _base_model(args)
        t0, c0 = time.perf_counter(), time.process_time()
        pm = first(model, experts[r % len(experts)])
        loads.append(time.perf_counter() - t0)
        loads_cpu.append(time.process_time() - c0)
        if r < args.repeats - 1:
            del pm, model
    adds, adds_cpu = [], []
    for e, path in enumerate(experts[1:], 1):
        t0, c0 = time.perf_counter(), time.process_time()
        add(pm, path, f"e{e}")
        adds.append(time.perf_counter() - t0)
        adds_cpu.append(time.process_time() - c0)
    rss_all = _rss_mb()
    names = ["default"] + [f"e{e}" for e in range(1, len(experts))]
    switches = []
    for k in range(50):
        t0 = time.perf_counter()
        pm.set_adapter(names[k % len(names)])
        switches.append(time.perf_counter() - t0)
    swaps = []
    for e, path in enumerate(experts[1:], 1):
        pm.set_adapter("default")
        t0 = time.perf_counter()
        pm.delete_adapter(f"e{e}")
        add(pm, path, f"e{e}")
        swaps.append(time.perf_counter() - t0)
    return {"method": args.method, "from_pretrained_s": loads,
            "from_pretrained_cpu_s": loads_cpu, "load_adapter_s": adds,
            "load_adapter_cpu_s": adds_cpu,
            "set_adapter_s": statistics.median(switches), "swap_s": swaps,
            "rss_start_mb": rss_start, "rss_loaded_mb": rss_all, "peak_rss_mb": _rss_mb()}


def _run_child(args: argparse.Namespace, method: str, paths: list[Path]) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--layers", str(args.layers),
           "--hidden", str(args.hidden), "--mlp", str(args.mlp), "--heads", str(args.heads),
           "--rank", str(args.rank), "--repeats", str(args.repeats),
           "--threads", str(args.threads), "--paths", *map(str, paths)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if run.returncode:
        raise SystemExit(f"{method} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _warm(paths: list[Path]) -> None:
    for p in paths:
        for f in p.iterdir():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=10)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--mlp", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    ap.add_argument("--work", type=Path, default=None, help="folder for the experts (kept)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test")
    ap.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--paths", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.method = args.child
        print(json.dumps(child(args)))
        return 0
    if args.quick:
        args.layers, args.experts, args.hidden, args.mlp, args.heads = 1, 3, 256, 688, 4
        args.rank, args.repeats = 8, 2
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-serving-"))
    t0 = time.perf_counter()
    pairs = make_experts(args, work)
    made = time.perf_counter() - t0
    dense = [d for d, _ in pairs]
    comp = [c for _, c in pairs]
    _warm(dense + comp)
    params = args.layers * sum(args.rank * (a + b) for a, b in
                               _shapes(args.hidden, args.mlp).values())
    results = {}
    for method in METHODS:
        results[method] = _run_child(args, method, comp if method == "compeft" else dense)
    report = {
        "machine": platform.platform(), "cpus": os.cpu_count(),
        "load_average": os.getloadavg(), "layers": args.layers, "experts": args.experts,
        "rank": args.rank, "density": args.density, "adapter_params": params,
        "dense_bytes": _size(dense[0]), "compressed_bytes": _size(comp[0]),
        "threads": args.threads, "setup_s": made, "results": results,
    }
    text = format_report(report)
    print(text)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(text + "\n")
    return 0


def format_report(rep: dict) -> str:
    """The markdown table of a report."""
    scale = 32 / rep["layers"]
    med = statistics.median
    lines = [
        f"LoRA r={rep['rank']} on q,k,v,o,gate,up,down of {rep['layers']} Llama-7B-shaped "
        f"layers: {rep['adapter_params'] / 1e6:.1f}M adapter parameters an expert "
        f"({rep['adapter_params'] * 32 / rep['layers'] / 1e6:.0f}M for 32 layers); "
        f"{rep['experts']} experts; density {rep['density']}; dense folder "
        f"{rep['dense_bytes'] / MB:.1f} MB, compressed {rep['compressed_bytes'] / MB:.2f} MB "
        f"({rep['dense_bytes'] / rep['compressed_bytes']:.1f}x). CPU, {rep['threads']} torch "
        f"thread(s), load average {rep['load_average'][0]:.1f} on {rep['cpus']} CPUs.",
        "",
        "Times are medians, wall clock (CPU time of the process in brackets: less sensitive "
        "to the other processes of a loaded machine).",
        "",
        "| method | from_pretrained | load_adapter | swap (delete + load) | set_adapter | "
        "peak RSS | RSS with all experts | from_pretrained, 32 layers (CPU) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    names = {"peft": "PEFT, dense folder", "peft-lowmem": "PEFT, dense, low_cpu_mem_usage",
             "compeft": "compeft_format.peft, compressed"}
    for m, r in rep["results"].items():
        fp, fpc = med(r["from_pretrained_s"]), med(r["from_pretrained_cpu_s"])
        lines.append(
            f"| {names[m]} | {fp * 1e3:.0f} ms ({fpc * 1e3:.0f}) | "
            f"{med(r['load_adapter_s']) * 1e3:.0f} ms ({med(r['load_adapter_cpu_s']) * 1e3:.0f}) "
            f"| {med(r['swap_s']) * 1e3:.0f} ms | {r['set_adapter_s'] * 1e6:.0f} us | "
            f"{r['peak_rss_mb']:.0f} MB | {r['rss_loaded_mb']:.0f} MB | "
            f"{fpc * scale:.2f} s |")
    res = rep["results"]
    for key, what in (("from_pretrained_s", "wall"), ("from_pretrained_cpu_s", "CPU")):
        ours = med(res["compeft"][key])
        for m in ("peft", "peft-lowmem"):
            theirs = med(res[m][key])
            lines.append("")
            lines.append(f"compressed from_pretrained / {names[m]} ({what} time): "
                         f"{ours / theirs:.2f} ({'met' if ours <= theirs else 'missed'}: the "
                         "target is at most 1)")
    lines += ["", (
        "What was measured: a transformers LlamaForCausalLM with these layers, built on the "
        "meta device in BF16 and given uninitialised memory (to_empty): PEFT reads only the "
        "shapes, dtypes and devices of the base weights, so their pages are never touched and "
        "the RSS is Python, torch, transformers and peft (about 0.8 GB here) plus the "
        "adapters. Each method ran in its own process on a warm page cache. The 32-layer "
        "column is the CPU time times 32 / layers (the adapter is 32 / layers times larger; "
        "the construction of the PEFT model grows the same way). GPU: not measured (no GPU "
        "was available).")]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
