"""Errors the launchers raise."""


class RankFailedError(RuntimeError):
    """A rank raised or died; every other rank of the job was stopped."""

    def __init__(self, rank: int, detail: str):
        super().__init__(f"rank {rank} failed; the other ranks were stopped.\n{detail}")
        self.rank = rank
        self.detail = detail
