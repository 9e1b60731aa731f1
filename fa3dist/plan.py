"""A cost model of one attention call under each context-parallel scheme, and the choice among them.

Schemes (``fa3dist.ulysses``): "flat" (the ring over all W ranks), "ulysses" (an all-to-all from
sequence to head shards over all W ranks, then the local kernel) and "hierarchical" (the
all-to-all inside each node of G ranks, the ring over the N = W / G nodes).

Inputs: the problem (B, S, H, H_kv, D, dtype, causal, forward only or forward and backward,
layout); the kernel's TFLOP/s by pass, mask, D and S, read from ``bench kernel`` results (or the
one-GPU rows of ``bench scaling``), else ``DEFAULT_TFLOPS``; the links: NCCL send/recv and
all-to-all bandwidth inside a node (measured), the per-GPU bandwidth across nodes (given), and a
latency per transfer.

Per rank, with G ranks per head group (1 for flat, W for Ulysses), the ring over N = W / G ranks,
node shards of L = S / N tokens, h = H / G query heads and h_kv K/V heads (H_kv / G, or 1 when
K/V heads are replicated):
- compute: the ring's steps, each at the kernel's rate for its pass, mask and length L. Zigzag
  causal: a causal block of L x L, then N - 1 half blocks; contiguous causal: the last rank's
  causal block and N - 1 full blocks; not causal: N full blocks. Backward: 2.5 x the FLOPs.
- ring: a step sends K/V (2·B·L·h_kv·D elements; the backward also the fp32 dK/dV) over the
  slowest link of the ring (across nodes when the ring leaves one), latency + bytes / bandwidth,
  and takes compute + transfer - overlap · min(compute, transfer) + a step overhead. With
  overlap = 1 that is the longer of the two (the transfer wholly hidden); the default 0.5 fits the
  flat ring measured on 2 H200s, where NCCL's traffic slows the kernels it runs beside. The
  backward's last trip of the dK/dV accumulator, home after the last kernel, is never hidden.
- all-to-all (G > 1): q, k, v and out forward, dO, dq, dk and dv backward; each rank sends
  (G - 1) / G of each, over the links inside its node and, when the head group spans nodes,
  across them. Nothing hides it.
- memory: peak bytes per local token of one layer's forward and backward, inputs, outputs and
  gradients included (the ring's docstring; ``bytes_per_token``), checked against the CPU
  measurement in tests/test_ulysses.py.

It ignores the local copies around the all-to-all and rank skew; ``fa3dist bench scaling
--scheme`` puts its predictions next to measured times.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .bench.common import attention_flops

SCHEMES = ("flat", "ulysses", "hierarchical")
ELEMENT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}
# Our Triton kernels on one H200, D = 128, S = 16K, bf16 (ANCHORS.md, 2026-11-29), TFLOP/s by
# (pass, causal): used for every D and S when no results file is given.
DEFAULT_TFLOPS = {("fwd", False): 571.0, ("fwd", True): 524.0, ("bwd", False): 391.0, ("bwd", True): 379.0}
PLAN_ENV = "FA3DIST_PLAN"  # a plan YAML whose machine ``scheme="auto"`` uses


@dataclass(frozen=True)
class Problem:
    """One attention call over all ranks: the global sequence length and the shapes."""

    batch: int
    seq_len: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    causal: bool = True
    backward: bool = True
    layout: str = "zigzag"

    @property
    def passes(self) -> tuple[str, ...]:
        return ("fwd", "bwd") if self.backward else ("fwd",)

    def flops(self) -> float:
        """FLOPs as the FlashAttention papers count them (forward and, with ``backward``, backward)."""
        return attention_flops(self.batch, self.heads, self.seq_len, self.head_dim, self.causal,
                               "fwd+bwd" if self.backward else "fwd")


@dataclass(frozen=True)
class KernelRates:
    """The kernel's TFLOP/s by (pass, causal, D, S): measured rows, else ``DEFAULT_TFLOPS``."""

    points: tuple[tuple[str, bool, int, int, float], ...] = ()  # (pass, causal, D, S, TFLOP/s)
    source: str = "defaults (our Triton kernels, one H200, D=128, S=16K; ANCHORS.md)"

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]], *, impl: str, dtype: str, source: str) -> KernelRates:
        """Rates from result rows of ``impl`` and ``dtype`` ("impl", "pass", "D", "S", "causal", "tflops").

        Rows with a "world_size" other than 1 are skipped. A "bwd" rate missing where "fwd" and
        "fwd+bwd" rows exist (``bench scaling``) is derived from their times.
        """
        rates: dict[tuple[str, bool, int, int], float] = {}
        for r in rows:
            if r.get("impl") == impl and r.get("dtype", dtype) == dtype and r.get("world_size", 1) == 1 \
                    and r.get("tflops"):
                rates[(r["pass"], bool(r["causal"]), int(r["D"]), int(r["S"]))] = float(r["tflops"])
        for (pass_, causal, dim, seq), both in list(rates.items()):
            fwd = rates.get(("fwd", causal, dim, seq))
            if pass_ == "fwd+bwd" and fwd and ("bwd", causal, dim, seq) not in rates:
                bwd_time = 3.5 / both - 1.0 / fwd  # per forward FLOP
                if bwd_time > 0:
                    rates[("bwd", causal, dim, seq)] = 2.5 / bwd_time
        points = tuple(sorted((p, c, d, s, t) for (p, c, d, s), t in rates.items() if p in ("fwd", "bwd")))
        if not points:
            raise ValueError(f"{source}: no {impl} rows in {dtype} with pass fwd/bwd (or fwd and fwd+bwd) "
                             "and tflops")
        return cls(points, source)

    @classmethod
    def from_files(cls, paths: list[str], *, impl: str = "fa3dist", dtype: str = "bfloat16") -> KernelRates:
        """Rates from ``{"meta", "rows"}`` result files (``bench kernel``, or ``bench scaling``'s W = 1 rows)."""
        rows: list[dict[str, Any]] = []
        for path in paths:
            try:
                rows += json.loads(Path(path).read_text())["rows"]
            except (OSError, ValueError, KeyError) as err:
                raise ValueError(f"kernel results {path}: cannot read its rows ({err})") from None
        return cls.from_rows(rows, impl=impl, dtype=dtype, source=", ".join(paths))

    def tflops(self, pass_: str, causal: bool, head_dim: int, seq_len: float) -> float:
        """The rate at the nearest measured D, interpolated in log S between measured lengths
        (the end points outside them)."""
        points = [p for p in self.points if p[0] == pass_ and p[1] == causal]
        if not points:  # only the other mask measured: its rate times the defaults' ratio
            if not any(p[0] == pass_ for p in self.points):
                return DEFAULT_TFLOPS[(pass_, causal)]
            ratio = DEFAULT_TFLOPS[(pass_, causal)] / DEFAULT_TFLOPS[(pass_, not causal)]
            return ratio * self.tflops(pass_, not causal, head_dim, seq_len)
        dim = min({p[2] for p in points}, key=lambda d: (abs(d - head_dim), d))
        curve = sorted((p[3], p[4]) for p in points if p[2] == dim)
        if seq_len <= curve[0][0]:
            return curve[0][1]
        for (s0, t0), (s1, t1) in zip(curve, curve[1:]):
            if seq_len <= s1:
                w = math.log(seq_len / s0) / math.log(s1 / s0)
                return t0 + w * (t1 - t0)
        return curve[-1][1]


@dataclass(frozen=True)
class Machine:
    """Nodes of ``gpus_per_node`` GPUs; link figures in GB/s (1e9 bytes/s) per direction per GPU."""

    gpus_per_node: int
    kernel: KernelRates = field(default_factory=KernelRates)
    intra_node_gbps: float = 160.0  # NCCL send/recv around a ring inside a node
    intra_node_all_to_all_gbps: float = 160.0  # all_to_all_single: bytes a rank sends to the others / time
    inter_node_gbps: float = 50.0  # across nodes: 400 Gb/s per GPU
    latency_us: float = 150.0  # per transfer or collective call, rank skew included
    step_overhead_us: float = 20.0  # per ring step: launches and the wait
    call_overhead_us: float = 100.0  # per call: the ranks-agree check and launches
    overlap: float = 0.5  # the share of a ring transfer hidden by the kernels running with it (fits the
    # flat ring on 2 x H200 of 2026-11-29, ANCHORS.md: fwd+bwd within 3%, fwd 15% under)
    memory_gib: float = 76.0  # what one layer's forward and backward may use per GPU


@dataclass(frozen=True)
class Prediction:
    """The model's figures for one scheme; times in ms."""

    scheme: str
    world_size: int
    head_group_size: int
    ring_size: int
    ms: float
    compute_ms: float
    ring_transfer_ms: float  # the ring's transfers in all, hidden or not
    ring_exposed_ms: float  # the part of the ring's transfers the kernels did not hide
    all_to_all_ms: float
    tflops_per_gpu: float
    efficiency: float  # per-GPU TFLOP/s over the kernel's unmasked rate at S (at most the longest measured)
    kib_per_token: float | None  # peak memory per local token (forward and backward only)
    max_tokens_per_gpu: int | None  # the longest shard whose forward and backward fit ``memory_gib``


def head_layout(heads: int, kv_heads: int, size: int) -> tuple[int, int] | None:
    """(query heads, K/V heads) per rank after an all-to-all over ``size`` ranks, or None when the
    heads do not fit (``fa3dist.groups.check_head_group``)."""
    if heads % size or (kv_heads % size and size % kv_heads):
        return None
    return heads // size, max(kv_heads // size, 1)


def _ring_bytes_per_token(heads: int, kv_heads: int, head_dim: int, elt: int, ring_size: int) -> float:
    """Peak bytes per local token of the ring's forward and backward with a kernel that accumulates in
    place (fa3dist.ring.ring's docstring): q, dO, out, k, v and the LSEs; the fp32 dQ accumulator,
    the K/V blocks in flight, two fp32 dK/dV accumulators and the fp32 dK/dV scratch of a whole
    block (the largest rank's). One rank: the kernel's dq, dk, dv instead."""
    inputs = (3 * heads + 2 * kv_heads) * head_dim * elt + 2 * heads * 4
    if ring_size == 1:
        return inputs + (heads + 2 * kv_heads) * head_dim * elt
    blocks = 1 if ring_size == 2 else 2
    return inputs + heads * head_dim * 4 + blocks * 2 * kv_heads * head_dim * elt + 6 * kv_heads * head_dim * 4


def bytes_per_token(problem: Problem, head_group_size: int, ring_size: int) -> float:
    """Peak bytes per local token of one forward and backward under a scheme (``Prediction``).

    With an all-to-all (G > 1): the caller's q, k, v, dO and out in the sequence layout, and the
    larger of the ring's own peak on the head layout (per local token the same H query heads and
    G·h_kv K/V heads) and the head-layout tensors the ring saves plus the three buffers of dO's
    all-to-all.
    """
    elt, dim = ELEMENT_BYTES[problem.dtype], problem.head_dim
    if head_group_size == 1:
        return _ring_bytes_per_token(problem.heads, problem.kv_heads, dim, elt, ring_size)
    _, kv_local = head_layout(problem.heads, problem.kv_heads, head_group_size)
    kv_sent = head_group_size * kv_local
    caller = (3 * problem.heads + 2 * problem.kv_heads) * dim * elt
    saved = (2 * problem.heads + 2 * kv_sent) * dim * elt + problem.heads * 4
    return caller + max(_ring_bytes_per_token(problem.heads, kv_sent, dim, elt, ring_size),
                        saved + 3 * problem.heads * dim * elt)


def _ring_ms(problem: Problem, ring_size: int, heads: int, kv_heads: int, link_gbps: float,
             machine: Machine) -> tuple[float, float, float, float]:
    """(time, compute, transfers, exposed transfers) of the ring part, in ms."""
    batch, dim, elt, n = problem.batch, problem.head_dim, ELEMENT_BYTES[problem.dtype], ring_size
    length = problem.seq_len / n
    full = 4.0 * batch * heads * length * length * dim  # one L x L block's forward FLOPs
    if not problem.causal:
        blocks = [(full, False)] * n
    elif problem.layout == "zigzag":
        blocks = [(full / 2, True)] + [(full / 2, False)] * (n - 1)
    else:
        blocks = [(full / 2, True)] + [(full, False)] * (n - 1)
    kv_bytes = 2.0 * batch * length * kv_heads * dim * elt
    dkv_bytes = 2.0 * batch * length * kv_heads * dim * 4  # the fp32 dK/dV accumulator of the backward

    def move_ms(sent: float) -> float:
        return sent / (link_gbps * 1e9) * 1e3 + (machine.latency_us * 1e-3 if sent else 0.0)

    total = compute = transfers = exposed = 0.0
    for pass_ in problem.passes:
        factor = 2.5 if pass_ == "bwd" else 1.0
        for step, (flops, causal) in enumerate(blocks):
            work = factor * flops / (machine.kernel.tflops(pass_, causal, dim, length) * 1e12) * 1e3
            last = step == n - 1
            accumulator = dkv_bytes if pass_ == "bwd" and n > 1 else 0.0
            move = move_ms((0.0 if last else kv_bytes) + (0.0 if last else accumulator))
            home = move_ms(accumulator) if last else 0.0  # the trip home after the last kernel hides behind nothing
            hidden = machine.overlap * min(work, move)
            step_ms = work + move - hidden + home + (machine.step_overhead_us * 1e-3 if n > 1 else 0.0)
            total, compute, transfers, exposed = total + step_ms, compute + work, transfers + move + home, \
                exposed + move - hidden + home
    return total, compute, transfers, exposed


def _all_to_all_ms(problem: Problem, world_size: int, size: int, kv_local: int, machine: Machine) -> float:
    """The all-to-alls of q, k, v, out (and dO, dq, dk, dv), each rank sending (G-1)/G of its data."""
    if size == 1:
        return 0.0
    elt, dim = ELEMENT_BYTES[problem.dtype], problem.head_dim
    tokens = problem.seq_len / world_size
    per_pass = problem.batch * tokens * dim * elt * (2 * problem.heads + 2 * size * kv_local)
    per_peer = per_pass * len(problem.passes) / size
    inside = min(size, machine.gpus_per_node)
    seconds = max(per_peer * (inside - 1) / (machine.intra_node_all_to_all_gbps * 1e9),
                  per_peer * (size - inside) / (machine.inter_node_gbps * 1e9))
    return seconds * 1e3 + 4 * len(problem.passes) * machine.latency_us * 1e-3


def scheme_head_group_size(scheme: str, world_size: int, gpus_per_node: int) -> int:
    """G for ``scheme`` at ``world_size``: 1 (flat), W (Ulysses), or the node size (hierarchical)."""
    return {"flat": 1, "ulysses": world_size, "hierarchical": gpus_per_node}[scheme]


def predict(problem: Problem, world_size: int, scheme: str, machine: Machine) -> Prediction | None:
    """The model's figures for ``scheme`` on ``world_size`` ranks; None when the scheme does not fit
    (heads that do not split, or a node that does not divide the ranks)."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    size = scheme_head_group_size(scheme, world_size, machine.gpus_per_node)
    if world_size % size:
        return None
    layout = head_layout(problem.heads, problem.kv_heads, size)
    if layout is None:
        return None
    heads, kv_heads = layout
    ring_size = world_size // size
    link = machine.inter_node_gbps if world_size > machine.gpus_per_node else machine.intra_node_gbps
    ring_ms, compute, transfers, exposed = _ring_ms(problem, ring_size, heads, kv_heads, link, machine)
    a2a = _all_to_all_ms(problem, world_size, size, kv_heads, machine)
    ms = ring_ms + a2a + machine.call_overhead_us * 1e-3
    flops = problem.flops()
    ideal_ms = sum(  # one GPU with every FLOP at the kernel's unmasked rate at S
        attention_flops(problem.batch, problem.heads, problem.seq_len, problem.head_dim, problem.causal, p)
        / machine.kernel.tflops(p, False, problem.head_dim, problem.seq_len) / 1e9 for p in problem.passes)
    memory = bytes_per_token(problem, size, ring_size) if problem.backward else None
    return Prediction(
        scheme=scheme, world_size=world_size, head_group_size=size, ring_size=ring_size, ms=ms, compute_ms=compute,
        ring_transfer_ms=transfers, ring_exposed_ms=exposed, all_to_all_ms=a2a,
        tflops_per_gpu=flops / world_size / ms / 1e9, efficiency=ideal_ms / world_size / ms,
        kib_per_token=None if memory is None else memory / 1024,
        max_tokens_per_gpu=None if memory is None else int(machine.memory_gib * 2**30 // memory))


def predict_all(problem: Problem, world_size: int, machine: Machine) -> dict[str, Prediction]:
    """Every scheme that fits, by name. Hierarchical only when a node holds more than one rank and
    fewer than all of them (else it is the flat ring or Ulysses)."""
    schemes = [s for s in SCHEMES if s != "hierarchical" or 1 < machine.gpus_per_node < world_size]
    found = {s: predict(problem, world_size, s, machine) for s in schemes}
    return {s: p for s, p in found.items() if p is not None}


def choose_scheme(problem: Problem, world_size: int, machine: Machine) -> str:
    """The scheme with the shortest predicted time (the flat ring on a tie or when nothing else fits)."""
    predictions = predict_all(problem, world_size, machine)
    return min(predictions, key=lambda s: (predictions[s].ms, SCHEMES.index(s)))


@dataclass
class PlanConfig:
    """What ``fa3dist plan`` models: a problem, a machine and (``--project``) the projection."""

    # the problem: one attention call over all ranks
    batch: int = 1
    seq_len: int = 262144  # global S
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "bfloat16"
    causal: bool = True
    backward: bool = True  # forward and backward (training); false: forward only (prefill)
    layout: str = "zigzag"
    world_size: int = 16
    # the machine
    gpus_per_node: int = 8
    kernel_results: list[str] = field(default_factory=list)  # bench kernel / scaling JSON; [] = defaults
    kernel_impl: str = "fa3dist"
    intra_node_gbps: float = 160.0
    intra_node_all_to_all_gbps: float = 160.0
    inter_node_gbps: float = 50.0
    latency_us: float = 150.0
    step_overhead_us: float = 20.0
    call_overhead_us: float = 100.0
    overlap: float = 0.5
    memory_gib: float = 76.0
    # --project: per-GPU TFLOP/s at these tokens per GPU and the longest context, over these world sizes
    project_world_sizes: list[int] = field(default_factory=lambda: [16, 64, 128])
    project_tokens_per_gpu: list[int] = field(default_factory=lambda: [8192, 32768, 131072])
    # --project: a published prefill to set the projection against (ANCHORS.md)
    prefill_name: str = "Llama3-405B, 1M-token prefill (Meta, context parallelism)"
    prefill_seq_len: int = 1048576
    prefill_heads: int = 128
    prefill_kv_heads: int = 8
    prefill_layers: int = 126
    prefill_world_size: int = 128
    prefill_published_s: float = 77.0
    prefill_published_efficiency: float = 0.93
    results_dir: str = "bench/results"
    name: str = "plan"  # file stem prefix of --project results

    def check(self) -> None:
        from .layout import check_layout

        positive = {k: getattr(self, k) for k in ("batch", "seq_len", "heads", "kv_heads", "head_dim", "world_size",
                                                  "gpus_per_node", "prefill_seq_len", "prefill_heads",
                                                  "prefill_kv_heads", "prefill_layers", "prefill_world_size")}
        positive.update({k: getattr(self, k) for k in ("intra_node_gbps", "intra_node_all_to_all_gbps",
                                                       "inter_node_gbps", "memory_gib")})
        for key, value in positive.items():
            if value <= 0:
                raise ValueError(f"key {key!r} must be positive, got {value}")
        for key in ("latency_us", "step_overhead_us", "call_overhead_us"):
            if getattr(self, key) < 0:
                raise ValueError(f"key {key!r} must not be negative, got {getattr(self, key)}")
        if self.dtype not in ELEMENT_BYTES:
            raise ValueError(f"key 'dtype' must be one of {', '.join(ELEMENT_BYTES)}, got {self.dtype!r}")
        check_layout(self.layout)
        for key in ("heads", "prefill_heads"):
            kv = getattr(self, key.replace("heads", "kv_heads"))
            if getattr(self, key) % kv:
                raise ValueError(f"key {key!r} ({getattr(self, key)}) must be a multiple of its kv_heads ({kv})")
        if any(w < 1 for w in self.project_world_sizes) or any(t < 2 for t in self.project_tokens_per_gpu):
            raise ValueError("keys 'project_world_sizes' and 'project_tokens_per_gpu' must list positive sizes")

    def problem(self, **changes: Any) -> Problem:
        fields_ = dict(batch=self.batch, seq_len=self.seq_len, heads=self.heads, kv_heads=self.kv_heads,
                       head_dim=self.head_dim, dtype=self.dtype, causal=self.causal, backward=self.backward,
                       layout=self.layout)
        return Problem(**{**fields_, **changes})

    def machine(self, **changes: Any) -> Machine:
        kernel = (KernelRates.from_files(self.kernel_results, impl=self.kernel_impl, dtype=self.dtype)
                  if self.kernel_results else KernelRates())
        machine = Machine(self.gpus_per_node, kernel, self.intra_node_gbps, self.intra_node_all_to_all_gbps,
                          self.inter_node_gbps, self.latency_us, self.step_overhead_us, self.call_overhead_us,
                          self.overlap, self.memory_gib)
        return replace(machine, **changes)


@functools.cache
def _machine_from_file(path: str | None) -> Machine:
    from .config import load_config

    return load_config(PlanConfig, path).machine()


def machine_from_env(gpus_per_node: int) -> Machine:
    """The machine ``scheme="auto"`` plans with: the plan YAML named by $FA3DIST_PLAN, else the
    defaults, with nodes of ``gpus_per_node`` ranks."""
    return replace(_machine_from_file(os.environ.get(PLAN_ENV) or None), gpus_per_node=gpus_per_node)


def prediction_rows(problem: Problem, world_size: int, machine: Machine) -> list[dict[str, Any]]:
    """One row per scheme that fits (the Prediction's fields and "chosen")."""
    predictions = predict_all(problem, world_size, machine)
    best = choose_scheme(problem, world_size, machine)
    return [{**vars(p), "chosen": name == best} for name, p in predictions.items()]


def project(cfg: PlanConfig) -> dict[str, list[dict[str, Any]]]:
    """The projection: per scheme and world size, per-GPU TFLOP/s at each tokens-per-GPU size and the
    longest context that fits; and the published prefill's shape under each scheme."""
    machine = cfg.machine()
    rows = []
    for world in cfg.project_world_sizes:
        for tokens in cfg.project_tokens_per_gpu:
            problem = cfg.problem(seq_len=tokens * world)
            for row in prediction_rows(problem, world, machine):
                rows.append({"kind": "projection (model)", "tokens_per_gpu": tokens, "S": tokens * world,
                             "max_context": None if row["max_tokens_per_gpu"] is None
                             else row["max_tokens_per_gpu"] * world, **row})
    prefill = cfg.problem(seq_len=cfg.prefill_seq_len, heads=cfg.prefill_heads, kv_heads=cfg.prefill_kv_heads,
                          backward=False, batch=1)
    prefill_rows = []
    for row in prediction_rows(prefill, cfg.prefill_world_size, machine):
        prefill_rows.append({"kind": "projection (model), attention only", "S": cfg.prefill_seq_len,
                             "layers": cfg.prefill_layers, "attention_s": row["ms"] * cfg.prefill_layers / 1e3,
                             **row})
    prefill_rows.append({"kind": "published", "name": cfg.prefill_name, "S": cfg.prefill_seq_len,
                         "world_size": cfg.prefill_world_size, "seconds": cfg.prefill_published_s,
                         "efficiency": cfg.prefill_published_efficiency})
    return {"rows": rows, "prefill": prefill_rows}


PROJECTION_LABEL = "PROJECTION FROM THE COST MODEL (fa3dist.plan), NOT A MEASUREMENT"
_PLOT_LABEL = "PROJECTION FROM THE COST MODEL\n(fa3dist.plan), NOT A MEASUREMENT"


def _tokens(n: float | None) -> str | None:
    if n is None:
        return None
    for unit, size in (("M", 2**20), ("K", 2**10)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def predictions_markdown(rows: list[dict[str, Any]]) -> str:
    """The predictions of ``prediction_rows`` as a table."""
    from .bench.common import markdown_table

    header = ["scheme", "G", "N", "ms", "compute ms", "ring transfers ms", "not hidden ms", "all-to-all ms",
              "TFLOP/s/GPU", "efficiency", "KiB/token", "longest shard", "chosen"]
    body = [[r["scheme"], r["head_group_size"], r["ring_size"], r["ms"], r["compute_ms"], r["ring_transfer_ms"],
             r["ring_exposed_ms"], r["all_to_all_ms"], r["tflops_per_gpu"], r["efficiency"], r["kib_per_token"],
             _tokens(r["max_tokens_per_gpu"]), "yes" if r["chosen"] else ""] for r in rows]
    return markdown_table(header, body)


def machine_summary(machine: Machine) -> str:
    return (f"nodes of {machine.gpus_per_node} GPUs; links per GPU per direction: {machine.intra_node_gbps:g} GB/s "
            f"send/recv and {machine.intra_node_all_to_all_gbps:g} GB/s all-to-all inside a node, "
            f"{machine.inter_node_gbps:g} GB/s across nodes; {machine.latency_us:g} us per transfer, "
            f"{machine.step_overhead_us:g} us per ring step, {machine.call_overhead_us:g} us per call; "
            f"{machine.overlap:g} of a ring transfer hidden by the kernels running with it; "
            f"{machine.memory_gib:g} GiB per GPU for one layer; kernel rates: {machine.kernel.source}")


def projection_markdown(cfg: PlanConfig, result: dict[str, list[dict[str, Any]]]) -> str:
    """The projection tables, labelled as model output, next to the published prefill."""
    from .bench.common import markdown_table

    machine = cfg.machine()
    intro = (f"**{PROJECTION_LABEL}.** Every figure below except the row marked \"published\" comes from "
             f"the cost model with these inputs: {machine_summary(machine)}. Problem: B={cfg.batch}, H={cfg.heads}, "
             f"H_kv={cfg.kv_heads}, D={cfg.head_dim}, {cfg.dtype}, causal={cfg.causal}, "
             f"{'forward and backward' if cfg.backward else 'forward only'}, {cfg.layout}. \"longest context\" is "
             f"the longest sequence whose one attention layer (forward and backward, inputs and gradients "
             f"included, nothing else) fits {cfg.memory_gib:g} GiB per GPU, from the peak bytes per local token of "
             f"``fa3dist.plan.bytes_per_token`` (the ring's 72-76 KiB at H=32/8, D=128, bf16).")
    header = ["GPUs", "tokens/GPU", "S", "scheme", "G x N", "TFLOP/s/GPU", "efficiency", "not hidden ms",
              "all-to-all ms", "KiB/token", "longest context", "model's choice"]
    body = [[r["world_size"], _tokens(r["tokens_per_gpu"]), _tokens(r["S"]), r["scheme"],
             f"{r['head_group_size']} x {r['ring_size']}", r["tflops_per_gpu"], r["efficiency"], r["ring_exposed_ms"],
             r["all_to_all_ms"], r["kib_per_token"], _tokens(r["max_context"]), "yes" if r["chosen"] else ""]
            for r in result["rows"]]
    pre = result["prefill"]
    model_rows = [r for r in pre if r["kind"] != "published"]
    (published,) = [r for r in pre if r["kind"] == "published"]
    prefill_header = ["source", "scheme", "GPUs", "S", "attention ms per layer", "seconds", "efficiency"]
    prefill_body = [[f"model: {r['layers']} attention layers only", r["scheme"], r["world_size"], _tokens(r["S"]),
                     r["ms"], r["attention_s"], r["efficiency"]] for r in model_rows]
    prefill_body.append([f"published: {published['name']}, whole model", "", published["world_size"],
                         _tokens(published["S"]), None, published["seconds"], published["efficiency"]])
    prefill_note = (f"The published prefill (ANCHORS.md) is the whole model on {published['world_size']} H100s; the "
                    f"model rows are only its attention: {cfg.prefill_layers} layers of forward causal attention at "
                    f"H={cfg.prefill_heads}, H_kv={cfg.prefill_kv_heads}, D={cfg.head_dim}, on the machine above. "
                    "The model's efficiency is per-GPU TFLOP/s over the kernel's unmasked rate at the longest "
                    "measured length (every FLOP at full speed on one GPU); Meta's is their parallel efficiency. "
                    "The two are not the same measure of the same work.")
    return "\n\n".join([intro, markdown_table(header, body), f"### {cfg.prefill_name}", prefill_note,
                        markdown_table(prefill_header, prefill_body)])


def write_projection(cfg: PlanConfig, out_dir: str, plot: bool) -> list[str]:
    """Run ``project`` and write <name>-projection-<date>.json/.md (and PNG with ``plot``) under ``out_dir``."""
    import dataclasses

    from .bench.common import run_meta, write_results

    result = project(cfg)
    meta = run_meta(cfg.prefill_world_size, config=dataclasses.asdict(cfg), label=PROJECTION_LABEL)
    meta["gpu"] = "none (model output)"
    stem = f"{cfg.name}-projection-{meta['date']}"
    paths = [str(p) for p in write_results(out_dir, stem, meta, result["rows"] + result["prefill"],
                                           projection_markdown(cfg, result))]
    if plot:
        from .bench.plot import plot_lines

        rows = [dict(r, tokens=f"{_tokens(r['tokens_per_gpu'])}/GPU") for r in result["rows"]]
        paths.append(plot_lines(rows, f"{out_dir}/{stem}-tflops.png", x="world_size", y="tflops_per_gpu",
                                series=["scheme"], panels=["tokens"], title=f"{_PLOT_LABEL}\nTFLOP/s per GPU",
                                xlabel="GPUs", ylabel="TFLOP/s per GPU (model)", logx=True))
        longest = [dict(r, memory=f"{cfg.memory_gib:g} GiB/GPU") for r in rows
                   if r["tokens_per_gpu"] == cfg.project_tokens_per_gpu[0]]
        paths.append(plot_lines(longest, f"{out_dir}/{stem}-context.png", x="world_size", y="max_context",
                                series=["scheme"], panels=["memory"], title=f"{_PLOT_LABEL}\nlongest context",
                                xlabel="GPUs", ylabel="tokens (model)", logx=True))
    return paths
