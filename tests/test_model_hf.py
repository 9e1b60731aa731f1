"""A Hugging Face Llama with "fa3dist_ring" attention over 2 ranks gives the logits of its own
attention on one process (float64, random weights from a config)."""

from __future__ import annotations

import pytest
import torch

from fa3dist import shard_positions, shard_sequence, unshard_sequence
from fa3dist.kernels.numerics import relative_error
from tests.multiproc import run_ranks

pytest.importorskip("transformers")

SEQ = 24


def tiny_llama(attn_implementation: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation=attn_implementation)
    return LlamaForCausalLM(config).to(torch.float64).eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(1))


def ring_logits(rank: int, world_size: int) -> list:
    from fa3dist.integrations import hf

    model = tiny_llama(hf.register())
    ids = shard_sequence(tokens(), world_size=world_size, rank=rank)
    positions = shard_positions(SEQ, world_size=world_size, rank=rank).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    return unshard_sequence(logits).tolist()  # a list: a tensor may not survive the sending process's exit


def test_hf_llama_with_ring_attention_matches_one_process():
    with torch.no_grad():
        eager = tiny_llama("eager")(input_ids=tokens(), use_cache=False).logits
        sdpa = tiny_llama("sdpa")(input_ids=tokens(), use_cache=False).logits
    for logits in run_ranks(ring_logits, 2):
        logits = torch.tensor(logits, dtype=torch.float64)
        assert relative_error(logits, sdpa) < 1e-12
        assert relative_error(logits, eager) < 1e-6  # transformers' eager softmax runs in float32


def test_hf_ring_attention_refuses_a_padding_mask():
    from fa3dist.integrations import hf

    model = tiny_llama(hf.register())
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="padding"):
        model(input_ids=tokens(), attention_mask=mask, use_cache=False)
