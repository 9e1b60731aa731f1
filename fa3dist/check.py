"""``fa3dist check``: is the process group healthy, and does a dead rank stop the whole job?

Every rank passes a tensor round the ring and all-reduces it for ``rounds`` rounds. With
``fail_rank`` set, that rank fails at round ``fail_round`` by raising (``fail_mode: raise``),
exiting its process with code 17 (``exit``), killing itself with SIGKILL as the out-of-memory killer
would (``kill``), or hanging (``hang``), so the launcher's fail-fast behaviour can be seen on a real
cluster before a long job relies on it. Each round is a progress mark, so a launcher can tell the
hung rank (behind) from the ranks waiting on it.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .config import LaunchOptions, check_choices
from .ring import ProcessGroupRing

log = logging.getLogger("fa3dist.check")


FAIL_MODES = ("raise", "exit", "kill", "hang")


class InjectedFailure(RuntimeError):
    """The failure ``fa3dist check --fail-rank`` asked for."""


@dataclass
class CheckConfig(LaunchOptions):
    """What ``fa3dist check`` runs."""

    rounds: int = 20
    round_s: float = 0.05  # sleep per round, so that a failure lands mid-run
    fail_rank: int | None = None
    fail_round: int = 5
    fail_mode: str = "raise"  # raise | exit | kill | hang

    def check(self) -> None:
        super().check()
        if self.rounds < 1:
            raise ValueError(f"key 'rounds' must be at least 1, got {self.rounds}")
        check_choices(self, {"fail_mode": FAIL_MODES})
        if self.fail_rank is not None and not 0 <= self.fail_round < self.rounds:
            raise ValueError(f"key 'fail_round' ({self.fail_round}) must be below 'rounds' ({self.rounds}), "
                             "or the failure would never happen")

    def check_resolved(self) -> None:
        if self.fail_rank is not None and not 0 <= self.fail_rank < self.world_size:
            raise ValueError(f"fail_rank {self.fail_rank} is not a rank of this job: it has {self.world_size} "
                             f"ranks (0 to {self.world_size - 1})")


def _fail(mode: str, rank: int, round_: int) -> None:
    log.error("injected failure (%s) at round %d", mode, round_)
    for handler in logging.getLogger("fa3dist").handlers:
        handler.flush()
    if mode == "exit":
        os._exit(17)
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "hang":
        time.sleep(10 ** 6)
    raise InjectedFailure(f"rank {rank} failed on purpose at round {round_}")


def check_summary(result: dict[str, Any]) -> tuple[str, int]:
    """The lines ``fa3dist check`` prints for a finished run, and its exit code."""
    return f"ok: {result['rounds']} rounds of ring exchange and all-reduce in {result['seconds']:.1f} s", 0


def run_check(cfg: CheckConfig, ctx) -> dict[str, Any]:
    """Ring exchange + all-reduce rounds; returns the rounds done and the time they took."""
    start = time.perf_counter()
    log.info("check running in pid %d", os.getpid())
    value = torch.full((1024,), float(ctx.rank), device=ctx.device)
    ring = ProcessGroupRing() if ctx.world_size > 1 else None
    for round_ in range(cfg.rounds):
        if ctx.rank == cfg.fail_rank and round_ == cfg.fail_round:
            _fail(cfg.fail_mode, ctx.rank, round_)
        ctx.progress(f"round {round_}")
        if ring is not None:
            (received,) = ring.send_recv([value]).wait()
            expected = float((ctx.rank - 1) % ctx.world_size)
            if not torch.all(received == expected):
                raise RuntimeError(f"ring exchange delivered {received[0].item()}, expected {expected}")
            total = value.clone()
            dist.all_reduce(total)
            expected_sum = float(sum(range(ctx.world_size)))
            if not torch.all(total == expected_sum):
                raise RuntimeError(f"all_reduce gave {total[0].item()}, expected {expected_sum}")
        time.sleep(cfg.round_s)
        log.info("round %d ok", round_)
    return {"job": "check", "world_size": ctx.world_size, "rounds": cfg.rounds, "device": str(ctx.device),
            "seconds": time.perf_counter() - start, "ok": True}
