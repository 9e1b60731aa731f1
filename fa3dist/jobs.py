"""The jobs a launcher can run: each has a config dataclass and a per-rank function.

The launchers' worker dispatches through ``job_for``; the CLI and the torchrun entry find a job's
config class by name through ``JOB_CONFIGS``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _registry() -> dict[str, tuple[type, Callable[..., dict[str, Any]]]]:
    from .bench.scaling import ScalingConfig, run_scaling
    from .check import CheckConfig, run_check
    from .demo import DemoConfig, run_demo
    from .train import TrainConfig, run_train

    return {"demo": (DemoConfig, run_demo), "scaling": (ScalingConfig, run_scaling), "check": (CheckConfig, run_check),
            "train": (TrainConfig, run_train)}


def job_names() -> list[str]:
    return list(_registry())


def config_class(job: str) -> type:
    """The config dataclass of the job called ``job``."""
    try:
        return _registry()[job][0]
    except KeyError:
        raise ValueError(f"unknown job {job!r}; jobs: {', '.join(job_names())}") from None


def job_for(cfg: Any) -> Callable[..., dict[str, Any]]:
    """The ``job(cfg, ctx) -> dict`` function for a config instance."""
    for cls, fn in _registry().values():
        if type(cfg) is cls:
            return fn
    raise TypeError(f"no job runs configs of type {type(cfg).__name__}")


def job_name(cfg: Any) -> str:
    """The name of the job a config instance belongs to."""
    return next(name for name, (cls, _) in _registry().items() if type(cfg) is cls)
