"""``compeft merge``: task arithmetic and TIES straight from compressed experts."""

from __future__ import annotations

import argparse
import json
import math
import textwrap

from ..merge import METHODS, RESCALE_RULES, SIGN_METHODS
from ..merge_io import merge_files
from .options import (
    UsageError,
    add_command,
    add_force,
    add_format_version,
    add_json,
    add_quiet,
    add_verbose,
    density,
    list_of,
)
from .output import show_progress

EPILOG = """\
examples:
  compeft merge sentiment.compeft topic.compeft -o merged.compeft
  compeft merge a/ b/ c/ -o merged_adapter --method ties --weights 1,0.5,0.5
  compeft merge a.compeft b.compeft -o model.safetensors --base base.safetensors
  compeft merge a/ b/ c/ -o merged_adapter --rescale expected_ties --base init/

OUTPUT: *.compeft compresses the merged task vector again (ternary; --density defaults to
the largest input density, as recorded in the inputs), keeping the inputs' base binding;
*.safetensors gets the dense merged task vector, or with --base base plus merged task
vector; any other name, for compressed adapter directories, is a PEFT adapter directory
(adapter_config.json + adapter_model.safetensors) that PeftModel.from_pretrained loads.
Inputs compressed against a base (compeft compress --base) need it again for a dense
output. LoRA A and B matrices are merged each on its own (as the ComPEFT paper and PEFT's
ties do), which is not the merge of the products B A: see the README.

--rescale: without it ties is exactly PEFT's ties(..., density=1.0), which over compressed
(sparse) experts is nearly a sum, each expert about twice as strong as in the TIES of the
originals. For TIES of compressed experts use --rescale expected_ties: each entry gets the
expected TIES of the original experts given what their compressions kept (data-free; the
inputs compressed with proj_vcap or proj, or with a rule that records the proj scale it
replaced, as the default auto does), the least-squares table that keeps each expert's
projection. dense_divisor is the simpler earlier rule (zeros counted in the
divisor with the chance they agree). Which rule at which density, measured on the project's
experts (bench/results/merge_quality.md): expected_ties at density 0.2 (at 0.1 the two are
level), dense_divisor at 0.05 and with --sign frequency. Both merge an input that records
its proj scale at that scale; otherwise both are the identity for sum and mean.
"""


def weight(text: str) -> float:
    """A finite number (negative weights subtract a task)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``merge`` to the subcommands ``sub``."""
    m = add_command(
        sub, "merge", run_merge,
        help="merge compressed experts (TIES, task arithmetic) from their files",
        description=textwrap.fill(
            "Merge two or more compeft files or compressed adapter directories, one tensor at "
            "a time: ties (TIES-Merging; the compression already trimmed the task vectors), "
            "sum (task arithmetic) or mean. The semantics are those of "
            "peft.utils.merge_utils.ties(..., density=1.0) and task_arithmetic.", 88),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="compeft files or compressed adapter directories (two or more)")
    m.add_argument("-o", "--output", required=True, metavar="OUTPUT",
                   help="the merged expert: .compeft, .safetensors, or an adapter folder "
                   "(see below)")
    m.add_argument("--method", choices=METHODS, default="ties",
                   help="ties: elect a sign per entry, average the inputs that agree; sum: "
                   "weighted sum; mean: sum / n (default ties)")
    m.add_argument("--weights", type=list_of(weight), metavar="W1,W2,...",
                   help="one weight per input (default all 1)")
    m.add_argument("--sign", choices=SIGN_METHODS, default="total",
                   help="ties' sign election: by the sum of the values (total) or by the "
                   "count of signs (frequency); a tie counts as positive (default total)")
    m.add_argument("--density", type=density, metavar="K",
                   help="density of a .compeft OUTPUT (default: the largest input density)")
    m.add_argument("--base", metavar="BASE",
                   help="the base checkpoint (or initial adapter) the inputs were compressed "
                   "against, for a dense OUTPUT: base plus merged task vector")
    m.add_argument("--rescale", choices=sorted(RESCALE_RULES) or None, metavar="RULE",
                   help="a data-free rule for TIES of compressed inputs (see below)"
                   + (f" ({', '.join(sorted(RESCALE_RULES))})" if RESCALE_RULES else
                      " (none is registered)"))
    add_format_version(m, "a .compeft OUTPUT")
    add_force(m, "replace an existing OUTPUT (never an INPUT)")
    add_quiet(m)
    add_verbose(m, "also list the inputs merged")
    add_json(m, "print the summary as one JSON document")


def run_merge(args: argparse.Namespace) -> int:
    """``compeft merge``."""
    if len(args.inputs) < 2:
        raise UsageError(f"give two or more inputs to merge, got {len(args.inputs)}")
    if "-" in args.inputs:
        raise UsageError("merge reads files and folders; stdin (-) is not an input here")
    if args.weights is not None and len(args.weights) != len(args.inputs):
        raise UsageError(f"--weights has {len(args.weights)} values for "
                         f"{len(args.inputs)} inputs")
    summary = merge_files(args.inputs, args.output, method=args.method, weights=args.weights,
                          sign=args.sign, density=args.density, base=args.base,
                          rescale=args.rescale, force=args.force,
                          format_version=args.format_version,
                          progress=show_progress(args))
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    elif not args.quiet:
        print(summary.format())
        if args.verbose:
            print("  inputs        " + "\n                ".join(summary.inputs))
    return 0
