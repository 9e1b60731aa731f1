"""The ring scheduler: communication, per-step schedule, LSE merge, forward and backward."""

from .comm import LoopbackRing, ProcessGroupRing, RecordingRing, ReplayRing, Ring, ThreadRing, run_thread_ring
from .merge import merge_block_
from .ring import accumulation_dtype, quantize_for_ring, ring_amax, ring_backward, ring_forward, ring_forward_fp8
from .schedule import LAYOUTS, BlockTask, block_task, source_rank

__all__ = [
    "LAYOUTS", "BlockTask", "LoopbackRing", "ProcessGroupRing", "RecordingRing", "ReplayRing", "Ring", "ThreadRing",
    "accumulation_dtype",
    "block_task", "merge_block_", "quantize_for_ring", "ring_amax", "ring_backward", "ring_forward",
    "ring_forward_fp8", "run_thread_ring", "source_rank",
]
