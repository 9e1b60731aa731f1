"""The attention backends, one signature each, and the choice of backend per device."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import fa3, fp8, reference, sdpa

FwdFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
BwdFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Backend:
    """An attention kernel pair.

    ``fwd(q, k, v, *, softmax_scale, causal) -> (out, lse)``;
    ``bwd(do, q, k, v, out, lse, *, softmax_scale, causal) -> (dq, dk, dv)``.
    A backend whose ``fwd`` also takes ``out=, lse=, accumulate=`` (write into given fp32 buffers,
    or merge into the attention they hold) says so with ``fwd_accumulates``; the ring then merges
    inside the kernel instead of in a separate pass.

    A backend whose ``bwd`` also takes ``dq=, dk=, dv=, accumulate=`` says so with
    ``bwd_accumulates``. The buffers are float32 (float64 for float64 inputs), shaped like q, k and
    v (row-slice views allowed). ``bwd`` adds the block's gradients into them (``accumulate=True``)
    or writes them (False), computes only the gradients whose buffers it is given (dk and dv come
    together), and returns (dq, dk, dv) with None for a gradient not asked for. The ring asks for all
    three in one call per step: dQ into its accumulator, dK/dV into a zeroed scratch of the block
    (at step 0 into the new dK/dV accumulator), all with one ``accumulate``.

    A backend whose ``fwd`` also takes float8_e4m3fn q, k, v with ``q_descale=, k_descale=,
    v_descale=`` (float32, (1,) or (B, heads); see ``fp8.quantize_qkv``) says so with ``fp8``; it
    returns the out of those inputs in bfloat16 (the FP8 kernel's) or, unrounded, in float32 (the
    reference), and the lse in float32. FP8 is a forward only: no ``bwd`` takes it.
    ``fwd_accumulates`` holds for its FP8 inputs too (a bf16 or float32 ``out``).
    """

    name: str
    fwd: FwdFn
    bwd: BwdFn
    cuda_only: bool
    fwd_accumulates: bool = False
    bwd_accumulates: bool = False
    fp8: bool = False


def _triton() -> Backend:
    from .triton_bwd import flash_bwd
    from .triton_fwd import flash_fwd

    return Backend("triton", flash_fwd, flash_bwd, cuda_only=False, fwd_accumulates=True, bwd_accumulates=True,
                   fp8=True)


_FACTORIES: dict[str, Callable[[], Backend]] = {
    # fp8.dequantized_fwd: reference_fwd, which also takes FP8 inputs (dequantized, out float32)
    "reference": lambda: Backend("reference", fp8.dequantized_fwd, reference.reference_bwd, cuda_only=False,
                                 bwd_accumulates=True, fp8=True),
    "cudnn": lambda: Backend("cudnn", sdpa.cudnn_fwd, sdpa.cudnn_bwd, cuda_only=True),
    "flash2": lambda: Backend("flash2", sdpa.flash2_fwd, sdpa.flash2_bwd, cuda_only=True),
    "triton": _triton,
    "fa3": lambda: Backend("fa3", fa3.fa3_fwd, fa3.fa3_bwd, cuda_only=True),
}
BACKEND_NAMES = ("auto", *_FACTORIES)


def needs_cuda(name: str) -> bool:
    """Whether backend ``name`` (not "auto") runs only on CUDA tensors."""
    return _FACTORIES[name]().cuda_only


def fp8_backend_names() -> tuple[str, ...]:
    """The backends whose forward takes float8_e4m3fn inputs (``Backend.fp8``)."""
    return tuple(name for name, make in _FACTORIES.items() if make().fp8)


def auto_backend_name(device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> str:
    """The backend "auto" stands for: the fastest one verified for ``device`` and ``dtype``.

    On the CPU: "reference". On CUDA: "fa3" (FlashAttention's own Hopper kernels: 1.02-1.17x cuDNN's
    forward and 0.99-1.15x its backward at 16K tokens on an H200) where it is installed in a tested
    version, the GPU is sm90 and the dtype is fp16 or bf16; else "triton" (ours; it also takes
    float32). For float8_e4m3fn (an FP8 forward): "triton" on CUDA, "reference" on the CPU.
    ``device`` None means CUDA when available.
    """
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if not on_cuda:
        return "reference"
    if dtype == fp8.FP8_DTYPE:
        return "triton"
    if (dtype is None or dtype in fa3.FA3_DTYPES) and fa3.unavailable_reason(device) is None:
        return "fa3"
    return "triton"


def get_backend(name: str = "auto", device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> Backend:
    """Return the backend called ``name``; "auto" resolves through ``auto_backend_name(device, dtype)``.

    A backend that cannot run on ``device``, or (``dtype`` float8_e4m3fn) cannot take FP8 inputs,
    raises a ValueError that says why.
    """
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {', '.join(BACKEND_NAMES)}; got {name!r}")
    if name == "auto":
        name = auto_backend_name(device, dtype)
    backend = _FACTORIES[name]()
    if dtype == fp8.FP8_DTYPE and not backend.fp8:
        raise ValueError(f"backend {name!r} does not take FP8 (float8_e4m3fn) inputs; the backends that do: "
                         f"{', '.join(fp8_backend_names())}")
    if device is not None and backend.cuda_only and torch.device(device).type != "cuda":
        raise ValueError(f"backend {name!r} needs CUDA tensors; got tensors on {device}")
    if name == "fa3":
        reason = fa3.unavailable_reason(device)
        if reason is not None:
            raise fa3.Fa3Unavailable(reason)
    return backend
