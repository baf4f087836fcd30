"""The README says what the command does: its synopsis lists every subcommand with exactly
the options the parser has, and its ``console`` examples print what the command prints."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
from cli_helpers import run

from compeft_format.cli import parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
OPTION = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")
SHARED = {"-h", "--help", "-V", "--version"}  # said once, below the synopsis


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    p = parser()
    (action,) = (a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _synopsis() -> dict[str, str]:
    """Subcommand -> its synopsis text in the README."""
    block = README.split("<!-- synopsis:begin")[1].split("<!-- synopsis:end -->")[0]
    entries: dict[str, str] = {}
    name = None
    for line in block.splitlines():
        m = re.match(r"compeft (\w+)", line)
        if m:
            name = m.group(1)
            entries[name] = ""
        if name is not None:
            entries[name] += " " + line
    return entries


def test_the_synopsis_lists_every_subcommand_with_its_options():
    subs, synopsis = _subparsers(), _synopsis()
    assert sorted(synopsis) == sorted(subs), (
        "README.md's synopsis and `compeft --help` list different subcommands: add the new "
        "one's line between the synopsis markers")
    for name, sub in subs.items():
        text = synopsis[name]
        given = set(OPTION.findall(text))
        known = {s for a in sub._actions for s in a.option_strings}
        assert given <= known, (name, sorted(given - known))
        for action in sub._actions:
            strings = set(action.option_strings)
            if strings and not strings & SHARED:
                assert strings & given, (name, action.option_strings, "missing in README")
        assert "-h/--help" in README
        assert "-V/--version" in README


def test_every_option_in_the_readme_exists():
    """Options the README's prose names in backquotes, for the subcommands of the command."""
    known = {s for sub in _subparsers().values() for a in sub._actions for s in a.option_strings}
    section = README.split("## The `compeft` command")[1].split("## Python API")[0]
    section += README.split("## Choosing density and scale")[1].split("## Development")[0]
    section = re.sub(r"```.*?```", "", section, flags=re.S)  # the blocks: tested above
    named = {o for code in re.findall(r"`([^`]+)`", section) if code.startswith(("-", "compeft"))
             for o in OPTION.findall(code)}
    assert named, "no option found: the README layout changed"
    not_options = {"--dens"}  # the README's example of an abbreviation, which is refused
    assert named <= known | not_options, sorted(named - known)


def _examples() -> list[tuple[list[str], list[str]]]:
    """``(argv, expected stdout lines)`` of every ``$ compeft ...`` in ``console`` blocks;
    a line ``...`` ends what is compared."""
    out = []
    for block in re.findall(r"```console\n(.*?)```", README, flags=re.S):
        for chunk in re.split(r"^\$ ", block, flags=re.M)[1:]:
            command, *lines = chunk.rstrip("\n").split("\n")
            argv = shlex.split(command)
            assert argv[0] == "compeft", command
            out.append((argv[1:], lines))
    return out


EXAMPLES = _examples()


def test_the_readme_has_examples():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_the_readme_examples_print_what_the_readme_shows(tmp_path, capsys, monkeypatch,
                                                         index):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tests").symlink_to(ROOT / "tests")  # the README runs from a checkout
    for argv, _ in EXAMPLES[:index]:  # what the example builds on
        assert run(capsys, *argv)[0] == 0
    argv, want = EXAMPLES[index]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    got = out.rstrip("\n").split("\n")
    if "..." in want:
        want = want[: want.index("...")]
        got = got[: len(want)]
    assert got == want
