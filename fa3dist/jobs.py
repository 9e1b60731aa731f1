"""The jobs a launcher can run: each has a config dataclass, a per-rank function and a summary.

The launchers' worker dispatches through ``job_for``; the CLI and the torchrun entry find a job by
name and print ``summary(job, result)``, the lines a finished run shows, with the exit code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Job:
    config: type
    run: Callable[..., dict[str, Any]]  # run(cfg, ctx) -> result, on every rank
    summary: Callable[[dict[str, Any]], tuple[str, int]]  # rank 0's result -> (lines to print, exit code)


def _scaling_summary(result: dict[str, Any]) -> tuple[str, int]:
    table = Path(next(p for p in result["paths"] if p.endswith(".md"))).read_text()
    return "\n".join(["wrote:", *result["paths"], table]), 0


def _registry() -> dict[str, Job]:
    from .bench.scaling import ScalingConfig, run_scaling
    from .check import CheckConfig, check_summary, run_check
    from .demo import DemoConfig, demo_summary, run_demo
    from .train import TrainConfig, run_train, train_summary

    return {"demo": Job(DemoConfig, run_demo, demo_summary),
            "scaling": Job(ScalingConfig, run_scaling, _scaling_summary),
            "check": Job(CheckConfig, run_check, check_summary),
            "train": Job(TrainConfig, run_train, train_summary)}


def job_names() -> list[str]:
    return list(_registry())


def config_class(job: str) -> type:
    """The config dataclass of the job called ``job``."""
    try:
        return _registry()[job].config
    except KeyError:
        raise ValueError(f"unknown job {job!r}; jobs: {', '.join(job_names())}") from None


def job_for(cfg: Any) -> Callable[..., dict[str, Any]]:
    """The ``job(cfg, ctx) -> dict`` function for a config instance."""
    for job in _registry().values():
        if type(cfg) is job.config:
            return job.run
    raise TypeError(f"no job runs configs of type {type(cfg).__name__}")


def job_name(cfg: Any) -> str:
    """The name of the job a config instance belongs to."""
    return next(name for name, job in _registry().items() if type(cfg) is job.config)


def summary(job: str, result: dict[str, Any]) -> tuple[str, int]:
    """What a finished run of ``job`` prints, and the exit code it ends with."""
    return _registry()[job].summary(result)
