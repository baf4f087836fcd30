"""The command on every invalid conformance vector: a data error is one line, never a traceback.

``compeft verify`` and ``compeft decompress`` must fail on each vector (``verify`` reads the
whole file; ``decompress`` reads by random access, so a vector whose ``open_file`` entry is
null, a fault only the sequential path sees, may decompress). ``compeft info`` reads headers
only: it may accept a vector whose fault is in the data, and otherwise fails the same way.
Vectors checked with limits tighter than the defaults (their ``limits`` field) are left out:
the command reads with the default limits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import one_line_error, run

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors" / "invalid"
CASES = [v for v in sorted(VECTORS.glob("*.compeft"))
         if "limits" not in json.loads(v.with_suffix(".json").read_text(encoding="utf-8"))]


def test_the_catalogue_is_there() -> None:
    assert len(CASES) > 150


@pytest.mark.parametrize("vector", CASES, ids=[v.stem for v in CASES])
def test_every_command_fails_cleanly(vector: Path, tmp_path: Path, capsys) -> None:
    expected = json.loads(vector.with_suffix(".json").read_text(encoding="utf-8"))
    code, out, err = run(capsys, "verify", vector)
    assert code == 1, (out, err)
    lines = out.strip().splitlines()  # verify reports each file on stdout, as sha256sum -c
    assert len(lines) == 1, out
    assert lines[0].startswith(f"{vector}: FAILED: ")
    assert "Traceback" not in out + err

    code, out, err = run(capsys, "decompress", vector, "-o", tmp_path / "out.safetensors")
    if expected.get("open_file", "same") is None:
        assert code in (0, 1), err
    else:
        assert code == 1, (out, err)
    if code:
        one_line_error(err)
        assert not (tmp_path / "out.safetensors").exists()  # nothing half-written is left

    code, out, err = run(capsys, "info", vector)
    assert "Traceback" not in out + err
    if code:
        one_line_error(err)
