"""Read the validation rule table (spec/FORMAT.md §9.1) into data.

The table is the one place that names every rule; the vector generator and the tests read it
from the spec itself, so a rule cannot exist in one and not the other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SPEC = Path(__file__).resolve().parents[1] / "FORMAT.md"

_ROW = re.compile(r"^\| (R-[A-Z]+-\d+) \|")
_TEMPLATE = re.compile(r"`([^`]*)`")
_PLACEHOLDER = re.compile(r"\{[^{}]*\}")
# CompeftError puts "tensor 'name': " and "byte N: " before every message
_PREFIX = r"(?:tensor .+?: )?(?:byte \d+: )?"


@dataclass(frozen=True)
class Rule:
    """One row of the rule table."""

    id: str
    section: str
    requirement: str
    error: str  #: the exception class name
    paths: frozenset[str]  #: "S" (loads, iter_stream) and/or "R" (open_file)
    templates: tuple[str, ...]  #: message templates; ``{...}`` stands for any text

    def matches(self, message: str) -> bool:
        """Return True when ``message`` (``str(exc)``) fits one of the templates."""
        return any(re.fullmatch(_PREFIX + _to_regex(t), message, re.S) for t in self.templates)


def _to_regex(template: str) -> str:
    parts = _PLACEHOLDER.split(template)
    return ".+?".join(re.escape(p) for p in parts)


def load_rules(path: Path = SPEC) -> dict[str, Rule]:
    """Return the rules of the table in ``path``, by ID, in table order."""
    rules: dict[str, Rule] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = _ROW.match(line)
        if not m:
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) != 6:
            raise ValueError(f"rule row with {len(cells)} cells: {line}")
        rid, section, requirement, error, paths, message = cells
        if rid in rules:
            raise ValueError(f"rule {rid} appears twice")
        rules[rid] = Rule(rid, section, requirement, error.strip("`"),
                          frozenset(paths.split()), tuple(_TEMPLATE.findall(message)))
    return rules
