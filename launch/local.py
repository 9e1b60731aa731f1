"""Launch a job as several processes on this machine, failing fast when any rank fails."""

from __future__ import annotations

import logging
import os
import queue
import socket
import time
import traceback
from typing import Any

import torch.multiprocessing as mp

from fa3dist.config import LaunchOptions

from .errors import GRACE_S, Failure, blame
from .worker import run_worker

log = logging.getLogger("fa3dist.launch")


def free_port() -> int:
    """A TCP port that is free on this host right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(cfg: LaunchOptions, rank: int, world_size: int, port: int, results: Any) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        results.put((rank, True, run_worker(cfg)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        raise SystemExit(1) from None


def launch_local(cfg: LaunchOptions, world_size: int) -> dict[str, Any]:
    """Run ``cfg``'s job in ``world_size`` local processes; return rank 0's result.

    When a rank raises or its process dies, every other rank is killed at once and
    ``RankFailedError`` names the rank and carries its traceback or exit code.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(cfg, r, world_size, port, results), name=f"fa3dist-rank{r}")
             for r in range(world_size)]
    for proc in procs:
        proc.start()
    done: dict[int, Any] = {}
    failures: list[Failure] = []
    deadline = None
    try:
        while len(done) < world_size and (deadline is None or time.monotonic() < deadline):
            try:
                rank, ok, payload = results.get(timeout=0.1)
                if ok:
                    done[rank] = payload
                else:
                    failures.append(Failure(rank, False, payload))
            except queue.Empty:
                reported = set(done) | {f.rank for f in failures}
                failures += [Failure(r, True, f"process exited with code {p.exitcode}") for r, p in enumerate(procs)
                             if r not in reported and p.exitcode not in (None, 0)]
            if failures and deadline is None:
                deadline = time.monotonic() + GRACE_S
        if failures:
            reported = set(done) | {f.rank for f in failures}
            raise blame(failures, silent=[r for r, p in enumerate(procs) if r not in reported and p.is_alive()])
        return done[0]
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=30)
