"""The ring schedule with virtual ranks (threads of one process) at larger and odd world sizes."""

from __future__ import annotations

import pytest
import torch

from fa3dist import shard_sequence
from fa3dist.api import attention
from fa3dist.kernels import get_backend
from fa3dist.kernels.numerics import relative_error
from fa3dist.kernels.reference import reference_bwd, reference_fwd
from fa3dist.ring import LoopbackRing, ring_forward, run_thread_ring


@pytest.mark.parametrize("world_size", [5, 8])
@pytest.mark.parametrize("layout,causal", [("zigzag", True), ("contiguous", True), ("zigzag", False)])
def test_virtual_ring_matches_float64_math(world_size, layout, causal):
    gen = torch.Generator().manual_seed(world_size)
    seq = 4 * world_size
    q, do = (torch.randn(1, seq, 4, 8, dtype=torch.float64, generator=gen) for _ in range(2))
    k, v = (torch.randn(1, seq, 2, 8, dtype=torch.float64, generator=gen) for _ in range(2))
    ref_out, ref_lse = reference_fwd(q, k, v, softmax_scale=0.4, causal=causal)
    ref = (ref_out, *reference_bwd(do, q, k, v, ref_out, ref_lse, softmax_scale=0.4, causal=causal))
    backend = get_backend("reference")

    def rank_fn(ring):
        def shard(x):
            return shard_sequence(x, world_size=world_size, rank=ring.rank, layout=layout)

        ql, kl, vl = (shard(t).requires_grad_() for t in (q, k, v))
        out, _ = attention(ql, kl, vl, ring, causal=causal, softmax_scale=0.4, layout=layout, backend=backend)
        out.backward(shard(do))
        return [relative_error(a, shard(b)) for a, b in zip((out, ql.grad, kl.grad, vl.grad), ref)]

    errors = run_thread_ring(rank_fn, world_size)
    assert max(max(e) for e in errors) < 1e-12, errors


def test_loopback_ring_runs_the_same_schedule():
    """Without communication each rank attends its own block at every step: the work is the same."""
    calls = []
    backend = get_backend("reference")

    def counting_fwd(q, k, v, **kw):
        calls.append((tuple(q.shape), tuple(k.shape), kw["causal"]))
        return backend.fwd(q, k, v, **kw)

    spy = type(backend)("spy", counting_fwd, backend.bwd, cuda_only=False)
    x = torch.randn(1, 8, 2, 8)
    ring_forward(x, x, x, LoopbackRing(1, 4), backend=spy, softmax_scale=0.3, causal=True, layout="zigzag")
    assert calls == [((1, 8, 2, 8), (1, 8, 2, 8), True), ((1, 8, 2, 8), (1, 4, 2, 8), False),
                     ((1, 4, 2, 8), (1, 8, 2, 8), False), ((1, 4, 2, 8), (1, 8, 2, 8), False)]


def test_a_failing_virtual_rank_stops_the_others():
    def rank_fn(ring):
        if ring.rank == 2:
            raise KeyError("boom")
        ring.send_recv([torch.zeros(1)]).wait()
        ring.send_recv([torch.zeros(1)]).wait()

    with pytest.raises(KeyError, match="boom"):
        run_thread_ring(rank_fn, 4, timeout_s=30)
