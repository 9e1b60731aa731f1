"""The attention implementations a benchmark compares, each as ``forward(q, k, v) -> out``.

Inputs arrive in fa3dist's (B, S, H, D) layout; each peer gets its own preferred layout
(contiguous (B, H, S, D) for PyTorch SDPA and FlexAttention), made once outside the timed call.
All run with autograd, so timing the forward includes saving the LSE, and the backward is
``torch.autograd.grad`` of that forward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fa3dist.api import fa3_attention

IMPLS = ("fa3dist", "fa3", "cudnn", "flash2", "flex")


def unavailable_reason(impl: str, device: torch.device) -> str | None:
    """Why peer ``impl`` cannot run on ``device`` here, or None."""
    if impl == "fa3":
        from fa3dist.kernels.fa3 import unavailable_reason as fa3_reason

        return fa3_reason(device)
    return None


@dataclass
class Prepared:
    """Inputs in the implementation's layout (leaves that require grad) and its forward."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    forward: Callable[[], torch.Tensor]
    to_bshd: Callable[[torch.Tensor], torch.Tensor]  # the output (or a gradient) back in (B, S, H, D)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _causal_block_mask(seq: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, seq, seq, device=device)


def prepare(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool) -> Prepared:
    """Set up ``impl`` on copies of (B, S, H, D) inputs."""
    gqa = k.shape[2] != q.shape[2]
    if impl == "fa3dist":
        ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
        return Prepared(ql, kl, vl, lambda: fa3_attention(ql, kl, vl, causal=causal, backend="triton"),
                        lambda t: t)
    ql, kl, vl = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))

    def to_bshd(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2)

    if impl == "fa3":  # FlashAttention's own Hopper kernels through their public autograd function
        from flash_attn.cute import flash_attn_func

        ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
        return Prepared(ql, kl, vl, lambda: flash_attn_func(ql, kl, vl, causal=causal)[0], lambda t: t)
    if impl in ("cudnn", "flash2"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        choice = SDPBackend.CUDNN_ATTENTION if impl == "cudnn" else SDPBackend.FLASH_ATTENTION

        def forward() -> torch.Tensor:
            with sdpa_kernel(choice):
                return F.scaled_dot_product_attention(ql, kl, vl, is_causal=causal, enable_gqa=gqa)

        return Prepared(ql, kl, vl, forward, to_bshd)
    if impl == "flex":
        flex = _compiled_flex()
        mask = _causal_block_mask(q.shape[1], q.device) if causal else None
        return Prepared(ql, kl, vl, lambda: flex(ql, kl, vl, block_mask=mask, enable_gqa=gqa, return_lse=True)[0],
                        to_bshd)
    raise ValueError(f"impl must be one of {', '.join(IMPLS)}; got {impl!r}")
