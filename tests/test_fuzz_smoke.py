"""Replay both fuzz harnesses without atheris, so that they cannot rot (fuzz/README.md).

Each harness runs on its seed corpus (spec vectors and generated files, built in memory by
``fuzz/make_corpus.py``), on every file committed under ``fuzz/corpus/<harness>/`` (seeds
plus the inputs a campaign kept), and on seeded mutations of the seeds: bit flips, boundary
bytes, truncations, splices, insertions, deletions, large integers. ``fuzz_loads`` also
tries each input with its checksums re-computed. Any exception other than a
``CompeftError`` from the package, or a failed differential check, fails the test and the
input is saved under ``fuzz/artifacts/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "fuzz"))
import _craft  # noqa: E402
import _harness  # noqa: E402
import fuzz_loads  # noqa: E402
import fuzz_roundtrip  # noqa: E402
import make_corpus  # noqa: E402

#: (harness module, mutants per seed): sized for about 10 s each on a busy 2-core machine
HARNESSES = [(fuzz_loads, 50), (fuzz_roundtrip, 12)]


def _inputs(harness: str) -> tuple[list[bytes], list[bytes]]:
    """Return (seeds, committed corpus files not among the seeds)."""
    seeds = list(make_corpus.seeds(harness).values())
    known = set(seeds)
    corpus = [d for d in _harness.read_inputs([_harness.CORPUS_DIR / harness]) if d not in known]
    return seeds, corpus


@pytest.mark.parametrize(("module", "mutants"), HARNESSES, ids=lambda x: getattr(x, "HARNESS", x))
def test_replay(module, mutants):
    seeds, corpus = _inputs(module.HARNESS)
    assert seeds
    runs = _harness.replay(module.test_one_input, corpus, mutants_per_input=0)
    runs += _harness.replay(module.test_one_input, seeds, mutants_per_input=mutants, seed=1)
    assert runs >= len(seeds) * (mutants + 1)


def test_committed_seeds_match_the_generator():
    """fuzz/corpus holds the current seeds (run ``fuzz/make_corpus.py`` after a change)."""
    for harness in ("fuzz_loads", "fuzz_roundtrip"):
        folder = _harness.CORPUS_DIR / harness
        for name, data in make_corpus.seeds(harness).items():
            assert (folder / name).read_bytes() == data, f"{harness}/{name} is stale"


def test_replay_reports_a_crash_and_saves_the_input():
    """The replay must not swallow what the harness raises."""
    def target(data: bytes) -> None:
        if data.startswith(b"boom"):
            raise ValueError("not a CompeftError")

    with pytest.raises(ValueError, match="not a CompeftError") as info:
        _harness.replay(target, [b"fine", b"boom!"], mutants_per_input=0)
    saved = [n for n in getattr(info.value, "__notes__", []) if "input saved as" in n]
    assert saved
    path = Path(saved[0].split("input saved as ")[1].split(" (")[0])
    assert path.read_bytes() == b"boom!"
    path.unlink()


def test_mutations_are_deterministic_and_varied():
    import random

    data = bytes(range(64))
    a = list(_harness.mutations(data, random.Random(3), 200))
    b = list(_harness.mutations(data, random.Random(3), 200))
    assert a == b
    assert len(set(a)) > 150
    assert any(len(m) < len(data) for m in a)
    assert any(len(m) > len(data) for m in a)


def test_fix_checksums_repairs_a_mutated_file():
    """The helper that lets the fuzzer past the CRCs: a changed byte, then valid CRCs."""
    import compeft_format as cf

    data = bytearray(cf.dumps({"a": cf.TernaryTensor((20,), [3], [True], 2.0)}))
    # the scale 2.0 in a tight pack's byte planes (spec 5.13), its low byte last: another
    # valid float when changed
    data[data.index(b"@\x00\x00\x00") + 3] = 0x01
    with pytest.raises(cf.ChecksumError):
        cf.loads(bytes(data))
    fixed = _craft.fix_checksums(bytes(data))
    assert fixed is not None
    assert cf.loads(fixed)["a"].scale != 2.0
    assert _craft.fix_checksums(b"junk") is None


def test_data_provider_is_total():
    """Any bytes, even none, give values in range: the roundtrip harness cannot fail on input."""
    for data in (b"", b"\xff" * 3, bytes(range(256))):
        p = _harness.DataProvider(data)
        for _ in range(50):
            assert 3 <= p.int_in_range(3, 300) <= 300
            assert 0.0 <= p.probability() <= 1.0
            assert p.pick("abc") in "abc"
            assert len(p.text(5)) <= 5


def test_regression_optional_record_in_random_access():
    """Found by the first replay of fuzz_loads: open_file listed an unknown optional record
    among its keys; info() called it 'dense' with dtype '' and file_info()/inspect() raised
    KeyError. It is skipped, as loads skips it."""
    import compeft_format as cf

    data = make_corpus.seeds("fuzz_loads")["crafted-optional-record"]
    with cf.open_file(data) as f:
        assert f.keys() == ["t"]
        assert [t.name for t in f.file_info().tensors] == ["t"]
    assert list(cf.loads(data)) == ["t"]
    assert [t.name for t in cf.inspect(data).tensors] == ["t"]


def test_regression_writer_keeps_files_within_the_default_decode_budget():
    """Found by the fuzz_roundtrip campaign: the writer made a file the default reader refused.

    9.2 M elements at density 0.73, evenly spread, golomb positions: through zstd the
    positions shrink to 56 bytes, the file to 835 KB, and decoding would charge
    8 x payload + 9 x nnz = 67.6 MB, above the 64 MiB budget of a file under 1 MiB. Since
    then the writer drops zstd from a record that would overdraw the budget of the file
    (spec 9.3), so every file it writes reads with the default limits.
    """
    import numpy as np

    import compeft_format as cf

    shape = (4, 5, 8, 57337)
    numel = 4 * 5 * 8 * 57337
    nnz = 6_678_827
    idx = np.arange(nnz, dtype=np.int64) * numel // nnz  # evenly spread, strictly increasing
    signs = np.random.default_rng(0).random(idx.size) < 0.5
    t = cf.TernaryTensor(shape, idx, signs, 0.5)
    data = cf.dumps({"c": t}, positions="golomb", zstd_level=-1)
    assert [b.stage for b in cf.inspect(data).tensors[0].blocks] == ["none"] * 3
    assert cf.loads(data)["c"] == t
    assert cf.loads(data, limits=fuzz_roundtrip.LIMITS)["c"] == t
