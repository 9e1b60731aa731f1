"""The launchers' verdict on made-up rank reports: the rank that failed first is named, and how;
symptoms (lost connections, collective timeouts, watchdog aborts) are never blamed before it."""

from __future__ import annotations

import signal

import pytest

from fa3dist.launch.errors import RankReport, blame
from fa3dist.launch.watch import HANG_SLACK_S, _every_rank_stuck

NOW = 1000.0
TIMEOUT = 10.0


def running(rank: int, *, progress_at: float = NOW - 0.5, marks: int = 5, seq: int = 10,
            beat_at: float = NOW - 0.2) -> dict:
    return {"rank": rank, "state": "running", "marks": marks, "seq": seq, "label": f"round {marks}",
            "progress_at": progress_at, "beat_at": beat_at}


def failed(rank: int, summary: str, *, peer: bool, at: float, **fields) -> dict:
    return dict(running(rank, **fields), state="failed", summary=summary, peer=peer, failed_at=at,
                error=f"Traceback (most recent call last):\n{summary}")


GLOO_CLOSED = "RuntimeError: [pair.cc:553] Connection closed by peer [127.0.0.1]:1234"
GLOO_TIMEOUT = "RuntimeError: [unbound_buffer.cc:81] Timed out waiting 10000ms for recv operation to complete"


def test_an_own_error_is_blamed_before_a_peer_that_failed_earlier():
    reports = [RankReport(0, failed(0, GLOO_CLOSED, peer=True, at=NOW - 2.0), 1),
               RankReport(1, failed(1, "InjectedFailure: boom", peer=False, at=NOW - 1.9), 1),
               RankReport(2, running(2), -9, stopped=True)]
    err = blame(reports, TIMEOUT, NOW)
    assert (err.rank, err.kind) == (1, "raised")
    first, second = str(err).splitlines()[:2]
    assert first == "rank 1 raised InjectedFailure: boom"
    assert "rank 0 lost its connection to a peer" in second and "rank 2 was stopped" in second


@pytest.mark.parametrize("exitcode,kind,words", [(17, "exited", "exited with code 17"),
                                                 (-signal.SIGKILL, "killed", "SIGKILL (likely an out-of-memory kill)"),
                                                 (-signal.SIGSEGV, "killed", "SIGSEGV")])
def test_a_death_without_an_error_is_named_with_its_code_or_signal(exitcode, kind, words):
    reports = [RankReport(0, failed(0, GLOO_CLOSED, peer=True, at=NOW - 1.0), 1),
               RankReport(1, running(1, beat_at=NOW - 1.2), exitcode)]
    err = blame(reports, TIMEOUT, NOW)
    assert (err.rank, err.kind) == (1, kind) and words in str(err).splitlines()[0]


def test_the_hung_rank_is_the_one_behind_not_the_ones_that_timed_out_waiting():
    hung = running(1, progress_at=NOW - 12, marks=4, seq=9)
    reports = [RankReport(0, failed(0, GLOO_TIMEOUT, peer=True, at=NOW - 1, progress_at=NOW - 11.5), 1),
               RankReport(1, hung, -9, stopped=True),
               RankReport(2, running(2, progress_at=NOW - 11.5, marks=5, seq=10), -9, stopped=True)]
    err = blame(reports, TIMEOUT, NOW)
    assert (err.rank, err.kind) == (1, "hung")
    assert str(err).startswith("rank 1 hung: no progress for 12 s (the timeout is 10 s; last progress: round 4)")


def test_a_rank_left_running_when_a_peer_timed_out_is_hung_even_if_its_last_step_was_recent():
    """The peer's timeout proves the wait; the hung rank's own last progress can be later than the
    start of that wait (local work, or a heartbeat that saw its last collective late)."""
    reports = [RankReport(0, failed(0, GLOO_TIMEOUT, peer=True, at=NOW - 0.2, progress_at=NOW - 10.3, marks=6), 1),
               RankReport(1, running(1, progress_at=NOW - 9.4, marks=5), -15, stopped=True)]
    err = blame(reports, TIMEOUT, NOW)
    assert (err.rank, err.kind) == (1, "hung") and "rank 0 timed out waiting for a peer" in str(err)


def test_a_watchdog_abort_after_the_timeout_is_not_blamed_before_the_hung_rank():
    """NCCL's watchdog kills a rank that waited the whole timeout (SIGABRT): a symptom of the hang."""
    waiter = running(1, progress_at=NOW - 13, marks=6, seq=12, beat_at=NOW - 1.5)
    reports = [RankReport(0, running(0, progress_at=NOW - 13.2, marks=5, seq=11), -15, stopped=True),
               RankReport(1, waiter, -signal.SIGABRT)]
    err = blame(reports, TIMEOUT, NOW)
    assert (err.rank, err.kind) == (0, "hung")
    assert "rank 1 was killed by SIGABRT after waiting without progress" in str(err)


def test_a_slow_victim_is_not_blamed_before_the_rank_that_raised():
    """Under load a victim can sit in a collective for the whole timeout before it is stopped; the
    error that happened while it was merely waiting comes first."""
    reports = [RankReport(0, running(0, progress_at=NOW - 10.5, marks=6), -9, stopped=True),
               RankReport(1, failed(1, "InjectedFailure: boom", peer=False, at=NOW - 9.8, progress_at=NOW - 10.6,
                                    marks=5), 1)]
    assert blame(reports, TIMEOUT, NOW).rank == 1


def test_a_rank_that_died_before_writing_a_status_is_still_named():
    reports = [RankReport(0, None, 1), RankReport(1, running(1), -9, stopped=True)]
    err = blame(reports, TIMEOUT, NOW)
    assert (err.rank, err.kind) == (0, "exited")


def test_only_symptoms_blames_the_earliest_and_says_so():
    reports = [RankReport(0, failed(0, GLOO_TIMEOUT, peer=True, at=NOW - 1), 1),
               RankReport(1, failed(1, GLOO_CLOSED, peer=True, at=NOW - 0.5), 1)]
    err = blame(reports, TIMEOUT, NOW)
    assert err.rank == 0 and "no other rank failed first" in str(err).splitlines()[0]


def test_a_lost_ray_actor_is_named():
    reports = [RankReport(0, running(0), -9, stopped=True),
               RankReport(1, running(1), lost="its Ray actor died (The actor is dead because its node died)")]
    err = blame(reports, TIMEOUT, NOW)
    assert (err.rank, err.kind) == (1, "died") and "node died" in str(err)


def test_a_hang_is_certain_only_when_every_rank_is_idle_and_some_are_ahead():
    idle = NOW - TIMEOUT - HANG_SLACK_S - 1
    behind, ahead = running(0, progress_at=idle, marks=4), running(1, progress_at=idle, marks=5)
    assert _every_rank_stuck([RankReport(0, behind), RankReport(1, ahead)], TIMEOUT + HANG_SLACK_S, NOW)
    assert not _every_rank_stuck([RankReport(0, behind), RankReport(1, running(1, marks=5))],
                                 TIMEOUT + HANG_SLACK_S, NOW), "rank 1 still makes progress"
    assert not _every_rank_stuck([RankReport(0, behind), RankReport(1, dict(ahead, marks=4))],
                                 TIMEOUT + HANG_SLACK_S, NOW), "all at the same step: a long local computation"
