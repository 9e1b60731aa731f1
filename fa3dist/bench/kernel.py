"""``fa3dist bench kernel``: our Triton kernels against cuDNN, FA2 and FlexAttention on one GPU.

For every head dim D, sequence length S and causal setting: B = tokens / S sequences of
H = model_dim / D heads, fresh random inputs, forward and backward, TFLOP/s as the FlashAttention
papers count them, each implementation timed in the same process. Our output and gradients are
checked against cuDNN's before they are timed. A failing peer becomes an error row; our own kernel
failing or disagreeing with cuDNN fails the run (after the results are written). A cell's inputs are
drawn from a seed of its own (cfg.seed, D, S, causal), so the cells of one shape in different dtypes
see the same values.

Every forward row has "rmse": against float64 attention of the same inputs on the last 128 query rows
of every (batch, head) (``bench.fp8.sampled_reference``).

dtype "fp8" cells are forward only and time our kernel alone (besides any PyTorch FP8 attention that
runs here): the bf16 inputs quantized to e4m3 per tensor with incoherent processing, V made K-major,
outside the timed ``flash_fwd``; "quantize_ms" times that preparation. Their "rel_err_vs_cudnn" is
against cuDNN's bf16 out (an untimed call) and may be up to ``bench.fp8.FP8_TOLERANCE`` (bf16: 5e-2).
The run's meta gets the cuBLAS fp8 GEMM ceiling and what PyTorch's FP8 attention did here.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from fa3dist.config import check_choices
from fa3dist.kernels.common import paths_taken
from fa3dist.kernels.numerics import relative_error

from . import fp8 as bench_fp8
from .common import DTYPES, Checkpoint, attention_flops, gpu_tag, markdown_table, run_meta, time_ms, write_results
from .peers import IMPLS, prepare, unavailable_reason

log = logging.getLogger("fa3dist.bench")

FP8 = "fp8"  # the dtype name of an FP8 cell: bf16 inputs quantized to float8_e4m3fn for our kernel
KERNEL_DTYPES = (*DTYPES, FP8)
BF16_TOLERANCE = 5e-2  # rel_err_vs_cudnn above which a row is an error (fp8 rows: bench_fp8.FP8_TOLERANCE)


@dataclass
class KernelBenchConfig:
    """What ``fa3dist bench kernel`` measures."""

    head_dims: list[int] = field(default_factory=lambda: [64, 128, 256])
    seq_lens: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096, 8192, 16384])
    causal: list[bool] = field(default_factory=lambda: [False, True])
    tokens: int = 16384  # batch = tokens // seq_len
    model_dim: int = 2048  # heads = model_dim // head_dim
    kv_group: int = 1  # kv_heads = heads // kv_group (1: MHA)
    dtypes: list[str] = field(default_factory=lambda: ["bfloat16"])  # and "fp8": forward only, our kernel
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
        check_choices(self, {"dtypes": KERNEL_DTYPES, "passes": ("fwd", "bwd"), "impls": IMPLS})
        for cell in self.extra_cells:
            if (len(cell) != 4 or cell[0] not in KERNEL_DTYPES or not isinstance(cell[1], int)
                    or not isinstance(cell[2], int) or not isinstance(cell[3], bool) or self.tokens % cell[2]):
                raise ValueError(f"key 'extra_cells': {cell} is not [dtype, head_dim, seq_len dividing tokens, causal]")
        for dtype, head_dim, _, _ in self.cells():
            if dtype == FP8 and head_dim & (head_dim - 1):
                raise ValueError(f"fp8 cells need a power-of-two head dim (incoherent processing's Hadamard "
                                 f"rotation); got D={head_dim}")
        if self.has_fp8() and "fwd" not in self.passes:
            raise ValueError("fp8 cells are forward only: key 'passes' must include fwd")

    def cells(self) -> list[tuple[str, int, int, bool]]:
        grid = list(itertools.product(self.dtypes, self.head_dims, self.seq_lens, self.causal))
        return grid + [tuple(c) for c in self.extra_cells if tuple(c) not in grid]

    def has_fp8(self) -> bool:
        return any(cell[0] == FP8 for cell in self.cells())


def _cell_seed(seed: int, head_dim: int, seq: int, causal: bool) -> int:
    """The seed of one cell's inputs: one per (D, S, causal), so a shape's cells in every dtype (bf16 and
    fp8 above all) draw the same values."""
    return (seed * 2 ** 40 + (seq * 1024 + head_dim) * 2 + int(causal)) % 2 ** 63


def _rmse(impl: str, out: torch.Tensor, truth: torch.Tensor) -> float:
    rmse = bench_fp8.rmse_against(out, truth)
    if not math.isfinite(rmse):
        raise RuntimeError(f"{impl} gave NaN or inf in the sampled rows")
    return rmse


def _measure(impl: str, q, k, v, do, causal: bool, passes: list[str], cfg: KernelBenchConfig,
             reference: dict[str, torch.Tensor] | None, truth: torch.Tensor) -> tuple[dict[str, float], dict[str, Any]]:
    """Times (ms) per pass for one implementation, and its outputs in (B, S, H, D) (gradients only when
    the backward is measured), the relative errors against ``reference`` and the forward's RMSE
    against ``truth`` (``bench_fp8.sampled_reference``)."""
    prep = prepare(impl, q, k, v, causal=causal)
    out = prep.forward()
    do_native = prep.to_bshd(do) if impl != "fa3dist" else do
    outputs: dict[str, Any] = {"out": prep.to_bshd(out).detach()}
    if "bwd" in passes:
        grads = torch.autograd.grad(out, (prep.q, prep.k, prep.v), do_native, retain_graph=True)
        outputs.update({name: prep.to_bshd(g) for name, g in zip(("dq", "dk", "dv"), grads)})
    if reference is not None:
        errors = {name: relative_error(outputs[name], reference[name]) for name in outputs}
        if max(errors.values()) > BF16_TOLERANCE:
            raise RuntimeError(f"{impl} disagrees with cudnn: relative errors {errors}")
        outputs["errors"] = errors
    outputs["rmse"] = _rmse(impl, outputs["out"], truth)
    times = {}
    if "fwd" in passes:
        times["fwd"] = time_ms(prep.forward, warmup_ms=cfg.warmup_ms, rep_ms=cfg.rep_ms)
    if "bwd" in passes:
        times["bwd"] = time_ms(lambda: torch.autograd.grad(out, (prep.q, prep.k, prep.v), do_native,
                                                           retain_graph=True),
                               warmup_ms=cfg.warmup_ms, rep_ms=cfg.rep_ms)
    return times, outputs


def _cell_rows(q, k, v, do, causal: bool, cfg: KernelBenchConfig, shape: dict[str, Any], impls: list[str],
               truth: torch.Tensor) -> list[dict[str, Any]]:
    """The rows of a bf16/fp16/fp32 cell: every implementation, cuDNN first (the others are checked against it)."""
    rows: list[dict[str, Any]] = []
    reference = None
    for impl in sorted(impls, key=lambda i: i != "cudnn"):
        base = {"impl": impl, **shape}
        try:
            times, outputs = _measure(impl, q, k, v, do, causal, cfg.passes, cfg,
                                      None if impl == "cudnn" else reference, truth)
        except Exception as err:  # one failing peer must not end the run
            log.warning("%s failed at %s: %s", impl, base, err)
            rows += [{**base, "pass": p, "ms": None, "tflops": None, "error": str(err)[:300]} for p in cfg.passes]
            continue
        if impl == "cudnn":
            reference = outputs
        for pass_, ms in times.items():
            flops = attention_flops(shape["B"], shape["H"], shape["S"], shape["D"], causal, pass_)
            row = {**base, "pass": pass_, "ms": ms, "tflops": flops / ms / 1e9}
            if pass_ == "fwd":
                row["rmse"] = outputs["rmse"]
            if "errors" in outputs:
                row["rel_err_vs_cudnn"] = outputs["errors"]["out" if pass_ == "fwd" else "dq"]
            rows.append(row)
        del outputs
    return rows


def _cudnn_out(q, k, v, causal: bool) -> torch.Tensor | None:
    """cuDNN's bf16 forward out in (B, S, H, D), untimed: what fp8 rows' rel_err_vs_cudnn is against."""
    try:
        prep = prepare("cudnn", q, k, v, causal=causal)
        with torch.no_grad():
            return prep.to_bshd(prep.forward()).detach()
    except Exception as err:
        log.warning("cudnn failed in an fp8 cell (its rows get no rel_err_vs_cudnn): %s", err)
        return None


def _fp8_rows(q, k, v, causal: bool, cfg: KernelBenchConfig, shape: dict[str, Any], truth: torch.Tensor,
              cudnn_out: torch.Tensor | None, pytorch_impls: list[str]) -> list[dict[str, Any]]:
    """The rows of an fp8 cell (forward only): ours on the quantized inputs (and "quantize_ms", the time
    of ``bench_fp8.quantize_inputs``), then each PyTorch FP8 attention that ran in the probe."""
    from fa3dist.kernels.triton_fwd import flash_fwd

    scale = 1 / math.sqrt(shape["D"])
    flops = attention_flops(shape["B"], shape["H"], shape["S"], shape["D"], causal, "fwd")
    rows: list[dict[str, Any]] = []
    x = v_kmajor = None
    for impl in ("fa3dist", *pytorch_impls):
        base = {"impl": impl, **shape, "pass": "fwd"}
        try:
            if x is None:
                x, v_kmajor = bench_fp8.quantize_inputs(q, k, v)
            if impl == "fa3dist":
                def forward(x=x, v_kmajor=v_kmajor) -> torch.Tensor:
                    return flash_fwd(x.q, x.k, v_kmajor, softmax_scale=scale, causal=causal, q_descale=x.q_descale,
                                     k_descale=x.k_descale, v_descale=x.v_descale)[0]

                to_bshd = _same
            else:
                forward, to_bshd = bench_fp8.PYTORCH_FP8[impl][2](x, scale, causal)
            out = to_bshd(forward())
            accuracy = {"rmse": _rmse(impl, out, truth)}
            if cudnn_out is not None:
                err = relative_error(out, cudnn_out)
                if not err <= bench_fp8.FP8_TOLERANCE:
                    raise RuntimeError(f"{impl} (fp8) disagrees with cudnn (bf16): relative error {err:.4g} > "
                                       f"{bench_fp8.FP8_TOLERANCE}")
                accuracy["rel_err_vs_cudnn"] = err
            del out
            ms = time_ms(forward, warmup_ms=cfg.warmup_ms, rep_ms=cfg.rep_ms)
            row = {**base, "ms": ms, "tflops": flops / ms / 1e9}
            if impl == "fa3dist":
                row["quantize_ms"] = time_ms(lambda: bench_fp8.quantize_inputs(q, k, v), warmup_ms=cfg.warmup_ms,
                                             rep_ms=cfg.rep_ms)
            rows.append({**row, **accuracy})
        except Exception as err:  # a failing PyTorch FP8 row is an error row; ours fails the run later
            log.warning("%s failed at %s: %s", impl, base, err)
            rows.append({**base, "ms": None, "tflops": None, "error": str(err)[:300]})
    return rows


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def fp8_run_meta(cfg: KernelBenchConfig, device: torch.device | str = "cuda") -> dict[str, Any]:
    """What fp8 cells add to the run's meta (nothing without them): "fp8_gemm_ceiling" (cuBLAS's e4m3
    GEMM, the FP8 forward's ceiling) and, for each of ``bench_fp8.PYTORCH_FP8``, "ran" or its error."""
    if not cfg.has_fp8():
        return {}
    meta: dict[str, Any] = {"fp8_gemm_ceiling": bench_fp8.fp8_gemm_ceiling(warmup_ms=cfg.warmup_ms,
                                                                           rep_ms=cfg.rep_ms, device=device)}
    found = bench_fp8.probe_pytorch_fp8(device)
    for impl, (key, api, _) in bench_fp8.PYTORCH_FP8.items():
        meta[key] = found[impl]
        log.warning("PyTorch FP8 attention %s (%s): %s", impl, api, found[impl])
    return meta


def run_kernel_bench(cfg: KernelBenchConfig, checkpoint: Checkpoint | None = None, *,
                     fp8_meta: dict[str, Any] | None = None, device: torch.device | str = "cuda"
                     ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Measure every cell; return (meta, rows). ``checkpoint(rows)`` runs after each cell.

    ``fp8_meta``: ``fp8_run_meta(cfg)`` when the caller has it already (it is measured here otherwise).
    ``device``: CUDA; a CPU runs the kernels only in Triton's interpreter (the tests, with fake timings).
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench kernel needs a CUDA GPU")
    if fp8_meta is None:
        fp8_meta = fp8_run_meta(cfg, device)
    pytorch_fp8 = [impl for impl, (key, _, _) in bench_fp8.PYTORCH_FP8.items() if fp8_meta.get(key) == "ran"]
    skipped = {i: reason for i in cfg.impls if (reason := unavailable_reason(i, device))}
    for impl, reason in skipped.items():
        log.warning("peer %s skipped: %s", impl, reason)
    rows: list[dict[str, Any]] = []
    cells = cfg.cells()
    progress = tqdm(cells, desc="bench kernel", unit="cell")
    for dtype_name, head_dim, seq, causal in progress:
        progress.set_postfix_str(f"{dtype_name} D={head_dim} S={seq} causal={causal}")
        batch, heads = cfg.tokens // seq, cfg.model_dim // head_dim
        kv_heads = heads // cfg.kv_group
        dtype = torch.bfloat16 if dtype_name == FP8 else DTYPES[dtype_name]
        gen = torch.Generator(device=device).manual_seed(_cell_seed(cfg.seed, head_dim, seq, causal))
        q, do = (torch.randn(batch, seq, heads, head_dim, device=device, dtype=dtype, generator=gen) for _ in range(2))
        k, v = (torch.randn(batch, seq, kv_heads, head_dim, device=device, dtype=dtype, generator=gen)
                for _ in range(2))
        truth = bench_fp8.sampled_reference(q, k, v, softmax_scale=1 / math.sqrt(head_dim), causal=causal)
        shape = {"dtype": dtype_name, "B": batch, "H": heads, "Hkv": kv_heads, "S": seq, "D": head_dim,
                 "causal": causal}
        if dtype_name == FP8:
            cudnn_out = _cudnn_out(q, k, v, causal) if "cudnn" in cfg.impls and "cudnn" not in skipped else None
            rows += _fp8_rows(q, k, v, causal, cfg, shape, truth, cudnn_out, pytorch_fp8)
            del cudnn_out
        else:
            impls = [i for i in cfg.impls if i not in skipped
                     and (i != "flex" or (head_dim in cfg.flex_head_dims and seq in cfg.flex_seq_lens))]
            rows += _cell_rows(q, k, v, do, causal, cfg, shape, impls, truth)
        del q, k, v, do, truth
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if checkpoint is not None:
            checkpoint(rows)
    taken = sorted({path for paths in paths_taken().values() for path in paths})
    return run_meta(1, fa3dist_kernel="+".join(taken) or None, skipped_peers=skipped, **fp8_meta), rows


def check_own_rows(rows: list[dict[str, Any]]) -> None:
    """Raise RuntimeError when our kernel ("fa3dist") failed or disagreed with cuDNN in any cell."""
    failed = sorted({f"{r['dtype']} D={r['D']} S={r['S']} causal={r['causal']}: {r['error']}"
                     for r in rows if r["impl"] == "fa3dist" and r.get("error")})
    if failed:
        raise RuntimeError(f"fa3dist failed or disagreed with cuDNN in {len(failed)} cell(s):\n" + "\n".join(failed))


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def kernel_markdown(rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> str:
    """One table per (dtype, pass): TFLOP/s of every implementation, ours / cuDNN and ours / FA3 (and in
    the forward our RMSE); fp8 rows get a table of their own (``fp8_markdown``)."""
    plain = [r for r in rows if r["dtype"] != FP8]
    impls = [i for i in IMPLS if any(r["impl"] == i for r in plain)]
    peers = [p for p in ("cudnn", "fa3") if p in impls]
    sections = []
    for dtype, pass_ in sorted({(r["dtype"], r["pass"]) for r in plain}):
        sel = [r for r in plain if r["dtype"] == dtype and r["pass"] == pass_]
        with_rmse = any(r.get("rmse") is not None for r in sel if r["impl"] == "fa3dist")
        table = []
        for d, s, causal in sorted({(r["D"], r["S"], r["causal"]) for r in sel}):
            found = {r["impl"]: r for r in sel if (r["D"], r["S"], r["causal"]) == (d, s, causal)}
            tflops = {impl: row["tflops"] for impl, row in found.items()}
            ours = tflops.get("fa3dist")
            ratios = [_ratio(ours, tflops.get(p)) for p in peers]
            rmse = [found.get("fa3dist", {}).get("rmse")] if with_rmse else []
            table.append([d, s, "yes" if causal else "no", *[tflops.get(i) for i in impls], *ratios, *rmse])
        header = ["D", "S", "causal", *impls, *(f"fa3dist/{p}" for p in peers), *(["fa3dist rmse"] if with_rmse else [])]
        sections.append(f"## {pass_}, {dtype} (TFLOP/s)\n\n" + markdown_table(header, table))
    if any(r["dtype"] == FP8 for r in rows):
        sections.append(fp8_markdown(rows, meta or {}))
    return "\n\n".join(sections)


def _fp8_notes(meta: dict[str, Any]) -> list[str]:
    """The lines above the fp8 table: the GEMM ceiling and what PyTorch's FP8 attention did."""
    lines = []
    ceiling = meta.get("fp8_gemm_ceiling")
    if ceiling is not None:
        if ceiling.get("tflops"):
            lines.append(f"Ceiling: cuBLAS FP8 GEMM ({ceiling['op']}), {ceiling['tflops']:.0f} TFLOP/s.")
        else:
            lines.append(f"Ceiling: cuBLAS FP8 GEMM ({ceiling['op']}) failed: {ceiling.get('error')}")
    probed = [(impl, api, meta[key]) for impl, (key, api, _) in bench_fp8.PYTORCH_FP8.items() if key in meta]
    if probed:
        ran = [f"`{api}` (rows {impl})" for impl, api, status in probed if status == "ran"]
        failed = [f"`{api}`: {status}" for impl, api, status in probed if status != "ran"]
        lines.append("PyTorch FP8 attention here: " + (", ".join(ran) + " ran." if ran else "none ran.") +
                     "".join(f"\n- {line}" for line in failed))
    lines.append("fa3dist fp8: the bf16 inputs quantized to e4m3 per tensor with incoherent processing and V made "
                 "K-major (`quantize_qkv` + `kmajor_v`: quantize ms, not in the fp8 time); bf16 out. rmse: against "
                 f"float64 attention of the same bf16 inputs on the last {bench_fp8.RMSE_ROWS} query rows of every "
                 "(batch, head). bf16 columns and ratios: the bf16 rows of the same D, S, causal (the same inputs).")
    return lines


def fp8_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The fp8 forward table: ours in fp8 (TFLOP/s, RMSE, quantize ms) beside ours in bf16, any PyTorch FP8
    attention, and fp8 / bf16 ratios against ours, cuDNN and FA3 where their bf16 rows exist."""
    fp8_rows = [r for r in rows if r["dtype"] == FP8 and r["pass"] == "fwd"]
    bf16 = {(r["impl"], r["D"], r["S"], r["causal"]): r for r in rows if r["dtype"] == "bfloat16" and r["pass"] == "fwd"}
    torch_impls = [i for i in bench_fp8.PYTORCH_FP8 if any(r["impl"] == i for r in fp8_rows)]
    peers = [p for p in ("cudnn", "fa3") if any(key[0] == p for key in bf16)]
    table = []
    for d, s, causal in sorted({(r["D"], r["S"], r["causal"]) for r in fp8_rows}):
        found = {r["impl"]: r for r in fp8_rows if (r["D"], r["S"], r["causal"]) == (d, s, causal)}
        ours = found.get("fa3dist", {})
        ours_bf16 = bf16.get(("fa3dist", d, s, causal), {})
        theirs = [x for i in torch_impls for x in (found.get(i, {}).get("tflops"), found.get(i, {}).get("rmse"))]
        ratios = [_ratio(ours.get("tflops"), bf16.get((p, d, s, causal), {}).get("tflops")) for p in peers]
        table.append([d, s, "yes" if causal else "no", ours.get("tflops"), ours.get("rmse"), ours.get("quantize_ms"),
                      ours_bf16.get("tflops"), ours_bf16.get("rmse"), *theirs,
                      _ratio(ours.get("tflops"), ours_bf16.get("tflops")), *ratios])
    header = ["D", "S", "causal", "fa3dist fp8", "rmse", "quantize ms", "fa3dist bf16", "rmse bf16",
              *(x for i in torch_impls for x in (i, f"{i} rmse")), "fp8/bf16-ours", *(f"fp8/{p} (bf16)" for p in peers)]
    return "## fwd, fp8 (TFLOP/s)\n\n" + "\n\n".join(_fp8_notes(meta)) + "\n\n" + markdown_table(header, table)


def write_kernel_results(cfg: KernelBenchConfig, out_dir: str, plot: bool, *,
                         device: torch.device | str = "cuda") -> list[str]:
    """Run the bench and write JSON, Markdown (and PNG); return the paths written. The JSON and Markdown
    are rewritten after every cell (meta "partial" says how far), and finally without "partial". A run
    with fp8 cells is ``kernel-<gpu>-<date>-fp8``, beside the bf16 run of the same day.

    Raises RuntimeError, once the results are written, when our own kernel failed in any cell.
    """
    total = len(cfg.cells())
    suffix = "-fp8" if cfg.has_fp8() else ""
    fp8_meta = fp8_run_meta(cfg, device)

    def checkpoint(rows: list[dict[str, Any]]) -> None:  # a run stopped part-way keeps the cells it measured
        cells = len({(r["dtype"], r["D"], r["S"], r["causal"]) for r in rows})
        meta = run_meta(1, config=dataclasses.asdict(cfg), partial=f"{cells} of {total} cells", **fp8_meta)
        write_results(out_dir, f"kernel-{gpu_tag(meta)}-{meta['date']}{suffix}", meta, rows,
                      kernel_markdown(rows, meta))

    meta, rows = run_kernel_bench(cfg, checkpoint, fp8_meta=fp8_meta, device=device)
    meta["config"] = dataclasses.asdict(cfg)
    stem = f"kernel-{gpu_tag(meta)}-{meta['date']}{suffix}"
    paths = [str(p) for p in write_results(out_dir, stem, meta, rows, kernel_markdown(rows, meta))]
    if plot:
        from .plot import plot_kernel

        paths += plot_kernel(rows, out_dir, stem)
    try:
        check_own_rows(rows)
    except RuntimeError as err:
        raise RuntimeError(f"{err}\nresults written to {', '.join(paths)}") from None
    return paths
