"""The ring over real process groups (gloo, several processes) against float64 math."""

from __future__ import annotations

import functools

import pytest

from tests import ring_cases
from tests.multiproc import run_ranks

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


@pytest.mark.parametrize("field", ["seq", "dtype", "causal"])
def test_ranks_that_disagree_all_raise(field):
    messages = run_ranks(ring_cases.disagreeing_call, 2, field)
    for rank, msg in enumerate(messages):
        assert "ranks disagree" in msg, f"rank {rank}: {msg}"


@pytest.mark.parametrize("world_size", [2, 3])
def test_unshard_inverts_shard(world_size):
    assert all(run_ranks(ring_cases.unshard_round_trip, world_size))
