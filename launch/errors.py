"""Which rank failed first, and how: the launchers' verdict when a job fails.

Every launcher gathers one ``RankReport`` per rank (the rank's status file, its exit code as the
engine saw it, whether the launcher stopped it) and raises ``blame(reports, timeout_s)``:

- a rank that raised an error of its own is a cause, dated when it raised;
- a rank that exited with a non-zero code or was killed by a signal, without an error of its own,
  is a cause, dated at its last heartbeat; SIGKILL is reported as a likely out-of-memory kill;
- a rank that was still running (no error, no exit) when another rank gave up waiting on a peer
  (a collective timeout, or a death after waiting the whole timeout) is hung, dated when the first
  waiter gave up; without such a waiter, a rank is hung once it made no progress for the timeout,
  dated when that timeout ran out. Of several such ranks, those furthest behind (fewest progress
  marks, then collectives) are the hung ones, the rest were waiting on them;
- symptoms are never blamed while there is a cause: an error that reads as a lost connection or a
  collective timeout, and a death after waiting the whole timeout without progress (NCCL's
  watchdog aborts such a rank).

The earliest cause is named on the error's first line.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import Any

OOM_HINT = "likely an out-of-memory kill"


@dataclass
class RankReport:
    """What the launcher knows about one rank when the job ends."""

    rank: int
    status: dict[str, Any] | None = None  # the rank's last status file (see status.py)
    exitcode: int | None = None  # None: still running or unknown; < 0: killed by that signal
    stopped: bool = False  # the launcher (or torchrun's agent) stopped it after another rank failed
    lost: str = ""  # what the engine said about a death whose exit code it does not know (Ray)

    @property
    def state(self) -> str:
        return (self.status or {}).get("state", "starting")

    @property
    def ended(self) -> bool:
        return self.exitcode is not None or bool(self.lost)

    @property
    def failed(self) -> bool:
        return self.state == "failed" or (self.exitcode is not None and self.exitcode != 0) or bool(self.lost)


@dataclass(frozen=True)
class Cause:
    rank: int
    kind: str  # raised | exited | killed | died | hung
    how: str  # the first line's account, e.g. "raised InjectedFailure: ..." or "exited with code 17"
    at: float  # when it happened (wall clock)
    detail: str = ""  # the traceback, when there is one


class RankFailedError(RuntimeError):
    """A rank failed; every other rank of the job was stopped. ``rank`` and ``kind`` say which and how."""

    def __init__(self, rank: int | None, kind: str, message: str, detail: str = ""):
        super().__init__(message + (f"\n{detail}" if detail else ""))
        self.rank = rank
        self.kind = kind
        self.detail = detail


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _died_waiting(report: RankReport, timeout_s: float) -> bool:
    """Whether a dead rank had been without progress for the timeout when it died."""
    status = report.status or {}
    return "beat_at" in status and status["beat_at"] - status["progress_at"] >= timeout_s


def _death(report: RankReport, now: float) -> Cause:
    at = (report.status or {}).get("beat_at", now)
    if report.lost:
        return Cause(report.rank, "died", f"died: {report.lost}", at)
    if report.exitcode < 0:
        name = signal_name(-report.exitcode)
        hint = f" ({OOM_HINT})" if -report.exitcode == signal.SIGKILL else ""
        return Cause(report.rank, "killed", f"was killed by {name}{hint}", at)
    return Cause(report.rank, "exited", f"exited with code {report.exitcode}", at)


def _progress_key(status: dict[str, Any]) -> tuple[int, int]:
    return status.get("marks", 0), status.get("seq", -1)


def _is_timeout(summary: str) -> bool:
    return any(word in summary for word in ("Timed out", "timed out", "Timeout"))


def gave_up_waiting_at(reports: list[RankReport], timeout_s: float) -> float | None:
    """When the first rank gave up waiting on a peer: a collective timeout, or a death after it
    waited the whole timeout without progress (NCCL's watchdog). None if no rank did."""
    times = [r.status["failed_at"] for r in reports
             if r.state == "failed" and r.status.get("peer") and _is_timeout(r.status["summary"])]
    times += [r.status["beat_at"] for r in reports
              if r.failed and not r.stopped and r.state != "failed" and _died_waiting(r, timeout_s)]
    return min(times, default=None)


def hung_ranks(reports: list[RankReport], timeout_s: float, now: float, *, waited: bool = False) -> list[RankReport]:
    """Ranks still running (or stopped while running) that are hung, keeping those furthest behind:
    all such ranks when another rank gave up waiting (``waited``), else those without progress for
    ``timeout_s``."""
    silent = [r for r in reports if r.state == "running" and not (r.ended and not r.stopped)]
    stale = silent if waited else [r for r in silent if now - r.status.get("progress_at", now) >= timeout_s]
    if not stale:
        return []
    behind = min(_progress_key(r.status) for r in stale)
    return [r for r in stale if _progress_key(r.status) == behind]


def causes(reports: list[RankReport], timeout_s: float, now: float) -> list[Cause]:
    """Every rank that failed on its own, earliest first."""
    found = []
    for report in reports:
        status = report.status or {}
        if report.state == "failed":
            if not status.get("peer"):
                found.append(Cause(report.rank, "raised", f"raised {status['summary']}", status["failed_at"],
                                   status.get("error", "")))
        elif report.failed and not report.stopped and not _died_waiting(report, timeout_s):
            found.append(_death(report, now))
    waited = gave_up_waiting_at(reports, timeout_s)
    for report in hung_ranks(reports, timeout_s, now, waited=waited is not None):
        idle = now - report.status["progress_at"]
        found.append(Cause(report.rank, "hung", f"hung: no progress for {idle:.0f} s (the timeout is {timeout_s:g} s; "
                                                f"last progress: {report.status.get('label', '?')})",
                           report.status["progress_at"] + timeout_s if waited is None else waited))
    return sorted(found, key=lambda c: c.at)


def _symptom(summary: str) -> str:
    if _is_timeout(summary):
        return "timed out waiting for a peer"
    if any(word in summary for word in ("by peer", "Connection", "Broken pipe")):
        return "lost its connection to a peer"
    return f"failed after it ({summary[:100]})"


def _others(reports: list[RankReport], blamed: int | None, timeout_s: float) -> str:
    """One line on what became of every other rank."""
    parts = []
    for report in reports:
        if report.rank == blamed:
            continue
        status = report.status or {}
        if report.state == "failed" and status.get("peer"):
            parts.append(f"rank {report.rank} {_symptom(status['summary'])}")
        elif report.failed and not report.stopped and report.state != "failed" and _died_waiting(report, timeout_s):
            parts.append(f"rank {report.rank} {_death(report, 0.0).how} after waiting without progress")
        elif report.stopped:
            parts.append(f"rank {report.rank} was stopped")
        elif report.state == "done" or report.exitcode == 0:
            parts.append(f"rank {report.rank} had finished")
    return "; ".join(parts)


def blame(reports: list[RankReport], timeout_s: float, now: float | None = None) -> RankFailedError:
    """The error to raise for a failed job: the rank that failed first, and how."""
    now = time.time() if now is None else now
    found = causes(reports, timeout_s, now)
    if found:
        first = found[0]
        rank, kind, how, detail = first.rank, first.kind, first.how, first.detail
        also = [c for c in found[1:] if c.rank != rank]
        if also:
            detail = "; ".join(f"rank {c.rank} also {c.how}" for c in also) + ("\n" + detail if detail else "")
    else:
        symptoms = [r for r in reports if r.state == "failed"]
        deaths = [r for r in reports if r.failed and not r.stopped and r.state != "failed"]
        if symptoms:
            first_report = min(symptoms, key=lambda r: r.status["failed_at"])
            rank, kind, detail = first_report.rank, "raised", first_report.status.get("error", "")
            how = (f"raised {first_report.status['summary']} (an error that usually follows another rank's "
                   "failure, but no other rank failed first)")
        elif deaths:
            death = _death(deaths[0], now)
            rank, kind, how, detail = death.rank, death.kind, death.how, ""
        else:
            return RankFailedError(None, "unknown", "the job failed, but no rank reported an error")
    others = _others(reports, rank, timeout_s)
    message = f"rank {rank} {how}" + (f"\nthen: {others}." if others else "")
    return RankFailedError(rank, kind, message, detail.rstrip())
