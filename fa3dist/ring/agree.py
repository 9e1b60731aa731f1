"""The ranks-agree check of a ring call, on the host only.

Every rank of a ring must pass the same shapes and options; otherwise the ring exchanges blocks of
the wrong size and hangs or returns garbage. Before each ring call the ranks therefore exchange a
few integers that describe their call, and raise the same error together when they differ.

How, and why it cannot hang:
- The exchange is one ``all_gather`` of a small int64 CPU tensor over a gloo group. It never
  touches a device tensor and never waits on a CUDA stream. When the ring's own group is gloo, that
  group carries it; otherwise a gloo side group over the same ranks is made at the group's first
  ring call and cached (per default process group and set of ranks). ``dist.new_group`` is
  collective: it is made with ``use_local_synchronization=True``, so only the group's own ranks
  take part, and they all reach it at the same point, their first ring call on that group (a ring
  call is itself collective). Its name is a hash of the ranks, so it does not shift the numbering
  of the groups a program makes later.
- A cache per call signature (exchange only for a signature not seen before) was rejected: a rank
  that skips the exchange because its signature is cached while another rank, with a new one,
  enters it would hang. One exchange per call costs tens of microseconds of host time, which the
  host spends while the GPU still works through earlier kernels.
- Every rank takes part in every exchange, also a rank whose local input check failed: it sends a
  failure flag instead of its signature. Whether a second exchange (the failing ranks' messages,
  by ``all_gather_object``) follows depends only on the gathered flags, which every rank sees
  alike; so does the decision to raise. Every rank raises the same error, or none does.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from fa3dist.kernels import BACKEND_NAMES
from fa3dist.kernels.checks import FLOAT_DTYPES

from .comm import cached_subgroup
from .schedule import LAYOUTS


@dataclass(frozen=True)
class CallSignature:
    """What every rank of one ring call must agree on."""

    batch: int
    seq_local: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    causal: bool
    layout: str
    softmax_scale: float
    backend: str
    head_group_size: int = 1  # ranks of the all-to-all (fa3dist.ulysses); 1 for the flat ring
    fp8: bool = False  # the FP8 forward (ring_fa3_attention(fp8=True))

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, *, causal: bool, layout: str, softmax_scale: float,
           backend: str, head_group_size: int = 1, fp8: bool = False) -> CallSignature:
        """The signature of a call with these (already checked) inputs; reads shapes only."""
        batch, seq_local, heads, head_dim = q.shape
        return cls(batch, seq_local, heads, k.shape[2], head_dim, q.dtype, causal, layout, softmax_scale, backend,
                   head_group_size, fp8)

    def encode(self) -> list[int]:
        return [self.batch, self.seq_local, self.heads, self.kv_heads, self.head_dim, FLOAT_DTYPES.index(self.dtype),
                int(self.causal), LAYOUTS.index(self.layout), _float_bits(self.softmax_scale),
                BACKEND_NAMES.index(self.backend), self.head_group_size, int(self.fp8)]

    @classmethod
    def decode(cls, codes: list[int]) -> CallSignature:
        batch, seq_local, heads, kv_heads, head_dim, dtype, causal, layout, scale, backend, head_group_size, fp8 = codes
        return cls(batch, seq_local, heads, kv_heads, head_dim, FLOAT_DTYPES[dtype], bool(causal), LAYOUTS[layout],
                   _bits_float(scale), BACKEND_NAMES[backend], head_group_size, bool(fp8))


_NUM_CODES = len(fields(CallSignature))


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _bits_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def _readable(value: object) -> str:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return str(value)


def _ranks_holding(values: list, value: object) -> str:
    ranks = [str(rank) for rank, v in enumerate(values) if v == value]
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)}"


def host_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """A gloo group over the ranks of ``group``: ``group`` itself when it is gloo, else a cached side group.

    Collective over the ranks of ``group`` the first time it is called for them.
    """
    if dist.get_backend(group) == "gloo":
        return group if group is not None else dist.group.WORLD
    return cached_subgroup(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD), "gloo")


def check_ranks_agree(signature: CallSignature | None, error: Exception | None,
                      group: dist.ProcessGroup | None, *, what: str = "ring_fa3_attention") -> None:
    """Raise the same error on every rank of ``group`` when a rank's input check failed or ranks disagree.

    Every rank must call it once per ring call: with its ``signature`` when its local checks passed,
    or with ``error`` (a TypeError or ValueError) when they failed. Runs on the host over a gloo
    group (see the module docstring); never reads or makes a device tensor.
    """
    gloo = host_group(group)
    world_size = dist.get_world_size(gloo)
    codes = [0] * _NUM_CODES if signature is None else signature.encode()
    local = torch.tensor([int(error is not None), *codes], dtype=torch.int64)
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local, group=gloo)
    rows = torch.stack(gathered).tolist()
    if any(row[0] for row in rows):
        reports: list[tuple[str, str] | None] = [None] * world_size
        mine = None if error is None else (type(error).__name__, str(error))
        dist.all_gather_object(reports, mine, group=gloo)
        failed = [(rank, report) for rank, report in enumerate(reports) if report is not None]
        detail = "; ".join(f"rank {rank}: {message}" for rank, (_, message) in failed)
        error_type = TypeError if failed[0][1][0] == "TypeError" else ValueError
        raise error_type(f"{what}: the input check failed on {len(failed)} of {world_size} ranks; {detail}") from error
    signatures = [CallSignature.decode(row[1:]) for row in rows]
    disagreements = []
    for field in fields(CallSignature):
        values = [getattr(s, field.name) for s in signatures]
        if len(set(values)) > 1:
            sides = [f"{_readable(value)} ({_ranks_holding(values, value)})" for value in dict.fromkeys(values)]
            disagreements.append(f"{field.name} {' against '.join(sides)}")
    if disagreements:
        raise ValueError(f"{what}: ranks disagree on their inputs: {'; '.join(disagreements)}")
