"""A TernaryTensor stays as it was validated (issue 16): its arrays cannot be changed.

An index array changed after validation (unsorted, out of range) would let the dense
writers write out of order: the prefault helper, which zeroes pages just ahead of the
writer, then overwrote values already written.
"""

from __future__ import annotations

import numpy as np
import pytest

import compeft_format as cf
from compeft_format import TernaryTensor


def test_the_callers_arrays_are_copied_and_the_tensors_are_read_only() -> None:
    idx, signs = np.array([1, 3, 7]), np.array([True, False, True])
    t = TernaryTensor((8,), idx, signs, 0.5)
    idx[0], signs[0] = 6, False  # the caller changes its own arrays afterwards
    assert t.indices.tolist() == [1, 3, 7]
    assert t.signs.tolist() == [True, False, True]
    for arr in (t.indices, t.signs):
        with pytest.raises(ValueError, match="read-only"):
            arr[0] = arr[1]
    assert t.to_numpy().tolist() == [0, -0.5, 0, 0.5, 0, 0, 0, -0.5]


def test_torch_memory_is_copied_too() -> None:
    torch = pytest.importorskip("torch")
    idx = torch.tensor([0, 2])
    t = TernaryTensor((3,), idx, [False, False], 1.0)
    idx[1] = 1
    assert t.indices.tolist() == [0, 2]


def test_no_copy_where_nobody_can_write() -> None:
    t = TernaryTensor((8,), [1, 3, 7], [True, False, True], 0.5)  # lists: new arrays
    u = TernaryTensor(t.shape, t.indices, t.signs, 2.0)  # read-only already: shared
    assert np.shares_memory(u.indices, t.indices)
    assert np.shares_memory(u.signs, t.signs)
    assert not u.indices.flags.writeable


def test_decoded_and_built_tensors_are_read_only() -> None:
    t = TernaryTensor((100,), [4, 50], [False, True], 0.25)
    for got in (cf.loads(cf.dumps({"t": t}))["t"], TernaryTensor.from_dense(t.to_numpy()),
                cf.compress({"w": np.linspace(-1, 1, 100, dtype=np.float32)},
                            density=0.1)["w"]):
        assert not got.indices.flags.writeable
        assert not got.signs.flags.writeable
