"""The suite itself: every warning is an error, and temporary files go where they are
removed (``conftest.SUITE_TMP``, pytest's ``tmp_path``), never left in the system's folder."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
from conftest import SUITE_TMP


def test_a_warning_fails_the_suite():
    with pytest.raises(RuntimeWarning, match="made up"):
        warnings.warn("made up", RuntimeWarning, stacklevel=1)


def test_temporary_files_go_to_the_suite_folder():
    assert Path(tempfile.gettempdir()) == Path(SUITE_TMP)
    with tempfile.TemporaryDirectory() as d:
        assert Path(d).parent == Path(SUITE_TMP)
    out = subprocess.run([sys.executable, "-c", "import tempfile; print(tempfile.gettempdir())"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert Path(out.strip()) == Path(SUITE_TMP)  # subprocesses too (TMPDIR)


def _modules() -> list[str]:
    import pkgutil

    import compeft_format

    return sorted(m.name for m in pkgutil.walk_packages(compeft_format.__path__,
                                                        "compeft_format.")
                  if not m.name.endswith("__main__"))


@pytest.mark.parametrize("name", _modules())
def test_every_modules_examples_run(name, monkeypatch):
    # the docstrings' examples are the API's documentation: none may rot; they read
    # tests/data relative to the repository root
    import doctest
    import importlib

    monkeypatch.chdir(Path(__file__).parent.parent)
    if name == "compeft_format._kernels_numba":  # the optional 'fast' extra's code
        pytest.importorskip("numba")
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert not result.failed, name


def test_every_public_item_has_a_runnable_example():
    # the engineering standard: a docstring with an example on everything __all__ exports
    # (the examples run in test_every_modules_examples_run); the version strings are data
    import inspect

    import compeft_format

    missing = [name for name in compeft_format.__all__
               if not isinstance(getattr(compeft_format, name), str)
               and ">>>" not in (inspect.getdoc(getattr(compeft_format, name)) or "")]
    assert not missing, missing


def test_one_version_everywhere():
    import re

    import compeft_format

    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text(encoding="utf-8")
    assert re.findall(r'^version = "([^"]+)"', pyproject, re.M) == [compeft_format.__version__]
