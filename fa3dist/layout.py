"""Sequence layouts: which tokens each rank of a sequence-parallel group holds.

- "contiguous": the sequence is cut into W chunks; rank r holds chunk r.
- "zigzag": the sequence is cut into 2W chunks; rank r holds chunks r and 2W-1-r, which balances
  causal work across ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .ring.schedule import LAYOUTS


def check_layout(layout: str) -> None:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")


def _check_rank(world_size: int, rank: int) -> None:
    for name, value in (("world_size", world_size), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")


def chunks_of_rank(world_size: int, rank: int, layout: str) -> tuple[int, ...]:
    """Indices of the equal chunks that ``rank`` holds, in local order."""
    check_layout(layout)
    _check_rank(world_size, rank)
    return (rank, 2 * world_size - 1 - rank) if layout == "zigzag" else (rank,)


def num_chunks(world_size: int, layout: str) -> int:
    """How many equal chunks the sequence is cut into."""
    check_layout(layout)
    return 2 * world_size if layout == "zigzag" else world_size


def _chunk_len(seq_len: int, world_size: int, layout: str) -> int:
    parts = num_chunks(world_size, layout)
    if seq_len % parts:
        raise ValueError(f"sequence length {seq_len} does not split into {parts} equal chunks "
                         f"(layout {layout!r}, world_size {world_size})")
    return seq_len // parts


def shard_sequence(x: torch.Tensor, *, world_size: int, rank: int, layout: str = "zigzag",
                   seq_dim: int = 1) -> torch.Tensor:
    """The part of the full tensor ``x`` that ``rank`` holds, along ``seq_dim``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    ids = chunks_of_rank(world_size, rank, layout)
    size = _chunk_len(x.shape[seq_dim], world_size, layout)
    return torch.cat([x.narrow(seq_dim, i * size, size) for i in ids], dim=seq_dim)


def unshard_sequence(x_local: torch.Tensor, *, group: dist.ProcessGroup | None = None,
                     layout: str = "zigzag", seq_dim: int = 1) -> torch.Tensor:
    """Gather every rank's shard and return the full tensor in sequence order (not differentiable).

    Every rank of ``group`` must call it with a shard of the same shape.
    """
    if not isinstance(x_local, torch.Tensor):
        raise TypeError(f"x_local must be a torch.Tensor, got {type(x_local).__name__}")
    check_layout(layout)
    world_size = dist.get_world_size(group) if dist.is_initialized() else 1
    if world_size == 1:
        return x_local
    shards = [torch.empty_like(x_local) for _ in range(world_size)]
    dist.all_gather(shards, x_local.contiguous(), group=group)
    size = _chunk_len(x_local.shape[seq_dim] * world_size, world_size, layout)
    pieces: list[torch.Tensor | None] = [None] * num_chunks(world_size, layout)
    for rank, shard in enumerate(shards):
        for j, chunk in enumerate(chunks_of_rank(world_size, rank, layout)):
            pieces[chunk] = shard.narrow(seq_dim, j * size, size)
    return torch.cat(pieces, dim=seq_dim)


def shard_positions(seq_len: int, *, world_size: int, rank: int, layout: str = "zigzag",
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Global positions (int64) of the tokens ``rank`` holds, e.g. for RoPE."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    return shard_sequence(torch.arange(seq_len, device=device), world_size=world_size, rank=rank,
                          layout=layout, seq_dim=0)
