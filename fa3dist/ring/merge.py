"""Exact merging of attention blocks through their log-sum-exp."""

from __future__ import annotations

import torch


def merge_block_(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """Fold a block's (out_b, lse_b) into the running (out, lse), in place.

    out, out_b: (B, S, H, D); lse, lse_b: (B, H, S); out and lse hold the accumulation dtype
    (float32 or float64). Implements
    ``out -= sigmoid(lse_b - lse) * (out - out_b)`` and ``lse = logaddexp(lse, lse_b)``.
    A row that has seen no key has lse = -inf; merging another empty row keeps it empty (no NaN).
    """
    diff = torch.nan_to_num(lse_b - lse, nan=float("-inf"))  # -inf - -inf: nothing to add
    weight = torch.sigmoid(diff).transpose(1, 2).unsqueeze(-1)
    # out + weight * (out_b - out) in one pass over out (lerp needs out_b in out's dtype)
    out.lerp_(out_b.to(out.dtype), weight)
    lse.copy_(torch.logaddexp(lse, lse_b))
