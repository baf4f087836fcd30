"""What the fuzz harnesses share: atheris when asked for, a corpus replay with mutations else.

A harness module defines ``test_one_input(data: bytes) -> None`` and calls :func:`main`::

    python fuzz/fuzz_loads.py CORPUS_DIR -max_total_time=1800   # atheris (libFuzzer flags)
    python fuzz/fuzz_loads.py --replay [FILE_OR_DIR ...]         # no atheris needed

The replay runs every input, then seeded mutations of each (bit flips, byte sets,
truncations, splices, insertions, deletions), so CI keeps the harness alive without atheris
(``tests/test_fuzz_smoke.py``). A failing input is written to
``fuzz/artifacts/crash-replay-<sha1>`` and the exception propagates, as libFuzzer would do.

:class:`DataProvider` is a small, pure-Python stand-in for ``atheris.FuzzedDataProvider``;
harnesses use it in both modes so that one corpus file means the same input with and without
atheris.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

try:  # atheris is optional: only a campaign needs it
    import atheris
except ImportError:  # pragma: no cover - depends on the environment
    atheris = None

FUZZ_DIR = Path(__file__).resolve().parent
ROOT = FUZZ_DIR.parent
CORPUS_DIR = FUZZ_DIR / "corpus"
ARTIFACTS = FUZZ_DIR / "artifacts"  # crash inputs; ignored by git (fuzz/.gitignore)
if str(ROOT) not in sys.path:  # run from a checkout: the package need not be installed
    sys.path.insert(0, str(ROOT))

#: byte values that tend to sit on boundaries: 0, 1, sign bits, all ones
INTERESTING = (0x00, 0x01, 0x02, 0x07, 0x08, 0x0F, 0x10, 0x3F, 0x40, 0x7F, 0x80, 0x81, 0xFE, 0xFF)


def instrumented(module_name: str) -> contextlib.AbstractContextManager:
    """A context in which ``import compeft_format`` is instrumented for coverage.

    Only when the harness runs as a script under atheris (``module_name == "__main__"``, no
    ``--replay``); imported by a test, it is a no-op, so the package keeps full speed.
    """
    if atheris is None or module_name != "__main__" or "--replay" in sys.argv:
        return contextlib.nullcontext()
    return atheris.instrument_imports(include=["compeft_format"])


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def read_inputs(paths: Iterable[str | os.PathLike]) -> list[bytes]:
    """Return the contents of every file named or found (recursively) under a directory."""
    out = []
    for p in map(Path, paths):
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        out += [f.read_bytes() for f in files if not f.name.startswith(".")]
    return out


def mutations(data: bytes, rng: random.Random, count: int,
              others: list[bytes] | None = None) -> Iterator[bytes]:
    """Yield ``count`` mutants of ``data``, each with one to three edits.

    The edits are the classic ones: flip a bit, set a byte to a boundary value, truncate,
    splice with another input, insert random or repeated bytes, delete a range. Mutants of
    a valid file keep most of its structure, so they reach deep into the reader.
    """
    others = others or [data]
    for _ in range(count):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            op = rng.randrange(7)
            n = len(buf)
            if op == 0 and n:  # bit flip
                i = rng.randrange(n)
                buf[i] ^= 1 << rng.randrange(8)
            elif op == 1 and n:  # byte set to a boundary value
                buf[rng.randrange(n)] = rng.choice(INTERESTING)
            elif op == 2:  # truncation
                del buf[rng.randint(0, n) :]
            elif op == 3:  # splice: our head, another input's tail
                other = rng.choice(others)
                buf = buf[: rng.randint(0, n)] + other[rng.randint(0, len(other)) :]
            elif op == 4:  # insertion of random bytes or a repeat of a slice of the input
                i = rng.randint(0, n)
                if rng.random() < 0.5 or not n:
                    ins = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
                else:
                    j = rng.randrange(n)
                    ins = bytes(buf[j : j + rng.randint(1, 64)])
                buf[i:i] = ins
            elif op == 5 and n:  # deletion
                i = rng.randrange(n)
                del buf[i : i + rng.randint(1, 16)]
            elif op == 6 and n >= 8:  # overwrite a little-endian integer with a big value
                i = rng.randrange(n - 7)
                buf[i : i + 8] = struct.pack("<Q", rng.choice((2**31, 2**32 - 1, 2**63 - 1,
                                                                2**64 - 1, 1 << rng.randrange(64))))
        yield bytes(buf)


def replay(test_one_input: Callable[[bytes], None], inputs: list[bytes], *,
           mutants_per_input: int = 100, seed: int = 0) -> int:
    """Run ``test_one_input`` on every input and on seeded mutants of each; return the count.

    On an exception the failing input is saved as ``fuzz/artifacts/crash-replay-<sha1>`` (like
    libFuzzer's ``crash-<sha1>``) and the exception is re-raised with the file name attached.
    """
    rng = random.Random(seed)
    runs = 0

    def one(data: bytes) -> None:
        nonlocal runs
        runs += 1
        try:
            test_one_input(data)
        except BaseException as exc:
            name = ARTIFACTS / f"crash-replay-{hashlib.sha1(data).hexdigest()}"
            with contextlib.suppress(OSError):
                ARTIFACTS.mkdir(exist_ok=True)
                name.write_bytes(data)
            note = f"input saved as {name} ({len(data)} bytes)"
            if hasattr(exc, "add_note"):  # Python 3.11+
                exc.add_note(note)
            else:
                print(note, file=sys.stderr)
            raise

    for data in inputs:
        one(data)
    for data in inputs:
        for mutant in mutations(data, rng, mutants_per_input, inputs):
            one(mutant)
    return runs


def main(test_one_input: Callable[[bytes], None], harness: str,
         argv: list[str] | None = None) -> None:
    """Fuzz with atheris, or replay with ``--replay`` (the default when atheris is missing).

    With no corpus paths the replay uses ``fuzz/corpus/<harness>/``.
    """
    argv = list(sys.argv if argv is None else argv)
    if atheris is not None and "--replay" not in argv:
        # libFuzzer re-runs argv[0] through the shell for -merge=1 and -fork: make that
        # "this interpreter + this script", so neither a shebang nor an executable bit is needed
        argv[0] = f"{sys.executable} {Path(argv[0]).resolve()}"
        atheris.Setup(argv, test_one_input)
        atheris.Fuzz()
        return
    args = [a for a in argv[1:] if not a.startswith("-")]
    inputs = read_inputs(args or [CORPUS_DIR / harness])
    runs = replay(test_one_input, inputs)
    print(f"{harness}: {runs} inputs replayed ({len(inputs)} corpus files), no crash")


# ---------------------------------------------------------------------------------------------
# A FuzzedDataProvider without atheris
# ---------------------------------------------------------------------------------------------


class DataProvider:
    """Turn fuzzer bytes into typed values; once the bytes run out every value is its minimum.

    Like ``atheris.FuzzedDataProvider`` in spirit, but pure Python, so a corpus file decodes
    to the same values with or without atheris.

    >>> p = DataProvider(b"\\x05\\xff")
    >>> p.int_in_range(0, 9), p.bool(), p.int_in_range(3, 7)
    (5, True, 3)
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def remaining(self) -> int:
        """Bytes not consumed yet."""
        return len(self.data) - self.pos

    def bytes(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer when the input runs out)."""
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def int_in_range(self, lo: int, hi: int) -> int:
        """An integer in ``[lo, hi]``, from as few bytes as the range needs."""
        span = hi - lo
        if span <= 0:
            return lo
        raw = self.bytes((span.bit_length() + 7) // 8)
        return lo + int.from_bytes(raw, "little") % (span + 1)

    def bool(self) -> bool:
        """One bit of one byte."""
        return bool(self.int_in_range(0, 255) & 1)

    def pick(self, values: list | tuple):
        """One element of ``values``."""
        return values[self.int_in_range(0, len(values) - 1)]

    def probability(self) -> float:
        """A float in ``[0, 1]`` from two bytes."""
        return self.int_in_range(0, 65535) / 65535

    def float32(self) -> float:
        """Any float32 bit pattern (NaN and infinities included)."""
        raw = self.bytes(4).ljust(4, b"\x00")
        return struct.unpack("<f", raw)[0]

    def text(self, max_len: int) -> str:
        """A short string of mixed ASCII and non-ASCII code points (no surrogates)."""
        n = self.int_in_range(0, max_len)
        alphabet = "abcxyz._-/0123456789 é漢\U0001f600"
        return "".join(self.pick(alphabet) for _ in range(n))
