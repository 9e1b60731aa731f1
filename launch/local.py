"""Launch a job as several processes on this machine, and name the rank that fails first.

Ranks are forked from a forkserver that has imported torch once, so a rank starts in a fraction
of a second. Each rank dies with the process that started it (PR_SET_PDEATHSIG), so no rank
outlives its launcher. ``start_rank`` is also what the Ray launcher's per-rank actors use.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from fa3dist.config import LaunchOptions

from .errors import RankReport, blame
from .status import read_status, status_path
from .watch import watch

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port that is free on this host right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def die_with_parent() -> None:
    """Have the kernel kill this process when the process (thread) that started it ends."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _rank_main(cfg: LaunchOptions, env: dict[str, str]) -> None:
    die_with_parent()
    os.environ.update(env)
    from .worker import run_worker

    try:
        run_worker(cfg)
    except BaseException:
        sys.exit(1)  # the traceback is in this rank's status file and log


def start_rank(cfg: LaunchOptions, env: dict[str, str]) -> mp.Process:
    """Start one rank of ``cfg``'s job in a new process with ``env`` (RANK, WORLD_SIZE, ...) set."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["fa3dist.launch.worker"])
    proc = ctx.Process(target=_rank_main, args=(cfg, env), name=f"fa3dist-rank{env.get('RANK', 0)}")
    proc.start()
    return proc


def clear_status(out: str) -> None:
    """Remove the status files of an earlier run in the same folder."""
    shutil.rmtree(Path(out) / "status", ignore_errors=True)


def launch_local(cfg: LaunchOptions, world_size: int) -> dict[str, Any]:
    """Run ``cfg``'s job in ``world_size`` local processes; return rank 0's result.

    When a rank fails, the others are stopped and ``RankFailedError`` names the rank that failed
    first and how (see errors.py).
    """
    clear_status(cfg.out)
    port = free_port()
    procs = [start_rank(cfg, {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world_size),
                              "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                              "MASTER_PORT": str(port)})
             for r in range(world_size)]

    def poll() -> list[RankReport]:
        exitcodes = [p.exitcode for p in procs]  # first: a status read after a rank ended is its last
        return [RankReport(r, read_status(status_path(cfg.out, r)), exitcodes[r]) for r in range(world_size)]

    def stop() -> None:
        for proc in procs:
            if proc.is_alive():
                proc.kill()

    try:
        reports = watch(poll, stop, cfg.timeout_s)
    finally:
        stop()
        for proc in procs:
            proc.join(timeout=30)
    if any(r.failed for r in reports):
        raise blame(reports, cfg.timeout_s)
    return json.loads((Path(cfg.out) / "result.json").read_text())
