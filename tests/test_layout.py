"""Sequence layouts: shards, positions and their errors."""

from __future__ import annotations

import pytest
import torch

from fa3dist import shard_positions, shard_sequence
from fa3dist.layout import chunks_of_rank


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_shards_partition_the_sequence_and_positions_agree(world_size, layout):
    seq = 2 * world_size * 3
    x = torch.randn(2, seq, 3)
    seen = []
    for rank in range(world_size):
        local = shard_sequence(x, world_size=world_size, rank=rank, layout=layout)
        pos = shard_positions(seq, world_size=world_size, rank=rank, layout=layout)
        assert torch.equal(local, x[:, pos])
        seen.append(pos)
    assert torch.equal(torch.sort(torch.cat(seen)).values, torch.arange(seq))


def test_zigzag_pairs_chunks_from_both_ends():
    assert [chunks_of_rank(4, r, "zigzag") for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    assert torch.equal(shard_positions(8, world_size=2, rank=0), torch.tensor([0, 1, 6, 7]))
    assert torch.equal(shard_positions(8, world_size=2, rank=1, layout="contiguous"), torch.tensor([4, 5, 6, 7]))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"world_size": 3, "rank": 0}, ValueError, "does not split into 6"),
    ({"world_size": 2, "rank": 2}, ValueError, "rank must be in"),
    ({"world_size": 0, "rank": 0}, ValueError, "world_size must be at least 1"),
    ({"world_size": 2, "rank": 0, "layout": "stripe"}, ValueError, "layout must be one of"),
    ({"world_size": 2.0, "rank": 0}, TypeError, "world_size must be an int"),
])
def test_shard_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        shard_sequence(torch.zeros(1, 10, 2), **kwargs)


def test_shard_positions_rejects_bad_length():
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        shard_positions(0, world_size=1, rank=0)
