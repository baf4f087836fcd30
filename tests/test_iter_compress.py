"""iter_compress: the values of compress, in sorted order, one tensor held at a time."""

from __future__ import annotations

import gc
import importlib
import weakref
from collections.abc import Iterator, Mapping

import numpy as np
import pytest
import torch

from compeft_format.compress import compress, iter_compress
from compeft_format.errors import EncodeError

# the module itself: the package exports a function of the same name
cmod = importlib.import_module("compeft_format.compress")


def _task_vector(seed: int = 0) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    tied = np.repeat(np.array([0.5, -0.5, 0.25, 0.0]), 250)  # ties at the threshold
    return {
        "z.last": rng.normal(size=(30, 20)).astype(np.float32),
        "a.first": rng.normal(size=500),
        "m.bf16": torch.from_numpy(rng.normal(size=(16, 16)).astype(np.float32)).bfloat16(),
        "m.f16": rng.normal(size=300).astype(np.float16),
        "tied": tied.astype(np.float32),
        "zeros": np.zeros(7, np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "ids": np.arange(5),
        "ü.unicode": rng.normal(size=9).astype(np.float32),
    }


@pytest.mark.parametrize("scope", cmod.SCOPES)
@pytest.mark.parametrize("scale", cmod.SCALES)
@pytest.mark.parametrize("density", [0.01, 0.3, 1.0])
def test_same_values_as_compress_in_sorted_order(scope, scale, density):
    tv = _task_vector()
    kwargs = {"density": density, "scope": scope, "scale": scale, "exclude": ["ids"]}
    want = compress(tv, **kwargs)
    got = list(iter_compress(tv, **kwargs))
    assert [n for n, _ in got] == sorted(tv)
    assert [n.encode() for n, _ in got] == sorted(n.encode() for n in tv)  # a file's order
    for name, value in got:
        if name == "ids":
            assert value is tv["ids"]
        else:
            assert value == want[name], name


def test_progress_is_called_once_per_tensor():
    tv = _task_vector()
    seen: list[str] = []
    list(iter_compress(tv, density=0.1, exclude="ids", progress=seen.append))
    assert sorted(seen) == sorted(tv)


def test_options_are_checked_at_the_call():
    with pytest.raises(EncodeError, match="density"):
        iter_compress({"a": np.ones(3)}, density=0)
    with pytest.raises(EncodeError, match="scale"):
        iter_compress({"a": np.ones(3)}, density=0.5, scale="max")


class _Lazy(Mapping):
    """name -> a fresh array on every access; counts the accesses."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes
        self.fetches = dict.fromkeys(sizes, 0)

    def __getitem__(self, name: str) -> np.ndarray:
        self.fetches[name] += 1
        return np.random.default_rng(len(name)).normal(size=self.sizes[name]).astype(np.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(self.sizes)

    def __len__(self) -> int:
        return len(self.sizes)


@pytest.mark.parametrize("scale", cmod.SCALES)
def test_one_output_held_at_a_time(scale):
    lazy = _Lazy({f"t{i}": 20_000 + i for i in range(5)})
    alive: list[weakref.ref] = []
    for _name, t in iter_compress(lazy, density=0.2, scale=scale):
        gc.collect()
        assert not [r for r in alive if r() is not None]  # the earlier outputs are gone
        alive.append(weakref.ref(t.indices))
        assert t.nnz
        del t
    # the norm and std scales are known before the output pass; the others need one more
    reads = 3 if scale in ("norm", "std") else 4
    assert set(lazy.fetches.values()) == {reads}
    # compress itself keeps its contract of at most three reads
    lazy = _Lazy({f"t{i}": 20_000 + i for i in range(5)})
    compress(lazy, density=0.2, scale=scale)
    assert max(lazy.fetches.values()) <= 3
