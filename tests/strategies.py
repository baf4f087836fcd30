"""Hypothesis strategies shared by the test modules; bounds come from ``compeft_format._spec``.

Pitfalls kept in mind (shared notes, libs.md section 7): arrays always use ``fill=st.just(0)``
(otherwise hypothesis fills with a shrunk element and "sparse" arrays come out dense), and
float bounds are exactly representable at the width asked for.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any
from unittest import mock

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from compeft_format import TernaryTensor
from compeft_format import _spec as S
from compeft_format.dtypes import storage_dtype

__all__ = [
    "ALIGNMENTS",
    "DENSE_DTYPES",
    "DENSITIES",
    "POSITIONS",
    "RAW_BITS_DTYPES",
    "ZSTD_LEVELS",
    "st_dense_arrays",
    "st_metadata",
    "st_names",
    "st_options",
    "st_scales",
    "st_shapes",
    "st_tensor_dicts",
    "st_ternary_tensors",
    "tiny_chunks",
    "torch_from_storage",
]

ALIGNMENTS = tuple(1 << k for k in range(S.MIN_ALIGNMENT_LOG2, S.MAX_ALIGNMENT_LOG2 + 1))
POSITIONS = ("auto", "bitmask", "golomb")
ZSTD_LEVELS = (None, 1, 3)
DENSITIES = (0.0, 0.01, 0.1, 0.5, 0.9, 1.0)
DENSE_DTYPES = tuple(name for name, _ in S.DTYPES.values())
RAW_BITS_DTYPES = ("BF16", "F8_E4M3", "F8_E5M2")  # numpy has no such type: torch carries them

_F32_MAX = float(np.finfo(np.float32).max)
_F32_TINY = 2.0**-149  # the smallest float32 subnormal


def st_shapes(*, min_dims: int = 0, max_dims: int = 4, max_side: int = 12,
              min_side: int = 0) -> st.SearchStrategy[tuple[int, ...]]:
    """Shapes of any rank up to ``max_dims``; 0-d and empty shapes included by default."""
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side,
                            max_side=max_side)


def st_scales() -> st.SearchStrategy[float]:
    """Finite non-negative float32 scales, with the edges (0, subnormal, max) drawn often."""
    edges = st.sampled_from([0.0, 1.0, 0.5, _F32_TINY, 2.0**-126, _F32_MAX, 65504.0])
    # bounds are exact float32 values (hypothesis rejects inexact bounds at width 32)
    anywhere = st.floats(0.0, _F32_MAX, width=32, allow_nan=False, allow_infinity=False)
    return (edges | anywhere).map(abs)  # abs: never -0.0, which the format rejects


@st.composite
def st_ternary_tensors(
    draw: st.DrawFn,
    *,
    shapes: st.SearchStrategy[tuple[int, ...]] | None = None,
    density: float | None = None,
    dtypes: tuple[str, ...] = S.TERNARY_DTYPES,
    scales: st.SearchStrategy[float] | None = None,
) -> TernaryTensor:
    """Ternary tensors of any shape, with a controlled density of nonzeros.

    ``density`` fixes the expected fraction of nonzeros (0 and 1 are exact); left out, it is
    drawn from :data:`DENSITIES` or anywhere in [0, 1]. Positions come from a seeded
    generator (cheap for big tensors, shrinks well), from an explicit shrinkable list, or
    are a single nonzero at the very end after the longest possible run of zeros.
    """
    shape = draw(shapes if shapes is not None else st_shapes())
    numel = math.prod(shape)
    how = "density" if density is not None else draw(st.sampled_from(("density", "list", "last")))
    if how == "density" or numel == 0:
        p = density if density is not None else draw(
            st.sampled_from(DENSITIES) | st.floats(0.0, 1.0))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        indices = np.flatnonzero(rng.random(numel) < p)  # p = 1.0 keeps all: random() < 1
    elif how == "list":
        chosen = draw(st.lists(st.integers(0, numel - 1), unique=True, max_size=min(numel, 64)))
        indices = np.array(sorted(chosen), dtype=np.int64)
    else:
        indices = np.array([numel - 1], dtype=np.int64)
    signs = draw(hnp.arrays(bool, indices.size, elements=st.booleans(), fill=st.just(False)))
    if draw(st.booleans()):  # also the all-negative and all-positive sign patterns
        signs = np.full(indices.size, draw(st.booleans()))
    scale = draw(scales if scales is not None else st_scales())
    return TernaryTensor(shape, indices, signs, scale, draw(st.sampled_from(dtypes)))


def torch_from_storage(storage: np.ndarray, name: str) -> Any:
    """Return the torch tensor whose raw bits are ``storage`` (how BF16/F8 reach a writer)."""
    import torch

    native = {"BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn,
              "F8_E5M2": torch.float8_e5m2}[name]
    return torch.from_numpy(storage.copy()).view(native)


@st.composite
def st_dense_arrays(
    draw: st.DrawFn,
    *,
    dtypes: tuple[str, ...] = DENSE_DTYPES,
    shapes: st.SearchStrategy[tuple[int, ...]] | None = None,
) -> tuple[Any, np.ndarray, str]:
    """Return ``(value, storage, dtype)``: a dense value of any safetensors dtype.

    ``value`` is what a writer is given: a numpy array, or a torch tensor for BF16 and F8
    (numpy cannot name them). ``storage`` holds the raw little-endian bits the file must keep,
    NaN payloads and all, so tests compare bytes.
    """
    name = draw(st.sampled_from(dtypes))
    shape = draw(shapes if shapes is not None else st_shapes(max_side=8))
    sd = storage_dtype(name)
    storage = draw(hnp.arrays(sd, shape, elements=hnp.from_dtype(sd), fill=st.just(0)))
    if name in RAW_BITS_DTYPES:
        return torch_from_storage(storage, name), storage, name
    return storage, storage, name


def st_names() -> st.SearchStrategy[str]:
    """Valid tensor names: 1..24 characters of UTF-8, no NUL, no lone surrogates."""
    chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
    return st.text(chars, min_size=1, max_size=24)


def st_tensor_dicts(*, max_size: int = 4, dense: bool = True) -> st.SearchStrategy[dict]:
    """Mappings of names to ternary tensors and (when ``dense``) dense values."""
    values: st.SearchStrategy[Any] = st_ternary_tensors()
    if dense:
        values = values | st_dense_arrays().map(lambda v: v[0])
    return st.dictionaries(st_names(), values, max_size=max_size)


def st_options(*, alignments: tuple[int, ...] = ALIGNMENTS) -> st.SearchStrategy[dict[str, Any]]:
    """Writer keyword options: positions, zstd level and alignment."""
    return st.fixed_dictionaries({
        "positions": st.sampled_from(POSITIONS),
        "zstd_level": st.sampled_from(ZSTD_LEVELS),
        "alignment": st.sampled_from(alignments),
    })


def st_metadata() -> st.SearchStrategy[dict[str, Any] | None]:
    """JSON metadata objects (finite numbers, nested a few levels), or None.

    Keys avoid the reserved ``compeft.`` prefix, whose values have fixed types (spec 5.2.1);
    one well-typed reserved key is mixed in sometimes.
    """
    keys = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8).filter(
        lambda k: not k.startswith(S.META_RESERVED_PREFIX))
    scalars = (st.none() | st.booleans() | st.integers(-(2**53 - 1), 2**53 - 1)  # spec 5.2
               | st.text(max_size=8) | st.floats(allow_nan=False, allow_infinity=False))
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(keys, inner, max_size=3), max_leaves=8)
    objects = st.dictionaries(keys, values, max_size=4)
    producer = st.fixed_dictionaries({S.META_PRODUCER: st.text(max_size=8)})
    return st.none() | objects | st.builds(lambda a, b: {**a, **b}, objects, producer)


@contextmanager
def tiny_chunks(*, sample: bool = False) -> Iterator[None]:
    """Shrink every chunk and span size of the fast paths to a few elements.

    The real sizes (tens of thousands of codes, MiB of elements) are never crossed by the
    small inputs hypothesis draws; shrunk, every boundary case of the chunked loops (a code,
    a byte or a span cut anywhere) is met, and the results must not change. Also forces the
    golomb encoder's int64 path, the zstd worker thread and pieced stream reads.

    ``sample`` also shrinks the sample the golomb encoder chooses M from: that one may change
    the bytes written (a different, still valid M), so it is only for tests of the choice.
    """
    from compeft_format import _io, encode, tensor
    from compeft_format.codecs import bitmask, golomb

    sizes = [(golomb, "_ENCODE_CHUNK", 3), (golomb, "_DECODE_CHUNK", 1),
             (golomb, "_INT32_NUMEL", 0), (bitmask, "_ENCODE_SPAN", 8),
             (bitmask, "_DECODE_SPAN", 1), (tensor, "_SCATTER_CHUNK", 3), (_io, "_READ_CHUNK", 3),
             (encode, "BACKGROUND_MIN", 1)] + [(golomb, "_SAMPLE", 4)] * sample
    with ExitStack() as stack:
        for module, name, value in sizes:
            assert hasattr(module, name), f"{module.__name__}.{name} is gone: update tiny_chunks"
            stack.enter_context(mock.patch.object(module, name, value))
        yield
