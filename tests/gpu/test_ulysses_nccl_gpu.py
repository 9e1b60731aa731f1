"""Ulysses and hierarchical context parallelism over NCCL on 2+ GPUs: the error stays within a small
factor of one GPU's, like the flat ring's (test_ring_nccl_gpu.py)."""

from __future__ import annotations

import functools

import pytest
import torch

from fa3dist import make_cp_groups
from tests.gpu import nccl_cases
from tests.multiproc import run_ranks

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.gpu, pytest.mark.multigpu,
              pytest.mark.skipif(GPUS < 2, reason="needs 2 or more GPUs")]


def scheme_cases(rank: int, world_size: int) -> dict[tuple, dict[str, tuple]]:
    """``nccl_cases.ring_vs_single`` for every case under Ulysses and, on 4+ ranks, nodes of 2."""
    calls = {"ulysses": {"scheme": "ulysses"}}
    if world_size >= 4 and world_size % 2 == 0:
        calls["hierarchical"] = {"head_group": make_cp_groups(2).head}
    return {(name, *case): nccl_cases.ring_vs_single(rank, world_size, *case, **call)
            for name, call in calls.items() for case in nccl_cases.CASES}


@functools.cache
def _errors(world_size: int) -> list[dict]:
    return run_ranks(scheme_cases, world_size, backend="nccl", timeout_s=600)


@pytest.mark.parametrize("world_size", sorted({2, min(GPUS, 4)}))
def test_schemes_over_nccl_track_single_gpu(world_size):
    for rank, per_case in enumerate(_errors(world_size)):
        for case, errors in per_case.items():
            for name, (scheme_err, single_err) in errors.items():
                assert scheme_err <= 1.5 * single_err + 1e-3, \
                    f"rank {rank} {case} {name}: {scheme_err} against one GPU's {single_err}"
