"""The ring over NCCL on 2+ GPUs: its error stays within a small factor of one GPU's."""

from __future__ import annotations

import pytest
import torch

from tests.gpu import nccl_cases
from tests.multiproc import run_ranks

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.gpu, pytest.mark.multigpu,
              pytest.mark.skipif(GPUS < 2, reason="needs 2 or more GPUs")]


@pytest.mark.parametrize("world_size", sorted({2, min(GPUS, 4)}))
@pytest.mark.parametrize("backend", ["cudnn", "flash2", "triton"])
@pytest.mark.parametrize("layout,causal", [("zigzag", True), ("contiguous", True), ("zigzag", False)])
def test_nccl_ring_error_tracks_single_gpu(world_size, backend, layout, causal):
    results = run_ranks(nccl_cases.ring_vs_single, world_size, backend, layout, causal, backend="nccl")
    for rank, errors in enumerate(results):
        for name, (ring_err, single_err) in errors.items():
            assert ring_err <= 1.5 * single_err + 1e-3, f"rank {rank} {name}: ring {ring_err}, one GPU {single_err}"
