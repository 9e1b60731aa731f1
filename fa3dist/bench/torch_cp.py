"""PyTorch's own context parallel (``torch.distributed.tensor.experimental.context_parallel``) as a
peer of the ring: the same problem on the same ranks, timed the same way.

K/V keep their H_kv heads (``enable_gqa=True``; CP sends the heads it is given). Causal runs use
CP's head-tail load balancing (the zigzag layout); non-causal runs turn it off, as torch 2.11
requires.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROTATE_METHODS = ("allgather", "alltoall")


@contextlib.contextmanager
def cp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, *, group: dist.ProcessGroup,
                 causal: bool, rotate: str, sdpa_backend: str = "cudnn",
                 with_backward: bool) -> Iterator[tuple[Callable[[], object], torch.Tensor]]:
    """Shard full (B, H, S, D) tensors with CP and yield (the timed call, this rank's output shard).

    ``q, k, v, do`` are full tensors, the same on every rank; CP cuts them in place.
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import _cp_options, set_rotate_method
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[sdpa_backend]
    mesh = DeviceMesh.from_group(group, "cuda")
    set_rotate_method(rotate)
    previous = _cp_options.enable_load_balance
    _cp_options.enable_load_balance = causal
    gqa = k.shape[1] != q.shape[1]
    try:
        with context_parallel(mesh, buffers=[q, k, v, do], buffer_seq_dims=[2, 2, 2, 2],
                              no_restore_buffers={q, k, v, do}):
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]

            def forward() -> torch.Tensor:
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(*leaves, is_causal=causal, enable_gqa=gqa)

            def step() -> object:
                out = forward()
                if with_backward:
                    torch.autograd.grad(out, leaves, do)
                return out

            yield step, forward().detach()
    finally:
        _cp_options.enable_load_balance = previous
