"""The spec's text, for tests that hold the code and the reference decoder against it."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = (ROOT / "spec" / "FORMAT.md").read_text(encoding="utf-8")


def spec_dictionary(section: str) -> bytes:
    """The fixed zstd dictionary printed in spec section ``section``: its ``text`` block,
    the lines joined (the spec wraps it for reading)."""
    block = re.search(rf"### {re.escape(section)} .*?```text\n(.*?)\n```", SPEC, re.S)
    assert block is not None, f"spec {section}: no dictionary block"
    return "".join(block.group(1).split("\n")).encode("ascii")


def check_fixed_dictionary(section: str, in_package: bytes, in_reference: bytes,
                           sha256: str) -> bytes:
    """The dictionary of spec ``section`` is the package's and the reference decoder's, its
    sha256 is the one the spec prints, and it is raw content; returned for more checks."""
    from_spec = spec_dictionary(section)
    assert from_spec == in_package == in_reference
    assert f"`{sha256}`" in SPEC
    assert hashlib.sha256(from_spec).hexdigest() == sha256
    assert not from_spec.startswith(b"\x37\xa4\x30\xec")  # raw content, not a zstd dictionary
    return from_spec
