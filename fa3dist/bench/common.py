"""Shared benchmark pieces: FLOP counts, timing, run metadata and result files.

Result files are ``{"meta": {...}, "rows": [...]}`` JSON plus a Markdown table, as DESIGN.md
fixes them; tools read these names.
"""

from __future__ import annotations

import datetime
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

Checkpoint = Callable[[list[dict[str, Any]]], None]  # called with the rows measured so far
PASS_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def attention_flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool, pass_: str) -> float:
    """FLOPs as the FlashAttention papers count them: 4*B*H*S^2*D forward, halved when causal;
    backward 2.5x forward."""
    fwd = 4.0 * batch * heads * seq * seq * head_dim / (2 if causal else 1)
    return fwd * PASS_FACTOR[pass_]


def time_ms(fn: Callable[[], Any], *, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of ``fn`` in ms: ``triton.testing.do_bench`` on CUDA (events, after warm-up)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def time_ms_events(fn: Callable[[], Any], *, min_iters: int = 3, max_iters: int = 20, budget_ms: float = 1500,
                   barrier: Callable[[], None] | None = None,
                   agree: Callable[[float], float] | None = None) -> float:
    """Median time in ms of single calls after one timed warm-up call, for long calls and multi-rank runs.

    The number of calls fits ``budget_ms`` (between ``min_iters`` and ``max_iters``). On several
    ranks, ``agree`` maps the local warm-up time to the group's (e.g. an all-reduce max) so that
    every rank makes the same number of calls, and ``barrier`` lines the ranks up before each.
    On CUDA each call is timed with events after a synchronize; on the CPU with a wall clock.
    """
    cuda = torch.cuda.is_available()

    def timed() -> float:
        if barrier is not None:
            barrier()
        if not cuda:
            begin = time.perf_counter()
            fn()
            return (time.perf_counter() - begin) * 1e3
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    warm = timed()
    if agree is not None:
        warm = agree(warm)
    iters = int(min(max_iters, max(min_iters, budget_ms // max(warm, 1e-3))))
    return statistics.median(timed() for _ in range(iters))


def run_meta(world_size: int, **extra: Any) -> dict[str, Any]:
    """The "meta" block: hardware, software versions, date and the command line."""
    import triton

    cuda = torch.cuda.is_available()
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if cuda else None
    return {
        "gpu": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "nccl": nccl,
        "world_size": world_size,
        "date": datetime.date.today().isoformat(),
        "command": command_line(),
        **extra,
    }


def command_line() -> str:
    """How this process was started, without machine paths (``fa3dist ...`` or ``python -m ...``)."""
    script = Path(sys.argv[0])
    if script.name == "fa3dist":
        return shlex.join(["fa3dist", *sys.argv[1:]])
    if script.suffix == ".py" and "fa3dist" in script.parts:
        module = ".".join(script.with_suffix("").parts[script.parts.index("fa3dist"):])
        return shlex.join(["python", "-m", module, *sys.argv[1:]])
    return shlex.join(["python", script.name, *sys.argv[1:]])


def gpu_tag(meta: dict[str, Any]) -> str:
    """Short GPU name for file names, e.g. "h100" from "NVIDIA H100 80GB HBM3"."""
    name = meta["gpu"].lower()
    for tag in ("h200", "h100", "a100", "b200", "gh200"):
        if tag in name:
            return tag
    return "".join(c for c in name.split()[-1] if c.isalnum()) or "cpu"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 10 else f"{value:.0f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(out_dir: str | Path, stem: str, meta: dict[str, Any], rows: list[dict[str, Any]],
                  markdown: str) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` under ``out_dir``; return their paths. A ``meta["partial"]``
    (how much of a run is in ``rows``) is said in the Markdown too."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    header = (f"# {stem}\n\nMachine: {meta['gpu']} x{meta['world_size']}; torch {meta['torch']}, "
              f"triton {meta['triton']}, CUDA {meta['cuda']}, NCCL {meta['nccl']}; {meta['date']}.\n\n"
              f"Command: `{meta['command']}`\n\n")
    if meta.get("partial"):
        header += f"Partial run: {meta['partial']} measured.\n\n"
    md_path.write_text(header + markdown + "\n")
    return json_path, md_path
