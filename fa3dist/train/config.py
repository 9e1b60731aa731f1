"""What ``fa3dist train`` runs: the model, the data, the optimiser and the run's bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass

from fa3dist.config import LaunchOptions, check_choices
from fa3dist.data import TOKEN_DTYPES
from fa3dist.kernels import BACKEND_NAMES
from fa3dist.layout import num_chunks
from fa3dist.model import ModelConfig
from fa3dist.ring.schedule import LAYOUTS

PRECISIONS = ("auto", "bf16", "float32", "float64")


@dataclass
class TrainConfig(LaunchOptions):
    """Settings of a training run (``configs/train_*.yaml``). ``out`` is the run folder."""

    # model
    vocab_size: int = 64
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 128
    rope_theta: float = 10000.0
    # data: the recall task, or a file of tokens
    data: str = "recall"  # recall | tokens
    token_file: str | None = None
    token_dtype: str = "uint16"  # uint16 | uint32
    seq_len: int = 256  # tokens per sequence over all ranks
    batch_size: int = 8
    n_pairs: int = 4
    n_queries: int = 16
    seed: int = 0
    # optimiser: AdamW, linear warm-up then cosine decay to min_lr
    steps: int = 100
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    # execution
    precision: str = "auto"  # auto (bf16 autocast on CUDA, float32 on CPU) | bf16 | float32 | float64
    layout: str = "zigzag"
    backend: str = "auto"
    shard_only: bool = False  # attend only within each rank's own shard (ablation: no ring)
    activation_checkpointing: bool = False
    compile: bool = False
    # bookkeeping
    log_every: int = 10
    checkpoint_every: int = 50  # 0: never
    keep_checkpoints: int = 2
    resume: bool = False
    plot: bool = False  # also draw the loss curve to <out>/loss.png at the end (needs matplotlib)
    # fault drill: this rank kills itself (SIGKILL) at the start of fail_step, once per run folder
    fail_rank: int | None = None
    fail_step: int = 0

    def check(self) -> None:
        super().check()
        for key in ("seq_len", "batch_size", "steps", "log_every", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ValueError(f"key {key!r} must be at least 1, got {getattr(self, key)}")
        for key in ("warmup_steps", "checkpoint_every", "weight_decay", "grad_clip", "min_lr", "fail_step"):
            if getattr(self, key) < 0:
                raise ValueError(f"key {key!r} must not be negative, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ValueError(f"key 'lr' must be positive, got {self.lr}")
        check_choices(self, {"data": ["recall", "tokens"], "token_dtype": list(TOKEN_DTYPES), "precision": PRECISIONS,
                             "layout": LAYOUTS, "backend": BACKEND_NAMES})
        if self.data == "tokens" and not self.token_file:
            raise ValueError("key 'token_file' must name a file of tokens when data is 'tokens'")
        self.model_config()  # raises on a shape that does not fit

    def check_resolved(self) -> None:
        parts = num_chunks(self.world_size, self.layout)
        if self.seq_len % parts:
            raise ValueError(f"seq_len {self.seq_len} does not split into {parts} equal chunks "
                             f"(layout {self.layout}, world_size {self.world_size})")
        if self.fail_rank is not None and not 0 <= self.fail_rank < self.world_size:
            raise ValueError(f"fail_rank {self.fail_rank} is not a rank of this job: it has {self.world_size} "
                             f"ranks (0 to {self.world_size - 1})")

    def model_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab_size, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
                           n_kv_heads=self.n_kv_heads, ffn_dim=self.ffn_dim, rope_theta=self.rope_theta)
