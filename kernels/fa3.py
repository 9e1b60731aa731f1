"""FlashAttention's own Hopper kernels (pip ``flash-attn-4``, package ``flash_attn.cute``) as backend "fa3".

Its sm90 path is the FA3 algorithm written in the CuTe DSL and compiled just in time: no CUDA build.
The ring needs two things its public ``flash_attn_func`` does not give: the forward's LSE without
autograd, and a backward that takes an ``out``/``lse`` from outside (the ring's merged ones). Those
are the package's private ``_flash_attn_fwd`` and ``_flash_attn_bwd``, so only the versions listed
in ``TESTED_VERSIONS`` are accepted; any other raises a clear error instead of failing deep inside.

What it cannot do, found by reading the tested version's interface:
- ``out=`` must have q's dtype, so the kernel cannot write or merge into the ring's fp32
  accumulator: the ring merges its blocks in a separate pass (``fwd_accumulates`` is False).
- ``dq=``, ``dk=``, ``dv=`` must have q's dtype too, so each ring step's gradients come back in
  bf16/fp16 and are added to the fp32 accumulators afterwards (``bwd_accumulates`` is False).
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging

import torch

from .checks import check_bwd_inputs, check_qkv, check_scale

log = logging.getLogger("fa3dist.kernels")

TESTED_VERSIONS = ("4.0.0b36",)
DISTRIBUTION = "flash-attn-4"
FA3_DTYPES = (torch.float16, torch.bfloat16)
INSTALL_HINT = "pip install 'fa3dist[fa3]'"


class Fa3Unavailable(ValueError):
    """Backend "fa3" cannot run here; the message says why."""


def _installed_version() -> str | None:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def _interface():
    """The ``flash_attn.cute.interface`` module, after the version check."""
    version = _installed_version()
    if version is None:
        raise Fa3Unavailable(f"backend 'fa3' needs the {DISTRIBUTION} package, which is not installed ({INSTALL_HINT})")
    if version not in TESTED_VERSIONS:
        raise Fa3Unavailable(f"backend 'fa3' calls private functions of {DISTRIBUTION} that were tested with version(s) "
                             f"{', '.join(TESTED_VERSIONS)}; {version} is installed ({INSTALL_HINT})")
    try:
        from flash_attn.cute import interface
    except Exception as err:  # a broken CuTe DSL install shows up here, not at the version check
        raise Fa3Unavailable(f"backend 'fa3': importing flash_attn.cute failed: {err}") from err
    return interface


def unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why backend "fa3" cannot run on ``device`` (None: the current CUDA device), or None if it can."""
    if not torch.cuda.is_available():
        return "backend 'fa3' needs a CUDA GPU; none is available"
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type != "cuda":
        return f"backend 'fa3' needs CUDA tensors; got tensors on {device}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        return f"backend 'fa3' runs FlashAttention's sm90 (Hopper) kernels; this GPU is sm_{major}{minor}"
    try:
        _interface()
    except Fa3Unavailable as err:
        return str(err)
    return None


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    check_qkv(q, k, v, causal=causal, dtypes=FA3_DTYPES, max_head_dim=256, head_dim_multiple=8)
    reason = unavailable_reason(q.device)
    if reason is not None:
        raise Fa3Unavailable(reason)


def fa3_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: float,
            causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """FA3 forward: out (B, Sq, H, D) like q and lse fp32 (B, H, Sq), natural log."""
    _check(q, k, v, causal)
    out, lse = _interface()._flash_attn_fwd(q, k, v, softmax_scale=check_scale(softmax_scale), causal=causal,
                                            return_lse=True)[:2]
    return out, lse


def fa3_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, *, softmax_scale: float,
            causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FA3 backward for a given out/lse (which may come from a larger, merged attention): dq, dk, dv."""
    _check(q, k, v, causal)
    check_bwd_inputs(do, q, out, lse)
    if out.dtype != q.dtype or do.dtype != q.dtype:
        raise TypeError(f"backend 'fa3' needs out and do in q's dtype {q.dtype}; got {out.dtype} and {do.dtype}")
    dq, dk, dv = _interface()._flash_attn_bwd(q, k, v, out, do, lse.float(), softmax_scale=check_scale(softmax_scale),
                                              causal=causal)[:3]
    return dq, dk, dv
