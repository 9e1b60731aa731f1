"""Checkpoints with ``torch.distributed.checkpoint`` that a crash can never leave half-loaded.

A checkpoint is written into a hidden temporary folder; only when every rank has written its part
does rank 0 add a ``COMPLETE`` marker and rename the folder to ``step_<n>`` (a rename is atomic).
Loading takes the newest ``step_<n>`` folder that holds the marker, so a checkpoint that a crash
cut short is never loaded. Every rank holds the same weights, so each tensor is stored once, and
a run can resume at another world size. The folder must be one that every rank can reach.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

log = logging.getLogger("fa3dist.train")

MARKER = "COMPLETE"
_NAME = re.compile(r"step_(\d+)")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def latest_checkpoint(root: str | Path) -> tuple[int, Path] | None:
    """The step and folder of the newest complete checkpoint under ``root``, or None."""
    found = [(int(m.group(1)), p) for p in Path(root).glob("step_*")
             if (m := _NAME.fullmatch(p.name)) and (p / MARKER).is_file()]
    return max(found, key=lambda item: item[0]) if found else None


def save_checkpoint(root: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], *, keep: int) -> Path:
    """Save model, optimiser and ``trainer_state`` after ``step`` on every rank; keep the newest ``keep``."""
    root = Path(root)
    rank = dist.get_rank() if dist.is_initialized() else 0
    tmp, final = root / f".tmp-step_{step:08d}", root / f"step_{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # what a crash left behind
        root.mkdir(parents=True, exist_ok=True)
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state, "trainer": trainer_state}, checkpoint_id=tmp,
             no_dist=not dist.is_initialized())
    if rank == 0:
        (tmp / MARKER).write_text(json.dumps({"step": step}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        complete = sorted(p for p in root.glob("step_*") if (p / MARKER).is_file())
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    _barrier()
    return final


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any]) -> dict[str, Any]:
    """Load a checkpoint into ``model`` and ``optimizer`` on every rank; return the saved trainer state.

    ``trainer_state`` gives the keys and tensor shapes to read back.
    """
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state, "trainer": dict(trainer_state)}
    dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    log.info("loaded checkpoint %s", path)
    return state["trainer"]
