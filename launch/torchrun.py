"""torchrun entry: ``torchrun --nproc-per-node N -m fa3dist.launch.torchrun JOB --config X [--set k=v]``.

Every rank builds the job's config and runs the same ``run_worker`` as the other launchers. Rank 0
writes ``result.json`` to the run folder; per-rank logs go there too. torchrun stops all ranks
when one fails and reports that rank's error (``@record``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from fa3dist.config import load_config
from fa3dist.jobs import config_class, job_names

from .worker import run_worker


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


if __name__ == "__main__":
    sys.exit(main())
