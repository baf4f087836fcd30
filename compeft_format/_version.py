"""The package's version: one place, read by ``__init__``, the producer record and ``--version``
(``pyproject.toml`` gives the same; ``tests/test_suite_hygiene.py`` checks they agree)."""

__version__ = "0.1.0"
