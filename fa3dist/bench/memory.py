"""Peak memory of one call: the CUDA allocator's peak on a GPU, live tensor storage on the CPU.

Both count the call's inputs and everything the call allocates (temporaries, outputs, gradients),
and nothing else that was alive before the call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _LiveStorage(TorchDispatchMode):
    """Tracks the tensor storages made by the operations run under it (plus the ones registered),
    and the largest total of those alive after any operation."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        for t in tensors:
            self._add(t)
        self.peak = self._total()

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        ref = StorageWeakRef(storage)
        if ref.cdata not in self._live or self._live[ref.cdata][0].expired():
            self._live[ref.cdata] = (ref, storage.nbytes())

    def _total(self) -> int:
        self._live = {key: (ref, size) for key, (ref, size) in self._live.items() if not ref.expired()}
        return sum(size for _, size in self._live.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in tree_leaves(result):
            if isinstance(t, torch.Tensor):
                self._add(t)
        self.peak = max(self.peak, self._total())
        return result


def peak_bytes(fn: Callable[[], Any], inputs: Sequence[torch.Tensor]) -> int:
    """Peak bytes while ``fn()`` runs: ``inputs`` plus all that the call allocates.

    On CUDA (``inputs[0]`` on a GPU) the caching allocator's peak over the call, less what was
    allocated before it other than the inputs; elsewhere the largest total of live tensor storage
    seen after any operation of the call. Gradients already held by ``inputs`` are dropped first,
    so that the call's own gradients count.
    """
    for t in inputs:
        t.grad = None
    if inputs[0].is_cuda:
        torch.cuda.synchronize()
        held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in inputs}
        before = torch.cuda.memory_allocated() - sum(held.values())
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with _LiveStorage(inputs) as tracker:
        fn()
    return tracker.peak
