"""Head all-to-all (DeepSpeed-Ulysses) and hierarchical context parallelism: an all-to-all inside
each head group (a node), the ring across head groups.

The W ranks of ``group`` form N = W / G head groups of G consecutive ranks (``fa3dist.groups``).
Every rank passes its own shard of the global sequence in ``layout`` at world size W, as for the
flat ring. Then:

1. Sequence shards to head shards: inside the head group one ``all_to_all_single`` per tensor
   gives every rank H / G of the heads for all the tokens of its head group. Head group n holds,
   at world size W, exactly the tokens that ring rank n holds at world size N in the same layout:
   - "contiguous": chunks nG .. nG+G-1 of W, which is chunk n of N;
   - "zigzag": chunks nG+g and 2W-1-nG-g (g = 0..G-1) of 2W, which are chunks n and 2N-1-n of
     2N. The received shards are put in that order: the first halves of the G shards in rank
     order, then their second halves in reverse rank order.
2. The ring runs over the ring group (the ranks at the same position in every head group; none
   when G = W, pure Ulysses) with those node shards, at world size N, on H / G heads.
3. The inverse all-to-all returns the output (and the LSE) to this rank's sequence shard.

The backward of each all-to-all is the inverse all-to-all (a permutation's adjoint is its
inverse); autograd chains them around the ring's own backward.

GQA: the H query heads are split over the G ranks, so G must divide H. K/V heads are split too
when G divides H_kv. Otherwise (H_kv < G, e.g. MQA) each K/V head is replicated G / H_kv times
before the all-to-all, so that every rank gets exactly the one K/V head its query heads use, the
least replication possible; autograd sums the replicas' gradients. Any other H_kv (neither
dividing nor divided by G) is refused (``fa3dist.groups.check_head_group``).

The all-to-alls are not overlapped with compute: q, k, v must arrive before the ring starts, and
the output is complete only after it ends. ``fa3dist.plan`` counts this cost.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.distributed as dist

from .api import attention
from .groups import ring_group_for
from .kernels import Backend
from .kernels.checks import check_qkv
from .ring import LoopbackRing, ProcessGroupRing, Ring

log = logging.getLogger("fa3dist.ulysses")

SCHEMES = ("flat", "ulysses", "hierarchical", "auto")


@functools.cache
def _node_chunks(size: int, layout: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunks of a node's sequence in order, as index tensors on ``device``: (rank g, part p) of
    each, for G = ``size`` received shards of 2 parts (zigzag) or 1 (contiguous), and for each
    (g, p) its position in the node's sequence (shaped (G, 1, parts)). Made once per device: indexing
    with them then never copies from the host (no host sync)."""
    order = [(g, 0) for g in range(size)]
    if layout == "zigzag":
        order += [(g, 1) for g in reversed(range(size))]
    parts = len(order) // size
    position = [[order.index((g, p)) for p in range(parts)] for g in range(size)]
    ranks, chunk_parts = zip(*order)
    return (torch.tensor(ranks, device=device), torch.tensor(chunk_parts, device=device),
            torch.tensor(position, device=device).unsqueeze(1))


def seq_to_heads(x: torch.Tensor, head_group: dist.ProcessGroup, layout: str) -> torch.Tensor:
    """(B, s, G*h, X) sequence shard of all heads -> (B, G*s, h, X) node tokens of this rank's heads."""
    size = dist.get_world_size(head_group)
    batch, seq, heads, extra = x.shape
    send = x.reshape(batch, seq, size, heads // size, extra).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)  # recv[g]: rank g's tokens of this rank's heads
    dist.all_to_all_single(recv, send, group=head_group)
    ranks, parts, _ = _node_chunks(size, layout, x.device)
    chunks = recv.view(size, batch, len(ranks) // size, -1, heads // size, extra).transpose(0, 1)
    return chunks[:, ranks, parts].reshape(batch, seq * size, heads // size, extra)


def heads_to_seq(x: torch.Tensor, head_group: dist.ProcessGroup, layout: str) -> torch.Tensor:
    """The inverse of ``seq_to_heads``: (B, G*s, h, X) -> (B, s, G*h, X)."""
    size = dist.get_world_size(head_group)
    batch, node_seq, heads, extra = x.shape
    ranks, _, position = _node_chunks(size, layout, x.device)
    chunks = x.reshape(batch, len(ranks), -1, heads, extra)
    batch_index = torch.arange(batch, device=x.device).view(1, batch, 1)
    send = chunks[batch_index, position].reshape(size, batch, node_seq // size, heads, extra).contiguous()
    recv = torch.empty_like(send)  # send[g]: rank g's tokens; recv[g]: this rank's tokens of rank g's heads
    dist.all_to_all_single(recv, send, group=head_group)
    return recv.permute(1, 2, 0, 3, 4).reshape(batch, node_seq // size, size * heads, extra)


class _AllToAll(torch.autograd.Function):
    """``seq_to_heads`` (``to_heads``) or ``heads_to_seq``, with the other one as its backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, head_group: dist.ProcessGroup, layout: str, to_heads: bool):
        ctx.options = (head_group, layout, to_heads)
        return (seq_to_heads if to_heads else heads_to_seq)(x, head_group, layout)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        head_group, layout, to_heads = ctx.options
        return (heads_to_seq if to_heads else seq_to_heads)(grad.contiguous(), head_group, layout), None, None, None


def _replicate_kv_heads(x: torch.Tensor, size: int) -> torch.Tensor:
    """K/V as the all-to-all sends them: as they are when ``size`` divides H_kv, else each head
    repeated size / H_kv times (rank g then gets head g // (size / H_kv))."""
    batch, seq, kv_heads, dim = x.shape
    if kv_heads % size == 0:
        return x
    repeats = size // kv_heads
    return x.unsqueeze(3).expand(batch, seq, kv_heads, repeats, dim).reshape(batch, seq, size, dim)


def hierarchical_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, softmax_scale: float,
                           group: dist.ProcessGroup | None, head_group: dist.ProcessGroup, layout: str,
                           backend: Backend, return_lse: bool):
    """The all-to-all scheme on checked inputs (``check_ring_call`` with ``head_group``): returns out,
    and with ``return_lse`` also lse (B, H, s), for this rank's sequence shard."""
    size = dist.get_world_size(head_group)
    ring_group = ring_group_for(group, head_group)
    ring: Ring = ProcessGroupRing(ring_group) if ring_group is not None else LoopbackRing(0, 1)
    q_h, k_h, v_h = (_AllToAll.apply(t, head_group, layout, True)
                     for t in (q, _replicate_kv_heads(k, size), _replicate_kv_heads(v, size)))
    out_h, lse_h = attention(q_h, k_h, v_h, ring, causal=causal, softmax_scale=softmax_scale, layout=layout,
                             backend=backend)
    out = _AllToAll.apply(out_h, head_group, layout, False)
    if not return_lse:
        return out
    lse = heads_to_seq(lse_h.transpose(1, 2).unsqueeze(-1), head_group, layout)  # (B, s, H, 1)
    return out, lse.squeeze(-1).transpose(1, 2).contiguous()


def all_to_all_group(scheme: str | None, q: torch.Tensor, k: torch.Tensor, *, causal: bool,
                     group: dist.ProcessGroup | None, head_group: dist.ProcessGroup | None,
                     layout: str) -> dist.ProcessGroup | None:
    """The group the all-to-all runs over for ``scheme``, or None for the flat ring.

    ``head_group`` is this rank's node (its ranks share fast links). ``scheme``: None means
    "hierarchical" when ``head_group`` is given, else "flat"; "flat": the ring over ``group``;
    "ulysses": the all-to-all over all of ``group``; "hierarchical": the all-to-all inside
    ``head_group``, the ring across; "auto": the one ``fa3dist.plan`` predicts fastest for this
    shape, with ``head_group`` (or, without it, all of ``group``) as the node.
    """
    if scheme is not None and (not isinstance(scheme, str) or scheme not in SCHEMES):
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)} or None; got {scheme!r}")
    if scheme is None:
        scheme = "flat" if head_group is None else "hierarchical"
    if scheme == "hierarchical" and head_group is None:
        raise ValueError("scheme 'hierarchical' needs head_group (the ranks of this rank's node; "
                         "see fa3dist.make_cp_groups)")
    world_size = dist.get_world_size(group) if dist.is_initialized() else 1
    if scheme == "auto":
        scheme = _planned_scheme(q, k, causal=causal, layout=layout, world_size=world_size,
                                 node_size=world_size if head_group is None else dist.get_world_size(head_group))
    if world_size == 1 or scheme == "flat":
        return None
    if scheme == "ulysses":
        return group if group is not None else dist.group.WORLD
    return head_group


def _planned_scheme(q: torch.Tensor, k: torch.Tensor, *, causal: bool, layout: str, world_size: int,
                    node_size: int) -> str:
    """The scheme ``fa3dist.plan`` picks for these inputs; "flat" for inputs too malformed to plan
    (the input check then reports them)."""
    from .plan import ELEMENT_BYTES, Problem, choose_scheme, machine_from_env

    if world_size == 1:
        return "flat"
    try:
        check_qkv(q, k, k, causal=causal, dtypes=tuple(getattr(torch, name) for name in ELEMENT_BYTES))
    except (TypeError, ValueError):
        return "flat"
    if node_size < 1 or world_size % node_size:
        return "hierarchical"  # the head-group check reports the bad node
    batch, seq, heads, dim = q.shape
    problem = Problem(batch=batch, seq_len=seq * world_size, heads=heads, kv_heads=k.shape[2], head_dim=dim,
                      dtype=str(q.dtype).removeprefix("torch."), causal=causal,
                      backward=torch.is_grad_enabled() and q.requires_grad, layout=layout)
    choice = choose_scheme(problem, world_size, machine_from_env(gpus_per_node=node_size))
    log.debug("scheme auto: %s for %s on %d ranks", choice, problem, world_size)
    return choice
