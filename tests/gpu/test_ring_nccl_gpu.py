"""The ring over NCCL on 2+ GPUs: its error stays within a small factor of one GPU's."""

from __future__ import annotations

import functools

import pytest
import torch

from tests.gpu import nccl_cases
from tests.multiproc import run_ranks

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.gpu, pytest.mark.multigpu,
              pytest.mark.skipif(GPUS < 2, reason="needs 2 or more GPUs")]


@functools.cache
def _errors(world_size: int) -> list[dict]:
    return run_ranks(nccl_cases.all_cases, world_size, backend="nccl", timeout_s=600)


@pytest.mark.parametrize("world_size", sorted({2, min(GPUS, 4)}))
@pytest.mark.parametrize("case", nccl_cases.CASES, ids=lambda c: "-".join(map(str, c)))
def test_nccl_ring_error_tracks_single_gpu(world_size, case):
    for rank, per_case in enumerate(_errors(world_size)):
        for name, (ring_err, single_err) in per_case[case].items():
            assert ring_err <= 1.5 * single_err + 1e-3, f"rank {rank} {name}: ring {ring_err}, one GPU {single_err}"
