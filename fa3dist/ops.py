"""Attention as ``torch.library`` custom ops, so that ``torch.compile`` keeps it in one graph.

``fa3dist::attention`` runs exact attention on one device or, given a process group's name, the
ring over that group; ``fa3dist::attention_backward`` is its backward, registered as its autograd
formula. Each has a fake implementation that gives the output shapes, dtypes and strides without
running anything, which is all ``torch.compile`` needs to trace through them.

A custom op cannot take a ``ProcessGroup`` object, so the group travels as its name
(``ProcessGroup.group_name``) and is looked up in torch.distributed's own registry of groups by
name, as torch's functional collectives do. The name "" means one device (no ring). The backend
travels as its name too. ``fa3dist.api`` holds the public functions, which check their inputs and
call these ops.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .kernels import Backend, get_backend
from .kernels.checks import resolve_scale
from .ring import LoopbackRing, ProcessGroupRing, Ring, accumulation_dtype, ring_backward, ring_forward

LOCAL = ""  # the group name that means one device


def group_name(group: dist.ProcessGroup | None) -> str:
    """The name under which the ops find ``group`` (None: the default group); ``LOCAL`` when there
    is no process group or it has one rank."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return LOCAL
    return (dist.group.WORLD if group is None else group).group_name


def resolve_ring(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float | None,
          layout: str, backend: str, check: bool) -> tuple[Ring, float, Backend]:
    """The ring for the group called ``name`` with the resolved scale and backend. With ``check``
    (the forward of a ring), every check of the call runs first, with the rank exchange that gives
    every rank the same error (``fa3dist.api.check_ring_call``)."""
    if name == LOCAL:
        return LoopbackRing(0, 1), resolve_scale(softmax_scale, q.shape[-1]), get_backend(backend, q.device, q.dtype)
    from torch.distributed.distributed_c10d import _resolve_process_group

    from .api import check_ring_call  # api imports this module

    group = _resolve_process_group(name)
    if check:
        scale, kernels = check_ring_call(q, k, v, causal=causal, softmax_scale=softmax_scale, group=group,
                                         layout=layout, backend=backend)
    else:
        scale, kernels = resolve_scale(softmax_scale, q.shape[-1]), get_backend(backend, q.device, q.dtype)
    return ProcessGroupRing(group), scale, kernels


def _distinct(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors, contiguous, each with its own memory (a custom op's outputs may not alias)."""
    seen: set[int] = set()
    result = []
    for t in tensors:
        t = t.contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        result.append(t)
    return tuple(result)


@torch.library.custom_op("fa3dist::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float | None,
                 layout: str, backend: str, group: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention: (out, lse) of this rank's shard over the ring of the group named ``group``,
    or on one device when ``group`` is ``LOCAL``. lse is float32 (float64 for float64 inputs).
    ``softmax_scale`` None means 1/sqrt(D)."""
    ring, scale, kernels = resolve_ring(group, q, k, v, causal, softmax_scale, layout, backend, check=True)
    out, lse = ring_forward(q, k, v, ring, backend=kernels, softmax_scale=scale, causal=causal, layout=layout)
    return _distinct(out, lse.to(accumulation_dtype(q.dtype)))


@attention_op.register_fake
def _attention_fake(q, k, v, causal, softmax_scale, layout, backend, group):
    batch, seq, heads, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        q.new_empty((batch, heads, seq), dtype=accumulation_dtype(q.dtype))


@torch.library.custom_op("fa3dist::attention_backward", mutates_args=())
def attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          out: torch.Tensor, lse: torch.Tensor, causal: bool, softmax_scale: float | None,
                          layout: str, backend: str, group: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of ``attention_op`` for the upstream gradient ``dout`` and its (out, lse)."""
    ring, scale, kernels = resolve_ring(group, q, k, v, causal, softmax_scale, layout, backend, check=False)
    grads = ring_backward(dout, q, k, v, out, lse, ring, backend=kernels, softmax_scale=scale, causal=causal,
                          layout=layout)
    return _distinct(*grads)


@attention_backward_op.register_fake
def _attention_backward_fake(dout, q, k, v, out, lse, causal, softmax_scale, layout, backend, group):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.options = options
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(dout.contiguous(), q, k, v, out, lse, *ctx.options)
    return dq, dk, dv, None, None, None, None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)
