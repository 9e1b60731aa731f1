"""A small Llama-style decoder whose attention runs over a sequence-parallel ring.

RMSNorm, rotary position embeddings (RoPE), grouped-query attention and a SwiGLU MLP, in plain
PyTorch. Every rank holds the same weights and its own slice of every sequence (see
``fa3dist.shard_sequence``): the model takes the local tokens and their global positions
(``fa3dist.shard_positions``), and attention calls ``ring_fa3_attention`` over the group, so each
local query sees every earlier token of the whole sequence. Everything else is per token and
needs no communication.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .api import fa3_attention, ring_fa3_attention


@dataclass(frozen=True)
class ModelConfig:
    """The decoder's shape."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"dim ({self.dim}) must split into n_heads ({self.n_heads}) heads of even size")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (S, head_dim/2) of the rotary angles at the given global token positions (S,)."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype) / head_dim)
    angles = positions.to(dtype)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head of x (B, S, H, D) by the angles (S, D/2); keeps x's dtype."""
    first, second = x.to(cos.dtype).chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1).to(x.dtype)


class Attention(nn.Module):
    """Grouped-query causal self-attention over the whole sequence (ring) or only the local shard."""

    def __init__(self, cfg: ModelConfig, *, group: dist.ProcessGroup | None, layout: str, backend: str,
                 shard_only: bool):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.group, self.layout, self.backend, self.shard_only = group, layout, backend, shard_only

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = apply_rope(self.wq(x).view(batch, seq, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        if self.shard_only:
            out = fa3_attention(q, k, v, causal=True, backend=self.backend)
        else:
            out = ring_fa3_attention(q, k, v, causal=True, group=self.group, layout=self.layout,
                                     backend=self.backend)
        return self.wo(out.reshape(batch, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm residual block: attention, then the MLP."""

    def __init__(self, cfg: ModelConfig, **attention_options):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg, **attention_options)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """The decoder: ``forward(tokens (B, S_local), positions (S_local,)) -> logits (B, S_local, vocab)``.

    ``group`` is the sequence-parallel process group (None: the default group) and ``layout`` how
    the sequence is sharded over it. ``shard_only=True`` makes each rank attend only within its
    own shard (an ablation that shows what the ring adds). ``activation_checkpointing`` recomputes
    each block in the backward pass instead of keeping its activations.
    """

    def __init__(self, cfg: ModelConfig, *, group: dist.ProcessGroup | None = None, layout: str = "zigzag",
                 backend: str = "auto", shard_only: bool = False, activation_checkpointing: bool = False):
        super().__init__()
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, group=group, layout=layout, backend=backend, shard_only=shard_only)
                                    for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) weights; the projections into the residual stream scaled by 1/sqrt(2 layers)."""
        for name, param in self.named_parameters():
            if param.dim() == 2:
                std = 0.02 / (2 * self.cfg.n_layers) ** 0.5 if name.endswith(("wo.weight", "w2.weight")) else 0.02
                nn.init.normal_(param, std=std)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        rope_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = rope_angles(positions, self.cfg.head_dim, self.cfg.rope_theta, rope_dtype)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        return self.output(self.norm(x))


def count_parameters(model: nn.Module, *, exclude_embedding: bool = False) -> int:
    """Number of parameters, optionally without the input embedding (a lookup, not a matmul)."""
    return sum(p.numel() for name, p in model.named_parameters()
               if not (exclude_embedding and name.endswith("embed.weight")))
