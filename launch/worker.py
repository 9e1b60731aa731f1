"""The per-rank entry point shared by every launcher (local processes, torchrun, Ray).

``run_worker(cfg)`` reads torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), picks the device, opens the process group (NCCL on CUDA, gloo on CPU), writes this
rank's log to ``<out>/rank<r>.log``, runs the job that the config belongs to, and returns its
result; rank 0 also writes it to ``<out>/result.json``. Without that environment it runs as one
process. The ranks wait up to ``STARTUP_TIMEOUT_S`` for each other to start; from then on the
config's ``timeout_s`` bounds every wait on a peer.

All along it keeps ``<out>/status/rank<r>.json`` (see status.py) for the launcher: heartbeats, the
job's progress marks and the group's collective count, and this rank's error if it fails.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fa3dist.config import LaunchOptions
from fa3dist.jobs import job_for

from .status import RankStatus

log = logging.getLogger("fa3dist.launch")


@dataclass(frozen=True)
class RankContext:
    """Where this rank runs."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    progress: Callable[[str], None] = lambda label: None  # marks a step of the job as reached


# How long ranks wait for each other to start; a slow start is not a hang.
STARTUP_TIMEOUT_S = 600.0


def pick_device(device: str, local_rank: int) -> torch.device:
    """"auto" means this rank's GPU when CUDA is available, else the CPU."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but CUDA is not available on this machine")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(f"LOCAL_RANK {local_rank} has no GPU of its own: {count} visible on this host "
                           "(two ranks on one GPU is not supported; start at most one rank per GPU)")
    return torch.device("cuda", local_rank)


def _log_to_file(out: str, rank: int) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(Path(out) / f"rank{rank}.log")
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger("fa3dist")
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def _open_group(rank: int, world_size: int, device: torch.device, timeout_s: float, status: RankStatus) -> None:
    """Wait up to STARTUP_TIMEOUT_S for every rank to reach the store, then open the process group
    with the job's timeout: a rank that starts late is not mistaken for a hung one."""
    env = os.environ
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and env.get("TORCHELASTIC_USE_AGENT_STORE") != "True",
                          timeout=timedelta(seconds=STARTUP_TIMEOUT_S))
    store = dist.PrefixStore(f"fa3dist/attempt{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    store.set(f"arrived/{rank}", "1")
    store.wait([f"arrived/{r}" for r in range(world_size)])
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    status.follow_group(dist.distributed_c10d._get_default_group()._get_sequence_number_for_group)
    status.progress("process group up")


def run_worker(cfg: LaunchOptions) -> dict[str, Any]:
    """Run the job of ``cfg`` as this rank and return its result (rank 0's is the job's result)."""
    env = os.environ
    distributed = "RANK" in env and "WORLD_SIZE" in env
    rank = int(env["RANK"]) if distributed else 0
    world_size = int(env["WORLD_SIZE"]) if distributed else 1
    local_rank = int(env.get("LOCAL_RANK", rank))
    _log_to_file(cfg.out, rank)
    status = RankStatus(cfg.out, rank)
    try:
        device = pick_device(cfg.device, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if world_size > 1:
            _open_group(rank, world_size, device, cfg.timeout_s, status)
            log.info("process group up: rank %d of %d on %s", rank, world_size, device)
        result = job_for(cfg)(cfg, RankContext(rank, world_size, local_rank, device, status.progress))
    except BaseException as exc:
        log.exception("rank %d failed", rank)
        status.failed(exc)
        raise  # the process group is not torn down: a teardown can block on a peer that is gone
    status.follow_group(None)
    if dist.is_initialized():
        dist.destroy_process_group()
    if rank == 0:
        (Path(cfg.out) / "result.json").write_text(json.dumps(result, indent=1, default=str))
    status.done()
    return result
