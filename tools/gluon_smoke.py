"""One small launch of every Gluon kernel (forward bf16 and FP8: the default config and the first of each other
consumer count; backward: the default config) against float64
(FP8: against its float64 emulation, ``fp8.fp8_reference_fwd``).

The first thing a device call runs, under ``timeout``: a barrier protocol that deadlocks shows as a
hang here, in seconds, before the tests and sweeps spend the call's time.

    python tools/gluon_smoke.py
"""

from __future__ import annotations

import torch

from fa3dist.kernels import fp8, gluon_bwd, gluon_fwd
from fa3dist.kernels.numerics import relative_error
from fa3dist.kernels.reference import reference_bwd, reference_fwd
from fa3dist.kernels.triton_bwd import flash_bwd_config


LIMIT = 2e-2  # relative error above which the smoke fails (bf16 kernels land near 3e-3)


def _smoke_configs(configs: list[gluon_fwd.GluonConfig]) -> list[gluon_fwd.GluonConfig]:
    """The default config, then the first config of every other consumer count."""
    picked = {}
    for cfg in configs:
        picked.setdefault(cfg.consumers, cfg)
    return list(picked.values())


def main() -> int:
    worst = 0.0
    for dim in sorted(set(gluon_fwd.GLUON_HEAD_DIMS) | set(gluon_bwd.GLUON_BWD_HEAD_DIMS)):
        for causal in (False, True):
            q, k, v, do = (torch.randn(1, 700, 4, dim, device="cuda", dtype=torch.bfloat16) for _ in range(4))
            scale = dim ** -0.5
            ref_out, ref_lse = reference_fwd(q.double(), k.double(), v.double(), softmax_scale=scale, causal=causal)
            line = f"smoke D={dim} causal={causal}:"
            if dim in gluon_fwd.GLUON_HEAD_DIMS:
                out = torch.full_like(q, float("nan"))
                lse = torch.empty(1, 4, 700, device="cuda")
                for cfg in _smoke_configs(gluon_fwd.GLUON_CONFIGS[dim]):
                    gluon_fwd.gluon_launch(q, k, v, scale, causal, cfg, out, lse, False)
                    torch.cuda.synchronize()
                    errs = relative_error(out, ref_out), relative_error(lse, ref_lse)
                    worst = max(worst, *errs)
                    line += f" fwd {cfg.name} out {errs[0]:.3g} lse {errs[1]:.3g};"
                x = fp8.quantize_qkv(q, k, v, granularity="head")
                descales = fp8.check_fp8_inputs(x.q, x.k, x.v, x.q_descale, x.k_descale, x.v_descale)
                for cfg8 in _smoke_configs(gluon_fwd.GLUON_FP8_CONFIGS[dim]):
                    gluon_fwd.gluon_launch(x.q, x.k, fp8.kmajor_v(x.v), scale, causal, cfg8, out, lse,
                                           False, descales=descales)
                    emu_out, emu_lse = fp8.fp8_reference_fwd(x.q, x.k, x.v, x.q_descale, x.k_descale, x.v_descale,
                                                             softmax_scale=scale, causal=causal, block_n=cfg8.block_n)
                    errs = relative_error(out, emu_out), relative_error(lse, emu_lse)
                    worst = max(worst, *errs)
                    line += f" fp8 fwd {cfg8.name} out {errs[0]:.3g} lse {errs[1]:.3g};"
            if dim in gluon_bwd.GLUON_BWD_HEAD_DIMS:
                out, lse = ref_out.to(q.dtype), ref_lse.float()
                ref = reference_bwd(do.double(), q.double(), k.double(), v.double(), out.double(), lse.double(),
                                    softmax_scale=scale, causal=causal)
                cfg = gluon_bwd.GLUON_BWD_CONFIGS[dim][0]
                for dq in ("tma_reduce", "separate"):
                    config = cfg.candidate(dq)
                    grads = flash_bwd_config(do, q, k, v, out, lse, softmax_scale=scale, causal=causal, config=config)
                    torch.cuda.synchronize()
                    errs = [relative_error(g, r) for g, r in zip(grads, ref)]
                    worst = max(worst, *errs)
                    line += f" bwd/{dq} " + " ".join(f"{n} {e:.3g}" for n, e in zip(("dq", "dk", "dv"), errs)) + ";"
            print(line, flush=True)
    print(f"worst relative error {worst:.3g} ({'ok' if worst <= LIMIT else 'FAILED'}, limit {LIMIT})")
    return 0 if worst <= LIMIT else 1


if __name__ == "__main__":
    raise SystemExit(main())
