"""Fresh output arrays for the dense decoders, and the page faults that come with them.

The first write to each page of a fresh array costs a page fault; for a 400 MB output that
is as much as the decoding itself. numpy asks the kernel for huge pages (2 MiB: 512x fewer
faults), the fast path, except where huge pages are *cold*: on a virtual machine that hands
free memory back to its host (virtio-balloon free page reporting), every free 2 MiB block
left alone for a few seconds is returned, and touching it again faults it in from the host,
about 5x slower than small pages (which the kernel serves from warm fragments) and 20x
slower than a warm huge page. Measured here: 0.2 ms per warm huge page, 4.5 ms per cold one,
0.9 ms per 2 MiB of small pages; a fresh 400 MB array is often a mix.

So :class:`Prefault` faults the output's pages just ahead of the writer, one huge page at a
time and timed; at the first cold one it switches the rest of the array to small pages and
faults those in on a helper thread, on the other core, while the writer decodes. Where none
of this applies (another OS, small arrays) the output is plain ``np.zeros``.

The chunked passes of compression take their temporaries from :func:`scratch` instead: one
reused buffer per thread and purpose, so that no chunk pays for fresh pages.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

__all__ = ["PREFAULT_PER_PAGE", "SCRATCH_RESERVE", "Prefault", "fresh_zeros", "scratch", "writing"]

_MIN_BYTES = 64 << 20  # smaller outputs fault in a few milliseconds: not worth a thread
_HUGE = 2 << 20
_PAGE = 4096
_COLD_SECONDS = 1e-3  # a warm huge page is zeroed in ~0.2 ms; a cold one takes ~3 ms
_BLOCK = 8 << 20  # bytes the helper faults in before it tells the writer
_MADV_NOHUGEPAGE = 15  # Linux <sys/mman.h>
_MADV_POPULATE_WRITE = 23
#: written elements per 4 KiB page, on average, from which an output is prefaulted (float32:
#: density 1/64; ComPEFT keeps 5 to 20 %)
PREFAULT_PER_PAGE = 16


def _madvise_function():
    """libc's ``madvise`` on Linux (ctypes releases the GIL around it), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _thp_enabled() -> bool:
    """Whether numpy's large arrays get transparent huge pages (``always`` or ``madvise``)."""
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in mode


_madvise = _madvise_function()
_THP = _thp_enabled()


class Prefault:
    """Fault in the pages of a fresh flat zero array just ahead of its writer.

    The writer calls :meth:`ready` before writing at or below an element index, and
    :meth:`close` before handing the array out. Up to the first cold huge page the faults
    are taken here, on the writer's thread, one huge page per call at most; after it, a
    helper thread writes a zero to one element of every small page (the values do not
    change) a block at a time and publishes how far it got, so the two never write the same
    element concurrently. numpy releases the GIL while it writes, so the helper runs on
    the other core.
    """

    def __init__(self, flat: np.ndarray, huge: bool) -> None:
        self._flat = flat
        self._addr = flat.ctypes.data
        self._done = 0  # elements [0, _done) are faulted in
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._cancelled = False
        if not huge:
            self._small_pages_from(0)

    def _small_pages_from(self, index: int) -> None:
        """Switch elements ``index ..`` to small pages and fault them in on a helper thread."""
        start = -(-(self._addr + index * self._flat.itemsize) // _PAGE) * _PAGE
        end = (self._addr + self._flat.nbytes) // _PAGE * _PAGE
        if end > start:
            _madvise(start, end - start, _MADV_NOHUGEPAGE)  # a hint: failure is harmless
        self._thread = threading.Thread(target=self._run, args=(index,), daemon=True,
                                        name="compeft-prefault")
        self._thread.start()

    def _run(self, index: int) -> None:
        flat = self._flat
        stride = max(1, _PAGE // flat.itemsize)
        block = max(stride, _BLOCK // flat.itemsize)
        populate = True
        try:
            for a in range(index, flat.size, block):
                if self._cancelled:  # the writer failed: the array is thrown away
                    break
                b = min(flat.size, a + block)
                # MADV_POPULATE_WRITE (Linux 5.14+) faults a range in one call, 30% cheaper
                # than a fault per page; otherwise write one element per page
                lo = self._addr + a * flat.itemsize
                hi = self._addr + b * flat.itemsize
                lo_page, hi_page = -(-lo // _PAGE) * _PAGE, hi // _PAGE * _PAGE
                if not (populate and hi_page > lo_page
                        and _madvise(lo_page, hi_page - lo_page, _MADV_POPULATE_WRITE) == 0):
                    populate = False
                    flat[a:b:stride] = 0
                else:  # the partial pages at either end
                    flat[a : min(b, a + stride)] = 0
                    flat[max(a, b - stride) : b] = 0
                with self._cond:
                    self._done = b
                    self._cond.notify_all()
        finally:
            with self._cond:  # never leave a writer waiting, whatever happened
                self._done = flat.size
                self._cond.notify_all()

    def ready(self, index: int) -> None:
        """Return once element ``index`` (and all before it) has been faulted in."""
        if index < self._done:
            return
        if self._thread is None:  # huge pages, on this thread, while they come warm
            flat, size = self._flat, self._flat.itemsize
            while index >= self._done:
                # the end of the huge page that holds element _done
                end = ((self._addr + self._done * size) // _HUGE + 1) * _HUGE
                nxt = min(flat.size, -(-(end - self._addr) // size))
                t0 = time.perf_counter()
                flat[nxt - 1] = 0  # faults in the whole huge page (or the last small one)
                cold = time.perf_counter() - t0 > _COLD_SECONDS
                flat[self._done : nxt : max(1, _PAGE // size)] = 0  # any small pages before
                self._done = nxt
                if cold and nxt < flat.size:
                    self._small_pages_from(nxt)
                    break
            if index < self._done:
                return
        with self._cond:
            while index >= self._done:
                self._cond.wait()

    def close(self, cancel: bool = False) -> None:
        """Wait for the helper to finish (it must not write once the array is handed out).

        ``cancel`` stops it at its next block first (the writer failed).
        """
        self._cancelled = cancel
        if self._thread is not None:
            self._thread.join()


@contextlib.contextmanager
def writing(prefault: Prefault | None) -> Iterator[Callable[[int], None] | None]:
    """Give the writer ``prefault.ready`` (or None), and close the prefault after it.

    >>> flat, prefault = fresh_zeros(10, np.dtype(np.float32))
    >>> with writing(prefault) as ready:
    ...     flat[3] = 1.0
    """
    if prefault is None:
        yield None
        return
    try:
        yield prefault.ready
    except BaseException:
        prefault.close(cancel=True)
        raise
    prefault.close()


def fresh_zeros(numel: int, dtype: np.dtype, *, nnz: int | None = None,
                ) -> tuple[np.ndarray, Prefault | None]:
    """Return a new flat zero array and the :class:`Prefault` its writer goes through.

    ``nnz`` is how many elements the writer will write (None: all of them). Faulting in a
    page the writer never touches costs memory for nothing: untouched pages of ``np.zeros``
    stay unallocated (a 1 GiB output holding one nonzero takes a few KiB). So the prefault
    runs only where the writes touch nearly every page anyway, at least
    :data:`PREFAULT_PER_PAGE` elements a page on average (99.99 % of the pages when they are
    spread out); it is None for sparser outputs, small arrays and where ``madvise`` is not
    available: the writer then simply writes.

    >>> flat, prefault = fresh_zeros(1 << 28, np.dtype(np.float32), nnz=1)
    >>> prefault is None, flat.nbytes
    (True, 1073741824)
    """
    flat = np.zeros(numel, dtype=dtype)
    if flat.nbytes < _MIN_BYTES or _madvise is None:
        return flat, None
    if nnz is not None and nnz * _PAGE < PREFAULT_PER_PAGE * flat.nbytes:
        return flat, None
    return flat, Prefault(flat, huge=_THP)


#: elements a scratch buffer holds at least (the compression passes' chunk size), so that
#: buffers are not re-made as chunk sizes vary
SCRATCH_RESERVE = 1 << 20
_LOCAL = threading.local()


def scratch(size: int, dtype: np.dtype, slot: str = "scratch") -> np.ndarray:
    """A per-thread buffer of at least ``size`` elements (reused: no fresh pages per chunk);
    ``slot`` names a second buffer of the same dtype.

    >>> a = scratch(10, np.float32); b = scratch(10, np.float32)
    >>> a.shape, np.shares_memory(a, b), np.shares_memory(a, scratch(10, np.float32, "x"))
    ((10,), True, False)
    """
    key = (np.dtype(dtype).str, slot)
    buf = getattr(_LOCAL, "bufs", None)
    if buf is None:
        buf = _LOCAL.bufs = {}
    arr = buf.get(key)
    if arr is None or arr.size < size:
        arr = buf[key] = np.empty(max(size, SCRATCH_RESERVE), dtype)
    return arr[:size]
