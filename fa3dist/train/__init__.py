"""``fa3dist train``: a Llama-style model trained over a sequence-parallel ring, with checkpoints
that survive a failed rank."""

from .config import TrainConfig
from .loop import Trainer, learning_rate, run_train, train_summary

__all__ = ["TrainConfig", "Trainer", "learning_rate", "run_train", "train_summary"]
