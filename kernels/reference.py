"""Reference attention in PyTorch math: the CPU path and the test oracle.

Computes in float32 (float64 for float64 inputs). GQA/MQA share each K/V head among its group of
query heads through a view, without repeating K/V. The backward honours an ``out``/``lse`` that
came from outside the call (for example the ring's merged result), as FlashAttention does.
"""

from __future__ import annotations

import torch

from .checks import check_bwd_inputs, check_qkv


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(q: torch.Tensor, kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """View (B, S, H, D) as (B, S, H_kv, G, D) in the accumulation dtype."""
    batch, seq, heads, head_dim = q.shape
    return q.to(dtype).reshape(batch, seq, kv_heads, heads // kv_heads, head_dim)


def _probabilities(qg: torch.Tensor, kf: torch.Tensor, softmax_scale: float, causal: bool,
                   lse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities (B, H_kv, G, Sq, Sk) and the LSE (B, H_kv, G, Sq).

    With ``lse`` given, P = exp(S - lse) uses it instead of the row's own normaliser.
    A row with no visible key has lse = -inf and P = 0.
    """
    scores = torch.einsum("bqhgd,bkhd->bhgqk", qg, kf) * softmax_scale
    if causal:
        seq_q, seq_k = scores.shape[-2:]
        hidden = torch.ones(seq_q, seq_k, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(scores, dim=-1)
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return torch.exp(scores - finite_lse.unsqueeze(-1)), lse


def reference_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: float,
                  causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention forward: returns out (like q) and lse (B, H, Sq), natural log."""
    check_qkv(q, k, v, causal=causal)
    batch, seq_q, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    acc = _acc_dtype(q.dtype)
    qg = _grouped(q, kv_heads, acc)
    p, lse = _probabilities(qg, k.to(acc), softmax_scale, causal, None)
    out = torch.einsum("bhgqk,bkhd->bqhgd", p, v.to(acc))
    return out.reshape(batch, seq_q, heads, head_dim).to(q.dtype), lse.reshape(batch, heads, seq_q)


def _check_grad_buffers(q: torch.Tensor, k: torch.Tensor, dq: torch.Tensor | None, dk: torch.Tensor | None,
                        dv: torch.Tensor | None) -> None:
    if (dk is None) != (dv is None):
        raise ValueError("dk and dv must be given together")
    for name, buf, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, k)):
        if buf is None:
            continue
        if not isinstance(buf, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(buf).__name__}")
        if buf.shape != like.shape:
            raise ValueError(f"{name} must have shape {tuple(like.shape)}, got {tuple(buf.shape)}")
        if buf.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} must be float32 or float64, got {buf.dtype}")
        if buf.device != q.device:
            raise ValueError(f"{name} is on {buf.device}; expected q's device {q.device}")


def _store(grad: torch.Tensor, buf: torch.Tensor | None, accumulate: bool, dtype: torch.dtype) -> torch.Tensor:
    """``grad`` added into (or written to) ``buf``, or without a buffer converted to ``dtype``."""
    if buf is None:
        return grad.to(dtype)
    return buf.add_(grad) if accumulate else buf.copy_(grad)


def reference_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, *, softmax_scale: float, causal: bool,
                  dq: torch.Tensor | None = None, dk: torch.Tensor | None = None, dv: torch.Tensor | None = None,
                  accumulate: bool = False):
    """Attention backward for a given out/lse: returns dq, dk, dv in the inputs' dtypes.

    With buffers (``dq``, and ``dk`` with ``dv``: float32/float64, shaped like q, k, v, views
    allowed) only the gradients given are computed; they are added into the buffers
    (``accumulate=True``) or written there, and (dq, dk, dv) is returned with None for a gradient
    not asked for.
    """
    check_qkv(q, k, v, causal=causal)
    check_bwd_inputs(do, q, out, lse)
    into_buffers = dq is not None or dk is not None or dv is not None
    if into_buffers:
        _check_grad_buffers(q, k, dq, dk, dv)
    want_dq, want_dkv = (dq is not None, dk is not None) if into_buffers else (True, True)
    batch, seq_q, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    acc = _acc_dtype(q.dtype)
    qg, dog, outg = (_grouped(t, kv_heads, acc) for t in (q, do, out))
    kf, vf = k.to(acc), v.to(acc)
    lse_g = lse.to(acc).reshape(batch, kv_heads, heads // kv_heads, seq_q)
    p, _ = _probabilities(qg, kf, softmax_scale, causal, lse_g)
    dp = torch.einsum("bqhgd,bkhd->bhgqk", dog, vf)
    delta = (dog * outg).sum(-1).permute(0, 2, 3, 1)  # (B, H_kv, G, Sq)
    ds = p * (dp - delta.unsqueeze(-1))
    grads = [None, None, None]
    if want_dq:
        grad_q = torch.einsum("bhgqk,bkhd->bqhgd", ds, kf).reshape(q.shape) * softmax_scale
        grads[0] = _store(grad_q, dq, accumulate, q.dtype)
    if want_dkv:
        grads[1] = _store(torch.einsum("bhgqk,bqhgd->bkhd", ds, qg) * softmax_scale, dk, accumulate, k.dtype)
        grads[2] = _store(torch.einsum("bhgqk,bqhgd->bkhd", p, dog), dv, accumulate, v.dtype)
    return tuple(grads)
