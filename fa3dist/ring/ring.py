"""The ring schedule: forward and backward of exact attention over a ring of ranks.

Each rank holds its queries and one K/V block. At every step it posts the exchange of the K/V
block in hand (H_kv heads only; K and V travel as they are, without a stacked copy), runs the
kernel on that block, merges the result into the fp32 accumulator (inside the kernel's epilogue
when the backend can, as the Triton one does), and only then waits for the next block: the
transfer overlaps the kernel.

The backward sends K/V round again, together with the block's fp32 dK/dV accumulator; after W
steps every accumulator is back at its owner. Each step makes one kernel call for dQ, dK and dV of
the block. dQ accumulates in an fp32 buffer that never travels (inside the kernel when the backend
can; ``bwd_accumulates``). dK/dV go into a zeroed fp32 scratch of the block (or come back from the
kernel); only after the kernel does the step wait for the arriving accumulator, add them into it
and send it on, so that its transfer hides behind the whole next kernel (the last transfer, home,
behind nothing of the ring's). Step 0 has nothing to wait for and writes the new accumulator
directly. The scratch costs memory but saves a second kernel call per step: a dK/dV-only and a
dQ-only call each run the preprocess (delta) and together cost 4 + 3 matrix products per tile
against 5 for one fused call.

Memory per local token beyond q, k, v, dO, out and the gradients (H query and H_kv K/V heads of
dim D, element size s): the fp32 dQ accumulator (4·H·D bytes); the arriving K/V block and, from
W = 3 on, the one in hand besides the local one (4·H_kv·D·s each); two fp32 dK/dV accumulators,
one leaving and one arriving (8·H_kv·D each); during the kernel the fp32 dK/dV scratch (8·H_kv·D
per token of the block: all of it, or half at the zigzag steps that use the first K/V chunk) or,
for a backend that returns its gradients, one block's dQ, dK, dV. Each is freed after its last
use. At H = 32, H_kv = 8, D = 128 in bf16 one fwd+bwd peaks at 72 KiB per local token at W = 2 and
76 KiB from W = 3 on with in-kernel accumulation (up to 4 KiB less on other ranks, whose steps
with a whole K/V block come last or not at all), 74-78 KiB without (inputs and gradients included;
tests/test_ring_distributed.py, on the CPU with a stand-in backend that allocates only a kernel's
outputs). Real kernels add their work buffers: on 2 H200s at W = 2 the ring peaked at 87 KiB with
fa3 and 92 KiB with cuDNN.

The FP8 forward (``ring_forward_fp8``, inference only) runs the same schedule (``_ring_loop``) on
e4m3 inputs. Each rank quantizes its q, k, v once, with per-head scales taken from the amaxes of
the whole sequence: before the first step the ranks pass their amax vector (B·H + 2·B·H_kv
floats) W - 1 hops round the ring and keep the elementwise max (``ring_amax``): W - 1 latencies
of a tiny message, not overlapped, but no collective and no host sync. The descales are then the
same on every rank and never travel. Right after quantizing, V is transposed once into the FP8
kernel's layout (``fp8.kmajor_v``: (B, H_kv, D, S'), keys contiguous in the kernel's order, S' the
local length S rounded up to 32), which reads and writes its B·S·H_kv·D bytes once; it travels and
reaches the kernel in that layout, so no step transposes it again. What travels are uint8 views
of the e4m3 storage, K as (B, S, H_kv, D) and V as (B, H_kv, D, S'): 2·H_kv·D bytes per token (plus
V's padding to 32 tokens) against 4·H_kv·D in bf16, 2 KiB against 4 KiB at H_kv = 8, D = 128. The
kernel gets ``KMajorV.keys`` slices, views when they start on a group of 32 keys: the schedule's
only K/V row slice (zigzag: the first half [0, S/2)) starts at 0 (one starting at S/2 would be a
view only when S % 64 == 0, else a copy). The out accumulator is fp32 as in the 16-bit ring, also
with one rank; the result is bf16.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from fa3dist.kernels import Backend, fp8

from .comm import Ring
from .merge import merge_block_
from .schedule import block_task, source_rank


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _other_rows(rows: slice, seq: int) -> list[slice]:
    """The row ranges of 0..seq outside ``rows`` (a slice with step 1)."""
    start, stop, _ = rows.indices(seq)
    return [r for r in (slice(0, start), slice(stop, seq)) if r.stop > r.start]


def _write(dst: torch.Tensor, src: torch.Tensor, accumulate: bool) -> None:
    if accumulate:
        dst.add_(src)
    else:
        dst.copy_(src)


KvOf = Callable[[list[torch.Tensor], slice], tuple[torch.Tensor, torch.Tensor]]


def _kv_rows(kv: list[torch.Tensor], rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """The 16-bit block's k, v: the rows of K and V as they travel."""
    return kv[0][:, rows], kv[1][:, rows]


def _ring_loop(q: torch.Tensor, travel: list[torch.Tensor], kv_of: KvOf, ring: Ring, *, backend: Backend,
               softmax_scale: float, causal: bool, layout: str, out_dtype: torch.dtype,
               kernel_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward schedule of every ring: returns out (``out_dtype``) and lse (B, H, S_local).

    ``travel`` is what passes round the ring (this rank's block first); ``kv_of(travel, kv_rows)``
    gives the kernel's k and v of the block in hand, and ``kernel_kwargs`` go to every kernel call.
    The blocks merge into fp32 (float64) accumulators, rounded to ``out_dtype`` once at the end,
    also with one rank (``ring_forward`` calls the kernel directly then).
    """
    opts = dict(softmax_scale=softmax_scale, **kernel_kwargs)
    acc = accumulation_dtype(q.dtype)
    batch, seq, heads, _ = q.shape
    out = torch.empty(q.shape, dtype=acc, device=q.device)
    lse = torch.empty(batch, heads, seq, dtype=acc, device=q.device)
    final = None  # the output in out_dtype, when the last merge writes it directly
    kv = [t.contiguous() for t in travel]
    for step in range(ring.world_size):
        last = step == ring.world_size - 1
        pending = None if last else ring.send_recv(kv)
        task = block_task(ring.rank, source_rank(ring.rank, step, ring.world_size), seq,
                          layout=layout, causal=causal)
        if task is not None:  # step 0 is the local block, which covers every query row
            rows = task.q_rows
            block = (q[:, rows], *kv_of(kv, task.kv_rows))
            if backend.fwd_accumulates:  # the kernel merges in its epilogue: no extra pass over out
                backend.fwd(*block, causal=task.causal, **opts, out=out[:, rows], lse=lse[:, :, rows],
                            accumulate=step > 0)
            else:
                out_b, lse_b = backend.fwd(*block, causal=task.causal, **opts)
                if step == 0:
                    out.copy_(out_b)
                    lse.copy_(lse_b)
                elif not last:
                    merge_block_(out[:, rows], lse[:, :, rows], out_b, lse_b)
                else:  # merge straight into the result
                    final = torch.empty(q.shape, dtype=out_dtype, device=q.device)
                    for other in _other_rows(rows, seq):
                        final[:, other].copy_(out[:, other])
                    merge_block_(out[:, rows], lse[:, :, rows], out_b, lse_b, into=final[:, rows])
            del block
        if pending is not None:
            kv = pending.wait()
            del pending  # let the block just sent go
    return (out.to(out_dtype) if final is None else final), lse


def ring_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: Ring, *, backend: Backend,
                 softmax_scale: float, causal: bool, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring attention forward for this rank's shard: returns out (like q) and lse (B, H, S_local)."""
    if ring.world_size == 1:
        return backend.fwd(q, k, v, softmax_scale=softmax_scale, causal=causal)
    return _ring_loop(q, [k, v], _kv_rows, ring, backend=backend, softmax_scale=softmax_scale, causal=causal,
                      layout=layout, out_dtype=q.dtype, kernel_kwargs={})


def ring_amax(ring: Ring, amax: torch.Tensor) -> torch.Tensor:
    """The elementwise max of every rank's ``amax`` (a small float32 vector of one shape on every rank).

    W - 1 ring steps: each rank passes on the vector it received last (its own first), so after
    them it has seen every rank's. Goes through ``ring.send_recv`` (no collective of its own) and
    never reads a value on the host: on CUDA only the stream waits.
    """
    result = hop = amax
    for _ in range(ring.world_size - 1):
        (hop,) = ring.send_recv([hop]).wait()
        result = torch.maximum(result, hop)
    return result


def quantize_for_ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: Ring) -> fp8.FP8QKV:
    """This rank's shard quantized to e4m3 with the scales of the whole sequence.

    Per-head scales (``granularity="head"``), the Hadamard rotation of q and k (seed 0) when D is a
    power of two, and amaxes shared over the ring (``ring_amax``): every rank gets the same descales,
    those ``fp8.quantize_qkv`` gives the unsharded sequence. With one rank the inputs' NaN/inf check
    runs (a host sync); on a ring it is skipped and a NaN or inf makes the output NaN.
    """
    dim = q.shape[-1]
    share = None if ring.world_size == 1 else functools.partial(ring_amax, ring)
    return fp8.quantize_qkv(q, k, v, granularity="head", incoherent=fp8.is_power_of_two(dim), seed=0,
                            share_amax=share)


def ring_forward_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: Ring, *, backend: Backend,
                     softmax_scale: float, causal: bool, layout: str,
                     out_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 ring forward of this rank's 16-bit (or float32) shard: out (``out_dtype``, bf16 as the
    FP8 kernel's) and lse float32 (B, H, S_local).

    Quantizes once (``quantize_for_ring``), stores V K-major once, and runs the forward schedule
    with K and V travelling as uint8 views of their e4m3 storage; the descales, alike on every rank,
    stay. ``backend`` must take FP8 (``Backend.fp8``). Forward only: nothing is saved for a backward.
    The blocks merge into an fp32 accumulator (also with one rank, the single-device FP8 forward of
    ``fa3_attention``), rounded once to ``out_dtype``: float32 gives the unrounded result.
    """
    x = quantize_for_ring(q, k, v, ring)
    seq_kv = k.shape[1]
    travel = [x.k.contiguous().view(torch.uint8), fp8.kmajor_v(x.v).storage.view(torch.uint8)]

    def kv_of(kv: list[torch.Tensor], rows: slice) -> tuple[torch.Tensor, fp8.KMajorV]:
        k8, v_storage = (t.view(fp8.FP8_DTYPE) for t in kv)
        return k8[:, rows], fp8.KMajorV(v_storage, seq_kv).keys(rows)

    descales = dict(q_descale=x.q_descale, k_descale=x.k_descale, v_descale=x.v_descale)
    return _ring_loop(x.q, travel, kv_of, ring, backend=backend, softmax_scale=softmax_scale, causal=causal,
                      layout=layout, out_dtype=out_dtype, kernel_kwargs=descales)


def ring_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, ring: Ring, *, backend: Backend, softmax_scale: float, causal: bool,
                  layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ring attention backward for this rank's shard, given the final out and lse of the forward."""
    if ring.world_size == 1:
        return backend.bwd(do, q, k, v, out, lse, softmax_scale=softmax_scale, causal=causal)
    acc = accumulation_dtype(q.dtype)
    seq = q.shape[1]
    # step 0 (the local block) covers every row, so it writes these instead of adding
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    dkv = torch.empty((2, *k.shape), dtype=acc, device=q.device)
    kv = [k.contiguous(), v.contiguous()]
    pending_dkv = None
    for step in range(ring.world_size):
        last = step == ring.world_size - 1
        pending_kv = None if last else ring.send_recv(kv, channel=0)
        task = block_task(ring.rank, source_rank(ring.rank, step, ring.world_size), seq,
                          layout=layout, causal=causal)
        dq_b = dkv_b = None  # this step's gradients still to add into the accumulators
        if task is not None:
            rows, kv_rows = task.q_rows, task.kv_rows
            block = (do[:, rows], q[:, rows], kv[0][:, kv_rows], kv[1][:, kv_rows], out[:, rows], lse[:, :, rows])
            opts = dict(softmax_scale=softmax_scale, causal=task.causal)
            if not backend.bwd_accumulates:
                dq_b, *dkv_b = backend.bwd(*block, **opts)
            elif step == 0:  # nothing to wait for: into the new accumulator
                backend.bwd(*block, **opts, dq=dq, dk=dkv[0], dv=dkv[1])
            else:  # dK/dV into a zeroed scratch, so that the kernel need not wait for the accumulator
                dkv_b = torch.zeros((2, *block[2].shape), dtype=acc, device=q.device)
                backend.bwd(*block, **opts, dq=dq[:, rows], dk=dkv_b[0], dv=dkv_b[1], accumulate=True)
            del block
        if pending_dkv is not None:
            (dkv,) = pending_dkv.wait()  # needed now: this step's dK/dV go into it
            pending_dkv = None  # let the accumulator sent last step go
        if dkv_b is not None:
            _write(dkv[0][:, kv_rows], dkv_b[0], step > 0)
            _write(dkv[1][:, kv_rows], dkv_b[1], step > 0)
            dkv_b = None  # free the scratch
        # on to the next rank (after the last step, home): the transfer hides behind the next step's kernel
        pending_dkv = ring.send_recv([dkv], channel=1)
        del dkv
        if dq_b is not None:
            _write(dq[:, rows], dq_b, step > 0)
            del dq_b
        if pending_kv is not None:
            kv = pending_kv.wait()
            del pending_kv  # let the block just sent go
    del kv
    (dkv,) = pending_dkv.wait()
    dk, dv = dkv[0].to(k.dtype), dkv[1].to(v.dtype)
    del dkv, pending_dkv
    return dq.to(q.dtype), dk, dv
