"""Process groups for context parallelism beyond one host: head groups (the ranks of one node) and
the ring groups that join them (one rank per node).

A context-parallel group of W ranks is cut into N = W / G head groups of G consecutive ranks
(group ranks nG .. nG+G-1, as ``torch.distributed`` numbers the ranks of one node under torchrun
and Ray). The ring group of the rank at position i of its head group holds the ranks at position
i of every head group: group ranks i, G+i, 2G+i, ...
"""

from __future__ import annotations

from typing import NamedTuple

import torch.distributed as dist

from .ring.comm import cached_subgroup


class CPGroups(NamedTuple):
    """This rank's two groups: ``head`` (its node's ranks) and ``ring`` (one rank per node; None
    with one node)."""

    head: dist.ProcessGroup
    ring: dist.ProcessGroup | None


def _group_ranks(group: dist.ProcessGroup | None) -> list[int]:
    """Global ranks of ``group`` (None: the default group) in group-rank order."""
    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)


def _head_group_size(group: dist.ProcessGroup | None, head_group: dist.ProcessGroup) -> int:
    """The size G of ``head_group``; raises ValueError unless it holds this rank and is G consecutive
    ranks of ``group``, in order, starting at a multiple of G (G dividing the group's size)."""
    if not isinstance(head_group, dist.ProcessGroup):
        raise TypeError(f"head_group must be a torch.distributed ProcessGroup, got {type(head_group).__name__}")
    world = _group_ranks(group)
    heads = _group_ranks(head_group)
    if dist.get_rank() not in heads:
        raise ValueError(f"head_group {heads} does not hold this rank ({dist.get_rank()})")
    size = len(heads)
    if len(world) % size:
        raise ValueError(f"head_group has {size} ranks, which does not divide the group's {len(world)} ranks; "
                         "the head groups must partition the group")
    outside = [r for r in heads if r not in world]
    if outside:
        raise ValueError(f"head_group holds rank(s) {outside} that are not in group {world}")
    positions = [world.index(r) for r in heads]
    start = positions[0]
    if start % size or positions != list(range(start, start + size)):
        raise ValueError(f"head_group must be {size} consecutive ranks of group starting at a multiple of {size}, "
                         f"in order (as make_cp_groups makes them); it holds group ranks {positions}")
    return size


def check_head_group(heads: int, kv_heads: int, group: dist.ProcessGroup | None,
                     head_group: dist.ProcessGroup) -> int:
    """Check that ``head_group`` fits ``group`` (``_head_group_size``) and the head counts; return its
    size G.

    The all-to-all splits the H query heads over the G ranks (H % G == 0). K/V heads are split
    when H_kv % G == 0, else replicated so that each rank gets the one K/V head its query heads
    use (G % H_kv == 0); any other H_kv raises ValueError.
    """
    size = _head_group_size(group, head_group)
    if heads % size:
        raise ValueError(f"q has {heads} heads, which the head_group's {size} ranks cannot split evenly; "
                         "the head count must be a multiple of the head group's size")
    if kv_heads % size and size % kv_heads:
        raise ValueError(f"k/v have {kv_heads} heads: the head_group's {size} ranks can neither split them "
                         "(k/v heads a multiple of its size) nor give each rank one whole K/V head "
                         "(its size a multiple of the k/v heads)")
    return size


def ring_group_for(group: dist.ProcessGroup | None, head_group: dist.ProcessGroup) -> dist.ProcessGroup | None:
    """The ring group of this rank: the ranks at its position in every head group of ``group``.

    None when there is one head group (pure Ulysses: no ring). Made at the first call for a set of
    ranks, collectively over those ranks only (``use_local_synchronization``; every ring member
    reaches it at the same ring call), and cached; ``head_group`` must have passed ``check_head_group``.
    """
    world = _group_ranks(group)
    size = dist.get_world_size(head_group)
    if size == len(world):
        return None
    position = dist.get_rank(head_group)
    ranks = tuple(world[n * size + position] for n in range(len(world) // size))
    return cached_subgroup(ranks, dist.get_backend(group))


def make_cp_groups(gpus_per_node: int) -> CPGroups:
    """This rank's head group (the ``gpus_per_node`` consecutive ranks of its node) and ring group
    (one rank per node), made from the default group. Collective: every rank must call it.

    Pass ``head_group=groups.head`` to ``ring_fa3_attention`` for the hierarchical scheme.
    """
    if not dist.is_initialized():
        raise ValueError("make_cp_groups needs an initialised default process group")
    if isinstance(gpus_per_node, bool) or not isinstance(gpus_per_node, int):
        raise TypeError(f"gpus_per_node must be an int, got {type(gpus_per_node).__name__}")
    world_size = dist.get_world_size()
    if gpus_per_node < 1 or world_size % gpus_per_node:
        raise ValueError(f"gpus_per_node ({gpus_per_node}) must be positive and divide the world size "
                         f"({world_size}), so that the nodes partition the world")
    head, _ = dist.new_subgroups(gpus_per_node)
    return CPGroups(head, ring_group_for(None, head))
