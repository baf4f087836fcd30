"""The decode budget (spec 9.3): what decoding a record may allocate, charged before it does.

One cost model, shared by the reader (which refuses a file that overdraws its budget) and the
writer (which keeps every file it writes within the default budget).
"""

from __future__ import annotations

from . import _spec as S
from .codecs import BlockContext
from .errors import LimitExceededError

__all__ = ["Budget", "positions_cost", "record_cost", "widening_cost"]


def positions_cost(decoded_size: int, nnz: int) -> int:
    """Budget charge of decoding a positions payload (spec 9.3): bits, positions, signs."""
    return 8 * decoded_size + 9 * nnz


def widening_cost(dtype: str, numel: int, framework: str) -> int:
    """Budget charge of presenting a dense record (spec 9.3): BF16/F8 widen, torch copies."""
    if framework == "torch":
        return S.ITEMSIZE[dtype] * numel
    return (8 if dtype == "BF16" else 4 if dtype.startswith("F8") else 0) * numel


def record_cost(kind: int, dtype: str, numel: int, nnz: int, blocks: list) -> int:
    """What a numpy reader charges to its decode budget for a record (spec 9.3)."""
    cost = 0
    for btype, stage, _param, _stored, decoded in blocks:
        if stage != S.STAGE_NONE:
            cost += decoded
        if btype in (S.BLOCK_BITMASK, S.BLOCK_GOLOMB):
            cost += positions_cost(decoded, nnz)
    if kind == S.KIND_DENSE:
        cost += widening_cost(dtype, numel, "numpy")
    return cost


class Budget:
    """Bytes a read call may still allocate for decoded data (spec 9.2, 11)."""

    def __init__(self, limits: S.ReadLimits, file_size: int | None) -> None:
        self.limits = limits
        self.fixed = limits.max_decoded_bytes
        self.used = 0
        self.file_size = file_size

    def charge(self, n: int, ctx: BlockContext, seen: int) -> None:
        size = self.file_size if self.file_size is not None else seen
        limit = self.fixed if self.fixed is not None else max(
            S.DECODE_BUDGET_FLOOR, S.DECODE_BUDGET_RATIO * size)
        self.used += n
        if self.used > limit:
            raise ctx.error(f"decoding needs {self.used} bytes, above the limit of {limit} "
                            "(raise ReadLimits.max_decoded_bytes)", LimitExceededError)

