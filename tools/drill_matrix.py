"""Repeat the fault-drill matrix and report how often each launcher named the right rank.

Every drill runs ``fa3dist check`` with one rank failing on purpose (raise, exit with code 17,
SIGKILL, or hang) and records the rank the launcher's error named, how it said the rank failed,
and the time from the injected failure to the error. A drill is right when both the rank and the
way match.

  python tools/drill_matrix.py --repeat 10                          # CPU: local, torchrun, Ray; rank 0 of 2, rank 1 of 3
  python tools/drill_matrix.py --device cuda --launchers torchrun ray --ranks 0:2 1:2 --timeout-s 20

Writes <out>/<name>.json (every drill) and <name>.md (the table), and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fa3dist.launch.drill import LAUNCHERS, DrillResult, run_drill

MODES = ("raise", "exit", "kill", "hang")


def _pairs(text: str) -> tuple[int, int]:
    rank, world = text.split(":")
    return int(rank), int(world)


def run_matrix(args: argparse.Namespace, work: Path) -> list[DrillResult]:
    """Every (launcher, mode, rank) drill, ``args.repeat`` times; ``args.parallel`` at once."""
    jobs = [(rep, launcher, mode, rank, world) for rep in range(args.repeat) for launcher in args.launchers
            for mode in MODES for rank, world in args.ranks]
    settings = {"cpus_per_rank": args.cpus_per_rank} if "ray" in args.launchers else {}

    def one(job: tuple) -> DrillResult:
        rep, launcher, mode, rank, world = job
        result = run_drill(launcher, mode, rank, world, out=work / f"{launcher}-{mode}-{rank}-{rep}",
                           timeout_s=args.timeout_s, device=args.device, **settings)
        print(f"{launcher:8} {mode:5} rank {rank} of {world}: {'right' if result.right else 'WRONG'} "
              f"({result.first_line[:90]}; {result.after_failure_s or float('nan'):.1f} s after the failure)",
              flush=True)
        return result

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        return list(pool.map(one, jobs))


def markdown(results: list[DrillResult], args: argparse.Namespace) -> str:
    lines = [f"Fault drills: `fa3dist check` with one failing rank, {args.repeat} run(s) of each, device "
             f"{args.device}, process-group timeout {args.timeout_s:g} s, {args.parallel} drill(s) at once.", "",
             "| launcher | failure | rank (of W) | right | ranks named | s from failure to error: median (max) |",
             "|---|---|---|---|---|---|"]
    groups: dict[tuple, list[DrillResult]] = {}
    for r in results:
        groups.setdefault((r.launcher, r.mode, r.fail_rank, r.world_size), []).append(r)
    for (launcher, mode, rank, world), runs in groups.items():
        named = ", ".join(f"{rank_kind} x{count}" for rank_kind, count in
                          Counter(f"{r.named_rank} {r.kind}" for r in runs).most_common())
        waits = [r.after_failure_s for r in runs if r.after_failure_s is not None]
        wait = f"{statistics.median(waits):.1f} ({max(waits):.1f})" if waits else "n/a"
        lines.append(f"| {launcher} | {mode} | {rank} (of {world}) | {sum(r.right for r in runs)}/{len(runs)} | "
                     f"{named} | {wait} |")
    right = sum(r.right for r in results)
    lines += ["", f"Right: {right} of {len(results)} drills."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs of the whole matrix")
    parser.add_argument("--launchers", nargs="+", choices=LAUNCHERS, default=list(LAUNCHERS))
    parser.add_argument("--ranks", nargs="+", type=_pairs, default=[(0, 2), (1, 3)], metavar="RANK:WORLD",
                        help="failing rank and world size (default 0:2 1:3)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="process-group timeout")
    parser.add_argument("--parallel", type=int, default=1, help="drills at once")
    parser.add_argument("--cpus-per-rank", type=float, default=0.1, help="CPUs a Ray rank reserves")
    parser.add_argument("--ray-cpus", type=int, help="start a local Ray with this many CPUs (default: Ray's count)")
    parser.add_argument("--out", default="bench/results/logs", help="folder for the JSON and Markdown")
    parser.add_argument("--work", default="runs/drills", help="folder for the drills' run folders (logs)")
    parser.add_argument("--name", default=f"drills-{time.strftime('%Y-%m-%d')}", help="file name stem")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if "ray" in args.launchers:
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    start = time.time()
    results = run_matrix(args, Path(args.work) / args.name)
    table = markdown(results, args) + f"\nWall time: {time.time() - start:.0f} s.\n"
    (out / f"{args.name}.json").write_text(json.dumps([dataclasses.asdict(r) | {"right": r.right} for r in results],
                                                      indent=1))
    (out / f"{args.name}.md").write_text(table)
    print(table)
    return 0 if all(r.right for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
