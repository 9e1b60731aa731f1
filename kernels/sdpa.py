"""PyTorch's own fused attention kernels (cuDNN and FlashAttention-2) as fa3dist backends.

They are called through the aten ops that return the log-sum-exp and whose backward takes an
``out``/``lse`` from outside, so the ring can merge their blocks exactly. K/V keep their H_kv heads
(the kernels share them among query heads); nothing is repeated.
"""

from __future__ import annotations

import functools

import torch

from .checks import check_bwd_inputs, check_qkv

SDPA_DTYPES = (torch.float16, torch.bfloat16)
aten = torch.ops.aten


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, name: str) -> None:
    check_qkv(q, k, v, causal=causal, dtypes=SDPA_DTYPES, max_head_dim=256, head_dim_multiple=8)
    if q.device.type != "cuda":
        raise ValueError(f"backend {name!r} needs CUDA tensors, got q on {q.device}")


def _bhsd(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """(B, S, H, D) -> (B, H, S, D) views, the layout the aten ops take."""
    return [t.transpose(1, 2) for t in tensors]


@functools.cache
def _cudnn_lse_has_trailing_dim(device: torch.device) -> bool:
    """Whether this torch's cuDNN op returns lse as (B, H, S, 1) (torch 2.11) or (B, H, S)."""
    probe = torch.randn(1, 1, 16, 64, device=device, dtype=torch.bfloat16)
    lse = aten._scaled_dot_product_cudnn_attention(probe, probe, probe, None, True, 0.0, False, False)[1]
    return lse.dim() == 4


def cudnn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: float,
              causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN attention forward: out (B, Sq, H, D) and lse fp32 (B, H, Sq)."""
    _check(q, k, v, causal, "cudnn")
    qt, kt, vt = _bhsd(q, k, v)
    res = aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True, 0.0, causal, False,
                                                   scale=softmax_scale)
    batch, seq_q, heads, _ = q.shape
    return res[0].transpose(1, 2), res[1].reshape(batch, heads, seq_q)


def cudnn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              out: torch.Tensor, lse: torch.Tensor, *, softmax_scale: float,
              causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cuDNN attention backward for a given out/lse: dq, dk, dv in (B, S, H, D)."""
    _check(q, k, v, causal, "cudnn")
    check_bwd_inputs(do, q, out, lse)
    dot, qt, kt, vt, outt = _bhsd(do, q, k, v, out)
    lse = lse.float().contiguous()
    if _cudnn_lse_has_trailing_dim(q.device):
        lse = lse.unsqueeze(-1)
    # None for the dropout RNG state, the bias and the varlen offsets: a defined cum_seq tensor
    # would make cuDNN take the inputs for nested (varlen) ones.
    dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
        dot, qt, kt, vt, outt, lse, None, None, None, None, None, q.shape[1], k.shape[1],
        0.0, causal, scale=softmax_scale)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def flash2_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: float,
               causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch SDPA FlashAttention-2 forward: out (B, Sq, H, D) and lse fp32 (B, H, Sq)."""
    _check(q, k, v, causal, "flash2")
    qt, kt, vt = _bhsd(q, k, v)
    res = aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, causal, False, scale=softmax_scale)
    return res[0].transpose(1, 2), res[1]


def flash2_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               out: torch.Tensor, lse: torch.Tensor, *, softmax_scale: float,
               causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch SDPA FlashAttention-2 backward for a given out/lse: dq, dk, dv in (B, S, H, D)."""
    _check(q, k, v, causal, "flash2")
    check_bwd_inputs(do, q, out, lse)
    dot, qt, kt, vt, outt = _bhsd(do, q, k, v, out)
    dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
        dot, qt, kt, vt, outt, lse.float().contiguous(), None, None, q.shape[1], k.shape[1],
        0.0, causal, None, None, scale=softmax_scale)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
