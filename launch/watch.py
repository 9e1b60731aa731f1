"""The launchers' supervision loop: poll every rank until the job ends, fails or hangs.

- When every rank has ended, the loop returns.
- After the first failure (an error, a non-zero exit, a death) the other ranks get ``GRACE_S`` to
  report what they saw; then every rank still running is stopped.
- A hang is declared without waiting for the ranks' own timeouts (NCCL's watchdog can take minutes
  to abort): when every running rank has made no progress for the process-group timeout plus
  ``HANG_SLACK_S`` while some ranks are further ahead than others (they wait on the ones behind).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .errors import RankReport, hung_ranks

log = logging.getLogger("fa3dist.launch")

POLL_S = 0.1
GRACE_S = 1.0
HANG_SLACK_S = 5.0
STOP_WAIT_S = 30.0


def watch(poll: Callable[[], list[RankReport]], stop: Callable[[], None], timeout_s: float,
          poll_s: float = POLL_S) -> list[RankReport]:
    """Poll the ranks until they all ended, or stop them after a failure or a hang; return the last
    reports, with the ranks that the launcher stopped marked ``stopped``."""
    failed_at = None
    while True:
        reports = poll()
        now = time.time()
        if all(r.ended for r in reports):
            return reports
        if failed_at is None and any(r.failed for r in reports):
            failed_at = now
            log.info("a rank failed; stopping the others in %.1f s", GRACE_S)
        hang = _every_rank_stuck(reports, timeout_s + HANG_SLACK_S, now)
        if hang:
            log.info("no rank made progress for %.0f s; stopping the job", timeout_s + HANG_SLACK_S)
        if hang or (failed_at is not None and now - failed_at >= GRACE_S):
            return _stop_all(poll, stop, reports)
        time.sleep(poll_s)


def _every_rank_stuck(reports: list[RankReport], idle_s: float, now: float) -> bool:
    """Every running rank idle for ``idle_s``, and not all at the same progress (some wait on others)."""
    running = [r for r in reports if not r.ended and r.state == "running"]
    if not running or len(running) < len([r for r in reports if not r.ended]):
        return False
    behind = hung_ranks(running, idle_s, now)
    idle = [r for r in running if now - r.status.get("progress_at", now) >= idle_s]
    return len(idle) == len(running) and len(behind) < len(running)


def _stop_all(poll: Callable[[], list[RankReport]], stop: Callable[[], None],
              reports: list[RankReport]) -> list[RankReport]:
    running = {r.rank for r in reports if not r.ended and r.state != "done"}
    stop()
    deadline = time.monotonic() + STOP_WAIT_S
    while True:
        reports = poll()
        if all(r.ended for r in reports) or time.monotonic() > deadline:
            break
        time.sleep(POLL_S)
    for report in reports:
        report.stopped = report.rank in running
    return reports
