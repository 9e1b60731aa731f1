"""Launch a job on a Ray cluster: one actor per rank, and the rank that fails first named.

1. Before anything starts, the request is compared with the cluster (``check_placement``): a
   placement that no set of alive nodes can hold is refused at once.
2. A placement group of one {GPU: 1, CPU: cpus_per_rank} bundle per rank ({CPU: cpus_per_rank}
   on a CPU-only run, with gloo), waited for with the config's timeout. The driver itself needs no
   GPU: a CPU head node can drive a GPU cluster.
3. One actor per bundle; the actors are sorted by node, then by GPU id, and ranked in that order.
4. Every node gets one shared CUDA_VISIBLE_DEVICES list (its actors' GPUs), so that NCCL sees the
   peers on its node and can use P2P; an actor's LOCAL_RANK is its GPU's place in that list.
5. Rank 0's actor binds the rendezvous port on its node.
6. Each actor starts its rank as a child process (``local.start_rank``) and reports the child's
   status file and exit code when the driver polls it: so a rank's exit code and signal are
   known, which Ray's own death cause does not tell.
7. The driver polls the actors (``watch.watch``); when a rank fails or hangs, every rank is stopped
   and ``RankFailedError`` names the rank that failed first (see errors.py).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from typing import Any

from fa3dist.config import ConfigError, LaunchOptions

from .errors import RankReport, blame
from .local import start_rank
from .status import read_status, status_path
from .watch import watch

log = logging.getLogger("fa3dist.launch")

# Variables that must reach the ranks unchanged (NVLink multicast stays off where the host says so).
PASS_THROUGH = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS", "NCCL_DEBUG",
                "TRITON_INTERPRET", "PYTHONPATH")
POLL_S = 0.5
START_TIMEOUT_S = 120.0  # for Ray to place the ranks and start their actors (at least the config's timeout)


class RankActor:
    """A Ray actor that runs one rank as its child process and reports on it."""

    def __init__(self) -> None:
        self._proc = None
        self._status = None

    def placement(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        return {"node": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(),
                "gpus": [int(g) for g in ray.get_gpu_ids()]}

    def bind_port(self) -> int:
        with socket.socket() as sock:
            sock.bind(("", 0))
            return sock.getsockname()[1]

    def start(self, cfg: LaunchOptions, env: dict[str, str]) -> None:
        self._status = status_path(cfg.out, int(env["RANK"]))
        self._status.unlink(missing_ok=True)
        self._proc = start_rank(cfg, env)

    def poll(self) -> tuple[int | None, dict[str, Any] | None]:
        """The rank's exit code (None while it runs) and its last status (read after the exit code)."""
        exitcode = self._proc.exitcode
        return exitcode, read_status(self._status)

    def result(self) -> dict[str, Any]:
        return json.loads((self._status.parent.parent / "result.json").read_text())

    def stop(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=30)


def connect(address: str | None) -> None:
    """Join the Ray cluster at ``address`` (or a running one, or start a local one)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("the Ray launcher needs Ray: pip install 'fa3dist[ray]'") from None
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=True,
                 logging_level=logging.getLogger("fa3dist").getEffectiveLevel())
    except (ConnectionError, ValueError, TimeoutError) as err:
        reason = str(err).strip().split(". ")[0].rstrip(".") or type(err).__name__  # Ray's advice names its flags
        raise ConfigError(f"--ray-address {address}: no Ray cluster could be joined there ({reason}); start one "
                          "with `ray start --head`, or leave --ray-address out to start a local one") from None


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def rank_bundle(cfg: LaunchOptions) -> dict[str, float]:
    """The resources one rank reserves."""
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and cluster_gpus() > 0)
    return {"GPU": 1, "CPU": cfg.cpus_per_rank} if use_gpu else {"CPU": cfg.cpus_per_rank}


def check_placement(world_size: int, bundle: dict[str, float]) -> None:
    """Raise ConfigError when the cluster's alive nodes cannot hold ``world_size`` bundles."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    fits = sum(min(int(res.get(k, 0) / v + 1e-9) for k, v in bundle.items()) for res in nodes)
    if fits < world_size:
        total = ray.cluster_resources()
        have = ", ".join(f"{total.get(k, 0):g} {k}" for k in ("CPU", "GPU"))
        hint = "lower --world-size" + (", or --set cpus_per_rank=<fewer>" if "GPU" not in bundle else "")
        raise ConfigError(f"the Ray cluster cannot place {world_size} ranks of {bundle}: its {len(nodes)} node(s) "
                          f"have {have}, room for {fits} such rank(s); {hint}")


def _death_cause(err: Exception) -> str:
    text = " ".join(str(err).split())
    start = text.find("The actor is dead because")
    return (text[start:start + 240] if start >= 0 else text[:240]) or type(err).__name__


def launch_ray(cfg: LaunchOptions, world_size: int, *, address: str | None = None) -> dict[str, Any]:
    """Run ``cfg``'s job on ``world_size`` Ray actors; return rank 0's result.

    Connects to ``address`` (or a running cluster, or starts a local one).
    """
    connect(address)
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = rank_bundle(cfg)
    check_placement(world_size, bundle)
    use_gpu = "GPU" in bundle
    group = placement_group([bundle] * world_size, strategy="PACK")
    start_timeout = max(cfg.timeout_s, START_TIMEOUT_S)
    try:
        ray.get(group.ready(), timeout=start_timeout)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise RuntimeError(f"Ray could not place {world_size} ranks of {bundle} within {start_timeout:g} s: other "
                           f"jobs hold the resources (free now: {ray.available_resources()})") from None
    actor_cls = ray.remote(num_cpus=bundle["CPU"], num_gpus=1 if use_gpu else 0, max_restarts=0)(RankActor)
    actors = [actor_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        placement_group=group, placement_group_bundle_index=i)).remote() for i in range(world_size)]
    try:
        placements = ray.get([a.placement.remote() for a in actors], timeout=start_timeout)
        order = sorted(range(world_size), key=lambda i: (placements[i]["node"], placements[i]["gpus"], i))
        ranks = [actors[i] for i in order]
        node_gpus: dict[str, list[int]] = {}
        for i in order:
            node_gpus.setdefault(placements[i]["node"], []).extend(placements[i]["gpus"])
        port = ray.get(ranks[0].bind_port.remote(), timeout=start_timeout)
        base_env = {k: os.environ[k] for k in PASS_THROUGH if k in os.environ}
        base_env.update(WORLD_SIZE=str(world_size), MASTER_ADDR=placements[order[0]]["ip"], MASTER_PORT=str(port))
        starts = []
        for rank, i in enumerate(order):
            env = dict(base_env, RANK=str(rank))
            if use_gpu:
                visible = sorted(node_gpus[placements[i]["node"]])
                env.update(CUDA_VISIBLE_DEVICES=",".join(map(str, visible)),
                           LOCAL_RANK=str(visible.index(placements[i]["gpus"][0])),
                           LOCAL_WORLD_SIZE=str(len(visible)))
            else:
                env.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
            starts.append(actors[i].start.remote(cfg, env))
        ray.get(starts, timeout=start_timeout)
        log.info("started %d ranks on %d node(s)", world_size, len(node_gpus))
        last: dict[int, dict[str, Any] | None] = {}

        def poll() -> list[RankReport]:
            reports = []
            for rank, ref in enumerate([a.poll.remote() for a in ranks]):
                try:
                    exitcode, last[rank] = ray.get(ref, timeout=start_timeout)
                    reports.append(RankReport(rank, last[rank], exitcode))
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
                    reports.append(RankReport(rank, last.get(rank), lost=f"its Ray actor died ({_death_cause(err)})"))
            return reports

        def stop() -> None:
            refs = [a.stop.remote() for a in ranks]
            ray.wait(refs, num_returns=len(refs), timeout=30)

        reports = watch(poll, stop, cfg.timeout_s, poll_s=POLL_S)
        if any(r.failed for r in reports):
            raise blame(reports, cfg.timeout_s)
        return ray.get(ranks[0].result.remote(), timeout=start_timeout)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(group)
