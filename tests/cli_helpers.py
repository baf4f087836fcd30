"""Helpers shared by the command-line tests: run ``main`` in process, check error lines."""

from __future__ import annotations

from compeft_format.cli import main


def run(capsys, *argv: object) -> tuple[int, str, str]:
    """Run ``compeft ARGV`` in process; return (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, *needles: str) -> None:
    """Assert ``err`` is one ``compeft...: error: ...`` line, no traceback, holding ``needles``."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("compeft"), err
    assert ": error: " in lines[0], err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, err)
