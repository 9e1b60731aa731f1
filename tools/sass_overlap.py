"""Does the Gluon forward overlap its softmax with the in-flight P V product? Read it off the SASS.

Compiles each Gluon forward config for sm_90a on this machine (no GPU, as tools/cross_compile.py
does) and counts, in every window between ``WARPGROUP.DEPBAR.LE gsb0, 0x1`` (S is ready) and the
next ``WARPGROUP.DEPBAR.LE gsb0, 0x0`` (P V is ready), the ``MUFU.EX2`` instructions (the
softmax's exponentials) scheduled inside it. A main loop that overlaps as written shows about 64 of
them (a 64 x 128 block over 128 threads); 0 means ptxas waits for P V before the softmax.

    python tools/sass_overlap.py [--head-dim 128]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton import knobs
from triton.runtime.driver import driver

sys.path.insert(0, str(Path(__file__).parent))
from cross_compile import TARGET, _HopperStandIn  # noqa: E402

CUBINS: list[bytes] = []


def _hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled) -> bool:  # noqa: A002
    jit_fn = fn.jit_function
    options = {name: compile[name] for name in ("num_warps", "num_stages", "num_ctas", "maxnreg") if name in compile}
    src = jit_fn.ASTSource(jit_fn, compile["signature"], compile["constants"], compile["configs"][0])
    CUBINS.append(triton.compile(src, target=TARGET, options=options).asm["cubin"])
    return True


def ex2_windows(cubin: bytes) -> list[int]:
    """MUFU.EX2 count inside each DEPBAR 1 .. DEPBAR 0 window of the cubin's SASS."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    windows, inside = [], None
    for line in sass.splitlines():
        if "DEPBAR.LE gsb0, 0x1" in line:
            inside = 0
        elif "DEPBAR.LE gsb0, 0x0" in line and inside is not None:
            windows.append(inside)
            inside = None
        elif "MUFU.EX2" in line and inside is not None:
            inside += 1
    return windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    from fa3dist.kernels import gluon_fwd

    driver.set_active(_HopperStandIn())
    knobs.runtime.jit_cache_hook = _hook
    q = torch.randn(1, 1000, 4, args.head_dim, dtype=torch.bfloat16)
    k = torch.randn(1, 1000, 2, args.head_dim, dtype=torch.bfloat16)
    lse = torch.empty(1, 4, 1000)
    for cfg in gluon_fwd.GLUON_CONFIGS[args.head_dim]:
        for causal in (False, True):
            CUBINS.clear()
            gluon_fwd.gluon_launch(q, k, k, 0.1, causal, cfg, torch.empty_like(q), lse, False, num_programs=1)
            print(f"{cfg} causal={causal}: MUFU.EX2 inside each S-ready..PV-ready window: {ex2_windows(CUBINS[0])}")


if __name__ == "__main__":
    main()
