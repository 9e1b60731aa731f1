"""The ``fa3dist`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .check import FAIL_MODES
from .config import ConfigError, LaunchOptions, load_config
from .demo import DTYPES
from .jobs import config_class, summary
from .kernels import BACKEND_NAMES
from .launch.drill import LAUNCHERS, launch
from .launch.errors import RankFailedError
from .launch.resources import check_memory, check_resolved, resolve_launch
from .ring.schedule import LAYOUTS


def _run_dir(base: str, job: str) -> str:
    path = Path(base) / f"{job}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _prepare(cfg: LaunchOptions, args: argparse.Namespace, cpu_default: int) -> LaunchOptions:
    """Resolve the device and the ranks where the launcher will run them, and check everything
    that can be checked before a rank starts (ConfigError otherwise)."""
    source = args.config or "this job"
    if args.launcher != "ray":
        if args.ray_address is not None:
            raise ConfigError("--ray-address is for --launcher ray")
        gpus = torch.cuda.device_count() if cfg.device != "cpu" else 0
        cfg = resolve_launch(cfg, gpus=gpus, cpu_default=cpu_default)
        check_resolved(cfg, ranks_here=cfg.world_size, source=source)
        return cfg
    from .launch import ray_launcher

    ray_launcher.connect(args.ray_address)
    cfg = resolve_launch(cfg, gpus=ray_launcher.cluster_gpus(), cpu_default=cpu_default, where="in the Ray cluster")
    check_resolved(cfg, ranks_here=None, source=source)
    ray_launcher.check_placement(cfg.world_size, ray_launcher.rank_bundle(cfg))
    return cfg


def run_launched_job(args: argparse.Namespace, job: str, values: dict[str, Any], *, cpu_default: int,
                     fill: Callable[[Any], Any] = lambda cfg: cfg, details: Callable[[Any], str] = lambda cfg: "",
                     run_dir: str | None = None, max_restarts: int = 0) -> int:
    """Load, check and launch ``job``, print its summary, return its exit code. ``values`` are the
    command's options (None: not given), ``fill`` sets job-specific defaults (and may refuse the
    config with ConfigError), ``details`` adds to the first line printed. The run folder is
    ``run_dir``, or a new ``<out>/<job>-<time>``. After a failed rank the job is relaunched with
    ``resume`` set, at most ``max_restarts`` times (for jobs that resume from a checkpoint)."""
    cfg = fill(load_config(config_class(job), args.config, args.set, **values))
    cfg = _prepare(cfg, args, cpu_default)
    if run_dir:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(cfg, out=run_dir or _run_dir(cfg.out, job))
    print(f"fa3dist {job}: {cfg.world_size} ranks on {cfg.device} ({args.launcher}){details(cfg)}; logs in {cfg.out}",
          flush=True)
    for restart in range(max_restarts + 1):
        try:
            result = launch(cfg, args.launcher, ray_address=args.ray_address)
            break
        except RankFailedError as err:
            if restart == max_restarts:
                raise
            print(f"fa3dist {job}: {err}\nrestarting from the last checkpoint (restart {restart + 1} of "
                  f"{max_restarts})", file=sys.stderr, flush=True)
            cfg = dataclasses.replace(cfg, resume=True)
    text, code = summary(job, result)
    print(text)
    return code


def _add_launch_args(parser: argparse.ArgumentParser, config_help: str) -> None:
    parser.add_argument("--config", help=config_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local",
                        help="local processes (default), torchrun, or Ray actors")
    parser.add_argument("--ray-address", help="Ray cluster to join (default: a running one, or start a local one)")
    parser.add_argument("--world-size", type=int, help="number of ranks (default: GPUs if 2+, else a CPU default)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], help="where ranks run (default auto)")


def cmd_demo(args: argparse.Namespace) -> int:
    values = {k: getattr(args, k) for k in ("world_size", "seq_len", "heads", "kv_heads", "head_dim", "layout",
                                            "causal", "backend", "dtype", "device", "batch")}
    return run_launched_job(args, "demo", values, cpu_default=4, details=lambda c: (
        f", S={c.seq_len}, H={c.heads}, H_kv={c.kv_heads}, D={c.head_dim}, {c.layout}, causal={c.causal}, "
        f"backend={c.backend}"))


def cmd_check(args: argparse.Namespace) -> int:
    values = {k: getattr(args, k) for k in ("world_size", "device", "fail_rank", "fail_mode", "timeout_s")}
    return run_launched_job(args, "check", values, cpu_default=2)


def cmd_scaling(args: argparse.Namespace) -> int:
    from .bench.common import command_line

    values = {"world_size": args.world_size, "device": args.device, "repeat": args.repeat, "results_dir": args.out,
              "plot": args.plot or None, "launcher": args.launcher, "command": command_line(),
              "max_context": args.max_context or None, "scheme": args.scheme}
    return run_launched_job(args, "scaling", values, cpu_default=2,
                            fill=lambda cfg: dataclasses.replace(cfg, world_size=cfg.world_size or max(cfg.world_sizes)))


def cmd_train(args: argparse.Namespace) -> int:
    from .train.checkpoint import latest_checkpoint

    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts must not be negative, got {args.max_restarts}")

    def fill(cfg: Any) -> Any:
        if cfg.resume and not args.out:
            raise ConfigError("--resume needs --out: the run folder whose checkpoints to continue from")
        if not cfg.resume and args.out and latest_checkpoint(Path(args.out) / "checkpoints") is not None:
            raise ConfigError(f"{args.out} holds checkpoints of an earlier run: pass --resume to continue it, "
                              "or give a new --out")
        return cfg

    values = {"world_size": args.world_size, "device": args.device, "resume": args.resume or None,
              "compile": args.compile or None, "plot": args.plot or None}
    return run_launched_job(args, "train", values, cpu_default=2, fill=fill, run_dir=args.out,
                            max_restarts=args.max_restarts,
                            details=lambda c: f", {c.steps} steps of {c.batch_size} x {c.seq_len} tokens")


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench == "kernel":
        from .bench.kernel import KernelBenchConfig as cls, write_kernel_results as run

        if not torch.cuda.is_available():
            raise ConfigError("bench kernel times kernels on a GPU; no GPU is visible here")
    else:
        from .bench.ring import RingBenchConfig as cls, write_ring_results as run
    cfg = load_config(cls, args.config, args.set)
    if args.bench == "ring":
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("bench ring measures the ring on one GPU; no GPU is visible here (a CPU smoke run: "
                              "fa3dist bench ring --config configs/bench_ring_cpu.yaml)")
        check_memory(cfg, cfg.device, source=args.config)
    paths = run(cfg, args.out, args.plot)
    print("\n".join(["wrote:", *paths]))
    md = next(p for p in paths if p.endswith(".md"))
    print(Path(md).read_text())
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan import PlanConfig, machine_summary, prediction_rows, predictions_markdown, write_projection

    cfg = load_config(PlanConfig, args.config, args.set)
    if args.project:
        paths = write_projection(cfg, args.out or cfg.results_dir, args.plot)
        print("\n".join(["wrote:", *paths]))
        print(Path(next(p for p in paths if p.endswith(".md"))).read_text())
        return 0
    try:
        machine = cfg.machine()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    rows = prediction_rows(cfg.problem(), cfg.world_size, machine)
    print(f"fa3dist plan: S={cfg.seq_len} on {cfg.world_size} GPUs, B={cfg.batch}, H={cfg.heads}, H_kv={cfg.kv_heads}, "
          f"D={cfg.head_dim}, {cfg.dtype}, causal={cfg.causal}, {'fwd+bwd' if cfg.backward else 'fwd'}, {cfg.layout}")
    print(f"machine: {machine_summary(machine)}")
    print(predictions_markdown(rows))
    print(f"choice: {next(r['scheme'] for r in rows if r['chosen'])}")
    return 0


def _bench_parser(sub, name: str, help_: str, description: str, default_config: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_, description=description)
    parser.add_argument("--config", default=default_config, help=f"YAML settings (default {default_config})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--out", default="bench/results", help="folder for the JSON and Markdown results")
    parser.add_argument("--plot", action="store_true", help="also write PNG charts (needs matplotlib)")
    parser.set_defaults(func=cmd_bench, bench=name)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fa3dist",
        description="Exact ring attention for long sequences: run the demo, benchmarks, scaling runs and training.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr, and show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="run ring attention over local processes and check it against one process",
        description="Start W local processes (4 CPU processes with gloo, or one per GPU with NCCL when 2+ GPUs "
                    "are visible), run ring_fa3_attention forward and backward on random inputs, compare "
                    "out/dq/dk/dv with the single-process result, and exit 1 on a mismatch.")
    _add_launch_args(demo, "YAML file with demo settings (e.g. configs/demo.yaml)")
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

    check = sub.add_parser(
        "check", help="check that the ranks can talk (and that a failing rank stops the job)",
        description="Pass a tensor round the ring and all-reduce it for a few rounds on every rank. "
                    "--fail-rank R makes rank R fail on purpose (--fail-mode raise|exit|kill|hang) to show that the "
                    "launcher stops every rank and names the failing one.")
    _add_launch_args(check, "YAML settings for the check (optional)")
    check.add_argument("--fail-rank", type=int, help="make this rank fail mid-run")
    check.add_argument("--fail-mode", choices=FAIL_MODES,
                       help="how it fails: raise, exit (code 17), kill (SIGKILL) or hang (default raise)")
    check.add_argument("--timeout-s", type=float, help="process-group timeout in seconds (default 60)")
    check.set_defaults(func=cmd_check)

    train = sub.add_parser(
        "train", help="train a Llama-style model over the ring (long context, checkpoints, restarts)",
        description="Train a small Llama-style decoder whose attention runs over the sequence-parallel ring: every "
                    "rank holds the same weights and its own slice of every sequence. Writes train_log.jsonl and "
                    "checkpoints into the run folder; --resume continues from the last complete checkpoint, and "
                    "--max-restarts relaunches the job from it after a rank fails.")
    _add_launch_args(train, "YAML settings, e.g. configs/train_tiny.yaml or configs/train_h200x2.yaml")
    train.add_argument("--out", help="run folder for logs and checkpoints (default runs/train-<time>)")
    train.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in --out")
    train.add_argument("--compile", action="store_true", help="torch.compile the model (fullgraph)")
    train.add_argument("--max-restarts", type=int, default=0,
                       help="after a rank fails, restart from the last checkpoint up to N times (default 0)")
    train.add_argument("--plot", action="store_true", help="also draw the loss curve to loss.png (needs matplotlib)")
    train.set_defaults(func=cmd_train)

    plan = sub.add_parser(
        "plan", help="predict flat ring, Ulysses and hierarchical times and pick one (a cost model)",
        description="Predict one attention call's time under each context-parallel scheme (flat ring, Ulysses "
                    "all-to-all, all-to-all inside nodes with the ring across) from kernel TFLOP/s (bench kernel "
                    "results), link bandwidths and the problem shape, and print the predictions and the choice. "
                    "--project writes the model's projection over the config's world sizes instead.")
    plan.add_argument("--config", help="YAML settings, e.g. configs/plan_h100_cluster.yaml")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    plan.add_argument("--project", action="store_true",
                      help="write the projection (JSON and Markdown, labelled as model output) under --out")
    plan.add_argument("--out", help="folder for --project results (default: the config's results_dir)")
    plan.add_argument("--plot", action="store_true", help="with --project, also write PNG charts")
    plan.set_defaults(func=cmd_plan)

    bench = sub.add_parser("bench", help="benchmarks (kernel, ring, scaling)",
                           description="Benchmarks that write JSON and Markdown results (and PNG with --plot).")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    _bench_parser(bench_sub, "kernel", "our kernels against cuDNN, FA2 and FlexAttention on one GPU",
                  "Time the Triton forward and backward kernels against PyTorch SDPA cuDNN, SDPA flash (FA2) and "
                  "torch.compile(flex_attention) in one process, over head dim x sequence length x causal, and "
                  "write kernel-<gpu>-<date>.json/.md with ours/cuDNN ratios.", "configs/bench_kernel.yaml")
    scaling = bench_sub.add_parser(
        "scaling", help="weak and strong scaling over GPUs against one GPU and PyTorch context parallel",
        description="Run the ring over the config's world sizes (weak scaling: fixed tokens per rank; strong: fixed "
                    "total S), the same schedule without communication (overlap efficiency), one GPU over the whole "
                    "sequence, and PyTorch's context_parallel on the same problem; write "
                    "scaling-<gpu>x<W>-<date>-<launcher>.json/.md (and PNG with --plot).")
    _add_launch_args(scaling, "YAML settings, e.g. configs/scaling_h100x4.yaml or configs/scaling_cpu.yaml")
    scaling.add_argument("--out", help="folder for the JSON and Markdown results (default bench/results)")
    scaling.add_argument("--repeat", type=int, help="measure everything N times (soak runs)")
    scaling.add_argument("--plot", action="store_true", help="also write PNG charts (needs matplotlib)")
    scaling.add_argument("--max-context", action="store_true",
                         help="instead: measure one fwd+bwd's peak memory at the max_context_tokens_per_rank sizes, "
                              "predict the longest sequence that fits the GPUs, and confirm it with one timed run")
    scaling.add_argument("--scheme", choices=["flat", "ulysses", "hierarchical", "auto"],
                         help="how the ranks share the work: the flat ring (default), the Ulysses all-to-all, the "
                              "all-to-all inside nodes of gpus_per_node with the ring across, or the cost model's "
                              "choice; rows name it and carry the model's predicted time")
    scaling.set_defaults(func=cmd_scaling)
    _bench_parser(bench_sub, "ring", "the ring schedule's overhead on one GPU (virtual ranks)",
                  "Run the ring's exact per-step schedule for W virtual ranks on one GPU, without communication, "
                  "against one kernel call over the whole sequence, and write ring-<gpu>-<date>.json/.md.",
                  "configs/bench_ring.yaml")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.verbose:  # torchrun's agent logs every rank it stops; our error says what matters
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        return args.func(args)
    except ConfigError as err:  # a user error: one line (-v: with the traceback)
        if args.verbose:
            traceback.print_exc()
        print(f"fa3dist: error: {err}", file=sys.stderr)
        return 2
    except RankFailedError as err:  # the first line names the rank; the rest is its traceback
        if args.verbose:
            traceback.print_exc()
        print(f"fa3dist: error: {err}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
