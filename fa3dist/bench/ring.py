"""``fa3dist bench ring``: the ring scheduler's overhead on one GPU.

For W virtual ranks it runs the ring's exact per-step schedule — the same kernel calls on the same
zigzag blocks, the same merges and backward accumulations in the same order — with K/V handed over
in memory instead of over NCCL, against one kernel call over the whole sequence. The GPU runs all
virtual ranks' work one after another, so the ratio of the two times is the cost of the
decomposition itself. Pass "fp8" is the FP8 forward (``ring_fa3_attention(fp8=True)``: each rank
quantizes its shard, K/V travel in e4m3), timed with its quantization, against the single-device
FP8 forward.

The ranks first run as threads of this process (``fa3dist.ring.ThreadRing``), which checks the
result against the one call and records what every rank received (``RecordingRing``). The timed
runs replay the ranks one after another from one thread (``ReplayRing``): W Python threads issuing
kernels at once spend their time handing the interpreter lock round (at W = 8 and 4K-token ranks
the threads took 2.3x the host time per step of the same calls from one thread), which a real ring,
one process per GPU, never pays; one rank's own host cost per step stays in. Each row also has the
threads' time (``threads_ms``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from fa3dist.config import check_choices
from fa3dist.kernels import BACKEND_NAMES, get_backend
from fa3dist.kernels.checks import resolve_scale
from fa3dist.kernels.numerics import relative_error
from fa3dist.layout import shard_sequence
from fa3dist.ring import LoopbackRing, RecordingRing, ReplayRing, ring_backward, ring_forward, run_thread_ring
from fa3dist.ring.ring import ring_forward_fp8
from fa3dist.ring.schedule import LAYOUTS

from .common import (DTYPES, Checkpoint, attention_flops, gpu_tag, markdown_table, run_meta, time_ms_events,
                     write_results)

log = logging.getLogger("fa3dist.bench")


@dataclass
class RingBenchConfig:
    """What ``fa3dist bench ring`` measures."""

    seq_len: int = 131072
    batch: int = 1
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "bfloat16"
    causal: bool = True
    layout: str = "zigzag"
    world_sizes: list[int] = field(default_factory=lambda: [2, 4, 8])
    passes: list[str] = field(default_factory=lambda: ["fwd", "fwd+bwd"])  # also "fp8": the FP8 forward
    backend: str = "auto"
    device: str = "cuda"  # cpu runs the same schedule with the reference backend (for tests)
    seed: int = 0

    def check(self) -> None:
        check_choices(self, {"device": ("cuda", "cpu"), "dtype": DTYPES, "layout": LAYOUTS,
                             "backend": BACKEND_NAMES, "passes": ("fwd", "fwd+bwd", "fp8")})
        for w in self.world_sizes:
            chunks = 2 * w if self.layout == "zigzag" else w
            if w < 1 or self.seq_len % chunks:
                raise ValueError(f"key 'world_sizes': seq_len {self.seq_len} does not split into {chunks} chunks")


def _schedule(q, k, v, do, ring, *, backends, scale, cfg, pass_: str) -> list[torch.Tensor]:
    """One rank's ring forward (and backward, or the FP8 forward): the exact calls ``ring_fa3_attention`` makes."""
    opts = dict(backend=backends[pass_ == "fp8"], softmax_scale=scale, causal=cfg.causal, layout=cfg.layout)
    if pass_ == "fp8":
        return [ring_forward_fp8(q, k, v, ring, **opts)[0]]
    out, lse = ring_forward(q, k, v, ring, **opts)
    if pass_ == "fwd":
        return [out]
    return [out, *ring_backward(do, q, k, v, out, lse, ring, **opts)]


def run_ring_bench(cfg: RingBenchConfig, checkpoint: Checkpoint | None = None
                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Measure the monolithic call and every virtual world size; return (meta, rows).
    ``checkpoint(rows)`` runs after each measurement."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench ring on cuda needs a CUDA GPU (for a CPU smoke run use "
                           "configs/bench_ring_cpu.yaml: the default problem needs terabytes on a CPU)")
    dtype = DTYPES[cfg.dtype]
    backend = get_backend(cfg.backend, cfg.device, dtype)
    backends = (backend, get_backend(cfg.backend, cfg.device, torch.float8_e4m3fn) if "fp8" in cfg.passes else None)
    scale = resolve_scale(None, cfg.head_dim)
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    shape_q = (cfg.batch, cfg.seq_len, cfg.heads, cfg.head_dim)
    shape_kv = (cfg.batch, cfg.seq_len, cfg.kv_heads, cfg.head_dim)
    q, do = (torch.randn(shape_q, device=cfg.device, dtype=dtype, generator=gen) for _ in range(2))
    k, v = (torch.randn(shape_kv, device=cfg.device, dtype=dtype, generator=gen) for _ in range(2))
    base = {"impl": "fa3dist", "dtype": cfg.dtype, "B": cfg.batch, "H": cfg.heads, "Hkv": cfg.kv_heads,
            "S": cfg.seq_len, "D": cfg.head_dim, "causal": cfg.causal, "layout": cfg.layout, "backend": backend.name}
    rows: list[dict[str, Any]] = []
    steps = [(w, p) for p in cfg.passes for w in [1, *cfg.world_sizes]]
    monolithic: dict[str, tuple[float, list[torch.Tensor]]] = {}
    for world_size, pass_ in tqdm(steps, desc="bench ring", unit="run"):
        if world_size == 1:
            def run() -> list[torch.Tensor]:
                return _schedule(q, k, v, do, LoopbackRing(0, 1), backends=backends, scale=scale, cfg=cfg,
                                 pass_=pass_)
        else:
            shards = [[shard_sequence(t, world_size=world_size, rank=r, layout=cfg.layout).contiguous()
                       for t in (q, k, v, do)] for r in range(world_size)]
            for r in (0, world_size - 1):  # tune the kernels on every block shape before threads share the GPU
                _schedule(*shards[r], LoopbackRing(r, world_size), backends=backends, scale=scale, cfg=cfg,
                          pass_=pass_)

            recordings: list[RecordingRing | None] = [None] * world_size

            def threads() -> list[list[torch.Tensor]]:
                def rank_run(ring) -> list[torch.Tensor]:
                    recordings[ring.rank] = RecordingRing(ring)
                    return _schedule(*shards[ring.rank], recordings[ring.rank], backends=backends, scale=scale,
                                     cfg=cfg, pass_=pass_)
                return run_thread_ring(rank_run, world_size)

            def run() -> list[list[torch.Tensor]]:  # the ranks replayed one after another
                return [_schedule(*shards[r], ReplayRing(r, world_size, recordings[r].received), backends=backends,
                                  scale=scale, cfg=cfg, pass_=pass_) for r in range(world_size)]
        results = run() if world_size == 1 else threads()
        if world_size == 1:
            monolithic[pass_] = (0.0, results)
            error = 0.0
        else:
            want = monolithic[pass_][1]
            error = max(relative_error(results[r][i], shard_sequence(want[i], world_size=world_size, rank=r,
                                                                     layout=cfg.layout))
                        for r in range(world_size) for i in range(len(want)))
        del results
        ms = time_ms_events(run)
        threads_ms = ms if world_size == 1 else time_ms_events(threads)
        flops = attention_flops(cfg.batch, cfg.heads, cfg.seq_len, cfg.head_dim, cfg.causal,
                                "fwd" if pass_ == "fp8" else pass_)
        if world_size == 1:
            monolithic[pass_] = (ms, monolithic[pass_][1])
        rows.append({**base, "pass": pass_, "world_size": world_size, "virtual": world_size > 1, "ms": ms,
                     "tflops": flops / ms / 1e9, "ratio_to_monolithic": monolithic[pass_][0] / ms,
                     "threads_ms": threads_ms, "threads_ratio": monolithic[pass_][0] / threads_ms,
                     "rel_err_vs_monolithic": error})
        log.info("ring bench %s", rows[-1])
        if checkpoint is not None:
            checkpoint(rows)
    return run_meta(1), rows


def ring_markdown(rows: list[dict[str, Any]]) -> str:
    table = [[r["pass"], r["world_size"], "yes" if r["virtual"] else "no (one call)", r["ms"], r["tflops"],
              r["ratio_to_monolithic"], r["threads_ratio"], r["rel_err_vs_monolithic"]] for r in rows]
    r0 = rows[0]
    title = (f"Ring schedule on one GPU: S={r0['S']}, B={r0['B']}, H={r0['H']}, H_kv={r0['Hkv']}, D={r0['D']}, "
             f"{r0['dtype']}, causal={r0['causal']}, {r0['layout']}, backend {r0['backend']}")
    return title + "\n\n" + markdown_table(
        ["pass", "W", "virtual ranks", "ms", "TFLOP/s", "monolithic / ring", "same, ranks as threads",
         "rel. error vs monolithic"], table)


def write_ring_results(cfg: RingBenchConfig, out_dir: str, plot: bool) -> list[str]:
    """Run the bench and write JSON, Markdown (and PNG); return the paths written. The JSON and Markdown
    are rewritten after every measurement (meta "partial" says how far), and finally without "partial"."""
    total = len(cfg.passes) * (1 + len(cfg.world_sizes))

    def stem_of(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
        return f"ring-{gpu_tag(meta)}-{meta['date']}-{rows[0]['backend']}"

    def checkpoint(rows: list[dict[str, Any]]) -> None:  # a run stopped part-way keeps what it measured
        meta = run_meta(1, config=dataclasses.asdict(cfg), partial=f"{len(rows)} of {total} runs")
        write_results(out_dir, stem_of(meta, rows), meta, rows, ring_markdown(rows))

    meta, rows = run_ring_bench(cfg, checkpoint)
    meta["config"] = dataclasses.asdict(cfg)
    stem = stem_of(meta, rows)
    paths = [str(p) for p in write_results(out_dir, stem, meta, rows, ring_markdown(rows))]
    if plot:
        from .plot import plot_lines

        paths.append(plot_lines(rows, f"{out_dir}/{stem}.png", x="world_size", y="ratio_to_monolithic",
                                series=["impl"], panels=["pass"], title="ring schedule / one call",
                                xlabel="virtual ranks W", ylabel="monolithic time / ring time"))
    return paths
