"""What a launch needs from the machine, checked in the driver before any rank starts.

- ``resolve_launch`` fills in the device and the number of ranks from the GPUs the launcher can use
  (this host's, or the Ray cluster's), and refuses what cannot be honoured: ``cuda`` without a GPU,
  more ranks than GPUs (two ranks on one GPU).
- ``check_backend``: a kernel backend that cannot run on the chosen device.
- ``check_resolved`` runs every check of a config whose device and world size are set.
- ``memory_need`` estimates the peak memory of a job's ranks from the bytes each token costs (and,
  for kernels that hold the whole score matrix, the bytes each query-key pair costs);
  ``check_memory`` refuses a job that cannot fit this host or its GPUs.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from fa3dist.config import ConfigError, LaunchOptions
from fa3dist.kernels import BACKEND_NAMES
from fa3dist.kernels.registry import needs_cuda

Cfg = TypeVar("Cfg", bound=LaunchOptions)
ELEMENT_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def resolve_launch(cfg: Cfg, *, gpus: int, cpu_default: int, where: str = "on this machine") -> Cfg:
    """``cfg`` with ``device`` and ``world_size`` set: one rank per GPU with 2+ GPUs (or one GPU for a
    one-rank job), else ``cpu_default`` CPU processes. ``gpus`` is what the launcher can use, ``where``
    says where they were counted."""
    device, world = cfg.device, cfg.world_size
    if device == "cuda" and gpus == 0:
        raise ConfigError(f"--device cuda: no GPU is visible {where} (use --device cpu for a CPU run)")
    if device == "auto":
        device = "cuda" if gpus >= 2 or (gpus == 1 and world == 1) else "cpu"
    world = world or (gpus if device == "cuda" else cpu_default)
    if device == "cuda" and world > gpus:
        raise ConfigError(f"{world} ranks need {world} GPUs; {gpus} visible {where} (two ranks on one GPU is not "
                          "supported: lower --world-size, or use --device cpu for CPU ranks)")
    return dataclasses.replace(cfg, device=device, world_size=world)


def check_backend(backend: str, device: str) -> None:
    """Raise ConfigError when kernel ``backend`` cannot run on ``device`` ("cuda" or "cpu")."""
    if device != "cpu":
        return
    if backend in BACKEND_NAMES and backend != "auto" and needs_cuda(backend):
        raise ConfigError(f"backend {backend!r} needs CUDA; this run is on the CPU (use backend reference: --backend reference, or --set backend=reference)")
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("backend 'triton' needs CUDA; on a CPU it runs only in Triton's interpreter "
                          "(set TRITON_INTERPRET=1, slow) - use backend reference (--backend reference, or --set backend=reference)")


@dataclass(frozen=True)
class Attention:
    """One attention call's problem: local queries and keys of one rank."""

    batch: int
    seq_q: int
    seq_k: int
    heads: int
    kv_heads: int
    head_dim: int
    elem_bytes: int
    full_scores: bool  # the kernel materialises the (B, H, Sq, Sk) scores (the PyTorch reference)

    def peak_bytes(self) -> int:
        """Forward and backward: q, out, dO, dq and k, v, dk, dv in the input dtype, their fp32
        accumulators, two K/V blocks in flight; plus four score-sized fp32 buffers where the kernel
        materialises the scores."""
        acc = 8 if self.elem_bytes == 8 else 4
        per_query = self.heads * self.head_dim * (4 * self.elem_bytes + 2 * acc) + 2 * self.heads * acc
        per_key = self.kv_heads * self.head_dim * (8 * self.elem_bytes + 4 * acc)
        scores = 4 * self.heads * self.seq_q * self.seq_k * acc if self.full_scores else 0
        return self.batch * (self.seq_q * per_query + self.seq_k * per_key + scores)


def _fmt(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.3g} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def _problem(cfg: Any, device: str, seq_q: int, seq_k: int, dtype: str) -> Attention:
    backend = getattr(cfg, "backend", "auto")
    full_scores = backend == "reference" or (backend == "auto" and device == "cpu")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return Attention(cfg.batch, seq_q, seq_k, cfg.heads, cfg.kv_heads, cfg.head_dim, ELEMENT_BYTES[dtype],
                     full_scores)


def memory_need(cfg: Any, device: str) -> tuple[int, int, str] | None:
    """(bytes the busiest rank needs, bytes all ranks need at once, the problem behind the first)
    for the jobs whose problem is known: the demo, bench scaling and bench ring; None otherwise."""
    from fa3dist.bench.ring import RingBenchConfig
    from fa3dist.bench.scaling import ScalingConfig
    from fa3dist.demo import DemoConfig

    if isinstance(cfg, DemoConfig):
        w, s = cfg.world_size, cfg.seq_len
        ring, single = _problem(cfg, device, s // w, s // w, cfg.dtype), _problem(cfg, device, s, s, cfg.dtype)
        rank0 = ring.peak_bytes() + single.peak_bytes()
        return rank0, rank0 + (w - 1) * ring.peak_bytes(), f"S={s} on one rank (the single-process reference)"
    if isinstance(cfg, ScalingConfig):
        points = ([(cfg.world_size, t * cfg.world_size) for t in cfg.max_context_tokens_per_rank] if cfg.max_context
                  else cfg.points())  # --max-context measures only its own sizes, on every rank
        needs = [(_problem(cfg, device, s // w, s // w, cfg.dtype).peak_bytes(), w, s) for w, s in points]
        per_rank, w, s = max(needs)
        return per_rank, max(b * w for b, w, _ in needs), (f"S={s} on one rank" if w == 1 else f"S={s} over {w} ranks")
    if isinstance(cfg, RingBenchConfig):
        s = cfg.seq_len
        virtual = max((w * _problem(cfg, device, s // w, s // w, cfg.dtype).peak_bytes() for w in cfg.world_sizes),
                      default=0)
        need = _problem(cfg, device, s, s, cfg.dtype).peak_bytes() + virtual
        return need, need, f"S={s} in one call (the monolithic run)"
    return None


def host_memory_bytes() -> int:
    """Memory this process may use: the host's RAM, or its cgroup's limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = Path("/sys/fs/cgroup/memory.max")
    if limit.exists() and limit.read_text().strip().isdigit():
        total = min(total, int(limit.read_text()))
    return total


def check_memory(cfg: Any, device: str, *, ranks_here: int = 1, source: str = "this job") -> None:
    """Raise ConfigError when the estimate of ``memory_need`` does not fit: on the CPU, all
    ``ranks_here`` ranks together against this host's memory; on CUDA, the busiest rank against
    the smallest visible GPU."""
    need = memory_need(cfg, device)
    if need is None:
        return
    per_rank, all_ranks, problem = need
    if device == "cpu":
        have, needed, what = host_memory_bytes(), (all_ranks if ranks_here > 1 else per_rank), "this host has"
        hint = "a CPU run needs a small problem (e.g. configs/scaling_cpu.yaml, configs/bench_ring_cpu.yaml)"
    else:
        if not torch.cuda.is_available():
            return  # the GPUs are elsewhere (a Ray cluster): their memory is not known here
        have = min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
        needed, what, hint = per_rank, "the smallest GPU here has", "use more ranks or fewer tokens"
    if needed > have:
        raise ConfigError(f"{source} does not fit on {device}: {problem} needs about {_fmt(needed)} "
                          f"(estimated from the bytes per token), {what} {_fmt(have)}; {hint}")


def check_resolved(cfg: LaunchOptions, *, ranks_here: int | None, source: str = "this job") -> None:
    """Every check of a config whose device and world size are set: the job's own, the backend
    against the device, and the memory of the ``ranks_here`` ranks on this host (None: the ranks run
    elsewhere, unknown here). Raises ConfigError."""
    try:
        cfg.check_resolved()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if hasattr(cfg, "backend"):
        check_backend(cfg.backend, cfg.device)
    if ranks_here:
        check_memory(cfg, cfg.device, ranks_here=ranks_here, source=source)
