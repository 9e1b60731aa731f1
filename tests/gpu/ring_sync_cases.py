"""Per-rank body of the NCCL ring test without host-device syncs (importable by spawned processes)."""

from __future__ import annotations

import torch

from fa3dist import ring_fa3_attention


def ring_call_syncs(rank: int, world_size: int) -> dict[str, str]:
    """For each backend: "none", or the error ``torch.cuda.set_sync_debug_mode("error")`` raised at a
    host-device sync inside a warmed-up ring fwd+bwd; also the error text of a call where rank 0
    passes another softmax_scale (the ranks-agree check over the gloo side group of an NCCL group)."""
    gen = torch.Generator(device="cuda").manual_seed(rank)
    q, do = (torch.randn(1, 2048, 8, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    k, v = (torch.randn(1, 2048, 2, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    for t in (q, k, v):
        t.requires_grad_()
    results = {}
    from fa3dist.kernels.fa3 import unavailable_reason

    for backend in ("triton", "cudnn", "flash2") + (("fa3",) if unavailable_reason() is None else ()):
        def step():
            ring_fa3_attention(q, k, v, causal=True, backend=backend).backward(do)

        for _ in range(2):  # tuning, communicators and the side group come up here
            step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
            results[backend] = "none"
        except RuntimeError as err:
            results[backend] = str(err)[:500]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    try:
        ring_fa3_attention(q, k, v, softmax_scale=0.5 if rank == 0 else 0.25)
        results["disagree"] = "no error"
    except ValueError as err:
        results["disagree"] = str(err)
    return results
