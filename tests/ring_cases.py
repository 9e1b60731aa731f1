"""Per-rank bodies of the multi-process ring tests (importable by spawned processes)."""

from __future__ import annotations

import itertools
import zlib

import torch

from fa3dist import ring_fa3_attention, shard_sequence
from fa3dist.kernels import Backend
from fa3dist.kernels.numerics import relative_error
from fa3dist.kernels.reference import reference_bwd, reference_fwd

HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}
CASES = [
    (layout, causal, heads, dtype, head_dim)
    for layout, causal, heads in itertools.product(("zigzag", "contiguous"), (False, True), HEADS)
    for dtype, head_dim in (("float64", 40), ("float32", 64))
]


def case_id(case: tuple) -> str:
    layout, causal, heads, dtype, head_dim = case
    return f"{layout}-{'causal' if causal else 'full'}-{heads}-{dtype}-d{head_dim}"


# The Triton kernels (interpreted on CPU) in the ring: float32 only, a few shapes.
TRITON_CASES = [("zigzag", True, "gqa", "float32", 16), ("contiguous", True, "mqa", "float32", 24),
                ("zigzag", False, "mha", "float32", 16)]


def ring_errors(rank: int, world_size: int, backend: str = "reference",
                cases: list[tuple] = CASES) -> dict[str, dict[str, float]]:
    """For every case: relative errors of this rank's out, lse, dq, dk, dv against float64 math."""
    results = {}
    for case in cases:
        layout, causal, heads, dtype_name, head_dim = case
        dtype = getattr(torch, dtype_name)
        n_heads, n_kv = HEADS[heads]
        seq = 2 * world_size * 5  # every layout splits it; 5 tokens per chunk
        gen = torch.Generator().manual_seed(zlib.crc32(case_id(case).encode()) + 17 * world_size)
        full = {n: torch.randn(2, seq, h, head_dim, generator=gen, dtype=torch.float64)
                for n, h in (("q", n_heads), ("k", n_kv), ("v", n_kv), ("do", n_heads))}
        scale = 0.7 / head_dim ** 0.5
        ref_out, ref_lse = reference_fwd(full["q"], full["k"], full["v"], softmax_scale=scale, causal=causal)
        ref_grads = reference_bwd(full["do"], full["q"], full["k"], full["v"], ref_out, ref_lse,
                                  softmax_scale=scale, causal=causal)

        def shard(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
            return shard_sequence(x, world_size=world_size, rank=rank, layout=layout, seq_dim=dim)

        q, k, v = (shard(full[n]).to(dtype).requires_grad_() for n in ("q", "k", "v"))
        out, lse = ring_fa3_attention(q, k, v, causal=causal, softmax_scale=scale, layout=layout,
                                      backend=backend, return_lse=True)
        out.backward(shard(full["do"]).to(dtype))
        results[case_id(case)] = {
            "out": relative_error(out, shard(ref_out)),
            "lse": relative_error(lse, shard(ref_lse, dim=2)),
            "dq": relative_error(q.grad, shard(ref_grads[0])),
            "dk": relative_error(k.grad, shard(ref_grads[1])),
            "dv": relative_error(v.grad, shard(ref_grads[2])),
            "out_dtype_ok": out.dtype == dtype and q.grad.dtype == dtype,
        }
    return results


# Calls whose inputs differ on rank 1 (or fail rank 1's own checks); "agree" differs nowhere.
DISAGREEMENTS = {
    "seq": {"seq": 8},
    "dtype": {"dtype": torch.bfloat16},
    "causal": {"causal": True},
    "softmax_scale": {"softmax_scale": 0.2},
    "layout": {"layout": "contiguous"},
    "bad dtype on one rank": {"dtype": torch.int32},
    "odd zigzag shard on one rank": {"seq": 5},
    "agree": {},
}


def disagreeing_calls(rank: int, world_size: int) -> dict[str, str]:
    """Every ``DISAGREEMENTS`` call in turn on this rank: the error it raised ("Type: message"), or "ok"."""
    results = {}
    for name, on_rank1 in DISAGREEMENTS.items():
        call = {"seq": 4, "dtype": torch.float32, "causal": False, "softmax_scale": 0.1, "layout": "zigzag"}
        call.update(on_rank1 if rank == 1 else {})
        q = torch.randn(1, call["seq"], 2, 8).to(call["dtype"])
        try:
            ring_fa3_attention(q, q, q, causal=call["causal"], softmax_scale=call["softmax_scale"],
                               layout=call["layout"], backend="reference")
            results[name] = "ok"
        except (TypeError, ValueError) as err:
            results[name] = f"{type(err).__name__}: {err}"
    return results


def host_only_check(rank: int, world_size: int) -> dict[str, str]:
    """The rank check on fake CUDA tensors (no data, no device) in a "cpu:gloo,cuda:gloo" group.

    On this CPU-only build any device tensor the check made, or any data it read, would raise.
    Returns what agreeing ranks, disagreeing ranks and a sub-group of ranks 0 and 2 (rank 1 stays
    out) got; also whether the sub-group's gloo side group was made once.
    """
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fa3dist.api import check_ring_call
    from fa3dist.ring.comm import subgroup_ranks

    with FakeTensorMode():
        q = torch.empty(1, 8, 4, 16, device="cuda", dtype=torch.bfloat16)
        kv = torch.empty(1, 8, 2, 16, device="cuda", dtype=torch.bfloat16)

    def attempt(group=None, scale=0.25):
        try:
            got, backend = check_ring_call(q, kv, kv, causal=True, softmax_scale=scale, group=group,
                                           layout="zigzag", backend="reference")
            return f"ok {got} {backend.name}"
        except ValueError as err:
            return f"ValueError: {err}"

    results = {"agree": attempt(), "disagree": attempt(scale=0.25 if rank else 0.5)}
    sub = dist.new_group([0, 2], backend="cpu:gloo,cuda:gloo")
    if rank != 1:
        results["subgroup"] = attempt(sub)
        results["subgroup again"] = attempt(sub)
        results["side groups"] = str(subgroup_ranks("gloo"))
    return results


def unshard_round_trip(rank: int, world_size: int) -> bool:
    """Shard a tensor on every rank and gather it back, for both layouts and two sequence dims."""
    from fa3dist import unshard_sequence

    seq_first = torch.randn(2, 4 * world_size, 3, generator=torch.Generator().manual_seed(world_size))
    for layout, (full, dim) in itertools.product(("zigzag", "contiguous"),
                                                 ((seq_first, 1), (seq_first.transpose(1, 2), 2))):
        local = shard_sequence(full, world_size=world_size, rank=rank, layout=layout, seq_dim=dim)
        if not torch.equal(unshard_sequence(local, layout=layout, seq_dim=dim), full):
            return False
    return True


def flash_like_backend(fwd_accumulates: bool, bwd_accumulates: bool) -> Backend:
    """A backend that allocates what a flash kernel allocates (its outputs) and computes nothing:
    the ring's own memory use, measured on the CPU."""
    def fwd(q, k, v, *, softmax_scale, causal, out=None, lse=None, accumulate=False):
        if out is not None:
            return out, lse
        return torch.zeros_like(q), torch.zeros(q.shape[0], q.shape[2], q.shape[1])

    def bwd(do, q, k, v, out, lse, *, softmax_scale, causal, dq=None, dk=None, dv=None, accumulate=False):
        if dq is None and dk is None:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        return dq, dk, dv

    return Backend("flash-like", fwd, bwd, cuda_only=False, fwd_accumulates=fwd_accumulates,
                   bwd_accumulates=bwd_accumulates)


def ring_peak_bytes_per_token(rank: int, world_size: int, tokens: int = 64) -> dict[str, float]:
    """Peak bytes per local token of one ring fwd+bwd (inputs and gradients included) at H=32,
    H_kv=8, D=128 in bfloat16, for a backend that accumulates in its kernels and for one that does not."""
    from fa3dist.api import attention
    from fa3dist.bench.memory import peak_bytes
    from fa3dist.ring import ProcessGroupRing

    gen = torch.Generator().manual_seed(rank)
    q, do = (torch.randn(1, tokens, 32, 128, generator=gen).bfloat16() for _ in range(2))
    k, v = (torch.randn(1, tokens, 8, 128, generator=gen).bfloat16() for _ in range(2))
    for t in (q, k, v):
        t.requires_grad_()
    results = {}
    for name, flags in (("accumulating", (True, True)), ("plain", (False, False))):
        backend = flash_like_backend(*flags)

        def step():
            out, _ = attention(q, k, v, ProcessGroupRing(), causal=True, softmax_scale=0.1, layout="zigzag",
                               backend=backend)
            out.backward(do)

        results[name] = peak_bytes(step, [q, k, v, do]) / tokens
    return results


def fp8_ring_calls(rank: int, world_size: int) -> dict:
    """The FP8 ring over gloo (reference backend), against ``fa3_attention(fp8=True)`` of the whole sequence:
    relative errors of this rank's out (bf16, and unrounded from ``ring_forward_fp8``) and lse, and against
    float64 attention of the unquantized inputs; this rank's descales; and the error ("Type: message", or
    "ok") of calls that differ on rank 1."""
    from fa3dist import fa3_attention
    from fa3dist.kernels import fp8, get_backend
    from fa3dist.ring import LoopbackRing, ProcessGroupRing, quantize_for_ring, ring_forward_fp8

    gen = torch.Generator().manual_seed(31)
    seq, scale = 2 * world_size * 6, 0.3
    q = torch.randn(1, seq, 4, 16, generator=gen).bfloat16()
    k, v = (torch.randn(1, seq, 2, 16, generator=gen).bfloat16() for _ in range(2))
    results: dict = {}
    reference = get_backend("reference")
    for layout, causal in (("zigzag", True), ("contiguous", False)):
        def shard(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
            return shard_sequence(x, world_size=world_size, rank=rank, layout=layout, seq_dim=dim)

        single, single_lse = fa3_attention(q, k, v, causal=causal, softmax_scale=scale, backend="reference",
                                           return_lse=True, fp8=True)
        single32, _ = ring_forward_fp8(q, k, v, LoopbackRing(0, 1), backend=reference, softmax_scale=scale,
                                       causal=causal, layout=layout, out_dtype=torch.float32)
        truth, _ = reference_fwd(q.double(), k.double(), v.double(), softmax_scale=scale, causal=causal)
        out, lse = ring_fa3_attention(shard(q), shard(k), shard(v), causal=causal, softmax_scale=scale, layout=layout,
                                      backend="reference", return_lse=True, fp8=True)
        out32, _ = ring_forward_fp8(shard(q), shard(k), shard(v), ProcessGroupRing(), backend=reference,
                                    softmax_scale=scale, causal=causal, layout=layout, out_dtype=torch.float32)
        results[f"{layout}-{'causal' if causal else 'full'}"] = {
            "out": relative_error(out, shard(single)), "out32": relative_error(out32, shard(single32)),
            "lse": relative_error(lse, shard(single_lse, dim=2)), "truth": relative_error(out, shard(truth)),
            "dtypes": f"{out.dtype} {lse.dtype}"}
    x = quantize_for_ring(q.chunk(world_size, 1)[rank], k.chunk(world_size, 1)[rank], v.chunk(world_size, 1)[rank],
                          ProcessGroupRing())
    results["descales"] = [d.tolist() for d in (x.q_descale, x.k_descale, x.v_descale)]
    whole = fp8.quantize_qkv(q, k, v, granularity="head", incoherent=True, seed=0)
    results["descales of the whole sequence"] = [d.tolist() for d in (whole.q_descale, whole.k_descale,
                                                                     whole.v_descale)]

    # calls that differ on rank 1 (a disagreement, or rank 1's own check failing); "agree" differs nowhere
    calls = {"fp8 on rank 1 only": {"fp8": rank == 1},
             "grad on rank 1": {"grad": rank == 1},
             "cudnn on rank 1": {"backend": "cudnn" if rank == 1 else "auto"},
             "agree": {}}
    for name, call in calls.items():
        qc = q[:, :8].clone().requires_grad_(call.get("grad", False))
        try:
            ring_fa3_attention(qc, k[:, :8], v[:, :8], causal=True, backend=call.get("backend", "auto"),
                               fp8=call.get("fp8", True))
            results[name] = "ok"
        except (TypeError, ValueError) as err:
            results[name] = f"{type(err).__name__}: {err}"
    return results
