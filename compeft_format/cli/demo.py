"""``compeft demo``: the shipped LoRA adapter compressed and restored."""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

from ..convert import ADAPTER_CONFIG, ADAPTER_WEIGHTS, compress_file, decompress_file
from ..errors import CompeftError
from .convert import compress_text
from .files import ensure_folder
from .options import add_command, add_force, add_quiet, add_verbose
from .output import show_progress


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``demo`` to the subcommands ``sub``."""
    m = add_command(sub, "demo", run_demo,
                    help="compress and restore a small real LoRA adapter",
                    description="Compress the LoRA adapter shipped in the package "
                    "(all-MiniLM-L6-v2, trained on VADER sentiment) from its initial state, "
                    "restore it, and print the summaries. The files are removed afterwards "
                    "unless --keep names a folder for them.")
    m.add_argument("--keep", metavar="DIR", help="keep the files in DIR (created if missing): "
                   "DIR/compressed (the compressed adapter) and DIR/restored (the restored "
                   "PEFT adapter)")
    add_force(m, "with --keep, replace DIR/compressed and DIR/restored if they exist")
    add_quiet(m)
    add_verbose(m, "also print the quality of every tensor")


def run_demo(args: argparse.Namespace) -> int:
    """``compeft demo``."""
    from importlib import resources

    root = resources.files("compeft_format") / "demo" / "lora-minilm-vader"
    with contextlib.ExitStack() as stack:
        adapter = stack.enter_context(resources.as_file(root))
        if not (adapter / ADAPTER_CONFIG).is_file():
            raise CompeftError(f"{adapter}: the demo adapter is not installed")
        if args.keep is not None:
            folder = ensure_folder(args.keep)
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        out, restored = folder / "compressed", folder / "restored"
        show = show_progress(args)
        say = (lambda *_: None) if args.quiet else print
        say("demo: a LoRA adapter (r=8, 74 tensors) of all-MiniLM-L6-v2 trained on VADER "
            "sentiment, measured from its saved initial state\n")
        s = compress_file(adapter, out, base=adapter / "init", force=args.force, progress=show)
        say(compress_text(s, args.verbose))
        say()
        d = decompress_file(out, restored, base=adapter / "init", force=args.force,
                            progress=show)
        say(d.format())
        if args.keep is not None:
            say(f"\nThe restored folder {restored} is a PEFT adapter ({ADAPTER_CONFIG} and "
                f"{ADAPTER_WEIGHTS}), ready for PeftModel.from_pretrained; the compressed "
                f"one is {out}.")
        else:
            say(f"\nThe restored folder is a PEFT adapter ({ADAPTER_CONFIG} and "
                f"{ADAPTER_WEIGHTS}), ready for PeftModel.from_pretrained; it was removed: "
                "give --keep DIR to keep it.")
    return 0
