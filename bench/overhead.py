"""File size over content measure for many-small-tensor adapters (issue 13's size target).

The *content measure* of a file is what its tensors need, whatever the container:

* per ternary tensor, the iid bound ``numel * (H(p) + p)`` bits (``p = nnz / numel``) plus
  4 bytes of scale;
* per dense tensor, its raw bytes;
* all names, joined by ``\\n`` in file order, through zstd at level 3 (the writer's default).

Files are written exactly as the ``compeft compress`` command writes them
(:func:`compeft_format.convert.compress_file`, default options, ``--base`` the adapter's
initial state), so metadata, base binding, index and trailer are all counted.

Run: ``python -m bench.overhead`` (a table), ``python -m bench.overhead FILE...`` (measure
files), ``--json`` for JSON, ``--breakdown`` for where each file's bytes go (:func:`breakdown`).
The target is ``file / content <= 1.05`` at densities 0.01, 0.05 and 0.1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from bench.common import ROOT, entropy_bound, md_table
from compeft_format import FileInfo, inspect, open_file
from compeft_format.convert import compress_file

DENSITIES = (0.01, 0.05, 0.1)
TARGET = 1.05

#: name, PEFT type, [(tensor name, shape)] generator arguments (see :func:`_llm_names`)
OWN = (
    ("LoRA r=8 MiniLM (tests/data)", ROOT / "tests/data/lora-minilm-vader"),
    ("(IA)^3 MiniLM (tests/data)", ROOT / "tests/data/ia3-minilm-vader"),
)


def _llama(layers: int, modules: tuple[str, ...], r: int, width: int = 4096,
           ) -> list[tuple[str, tuple[int, int]]]:
    out = []
    for i in range(layers):
        for m in modules:
            stem = f"base_model.model.model.layers.{i}.self_attn.{m}_proj"
            out += [(f"{stem}.lora_A.weight", (r, width)), (f"{stem}.lora_B.weight", (width, r))]
    return out


def _t5(layers: int, r: int, width: int) -> list[tuple[str, tuple[int, int]]]:
    """q and v of every attention of an encoder-decoder (T5 naming): 12 x layers tensors."""
    out = []
    for side, attns in (("encoder", ("0.SelfAttention",)),
                        ("decoder", ("0.SelfAttention", "1.EncDecAttention"))):
        for i in range(layers):
            for a in attns:
                for m in ("q", "v"):
                    stem = f"base_model.model.{side}.block.{i}.layer.{a}.{m}"
                    out += [(f"{stem}.lora_A.weight", (r, width)),
                            (f"{stem}.lora_B.weight", (width, r))]
    return out


def _llama_ia3(layers: int, width: int = 4096, ffn: int = 11008,
               ) -> list[tuple[str, tuple[int, int]]]:
    """PEFT's default (IA)^3 for LLaMA: k, v (output-side ``(out, 1)``) and the feed-forward
    down projection (input-side ``(1, in)``) of every layer."""
    out = []
    for i in range(layers):
        stem = f"base_model.model.model.layers.{i}"
        out += [(f"{stem}.self_attn.k_proj.ia3_l", (width, 1)),
                (f"{stem}.self_attn.v_proj.ia3_l", (width, 1)),
                (f"{stem}.mlp.down_proj.ia3_l", (1, ffn))]
    return out


def _t5_ia3(layers: int, width: int, ffn: int) -> list[tuple[str, tuple[int, int]]]:
    """PEFT's default (IA)^3 for T5: k and v of every attention, and ``wo`` of every
    feed-forward block."""
    out = []
    for side, attns, ff in (("encoder", ("0.SelfAttention",), "1"),
                            ("decoder", ("0.SelfAttention", "1.EncDecAttention"), "2")):
        for i in range(layers):
            stem = f"base_model.model.{side}.block.{i}.layer"
            for a in attns:
                out += [(f"{stem}.{a}.k.ia3_l", (width, 1)), (f"{stem}.{a}.v.ia3_l", (width, 1))]
            out.append((f"{stem}.{ff}.DenseReluDense.wo.ia3_l", (1, ffn)))
    return out


GENERATED = (
    ("LLM LoRA r=8 q,v 32 layers 4096", lambda: _llama(32, ("q", "v"), 8)),
    ("LLM LoRA r=16 q,k,v,o 32 layers 4096", lambda: _llama(32, ("q", "k", "v", "o"), 16)),
    ("LLM LoRA r=64 q,v 32 layers 4096", lambda: _llama(32, ("q", "v"), 64)),
    ("enc-dec LoRA r=16 q,v 24 layers 1024", lambda: _t5(24, 16, 1024)),
    ("LLM (IA)^3 k,v,down 32 layers 4096", lambda: _llama_ia3(32)),
    ("enc-dec (IA)^3 k,v,wo 12 layers 768", lambda: _t5_ia3(12, 768, 3072)),
)


def content_measure(path: str | Path) -> dict[str, Any]:
    """The content measure of a compeft file (see the module doc) and its parts."""
    bound_bits, scales, dense, names = 0.0, 0, 0, []
    with open_file(path) as f:
        for name in f:
            info = f.info(name)
            names.append(name)
            if info.kind == "ternary":
                p = info.nnz / info.numel if info.numel else 0.0
                bound_bits += info.numel * entropy_bound(p)
                scales += 4
            else:
                dense += info.dense_size
    names_z = len(zstandard.ZstdCompressor(level=3).compress("\n".join(names).encode()))
    total = math.ceil(bound_bits / 8) + scales + dense + names_z
    size = Path(path).stat().st_size
    return {"tensors": len(names), "bound_bytes": math.ceil(bound_bits / 8), "scale_bytes": scales,
            "dense_bytes": dense, "names_zstd": names_z, "content": total, "file": size,
            "ratio": size / total}


#: The parts of :func:`breakdown`, in file order.
PARTS = ("header and metadata", "record framing", "data", "index and trailer")


def breakdown(path: str | Path, info: FileInfo | None = None) -> dict[str, int]:
    """Where the bytes of a compeft file go, from its own layout (:func:`compeft_format.inspect`).

    ``header and metadata``: the file header, the metadata as stored, its checksum and padding
    (everything before the first record). ``data``: the blocks in the records' data areas
    (positions, signs, scale, dense values). ``record framing``: the rest of the records
    (record headers, names, pack member tables with a compact pack's scales, checksums,
    padding). ``index and trailer``: what follows the last data block. The four add up to the
    file size.
    ``info``, the file's :func:`~compeft_format.inspect` where the caller has it (as here,
    :func:`scales_in_data` and :func:`stream_padding`), saves parsing it again.

    >>> from compeft_format import TernaryTensor, dumps
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "t.compeft")
    >>> _ = open(path, "wb").write(dumps({"w": TernaryTensor((1000,), [5, 600], [0, 1], 0.1)}))
    >>> parts = breakdown(path)  # 1.4: the golomb and signs streams' bits, in whole bytes
    >>> sum(parts.values()) == os.path.getsize(path), parts["data"]
    (True, 3)
    """
    info = info or inspect(path)
    # a twin's blocks (format 1.7) are its source's streams: each stream is counted once
    blocks = list({(b.offset, b.first_bit, b.bits, b.stored_size, b.codec): b
                   for t in info.tensors for b in t.blocks if b.stage != "table"}.values())
    first = min((t.offset for t in info.tensors), default=info.file_size - 16)
    # a bit pack member's streams (format 1.4) count their bits, not their bytes
    data = -(-sum(8 * b.stored_size if b.bits is None else b.bits for b in blocks) // 8)
    data_end = max((b.offset + (b.stored_size if b.bits is None else
                                -(-(b.first_bit + b.bits) // 8)) for b in blocks),
                   default=first)
    return {"header and metadata": first, "record framing": data_end - first - data,
            "data": data, "index and trailer": info.file_size - data_end}


def scales_in_data(path: str | Path, info: FileInfo | None = None) -> int:
    """Bytes of scale blocks in the data areas (a compact pack keeps its scales in its table).

    >>> from compeft_format import TernaryTensor, dumps
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "t.compeft")
    >>> t = TernaryTensor((1000,), [5, 600], [0, 1], 0.1)
    >>> _ = open(path, "wb").write(dumps({"w": t}, version="1.2"))
    >>> scales_in_data(path)
    4
    """
    return sum(b.stored_size for t in (info or inspect(path)).tensors for b in t.blocks
               if b.codec == "scale" and b.stage != "table")


def stream_padding(path: str | Path, info: FileInfo | None = None) -> dict[str, int]:
    """Bits lost to byte rounding in the ternary tensors' own bit streams.

    ``positions``: the zero bits after the last ``1`` of each golomb payload (its unary part
    ends with a 1) and after the ``N`` bits of each bitmask; ``signs``: ``8 ceil(n / 8) - n``
    for each signs payload. What a layout with each tensor's streams at bit granularity saves
    (see ``bench/results/overhead.md``): none in a 1.4 bit pack, whose streams are stored so.

    >>> from compeft_format import TernaryTensor, dumps
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "t.compeft")
    >>> t = TernaryTensor((1000,), [5, 600], [0, 1], 0.1)
    >>> _ = open(path, "wb").write(dumps({"w": t}, positions="golomb", version="1.3"))
    >>> stream_padding(path)["signs"]
    6
    """
    info, data = info or inspect(path), Path(path).read_bytes()
    positions = signs = 0
    for t in info.tensors:
        for b in t.blocks:
            if b.stage == "table" or not b.stored_size or b.bits is not None:
                continue
            if b.codec == "signs":
                signs += 8 * b.stored_size - t.nnz
            elif b.codec == "golomb" and b.stage == "none":
                positions += 8 - data[b.offset + b.stored_size - 1].bit_length()
            elif b.codec == "bitmask" and b.stage == "none":
                positions += 8 * b.stored_size - math.prod(t.shape)
    return {"positions": positions, "signs": signs}


def layout_parts(path: str | Path) -> dict[str, Any]:
    """What ``--breakdown`` adds to a row: :func:`breakdown`, :func:`scales_in_data` and
    :func:`stream_padding` of the file."""
    info = inspect(path)  # parsed once for the three
    return {"parts": breakdown(path, info), "data_scale_bytes": scales_in_data(path, info),
            "padding": stream_padding(path, info)}


def write_adapter(folder: Path, shapes: list[tuple[str, tuple[int, int]]], seed: int) -> Path:
    """A PEFT adapter folder with an ``init/`` and trained-like values: a LoRA (A random, B
    zero at init) or, for ``ia3_l`` names, an (IA)^3 (ones at init)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    ia3 = shapes[0][0].endswith(".ia3_l")
    init, trained = {}, {}
    for name, shape in shapes:
        if ia3:
            init[name] = np.ones(shape, np.float32)
        elif name.endswith("lora_A.weight"):
            init[name] = rng.standard_normal(shape, np.float32) * 0.02
        else:
            init[name] = np.zeros(shape, np.float32)
        # heavy-tailed updates, as trained adapters have
        trained[name] = init[name] + rng.standard_t(3, shape).astype(np.float32) * 1e-3
    if ia3:
        modules = sorted({n.split(".")[-2] for n, _ in shapes})
        config = {"peft_type": "IA3", "target_modules": modules,
                  "feedforward_modules": [m for m in modules if m in ("down_proj", "wo")]}
    else:
        config = {"peft_type": "LORA", "r": shapes[0][1][0], "lora_alpha": 16,
                  "target_modules": sorted({n.split(".")[-3] for n, _ in shapes})}
    for sub, weights in (("", trained), ("init", init)):
        d = folder / sub
        d.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps(config))
    return folder


def measure_all(densities: tuple[float, ...] = DENSITIES, generated: bool = True,
                parts: bool = False) -> list[dict[str, Any]]:
    """Compress every adapter at every density as ``compeft compress --base init`` does.

    With ``parts``, each row also has the file's :func:`breakdown` under ``"parts"``.
    """
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        adapters = list(OWN)
        if generated:
            for i, (label, shapes) in enumerate(GENERATED):
                adapters.append((label, write_adapter(Path(tmp) / f"gen{i}", shapes(), 100 + i)))
        for label, folder in adapters:
            for p in densities:
                out = Path(tmp) / f"out-{len(rows)}"
                compress_file(folder, out, density=p, base=folder / "init")
                path = out / "adapter_model.compeft"
                row = content_measure(path) | (layout_parts(path) if parts else {})
                rows.append({"adapter": label, "density": p, **row})
    return rows


def table_md(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`measure_all` rows."""
    header = ["adapter", "tensors", "density", "content bytes", "of which names", "file bytes",
              "file / content"]
    body = [[r["adapter"], str(r["tensors"]), f"{r['density']:g}", f"{r['content']:,}",
             f"{r['names_zstd']:,}", f"{r['file']:,}", f"{r['ratio']:.3f}"] for r in rows]
    return md_table(header, body, "lrrrrrr")


def breakdown_md(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the rows' :func:`breakdown` against their content measure.

    ``overhead`` is file minus content; ``allowed`` is what the target leaves (0.05 x content).
    The last four columns add up to ``overhead``: ``header and metadata``; ``framing - names
    - scales``, the record framing minus what of the content measure it holds (the compressed
    names, and the 4-byte scales a compact pack keeps in its member table: negative where it
    stores them in fewer bytes); ``data above bound``, the data areas minus the iid bound,
    the scales stored there and dense values (the coding's own excess); ``index and trailer``.
    """
    header = ["adapter", "density", "overhead", "allowed", *PARTS[:1],
              "framing - names - scales", "data above bound", PARTS[3]]
    body = []
    for r in rows:
        p = r["parts"]
        above = p["data"] - r["bound_bytes"] - r["data_scale_bytes"] - r["dense_bytes"]
        framing = (p["record framing"] - r["names_zstd"]
                   - (r["scale_bytes"] - r["data_scale_bytes"]))
        body.append([r["adapter"], f"{r['density']:g}", f"{r['file'] - r['content']:,}",
                     f"{(TARGET - 1) * r['content']:,.0f}", f"{p[PARTS[0]]:,}",
                     f"{framing:,}", f"{above:,}", f"{p[PARTS[3]]:,}"])
    return md_table(header, body, "lrrrrrrr")


def padding_md(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the rows' :func:`stream_padding` against their overhead."""
    header = ["adapter", "density", "tensors", "positions padding bits", "signs padding bits",
              "both, bytes", "overhead", "allowed"]
    body = [[r["adapter"], f"{r['density']:g}", str(r["tensors"]),
             f"{r['padding']['positions']:,}", f"{r['padding']['signs']:,}",
             f"{sum(r['padding'].values()) / 8:,.0f}", f"{r['file'] - r['content']:,}",
             f"{(TARGET - 1) * r['content']:,.0f}"] for r in rows]
    return md_table(header, body, "lrrrrrrr")


def main(argv: list[str] | None = None) -> int:
    """Print the table (or measure the files given)."""
    ap = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__)
    ap.add_argument("files", nargs="*", help="measure these compeft files instead")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--own-only", action="store_true", help="skip the generated adapters")
    ap.add_argument("--breakdown", action="store_true",
                    help="also say where each file's bytes go (header and metadata, record "
                         "framing, data, index and trailer) against the content measure's parts")
    args = ap.parse_args(argv)
    if args.files:
        rows = [{"adapter": f, "density": float("nan"), **content_measure(f),
                 **(layout_parts(f) if args.breakdown else {})} for f in args.files]
    else:
        rows = measure_all(generated=not args.own_only, parts=args.breakdown)
    print(json.dumps(rows, indent=1) if args.json else table_md(rows))
    if args.breakdown and not args.json:
        print()
        print(breakdown_md(rows))
        print()
        print(padding_md(rows))
    worst = max(r["ratio"] for r in rows)
    print(f"\nworst file / content: {worst:.3f} (target <= {TARGET})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
