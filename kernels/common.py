"""What every attention kernel path shares: the interpreter flag, log-base constants, device checks
and the ``FA3DIST_KERNEL`` override with the record of which path each call took.

The ``tl`` kernels (triton_fwd.py, triton_bwd.py) and the Gluon kernels import these instead of
keeping their own copies. Tuning (configs, keys, the on-disk cache) lives in autotune.py.
"""

from __future__ import annotations

import functools
import logging
import math
import os

import torch
import triton
import triton.language as tl

log = logging.getLogger("fa3dist.kernels")

# Whether kernels run in Triton's interpreter (TRITON_INTERPRET=1): fixed when they are decorated,
# which is when this package is imported.
INTERPRET: bool = bool(triton.knobs.runtime.interpret)

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# The same constants for use inside @triton.jit (and Gluon) functions, which only read constexpr globals.
TL_LOG2E: tl.constexpr = tl.constexpr(LOG2E)
TL_LN2: tl.constexpr = tl.constexpr(LN2)

SMEM_BYTES = 227 * 1024  # shared memory one block may use on H100/H200

KERNEL_PATHS = ("auto", "gluon", "tl")
_TAKEN: set[tuple[str, str]] = set()


def kernel_path() -> str:
    """The kernel path ``FA3DIST_KERNEL`` asks for: "auto" (unset or empty), "gluon" or "tl".

    Read at every call, so a process can switch paths; an unknown value raises ValueError.
    """
    value = os.environ.get("FA3DIST_KERNEL", "").strip().lower() or "auto"
    if value not in KERNEL_PATHS:
        raise ValueError(f"FA3DIST_KERNEL must be one of {', '.join(KERNEL_PATHS)} (or unset); "
                         f"got {os.environ['FA3DIST_KERNEL']!r}")
    return value


def note_path(op: str, path: str, detail: str, *args: object) -> None:
    """Record that ``op`` (e.g. "flash_fwd") ran on ``path`` and log it at debug level
    ("flash_fwd path=tl " followed by ``detail % args``)."""
    _TAKEN.add((op, path))
    log.debug("%s path=%s " + detail, op, path, *args)


@functools.cache
def warn_once(message: str) -> None:
    """Log ``message`` as a warning the first time only."""
    log.warning(message)


def paths_taken() -> dict[str, list[str]]:
    """The paths each op has taken in this process so far, e.g. {"flash_fwd": ["tl"]}."""
    taken: dict[str, list[str]] = {}
    for op, path in sorted(_TAKEN):
        taken.setdefault(op, []).append(path)
    return taken


def check_device(q: torch.Tensor, op: str) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter."""
    if not q.is_cuda and not INTERPRET:
        raise ValueError(f"{op} needs CUDA tensors (or TRITON_INTERPRET=1 set before import), got {q.device}")


def uses_small_config(q: torch.Tensor) -> bool:
    """Whether a call runs its kernel's one small fixed config instead of a tuned one: in the
    interpreter, on CPU tensors and in float32."""
    return INTERPRET or not q.is_cuda or q.dtype == torch.float32


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for tl.dot: exact float32 products for float32 inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the grid of persistent kernels)."""
    return torch.cuda.get_device_properties(device).multi_processor_count
