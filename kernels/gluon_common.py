"""What the Gluon kernels (gluon_fwd.py, gluon_bwd.py) share: where they run, their 4-D TMA
descriptors over (B, S, H, D) tensors (and over the (B, H, D, S) V of the FP8 forward), the 2-D view
of a descriptor's tile in shared memory and the wgmma accumulator layout."""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .tma import bhsd_args, tma_strides

_GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16, torch.float32: gl.float32,
              torch.float8_e4m3fn: gl.float8e4nv}


def unsupported_reason(q: torch.Tensor, dtypes: tuple[torch.dtype, ...], head_dims: tuple[int, ...]) -> str | None:
    """Why a Gluon kernel for sm_90 with these dtypes and head dims cannot take ``q`` (None when it can)."""
    if not q.is_cuda:
        return "not a CUDA tensor"
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return "not an sm_90 GPU"
    if q.dtype not in dtypes:
        return f"dtype {q.dtype}"
    if q.shape[-1] not in head_dims:
        return f"head_dim {q.shape[-1]}"
    return None


def bhsd_descriptor(t: torch.Tensor, rows: int, cols: int) -> TensorDescriptor:
    """A TMA descriptor over the (B, H, S, D) view of a (B, S, H, D) tensor, box [1, 1, rows, cols],
    in the default NVMMA (swizzled) shared layout."""
    return _descriptor(*bhsd_args(t), [1, 1, rows, cols])


def bhds_descriptor(t: torch.Tensor, cols: int) -> TensorDescriptor:
    """A TMA descriptor over a (B, H, D, S) tensor (S contiguous), box [1, 1, D, cols]."""
    return _descriptor(t, list(t.shape), tma_strides(t), [1, 1, t.shape[2], cols])


def _descriptor(base: torch.Tensor, shape: list[int], strides: list[int], block: list[int]) -> TensorDescriptor:
    return TensorDescriptor(base, shape, strides, block, _shared_layout(tuple(block), base.dtype))


@functools.cache
def _shared_layout(block: tuple[int, ...], dtype: torch.dtype) -> gl.NVMMASharedLayout:
    """The default NVMMA layout of a TMA box, made once per box and dtype (it costs microseconds per call)."""
    return gl.NVMMASharedLayout.get_default_for(list(block), _GL_DTYPES[dtype])


@triton.constexpr_function
def wgmma_layout(n, k=16):
    """The register layout of a one-warpgroup (4-warp) wgmma accumulator with N = ``n`` columns, for
    operands whose instruction K is ``k`` (16 for 16-bit, 32 for 8-bit types)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, k])


@gluon.jit
def tile_2d(buf):
    """The 2-D [rows, cols] view of a [1, 1, rows, cols] TMA buffer (the 4-D descriptors' box)."""
    return buf.reshape([buf.shape[2], buf.shape[3]])
