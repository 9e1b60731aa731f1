"""``fa3dist bench kernel``: our Triton kernels against cuDNN, FA2 and FlexAttention on one GPU.

For every head dim D, sequence length S and causal setting: B = tokens / S sequences of
H = model_dim / D heads, fresh random inputs, forward and backward, TFLOP/s as the FlashAttention
papers count them, each implementation timed in the same process. Our output and gradients are
checked against cuDNN's before they are timed. A failing peer becomes an error row; our own kernel
failing or disagreeing with cuDNN fails the run (after the results are written).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from fa3dist.config import check_choices
from fa3dist.kernels.common import paths_taken
from fa3dist.kernels.numerics import relative_error

from .common import DTYPES, Checkpoint, attention_flops, gpu_tag, markdown_table, run_meta, time_ms, write_results
from .peers import IMPLS, prepare, unavailable_reason

log = logging.getLogger("fa3dist.bench")


@dataclass
class KernelBenchConfig:
    """What ``fa3dist bench kernel`` measures."""

    head_dims: list[int] = field(default_factory=lambda: [64, 128, 256])
    seq_lens: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096, 8192, 16384])
    causal: list[bool] = field(default_factory=lambda: [False, True])
    tokens: int = 16384  # batch = tokens // seq_len
    model_dim: int = 2048  # heads = model_dim // head_dim
    kv_group: int = 1  # kv_heads = heads // kv_group (1: MHA)
    dtypes: list[str] = field(default_factory=lambda: ["bfloat16"])
    passes: list[str] = field(default_factory=lambda: ["fwd", "bwd"])
    impls: list[str] = field(default_factory=lambda: list(IMPLS))
    flex_head_dims: list[int] = field(default_factory=lambda: [128])  # flex compiles per shape: limit it
    flex_seq_lens: list[int] = field(default_factory=lambda: [8192, 16384])
    extra_cells: list[list[Any]] = field(default_factory=list)  # [dtype, D, S, causal] run besides the grid
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    seed: int = 0

    def check(self) -> None:
        for d in self.head_dims:
            if d % 8 or not 8 <= d <= 256:
                raise ValueError(f"key 'head_dims': {d} is not a multiple of 8 in [8, 256]")
        for s in self.seq_lens:
            if s < 1 or self.tokens % s:
                raise ValueError(f"key 'seq_lens': {s} does not divide tokens={self.tokens}")
        check_choices(self, {"dtypes": DTYPES, "passes": ("fwd", "bwd"), "impls": IMPLS})
        for cell in self.extra_cells:
            if (len(cell) != 4 or cell[0] not in DTYPES or not isinstance(cell[1], int) or not isinstance(cell[2], int)
                    or not isinstance(cell[3], bool) or self.tokens % cell[2]):
                raise ValueError(f"key 'extra_cells': {cell} is not [dtype, head_dim, seq_len dividing tokens, causal]")

    def cells(self) -> list[tuple[str, int, int, bool]]:
        grid = list(itertools.product(self.dtypes, self.head_dims, self.seq_lens, self.causal))
        return grid + [tuple(c) for c in self.extra_cells if tuple(c) not in grid]


def _measure(impl: str, q, k, v, do, causal: bool, passes: list[str], cfg: KernelBenchConfig,
             reference: dict[str, torch.Tensor] | None) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Times (ms) per pass for one implementation, and its outputs in (B, S, H, D)."""
    prep = prepare(impl, q, k, v, causal=causal)
    out = prep.forward()
    grads = torch.autograd.grad(out, (prep.q, prep.k, prep.v), prep.to_bshd(do) if impl != "fa3dist" else do,
                                retain_graph=True)
    outputs = {"out": prep.to_bshd(out).detach()}
    outputs.update({name: prep.to_bshd(g) for name, g in zip(("dq", "dk", "dv"), grads)})
    if reference is not None:
        errors = {name: relative_error(outputs[name], reference[name]) for name in outputs}
        if max(errors.values()) > 5e-2:
            raise RuntimeError(f"{impl} disagrees with cudnn: relative errors {errors}")
        outputs["errors"] = errors
    times = {}
    if "fwd" in passes:
        times["fwd"] = time_ms(prep.forward, warmup_ms=cfg.warmup_ms, rep_ms=cfg.rep_ms)
    if "bwd" in passes:
        do_native = prep.to_bshd(do) if impl != "fa3dist" else do
        times["bwd"] = time_ms(lambda: torch.autograd.grad(out, (prep.q, prep.k, prep.v), do_native,
                                                           retain_graph=True),
                               warmup_ms=cfg.warmup_ms, rep_ms=cfg.rep_ms)
    return times, outputs


def run_kernel_bench(cfg: KernelBenchConfig, checkpoint: Checkpoint | None = None
                     ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Measure every cell; return (meta, rows). ``checkpoint(rows)`` runs after each cell."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench kernel needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(cfg.seed)
    skipped = {i: reason for i in cfg.impls if (reason := unavailable_reason(i, torch.device("cuda")))}
    for impl, reason in skipped.items():
        log.warning("peer %s skipped: %s", impl, reason)
    rows: list[dict[str, Any]] = []
    cells = cfg.cells()
    progress = tqdm(cells, desc="bench kernel", unit="cell")
    for dtype_name, head_dim, seq, causal in progress:
        progress.set_postfix_str(f"{dtype_name} D={head_dim} S={seq} causal={causal}")
        batch, heads = cfg.tokens // seq, cfg.model_dim // head_dim
        kv_heads = heads // cfg.kv_group
        dtype = DTYPES[dtype_name]
        q, do = (torch.randn(batch, seq, heads, head_dim, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
        k, v = (torch.randn(batch, seq, kv_heads, head_dim, device="cuda", dtype=dtype, generator=gen)
                for _ in range(2))
        impls = [i for i in cfg.impls if i not in skipped
                 and (i != "flex" or (head_dim in cfg.flex_head_dims and seq in cfg.flex_seq_lens))]
        reference = None
        for impl in sorted(impls, key=lambda i: i != "cudnn"):  # cudnn first: the others are checked against it
            base = {"impl": impl, "dtype": dtype_name, "B": batch, "H": heads, "Hkv": kv_heads, "S": seq,
                    "D": head_dim, "causal": causal}
            try:
                times, outputs = _measure(impl, q, k, v, do, causal, cfg.passes, cfg,
                                          None if impl == "cudnn" else reference)
            except Exception as err:  # one failing peer must not end the run
                log.warning("%s failed at %s: %s", impl, base, err)
                rows += [{**base, "pass": p, "ms": None, "tflops": None, "error": str(err)[:300]} for p in cfg.passes]
                continue
            if impl == "cudnn":
                reference = outputs
            for pass_, ms in times.items():
                flops = attention_flops(batch, heads, seq, head_dim, causal, pass_)
                row = {**base, "pass": pass_, "ms": ms, "tflops": flops / ms / 1e9}
                if "errors" in outputs:
                    row["rel_err_vs_cudnn"] = outputs["errors"]["out" if pass_ == "fwd" else "dq"]
                rows.append(row)
            del outputs
        del q, k, v, do
        torch.cuda.empty_cache()
        if checkpoint is not None:
            checkpoint(rows)
    taken = sorted({path for paths in paths_taken().values() for path in paths})
    return run_meta(1, fa3dist_kernel="+".join(taken) or None, skipped_peers=skipped), rows


def check_own_rows(rows: list[dict[str, Any]]) -> None:
    """Raise RuntimeError when our kernel ("fa3dist") failed or disagreed with cuDNN in any cell."""
    failed = sorted({f"{r['dtype']} D={r['D']} S={r['S']} causal={r['causal']}: {r['error']}"
                     for r in rows if r["impl"] == "fa3dist" and r.get("error")})
    if failed:
        raise RuntimeError(f"fa3dist failed or disagreed with cuDNN in {len(failed)} cell(s):\n" + "\n".join(failed))


def kernel_markdown(rows: list[dict[str, Any]]) -> str:
    """One table per (dtype, pass): TFLOP/s of every implementation and ours / cuDNN."""
    impls = [i for i in IMPLS if any(r["impl"] == i for r in rows)]
    peers = [p for p in ("cudnn", "fa3") if p in impls]
    sections = []
    for dtype, pass_ in sorted({(r["dtype"], r["pass"]) for r in rows}):
        cells = sorted({(r["D"], r["S"], r["causal"]) for r in rows if r["dtype"] == dtype and r["pass"] == pass_})
        table = []
        for d, s, causal in cells:
            found = {r["impl"]: r["tflops"] for r in rows
                     if (r["dtype"], r["pass"], r["D"], r["S"], r["causal"]) == (dtype, pass_, d, s, causal)}
            ours = found.get("fa3dist")
            ratios = [ours / found[p] if ours and found.get(p) else None for p in peers]
            table.append([d, s, "yes" if causal else "no", *[found.get(i) for i in impls], *ratios])
        sections.append(f"## {pass_}, {dtype} (TFLOP/s)\n\n" +
                        markdown_table(["D", "S", "causal", *impls, *(f"fa3dist/{p}" for p in peers)], table))
    return "\n\n".join(sections)


def write_kernel_results(cfg: KernelBenchConfig, out_dir: str, plot: bool) -> list[str]:
    """Run the bench and write JSON, Markdown (and PNG); return the paths written. The JSON and Markdown
    are rewritten after every cell (meta "partial" says how far), and finally without "partial".

    Raises RuntimeError, once the results are written, when our own kernel failed in any cell.
    """
    total = len(cfg.cells())

    def checkpoint(rows: list[dict[str, Any]]) -> None:  # a run stopped part-way keeps the cells it measured
        cells = len({(r["dtype"], r["D"], r["S"], r["causal"]) for r in rows})
        meta = run_meta(1, config=dataclasses.asdict(cfg), partial=f"{cells} of {total} cells")
        write_results(out_dir, f"kernel-{gpu_tag(meta)}-{meta['date']}", meta, rows, kernel_markdown(rows))

    meta, rows = run_kernel_bench(cfg, checkpoint)
    meta["config"] = dataclasses.asdict(cfg)
    stem = f"kernel-{gpu_tag(meta)}-{meta['date']}"
    paths = [str(p) for p in write_results(out_dir, stem, meta, rows, kernel_markdown(rows))]
    if plot:
        from .plot import plot_kernel

        paths += plot_kernel(rows, out_dir, stem)
    try:
        check_own_rows(rows)
    except RuntimeError as err:
        raise RuntimeError(f"{err}\nresults written to {', '.join(paths)}") from None
    return paths
