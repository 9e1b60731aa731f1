"""Ulysses (head all-to-all) and hierarchical context parallelism over gloo processes, against
float64 math on the whole sequence; the flat ring over a subgroup; bad group shapes."""

from __future__ import annotations

import functools
import itertools
import zlib

import pytest
import torch
import torch.distributed as dist

from fa3dist import make_cp_groups, ring_fa3_attention, shard_sequence
from fa3dist.kernels.numerics import relative_error
from fa3dist.kernels.reference import reference_bwd, reference_fwd
from tests.multiproc import run_ranks, same_on_every_rank

HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}
CASES = list(itertools.product(("zigzag", "contiguous"), (False, True), HEADS))
FEW_CASES = [("zigzag", True, "gqa"), ("contiguous", False, "mqa")]
TOLERANCE = 1e-10  # float64


def _case_id(layout: str, causal: bool, heads: str) -> str:
    return f"{layout}-{'causal' if causal else 'full'}-{heads}"


def _errors(group: dist.ProcessGroup | None, cases: list[tuple], **call) -> dict[str, dict[str, float]]:
    """Every case through ``ring_fa3_attention(..., group=group, **call)`` in float64: this rank's
    relative errors of out, lse, dq, dk, dv against float64 math on the whole sequence."""
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    results = {}
    for layout, causal, heads in cases:
        case = _case_id(layout, causal, heads)
        n_heads, n_kv = HEADS[heads]
        gen = torch.Generator().manual_seed(zlib.crc32(f"{sorted(call)} {case}".encode()) + world_size)
        seq = 2 * world_size * 3
        full = {n: torch.randn(2, seq, h, 8, generator=gen, dtype=torch.float64)
                for n, h in (("q", n_heads), ("k", n_kv), ("v", n_kv), ("do", n_heads))}
        ref_out, ref_lse = reference_fwd(full["q"], full["k"], full["v"], softmax_scale=0.3, causal=causal)
        ref_grads = reference_bwd(full["do"], full["q"], full["k"], full["v"], ref_out, ref_lse, softmax_scale=0.3,
                                  causal=causal)

        def shard(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
            return shard_sequence(x, world_size=world_size, rank=rank, layout=layout, seq_dim=dim)

        q, k, v = (shard(full[n]).requires_grad_() for n in ("q", "k", "v"))
        out, lse = ring_fa3_attention(q, k, v, causal=causal, softmax_scale=0.3, group=group, layout=layout,
                                      backend="reference", return_lse=True, **call)
        out.backward(shard(full["do"]))
        results[case] = {"out": relative_error(out, shard(ref_out)), "lse": relative_error(lse, shard(ref_lse, 2)),
                         "dq": relative_error(q.grad, shard(ref_grads[0])),
                         "dk": relative_error(k.grad, shard(ref_grads[1])),
                         "dv": relative_error(v.grad, shard(ref_grads[2]))}
    return results


def _bad_calls(rank: int) -> dict[str, str]:
    """Calls with bad group shapes or schemes on 4 ranks: the error each raised ("Type: message")."""
    def attempt(heads=4, kv_heads=2, **call) -> str:
        q = torch.randn(1, 4, heads, 8, dtype=torch.float64)
        k = torch.randn(1, 4, kv_heads, 8, dtype=torch.float64)
        try:
            ring_fa3_attention(q, k, k, causal=True, backend="reference", **call)
            return "ok"
        except (TypeError, ValueError) as err:
            return f"{type(err).__name__}: {err}"

    mine = [r for r in ([1, 2], [0, 3]) if rank in r][0]
    straddling = dist.new_group(mine, use_local_synchronization=True)  # ranks 1, 2: not one node
    uneven = dist.new_group([0, 1, 2] if rank < 3 else [3], use_local_synchronization=True)
    node = make_cp_groups(2).head
    try:
        make_cp_groups(3)
        partition = "ok"
    except ValueError as err:
        partition = f"ValueError: {err}"
    return {
        "make_cp_groups(3)": partition,
        "straddling head group": attempt(head_group=straddling),
        "head group of 3 in 4": attempt(head_group=uneven),
        "3 heads on 2": attempt(heads=3, kv_heads=1, head_group=node),
        "3 kv heads on 4": attempt(heads=12, kv_heads=3, scheme="ulysses"),
        "schemes disagree": attempt(scheme="flat" if rank == 0 else "ulysses"),
        "unknown scheme on rank 1": attempt(scheme="striped" if rank == 1 else "ulysses"),
        "hierarchical without head_group": attempt(scheme="hierarchical"),
        "agree": attempt(head_group=node),
    }


def _peak_kib_per_token(node: dist.ProcessGroup, tokens: int = 64) -> dict[str, float]:
    """Peak KiB per local token of one fwd+bwd under each scheme at H=32, H_kv=8, D=128 in bfloat16
    (inputs and gradients included), for a backend with a flash kernel's memory use that accumulates
    in place, measured on the CPU."""
    from fa3dist.api import attention
    from fa3dist.bench.memory import peak_bytes
    from fa3dist.ring import ProcessGroupRing
    from fa3dist.ulysses import hierarchical_attention
    from tests.ring_cases import flash_like_backend

    gen = torch.Generator().manual_seed(dist.get_rank())
    q, do = (torch.randn(1, tokens, 32, 128, generator=gen).bfloat16() for _ in range(2))
    k, v = (torch.randn(1, tokens, 8, 128, generator=gen).bfloat16().requires_grad_() for _ in range(2))
    q.requires_grad_()
    backend = flash_like_backend(True, True)
    calls = {
        "flat": lambda: attention(q, k, v, ProcessGroupRing(), causal=True, softmax_scale=0.1, layout="zigzag",
                                  backend=backend)[0],
        "ulysses": lambda: hierarchical_attention(q, k, v, causal=True, softmax_scale=0.1, group=None,
                                                  head_group=dist.group.WORLD, layout="zigzag", backend=backend,
                                                  return_lse=False),
        "hierarchical": lambda: hierarchical_attention(q, k, v, causal=True, softmax_scale=0.1, group=None,
                                                       head_group=node, layout="zigzag", backend=backend,
                                                       return_lse=False),
    }
    return {name: peak_bytes(lambda: call().backward(do), [q, k, v, do]) / tokens / 1024
            for name, call in calls.items()}


def scheme_errors(rank: int, world_size: int, gpus_per_node: int) -> dict[str, dict]:
    """This rank's errors per scheme: hierarchical (nodes of ``gpus_per_node``); on 4 ranks also
    Ulysses over the world and over one node (a subgroup), the flat ring over a node, "auto", and
    the bad calls."""
    groups = make_cp_groups(gpus_per_node)
    results = {"hierarchical": _errors(None, CASES, head_group=groups.head)}
    if world_size == 4:
        node = groups.head
        results.update({
            "ulysses W=4": _errors(None, CASES, scheme="ulysses"),
            "ulysses W=2 over a node": _errors(node, CASES, head_group=node),
            "flat ring over a node": _errors(node, FEW_CASES),
            "auto": _errors(None, FEW_CASES, head_group=node, scheme="auto"),
            "bad calls": _bad_calls(rank),
            "peak KiB per token": _peak_kib_per_token(node),
        })
    return results


@functools.cache
def _scheme_errors(world_size: int, gpus_per_node: int) -> list[dict]:
    return run_ranks(scheme_errors, world_size, gpus_per_node)


def _assert_exact(per_rank: list[dict], scheme: str) -> None:
    for rank, per_scheme in enumerate(per_rank):
        for case, errs in per_scheme[scheme].items():
            bad = {name: err for name, err in errs.items() if not err <= TOLERANCE}
            assert not bad, f"{scheme}, rank {rank}, {case}: relative errors above {TOLERANCE}: {bad}"


@pytest.mark.parametrize("world_size,gpus_per_node", [(4, 2), (6, 2)], ids=["2x2", "3x2"])
def test_hierarchical_matches_float64_math(world_size, gpus_per_node):
    """All-to-all inside each node, ring across the nodes: out, lse, dq, dk, dv on every rank equal
    float64 math on the whole sequence (MHA, GQA, MQA; zigzag and contiguous; causal and not)."""
    _assert_exact(_scheme_errors(world_size, gpus_per_node), "hierarchical")


@pytest.mark.parametrize("scheme", ["ulysses W=4", "ulysses W=2 over a node", "flat ring over a node", "auto"])
def test_ulysses_and_subgroup_ring_match_float64_math(scheme):
    """Pure Ulysses over the world (W = 4) and over a subgroup (W = 2), the flat ring over a subgroup
    (not the default group), and whatever "auto" picks."""
    _assert_exact(_scheme_errors(4, 2), scheme)


def test_bad_group_shapes_raise_the_same_clear_error_on_every_rank():
    per_rank = [results["bad calls"] for results in _scheme_errors(4, 2)]
    expected = {
        "make_cp_groups(3)": "gpus_per_node (3) must be positive and divide the world size (4)",
        "straddling head group": "head_group must be 2 consecutive ranks of group starting at a multiple of 2",
        "head group of 3 in 4": "head_group has 3 ranks, which does not divide the group's 4 ranks",
        "3 heads on 2": "q has 3 heads, which the head_group's 2 ranks cannot split evenly",
        "3 kv heads on 4": "k/v have 3 heads: the head_group's 4 ranks can neither split them",
        "schemes disagree": "head_group_size 1 (rank 0) against 4 (ranks 1, 2, 3)",
        "unknown scheme on rank 1": "rank 1: scheme must be one of flat, ulysses, hierarchical, auto or None",
        "hierarchical without head_group": "scheme 'hierarchical' needs head_group",
    }
    for name in per_rank[0]:
        message = same_on_every_rank(per_rank, name)
        if name == "agree":
            assert message == "ok"
        else:
            assert message.startswith("ValueError") and expected[name] in message, f"{name}: {message}"


def test_memory_model_matches_the_measured_peak():
    """``fa3dist.plan.bytes_per_token`` (which the projection's longest context uses) against the
    peak measured on 4 ranks (2 nodes x 2) for every scheme, at H=32, H_kv=8, D=128, bf16. The model
    is the largest rank's peak: with the ring some ranks need only half the backward's dK/dV scratch
    (4 KiB less here)."""
    from fa3dist.plan import Problem, bytes_per_token

    problem = Problem(batch=1, seq_len=256, heads=32, kv_heads=8, head_dim=128)
    model = {"flat": bytes_per_token(problem, 1, 4) / 1024, "ulysses": bytes_per_token(problem, 4, 1) / 1024,
             "hierarchical": bytes_per_token(problem, 2, 2) / 1024}
    assert model["flat"] == 76.25  # the ring's docstring
    per_rank = [results["peak KiB per token"] for results in _scheme_errors(4, 2)]
    for scheme, expected in model.items():
        measured = [peaks[scheme] for peaks in per_rank]
        assert 0.97 * expected <= max(measured) <= 1.01 * expected and min(measured) >= 0.9 * expected, \
            f"{scheme}: measured {measured} KiB per token on ranks 0-3, model {expected}"


def test_schemes_in_one_process():
    """Without a process group every scheme is the local kernel; a bad scheme is refused by name."""
    from fa3dist import fa3_attention

    q, k = torch.randn(1, 8, 4, 16, dtype=torch.float64), torch.randn(1, 8, 2, 16, dtype=torch.float64)
    expected = fa3_attention(q, k, k, causal=True)
    for scheme in ("flat", "ulysses", "auto"):
        assert torch.equal(ring_fa3_attention(q, k, k, causal=True, scheme=scheme), expected)
    with pytest.raises(ValueError, match="scheme must be one of flat, ulysses, hierarchical, auto or None"):
        ring_fa3_attention(q, k, k, scheme="striped")
    with pytest.raises(ValueError, match="scheme 'hierarchical' needs head_group"):
        ring_fa3_attention(q, k, k, scheme="hierarchical")


def test_link_fit():
    """The line through two (bytes, ms) points; a larger transfer that was not slower is refused."""
    from fa3dist.bench.links import _fit

    gbps, latency_us = _fit([(1e6, 0.03), (9e6, 0.11)])
    assert gbps == pytest.approx(100.0) and latency_us == pytest.approx(20.0)
    with pytest.raises(RuntimeError, match="link measurement is noise"):
        _fit([(1e6, 0.05), (9e6, 0.05)])
