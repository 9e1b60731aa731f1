"""Per-rank body of the NCCL ring test (importable by spawned processes)."""

from __future__ import annotations

import torch

from fa3dist import fa3_attention, ring_fa3_attention, shard_sequence
from fa3dist.kernels.fa3 import unavailable_reason
from fa3dist.kernels.numerics import relative_error
from fa3dist.kernels.reference import reference_bwd, reference_fwd


BACKENDS = ("cudnn", "flash2", "triton") + (("fa3",) if torch.cuda.is_available() and unavailable_reason() is None else ())
CASES = [(backend, layout, causal) for backend in BACKENDS
         for layout, causal in (("zigzag", True), ("contiguous", True), ("zigzag", False))]


def all_cases(rank: int, world_size: int) -> dict[tuple, dict[str, tuple]]:
    """``ring_vs_single`` for every case, in one process group."""
    return {case: ring_vs_single(rank, world_size, *case) for case in CASES}


def ring_vs_single(rank: int, world_size: int, backend: str, layout: str, causal: bool, **call) -> dict[str, tuple]:
    """(ring error, single-GPU error) against float64 math for out, dq, dk, dv on this rank's shard;
    ``call``: more ``ring_fa3_attention`` arguments (a scheme or head group)."""
    seq, heads, kv_heads, dim = 512 * world_size, 8, 2, 128
    gen = torch.Generator(device="cuda").manual_seed(1234)  # same inputs on every rank
    q, do = (torch.randn(1, seq, heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    k, v = (torch.randn(1, seq, kv_heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    scale = dim ** -0.5
    ref_out, ref_lse = reference_fwd(q.double(), k.double(), v.double(), softmax_scale=scale, causal=causal)
    ref = (ref_out, *reference_bwd(do.double(), q.double(), k.double(), v.double(), ref_out, ref_lse,
                                   softmax_scale=scale, causal=causal))

    def shard(x):
        return shard_sequence(x, world_size=world_size, rank=rank, layout=layout)

    ql, kl, vl = (shard(t).requires_grad_() for t in (q, k, v))
    out = ring_fa3_attention(ql, kl, vl, causal=causal, layout=layout, backend=backend, **call)
    out.backward(shard(do))
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    single = fa3_attention(qs, ks, vs, causal=causal, backend=backend)
    single.backward(do)
    return {name: (relative_error(mine, shard(want)), relative_error(shard(theirs), shard(want)))
            for name, mine, theirs, want in zip(("out", "dq", "dk", "dv"), (out, ql.grad, kl.grad, vl.grad),
                                                 (single, qs.grad, ks.grad, vs.grad), ref)}
