"""A 1B-parameter BF16 full fine-tune, as a sharded model folder: compress and restore it
with ``--base``; time and peak resident memory of each command.

Writes two Hugging Face model folders with the tensor shapes of Llama 3.2 1B (vocabulary
128,256, hidden 2,048, MLP 8,192, 16 layers, 32 query and 8 key/value heads, tied
embeddings: 1.24B parameters, 2.47 GB in BF16), sharded (``--shard-gb``) with
``model.safetensors.index.json``: a base of N(0, 0.02) values and a "full fine-tune" (base
plus N(0, 0.002) noise, rounded to BF16). Then runs, in child processes (peak RSS from
``os.wait4``, which counts mapped file pages too, as in ``bench_memory.py``)::

    compeft compress FT -o C --base BASE --density D
    compeft decompress C -o OUT --base BASE

and checks that OUT is sharded as FT (same files, same weight map). Target: peak memory
within twice the largest tensor (the BF16 embedding, 525 MB) plus 300 MB.

Usage::

    python bench/bench_1b.py                 # the 1B model (needs ~10 GB of disk)
    python bench/bench_1b.py --layers 2 --vocab 32000   # a small version, seconds
    python bench/bench_1b.py --density 0.01 --scales auto,proj_vcap,auto,proj_vcap
                        # compress only, once per --scale given, interleaved, no restore
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_memory import MB, _peak, baseline  # noqa: E402

from compeft_format import dtypes as _dt  # noqa: E402
from compeft_format import open_file  # noqa: E402
from compeft_format.safetensors_io import SafetensorsWriter, open_safetensors  # noqa: E402

CHUNK = 1 << 22


def shapes(vocab: int, hidden: int, mlp: int, layers: int, heads: int, kv_heads: int
           ) -> dict[str, tuple[int, ...]]:
    """A Llama-style decoder's tensors (tied embeddings), in save order."""
    head_dim = hidden // heads
    out = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (mlp, hidden),
            p + "mlp.up_proj.weight": (mlp, hidden),
            p + "mlp.down_proj.weight": (hidden, mlp),
        })
    out["model.norm.weight"] = (hidden,)
    return out


def write_folder(folder: Path, layout: dict[str, tuple[int, ...]], shard_bytes: int,
                 seed: int, like: Path | None, config: dict) -> None:
    """A sharded BF16 model folder; ``like``: base + small noise (a full fine-tune)."""
    folder.mkdir()
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in layout.items():
        nbytes = 2 * int(np.prod(shape))
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    rng = np.random.default_rng(seed)
    weight_map = {}
    base_readers = {}
    if like is not None:
        index = json.loads((like / "model.safetensors.index.json").read_text())
        for shard in set(index["weight_map"].values()):
            base_readers[shard] = open_safetensors(like / shard)
        base_of = {n: base_readers[s] for n, s in index["weight_map"].items()}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with open(folder / fname, "wb") as f, SafetensorsWriter(
                f, [(n, "BF16", layout[n]) for n in names], metadata={"format": "pt"}) as w:
            for name in w.order:
                numel = int(np.prod(layout[name]))
                flat = base_of[name].get(name)[0].reshape(-1) if like is not None else None
                for start in range(0, numel, CHUNK):
                    n = min(CHUNK, numel - start)
                    if flat is None:
                        values = rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)
                        if name.endswith("norm.weight"):
                            values += np.float32(1.0)
                    else:
                        values = _dt.bf16_bits_to_f32(flat[start : start + n])
                        values += rng.standard_normal(n, dtype=np.float32) * np.float32(0.002)
                    w.write(name, _dt.f32_to_bf16_bits(values))
                if like is not None:
                    base_of[name].release(name)
                weight_map[name] = fname
    total = sum(2 * int(np.prod(s)) for s in layout.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2,
        sort_keys=True) + "\n")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for r in base_readers.values():
        r.close()


def run(label: str, argv: list[str]) -> tuple[float, float]:
    code, rss, seconds = _peak([sys.executable, "-m", "compeft_format", *argv, "-q"])
    if code != 0:
        raise SystemExit(f"compeft {label} failed with status {code}")
    return rss, seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--mlp", type=int, default=8192)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--shard-gb", type=float, default=1.0, help="shard size (GB)")
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp)")
    p.add_argument("--scales", default=None, help="comma-separated --scale values: compress "
                   "once with each, in this order (repeat one to interleave), and do not "
                   "restore")
    args = p.parse_args(argv)
    layout = shapes(args.vocab, args.hidden, args.mlp, args.layers, args.heads, args.kv_heads)
    params = sum(int(np.prod(s)) for s in layout.values())
    largest = 2 * max(int(np.prod(s)) for s in layout.values())
    target = (2 * largest + 300e6) / MB
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "vocab_size": args.vocab, "hidden_size": args.hidden,
              "intermediate_size": args.mlp, "num_hidden_layers": args.layers,
              "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
              "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
    work = Path(tempfile.mkdtemp(prefix="bench_1b.", dir=args.dir))
    try:
        t0 = time.perf_counter()
        write_folder(work / "base", layout, int(args.shard_gb * 1e9), 0, None, config)
        write_folder(work / "ft", layout, int(args.shard_gb * 1e9), 1, work / "base", config)
        gen_s = time.perf_counter() - t0
        shards = sorted(x.name for x in (work / "ft").glob("*.safetensors"))
        load0 = os.getloadavg()[0]
        print(f"model: {len(layout)} BF16 tensors, {params:,} parameters "
              f"({2 * params / MB:,.0f} MB) in {len(shards)} shards; largest tensor "
              f"{largest / MB:,.0f} MB; generated in {gen_s:.0f} s; density {args.density}; "
              f"python + package imported: {baseline():.0f} MB; "
              f"target: 2 x largest + 300 MB = {target:,.0f} MB\n")
        print("| command | peak RSS MB | target MB | within | seconds |")
        print("|---|---:|---:|---|---:|")
        ok = True
        rows = [("compress --base", ["compress", str(work / "ft"), "-o", str(work / "c"),
                                     "--base", str(work / "base"), "--density",
                                     str(args.density)]),
                ("decompress --base", ["decompress", str(work / "c"), "-o", str(work / "out"),
                                       "--base", str(work / "base")])]
        if args.scales:
            rows = [(f"compress --base --scale {s}",
                     ["compress", str(work / "ft"), "-o", str(work / f"c-{i}"), "--base",
                      str(work / "base"), "--density", str(args.density), "--scale", s])
                    for i, s in enumerate(args.scales.split(","))]
        for label, cmd in rows:
            rss, secs = run(label, cmd)
            ok &= rss <= target
            print(f"| `compeft {label}` | {rss:,.0f} | {target:,.0f} | "
                  f"{'yes' if rss <= target else 'NO'} | {secs:,.1f} |", flush=True)
        if args.scales:
            for i, s in enumerate(args.scales.split(",")):
                with open_file(work / f"c-{i}" / "model.compeft") as r:
                    rule = r.metadata()["compeft.compression"]["scale"]
                print(f"--scale {s}: recorded {rule}, "
                      f"{(work / f'c-{i}' / 'model.compeft').stat().st_size / MB:,.1f} MB")
            print(f"load average (1 min) {load0:.1f} before, {os.getloadavg()[0]:.1f} after; "
                  f"{os.cpu_count()} CPUs")
            return 0 if ok else 1
        size = (work / "c" / "model.compeft").stat().st_size
        same = (sorted(x.name for x in (work / "out").glob("*.safetensors")) == shards and
                json.loads((work / "out" / "model.safetensors.index.json").read_text())[
                    "weight_map"] == json.loads((work / "ft" / "model.safetensors.index.json")
                                                .read_text())["weight_map"])
        print(f"\ncompressed: {size / MB:,.1f} MB ({2 * params / size:.1f}x); restored "
              f"folder sharded as the original: {'yes' if same else 'NO'}; load average "
              f"(1 min) {load0:.1f} before, {os.getloadavg()[0]:.1f} after; "
              f"{os.cpu_count()} CPUs")
        return 0 if ok and same else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
