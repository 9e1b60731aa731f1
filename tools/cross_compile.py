"""Compile every Triton kernel and tuning candidate for Hopper (sm_90a) on a machine without a GPU.

The kernels' own launch code runs on CPU tensors against a stand-in driver that reports an sm_90
target; a ``jit_cache_hook`` takes each launch's signature and constexprs, compiles it with
triton's bundled ptxas instead of launching, and records registers, stack (spills) and shared
memory (cuobjdump) and a hash of the PTX without its debug lines, so two versions of the code can
be compared kernel by kernel. Usage (not under TRITON_INTERPRET):

    python tools/cross_compile.py --out sm90.json [--dims 64 128 256 72] [--compare old.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

from fa3dist.kernels.common import SMEM_BYTES

TARGET = GPUTarget("cuda", 90, 32)
RECORDS: list[dict[str, Any]] = []


class _HopperStandIn:
    """Just enough of a driver for the JIT to specialize and compile for sm_90."""

    def get_current_target(self) -> GPUTarget:
        return TARGET

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"no GPU here: driver.{name} is not available")


def _ptx_hash(ptx: str) -> str:
    """Hash of the PTX code without debug sections, line directives, comments and parameter declarations."""
    code = ptx.split(".section\t.debug")[0]
    lines = (line for line in code.splitlines() if not line.strip().startswith((".loc", ".file", "//", ".param")))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _resources(cubin: bytes) -> dict[str, int]:
    """Registers, stack bytes and static shared memory of a cubin, from the bundled cuobjdump."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", text)
    return dict(zip(("regs", "stack", "static_shared"), map(int, found.groups()))) if found else {}


def _compile_hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled) -> bool:  # noqa: A002
    jit_fn = fn.jit_function
    options = {name: compile[name] for name in ("num_warps", "num_stages", "num_ctas", "maxnreg") if name in compile}
    record: dict[str, Any] = {
        "kernel": fn.name, "num_warps": options["num_warps"], "num_stages": options["num_stages"],
        "constexprs": {jit_fn.arg_names[path[0]]: str(value) for path, value in compile["constants"].items()},
        "signature": {name: str(t) for name, t in compile["signature"].items() if t != "constexpr"}}
    try:
        src = jit_fn.ASTSource(jit_fn, compile["signature"], compile["constants"], compile["configs"][0])
        kernel = triton.compile(src, target=TARGET, options=options)
        record.update(ptx_hash=_ptx_hash(kernel.asm["ptx"]), shared=kernel.metadata.shared,
                      **_resources(kernel.asm["cubin"]))
    except Exception as err:  # recorded: the point is to list what does not compile
        while err.__cause__ or err.__context__:  # Triton wraps the cause in a source excerpt per call level
            err = err.__cause__ or err.__context__
        record["error"] = f"{type(err).__name__}: {str(err)[-500:]}"  # the reason follows the source excerpt
    RECORDS.append(record)
    return True  # compiled here: the JIT skips its own compile and the launch


def compile_all(dims: list[int]) -> None:
    """Make every kernel launch the forward and backward can make at head dims ``dims`` (bf16): each
    tuning candidate plain, into fp32 buffers with accumulation, and (backward) for dK/dV or dQ alone;
    the Gluon forward's (bf16 and FP8) and backward's candidates at the head dims they take."""
    from fa3dist.kernels import fp8, gluon_bwd, gluon_fwd, triton_bwd, triton_fwd

    for head_dim in dims:
        for causal in (False, True):
            q, do, out = (torch.randn(1, 1000, 4, head_dim, dtype=torch.bfloat16) for _ in range(3))
            k, v = (torch.randn(1, 1000, 2, head_dim, dtype=torch.bfloat16) for _ in range(2))
            lse = torch.randn(1, 4, 1000)
            for cfg in triton_fwd.candidate_configs(head_dim, q.dtype):
                triton_fwd._launch(q, k, v, 0.1, causal, cfg)
                triton_fwd._launch(q, k, v, 0.1, causal, cfg, torch.zeros(q.shape), lse.clone(), True)
            for cfg in gluon_fwd.GLUON_CONFIGS.get(head_dim, []):
                gluon_fwd.gluon_launch(q, k, v, 0.1, causal, cfg, torch.empty_like(q), lse.clone(), False, num_programs=1)
                gluon_fwd.gluon_launch(q, k, v, 0.1, causal, cfg, torch.zeros(q.shape), lse.clone(), True, num_programs=1)
            q8, k8 = (t.to(torch.float8_e4m3fn) for t in (q, k))
            vt8 = fp8.kmajor_v(v.to(torch.float8_e4m3fn))
            descales = (torch.ones(1, 4), torch.ones(1, 2), torch.ones(1, 2))
            for cfg in gluon_fwd.GLUON_FP8_CONFIGS.get(head_dim, []):
                for out_buf, accumulate in ((torch.empty_like(q), False), (torch.zeros(q.shape), True)):
                    gluon_fwd.gluon_launch(q8, k8, vt8, 0.1, causal, cfg, out_buf, lse.clone(), accumulate,
                                           descales=descales, num_programs=1)
            problem = triton_bwd._preprocess(do, q, k, v, out, lse, 0.1, causal)
            dq, dk, dv = (torch.zeros(t.shape) for t in (q, k, v))
            for cfg in triton_bwd.candidate_configs(head_dim, q.dtype):
                triton_bwd._launch(problem, cfg)
                for grads in ((dq, dk, dv), (None, dk, dv), (dq, None, None)):
                    triton_bwd._launch(problem, cfg, grads, accumulate=True)
            for gcfg in gluon_bwd.GLUON_BWD_CONFIGS.get(head_dim, []):
                args = (problem.q, problem.k, problem.v, problem.do, problem.lse2, problem.delta, 0.1, causal, gcfg)
                gluon_bwd.gluon_bwd_launch(*args, torch.zeros(q.shape), torch.empty_like(k), torch.empty_like(v), False)
                gluon_bwd.gluon_bwd_launch(*args, dq, dk, dv, True)
                gluon_bwd.gluon_bwd_launch(*args, None, dk, dv, True)


def compare(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(changed, missing): kernels of ``old`` whose PTX differs in ``new``, and those ``new`` does not
    compile. Matched by name, options and ``old``'s constexprs, the constexprs added since at their
    defaults (no accumulation); ``new`` may have more parameters."""
    defaults = {"ACCUMULATE": "False", "DQ_DIRECT": "False", "FP8": "False"}
    changed, missing = set(), set()
    for rec in old:
        name = f"{rec['kernel']} warps={rec['num_warps']} stages={rec['num_stages']} {rec['constexprs']}"
        match = [n for n in new if n["kernel"] == rec["kernel"] and n["num_warps"] == rec["num_warps"]
                 and n["num_stages"] == rec["num_stages"] and n["signature"].items() >= rec["signature"].items()
                 and n["constexprs"] == {**{k: v for k, v in defaults.items() if k in n["constexprs"]},
                                         **rec["constexprs"]}]
        if not match:
            missing.add(name)
        elif all(n.get("ptx_hash") != rec.get("ptx_hash") for n in match):
            changed.add(name)
    return sorted(changed), sorted(missing)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file for one record per compiled kernel")
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256, 72])
    parser.add_argument("--compare", help="records of an earlier version: list the kernels whose PTX changed")
    args = parser.parse_args()
    if knobs.runtime.interpret or os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter compiles nothing")
    driver.set_active(_HopperStandIn())
    knobs.runtime.jit_cache_hook = _compile_hook
    compile_all(args.dims)
    Path(args.out).write_text(json.dumps(RECORDS, indent=1))
    failed = [r for r in RECORDS if "error" in r]
    ok = [r for r in RECORDS if "error" not in r]
    too_big = [r for r in ok if r["shared"] > SMEM_BYTES]
    print(f"{len(RECORDS)} kernels compiled for sm_90a, {len(failed)} failed, {len(too_big)} over the "
          f"{SMEM_BYTES} B of shared memory a block may use; max registers {max(r['regs'] for r in ok)}, "
          f"{sum(r['stack'] > 0 for r in ok)} with stack (spills), max shared {max(r['shared'] for r in ok)} B")
    for rec in failed + too_big:
        print(f"{rec['kernel']} {rec['constexprs']}: {rec['error'] if 'error' in rec else 'shared %d B' % rec['shared']}")
    if args.compare:
        changed, missing = compare(json.loads(Path(args.compare).read_text()), RECORDS)
        print(f"{len(changed)} kernels of {args.compare} changed:", *changed, sep="\n  ")
        print(f"{len(missing)} kernels of {args.compare} not compiled now:", *missing, sep="\n  ")
    return 1 if failed or too_big else 0


if __name__ == "__main__":
    sys.exit(main())
