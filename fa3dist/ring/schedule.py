"""Which block of work a rank does at each ring step.

At step s rank r holds the K/V block that rank src = (r - s) mod W owns. For the causal
"zigzag" layout (rank r holds chunks r and 2W-1-r of 2W) every step after the first does the same
amount of work:
- src == r: the local block, causal;
- src <  r: all local queries against the first K/V chunk, no mask;
- src >  r: the second query chunk against all K/V, no mask.
For the causal "contiguous" layout (rank r holds chunk r of W), src > r has no work and src < r is
a full block. Without causality every step is a full block for either layout.
"""

from __future__ import annotations

from dataclasses import dataclass

LAYOUTS = ("zigzag", "contiguous")


@dataclass(frozen=True)
class BlockTask:
    """Rows of the local queries and of the held K/V block to attend, and whether to mask."""

    q_rows: slice
    kv_rows: slice
    causal: bool


ALL = slice(None)


def source_rank(rank: int, step: int, world_size: int) -> int:
    """The rank whose K/V block ``rank`` holds at ``step``."""
    return (rank - step) % world_size


def block_task(rank: int, src: int, seq_local: int, *, layout: str, causal: bool) -> BlockTask | None:
    """The work of ``rank`` on the K/V block of ``src``; None when there is none."""
    if not causal:
        return BlockTask(ALL, ALL, False)
    if src == rank:
        return BlockTask(ALL, ALL, True)
    if layout == "contiguous":
        return BlockTask(ALL, ALL, False) if src < rank else None
    half = seq_local // 2
    if src < rank:
        return BlockTask(ALL, slice(0, half), False)
    return BlockTask(slice(half, None), ALL, False)
