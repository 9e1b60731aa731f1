"""Training data: a synthetic long-range recall task made from a seed, or a file of tokens.

Both return, for a step number, the same full batch on every rank, so every rank can take its
own shard and the loss can be normalised over the whole sequence. A batch depends only on the
seed and the step, never on what came before: a run resumed at step n sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IGNORE = -100  # target of a position that does not count in the loss (F.cross_entropy's ignore_index)
TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


@dataclass(frozen=True)
class Batch:
    """``inputs`` and ``targets`` (B, S) int64; a target of ``IGNORE`` does not count in the loss."""

    inputs: torch.Tensor
    targets: torch.Tensor

    @property
    def counted(self) -> int:
        """How many targets count in the loss."""
        return int((self.targets != IGNORE).sum())


def _rng(seed: int, step: int) -> np.random.Generator:
    """A generator that depends on (seed, step) only."""
    return np.random.default_rng([seed, step])


class RecallTask:
    """Associative recall across the whole sequence.

    The vocabulary is cut into keys [0, V/4), values [V/4, V/2) and filler [V/2, V). Each sequence
    starts with ``n_pairs`` key-value pairs (distinct keys, random values), then random filler.
    At ``n_queries`` random positions in its second half stands one of those keys, whose target is
    its value; only these targets count in the loss. Value tokens appear nowhere else, so a query
    can be answered only by attending back to the pairs at the start. Sharded over W ranks, most
    queries sit on another rank than the pairs: only a model whose attention crosses shards can
    solve the task. Guessing among the values gives a loss of ln(V/4).
    """

    def __init__(self, *, vocab_size: int, seq_len: int, batch_size: int, n_pairs: int, n_queries: int, seed: int):
        n_keys = vocab_size // 4
        if n_keys < 1:
            raise ValueError(f"vocab_size must be at least 8 for the recall task, got {vocab_size}")
        if not 1 <= n_pairs <= n_keys:
            raise ValueError(f"n_pairs must be in [1, vocab_size/4 = {n_keys}], got {n_pairs}")
        if 2 * n_pairs > seq_len // 2 or not 1 <= n_queries <= seq_len - seq_len // 2:
            raise ValueError(f"seq_len {seq_len} is too short for {n_pairs} pairs in its first half and "
                             f"{n_queries} queries in its second half")
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        self.n_pairs, self.n_queries, self.seed, self.n_keys = n_pairs, n_queries, seed, n_keys

    def batch(self, step: int) -> Batch:
        rng = _rng(self.seed, step)
        shape = (self.batch_size, self.seq_len)
        inputs = rng.integers(2 * self.n_keys, self.vocab_size, size=shape)
        targets = np.full(shape, IGNORE)
        half = self.seq_len // 2
        for row in range(self.batch_size):
            keys = rng.choice(self.n_keys, size=self.n_pairs, replace=False)
            values = rng.integers(self.n_keys, 2 * self.n_keys, size=self.n_pairs)
            inputs[row, 0:2 * self.n_pairs:2] = keys
            inputs[row, 1:2 * self.n_pairs:2] = values
            where = half + rng.choice(self.seq_len - half, size=self.n_queries, replace=False)
            asked = rng.integers(0, self.n_pairs, size=self.n_queries)
            inputs[row, where] = keys[asked]
            targets[row, where] = values[asked]
        return Batch(torch.from_numpy(inputs), torch.from_numpy(targets))


class TokenFile:
    """Language modelling on a flat file of tokens (uint16 or uint32), memory-mapped.

    Each sequence is a window of seq_len + 1 tokens at a random offset (drawn from the seed and
    the step); the targets are the inputs shifted by one.
    """

    def __init__(self, path: str | Path, *, token_dtype: str, vocab_size: int, seq_len: int, batch_size: int,
                 seed: int):
        if token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"token_dtype must be one of {', '.join(TOKEN_DTYPES)}, got {token_dtype!r}")
        if not Path(path).is_file():
            raise ValueError(f"token_file {str(path)!r} does not exist")
        self.tokens = np.memmap(path, dtype=TOKEN_DTYPES[token_dtype], mode="r")
        if len(self.tokens) < seq_len + 1:
            raise ValueError(f"token_file {str(path)!r} holds {len(self.tokens)} tokens; a sequence needs "
                             f"seq_len + 1 = {seq_len + 1}")
        self.path, self.vocab_size, self.seq_len = path, vocab_size, seq_len
        self.batch_size, self.seed = batch_size, seed

    def batch(self, step: int) -> Batch:
        starts = _rng(self.seed, step).integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        windows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
        if windows.max() >= self.vocab_size:
            raise ValueError(f"token_file {str(self.path)!r} holds token {windows.max()}, outside the model's "
                             f"vocab_size {self.vocab_size}")
        windows = torch.from_numpy(windows)
        return Batch(windows[:, :-1], windows[:, 1:])
