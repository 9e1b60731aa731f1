"""Errors the launchers raise, and which failing rank to blame."""

from __future__ import annotations

from dataclasses import dataclass

# How long a launcher keeps collecting failures after the first one before it blames a rank:
# when one rank dies, its peers fail a moment later on the broken connection.
GRACE_S = 2.0


class RankFailedError(RuntimeError):
    """A rank raised or died; every other rank of the job was stopped."""

    def __init__(self, rank: int | None, detail: str, others: int = 0):
        also = f" ({others} other rank(s) failed after it)" if others else ""
        who = "a rank" if rank is None else f"rank {rank}"
        super().__init__(f"{who} failed{also}; the other ranks were stopped.\n{detail}")
        self.rank = rank
        self.detail = detail


@dataclass(frozen=True)
class Failure:
    rank: int
    died: bool  # the process or actor died (True) or the job raised (False)
    detail: str


# Phrases of errors that a rank gets because a peer failed, not because of its own work.
_PEER_SYMPTOMS = ("by peer", "Connection reset", "Connection closed", "Timed out", "timed out", "Timeout",
                  "communicator was aborted", "NCCL error", "Broken pipe", "another virtual rank failed")


def is_peer_symptom(detail: str) -> bool:
    """Whether an error reads like the consequence of another rank's failure."""
    return any(p in detail for p in _PEER_SYMPTOMS)


def blame(failures: list[Failure], silent: list[int] = ()) -> RankFailedError:
    """The error to raise. A rank that died comes first, then one that raised an error of its own,
    then a rank that went silent (no result, no error: hung) while its peers timed out on it."""
    others = len({f.rank for f in failures}) - 1
    died = [f for f in failures if f.died]
    own = [f for f in failures if not f.died and not is_peer_symptom(f.detail)]
    if died or own:
        first = (died or own)[0]
        return RankFailedError(first.rank, first.detail, others=others)
    if silent:
        return RankFailedError(silent[0], f"rank {silent[0]} stopped responding (no result, no error); rank "
                                          f"{failures[0].rank} reported:\n{failures[0].detail}", others=others + 1)
    return RankFailedError(failures[0].rank, failures[0].detail, others=others)
