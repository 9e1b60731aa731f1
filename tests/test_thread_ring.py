"""The ring schedule with virtual ranks (threads of one process) at many world sizes, with backends that
accumulate gradients in the kernel and backends that return them; the order of the backward's work."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fa3dist import shard_sequence
from fa3dist.api import attention
from fa3dist.kernels import get_backend
from fa3dist.kernels.numerics import relative_error
from fa3dist.kernels.reference import reference_bwd, reference_fwd
from fa3dist.ring import LoopbackRing, RecordingRing, ReplayRing, ring_backward, ring_forward, run_thread_ring


def _reference(accumulating: bool):
    """The reference backend, with its in-kernel gradient accumulation or (as cuDNN) without it."""
    return dataclasses.replace(get_backend("reference"), bwd_accumulates=accumulating)


@pytest.mark.parametrize("accumulating", [True, False], ids=["bwd-accumulates", "bwd-returns"])
@pytest.mark.parametrize("world_size", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("layout,causal", [("zigzag", True), ("contiguous", True), ("zigzag", False)])
def test_virtual_ring_matches_float64_math(world_size, layout, causal, accumulating):
    gen = torch.Generator().manual_seed(world_size)
    seq = 4 * world_size
    q, do = (torch.randn(1, seq, 4, 8, dtype=torch.float64, generator=gen) for _ in range(2))
    k, v = (torch.randn(1, seq, 2, 8, dtype=torch.float64, generator=gen) for _ in range(2))
    ref_out, ref_lse = reference_fwd(q, k, v, softmax_scale=0.4, causal=causal)
    ref = (ref_out, *reference_bwd(do, q, k, v, ref_out, ref_lse, softmax_scale=0.4, causal=causal))
    backend = _reference(accumulating)

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


class _LoggingRing(LoopbackRing):
    """A loopback ring that logs its exchanges and waits."""

    def __init__(self, rank: int, world_size: int, log: list[str]):
        super().__init__(rank, world_size)
        self.log = log

    def send_recv(self, tensors, channel=0):
        name = "kv" if channel == 0 else "dkv"
        self.log.append(f"send {name}")
        done = super().send_recv(tensors, channel)
        log = self.log

        class Logged:
            def wait(self):
                log.append(f"wait {name}")
                return done.wait()

        return Logged()


@pytest.mark.parametrize("accumulating", [True, False], ids=["bwd-accumulates", "bwd-returns"])
def test_backward_makes_one_kernel_call_per_step_and_waits_for_dkv_only_after_it(accumulating):
    """Per step: post K/V; one kernel call for dQ, dK and dV (into buffers when the backend accumulates);
    only then wait for the arriving dK/dV, add into it and send it on; wait for K/V last."""
    log: list[str] = []
    backend = _reference(accumulating)

    def bwd(*args, dq=None, dk=None, dv=None, **kwargs):
        log.append(" ".join(["bwd", *(n for n, b in (("dq", dq), ("dk", dk), ("dv", dv)) if b is not None)]))
        return backend.bwd(*args, dq=dq, dk=dk, dv=dv, **kwargs)

    spy = dataclasses.replace(backend, bwd=bwd)
    x = torch.randn(1, 8, 2, 8)
    out, lse = spy.fwd(x, x, x, softmax_scale=0.3, causal=True)
    ring_backward(x, x, x, x, out, lse, _LoggingRing(1, 3, log), backend=spy, softmax_scale=0.3, causal=True,
                  layout="zigzag")
    call = "bwd dq dk dv" if accumulating else "bwd"
    steps = [["send kv", call, "send dkv", "wait kv"],
             ["send kv", call, "wait dkv", "send dkv", "wait kv"],
             [call, "wait dkv", "send dkv"]]
    assert log == [event for step in steps for event in step] + ["wait dkv"]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_a_replayed_rank_gives_the_results_of_its_recorded_run(world_size):
    """RecordingRing/ReplayRing (how bench ring times its virtual ranks): each rank rerun on its own from
    what it received gives the forward's bits again; asking for a message it never received raises."""
    gen = torch.Generator().manual_seed(world_size)
    q, k, v = (torch.randn(1, 6 * world_size, 2, 8, dtype=torch.float64, generator=gen) for _ in range(3))
    shards = [[shard_sequence(t, world_size=world_size, rank=r, layout="zigzag").contiguous() for t in (q, k, v)]
              for r in range(world_size)]
    opts = dict(backend=get_backend("reference"), softmax_scale=0.3, causal=True, layout="zigzag")
    recordings = {}

    def recorded(ring):
        recordings[ring.rank] = RecordingRing(ring)
        return ring_forward(*shards[ring.rank], recordings[ring.rank], **opts)

    threaded = run_thread_ring(recorded, world_size)
    for r in range(world_size):
        assert [len(m) for m in recordings[r].received[0]] == [2] * (world_size - 1)  # K and V of every other rank
        replay = ReplayRing(r, world_size, recordings[r].received)
        out, lse = ring_forward(*shards[r], replay, **opts)
        assert torch.equal(out, threaded[r][0]) and torch.equal(lse, threaded[r][1])
        with pytest.raises(RuntimeError, match="more messages"):
            replay.send_recv([q])
