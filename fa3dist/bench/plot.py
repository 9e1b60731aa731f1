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
    """TFLOP/s against S, one panel per (causal, D), one PNG per (dtype, pass), like the FA3 paper."""
    plt = _pyplot()
    paths = []
    for dtype, pass_ in sorted({(r["dtype"], r["pass"]) for r in rows}):
        sel = [r for r in rows if r["dtype"] == dtype and r["pass"] == pass_ and r["tflops"]]
        dims = sorted({r["D"] for r in sel})
        causals = sorted({r["causal"] for r in sel})
        if not sel:
            continue
        fig, axes = plt.subplots(len(causals), len(dims), figsize=(4.2 * len(dims), 3.4 * len(causals)),
                                 squeeze=False, sharey=True)
        for i, causal in enumerate(causals):
            for j, d in enumerate(dims):
                ax = axes[i][j]
                for impl in sorted({r["impl"] for r in sel}):
                    pts = sorted((r["S"], r["tflops"]) for r in sel
                                 if r["impl"] == impl and r["D"] == d and r["causal"] == causal)
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
                ax.set_xscale("log", base=2)
                ax.set_title(f"D={d}, {'causal' if causal else 'non-causal'}")
                ax.set_xlabel("sequence length")
                ax.set_ylabel("TFLOP/s")
                ax.grid(alpha=0.3)
        axes[0][0].legend()
        fig.suptitle(f"attention {pass_}, {dtype}")
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
