"""The ring over NCCL on 2 GPUs never syncs the host with the GPU (the ranks-agree check runs over a
gloo side group), and ranks that disagree still raise the same error."""

from __future__ import annotations

import pytest
import torch

from tests.gpu import ring_sync_cases
from tests.multiproc import run_ranks

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.gpu, pytest.mark.multigpu, pytest.mark.skipif(GPUS < 2, reason="needs 2 or more GPUs")]


def test_ring_call_has_no_host_device_sync_and_disagreement_still_raises():
    per_rank = run_ranks(ring_sync_cases.ring_call_syncs, 2, backend="nccl", timeout_s=600)
    for rank, results in enumerate(per_rank):
        for backend in ("triton", "cudnn", "flash2"):
            assert results[backend] == "none", f"rank {rank}, {backend}: {results[backend]}"
        assert "softmax_scale 0.5 (rank 0) against 0.25 (rank 1)" in results["disagree"], results["disagree"]
    assert per_rank[0]["disagree"] == per_rank[1]["disagree"]
