"""PNG charts of benchmark rows (matplotlib, from the [plot] extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'fa3dist[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_kernel(rows: list[dict[str, Any]], out_dir: str, stem: str) -> list[str]:
    """TFLOP/s against S, one panel per (causal, D), one PNG per (dtype, pass), like the FA3 paper.

    fp8 rows (forward only) join the bf16 forward's PNG as dashed lines with square markers
    ("fa3dist fp8"); without bf16 forward rows they get a PNG of their own.
    """
    plt = _pyplot()
    paths = []
    measured = [r for r in rows if r["tflops"]]
    overlay = any(r["dtype"] == "bfloat16" and r["pass"] == "fwd" for r in measured)
    for dtype, pass_ in sorted({(r["dtype"], r["pass"]) for r in rows}):
        if dtype == "fp8" and overlay:
            continue
        sel = [r for r in measured if r["pass"] == pass_
               and (r["dtype"] == dtype or (overlay and (dtype, pass_) == ("bfloat16", "fwd") and r["dtype"] == "fp8"))]
        dims = sorted({r["D"] for r in sel})
        causals = sorted({r["causal"] for r in sel})
        if not sel:
            continue
        fig, axes = plt.subplots(len(causals), len(dims), figsize=(4.2 * len(dims), 3.4 * len(causals)),
                                 squeeze=False, sharey=True)
        for i, causal in enumerate(causals):
            for j, d in enumerate(dims):
                ax = axes[i][j]
                for impl, series_dtype in sorted({(r["impl"], r["dtype"]) for r in sel}, key=lambda x: x[1] == "fp8"):
                    pts = sorted((r["S"], r["tflops"]) for r in sel if r["impl"] == impl and r["dtype"] == series_dtype
                                 and r["D"] == d and r["causal"] == causal)
                    if not pts:
                        continue
                    style = dict(marker="s", linestyle="--") if series_dtype != dtype else dict(marker="o")
                    ax.plot([p[0] for p in pts], [p[1] for p in pts],
                            label=impl if series_dtype == dtype else f"{impl} {series_dtype}", **style)
                ax.set_xscale("log", base=2)
                ax.set_title(f"D={d}, {'causal' if causal else 'non-causal'}")
                ax.set_xlabel("sequence length")
                ax.set_ylabel("TFLOP/s")
                ax.grid(alpha=0.3)
        handles = {}  # one legend, of the lines of every panel (fp8 ones may be in some panels only)
        for ax in axes.flat:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(label, handle)
        axes[0][0].legend(list(handles.values()), list(handles))
        extra = " (fp8: dashed)" if any(r["dtype"] != dtype for r in sel) else ""
        fig.suptitle(f"attention {pass_}, {dtype}{extra}")
        fig.tight_layout()
        path = Path(out_dir) / f"{stem}-{pass_}-{dtype}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    return paths


def plot_lines(rows: list[dict[str, Any]], out_path: str, *, x: str, y: str, series: list[str], panels: list[str],
               title: str, xlabel: str, ylabel: str, logx: bool = False) -> str:
    """A generic panel grid: one panel per distinct ``panels`` tuple, one line per ``series`` tuple."""
    plt = _pyplot()
    keys = sorted({tuple(r[p] for p in panels) for r in rows}, key=str)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        sel = [r for r in rows if tuple(r[p] for p in panels) == key and r.get(y) is not None]
        for name in sorted({tuple(r[s] for s in series) for r in sel}, key=str):
            pts = sorted((r[x], r[y]) for r in sel if tuple(r[s] for s in series) == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=" ".join(map(str, name)))
        if logx:
            ax.set_xscale("log", base=2)
        ax.set_title(", ".join(f"{p}={v}" for p, v in zip(panels, key)))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
