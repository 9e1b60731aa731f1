"""fa3dist.kernels: attention kernels that return the log-sum-exp, and the backend registry."""

from .registry import BACKEND_NAMES, Backend, get_backend
from .triton_bwd import flash_bwd
from .triton_fwd import flash_fwd

__all__ = ["BACKEND_NAMES", "Backend", "flash_bwd", "flash_fwd", "get_backend"]
