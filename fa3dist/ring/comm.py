"""Ring communication: pass tensors to the next rank and receive from the previous one.

Five implementations share one interface (``rank``, ``world_size``, ``send_recv``):
- ``ProcessGroupRing``: torch.distributed point-to-point over a process group (NCCL or gloo);
- ``LoopbackRing``: no communication; each rank "receives" what it sends. It runs a rank's exact
  schedule without communication, which is how overlap efficiency is measured;
- ``ThreadRing``: virtual ranks as threads of one process (one GPU), for the ring benchmark and
  for CPU tests of the schedule at any world size;
- ``RecordingRing`` and ``ReplayRing``: a rank of a ring run that keeps what it received, and a rerun
  of that rank on its own from the recording (the ring benchmark replays its virtual ranks one after
  another from one thread, so that Python threads contending for the interpreter are not timed).
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import torch
import torch.distributed as dist


# default process group -> {(global ranks, backend) -> the group made for them}
_SUBGROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cached_subgroup(ranks: Sequence[int], backend: str | None) -> dist.ProcessGroup:
    """The process group over the global ``ranks`` with ``backend``, made at the first call and reused.

    Made with ``use_local_synchronization``: only those ranks take part, all at the same point of
    their programs (the callers reach it inside a collective call). Forgotten with the default group.
    """
    by_key = _SUBGROUPS.setdefault(dist.group.WORLD, {})
    key = (tuple(ranks), backend)
    if key not in by_key:
        by_key[key] = dist.new_group(list(ranks), backend=backend, use_local_synchronization=True)
    return by_key[key]


def subgroup_ranks(backend: str) -> list[tuple[int, ...]]:
    """The rank sets of the cached subgroups with ``backend`` (for tests)."""
    return sorted(ranks for ranks, b in _SUBGROUPS.get(dist.group.WORLD, {}) if b == backend)


class Pending(Protocol):
    def wait(self) -> list[torch.Tensor]:
        """Block (the host, or on CUDA only the current stream) until the tensors arrived."""


class Ring(Protocol):
    rank: int
    world_size: int

    def send_recv(self, tensors: Sequence[torch.Tensor], channel: int = 0) -> Pending:
        """Send ``tensors`` to rank+1 and receive tensors of the same shapes from rank-1."""


class _Done:
    def __init__(self, tensors: Sequence[torch.Tensor]):
        self._tensors = list(tensors)

    def wait(self) -> list[torch.Tensor]:
        return self._tensors


class _Works:
    def __init__(self, works: list[Any], received: list[torch.Tensor]):
        self._works, self._received = works, received

    def wait(self) -> list[torch.Tensor]:
        for work in self._works:
            work.wait()
        return self._received


class ProcessGroupRing:
    """Ring over a torch.distributed process group (None: the default group).

    ``send_recv`` posts all sends and receives in one ``dist.batch_isend_irecv`` and returns at
    once. With NCCL the transfers run on the process group's own stream after the work already
    queued on the current stream; ``wait()`` makes only the current stream wait for them, so
    kernels queued in between overlap the transfer. ``channel`` becomes the message tag, which
    keeps two exchanges in flight apart on gloo.
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._next = self._global((self.rank + 1) % self.world_size)
        self._prev = self._global((self.rank - 1) % self.world_size)

    def _global(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def send_recv(self, tensors: Sequence[torch.Tensor], channel: int = 0) -> Pending:
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self._next, self.group, tag=channel) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, self._prev, self.group, tag=channel) for t in received]
        return _Works(dist.batch_isend_irecv(ops), received)


class LoopbackRing:
    """A rank's view of a ring without communication: it receives what it sends."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def send_recv(self, tensors: Sequence[torch.Tensor], channel: int = 0) -> Pending:
        return _Done(tensors)


class ThreadRing:
    """Rank ``rank`` of a ring whose ranks are threads of this process; see ``run_thread_ring``.

    Tensors are handed over by reference: a sender must not modify a tensor after sending it.
    """

    def __init__(self, rank: int, mailboxes: list[dict[int, queue.Queue]], abort: threading.Event,
                 timeout_s: float):
        self.rank, self.world_size = rank, len(mailboxes)
        self._mailboxes, self._abort, self._timeout_s = mailboxes, abort, timeout_s

    def send_recv(self, tensors: Sequence[torch.Tensor], channel: int = 0) -> Pending:
        self._mailboxes[(self.rank + 1) % self.world_size][channel].put(list(tensors))
        return _Inbox(self._mailboxes[self.rank][channel], self._abort, self._timeout_s)


class RecordingRing:
    """A ring that passes everything through ``ring`` and keeps what this rank received, per channel in
    the order of its ``send_recv`` calls, for a ``ReplayRing`` to hand out again."""

    def __init__(self, ring: Ring):
        self.rank, self.world_size = ring.rank, ring.world_size
        self._ring = ring
        self.received: dict[int, list[list[torch.Tensor]]] = {}

    def send_recv(self, tensors: Sequence[torch.Tensor], channel: int = 0) -> Pending:
        slot: list[torch.Tensor] = []
        self.received.setdefault(channel, []).append(slot)
        return _Recorded(self._ring.send_recv(tensors, channel), slot)


class _Recorded:
    def __init__(self, pending: Pending, slot: list[torch.Tensor]):
        self._pending, self._slot = pending, slot

    def wait(self) -> list[torch.Tensor]:
        self._slot[:] = self._pending.wait()
        return self._slot


class ReplayRing:
    """Rank ``rank`` of a recorded ring run: ``send_recv`` sends nothing and "receives" the next message
    ``received`` holds for the channel (a ``RecordingRing.received``).

    It reruns one virtual rank's exact schedule on its own (the same kernels on the same inputs), so
    the ranks of a ring can be replayed one after another from one thread. The received tensors are
    handed out as they are: a schedule that adds into what it received (the backward's travelling
    dK/dV) changes the recording, so only the first run's results are the ring's.
    """

    def __init__(self, rank: int, world_size: int, received: dict[int, list[list[torch.Tensor]]]):
        self.rank, self.world_size = rank, world_size
        self._next = {channel: iter(messages) for channel, messages in received.items()}

    def send_recv(self, tensors: Sequence[torch.Tensor], channel: int = 0) -> Pending:
        try:
            return _Done(next(self._next[channel]))
        except (KeyError, StopIteration):
            raise RuntimeError(f"replayed rank {self.rank} asked for more messages on channel {channel} "
                               f"than its recorded run received") from None


class PeerFailed(RuntimeError):
    """Raised in a virtual rank whose neighbour failed."""


class _Inbox:
    def __init__(self, inbox: queue.Queue, abort: threading.Event, timeout_s: float):
        self._inbox, self._abort, self._timeout_s = inbox, abort, timeout_s

    def wait(self) -> list[torch.Tensor]:
        deadline = time.monotonic() + self._timeout_s
        while not self._abort.is_set():
            try:
                return self._inbox.get(timeout=0.05)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"virtual rank waited {self._timeout_s} s for its neighbour") from None
        raise PeerFailed("another virtual rank failed")


def run_thread_ring(fn: Callable[[Ring], Any], world_size: int, *, timeout_s: float = 600.0,
                    channels: int = 2) -> list[Any]:
    """Run ``fn(ring)`` for every virtual rank of a ``world_size`` ring, one thread each.

    Returns the results in rank order. When a rank raises, the others stop at their next receive
    and the first rank's exception is re-raised. On CUDA every rank queues its kernels on the
    current device's default stream, so the GPU runs all ranks' work one after another.
    """
    mailboxes = [{c: queue.Queue() for c in range(channels)} for _ in range(world_size)]
    abort = threading.Event()
    device = torch.cuda.current_device() if torch.cuda.is_available() else None

    def run(rank: int) -> Any:
        if device is not None:
            torch.cuda.set_device(device)
        try:
            return fn(ThreadRing(rank, mailboxes, abort, timeout_s))
        except BaseException:
            abort.set()
            raise

    with ThreadPoolExecutor(max_workers=world_size, thread_name_prefix="virtual-rank") as pool:
        futures = [pool.submit(run, r) for r in range(world_size)]
        errors = [f.exception() for f in futures]
        causes = [e for e in errors if e is not None and not isinstance(e, PeerFailed)]
        if causes:
            raise causes[0]
        return [f.result() for f in futures]
