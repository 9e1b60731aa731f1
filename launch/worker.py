"""The per-rank entry point shared by every launcher (local processes, torchrun, Ray).

``run_worker(cfg)`` reads torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), picks the device, opens the process group (NCCL on CUDA, gloo on CPU) with the
config's timeout, writes this rank's log to ``<out>/rank<r>.log``, runs the job that the config
belongs to, and returns its result; rank 0 also writes it to ``<out>/result.json``. Without that environment it runs as one process.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fa3dist.config import LaunchOptions
from fa3dist.jobs import job_for

log = logging.getLogger("fa3dist.launch")


@dataclass(frozen=True)
class RankContext:
    """Where this rank runs."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def pick_device(device: str, local_rank: int) -> torch.device:
    """"auto" means this rank's GPU when CUDA is available, else the CPU."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but CUDA is not available on this machine")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _log_to_file(out: str, rank: int) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(Path(out) / f"rank{rank}.log")
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger("fa3dist")
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def run_worker(cfg: LaunchOptions) -> dict[str, Any]:
    """Run the job of ``cfg`` as this rank and return its result (rank 0's is the job's result)."""
    env = os.environ
    distributed = "RANK" in env and "WORLD_SIZE" in env
    rank = int(env["RANK"]) if distributed else 0
    world_size = int(env["WORLD_SIZE"]) if distributed else 1
    local_rank = int(env.get("LOCAL_RANK", rank))
    device = pick_device(cfg.device, local_rank)
    _log_to_file(cfg.out, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=cfg.timeout_s),
                                device_id=device if device.type == "cuda" else None)
        log.info("process group up: rank %d of %d on %s", rank, world_size, device)
    try:
        result = job_for(cfg)(cfg, RankContext(rank, world_size, local_rank, device))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        (Path(cfg.out) / "result.json").write_text(json.dumps(result, indent=1, default=str))
    return result
