"""Compile fa3dist's Triton and Gluon kernels for Hopper (sm_90a) on a machine without a GPU.

Triton's compiler and the ptxas it bundles need no GPU; only its driver asks one for the target.
This script swaps in a driver that answers "cuda, sm_90", compiles each kernel variant through the
kernel's own launch function on CPU tensors (``warmup``, no launch), and prints registers, spills
and shared memory from the cubin. It catches compile errors and register spills before any device
time is spent.

    python tools/cross_compile.py gluon_fwd [--head-dims 64 128 256]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver


class _HopperDriver:
    """Just enough of a CUDA driver for ``JITFunction.warmup``: device 0, stream 0, target sm_90."""

    def __init__(self, arch: int = 90):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target


@contextlib.contextmanager
def hopper_target():
    """Compile for sm_90 inside the block (``warmup`` only: nothing can launch)."""
    driver.set_active(_HopperDriver())
    try:
        yield
    finally:
        driver._active = None


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the cubin's kernel, from the bundled cuobjdump."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def gluon_fwd_variants(head_dims: list[int]) -> None:
    """Every GLUON_CONFIGS entry x causal x accumulate x out dtype, at each head dim."""
    from fa3dist.kernels import gluon_fwd as gf

    print(f"{'D':>4} {'cfg':<34} {'causal':>6} {'acc':>4} {'out':>9} {'REG':>4} {'STACK':>5} {'LOCAL':>5} {'smem KB':>7}")
    failures = 0
    for head_dim in head_dims:
        q = torch.empty(1, 256, 4, head_dim, dtype=torch.bfloat16)
        kv = torch.empty(1, 256, 2, head_dim, dtype=torch.bfloat16)
        for cfg, causal, accumulate in itertools.product(gf.GLUON_CONFIGS[head_dim], (False, True), (False, True)):
            out = torch.empty(q.shape, dtype=torch.float32 if accumulate else q.dtype)
            lse = torch.empty(1, 4, 256, dtype=torch.float32)
            try:
                with hopper_target():
                    kernel = gf.gluon_launch(q, kv, kv, 0.1, causal, cfg, out, lse, accumulate, num_programs=1,
                                             warmup=True)
                use = resource_usage(kernel.asm["cubin"])
                print(f"{head_dim:>4} {str(cfg):<34} {causal!s:>6} {accumulate!s:>4} {str(out.dtype)[6:]:>9} "
                      f"{use.get('REG', 0):>4} {use.get('STACK', 0):>5} {use.get('LOCAL', 0):>5} "
                      f"{kernel.metadata.shared / 1024:>7.1f}")
            except Exception as err:  # report every variant, then fail
                failures += 1
                print(f"{head_dim:>4} {str(cfg):<34} {causal!s:>6} {accumulate!s:>4} FAILED: {str(err)[-2000:]}")
    if failures:
        sys.exit(f"{failures} variant(s) failed to compile")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kernel", choices=["gluon_fwd"])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    args = parser.parse_args()
    gluon_fwd_variants(args.head_dims)


if __name__ == "__main__":
    main()
