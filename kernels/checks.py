"""Input checks shared by every attention backend and the public API.

Each failed check raises a ValueError or TypeError that names the argument and says what was
expected, so a user sees the problem at the call instead of deep inside a kernel.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
              dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES, max_head_dim: int | None = None,
              head_dim_multiple: int = 1) -> None:
    """Check q (B, Sq, H, D) and k, v (B, Sk, H_kv, D) for one attention call.

    ``dtypes`` lists the dtypes the caller supports; ``max_head_dim`` and ``head_dim_multiple``
    bound D where a kernel needs it.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, seq, heads, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in dtypes:
            allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} has dtype {t.dtype}; expected one of: {allowed}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    batch, seq_q, heads, head_dim = q.shape
    if k.shape[0] != batch:
        raise ValueError(f"k has batch size {k.shape[0]}; expected q's batch size {batch}")
    if k.shape[3] != head_dim:
        raise ValueError(f"k and v have head_dim {k.shape[3]}; expected q's head_dim {head_dim}")
    kv_heads = k.shape[2]
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"q's heads ({heads}) must be a multiple of k/v's heads ({kv_heads})")
    if head_dim == 0 or head_dim % head_dim_multiple != 0:
        raise ValueError(f"head_dim is {head_dim}; expected a positive multiple of {head_dim_multiple}")
    if max_head_dim is not None and head_dim > max_head_dim:
        raise ValueError(f"head_dim is {head_dim}; this backend supports at most {max_head_dim}")
    if causal and seq_q != k.shape[1]:
        raise ValueError(f"causal attention needs equal query and key lengths, got {seq_q} and {k.shape[1]}")


def resolve_scale(softmax_scale: float | None, head_dim: int) -> float:
    """Return ``softmax_scale``, or 1/sqrt(head_dim) when it is None, after checking it."""
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else check_scale(softmax_scale)


def check_scale(softmax_scale: float) -> float:
    """``softmax_scale`` as a float, after checking that it is a positive finite number."""
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale}")
    return float(softmax_scale)


def check_bwd_inputs(do: torch.Tensor, q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Check the extra backward inputs: dO and out shaped like q, lse (B, H, Sq)."""
    for name, t in (("do", do), ("out", out)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}; expected q's device {q.device}")
    if not isinstance(lse, torch.Tensor):
        raise TypeError(f"lse must be a torch.Tensor, got {type(lse).__name__}")
    batch, seq_q, heads, _ = q.shape
    if tuple(lse.shape) != (batch, heads, seq_q):
        raise ValueError(f"lse must have shape (B, H, Sq) = {(batch, heads, seq_q)}, got {tuple(lse.shape)}")
    if lse.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"lse must be float32 (or float64), got {lse.dtype}")
