"""Launch a job on a Ray cluster: one actor per rank, failing fast when any rank fails.

1. A placement group of one {GPU: 1} bundle per rank ({CPU: 1} on a CPU-only run, with gloo),
   waited for with the config's timeout.
2. One actor per bundle; the actors are sorted by node, then by GPU id, and ranked in that order.
3. Every node gets one shared CUDA_VISIBLE_DEVICES list (its actors' GPUs), so that NCCL sees the
   peers on its node and can use P2P; an actor's LOCAL_RANK is its GPU's place in that list.
4. Rank 0's actor binds the rendezvous port on its node.
5. Each actor runs ``run_worker(cfg)`` with torchrun's environment and the config's process-group
   timeout; rank 0's progress bar and the actors' logs reach the driver through Ray's log stream.
6. When any rank raises or its actor dies, every actor is killed and ``RankFailedError`` names the
   rank with its traceback. The survivors never wait on a dead peer.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from fa3dist.config import LaunchOptions

from .errors import GRACE_S, Failure, blame

log = logging.getLogger("fa3dist.launch")

# Variables that must reach the ranks unchanged (NVLink multicast stays off where the host says so).
PASS_THROUGH = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS", "NCCL_DEBUG",
                "TRITON_INTERPRET", "PYTHONPATH")


class RankActor:
    """A Ray actor that runs one rank."""

    def placement(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        return {"node": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(),
                "gpus": [int(g) for g in ray.get_gpu_ids()]}

    def bind_port(self) -> int:
        with socket.socket() as sock:
            sock.bind(("", 0))
            return sock.getsockname()[1]

    def run(self, cfg: LaunchOptions, env: dict[str, str]) -> dict[str, Any]:
        os.environ.update(env)
        from .worker import run_worker

        return run_worker(cfg)


def _rank_order(placements: list[dict[str, Any]]) -> list[int]:
    """Actor indices sorted by node, then by GPU id."""
    return sorted(range(len(placements)), key=lambda i: (placements[i]["node"], placements[i]["gpus"], i))


def launch_ray(cfg: LaunchOptions, world_size: int, *, address: str | None = None) -> dict[str, Any]:
    """Run ``cfg``'s job on ``world_size`` Ray actors; return rank 0's result.

    Connects to ``address`` (or a running cluster, or starts a local one).
    """
    try:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    except ImportError:
        raise RuntimeError("the Ray launcher needs Ray: pip install 'fa3dist[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
    use_gpu = cfg.device != "cpu"
    bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}
    group = placement_group([bundle] * world_size, strategy="PACK")
    try:
        ray.get(group.ready(), timeout=cfg.timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise RuntimeError(f"Ray could not place {world_size} ranks of {bundle} within {cfg.timeout_s} s; "
                           f"cluster resources: {ray.cluster_resources()}") from None
    actor_cls = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0, max_restarts=0)(RankActor)
    actors = [actor_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        placement_group=group, placement_group_bundle_index=i)).remote() for i in range(world_size)]
    try:
        placements = ray.get([a.placement.remote() for a in actors], timeout=cfg.timeout_s)
        order = _rank_order(placements)
        node_gpus: dict[str, list[int]] = {}
        for i in order:
            node_gpus.setdefault(placements[i]["node"], []).extend(placements[i]["gpus"])
        port = ray.get(actors[order[0]].bind_port.remote(), timeout=cfg.timeout_s)
        base_env = {k: os.environ[k] for k in PASS_THROUGH if k in os.environ}
        base_env.update(WORLD_SIZE=str(world_size), MASTER_ADDR=placements[order[0]]["ip"], MASTER_PORT=str(port))
        refs: dict[Any, int] = {}
        for rank, i in enumerate(order):
            env = dict(base_env, RANK=str(rank))
            if use_gpu:
                visible = sorted(node_gpus[placements[i]["node"]])
                env.update(CUDA_VISIBLE_DEVICES=",".join(map(str, visible)),
                           LOCAL_RANK=str(visible.index(placements[i]["gpus"][0])),
                           LOCAL_WORLD_SIZE=str(len(visible)))
            else:
                env.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
            refs[actors[i].run.remote(cfg, env)] = rank
        log.info("started %d ranks on %d node(s)", world_size, len(node_gpus))
        results: dict[int, Any] = {}
        failures: list[Failure] = []
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=GRACE_S if failures else None)
            if not done:
                break  # grace period over: blame now, kill the rest below
            rank = refs[done[0]]
            try:
                results[rank] = ray.get(done[0])
                log.info("rank %d finished (%d of %d)", rank, len(results), world_size)
            except ray.exceptions.RayActorError as err:
                failures.append(Failure(rank, True, str(err)))
            except ray.exceptions.RayTaskError as err:
                failures.append(Failure(rank, False, str(err)))
        if failures:
            reported = set(results) | {f.rank for f in failures}
            raise blame(failures, silent=[r for r in range(world_size) if r not in reported])
        return results[0]
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(group)
