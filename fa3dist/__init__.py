"""fa3dist: exact attention for very long sequences spread over many GPUs.

FlashAttention-3-style kernels that return the log-sum-exp, and a ring scheduler that passes
key/value blocks between ranks while the kernels run.
"""

import logging

from .api import fa3_attention, ring_fa3_attention
from .groups import CPGroups, make_cp_groups
from .layout import shard_positions, shard_sequence, unshard_sequence

__version__ = "0.1.0"
__all__ = ["CPGroups", "fa3_attention", "make_cp_groups", "ring_fa3_attention", "shard_positions", "shard_sequence",
           "unshard_sequence"]

logging.getLogger("fa3dist").addHandler(logging.NullHandler())
