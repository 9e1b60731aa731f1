"""The ring over real process groups (gloo, several processes) against float64 math."""

from __future__ import annotations

import functools

import pytest

from tests import ring_cases
from tests.multiproc import run_ranks, same_on_every_rank

TOLERANCE = {"float64": 1e-10, "float32": 1e-5}


@functools.cache
def _errors(world_size: int) -> list[dict]:
    return run_ranks(ring_cases.ring_errors, world_size)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("case", ring_cases.CASES, ids=ring_cases.case_id)
def test_ring_matches_float64_math(world_size, case):
    tol = TOLERANCE[case[3]]
    for rank, per_case in enumerate(_errors(world_size)):
        errs = per_case[ring_cases.case_id(case)]
        assert errs.pop("out_dtype_ok"), "ring output/gradients lost the input dtype"
        bad = {name: err for name, err in errs.items() if not err <= tol}
        assert not bad, f"rank {rank}: relative errors above {tol}: {bad}"


@pytest.mark.parametrize("world_size", [2, 3])
def test_ring_with_triton_kernels_matches_float64_math(world_size):
    """Epilogue merges in the forward and the external-LSE backward, through the interpreter on CPU."""
    per_rank = run_ranks(ring_cases.ring_errors, world_size, "triton", ring_cases.TRITON_CASES)
    for rank, per_case in enumerate(per_rank):
        for case, errs in per_case.items():
            assert errs.pop("out_dtype_ok"), "ring output/gradients lost the input dtype"
            bad = {name: err for name, err in errs.items() if not err <= TOLERANCE["float32"]}
            assert not bad, f"rank {rank}, {case}: relative errors above 1e-5: {bad}"


def test_every_rank_raises_the_same_readable_error():
    """Ranks that disagree, or a rank whose own input check fails, make every rank raise the same
    error at once; it names the values. The group stays usable: the agreeing call works after."""
    per_rank = run_ranks(ring_cases.disagreeing_calls, 3)
    expected = {
        "seq": "seq_local 4 (ranks 0, 2) against 8 (rank 1)",
        "dtype": "dtype float32 (ranks 0, 2) against bfloat16 (rank 1)",
        "causal": "causal False (ranks 0, 2) against True (rank 1)",
        "softmax_scale": "softmax_scale 0.1 (ranks 0, 2) against 0.2 (rank 1)",
        "layout": "layout zigzag (ranks 0, 2) against contiguous (rank 1)",
        "bad dtype on one rank": "TypeError: ring_fa3_attention: the input check failed on 1 of 3 ranks; "
                                 "rank 1: q has dtype torch.int32",
        "odd zigzag shard on one rank": "ValueError: ring_fa3_attention: the input check failed on 1 of 3 "
                                        "ranks; rank 1: layout 'zigzag' needs an even local sequence length",
    }
    for name in ring_cases.DISAGREEMENTS:
        message = same_on_every_rank(per_rank, name)
        if name == "agree":
            assert message == "ok"
        else:
            assert expected[name] in message, f"{name}: {message}"
            if "input check" not in expected[name]:
                assert message.startswith("ValueError: ring_fa3_attention: ranks disagree on their inputs")


def test_rank_check_runs_on_the_host_only():
    """Agreeing ranks pass and disagreeing ones raise with fake CUDA tensors on a CPU-only build (so no
    device tensor is made or read); a sub-group checks among its own ranks only."""
    per_rank = run_ranks(ring_cases.host_only_check, 3, backend="cpu:gloo,cuda:gloo")
    for rank, results in enumerate(per_rank):
        assert results["agree"] == "ok 0.25 reference", results
        assert results["disagree"].startswith("ValueError: ring_fa3_attention: ranks disagree"), results
        assert "softmax_scale 0.5 (rank 0) against 0.25 (ranks 1, 2)" in results["disagree"]
        if rank != 1:
            assert results["subgroup"] == results["subgroup again"] == "ok 0.25 reference", results
            assert results["side groups"] == "[(0, 1, 2), (0, 2)]", results


@pytest.mark.parametrize("world_size", [2, 3])
def test_unshard_inverts_shard(world_size):
    assert all(run_ranks(ring_cases.unshard_round_trip, world_size))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ring_memory_per_token(world_size):
    """Peak bytes per local token of one fwd+bwd at H=32, H_kv=8, D=128, bf16 (inputs and gradients
    included), measured on the CPU for a backend with a flash kernel's memory use. Beyond q, k, v, dO,
    out and the LSEs: the fp32 dQ accumulator, the K/V block arriving (from W = 3 on, also the one in
    hand besides the local one), the fp32 dK/dV accumulators leaving and arriving, and during the
    kernel the fp32 dK/dV scratch of a whole block (a backend that accumulates in its kernel) or the
    bf16 dQ, dK, dV of a block (one that returns its gradients, as cuDNN)."""
    heads, kv_heads, dim, bf16, fp32 = 32, 8, 128, 2, 4
    inputs = (3 * heads + 2 * kv_heads) * dim * bf16 + 2 * heads * fp32  # q, dO, out; k, v; two LSEs
    ring_buffers = heads * dim * fp32 + (1 if world_size == 2 else 2) * 2 * kv_heads * dim * bf16 \
        + 2 * 2 * kv_heads * dim * fp32
    scratch = 2 * kv_heads * dim * fp32  # 8 KiB: 72.25 KiB in all at W = 2, 76.25 at W = 3
    block_grads = (heads + 2 * kv_heads) * dim * bf16
    expected = {"accumulating": inputs + ring_buffers + scratch, "plain": inputs + ring_buffers + block_grads}
    for rank, peaks in enumerate(run_ranks(ring_cases.ring_peak_bytes_per_token, world_size)):
        for name, peak in peaks.items():
            assert peak <= expected[name], f"rank {rank} {name}: {peak / 1024} KiB > {expected[name] / 1024} KiB"
