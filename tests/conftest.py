"""Shared test setup: the hypothesis profiles, and which package is under test.

The tests import ``compeft_format`` from wherever Python finds it: the checkout when run from
it (``python -m pytest`` puts the working directory first), the installed wheel when run from
a tree without the package sources (``.ci/run`` runs the unpacked sdist that way). Nothing
here puts the source tree on the path, so CI tests what users install; the report header
names the package that was imported.

Hypothesis profiles are chosen by the ``HYPOTHESIS_PROFILE`` environment variable:

* ``default``: few examples, so the whole suite stays fast on a 2-core machine;
* ``ci``: more examples, derandomized (a CI failure reproduces from the seed it prints) and
  no example database (a CI checkout is fresh, there is nothing to replay);
* ``expensive``: thousands of examples, for a run on demand before a release.

The example database lives in ``<repo>/.hypothesis/`` (git-ignored) whatever the working
directory, so a failure found locally is replayed first on the next local run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

ROOT = Path(__file__).resolve().parent.parent

# Every temporary file of the suite that is not a tmp_path (the doctests' mkdtemp, the
# commands' own, those of the subprocesses, which inherit TMPDIR) goes into one folder,
# removed when the session ends; pytest's tmp_path folders stay where they were.
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
SUITE_TMP = tempfile.mkdtemp(prefix="compeft-tests-")
tempfile.tempdir = SUITE_TMP
os.environ["TMPDIR"] = SUITE_TMP
# The user's Hugging Face cache is not read: compressing a LoRA adapter regenerates its
# initial state when its base model's config is found there (compeft_format.peft_init), and
# the test adapters must be compressed the same way on every machine. Set before anything
# imports huggingface_hub, which reads these once.
os.environ["HF_HUB_CACHE"] = os.path.join(SUITE_TMP, "hf-cache")
os.environ["HF_HUB_OFFLINE"] = "1"


def pytest_sessionfinish(session, exitstatus) -> None:
    shutil.rmtree(SUITE_TMP, ignore_errors=True)

# numpy-heavy examples have jittery timings on a shared VM: never fail on a deadline
_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}

settings.register_profile(
    "default",
    max_examples=25,
    database=DirectoryBasedExampleDatabase(str(ROOT / ".hypothesis" / "examples")),
    **_COMMON,
)
settings.register_profile(
    "ci", max_examples=200, derandomize=True, database=None, print_blob=True, **_COMMON
)
settings.register_profile(
    "expensive",
    max_examples=5000,
    database=DirectoryBasedExampleDatabase(str(ROOT / ".hypothesis" / "examples")),
    **_COMMON,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))



def pytest_report_header() -> str:
    import compeft_format

    return f"compeft_format under test: {Path(compeft_format.__file__).parent}"
