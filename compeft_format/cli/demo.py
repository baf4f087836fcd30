"""``compeft demo``: the shipped LoRA adapter compressed and restored."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ..convert import ADAPTER_CONFIG, compress_file, decompress_file
from ..errors import CompeftError
from .options import add_quiet
from .output import show_progress


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``demo`` to the subcommands ``sub``."""
    m = sub.add_parser("demo", help="compress and restore a small real LoRA adapter",
                       description="Compress the LoRA adapter shipped in the package "
                       "(all-MiniLM-L6-v2, trained on VADER sentiment) from its initial "
                       "state, restore it, and print the summaries.")
    m.set_defaults(run=run_demo)
    add_quiet(m)


def run_demo(args: argparse.Namespace) -> int:
    """``compeft demo``."""
    from importlib import resources

    root = resources.files("compeft_format") / "demo" / "lora-minilm-vader"
    with resources.as_file(root) as adapter, tempfile.TemporaryDirectory() as tmp:
        if not (adapter / ADAPTER_CONFIG).is_file():
            raise CompeftError(f"{adapter}: the demo adapter is not installed")
        show = show_progress(args)
        print("demo: a LoRA adapter (r=8, 74 tensors) of all-MiniLM-L6-v2 trained on VADER "
              "sentiment, measured from its saved initial state\n")
        out = Path(tmp) / "compressed"
        s = compress_file(adapter, out, base=adapter / "init", progress=show)
        print(s.format())
        print()
        d = decompress_file(out, Path(tmp) / "restored", base=adapter / "init", progress=show)
        print(d.format())
        print(f"\nThe restored directory is a PEFT adapter: {ADAPTER_CONFIG} and "
              "adapter_model.safetensors, ready for PeftModel.from_pretrained.")
    return 0
