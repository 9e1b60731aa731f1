"""Run a function in several gloo processes and collect each rank's return value."""

from __future__ import annotations

import os
import queue
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _main(rank: int, world_size: int, port: int, backend: str, fn: Callable, args: tuple, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
        results.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def same_on_every_rank(per_rank: list[dict[str, str]], name: str) -> str:
    """The message every rank reported for call ``name``; fails when two ranks reported different ones."""
    messages = {rank: results[name] for rank, results in enumerate(per_rank)}
    assert len(set(messages.values())) == 1, f"{name}: ranks raised different errors: {messages}"
    return messages[0]


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300,
              backend: str = "gloo") -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` processes joined by a process group
    (gloo on the CPU; "nccl" puts rank r on GPU r).

    ``fn`` must be importable (a module-level function). Returns the results in rank order and
    raises AssertionError with the traceback of any rank that raised.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_main, args=(r, world_size, port, backend, fn, args, results)) for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    failures: list[str] = []
    try:
        for _ in range(world_size):
            rank, ok, payload = results.get(timeout=timeout_s)
            (out.__setitem__(rank, payload) if ok else failures.append(f"rank {rank}:\n{payload}"))
    except queue.Empty:
        failures.append(f"ranks timed out after {timeout_s} s")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if failures:
        raise AssertionError("\n".join(failures))
    return [out[r] for r in range(world_size)]
