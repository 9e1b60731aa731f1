"""Run a job under a launcher chosen by name, and fault drills: make one rank fail on purpose and
see which rank the launcher names, how, and how long it took to stop the job."""

from __future__ import annotations

import datetime
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fa3dist.config import LaunchOptions, load_config

from .errors import RankFailedError

LAUNCHERS = ("local", "torchrun", "ray")


def launch(cfg: LaunchOptions, launcher: str, *, ray_address: str | None = None) -> dict[str, Any]:
    """Run ``cfg``'s job over ``cfg.world_size`` ranks with ``launcher``; return rank 0's result."""
    if launcher == "local":
        from .local import launch_local

        return launch_local(cfg, cfg.world_size)
    if launcher == "torchrun":
        from .torchrun import launch_torchrun

        return launch_torchrun(cfg, cfg.world_size)
    if launcher == "ray":
        from .ray_launcher import launch_ray

        return launch_ray(cfg, cfg.world_size, address=ray_address)
    raise ValueError(f"launcher must be one of {', '.join(LAUNCHERS)}; got {launcher!r}")


@dataclass(frozen=True)
class DrillResult:
    """What one drill showed."""

    launcher: str
    mode: str  # how the rank failed: raise | exit | kill | hang
    fail_rank: int
    world_size: int
    named_rank: int | None  # the rank the launcher's error named (None: no error, or no rank named)
    kind: str  # how the launcher said it failed: raised | exited | killed | hung | died | none
    first_line: str
    seconds: float  # from the launch to the error
    after_failure_s: float | None  # from the injected failure (the rank's log) to the error

    @property
    def right(self) -> bool:
        want = {"raise": "raised", "exit": "exited", "kill": "killed", "hang": "hung"}[self.mode]
        return self.named_rank == self.fail_rank and self.kind == want


_INJECTED = re.compile(r"^(\S+ \S+) rank\d+ \S+ ERROR injected failure", re.M)


def _injected_at(log: Path) -> float | None:
    found = _INJECTED.search(log.read_text()) if log.exists() else None
    if found is None:
        return None
    return datetime.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def run_drill(launcher: str, mode: str, fail_rank: int, world_size: int, *, out: str | Path, timeout_s: float,
              device: str = "cpu", ray_address: str | None = None, **settings: Any) -> DrillResult:
    """Run ``fa3dist check`` with rank ``fail_rank`` failing by ``mode`` and report the verdict.
    ``settings`` are further CheckConfig keys (e.g. ``cpus_per_rank``)."""
    from fa3dist.check import CheckConfig

    cfg = load_config(CheckConfig, None, None, out=str(out), device=device, world_size=world_size,
                      fail_rank=fail_rank, fail_mode=mode, timeout_s=timeout_s, **settings)
    start = time.time()
    try:
        launch(cfg, launcher, ray_address=ray_address)
        rank, kind, first_line = None, "none", "no error"
    except RankFailedError as err:
        rank, kind, first_line = err.rank, err.kind, str(err).splitlines()[0]
    end = time.time()
    injected = _injected_at(Path(out) / f"rank{fail_rank}.log")
    return DrillResult(launcher, mode, fail_rank, world_size, rank, kind, first_line, end - start,
                       None if injected is None else end - injected)
