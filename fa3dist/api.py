"""Public attention functions: one device (``fa3_attention``) and a sequence-parallel ring
(``ring_fa3_attention``), both differentiable in q, k and v. They call the custom ops of
``fa3dist.ops``, which ``torch.compile`` keeps in its graph; the checks of a ring call run inside
the op (``check_ring_call``), so that every rank takes part in the rank exchange."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .groups import check_head_group
from .kernels import Backend, get_backend
from .kernels.checks import check_qkv, resolve_scale
from .layout import check_layout
from .ops import LOCAL, attention_op, group_name, resolve_ring
from .ring import LoopbackRing, Ring, ring_backward, ring_forward
from .ring.agree import CallSignature, check_ranks_agree


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring: Ring, backend: Backend, softmax_scale: float, causal: bool, layout: str):
        out, lse = ring_forward(q, k, v, ring, backend=backend, softmax_scale=softmax_scale,
                                causal=causal, layout=layout)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (ring, backend, softmax_scale, causal, layout)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        ring, backend, softmax_scale, causal, layout = ctx.options
        dq, dk, dv = ring_backward(dout.contiguous(), q, k, v, out, lse, ring, backend=backend,
                                   softmax_scale=softmax_scale, causal=causal, layout=layout)
        return dq, dk, dv, None, None, None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: Ring, *, causal: bool,
              softmax_scale: float, layout: str, backend: Backend) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable ring attention on an explicit ``Ring`` (no checks): returns (out, lse).

    This is the entry for benchmarks that run the schedule on a loopback or virtual ring.
    """
    return _RingAttention.apply(q, k, v, ring, backend, softmax_scale, causal, layout)


def _check_options(causal: bool, return_lse: bool, layout: str) -> None:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    check_layout(layout)


def fa3_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                  softmax_scale: float | None = None, backend: str = "auto", return_lse: bool = False):
    """Exact attention on one device.

    q: (B, Sq, H, D); k, v: (B, Sk, H_kv, D) with H % H_kv == 0. ``causal`` is the top-left mask
    and needs Sq == Sk. ``softmax_scale`` defaults to 1/sqrt(D). Returns out (like q), and with
    ``return_lse`` also the float32 log-sum-exp (B, H, Sq) (natural log, not differentiable).
    """
    _check_options(causal, return_lse, "zigzag")
    check_qkv(q, k, v, causal=causal)
    scale = resolve_scale(softmax_scale, q.shape[-1])
    kernels = get_backend(backend, q.device, q.dtype)  # an unknown or unusable backend fails here, by name
    if torch.compiler.is_compiling():  # the custom op keeps attention in the graph
        out, lse = attention_op(q, k, v, causal, scale, "zigzag", backend, LOCAL)
    else:  # the op's dispatch costs ~0.1 ms a call in eager mode: call what it calls
        out, lse = attention(q, k, v, LoopbackRing(0, 1), causal=causal, softmax_scale=scale, layout="zigzag",
                             backend=kernels)
    return (out, lse) if return_lse else out


def _ring_world_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _check_ring_inputs(q, k, v, *, causal, softmax_scale, group, layout, backend, return_lse,
                       world_size: int) -> tuple[float, Backend]:
    """This rank's own checks of a ring call: raise TypeError/ValueError, else (scale, backend)."""
    _check_options(causal, return_lse, layout)
    check_qkv(q, k, v, causal=causal)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"q has {q.shape[1]} local tokens and k/v have {k.shape[1]}; the ring needs "
                         "q, k and v sharded alike")
    scale = resolve_scale(softmax_scale, q.shape[-1])
    kernels = get_backend(backend, q.device, q.dtype)
    if world_size > 1:
        pg_backend = dist.get_backend(group)
        needed = "cpu" if pg_backend == "gloo" else "cuda"
        if q.device.type != needed:
            raise ValueError(f"q is on {q.device} but the process group's backend {pg_backend!r} "
                             f"needs tensors on {needed}")
        if layout == "zigzag" and q.shape[1] % 2:
            raise ValueError(f"layout 'zigzag' needs an even local sequence length (two chunks per rank); "
                             f"got {q.shape[1]}")
    return scale, kernels


def check_ring_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                    softmax_scale: float | None, group: dist.ProcessGroup | None, layout: str, backend: str,
                    return_lse: bool = False, head_group: dist.ProcessGroup | None = None) -> tuple[float, Backend]:
    """Every check of a ``ring_fa3_attention`` call; returns (softmax_scale, backend) resolved.
    ``head_group``: the group of the all-to-all (``fa3dist.ulysses``), None for the flat ring.

    With more than one rank, every rank of ``group`` must call it, and every rank gets the same
    error when any rank's own check fails or the ranks disagree on shapes, dtype or options. That
    exchange runs on the host over a gloo group and never waits on a device (``check_ranks_agree``).
    Reads only the tensors' metadata.
    """
    world_size = _ring_world_size(group)
    signature, error = None, None
    try:
        scale, kernels = _check_ring_inputs(q, k, v, causal=causal, softmax_scale=softmax_scale, group=group,
                                            layout=layout, backend=backend, return_lse=return_lse,
                                            world_size=world_size)
        head_size = 1 if head_group is None else check_head_group(q.shape[2], k.shape[2], group, head_group)
        signature = CallSignature.of(q, k, causal=causal, layout=layout, softmax_scale=scale, backend=kernels.name,
                                     head_group_size=head_size)
    except (TypeError, ValueError) as err:
        if world_size == 1:
            raise
        error = err
    if world_size > 1:
        check_ranks_agree(signature, error, group)  # raises on every rank, or on none
    return scale, kernels


def ring_fa3_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                       softmax_scale: float | None = None, group: dist.ProcessGroup | None = None,
                       head_group: dist.ProcessGroup | None = None, scheme: str | None = None,
                       layout: str = "zigzag", backend: str = "auto", return_lse: bool = False):
    """Exact sequence-parallel attention over the ranks of ``group`` (None: the default group).

    Each rank passes its own shard (see ``shard_sequence``) of q (B, S/W, H, D) and k, v
    (B, S/W, H_kv, D), all sharded with the same ``layout`` ("zigzag" or "contiguous"). The result
    is this rank's shard of the attention output over the whole sequence; with ``return_lse`` also
    its float32 log-sum-exp (B, H, S/W). Without an initialised process group, or with one rank,
    it runs the local kernel. Differentiable in q, k and v. A bad input on any rank, or ranks that
    disagree, raise the same error on every rank (only arguments of the wrong type for the op, such
    as a non-tensor q, fail at once on the rank that passed them).

    ``head_group`` (this rank's node, e.g. from ``make_cp_groups``) and ``scheme`` choose how the
    ranks share the work (``fa3dist.ulysses``): "flat" (the default without ``head_group``) is the
    ring over ``group``; "ulysses" an all-to-all from sequence to head shards over ``group``;
    "hierarchical" (the default with ``head_group``) the all-to-all inside ``head_group`` and the
    ring across head groups; "auto" the one ``fa3dist.plan`` predicts fastest. The shards passed
    and returned are the same for every scheme. ``torch.compile`` traces the flat ring only.
    """
    if head_group is None and scheme in (None, "flat"):
        name = group_name(group)
        if torch.compiler.is_compiling():  # the custom op keeps attention in the graph and checks when it runs
            _check_options(causal, return_lse, layout)
            out, lse = attention_op(q, k, v, causal, softmax_scale, layout, backend, name)
        else:  # the same checks and ring functions without the op's dispatch (~0.1 ms a call)
            scale, kernels = check_ring_call(q, k, v, causal=causal, softmax_scale=softmax_scale, group=group,
                                             layout=layout, backend=backend, return_lse=return_lse)
            ring = resolve_ring(name, q, k, v, causal, scale, layout, backend, check=False)[0]
            out, lse = attention(q, k, v, ring, causal=causal, softmax_scale=scale, layout=layout, backend=kernels)
        return (out, lse) if return_lse else out
    if torch.compiler.is_compiling():
        raise NotImplementedError("torch.compile traces the flat ring only: the all-to-all schemes (head_group, "
                                  "scheme='ulysses'/'hierarchical'/'auto') are not custom ops yet")
    from .ulysses import all_to_all_group, hierarchical_attention

    try:
        head_group = all_to_all_group(scheme, q, k, causal=causal, group=group, head_group=head_group, layout=layout)
    except (TypeError, ValueError) as err:
        if _ring_world_size(group) == 1:
            raise
        check_ranks_agree(None, err, group)  # the other ranks' checks raise this error with it
    scale, kernels = check_ring_call(q, k, v, causal=causal, softmax_scale=softmax_scale, group=group,
                                     layout=layout, backend=backend, return_lse=return_lse, head_group=head_group)
    if head_group is not None:
        return hierarchical_attention(q, k, v, causal=causal, softmax_scale=scale, group=group, head_group=head_group,
                                      layout=layout, backend=kernels, return_lse=return_lse)
    ring = resolve_ring(group_name(group), q, k, v, causal, scale, layout, backend, check=False)[0]  # "auto" chose flat
    out, lse = attention(q, k, v, ring, causal=causal, softmax_scale=scale, layout=layout, backend=kernels)
    return (out, lse) if return_lse else out
