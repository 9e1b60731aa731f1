"""What a rank tells its launcher while it runs: a small JSON status file, rewritten on every change.

The file (``<out>/status/rank<r>.json``) holds the rank's pid and host, its state ("running",
"done" or "failed"), its progress (a count of the job's progress marks, the label of the last one,
and the process group's collective sequence number), the time of its last progress and of its
last heartbeat, and, once it failed, its traceback and whether the error reads as the consequence
of another rank's failure (a lost connection, a collective timeout) rather than a cause.

A daemon thread rewrites the file every ``HEARTBEAT_S`` seconds: a rank that stops making
progress keeps beating, so the launcher can tell "alive but stuck" from "dead" from "busy".
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HEARTBEAT_S = 0.5

# Phrases of errors that a rank gets because a peer failed, not because of its own work
# (gloo, NCCL, the c10d store, and the ring's thread transport).
PEER_SYMPTOMS = ("by peer", "Connection reset", "Connection closed", "Connection refused", "Broken pipe",
                 "Timed out", "timed out", "Timeout", "communicator was aborted", "NCCL error",
                 "another virtual rank failed")


def is_peer_symptom(exc: BaseException) -> bool:
    """Whether an exception reads like the consequence of another rank's failure."""
    import torch.distributed as dist

    text = f"{type(exc).__name__}: {exc}"
    return isinstance(exc, dist.DistError) or any(phrase in text for phrase in PEER_SYMPTOMS)


def status_path(out: str | Path, rank: int) -> Path:
    """Where rank ``rank`` of a job whose run folder is ``out`` writes its status."""
    return Path(out) / "status" / f"rank{rank}.json"


def read_status(path: Path) -> dict[str, Any] | None:
    """A rank's last status, or None before it wrote one."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class RankStatus:
    """This rank's status file and the heartbeat thread that keeps it fresh."""

    def __init__(self, out: str | Path, rank: int):
        self.path = status_path(out, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self._fields: dict[str, Any] = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(),
                                        "state": "running", "marks": 0, "label": "started", "seq": -1,
                                        "progress_at": now, "beat_at": now}
        self._sequence: Callable[[], int] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._write()
        self._thread = threading.Thread(target=self._beat, name=f"fa3dist-heartbeat-{rank}", daemon=True)
        self._thread.start()

    def progress(self, label: str) -> None:
        """Mark a step of the job as reached (jobs call it through ``RankContext.progress``)."""
        with self._lock:
            self._fields.update(marks=self._fields["marks"] + 1, label=label, progress_at=time.time())
            self._write()

    def follow_group(self, sequence: Callable[[], int] | None) -> None:
        """Count the process group's collectives as progress: ``sequence()`` returns its sequence number."""
        with self._lock:
            self._sequence = sequence

    def failed(self, exc: BaseException) -> None:
        """Record this rank's error (before the process goes down)."""
        with self._lock:
            self._fields.update(state="failed", failed_at=time.time(), peer=is_peer_symptom(exc),
                                summary=f"{type(exc).__name__}: {exc}".splitlines()[0],
                                error="".join(traceback.format_exception(exc)))
            self._write()
        self._stop.set()

    def done(self) -> None:
        """Record that the job finished on this rank."""
        with self._lock:
            self._fields.update(state="done", progress_at=time.time())
            self._write()
        self._stop.set()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._lock:
                if self._stop.is_set():
                    return
                now = time.time()
                seq = self._read_sequence()
                if seq != self._fields["seq"]:  # it moved since the last beat: date it no later than that
                    self._fields.update(seq=seq, progress_at=max(self._fields["beat_at"], self._fields["progress_at"]))
                self._fields["beat_at"] = now
                self._write()

    def _read_sequence(self) -> int:
        try:
            return int(self._sequence()) if self._sequence is not None else -1
        except Exception:  # the group is being torn down
            return self._fields["seq"]

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._fields))
        os.replace(tmp, self.path)
