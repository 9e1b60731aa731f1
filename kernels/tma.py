"""Tensor-descriptor (TMA) helpers shared by the Triton forward and backward kernels."""

from __future__ import annotations

import logging

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

log = logging.getLogger("fa3dist.kernels")


def block_d(head_dim: int) -> int:
    """D rounded up to a power of two, at least 16 (the smallest tl.dot size); TMA zero-fills the rest."""
    return max(16, triton.next_power_of_2(head_dim))


def tma_addressable(t: torch.Tensor) -> bool:
    """Whether TMA can address ``t``: 16-byte aligned base and strides (of dims longer than 1),
    unit last stride."""
    elem = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(s * elem % 16 == 0 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1))


def tma_ready(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when TMA can address it, else an aligned contiguous copy (a performance fallback)."""
    if tma_addressable(t):
        return t
    log.debug("copying a %s tensor with strides %s for TMA", tuple(t.shape), t.stride())
    return t.clone(memory_format=torch.contiguous_format)


def bhsd_args(t: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
    """A (B, S, H, D) tensor as a descriptor over its (B, H, S, D) view takes it: the tensor itself (a
    descriptor reads only its address and dtype), the (B, H, S, D) shape, and TMA-ready strides.

    TMA takes the strides in any order. A size-1 dim's stride never addresses memory, so it is
    replaced by an aligned one whatever torch reports. No view is made: this runs on every kernel call.
    """
    batch, seq, heads, dim = t.shape
    s_b, s_s, s_h, s_d = t.stride()
    return t, [batch, heads, seq, dim], _aligned_strides([batch, heads, seq, dim], [s_b, s_h, s_s, s_d])


def tma_strides(t: torch.Tensor) -> list[int]:
    """``t``'s strides, with those of size-1 dims (which never address memory) made aligned ones."""
    return _aligned_strides(list(t.shape), list(t.stride()))


def _aligned_strides(shape: list[int], strides: list[int]) -> list[int]:
    for dim in range(len(shape) - 2, -1, -1):
        if shape[dim] == 1:
            strides[dim] = strides[dim + 1] * shape[dim + 1]
    return strides


def descriptor(t: torch.Tensor, block_rows: int, block_dim: int) -> TensorDescriptor:
    """A descriptor over the (B, H, S, D) view of a (B, S, H, D) tensor, block [1, 1, rows, D].

    With the two unit dims leading, the loaded tile is a plain matrix: Triton keeps Q in shared
    memory for the tensor-core MMA instead of copying it to registers (as a [1, rows, 1, D] block
    would).
    """
    return TensorDescriptor(*bhsd_args(t), [1, 1, block_rows, block_dim])
