"""The ring schedule: forward and backward of exact attention over a ring of ranks.

Each rank holds its queries and one K/V block. At every step it posts the exchange of the K/V
block in hand (H_kv heads only, K and V packed in one buffer), runs the kernel on that block, merges
the result into the fp32 accumulator (inside the kernel's epilogue when the backend can, as the
Triton one does), and only then waits for the next block: the transfer overlaps the kernel. The
backward sends K/V round again together with the block's fp32 dK/dV accumulator; after W steps
every accumulator is back at its owner.
"""

from __future__ import annotations

import torch

from fa3dist.kernels import Backend

from .comm import Ring
from .merge import merge_block_
from .schedule import block_task, source_rank


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _attend_into(backend: Backend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, *, softmax_scale: float, causal: bool, accumulate: bool) -> None:
    """Write one block's attention into the running (out, lse), or with ``accumulate`` merge it in."""
    if backend.fwd_accumulates:  # the kernel merges in its epilogue: no extra pass over out
        backend.fwd(q, k, v, softmax_scale=softmax_scale, causal=causal, out=out, lse=lse, accumulate=accumulate)
        return
    out_b, lse_b = backend.fwd(q, k, v, softmax_scale=softmax_scale, causal=causal)
    if accumulate:
        merge_block_(out, lse, out_b, lse_b)
    else:
        out.copy_(out_b)
        lse.copy_(lse_b)


def ring_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: Ring, *, backend: Backend,
                 softmax_scale: float, causal: bool, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring attention forward for this rank's shard: returns out (like q) and lse (B, H, S_local)."""
    if ring.world_size == 1:
        return backend.fwd(q, k, v, softmax_scale=softmax_scale, causal=causal)
    acc = accumulation_dtype(q.dtype)
    batch, seq, heads, _ = q.shape
    out = torch.empty(q.shape, dtype=acc, device=q.device)
    lse = torch.empty(batch, heads, seq, dtype=acc, device=q.device)
    kv = torch.stack((k, v))
    for step in range(ring.world_size):
        pending = ring.send_recv([kv]) if step < ring.world_size - 1 else None
        task = block_task(ring.rank, source_rank(ring.rank, step, ring.world_size), seq,
                          layout=layout, causal=causal)
        if task is not None:  # step 0 is the local block, which covers every query row
            _attend_into(backend, q[:, task.q_rows], kv[0][:, task.kv_rows], kv[1][:, task.kv_rows],
                         out[:, task.q_rows], lse[:, :, task.q_rows], softmax_scale=softmax_scale,
                         causal=task.causal, accumulate=step > 0)
        if pending is not None:
            (kv,) = pending.wait()
    return out.to(q.dtype), lse


def ring_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, ring: Ring, *, backend: Backend, softmax_scale: float, causal: bool,
                  layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ring attention backward for this rank's shard, given the final out and lse of the forward."""
    if ring.world_size == 1:
        return backend.bwd(do, q, k, v, out, lse, softmax_scale=softmax_scale, causal=causal)
    acc = accumulation_dtype(q.dtype)
    seq = q.shape[1]
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = torch.stack((k, v))
    pending_dkv = None
    for step in range(ring.world_size):
        pending_kv = ring.send_recv([kv], channel=0) if step < ring.world_size - 1 else None
        task = block_task(ring.rank, source_rank(ring.rank, step, ring.world_size), seq,
                          layout=layout, causal=causal)
        if task is not None:
            rows = task.q_rows
            dq_b, dk_b, dv_b = backend.bwd(do[:, rows], q[:, rows], kv[0][:, task.kv_rows],
                                           kv[1][:, task.kv_rows], out[:, rows], lse[:, :, rows],
                                           softmax_scale=softmax_scale, causal=task.causal)
            dq[:, rows] += dq_b
        if pending_dkv is None:
            dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)
        else:
            (dkv,) = pending_dkv.wait()
        if task is not None:
            dkv[0][:, task.kv_rows] += dk_b
            dkv[1][:, task.kv_rows] += dv_b
        pending_dkv = ring.send_recv([dkv], channel=1)
        if pending_kv is not None:
            (kv,) = pending_kv.wait()
    (dkv,) = pending_dkv.wait()
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)
