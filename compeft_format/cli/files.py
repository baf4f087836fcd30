"""Which files a command reads and writes: default output names, ``-`` for stdin and stdout,
several INPUTs with ``-o DIR/``, and running them one by one or in worker processes.

Naming rules (``compeft compress`` / ``decompress`` without ``-o``, and inside ``-o DIR/``):

* compress: a file ``x.safetensors`` gives ``x.compeft``, any other file ``x`` gives
  ``x.compeft`` too, a folder ``NAME`` (an adapter) gives a folder ``NAME.compeft``; a name
  already ending in ``.compeft`` is refused.
* decompress: a file ``x.compeft`` gives ``x.safetensors``, a folder ``NAME.compeft`` gives a
  folder ``NAME``; a name not ending in ``.compeft`` is refused.

An output that exists is refused without ``-f/--force``; an input is never overwritten.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import errno
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CompeftError, ConvertError, with_path
from .options import UsageError

STDIO = "-"
COMPEFT_SUFFIX = ".compeft"
SAFETENSORS_SUFFIX = ".safetensors"


def default_output(src: str, command: str) -> str:
    """The output ``command`` writes for ``src`` when no ``-o`` names one (see the module doc).

    >>> default_output("runs/x.safetensors", "compress"), default_output("x.compeft", "decompress")
    ('runs/x.compeft', 'x.safetensors')
    """
    p = Path(src)
    name = p.name if p.name not in ("", ".", "..") else Path(os.path.abspath(src)).name
    if command == "decompress":
        if not name.endswith(COMPEFT_SUFFIX) or name == COMPEFT_SUFFIX:
            if not p.exists() and not p.is_symlink():  # the first thing wrong with it
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), src)
            raise ConvertError(f"{src}: cannot name the output: the name does not end in "
                               f"{COMPEFT_SUFFIX}; give one with -o")
        stem = name[: -len(COMPEFT_SUFFIX)]
        return str(p.parent / (stem if p.is_dir() else stem + SAFETENSORS_SUFFIX))
    if name.endswith(COMPEFT_SUFFIX):
        raise ConvertError(f"{src}: it is a compeft file already (decompress it, or name the "
                           "output with -o)")
    if not p.is_dir() and name.endswith(SAFETENSORS_SUFFIX) and name != SAFETENSORS_SUFFIX:
        name = name[: -len(SAFETENSORS_SUFFIX)]
    return str(p.parent / (name + COMPEFT_SUFFIX))


@dataclass(frozen=True)
class Job:
    """One INPUT and its OUTPUT (either may be ``-``: stdin, stdout)."""

    src: str
    dst: str


def plan(args: argparse.Namespace, command: str) -> list[Job]:
    """The jobs of ``compress``/``decompress``/``tune`` from ``args`` (INPUTs, ``-o``, ``-c``).

    Raises :class:`UsageError` for a combination that cannot work (several INPUTs to stdout,
    ``-`` among several INPUTs...) and :class:`ConvertError` for an output that cannot be
    named, or two INPUTs that would write the same output; before any work.
    """
    inputs: list[str] = list(args.inputs)
    output: str | None = args.output
    if getattr(args, "stdout", False):
        if output not in (None, STDIO):
            raise UsageError("give -c/--stdout or -o OUTPUT, not both")
        output = STDIO
    if STDIO in inputs and len(inputs) > 1:
        raise UsageError("- (stdin) must be the only INPUT")
    if output is None and inputs == [STDIO]:
        output = STDIO  # as gzip and zstd: stdin to stdout
    if output == STDIO:
        if len(inputs) > 1:
            raise UsageError("several INPUTs cannot all go to stdout; give -o DIR/ or no -o")
        if inputs[0] != STDIO and os.path.isdir(inputs[0]):
            raise ConvertError(f"{inputs[0]}: an adapter folder gives a folder, which cannot "
                               "be written to stdout; give -o")
        return [Job(inputs[0], STDIO)]
    if output is not None and (len(inputs) > 1 or output.endswith(("/", os.sep))):
        if STDIO in inputs:
            raise UsageError("- (stdin) needs -o FILE or -c: it has no name to give the output")
        folder = Path(output)
        jobs = [Job(s, str(folder / Path(default_output(s, command)).name)) for s in inputs]
    elif output is not None:
        jobs = [Job(inputs[0], output)]
    else:
        jobs = [Job(s, default_output(s, command)) for s in inputs]
    seen: dict[str, str] = {}
    for j in jobs:
        key = os.path.normpath(os.path.abspath(j.dst))
        if key in seen:
            raise ConvertError(f"{j.dst}: both {seen[key]} and {j.src} would be written there; "
                               "give them different names or folders")
        seen[key] = j.src
    return jobs


def make_folder(jobs: Sequence[Job], args: argparse.Namespace) -> None:
    """Create the ``-o DIR/`` folder (and its parents) when the outputs go there."""
    if args.output is not None and args.output != STDIO and (
            len(jobs) > 1 or args.output.endswith(("/", os.sep))):
        ensure_folder(args.output)


def ensure_folder(path: str | os.PathLike) -> Path:
    """``path`` as a folder, created with its parents if missing; a :class:`ConvertError`
    where a file (or anything but a folder) is in the way."""
    folder = Path(path)
    for p in (folder, *folder.parents):
        if p.exists() and not p.is_dir():
            raise ConvertError(f"{path}: {'it' if p == folder else p} exists and is not a "
                               "folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def refuse_terminal(jobs: Sequence[Job]) -> None:
    """Neither read binary data from a terminal nor write it to one (as zstd refuses)."""
    for j in jobs:
        if j.src == STDIO and _isatty(sys.stdin):
            raise UsageError("stdin is a terminal: pipe the INPUT in, or name a file")
        if j.dst == STDIO and _isatty(sys.stdout):
            raise UsageError("stdout is a terminal: redirect it, or name an OUTPUT with -o")


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def staged(job: Job, *, src_suffix: str, dst_suffix: str) -> Iterator[Job]:
    """``job`` with ``-`` replaced by real files: stdin spooled to a temporary file, and a
    temporary output that is copied to stdout, byte for byte, when the block succeeds.

    The formats need random access (a memory-mapped input; an output read back for the
    quality figures), so the data pass through a private temporary folder (``TMPDIR``),
    removed in every case.
    """
    if STDIO not in (job.src, job.dst):
        yield job
        return
    with tempfile.TemporaryDirectory(prefix="compeft-stdio-") as tmp:
        src, dst = job.src, job.dst
        if src == STDIO:
            src = os.path.join(tmp, "stdin" + src_suffix)
            with open(src, "wb") as f:
                shutil.copyfileobj(sys.stdin.buffer, f, 1 << 20)
        if dst == STDIO:
            dst = os.path.join(tmp, "stdout" + dst_suffix)
        yield Job(src, dst)
        if job.dst == STDIO:
            if os.path.isdir(dst):
                raise ConvertError("an adapter folder cannot be written to stdout; give -o")
            sys.stdout.flush()
            with open(dst, "rb") as f:
                shutil.copyfileobj(f, sys.stdout.buffer, 1 << 20)
            sys.stdout.buffer.flush()


def pool_of(workers: int, jobs: int) -> cf.ProcessPoolExecutor:
    """``min(workers, jobs)`` worker processes, spawned, not forked: a fork copies whatever
    threads hold (a progress bar's monitor, a zstd worker), and Python 3.12+ warns about
    forking a threaded process."""
    return cf.ProcessPoolExecutor(max_workers=max(1, min(workers, jobs)),
                                  mp_context=multiprocessing.get_context("spawn"))


def run_jobs(work: Callable[..., Any], jobs: Sequence[Job], workers: int,
             done: Callable[[Job, Any], None], failed: Callable[[Job, BaseException], None],
             **options: Any) -> int:
    """Run ``work(src, dst, **options)`` for every job; return the exit status (1: any failed).

    As gzip does, a failing INPUT does not stop the others: ``failed`` reports it and the rest
    go on. With ``workers > 1`` the jobs run in that many worker processes (each writes its
    own output atomically); ``done``/``failed`` are called in the INPUTs' order.
    """
    status = 0
    if workers <= 1 or len(jobs) <= 1:
        for j in jobs:
            try:
                result = work(j.src, j.dst, **options)
            except CompeftError as exc:  # name the INPUT (or OUTPUT), as the workers do
                named = any(p and p != STDIO and os.fspath(p) in str(exc) for p in (j.src, j.dst))
                failed(j, exc if named else with_path(exc, j.src))
                status = 1
            except OSError as exc:
                failed(j, exc)
                status = 1
            else:
                done(j, result)
        return status
    with pool_of(workers, len(jobs)) as pool:
        futures = [pool.submit(work, j.src, j.dst, **options) for j in jobs]
        try:
            for j, fut in zip(jobs, futures, strict=True):
                exc = fut.exception()
                if exc is None:
                    done(j, fut.result())
                elif isinstance(exc, (CompeftError, OSError)):
                    failed(j, exc)
                    status = 1
                else:
                    raise exc
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    return status

