"""The ring-attention model trains at world size W exactly as at world size 1 (float64, CPU, gloo),
eager and under torch.compile with activation checkpointing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fa3dist.config import load_config
from fa3dist.kernels.numerics import relative_error
from fa3dist.model import ModelConfig, Transformer, apply_rope, rope_angles
from fa3dist.train import TrainConfig, Trainer
from tests.multiproc import run_ranks

STEPS = 3
# seq_len 24 splits into the 2W zigzag chunks of W = 1, 2 and 3
PARITY = ["precision=float64", "seq_len=24", "batch_size=2", "vocab_size=32", "dim=32", "n_heads=4", "n_kv_heads=2",
          "ffn_dim=48", "n_pairs=2", "n_queries=4", "lr=0.01", "warmup_steps=1", "steps=10", "out=unused"]


def train_steps(rank: int, world_size: int, steps: int = STEPS, overrides: tuple[str, ...] = (),
                compile_backend: str | None = None) -> list[tuple[float, np.ndarray]]:
    """(loss, flattened gradient summed over the group) of each of the first ``steps`` steps.

    The gradients come back as numpy arrays: a tensor sent from a process that then exits may not arrive."""
    if world_size > 1:
        torch.set_num_threads(1)  # the ranks share the machine's cores
    cfg = load_config(TrainConfig, None, [*PARITY, *overrides])
    trainer = Trainer(cfg, rank, world_size, torch.device("cpu"))
    if compile_backend is not None:
        trainer.forward = torch.compile(trainer.model, fullgraph=True, backend=compile_backend)
    history = []
    for step in range(steps):
        stats = trainer.forward_backward(trainer.data.batch(step))
        grad = torch.cat([p.grad.flatten() for p in trainer.model.parameters()])
        history.append((stats[0].item(), grad.numpy()))
        trainer.optimizer_step(step)
    return history


def two_rank_variants(rank: int, world_size: int) -> dict[str, list]:
    return {"eager": train_steps(rank, world_size),
            "compiled": train_steps(rank, world_size, overrides=("activation_checkpointing=true",),
                                    compile_backend="aot_eager")}


@pytest.fixture(scope="module")
def one_rank() -> list[tuple[float, np.ndarray]]:
    return train_steps(0, 1)


@pytest.fixture(scope="module")
def two_ranks() -> list[dict[str, list]]:
    return run_ranks(two_rank_variants, 2)


def assert_same_training(history: list, reference: list) -> None:
    assert len(history) == len(reference)
    for step, ((loss, grad), (ref_loss, ref_grad)) in enumerate(zip(history, reference)):
        assert abs(loss - ref_loss) <= 1e-9 * abs(ref_loss), f"step {step}: loss {loss} vs {ref_loss}"
        assert relative_error(torch.from_numpy(grad), torch.from_numpy(ref_grad)) <= 1e-9, f"step {step}: gradient"


def test_the_loss_falls_and_gradients_are_not_zero(one_rank):
    losses = [loss for loss, _ in one_rank]
    assert losses[-1] < losses[0]
    assert all(abs(grad).max() > 0 for _, grad in one_rank)


def test_two_ranks_train_like_one(one_rank, two_ranks):
    for rank, result in enumerate(two_ranks):
        assert_same_training(result["eager"], one_rank)
    for (_, grad0), (_, grad1) in zip(two_ranks[0]["eager"], two_ranks[1]["eager"]):
        assert np.array_equal(grad0, grad1), "the ranks must apply the same update"


def test_three_ranks_train_like_one(one_rank):
    for result in run_ranks(train_steps, 3, 2):
        assert_same_training(result, one_rank[:2])


def test_compiled_model_with_activation_checkpointing_trains_like_eager(one_rank, two_ranks):
    for result in two_ranks:
        assert_same_training(result["compiled"], one_rank)


def test_rope_rotates_by_position_and_keeps_norms():
    positions = torch.tensor([0, 5, 17])
    cos, sin = rope_angles(positions, 8, 10000.0, torch.float64)
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64)
    rotated = apply_rope(x, cos, sin)
    assert torch.equal(rotated[:, 0], x[:, 0])  # position 0: angle 0
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    # a dot product of rotated vectors depends only on the distance between their positions
    q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)

    def score(i: int, j: int) -> torch.Tensor:
        c, s = rope_angles(torch.tensor([i, j]), 8, 10000.0, torch.float64)
        both = apply_rope(torch.stack((q, k)).view(1, 2, 1, 8), c, s)
        return both[0, 0, 0] @ both[0, 1, 0]

    torch.testing.assert_close(score(3, 1), score(12, 10))


def test_model_config_rejects_bad_shapes():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(vocab_size=8, dim=32, n_layers=1, n_heads=4, n_kv_heads=3, ffn_dim=8)
    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig(vocab_size=8, dim=30, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=8)
    model = Transformer(ModelConfig(vocab_size=8, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=8))
    logits = model(torch.zeros(1, 6, dtype=torch.long), torch.arange(6))
    assert logits.shape == (1, 6, 8)
