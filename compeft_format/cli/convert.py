"""``compeft compress`` and ``compeft decompress``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from typing import Any

from .. import _spec as S
from ..batch import compress_many
from ..compress import DEFAULT_SCALE, SCALE_CHOICES, SCOPES
from ..convert import (
    ADAPTER_COMPEFT,
    ADAPTER_CONFIG,
    DEFAULT_DENSITY,
    compress_file,
)
from ..errors import CompeftError
from ..hifi import DEFAULT_REL_STEP, HIFI_ZSTD_LEVEL
from ..lora_scale import LORA_SCALES
from ..restore import OUTPUT_DTYPES, decompress_file
from ..safetensors_io import open_safetensors
from ..scales import AUTO_GLOBAL_ONLY, AUTO_LORA_RULES, AUTO_SKETCH_DENSITY
from .files import STDIO, Job, make_folder, plan, pool_of, refuse_terminal, run_jobs, staged
from .options import (
    POSITIONS,
    UsageError,
    add_command,
    add_force,
    add_format_version,
    add_json,
    add_quiet,
    add_verbose,
    add_zstd,
    base_choice,
    density,
    jobs,
    positive,
    zstd_choice,
)
from .output import Report, show_progress

STDIN_NAME, STDOUT_NAME = "<stdin>", "<stdout>"

_NAMING = ("Without -o, each OUTPUT is named after its INPUT, beside it: {rule}. An existing "
           "OUTPUT is replaced only with -f. INPUT - reads stdin and -o - (or -c) writes "
           "stdout, byte for byte the file's bytes, the summary going to stderr.")


def _lora_bands(ref: str) -> str:
    """``auto``'s LoRA rules from ``ref``, as the help says them."""
    return ", ".join(f"{rule}{' (--scope global)' if rule in AUTO_GLOBAL_ONLY else ''} "
                     f"at density <= {limit:g}" for limit, rule in AUTO_LORA_RULES[ref])


def _add_io(q: argparse.ArgumentParser, what_in: str, what_out: str) -> None:
    q.add_argument("inputs", nargs="+", metavar="INPUT", help=what_in)
    q.add_argument("-o", "--output", metavar="OUTPUT", help=what_out)
    q.add_argument("-c", "--stdout", action="store_true",
                   help="write to stdout (as -o -); the summary goes to stderr")
    q.add_argument("-j", "--jobs", type=jobs, default=1, metavar="N",
                   help="with several INPUTs, work on N at once in worker processes "
                   "(0: one per CPU; default 1)")
    add_force(q, "replace an existing OUTPUT (never an INPUT)")
    add_quiet(q)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``compress`` and ``decompress`` to the subcommands ``sub``."""
    c = add_command(
        sub, "compress", run_compress,
        help="safetensors file or PEFT adapter folder -> compeft",
        description="Keep the top-k entries of a task vector by magnitude, their signs and one "
        "scale (ComPEFT), and write them as a compeft file. INPUT is a .safetensors file or a "
        "PEFT adapter folder; for a folder, OUTPUT is a folder holding "
        f"{ADAPTER_CONFIG} and {ADAPTER_COMPEFT}. "
        + _NAMING.format(rule="x.safetensors gives x.compeft, a folder NAME gives NAME.compeft"))
    _add_io(c, "a .safetensors file, a PEFT adapter folder, or - (stdin); several are "
            "compressed one by one", "the compeft file (a folder for an adapter folder), "
            "- for stdout, or DIR/ (a trailing /) to write every OUTPUT into DIR")
    c.add_argument("--base", metavar="BASE", type=base_choice,
                   help="the base checkpoint (or initial adapter) "
                   "the task vector is measured from; needed again to decompress. For a LoRA "
                   "adapter, peft-init (or peft-init:SEED) measures it from its initial state "
                   "as PEFT's default init made it, regenerated from the seed (found when not "
                   "given; needs torch, transformers, peft and the base model's config, "
                   "offline); decompress then regenerates it itself. Default for a LoRA "
                   "adapter: peft-init where that can be done, else zero (the summary says "
                   "why); --base zero: from zero without trying")
    c.add_argument("--base-model", metavar="DIR", help="with --base peft-init or "
                   "--calibrate: the base model's folder (its config.json; for --calibrate its "
                   "weights and tokenizer too), when the adapter's base_model_name_or_path is "
                   "neither local nor in the Hugging Face cache")
    c.add_argument("--calibrate", action="store_true",
                   help="LoRA adapters: after the scale rule, multiply every factor's scale "
                   "by the one factor whose rebuilt model's sentence embeddings are closest to "
                   "the adapter's own, run on the base model (offline) over 40 built-in "
                   "sentences (no labels, no task data): within 0.005 of the tuned scale on 99%% "
                   "of the LoRA rows measured, 75%% without (see the README)")
    c.add_argument("--calibration-text", metavar="FILE",
                   help="with --calibrate (implied): these sentences instead, one per line")
    # the ternary options default to None, filled in by _run: --hifi refuses them given
    c.add_argument("--density", type=density, default=None, metavar="K",
                   help=f"fraction of entries kept, in (0, 1] (default {DEFAULT_DENSITY})")
    c.add_argument("--alpha", type=positive, default=None, metavar="A",
                   help="multiplier of the scale (default 1)")
    c.add_argument("--scope", choices=SCOPES, default=None,
                   help="top-k over all tensors together, each on its own, or per LoRA "
                   "role (A's together, B's together) (default global)")
    c.add_argument("--scale", choices=SCALE_CHOICES + LORA_SCALES, default=None,
                   help=f"how the one magnitude is chosen (default {DEFAULT_SCALE}: for a LoRA "
                   f"adapter from its initial adapter {_lora_bands('checkpoint')} (from zero "
                   f"{_lora_bands('zero')}), for (IA)^3 and vectors "
                   f"proj_vcap, else kron_sketch at density <= {AUTO_SKETCH_DENSITY:g}; "
                   "proj_vcap above: the most faithful rebuilt model measured without data; "
                   "the summary and the file name the rule used; see the README); "
                   "lora_product* (LoRA adapters): the factors' scales fitted on the rebuilt "
                   "products B A; proj_vcap: the fastest at any density")
    c.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="tensor names kept dense and lossless (repeatable)")
    c.add_argument("--positions", choices=POSITIONS, default=None,
                   help="how nonzero positions are coded (default auto: the smaller; "
                   "rice = golomb)")
    c.add_argument("--hifi", type=positive, nargs="?", const=DEFAULT_REL_STEP, default=None,
                   metavar="REL_STEP", help="write a high-fidelity file instead: every entry "
                   "as an integer code rint(x / step), the step REL_STEP times the root mean "
                   f"square of the task vector (default {DEFAULT_REL_STEP}; for a LoRA "
                   "adapter, each factor's step divided by its partner's norm), zstd level "
                   f"{HIFI_ZSTD_LEVEL} unless --zstd is given; decompress gives every entry "
                   "back within half a step. Takes no ternary option (--density, --alpha, "
                   "--scope, --scale, --positions)")
    add_zstd(c, f"zstd level tried on every block (default {S.DEFAULT_ZSTD_LEVEL})")
    add_format_version(c, "the file")
    add_verbose(c, "also print the quality of every tensor")
    add_json(c, "print the summary as one JSON document (an array for several INPUTs)")

    d = add_command(
        sub, "decompress", run_decompress,
        help="compeft -> safetensors (or a PEFT adapter folder)",
        description="Write a compeft file back as safetensors with the original names, shapes "
        "and dtypes; a compressed adapter folder comes back as a PEFT adapter folder. "
        + _NAMING.format(rule="x.compeft gives x.safetensors, a folder NAME.compeft gives NAME"))
    _add_io(d, "a .compeft file, a compressed adapter folder, or - (stdin); several are "
            "decompressed one by one", "the .safetensors file (a folder for an adapter "
            "folder), - for stdout, or DIR/ (a trailing /) to write every OUTPUT into DIR")
    d.add_argument("--dtype", choices=sorted(OUTPUT_DTYPES), help="convert float tensors")
    d.add_argument("--base", metavar="BASE", help="add the task vector to this base "
                   "checkpoint (or initial adapter) and write the full tensors (not needed "
                   "for an adapter compressed with --base peft-init: regenerated)")
    d.add_argument("--base-model", metavar="DIR", help="for an adapter compressed with "
                   "--base peft-init: the base model's folder, when the adapter's "
                   "base_model_name_or_path is neither local nor in the Hugging Face cache")
    add_verbose(d, "also list every tensor written (name, dtype, shape)")
    add_json(d, "print the summary as one JSON document (an array for several INPUTs)")


def _shown(summary: Any, job: Job) -> Any:
    """The summary naming stdin and stdout as such, not the temporary files behind them."""
    changes: dict[str, str] = {}
    if job.src == STDIO:
        changes["source"] = STDIN_NAME
    if job.dst == STDIO:
        changes["output"] = changes["file"] = STDOUT_NAME
    return dataclasses.replace(summary, **changes) if changes else summary


def rel_error_note(rel_error: float) -> str | None:
    """A line explaining a relative error above 1, which surprises everyone; else None."""
    if not rel_error > 1:
        return None
    return ("                (above 1 is expected: the kept entries are scaled up to stand in "
            "for the\n                dropped ones, which rebuilds the model better than the "
            "smallest error\n                would; see the README, 'Choosing density and "
            "scale')")


def compress_text(summary: Any, verbose: bool = False) -> str:
    """The compress summary, with the note on a relative error above 1 below its figure."""
    text = summary.format(verbose=verbose)
    note = rel_error_note(summary.quality.overall.rel_error)
    if note is not None:
        lines = text.split("\n")
        at = next((i + 1 for i, line in enumerate(lines) if "rel. error" in line), len(lines))
        text = "\n".join([*lines[:at], note, *lines[at:]])
    return text


def _decompress_text(summary: Any, args: argparse.Namespace, file: str) -> str:
    text = summary.format()
    if args.verbose:
        with open_safetensors(file) as r:
            names = r.keys()
            rows = [(n, r.info(n).dtype, "[" + ",".join(map(str, r.info(n).shape)) + "]")
                    for n in names]
        width = max((len(n) for n, _, _ in rows), default=0)
        text += "\n\n" + "\n".join(f"  {n.ljust(width)}  {dt:<4}  {shape}"
                                   for n, dt, shape in rows)
    return text


#: compress's ternary options and their defaults (None in the parser: see _ternary_options)
_TERNARY = {"density": DEFAULT_DENSITY, "alpha": 1.0, "scope": "global",
            "scale": DEFAULT_SCALE, "positions": "auto"}


def _ternary_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ternary options with their defaults filled in; with ``--hifi``, a usage error
    naming those given (they have no meaning for integer codes of every entry)."""
    given = [k for k in _TERNARY if getattr(args, k) is not None]
    if args.hifi is not None and given:
        raise UsageError("--hifi keeps every entry at a step; it takes no "
                         + ", ".join("--" + k for k in given))
    return {k: d if getattr(args, k) is None else getattr(args, k) for k, d in _TERNARY.items()}


def _run(args: argparse.Namespace, command: str) -> int:
    todo = plan(args, command)
    refuse_terminal(todo)
    to_stdout = todo[0].dst == STDIO
    report = Report(args, data_on_stdout=to_stdout)
    if command == "compress":
        work: Any = compress_file
        describe = lambda s, args, _file: compress_text(s, args.verbose)  # noqa: E731
        suffixes = {"src_suffix": ".safetensors", "dst_suffix": ".compeft"}
        options: dict[str, Any] = {
            **_ternary_options(args), "exclude": args.exclude, "base": args.base,
            "base_model": args.base_model,
            # "auto": the format's default level, or the hi-fi codes' own
            "zstd_level": "auto" if args.zstd is None and not args.no_zstd else zstd_choice(args),
            "format_version": args.format_version}
        if args.hifi is not None:
            options["hifi"] = args.hifi
        if args.calibrate or args.calibration_text is not None:
            options["calibrate"] = args.calibration_text or True
    else:
        work, describe = decompress_file, _decompress_text
        suffixes = {"src_suffix": ".compeft", "dst_suffix": ".safetensors"}
        options = {"dtype": args.dtype, "base": args.base, "base_model": args.base_model}
    options["force"] = args.force
    progress = show_progress(args) and (args.jobs == 1 or len(todo) == 1)

    def done(job: Job, summary: Any, file: str | None = None) -> None:
        report.add(_shown(summary, job).to_dict(),
                   lambda: describe(_shown(summary, job), args, file or summary.file))

    if len(todo) == 1 and STDIO in (todo[0].src, todo[0].dst):
        job = todo[0]
        status, names = 0, {}
        try:
            with staged(job, **suffixes) as real:
                names = {real.src: STDIN_NAME, real.dst: STDOUT_NAME}
                summary = work(real.src, real.dst, progress=progress, **options)
                done(job, summary, summary.file)  # while the temporary output exists
        except (CompeftError, OSError) as exc:
            report.fail(job, exc, {k: v for k, v in names.items() if k != STDIO})
            status = 1
        report.close()
        return status
    make_folder(todo, args)
    if command == "compress" and len(todo) > 1:
        status = _compress_many(todo, args, done, report, options)
    else:
        status = run_jobs(work, todo, args.jobs, done, report.fail, progress=progress,
                          **options)
    report.close()
    return status


def _compress_many(todo: list[Job], args: argparse.Namespace, done: Any, report: Report,
                   options: dict[str, Any]) -> int:
    """Several INPUTs through :func:`~compeft_format.batch.compress_many`: in this process,
    or in ``-j N`` worker processes; every INPUT runs, a failure is reported in its place."""
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(pool_of(args.jobs, len(todo))) if args.jobs > 1 else None
        results = compress_many([j.src for j in todo], [j.dst for j in todo], executor=pool,
                                return_exceptions=True, progress=show_progress(args),
                                **options)
    status = 0
    for job, result in zip(todo, results, strict=True):
        if not isinstance(result, BaseException):
            done(job, result)
        elif isinstance(result, (CompeftError, OSError)):
            report.fail(job, result)
            status = 1
        else:
            raise result
    return status


def run_compress(args: argparse.Namespace) -> int:
    """``compeft compress``."""
    return _run(args, "compress")


def run_decompress(args: argparse.Namespace) -> int:
    """``compeft decompress``."""
    return _run(args, "decompress")
