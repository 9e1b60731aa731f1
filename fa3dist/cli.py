"""The ``fa3dist`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, LaunchOptions, load_config
from .launch.errors import RankFailedError
from .demo import DTYPES, DemoConfig
from .kernels import BACKEND_NAMES
from .layout import num_chunks
from .ring.schedule import LAYOUTS


def _resolve_world(cfg: LaunchOptions, cpu_default: int) -> LaunchOptions:
    """Fill in world_size and device: one rank per GPU with 2+ GPUs, else CPU processes."""
    gpus = torch.cuda.device_count() if cfg.device != "cpu" else 0
    use_cuda = gpus >= 2 or (cfg.device == "cuda" and gpus >= 1)
    device = "cuda" if use_cuda else "cpu"
    world_size = cfg.world_size or (gpus if use_cuda else cpu_default)
    if device == "cuda" and world_size > gpus:
        raise ConfigError(f"world_size {world_size} needs {world_size} GPUs; {gpus} are visible "
                          "(NCCL cannot run two ranks on one GPU; use --device cpu for a CPU ring)")
    return dataclasses.replace(cfg, device=device, world_size=world_size)


def _run_dir(base: str, job: str) -> str:
    path = Path(base) / f"{job}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _format_table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    from fa3dist.launch.local import launch_local

    values = {k: getattr(args, k) for k in ("world_size", "seq_len", "heads", "kv_heads", "head_dim", "layout",
                                            "causal", "backend", "dtype", "device", "batch")}
    cfg = _resolve_world(load_config(DemoConfig, args.config, args.set, **values), cpu_default=4)
    if cfg.device == "cpu" and cfg.backend in ("cudnn", "flash2"):
        raise ConfigError(f"backend {cfg.backend!r} needs CUDA; this run is on the CPU (use --backend reference)")
    parts = num_chunks(cfg.world_size, cfg.layout)
    if cfg.seq_len % parts:
        raise ConfigError(f"seq_len {cfg.seq_len} does not split into {parts} equal chunks "
                          f"(layout {cfg.layout}, world_size {cfg.world_size})")
    cfg = dataclasses.replace(cfg, out=_run_dir(cfg.out, "demo"))
    print(f"fa3dist demo: {cfg.world_size} ranks on {cfg.device}, S={cfg.seq_len}, H={cfg.heads}, "
          f"H_kv={cfg.kv_heads}, D={cfg.head_dim}, {cfg.layout}, causal={cfg.causal}, backend={cfg.backend}")
    result = launch_local(cfg, cfg.world_size)
    (Path(cfg.out) / "result.json").write_text(json.dumps(result, indent=2))
    errs = result["errors"]
    print(_format_table(
        ["world_size", "layout", "causal", "dtype", "err out", "err dq", "err dk", "err dv", "max rel err",
         "ring s", "1-proc s"],
        [[result["world_size"], result["layout"], result["causal"], result["dtype"], errs["out"], errs["dq"],
          errs["dk"], errs["dv"], result["max_rel_error"], result["ring_s"], result["single_s"]]]))
    verdict = "match" if result["ok"] else "MISMATCH"
    print(f"{verdict}: max relative error {result['max_rel_error']:.3g} (tolerance {result['tolerance']:.0e}); "
          f"logs and result.json in {cfg.out}")
    return 0 if result["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fa3dist",
        description="Exact ring attention for long sequences: run the demo, benchmarks and scaling runs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="run ring attention over local processes and check it against one process",
        description="Start W local processes (4 CPU processes with gloo, or one per GPU with NCCL when 2+ GPUs "
                    "are visible), run ring_fa3_attention forward and backward on random inputs, compare "
                    "out/dq/dk/dv with the single-process result, and exit 1 on a mismatch.")
    demo.add_argument("--config", help="YAML file with demo settings (e.g. configs/demo.yaml)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    demo.add_argument("--world-size", type=int, help="number of ranks (default: GPUs if 2+, else 4)")
    demo.add_argument("--device", choices=["auto", "cuda", "cpu"], help="where ranks run (default auto)")
    demo.add_argument("--batch", type=int, help="batch size (default 1)")
    demo.add_argument("--seq-len", type=int, help="total sequence length over all ranks (default 1024)")
    demo.add_argument("--heads", type=int, help="query heads (default 8)")
    demo.add_argument("--kv-heads", type=int, help="key/value heads, dividing --heads (default 2)")
    demo.add_argument("--head-dim", type=int, help="head dimension (default 64)")
    demo.add_argument("--layout", choices=LAYOUTS, help="sequence layout (default zigzag)")
    demo.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None,
                      help="causal mask (default on)")
    demo.add_argument("--backend", choices=BACKEND_NAMES,
                      help="kernel backend (default auto: triton on CUDA, reference on CPU)")
    demo.add_argument("--dtype", choices=["auto", *DTYPES], help="dtype (default bfloat16 on CUDA, float32 on CPU)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"fa3dist: error: {err}", file=sys.stderr)
        return 2
    except RankFailedError as err:
        print(f"fa3dist: error: {err}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
