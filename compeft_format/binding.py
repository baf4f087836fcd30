"""The base binding of a compeft file: what it was measured from, and the check of a base.

:func:`read_reference` reads the ``task_vector`` and ``compeft.base`` metadata a compress
wrote (:class:`Reference`), and refuses a hi-fi file (:mod:`compeft_format.hifi`: its records
are codes, not values); :func:`check_base` refuses a base other than the recorded one
before anything is added to it (spec 5.2.1: ``compeft.base``).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _spec as S
from ._progress import Bar
from .errors import ConvertError, CorruptDataError
from .hifi import HIFI_KEY, HifiError
from .plan import (
    META_TASK_VECTOR,
    REFERENCES,
    SHORT_DIGEST,
    base_binding,
    holds_constants,
    tensor_sha256,
)

__all__ = ["Reference", "check_base", "check_regenerated_base", "holds_its_recipe",
           "read_reference"]


@dataclass
class Reference:
    """What a compeft file's task vector is measured from, as its metadata records it.

    ``kind``: ``"zero"``, ``"one"`` or ``"checkpoint"``; ``delta``: the names stored as a
    difference; ``name``: the base's recorded name; ``hashes``: a checkpoint's
    ``{tensor: "sha256:<hex>"}``; ``peft_type``: an adapter's type. Read with
    :func:`read_reference`.
    """

    kind: str
    delta: set[str]
    name: str | None
    hashes: dict[str, str] | None
    peft_type: str | None
    #: the compact binding (format 1.1): ``compeft.base.sha256`` and the short digests
    digest: str | None = None
    digests: bytes | None = None

    @property
    def stored_as_is(self) -> bool:
        """True for a PEFT adapter stored as it is (from zero, or (IA)^3 from one), which no
        base applies to: readers refuse a base given for it.

        >>> Reference("one", {"g"}, None, None, "IA3").stored_as_is
        True
        """
        return self.kind != "checkpoint" and (self.kind == "one" or self.peft_type is not None)


def holds_its_recipe(ref: Reference, base: Any) -> bool:
    """Whether a base given for a file measured from one holds exactly those ones: an
    (IA)^3 adapter's saved initial state, which compress records as the recipe (no digests).
    Decompressing and loading then need no base, and take that one without complaint.

    >>> import os, tempfile, numpy as np
    >>> from compeft_format.safetensors_io import SafetensorsReader, save_safetensors
    >>> p = os.path.join(tempfile.mkdtemp(), "init.safetensors")
    >>> save_safetensors({"g": np.ones(3, np.float32)}, p)
    >>> with SafetensorsReader(p) as r:
    ...     holds_its_recipe(Reference("one", {"g"}, None, None, "IA3"), r)
    True
    """
    return ref.kind == "one" and bool(ref.delta) and holds_constants(
        base, dict.fromkeys(ref.delta, 1.0))


def read_reference(meta: Mapping[str, Any], records: set[str], where: Path) -> Reference:
    """Parse and check ``task_vector`` (and ``compeft.base``); absent: a task vector from zero.

    ``meta`` is the file metadata, ``records`` the file's tensor names, ``where`` the file
    (for messages). Raises :class:`~compeft_format.errors.CorruptDataError`.

    >>> r = read_reference({"task_vector": {"reference": "one", "delta": ["g"],
    ...                                     "peft_type": "IA3"}}, {"g"}, Path("a.compeft"))
    >>> r.kind, r.delta, r.peft_type
    ('one', {'g'}, 'IA3')
    """
    if HIFI_KEY in meta:  # its records are integer codes: never apply or convert them as values
        raise HifiError(f"{where}: a hi-fi file (metadata {HIFI_KEY!r}): its tensors are "
                        "integer codes; decompress it (compeft decompress) or decode it with "
                        "compeft_format.load_hifi")
    ref = meta.get(META_TASK_VECTOR)
    base = meta.get(S.META_BASE)  # its types are checked by the reader (spec 5.2.1)
    base = base if isinstance(base, dict) else {}
    if ref is None:
        return Reference("zero", set(), None, None, None)

    def bad(message: str) -> CorruptDataError:
        return CorruptDataError(f"{where}: metadata {META_TASK_VECTOR!r}: {message}")

    if not isinstance(ref, dict):
        raise bad("must be an object")
    kind = ref.get("reference")
    if kind not in REFERENCES:
        raise bad(f"reference must be one of {REFERENCES}, got {kind!r}")
    field = "delta_all_but" if "delta_all_but" in ref else "delta"
    listed = ref.get(field, [])
    if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
        raise bad(f"{field} must be a list of tensor names")
    unknown = [n for n in listed if n not in records]
    if unknown:
        raise bad(f"{field} names {len(unknown)} tensors the file does not hold: "
                  f"{unknown[:5]}")
    delta = set(records) - set(listed) if field == "delta_all_but" else set(listed)
    hashes, digest, digests = base.get("hashes"), base.get("sha256"), None
    if kind == "checkpoint" and isinstance(digest, str):  # the compact binding (1.1)
        try:
            digests = base64.b64decode(str(base.get("digests", "")), validate=True)
        except ValueError:
            raise CorruptDataError(f"{where}: metadata {S.META_BASE!r}: digests is not "
                                   "base64") from None
        if len(digests) != SHORT_DIGEST * len(delta):
            raise CorruptDataError(f"{where}: metadata {S.META_BASE!r}: {len(digests)} bytes "
                                   f"of digests for {len(delta)} tensors")
        hashes = None
    elif kind == "checkpoint" and not isinstance(hashes, dict):
        raise CorruptDataError(f"{where}: a task vector measured from a checkpoint needs the "
                               f"base's hashes in metadata {S.META_BASE!r}")
    elif kind == "checkpoint":
        unbound = [n for n in delta if n not in hashes]
        if unbound:
            raise CorruptDataError(f"{where}: metadata {S.META_BASE!r}: no hash of "
                                   f"{len(unbound)} tensors measured from the base: "
                                   f"{unbound[:5]}")
    name = base.get("name")
    peft_type = ref.get("peft_type")
    return Reference(kind, delta, name if isinstance(name, str) else None,
                     hashes if kind == "checkpoint" else None,
                     peft_type if isinstance(peft_type, str) else None,
                     digest if digests is not None else None, digests)


def check_base(ref: Reference, base: Any, infos: Mapping[str, Any],
               bar_enabled: bool) -> None:
    """Refuse a base other than the recorded one: names, then shapes and dtypes, then bytes.

    ``infos`` maps the compeft file's tensor names to their infos (``shape``, ``dtype``).
    For a checkpoint reference the base must hold exactly the tensors the task vector was
    measured from (``delta``), with their shapes, dtypes and recorded sha256 hashes; its
    other tensors, and recorded ones outside ``delta`` (files before 2026-12 hashed every base
    tensor), do not matter. For a task vector from zero, the base needs every record's name
    with the same shape and a float dtype. Raises
    :class:`~compeft_format.errors.ConvertError` (a progress bar of the hashing when
    ``bar_enabled``). ``base`` is any reader (:func:`~compeft_format.readers.open_weights`).
    """
    where = base.path
    label = f" {ref.name!r}" if ref.name else ""
    if ref.kind == "checkpoint":
        missing = sorted(n for n in ref.delta if n not in base)
        if missing:
            raise ConvertError(
                f"{where}: not the base{label} the task vector was measured from: "
                f"{len(missing)} of the {len(ref.delta)} tensors it was measured from missing "
                f"{missing[:3]}")
        needed = ref.delta
    else:  # a task vector from zero added to a base: every record must be in it
        missing = sorted(n for n in infos if n not in base)
        if missing:
            raise ConvertError(f"{where}: the base lacks {len(missing)} tensors of the task "
                               f"vector: {missing[:5]}")
        needed = set(infos)
    for n in sorted(needed):
        b, t = base.info(n), infos[n]
        if tuple(b.shape) != tuple(t.shape) or b.dtype != t.dtype:
            raise ConvertError(f"{where}: {b.dtype}{list(b.shape)} in the base, "
                               f"{t.dtype}{list(t.shape)} in the task vector", tensor=n)
        if ref.kind == "zero" and b.dtype not in S.TERNARY_DTYPES:
            raise ConvertError(f"{where}: cannot add a task vector to a {b.dtype} tensor",
                               tensor=n)
    if ref.kind == "checkpoint" and ref.digests is not None:
        _check_digests(ref, base, bar_enabled, where, label)
    elif ref.kind == "checkpoint":
        assert ref.hashes is not None
        with Bar(bar_enabled, len(ref.delta), "check base") as bar:
            for n in sorted(ref.delta):
                got = tensor_sha256(base, n)
                if got != ref.hashes[n]:
                    raise ConvertError(f"{where}: the data differs from the base{label} the "
                                       f"task vector was measured from ({got[:19]}..., "
                                       f"recorded {str(ref.hashes[n])[:19]}...)", tensor=n)
                bar.update()



def check_regenerated_base(ref: Reference, base: Any, infos: Mapping[str, Any],
                           bar_enabled: bool, *, regenerated: str | None, recipe: str,
                           where: str, give: str) -> None:
    """:func:`check_base`, for a base that may be an initial adapter regenerated from the
    file's recorded recipe (``regenerated``: its label, None for a base the user gave).

    A regenerated initial adapter that differs from the recorded one (another torch or PEFT
    draws differently) is refused naming the recipe (``recipe``: seed and versions) and how
    to give the real one instead (``give``: ``"--base"``, ``"base="``).
    """
    try:
        check_base(ref, base, infos, bar_enabled)
    except ConvertError as exc:
        if regenerated is None:
            raise
        raise ConvertError(f"{where}: {regenerated} is not the initial adapter the file was "
                           f"compressed from ({recipe}): {exc}; give that initial adapter "
                           f"with {give}") from None


def _check_digests(ref: Reference, base: Any, bar_enabled: bool, where: Any,
                   label: str) -> None:
    """The compact binding: one sha256 over the tensors' digests, then which tensor differs."""
    order = sorted(ref.delta, key=lambda n: n.encode("utf-8"))
    got = {}
    with Bar(bar_enabled, len(order), "check base") as bar:
        for n in order:
            got[n] = tensor_sha256(base, n)
            bar.update()
    mine = base_binding(got)
    if mine["sha256"] == ref.digest:
        return
    assert ref.digests is not None
    short = base64.b64decode(mine["digests"])
    for i, n in enumerate(order):
        part = slice(SHORT_DIGEST * i, SHORT_DIGEST * (i + 1))
        if short[part] != ref.digests[part]:
            raise ConvertError(f"{where}: the data differs from the base{label} the task vector "
                               f"was measured from (digest {short[part].hex()}, recorded "
                               f"{ref.digests[part].hex()})", tensor=n)
    raise ConvertError(f"{where}: the data differs from the base{label} the task vector was "
                       f"measured from ({mine['sha256'][:19]}..., recorded "
                       f"{str(ref.digest)[:19]}...; no tensor's short digest tells which)")
