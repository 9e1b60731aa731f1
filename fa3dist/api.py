"""Public attention functions: one device (``fa3_attention``) and a sequence-parallel ring
(``ring_fa3_attention``), both differentiable in q, k and v. They check their inputs and call the
custom ops of ``fa3dist.ops``, which ``torch.compile`` keeps in its graph."""

from __future__ import annotations

import struct

import torch
import torch.distributed as dist

from .kernels import BACKEND_NAMES, Backend
from .kernels.checks import check_qkv, resolve_scale
from .layout import check_layout
from .ops import LOCAL, attention_op, group_name
from .ring import Ring, ring_backward, ring_forward
from .ring.schedule import LAYOUTS

_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


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
    out, lse = attention_op(q, k, v, causal, scale, "zigzag", backend, LOCAL)
    return (out, lse) if return_lse else out


def _rank_metadata(q, k, causal, scale, layout, backend) -> list[int]:
    scale_bits = struct.unpack("<q", struct.pack("<d", scale))[0]
    return [*q.shape, k.shape[2], _DTYPE_CODES[q.dtype], int(causal), LAYOUTS.index(layout),
            scale_bits, BACKEND_NAMES.index(backend)]


_METADATA_FIELDS = ("batch", "seq_local", "heads", "head_dim", "kv_heads", "dtype", "causal", "layout",
                    "softmax_scale", "backend")


def _check_ranks_agree(meta: list[int], group: dist.ProcessGroup | None, device: torch.device) -> None:
    """All-gather every rank's call metadata and raise the same error on every rank if they differ."""
    world_size = dist.get_world_size(group)
    local = torch.tensor(meta, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local, group=group)
    rows = torch.stack(gathered).tolist()
    bad = [(name, [row[i] for row in rows]) for i, name in enumerate(_METADATA_FIELDS)
           if len({row[i] for row in rows}) > 1]
    if bad:
        detail = "; ".join(f"{name} per rank = {values}" for name, values in bad)
        raise ValueError(f"ring_fa3_attention: ranks disagree on their inputs: {detail}")


def ring_fa3_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                       softmax_scale: float | None = None, group: dist.ProcessGroup | None = None,
                       layout: str = "zigzag", backend: str = "auto", return_lse: bool = False):
    """Exact sequence-parallel attention over the ranks of ``group`` (None: the default group).

    Each rank passes its own shard (see ``shard_sequence``) of q (B, S/W, H, D) and k, v
    (B, S/W, H_kv, D), all sharded with the same ``layout`` ("zigzag" or "contiguous"). The result
    is this rank's shard of the attention output over the whole sequence; with ``return_lse`` also
    its float32 log-sum-exp (B, H, S/W). Without an initialised process group, or with one rank,
    it runs the local kernel. Differentiable in q, k and v.
    """
    _check_options(causal, return_lse, layout)
    check_qkv(q, k, v, causal=causal)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"q has {q.shape[1]} local tokens and k/v have {k.shape[1]}; the ring needs "
                         "q, k and v sharded alike")
    scale = resolve_scale(softmax_scale, q.shape[-1])
    out, lse = attention_op(q, k, v, causal, scale, layout, backend, group_name(group))
    return (out, lse) if return_lse else out
