"""torchrun entry: ``torchrun --nproc-per-node N -m fa3dist.launch.torchrun JOB --config X [--set k=v]``,
and ``launch_torchrun``, which runs it for the CLI's ``--launcher torchrun``.

Every rank builds the job's config, checks it (one line and exit code 2 on a bad setting), and
runs the same ``run_worker`` as the other launchers. Rank 0 writes ``result.json`` to the run
folder and prints the job's summary (the demo's table and verdict; exit code 1 on a mismatch).
A failing rank's error goes to torchrun's error file (``@record``) and to its log, not to the
console; a rank whose error only follows another rank's failure exits ``PEER_EXIT_DELAY_S`` later,
so that torchrun's own report names the rank that caused it. Under ``torchrun --max-restarts N`` the
agent restarts every rank after a failure; the train job then resumes from its last checkpoint
(``TORCHELASTIC_RESTART_COUNT`` above 0), and the worker keeps each attempt's keys apart in the store.

``launch_torchrun`` runs torchrun's own engine (``elastic_launch`` with the configuration that
``torchrun --standalone --nproc-per-node N`` builds) in a thread, so that it learns every failed
rank's exit code, signal and error file, while the driver watches the ranks' status files; the
verdict names the rank that failed first (see errors.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure, record
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from fa3dist.config import ConfigError, LaunchOptions, load_config
from fa3dist.jobs import config_class, job_name, job_names, summary

from .errors import RankReport, blame
from .local import clear_status, die_with_parent
from .status import is_peer_symptom, read_status, status_path
from .watch import watch
from .worker import run_worker

log = logging.getLogger("fa3dist.launch")

# A rank whose error is a consequence of another's (a lost connection, a timeout) exits this much later.
PEER_EXIT_DELAY_S = 3.0


@record
def _run_rank(cfg: LaunchOptions) -> dict[str, Any]:
    return run_worker(cfg)


def _config(args: argparse.Namespace) -> LaunchOptions:
    """The job's config as this rank sees it, checked like the CLI checks it."""
    import torch

    from .resources import check_resolved

    cfg = load_config(config_class(args.job), args.config, args.set)
    run_dir = args.run_dir or str(Path(cfg.out) / f"{args.job}-{os.environ.get('TORCHELASTIC_RUN_ID', 'local')}")
    gpus, ranks_here = torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if cfg.device == "cuda" and gpus == 0:
        raise ConfigError("device cuda: no GPU is visible on this host (set device: cpu for a CPU run)")
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0) else "cpu"
    if device == "cuda" and ranks_here > gpus:
        raise ConfigError(f"{ranks_here} ranks on this host, {gpus} GPU(s): two ranks on one GPU is not supported")
    cfg = dataclasses.replace(cfg, out=run_dir, device=device, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    check_resolved(cfg, ranks_here=ranks_here, source=args.config or "this job")
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fa3dist.launch.torchrun",
                                     description="Run an fa3dist job as one torchrun rank.")
    parser.add_argument("job", choices=job_names(), help="which job to run")
    parser.add_argument("--config", help="YAML file of the job's settings")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--run-dir", help="folder for logs and result.json (default <out>/<job>-<run id>)")
    parser.add_argument("--quiet", action="store_true", help="print no summary (the launcher prints it)")
    args = parser.parse_args(argv)
    die_with_parent()
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        cfg = _config(args)
    except ConfigError as err:
        if rank0:
            print(f"fa3dist: error: {err}", file=sys.stderr)
        return 2
    try:
        result = _run_rank(cfg)
    except Exception as exc:  # the traceback is in torchrun's error file and this rank's log
        if is_peer_symptom(exc):
            time.sleep(PEER_EXIT_DELAY_S)  # so that torchrun's agent sees the rank that caused it fail first
        return 1
    if rank0 and not args.quiet:
        text, code = summary(args.job, result)
        print(f"{text}\nlogs and result.json in {cfg.out}", flush=True)
        return code
    return 0


def _error_file_status(failure: ProcessFailure) -> dict[str, Any] | None:
    """A status for a rank that failed before it wrote one, from torchrun's error file (None if
    the rank died without writing one)."""
    if not os.path.isfile(failure.error_file):
        return None
    message = failure.message
    text = message.get("message", "") if isinstance(message, dict) else str(message)
    stack = message.get("extraInfo", {}).get("py_callstack", "") if isinstance(message, dict) else ""
    return {"state": "failed", "peer": False, "summary": text.splitlines()[0] if text else "error",
            "error": stack or text, "failed_at": float(failure.timestamp)}


def launch_torchrun(cfg: LaunchOptions, world_size: int) -> dict[str, Any]:
    """Run ``cfg``'s job under torchrun's engine on this host; return rank 0's result.

    When a rank fails, torchrun stops the others; ``RankFailedError`` names the rank that failed
    first and how. The agent does not restart ranks here: a restart (``fa3dist train --max-restarts``)
    is a new launch, with a new rendezvous, that the CLI makes after the error.
    """
    clear_status(cfg.out)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    config_file = Path(cfg.out) / "config.yaml"
    config_file.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=world_size, run_id=f"fa3dist-{uuid.uuid4()}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn", logs_specs=DefaultLogsSpecs(log_dir=str(Path(cfg.out) / "torchrun")))
    args = ["-m", "fa3dist.launch.torchrun", job_name(cfg), "--config", str(config_file), "--run-dir", cfg.out,
            "--quiet"]
    outcome: dict[str, Any] = {}

    def agent() -> None:
        try:
            elastic_launch(launch, sys.executable)(*args)
            outcome["failures"] = {}
        except ChildFailedError as err:
            outcome["failures"] = err.failures
        except BaseException as err:  # rendezvous or agent error: re-raised below
            outcome["error"] = err

    thread = threading.Thread(target=agent, name="fa3dist-torchrun-agent", daemon=True)
    thread.start()
    killed: set[int] = set()

    def poll() -> list[RankReport]:
        agent_done = not thread.is_alive()  # first: the statuses read after it are final once it is done
        statuses = [read_status(status_path(cfg.out, r)) for r in range(world_size)]
        if not agent_done:
            return [RankReport(r, s) for r, s in enumerate(statuses)]
        failures: dict[int, ProcessFailure] = outcome.get("failures", {})
        reports = []
        for rank, status in enumerate(statuses):
            if rank in failures:
                failure = failures[rank]
                if rank not in killed and (status or {}).get("state") != "failed":
                    status = _error_file_status(failure) or status
                stopped = rank in killed or failure.exitcode == -signal.SIGTERM  # the agent stops ranks by SIGTERM
                reports.append(RankReport(rank, status, failure.exitcode, stopped=stopped))
            elif (status or {}).get("state") == "done":
                reports.append(RankReport(rank, status, 0))
            else:  # torchrun's agent stopped it after another rank failed
                reports.append(RankReport(rank, status, -signal.SIGTERM, stopped=True))
        return reports

    def stop() -> None:
        for rank in range(world_size):
            status = read_status(status_path(cfg.out, rank))
            if status is not None:
                try:
                    os.kill(status["pid"], signal.SIGKILL)
                    killed.add(rank)
                except ProcessLookupError:
                    pass

    reports = watch(poll, stop, cfg.timeout_s)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    if any(r.failed for r in reports):
        raise blame(reports, cfg.timeout_s)
    return json.loads((Path(cfg.out) / "result.json").read_text())


if __name__ == "__main__":
    sys.exit(main())
