"""Many checkpoints at once: :func:`compress_many` over any ``concurrent.futures.Executor``.

Each input is one :func:`~compeft_format.convert.compress_file` call, run where the executor
runs it: in this process (no executor), in worker processes
(``concurrent.futures.ProcessPoolExecutor``) or on a cluster (``dask.distributed``'s
``Client.get_executor()``; Ray through a five-line adaptor, see docs/BATCH.md). A worker
writes its output itself, atomically, so the paths must be reachable from the workers (a
shared file system); only the summaries travel back. The outputs are byte-identical to
``compress_file``'s: the same call, wherever it runs.
"""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ._progress import Bar
from .convert import compress_file
from .errors import CompeftError, ConvertError, with_path
from .summary import CompressSummary

__all__ = ["batch_outputs", "compress_many", "output_name"]

_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
#: compress_file's keyword arguments (``progress`` is compress_many's own).
_OPTIONS = frozenset(inspect.signature(compress_file).parameters) - {"src", "dst", "progress"}


def output_name(source: str | os.PathLike) -> str:
    """The name of ``source``'s output in an output directory.

    A file ``x.safetensors`` (or ``.bin``/``.pt``/``.pth``, or any other name) gives
    ``x.compeft``; a directory (an adapter, a model folder) gives a directory of the same
    name.

    >>> output_name("runs/a/adapter.safetensors"), output_name("/tmp")
    ('adapter.compeft', 'tmp')
    """
    p = Path(source)
    if p.is_dir():
        return p.resolve().name if p.name in ("", ".", "..") else p.name
    for suffix in _SUFFIXES:
        if p.name.endswith(suffix) and len(p.name) > len(suffix):
            return p.name[: -len(suffix)] + ".compeft"
    return p.name + ".compeft"


def batch_outputs(sources: Sequence[str | os.PathLike],
                  directory: str | os.PathLike) -> list[Path]:
    """The outputs of ``sources`` in ``directory`` (:func:`output_name`), refusing clashes.

    Raises :class:`~compeft_format.errors.ConvertError` when two sources would write the
    same output (``a/adapter`` and ``b/adapter``): give the outputs one by one instead.

    >>> [str(p) for p in batch_outputs(["a/x.safetensors", "b/y.safetensors"], "out")]
    ['out/x.compeft', 'out/y.compeft']
    """
    d = Path(directory)
    outs = [d / output_name(s) for s in sources]
    seen: dict[Path, str | os.PathLike] = {}
    for src, out in zip(sources, outs, strict=True):
        if out in seen:
            raise ConvertError(f"{out}: both {os.fspath(seen[out])} and {os.fspath(src)} "
                               "would be written there; give one output per input instead")
        seen[out] = src
    return outs


def _compress_one(src: str, dst: str, options: dict[str, Any]) -> CompressSummary:
    """One task: module-level (workers import it by name), positional arguments only, so
    that no executor takes an option for one of its own (dask's ``submit(..., key=)``)."""
    try:
        return compress_file(src, dst, **options)
    except CompeftError as exc:
        if str(exc).startswith(src):
            raise
        raise with_path(exc, src) from None  # name the input among thousands


def compress_many(
    sources: Iterable[str | os.PathLike],
    outputs: Iterable[str | os.PathLike] | str | os.PathLike,
    *,
    executor: cf.Executor | None = None,
    return_exceptions: bool = False,
    progress: bool = False,
    **options: Any,
) -> list[CompressSummary | BaseException]:
    """Compress every source to its output; return the summaries in the sources' order.

    Parameters
    ----------
    sources:
        What :func:`~compeft_format.convert.compress_file` takes: safetensors files, adapter
        directories...
    outputs:
        One output per source, in order; or one directory (a ``str`` or path, created if
        missing), where each output takes its source's name (:func:`batch_outputs`).
    executor:
        Any ``concurrent.futures.Executor``: ``ThreadPoolExecutor``, ``ProcessPoolExecutor``,
        ``dask.distributed.Client(...).get_executor()``... None runs the sources one after
        another in this process. The executor is used, not shut down.
    return_exceptions:
        False: the first failure cancels the sources not yet started, waits for those
        running, and is raised (outputs already written stay; each is complete). True: every
        source runs, and a failure takes its place in the returned list as the exception.
    progress:
        A progress bar over the sources on stderr (the workers show none).
    **options:
        ``compress_file``'s keyword arguments (``density``, ``base``, ``force``...), the same
        for every source.

    Returns
    -------
    list
        One :class:`~compeft_format.summary.CompressSummary` per source, in order (or the
        exception, with ``return_exceptions``).

    Examples
    --------
    >>> import os, tempfile, numpy as np
    >>> from concurrent.futures import ThreadPoolExecutor
    >>> from compeft_format.safetensors_io import save_safetensors
    >>> d = tempfile.mkdtemp()
    >>> srcs = [os.path.join(d, f"tv{i}.safetensors") for i in range(3)]
    >>> for i, s in enumerate(srcs):
    ...     save_safetensors({"w": np.random.default_rng(i).normal(size=256).astype(
    ...         np.float32)}, s)
    >>> with ThreadPoolExecutor(2) as pool:
    ...     got = compress_many(srcs, os.path.join(d, "out"), executor=pool, density=0.25)
    >>> [(os.path.basename(s.file), s.nnz) for s in got]
    [('tv0.compeft', 64), ('tv1.compeft', 64), ('tv2.compeft', 64)]
    """
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:  # before any work: not one failure per source
        raise TypeError(f"compress_file takes no option {unknown[0]!r}")
    srcs = [os.fspath(s) for s in sources]
    if isinstance(outputs, (str, os.PathLike)):
        outs = [os.fspath(p) for p in batch_outputs(srcs, outputs)]
        if srcs:
            Path(outputs).mkdir(parents=True, exist_ok=True)
    else:
        outs = [os.fspath(p) for p in outputs]
        if len(outs) != len(srcs):
            raise ConvertError(f"{len(srcs)} sources but {len(outs)} outputs; give one output "
                               "per source, or one directory")
        counts: dict[str, int] = {}
        for o in outs:
            key = os.path.normpath(os.path.abspath(o))
            counts[key] = counts.get(key, 0) + 1
            if counts[key] == 2:
                raise ConvertError(f"{o}: given as the output of two sources")

    with Bar(progress, len(srcs), "compress", unit="file") as bar:
        if executor is None:
            results: list[CompressSummary | BaseException] = []
            for s, o in zip(srcs, outs, strict=True):
                try:
                    results.append(_compress_one(s, o, options))
                except Exception as exc:
                    if not return_exceptions:
                        raise
                    results.append(exc)
                bar.update()
            return results

        futures = [executor.submit(_compress_one, s, o, options)
                   for s, o in zip(srcs, outs, strict=True)]
        first: BaseException | None = None
        try:
            for fut in cf.as_completed(futures):
                bar.update()
                exc = fut.exception()
                if exc is not None and not return_exceptions:
                    first = exc
                    break
        finally:
            if first is not None or not all(f.done() for f in futures):
                # an error (or an interrupt): start nothing more, let the running ones end
                for f in futures:
                    f.cancel()
                cf.wait(futures)
        if first is not None:
            raise first
        return [f.exception() or f.result() for f in futures]
