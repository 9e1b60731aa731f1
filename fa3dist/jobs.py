"""Which function runs each kind of job config; the launchers' worker dispatches through it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def job_for(cfg: Any) -> Callable[..., dict[str, Any]]:
    """The ``job(cfg, ctx) -> dict`` function for a config instance."""
    from .demo import DemoConfig, run_demo

    jobs: dict[type, Callable[..., dict[str, Any]]] = {DemoConfig: run_demo}
    try:
        return jobs[type(cfg)]
    except KeyError:
        raise TypeError(f"no job runs configs of type {type(cfg).__name__}") from None
