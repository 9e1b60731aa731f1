"""The default job: ring attention over several ranks, checked against one process.

Every rank draws the same full random q, k, v and dO (one seed), takes its shard, runs
``ring_fa3_attention`` forward and backward, and the shards of out, dq, dk and dv are gathered.
Rank 0 runs ``fa3_attention`` over the whole sequence with the same backend and reports the
relative error of each, and the time of both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from .api import fa3_attention, ring_fa3_attention
from .config import LaunchOptions, check_choices
from .kernels import BACKEND_NAMES
from .kernels.numerics import relative_error
from .layout import num_chunks, shard_sequence, unshard_sequence
from .ring.schedule import LAYOUTS

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
# Largest relative error between the ring and one process that still counts as a match.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@dataclass
class DemoConfig(LaunchOptions):
    """What ``fa3dist demo`` runs."""

    batch: int = 1
    seq_len: int = 1024
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 64
    layout: str = "zigzag"
    causal: bool = True
    backend: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    seed: int = 0

    def check(self) -> None:
        super().check()
        for key in ("batch", "seq_len", "heads", "kv_heads", "head_dim"):
            if getattr(self, key) < 1:
                raise ValueError(f"key {key!r} must be at least 1, got {getattr(self, key)}")
        check_choices(self, {"layout": LAYOUTS, "backend": BACKEND_NAMES, "dtype": ["auto", *DTYPES]})
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    def check_resolved(self) -> None:
        parts = num_chunks(self.world_size, self.layout)
        if self.seq_len % parts:
            raise ValueError(f"seq_len {self.seq_len} does not split into {parts} equal chunks "
                             f"(layout {self.layout}, world_size {self.world_size})")

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]


def _format_table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def demo_summary(result: dict[str, Any]) -> tuple[str, int]:
    """The demo's table and verdict, and its exit code (1 on a mismatch)."""
    errs = result["errors"]
    table = _format_table(
        ["world_size", "layout", "causal", "dtype", "err out", "err dq", "err dk", "err dv", "max rel err",
         "ring s", "1-proc s"],
        [[result["world_size"], result["layout"], result["causal"], result["dtype"], errs["out"], errs["dq"],
          errs["dk"], errs["dv"], result["max_rel_error"], result["ring_s"], result["single_s"]]])
    verdict = "match" if result["ok"] else "MISMATCH"
    return (f"{table}\n{verdict}: max relative error {result['max_rel_error']:.3g} "
            f"(tolerance {result['tolerance']:.0e})"), 0 if result["ok"] else 1


def _timed(fn) -> tuple[Any, float]:
    """Run ``fn`` once to warm up, then once timed (seconds, synchronised)."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def run_demo(cfg: DemoConfig, ctx) -> dict[str, Any]:
    """One rank of the demo; rank 0's result holds the comparison."""
    dtype = cfg.torch_dtype(ctx.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    shape_q = (cfg.batch, cfg.seq_len, cfg.heads, cfg.head_dim)
    shape_kv = (cfg.batch, cfg.seq_len, cfg.kv_heads, cfg.head_dim)
    full = {name: torch.randn(shape, generator=gen, dtype=torch.float32).to(ctx.device, dtype)
            for name, shape in (("q", shape_q), ("k", shape_kv), ("v", shape_kv), ("do", shape_q))}

    def shard(x: torch.Tensor) -> torch.Tensor:
        return shard_sequence(x, world_size=ctx.world_size, rank=ctx.rank, layout=cfg.layout)

    def ring_pass() -> list[torch.Tensor]:
        q, k, v = (shard(full[n]).requires_grad_() for n in ("q", "k", "v"))
        out = ring_fa3_attention(q, k, v, causal=cfg.causal, layout=cfg.layout, backend=cfg.backend)
        out.backward(shard(full["do"]))
        return [out.detach(), q.grad, k.grad, v.grad]

    ctx.progress("inputs drawn")
    ring_results, ring_s = _timed(ring_pass)
    ctx.progress("ring forward and backward")
    gathered = [unshard_sequence(t, layout=cfg.layout) for t in ring_results]
    ctx.progress("shards gathered")
    result: dict[str, Any] = {"world_size": ctx.world_size, "layout": cfg.layout, "causal": cfg.causal,
                              "backend": cfg.backend, "dtype": str(dtype).replace("torch.", ""),
                              "device": str(ctx.device.type), "seq_len": cfg.seq_len, "heads": cfg.heads,
                              "kv_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "ring_s": ring_s}
    if ctx.rank != 0:
        return result

    def single_pass() -> list[torch.Tensor]:
        q, k, v = (full[n].clone().requires_grad_() for n in ("q", "k", "v"))
        out = fa3_attention(q, k, v, causal=cfg.causal, backend=cfg.backend)
        out.backward(full["do"])
        return [out.detach(), q.grad, k.grad, v.grad]

    single_results, single_s = _timed(single_pass)
    errors = {name: relative_error(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), gathered, single_results)}
    max_error = max(errors.values())
    result.update(single_s=single_s, errors=errors, max_rel_error=max_error, tolerance=TOLERANCE[dtype],
                  ok=max_error <= TOLERANCE[dtype])
    return result
