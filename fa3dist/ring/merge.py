"""Exact merging of attention blocks through their log-sum-exp."""

from __future__ import annotations

import torch


def merge_block_(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor, *,
                 into: torch.Tensor | None = None) -> None:
    """Fold a block's (out_b, lse_b) into the running (out, lse), in place.

    out, out_b: (B, S, H, D); lse, lse_b: (B, H, S); out and lse hold the accumulation dtype
    (float32 or float64); row-slice views are fine. Implements
    ``out -= sigmoid(lse_b - lse) * (out - out_b)`` and ``lse = logaddexp(lse, lse_b)``.
    A row that has seen no key has lse = -inf; merging another empty row keeps it empty (no NaN).
    With ``into`` (shaped like out, any float dtype, e.g. the caller's) the merged output is written
    there instead of back into ``out``, which saves a separate conversion pass after the last merge.

    On CUDA with float32 accumulators this is one Triton pass (``merge_triton``); elsewhere
    (CPU, float64) a few PyTorch passes.
    """
    if out.is_cuda and out.dtype == torch.float32 and lse.dtype == torch.float32:
        from .merge_triton import merge_block_triton_

        merge_block_triton_(out, lse, out_b, lse_b, into=into)
    else:
        merge_block_torch_(out, lse, out_b, lse_b, into=into)


def merge_block_torch_(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor, *,
                       into: torch.Tensor | None = None) -> None:
    """``merge_block_`` in PyTorch operations (any device and float dtype)."""
    diff = torch.nan_to_num(lse_b - lse, nan=float("-inf"))  # -inf - -inf: nothing to add
    weight = torch.sigmoid(diff).transpose(1, 2).unsqueeze(-1)
    out.lerp_(out_b.to(out.dtype), weight)  # out + weight * (out_b - out); lerp needs one dtype
    if into is not None:
        into.copy_(out)
    lse.copy_(torch.logaddexp(lse, lse_b))
