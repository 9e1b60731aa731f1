"""``fa3dist bench scaling``: weak and strong scaling of the ring over world sizes, against one GPU
and against PyTorch's own context parallel, with the overlap of communication measured.

It runs as a launcher job on max(world_sizes) ranks. For every measured (W, S) point — weak
scaling (S = W x tokens per rank) and strong scaling (fixed S) — and every causal setting and pass:
- "fa3dist" at world_size W: ``ring_fa3_attention`` over the first W ranks (zigzag);
- the same schedule without communication (``LoopbackRing``): overlap_efficiency = its time / the
  ring's time;
- "fa3dist" at world_size 1: one kernel call over the whole S on one GPU, the ideal;
- "torch_cp": ``context_parallel`` on the same problem and ranks, each rotate method, the better
  one reported and named in the row.
Each time is the slowest rank's median. "tflops" is per GPU: the whole problem's FLOPs / W / time.
"peak_mem_gib" (fa3dist rows) is the largest rank's peak memory of one call, its inputs, outputs
and gradients included (``fa3dist.bench.memory``), and "kib_per_token" the same per local token.

``scheme`` picks how the W ranks share the work (``fa3dist.ulysses``): "flat" (the ring),
"ulysses", "hierarchical" (all-to-all inside nodes of ``gpus_per_node`` ranks, the ring across;
on one host this simulates nodes) or "auto" (the cost model's choice, in "scheme_used"). Every
ring row names its scheme and carries "predicted_ms", the cost model's time (``fa3dist.plan``)
from the machine of ``plan_config`` with this run's one-GPU rows as kernel rates and, on GPUs,
the link bandwidth and latency measured over the ranks at the start (``fa3dist.bench.links``).

With ``max_context`` it instead finds the longest sequence whose one-layer fwd+bwd fits
(``run_max_context``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from fa3dist.api import attention, ring_fa3_attention
from fa3dist.config import LaunchOptions, check_choices, load_config
from fa3dist.kernels import BACKEND_NAMES, get_backend
from fa3dist.kernels.checks import resolve_scale
from fa3dist.kernels.numerics import relative_error
from fa3dist.layout import shard_sequence
from fa3dist.plan import PLAN_ENV, KernelRates, Machine, PlanConfig, Problem, choose_scheme, predict
from fa3dist.ring import LoopbackRing
from fa3dist.ring.schedule import LAYOUTS
from fa3dist.ulysses import SCHEMES

from .common import DTYPES, attention_flops, gpu_tag, markdown_table, run_meta, time_ms_events, write_results
from .links import MIB, measure_links
from .memory import peak_bytes
from .torch_cp import ROTATE_METHODS, cp_attention

log = logging.getLogger("fa3dist.bench")


@dataclass
class ScalingConfig(LaunchOptions):
    """What ``fa3dist bench scaling`` measures."""

    world_sizes: list[int] = field(default_factory=lambda: [1, 2, 4])
    tokens_per_rank: list[int] = field(default_factory=lambda: [8192, 16384, 32768, 65536])  # weak scaling
    strong_seq_lens: list[int] = field(default_factory=list)  # strong scaling: fixed total S
    batch: int = 1
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "bfloat16"
    causal: list[bool] = field(default_factory=lambda: [True, False])
    passes: list[str] = field(default_factory=lambda: ["fwd", "fwd+bwd"])
    layout: str = "zigzag"
    backend: str = "auto"
    torch_cp: bool = True
    cp_rotate_methods: list[str] = field(default_factory=lambda: list(ROTATE_METHODS))
    cp_backend: str = "cudnn"
    repeat: int = 1
    min_iters: int = 2
    max_iters: int = 10
    budget_ms: float = 1500.0
    results_dir: str = "bench/results"
    plot: bool = False
    launcher: str = "local"  # recorded in the results; set by the CLI
    command: str = ""  # the driver's command line, recorded in the results; set by the CLI
    seed: int = 0
    # --max-context: peak memory of one fwd+bwd (the first causal setting) at these tokens per rank,
    # a linear fit, the longest sequence that fits, and one confirming run at a fraction of it
    max_context: bool = False
    max_context_tokens_per_rank: list[int] = field(default_factory=lambda: [16384, 32768, 65536, 131072])
    max_context_memory_gib: float | None = None  # per GPU; None: what the GPU's allocator can get
    max_context_confirm_fraction: float = 0.67
    # how the ranks share the work, and the cost model's machine (fa3dist.plan) for "auto" and predictions
    scheme: str = "flat"  # flat | ulysses | hierarchical | auto
    gpus_per_node: int | None = None  # node size for hierarchical and auto; None: the launcher's LOCAL_WORLD_SIZE
    plan_config: str | None = None  # plan YAML with the machine; None: $FA3DIST_PLAN, else the defaults
    link_sizes_mib: list[int] = field(default_factory=lambda: [16, 128])  # measured on GPUs

    def check(self) -> None:
        super().check()
        if not self.world_sizes or min(self.world_sizes) < 1:
            raise ValueError(f"key 'world_sizes' must list sizes >= 1, got {self.world_sizes}")
        if self.world_size is not None and self.world_size < max(self.world_sizes):
            raise ValueError(f"key 'world_size' ({self.world_size}) is below max(world_sizes)")
        check_choices(self, {"dtype": DTYPES, "layout": LAYOUTS, "backend": BACKEND_NAMES,
                             "cp_backend": ("cudnn", "flash"), "passes": ("fwd", "fwd+bwd"),
                             "cp_rotate_methods": ROTATE_METHODS, "scheme": SCHEMES})
        if self.gpus_per_node is not None and self.gpus_per_node < 1:
            raise ValueError(f"key 'gpus_per_node' must be at least 1, got {self.gpus_per_node}")
        if len(self.link_sizes_mib) != 2 or not 0 < self.link_sizes_mib[0] < self.link_sizes_mib[1]:
            raise ValueError(f"key 'link_sizes_mib' must list two increasing positive sizes, got {self.link_sizes_mib}")
        for w, s in self.points():
            chunks = 2 * w if self.layout == "zigzag" else w
            if s % chunks:
                raise ValueError(f"sequence length {s} does not split into {chunks} chunks at world size {w}")
        if self.repeat < 1:
            raise ValueError(f"key 'repeat' must be at least 1, got {self.repeat}")
        sizes = self.max_context_tokens_per_rank
        if len(set(sizes)) < 2 or min(sizes) < 2 or any(t % 2 for t in sizes):
            raise ValueError(f"key 'max_context_tokens_per_rank' must list at least two even sizes, got {sizes}")
        if not 0 < self.max_context_confirm_fraction <= 1:
            raise ValueError(f"key 'max_context_confirm_fraction' must be in (0, 1], got "
                             f"{self.max_context_confirm_fraction}")
        if self.max_context_memory_gib is not None and self.max_context_memory_gib <= 0:
            raise ValueError(f"key 'max_context_memory_gib' must be positive, got {self.max_context_memory_gib}")

    def points(self) -> list[tuple[int, int]]:
        """Every (world_size, total S) to measure: weak-scaling points, strong-scaling points, and
        the one-GPU run of every S."""
        pts = {(w, w * t) for w in self.world_sizes for t in self.tokens_per_rank}
        pts |= {(w, s) for w in self.world_sizes for s in self.strong_seq_lens}
        pts |= {(1, s) for _, s in pts}
        return sorted(pts, key=lambda p: (p[1], p[0]))


def _slowest(value: float, group: dist.ProcessGroup | None, device: torch.device,
             op: dist.ReduceOp = dist.ReduceOp.MAX) -> float:
    """The largest (``op``: or smallest) ``value`` over the ranks of ``group``."""
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=op, group=group)
    return t.item()


def _peak_fields(step, tensors: list[torch.Tensor], tokens: int, group: dist.ProcessGroup | None,
                 world: int, device: torch.device) -> dict[str, float]:
    """peak_mem_gib and kib_per_token of one ``step()`` (the largest rank's)."""
    peak = peak_bytes(step, tensors)
    if world > 1:
        peak = _slowest(peak, group, device)
    return {"peak_mem_gib": peak / 2**30, "kib_per_token": peak / tokens / 1024}


def _step(call, do: torch.Tensor, with_backward: bool):
    def run() -> None:
        out = call()
        if with_backward:
            out.backward(do)
    return run


@dataclass
class _Schemes:
    """What the ring rows need to run and predict ``cfg.scheme``: each world size's node group of this
    rank (for hierarchical and auto), the node size and the model's machine (links filled in)."""

    node_groups: dict[int, dist.ProcessGroup | None]
    gpus_per_node: int
    machine: Machine

    def call(self, cfg: ScalingConfig, problem: Problem, world: int) -> tuple[str, dict[str, Any]]:
        """(the scheme run, ``ring_fa3_attention``'s scheme arguments) at ``world`` ranks."""
        scheme = cfg.scheme
        if scheme == "auto":
            scheme = choose_scheme(problem, world, self.machine_at(world))
        if scheme == "hierarchical":
            return scheme, {"head_group": self.node_groups[world]}
        return scheme, {"scheme": scheme}

    def machine_at(self, world: int) -> Machine:
        return dataclasses.replace(self.machine, gpus_per_node=min(self.gpus_per_node, world))

    def with_rates(self, rows: list[dict[str, Any]], dtype: str) -> _Schemes:
        """The same with this run's one-GPU rows as kernel rates, where there are any yet."""
        try:
            rates = KernelRates.from_rows(rows, impl="fa3dist", dtype=dtype, source="this run's one-GPU rows")
        except ValueError:
            return self
        return dataclasses.replace(self, machine=dataclasses.replace(self.machine, kernel=rates))


def _schemes(cfg: ScalingConfig, ctx, worlds: list[int]) -> _Schemes:
    """Node groups for every world size (collective: every rank calls it) and the model's machine,
    with the links measured over all ranks on GPUs."""
    node = cfg.gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
    node_groups: dict[int, dist.ProcessGroup | None] = {}
    for world in worlds if cfg.scheme in ("hierarchical", "auto") else []:
        size = min(node, world)
        if world % size:
            raise ValueError(f"gpus_per_node ({node}) does not divide world size {world}")
        for start in range(0, world if world > 1 else 0, size):
            made = dist.new_group(list(range(start, start + size)))
            if start <= ctx.rank < start + size:
                node_groups[world] = made
    plan = load_config(PlanConfig, cfg.plan_config or os.environ.get(PLAN_ENV) or None)
    model = dataclasses.replace(plan.machine(), gpus_per_node=node)
    if ctx.world_size > 1 and ctx.device.type == "cuda":
        try:  # every rank gets the same (slowest-rank) figures, so every rank takes the same branch
            links = measure_links(None, ctx.device, tuple(m * MIB for m in cfg.link_sizes_mib))
        except RuntimeError as err:
            log.warning("%s: the model keeps the plan config's link figures", err)
        else:
            log.info("links over %d ranks: %s", ctx.world_size, links)
            model = dataclasses.replace(model, intra_node_gbps=links["send_recv_gbps"],
                                        intra_node_all_to_all_gbps=links["all_to_all_gbps"],
                                        latency_us=links["send_recv_latency_us"])
    return _Schemes(node_groups, node, model)


def _measure_point(cfg: ScalingConfig, ctx, world: int, seq: int, causal: bool, pass_: str,
                   group: dist.ProcessGroup | None, schemes: _Schemes) -> list[dict[str, Any]]:
    """Rows for one (W, S, causal, pass); ranks >= W return nothing."""
    if ctx.rank >= world:
        return []
    dtype, device = DTYPES[cfg.dtype], ctx.device
    gen = torch.Generator(device=device).manual_seed(cfg.seed + seq)  # the same full inputs on every rank
    full = [torch.randn(cfg.batch, seq, h, cfg.head_dim, device=device, dtype=dtype, generator=gen)
            for h in (cfg.heads, cfg.kv_heads, cfg.kv_heads, cfg.heads)]
    backend = get_backend(cfg.backend, device, DTYPES[cfg.dtype])
    scale = resolve_scale(None, cfg.head_dim)
    with_backward = pass_ == "fwd+bwd"
    timing = dict(min_iters=cfg.min_iters, max_iters=cfg.max_iters, budget_ms=cfg.budget_ms)
    if world > 1:
        timing.update(barrier=lambda: dist.barrier(group=group), agree=lambda ms: _slowest(ms, group, device))
    base = {"dtype": cfg.dtype, "B": cfg.batch, "H": cfg.heads, "Hkv": cfg.kv_heads, "S": seq, "D": cfg.head_dim,
            "causal": causal, "pass": pass_, "world_size": world, "tokens_per_rank": seq // world,
            "layout": cfg.layout}
    flops = attention_flops(cfg.batch, cfg.heads, seq, cfg.head_dim, causal, pass_)
    q, k, v, do = (shard_sequence(t, world_size=world, rank=ctx.rank, layout=cfg.layout).requires_grad_(i < 3)
                   for i, t in enumerate(full))
    rows = []
    tensors = [q, k, v, do]
    if world == 1:
        one_call = _step(lambda: attention(q, k, v, LoopbackRing(0, 1), causal=causal, softmax_scale=scale,
                                           layout=cfg.layout, backend=backend)[0], do, with_backward)
        ms = time_ms_events(one_call, **timing)
        return [{**base, "impl": "fa3dist", "backend": backend.name, "ms": ms, "tflops": flops / ms / 1e9,
                 "overlap_efficiency": 1.0, **_peak_fields(one_call, tensors, seq, group, world, device)}]
    problem = Problem(cfg.batch, seq, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.dtype, causal, with_backward,
                      cfg.layout)
    scheme, scheme_args = schemes.call(cfg, problem, world)
    ring_out = ring_fa3_attention(q, k, v, causal=causal, group=group, layout=cfg.layout, backend=cfg.backend,
                                  **scheme_args)
    ring_call = _step(lambda: ring_fa3_attention(q, k, v, causal=causal, group=group, layout=cfg.layout,
                                                 backend=cfg.backend, **scheme_args), do, with_backward)
    ring_ms = _slowest(time_ms_events(ring_call, **timing), group, device)
    memory = _peak_fields(ring_call, tensors, seq // world, group, world, device)
    alone_ms = _slowest(time_ms_events(_step(lambda: attention(
        q, k, v, LoopbackRing(ctx.rank, world), causal=causal, softmax_scale=scale, layout=cfg.layout,
        backend=backend)[0], do, with_backward), **timing), group, device)
    predicted = predict(problem, world, scheme, schemes.machine_at(world))
    rows.append({**base, "impl": "fa3dist", "backend": backend.name, "ms": ring_ms,
                 "tflops": flops / world / ring_ms / 1e9, "overlap_efficiency": alone_ms / ring_ms,
                 "no_comm_ms": alone_ms, **memory, "scheme": cfg.scheme, "scheme_used": scheme,
                 "head_group_size": predicted.head_group_size, "predicted_ms": predicted.ms,
                 "predicted_over_measured": predicted.ms / ring_ms})
    if cfg.torch_cp and device.type == "cuda":
        best = None
        for rotate in cfg.cp_rotate_methods:
            bhsd = [t.transpose(1, 2).contiguous() for t in full]
            try:
                with cp_attention(*bhsd, group=group, causal=causal, rotate=rotate, sdpa_backend=cfg.cp_backend,
                                  with_backward=with_backward) as (cp_step, cp_out):
                    ms = _slowest(time_ms_events(cp_step, **timing), group, device)
                    # with load balancing CP holds the zigzag shards, the same rows as our causal ring
                    err = relative_error(cp_out.transpose(1, 2), ring_out) if causal else None
            except Exception as exc:  # report a failing peer, keep measuring
                log.warning("torch_cp %s failed at %s: %s", rotate, base, exc)
                rows.append({**base, "impl": "torch_cp", "rotate": rotate, "ms": None, "tflops": None,
                             "error": str(exc)[:300]})
                continue
            if best is None or ms < best["ms"]:
                best = {**base, "impl": "torch_cp", "rotate": rotate, "cp_backend": cfg.cp_backend,
                        "gqa": "native" if cfg.kv_heads != cfg.heads else "mha", "ms": ms,
                        "tflops": flops / world / ms / 1e9, "rel_err_vs_fa3dist": err}
            del bhsd
        if best is not None:
            rows.append(best)
    return rows


def _derive(rows: list[dict[str, Any]]) -> None:
    """Add efficiency against one GPU and the ratio to torch_cp to each ring row."""
    def key(r):
        return (r["S"], r["causal"], r["pass"])

    one_gpu = {key(r): r["tflops"] for r in rows if r["impl"] == "fa3dist" and r["world_size"] == 1}
    cp = {(*key(r), r["world_size"]): r["tflops"] for r in rows if r["impl"] == "torch_cp" and r.get("tflops")}
    for r in rows:
        if r["impl"] == "fa3dist" and r["world_size"] > 1:
            ideal, peer = one_gpu.get(key(r)), cp.get((*key(r), r["world_size"]))
            r["efficiency_vs_one_gpu"] = r["tflops"] / ideal if ideal else None
            r["ratio_to_torch_cp"] = r["tflops"] / peer if peer else None


def scaling_markdown(rows: list[dict[str, Any]]) -> str:
    """Weak and strong scaling tables."""
    header = ["causal", "pass", "W", "S", "tokens/rank", "fa3dist TFLOP/s/GPU", "vs one GPU", "overlap eff.",
              "torch_cp TFLOP/s/GPU", "torch_cp rotate", "fa3dist/torch_cp", "peak GiB", "KiB/token", "scheme",
              "ms", "predicted ms"]
    cp = {(r["S"], r["causal"], r["pass"], r["world_size"]): r for r in rows if r["impl"] == "torch_cp" and r.get("tflops")}
    body = []
    for r in sorted((r for r in rows if r["impl"] == "fa3dist"),
                    key=lambda r: (not r["causal"], r["pass"], r["tokens_per_rank"], r["world_size"])):
        peer = cp.get((r["S"], r["causal"], r["pass"], r["world_size"]), {})
        body.append(["yes" if r["causal"] else "no", r["pass"], r["world_size"], r["S"], r["tokens_per_rank"],
                     r["tflops"], r.get("efficiency_vs_one_gpu"), r.get("overlap_efficiency"), peer.get("tflops"),
                     peer.get("rotate"), r.get("ratio_to_torch_cp"), r.get("peak_mem_gib"), r.get("kib_per_token"),
                     r.get("scheme_used"), r["ms"], r.get("predicted_ms")])
    note = ("Rows with W = 1 are one kernel call over the whole S on one GPU. \"vs one GPU\" divides the "
            "per-GPU TFLOP/s by that of the W = 1 row with the same S (weak-scaling efficiency). "
            "\"overlap eff.\" is the time of the same schedule without communication over the real time. "
            "\"peak GiB\" is one call's peak memory on the largest rank, inputs, outputs and gradients included; "
            "\"KiB/token\" the same per local token. \"scheme\" is how the ranks shared the work (fa3dist.ulysses); "
            "\"predicted ms\" the cost model's time for it (fa3dist.plan; machine in the JSON's meta.plan_machine).")
    return note + "\n\n" + markdown_table(header, body)


def run_scaling(cfg: ScalingConfig, ctx) -> dict[str, Any]:
    """The scaling job on one rank (or with ``max_context`` the max-context job); rank 0 writes the
    results and returns them."""
    if cfg.max_context:
        return run_max_context(cfg, ctx)
    world_max = max(cfg.world_sizes)
    if ctx.world_size < world_max:
        raise ValueError(f"the scaling job needs {world_max} ranks (max of world_sizes); it has {ctx.world_size}")
    groups = {w: (dist.new_group(list(range(w))) if w > 1 else None) for w in sorted(set(cfg.world_sizes) | {1})}
    schemes = _schemes(cfg, ctx, sorted(groups))
    todo = [(rep, causal, w, s, p) for rep in range(cfg.repeat) for causal in cfg.causal
            for w, s in cfg.points() for p in cfg.passes]
    rows: list[dict[str, Any]] = []
    meta = run_meta(ctx.world_size, launcher=cfg.launcher, config=dataclasses.asdict(cfg))
    meta["command"] = cfg.command or meta["command"]
    meta["plan_machine"] = dataclasses.asdict(schemes.machine) | {"kernel": "this run's one-GPU rows, else "
                                                                  + schemes.machine.kernel.source}
    backend = get_backend(cfg.backend, ctx.device, DTYPES[cfg.dtype]).name
    scheme_tag = "" if cfg.scheme == "flat" else f"-{cfg.scheme}"
    stem = f"scaling-{gpu_tag(meta)}x{ctx.world_size}-{meta['date']}-{cfg.launcher}-{backend}{scheme_tag}"
    paths: list[str] = []
    for rep, causal, world, seq, pass_ in tqdm(todo, desc="bench scaling", unit="point", disable=ctx.rank != 0):
        for row in _measure_point(cfg, ctx, world, seq, causal, pass_, groups.get(world),
                                  schemes.with_rates(rows, cfg.dtype)):
            rows.append({**row, "repeat": rep})
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        if ctx.rank == 0:  # rewrite after every point: a cut-short run keeps what it measured
            _derive(rows)
            paths = [str(p) for p in write_results(cfg.results_dir, stem, meta, rows, scaling_markdown(rows))]
        if ctx.world_size > 1:
            dist.barrier()
    result: dict[str, Any] = {"job": "scaling"}
    if ctx.rank == 0:
        if cfg.plot:
            paths += plot_scaling(rows, cfg.results_dir, stem, cfg.tokens_per_rank)
        result.update(paths=paths, rows=rows)
    return result


def _local_inputs(cfg: ScalingConfig, ctx, tokens_per_rank: int) -> list[torch.Tensor]:
    """Random q, k, v (requiring grad) and dO for this rank's shard, made locally (never the whole sequence)."""
    gen = torch.Generator(device=ctx.device).manual_seed(cfg.seed + ctx.rank)
    return [torch.randn(cfg.batch, tokens_per_rank, h, cfg.head_dim, device=ctx.device, dtype=DTYPES[cfg.dtype],
                        generator=gen).requires_grad_(i < 3)
            for i, h in enumerate((cfg.heads, cfg.kv_heads, cfg.kv_heads, cfg.heads))]


def _fwd_bwd_peak_and_ms(cfg: ScalingConfig, ctx, tokens_per_rank: int, *, warm_up: bool) -> tuple[float, float]:
    """Peak bytes and wall-clock ms of one fwd+bwd of ``ring_fa3_attention`` over all ranks (the
    largest rank's of each), after one warm-up call when ``warm_up``."""
    q, k, v, do = _local_inputs(cfg, ctx, tokens_per_rank)

    def step() -> None:
        ring_fa3_attention(q, k, v, causal=cfg.causal[0], layout=cfg.layout, backend=cfg.backend).backward(do)

    if warm_up:
        step()
    if ctx.world_size > 1:
        dist.barrier()
    begin = time.perf_counter()
    peak = peak_bytes(step, [q, k, v, do])  # synchronizes on CUDA before it returns
    ms = (time.perf_counter() - begin) * 1e3
    del q, k, v, do
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    if ctx.world_size > 1:
        return _slowest(peak, None, ctx.device), _slowest(ms, None, ctx.device)
    return peak, ms


def _memory_capacity(cfg: ScalingConfig, ctx) -> float:
    """Bytes one rank may use: the configured GiB, or on CUDA free memory plus what this process's
    allocator already holds; the smallest over the ranks."""
    if cfg.max_context_memory_gib is not None:
        return cfg.max_context_memory_gib * 2**30
    if ctx.device.type != "cuda":
        raise ValueError("key 'max_context_memory_gib' must be set for a max-context run on the CPU")
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(ctx.device)
    capacity = free + torch.cuda.memory_reserved(ctx.device)
    return _slowest(capacity, None, ctx.device, dist.ReduceOp.MIN) if ctx.world_size > 1 else capacity


def _round_tokens(tokens: float) -> int:
    """Down to a multiple of 1024 tokens per rank (of 2 below 16K): even, as zigzag needs."""
    step = 1024 if tokens >= 16384 else 2
    return int(tokens // step * step)


def run_max_context(cfg: ScalingConfig, ctx) -> dict[str, Any]:
    """The longest sequence whose one-layer fwd+bwd fits, on this job's ranks (all of them).

    Measures the peak memory of one fwd+bwd (first causal setting) at each of
    ``max_context_tokens_per_rank``, fits peak = base + slope * tokens per rank (memory grows
    linearly with the shard for flash kernels), predicts the largest shard that fits the
    capacity, and confirms by running ``max_context_confirm_fraction`` of it once, timed. The
    confirming run is one call of possibly minutes: the process-group timeout (``timeout_s``) must
    exceed it. Rank 0 writes maxcontext-<gpu>x<W>-<date>-<launcher>.json/.md.
    """
    world = ctx.world_size
    base = {"dtype": cfg.dtype, "B": cfg.batch, "H": cfg.heads, "Hkv": cfg.kv_heads, "D": cfg.head_dim,
            "causal": cfg.causal[0], "pass": "fwd+bwd", "world_size": world, "layout": cfg.layout,
            "backend": get_backend(cfg.backend, ctx.device).name}
    capacity = _memory_capacity(cfg, ctx)
    rows = []
    for tokens in tqdm(sorted(set(cfg.max_context_tokens_per_rank)), desc="max context", unit="size",
                       disable=ctx.rank != 0):
        peak, ms = _fwd_bwd_peak_and_ms(cfg, ctx, tokens, warm_up=True)
        rows.append({**base, "kind": "measured", "tokens_per_rank": tokens, "S": tokens * world, "ms": ms,
                     "peak_mem_gib": peak / 2**30, "kib_per_token": peak / tokens / 1024})
    slope, intercept = statistics.linear_regression([r["tokens_per_rank"] for r in rows],
                                                    [r["peak_mem_gib"] * 2**30 for r in rows])
    longest = _round_tokens((capacity - intercept) / slope)
    rows.append({**base, "kind": "predicted", "tokens_per_rank": longest, "S": longest * world,
                 "fit_kib_per_token": slope / 1024, "fit_base_gib": intercept / 2**30,
                 "capacity_gib": capacity / 2**30})
    confirm = _round_tokens(longest * cfg.max_context_confirm_fraction)
    if confirm < 2:
        raise ValueError(f"no sequence fits: the fit predicts {longest} tokens per rank for {capacity / 2**30:.3g} GiB")
    log.info("max context: predicted %d tokens per rank; confirming at %d", longest, confirm)
    peak, ms = _fwd_bwd_peak_and_ms(cfg, ctx, confirm, warm_up=False)
    rows.append({**base, "kind": "confirmed", "tokens_per_rank": confirm, "S": confirm * world, "ms": ms,
                 "peak_mem_gib": peak / 2**30, "kib_per_token": peak / confirm / 1024, "fits": peak <= capacity,
                 "predicted_peak_gib": (intercept + slope * confirm) / 2**30})
    result: dict[str, Any] = {"job": "max_context"}
    if ctx.rank == 0:
        meta = run_meta(world, launcher=cfg.launcher, config=dataclasses.asdict(cfg))
        meta["command"] = cfg.command or meta["command"]
        stem = f"maxcontext-{gpu_tag(meta)}x{world}-{meta['date']}-{cfg.launcher}"
        paths = [str(p) for p in write_results(cfg.results_dir, stem, meta, rows, max_context_markdown(rows))]
        result.update(paths=paths, rows=rows)
    return result


def max_context_markdown(rows: list[dict[str, Any]]) -> str:
    """The measured sizes, the fit and prediction, and the confirming run."""
    header = ["kind", "W", "tokens/rank", "S", "peak GiB/GPU", "KiB/token", "time s", "fits"]
    body = [[r["kind"], r["world_size"], r["tokens_per_rank"], r["S"], r.get("peak_mem_gib"), r.get("kib_per_token"),
             None if r.get("ms") is None else r["ms"] / 1e3, r.get("fits")] for r in rows]
    (pred,) = [r for r in rows if r["kind"] == "predicted"]
    note = (f"One layer's fwd+bwd ({pred['backend']}, H={pred['H']}, H_kv={pred['Hkv']}, D={pred['D']}, "
            f"{pred['dtype']}, causal={pred['causal']}, {pred['layout']}), inputs and gradients included. "
            f"Linear fit of the measured peaks: {pred['fit_base_gib']:.3g} GiB + {pred['fit_kib_per_token']:.4g} KiB "
            f"per local token; with {pred['capacity_gib']:.4g} GiB per GPU the longest sequence that fits is "
            f"S = {pred['S']} ({pred['tokens_per_rank']} tokens per rank). The confirming run is one call, "
            "timed by wall clock.")
    return note + "\n\n" + markdown_table(header, body)


def plot_scaling(rows: list[dict[str, Any]], out_dir: str, stem: str, tokens_per_rank: list[int]) -> list[str]:
    """Per-GPU TFLOP/s and weak-scaling efficiency against world size, one panel per (causal, pass)."""
    from .plot import plot_lines

    weak = [dict(r, series=f"{r['impl']} {r['tokens_per_rank'] // 1024}K/rank") for r in rows
            if r.get("tflops") and r["tokens_per_rank"] in tokens_per_rank]
    paths = [plot_lines(weak, f"{out_dir}/{stem}-tflops.png", x="world_size", y="tflops", series=["series"],
                        panels=["causal", "pass"], title="weak scaling: TFLOP/s per GPU", xlabel="world size",
                        ylabel="TFLOP/s per GPU")]
    eff = [r for r in weak if r["impl"] == "fa3dist" and r["world_size"] > 1]
    paths.append(plot_lines(eff, f"{out_dir}/{stem}-efficiency.png", x="world_size", y="efficiency_vs_one_gpu",
                            series=["series"], panels=["causal", "pass"],
                            title="weak-scaling efficiency (per-GPU TFLOP/s / one GPU)", xlabel="world size",
                            ylabel="efficiency"))
    return paths
