"""torchrun entry: ``torchrun --nproc-per-node N -m fa3dist.launch.torchrun JOB --config X [--set k=v]``,
and ``launch_torchrun``, which starts it for the CLI's ``--launcher torchrun``.

Every rank builds the job's config and runs the same ``run_worker`` as the other launchers. Rank 0
writes ``result.json`` to the run folder; per-rank logs go there too. torchrun stops all ranks
when one fails and reports that rank's error (``@record``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from torch.distributed.elastic.multiprocessing.errors import record

from fa3dist.config import LaunchOptions, load_config
from fa3dist.jobs import config_class, job_name, job_names

from .errors import RankFailedError
from .worker import run_worker

log = logging.getLogger("fa3dist.launch")


@record
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fa3dist.launch.torchrun",
                                     description="Run an fa3dist job as one torchrun rank.")
    parser.add_argument("job", choices=job_names(), help="which job to run")
    parser.add_argument("--config", help="YAML file of the job's settings")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--run-dir", help="folder for logs and result.json (default <out>/<job>-<run id>)")
    args = parser.parse_args(argv)
    cfg = load_config(config_class(args.job), args.config, args.set)
    run_dir = args.run_dir or str(Path(cfg.out) / f"{args.job}-{os.environ.get('TORCHELASTIC_RUN_ID', 'local')}")
    cfg = dataclasses.replace(cfg, out=run_dir)
    run_worker(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"rank 0 wrote {Path(run_dir) / 'result.json'}")
    return 0


def launch_torchrun(cfg: LaunchOptions, world_size: int, *, max_restarts: int = 0) -> dict[str, Any]:
    """Run ``cfg``'s job under ``torchrun --standalone`` on this host; return rank 0's result.

    torchrun stops every rank when one fails and prints that rank's error; it then restarts all
    ranks up to ``max_restarts`` times (TORCHELASTIC_RESTART_COUNT tells the job), and after that
    this raises ``RankFailedError``.
    """
    config_file = Path(cfg.out) / "config.yaml"
    config_file.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
           f"--max-restarts={max_restarts}", "-m", "fa3dist.launch.torchrun", job_name(cfg),
           "--config", str(config_file), "--run-dir", cfg.out]
    log.info("running %s", " ".join(cmd))
    # A restart must not reuse the rendezvous store of the failed attempt: its stale addresses make
    # the new process group connect to dead ranks (pytorch/pytorch#135712).
    env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1") if max_restarts else None
    code = subprocess.run(cmd, env=env).returncode
    if code != 0:
        raise RankFailedError(None, f"torchrun exited with code {code}; its report above names the failing rank")
    return json.loads((Path(cfg.out) / "result.json").read_text())


if __name__ == "__main__":
    sys.exit(main())
