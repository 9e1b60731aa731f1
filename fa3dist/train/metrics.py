"""Throughput figures of a training run, its log file and its loss curve.

FLOPs per step count attention as the benchmarks do (``fa3dist.bench.common.attention_flops``,
causal, forward + backward = 3.5x forward) plus 6 FLOPs per parameter per token for the matrix
products (the input embedding, a lookup, is left out). Recomputation under activation
checkpointing is not counted, as usual for MFU.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import torch

from fa3dist.bench.common import attention_flops
from fa3dist.model import ModelConfig

# Dense bf16 peak of one GPU (FLOP/s), by a name that its device name contains.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "H800": 989.4e12, "A100": 312e12}


def flops_per_step(cfg: ModelConfig, matmul_params: int, batch: int, seq_len: int) -> float:
    """Model FLOPs of one training step (forward + backward) over the whole sequence."""
    attention = cfg.n_layers * attention_flops(batch, cfg.n_heads, seq_len, cfg.head_dim, True, "fwd+bwd")
    return 6.0 * matmul_params * batch * seq_len + attention


def peak_flops(device: torch.device) -> float | None:
    """bf16 peak FLOP/s of one ``device``; None off CUDA or for a GPU not in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


class TrainLog:
    """``train_log.jsonl``: one JSON object per logged step, written by rank 0."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        """Drop the lines of steps after ``step`` (those a resumed run will log again)."""
        if self.path.exists():
            kept = [line for line in self.read() if line["step"] <= step]
            self.path.write_text("".join(json.dumps(line) + "\n" for line in kept))

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_loss(log_path: str | Path, png_path: str | Path, title: str = "") -> Path:
    """Draw the loss and the accuracy of a ``train_log.jsonl`` against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = TrainLog(log_path).read()
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in records], label="loss", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    acc = ax.twinx()
    acc.plot(steps, [r["accuracy"] for r in records], label="accuracy", color="tab:orange")
    acc.set_ylabel("accuracy of the counted targets")
    acc.set_ylim(0, 1.02)
    fig.legend(loc="center right", bbox_to_anchor=(0.85, 0.5))
    ax.set_title(title or Path(log_path).parent.name)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return Path(png_path)


def summarize_run(run_dir: str | Path, title: str = "") -> str:
    """A Markdown summary of a finished run: losses, throughput and MFU after warm-up, peak memory.

    Throughput is the median over the logged intervals after the first two, which hold the
    compilation and warm-up steps.
    """
    run_dir = Path(run_dir)
    records = TrainLog(run_dir / "train_log.jsonl").read()
    result = json.loads((run_dir / "result.json").read_text())
    steady = records[2:] if len(records) > 3 else records
    mfu = [r["mfu"] for r in steady if r["mfu"] is not None]
    memory = result["peak_memory_gib"]
    cells = {
        "device": f"{result['world_size']} x {result.get('gpu') or result['device']}",
        "parameters": f"{result['parameters'] / 1e6:.1f} M",
        "tokens per step": f"{result['seq_len']} x {result['batch_size']} sequences",
        "steps": str(records[-1]["step"] + 1),
        "loss (first, last)": f"{records[0]['loss']:.4f}, {records[-1]['loss']:.4f}",
        "accuracy (last)": f"{records[-1]['accuracy']:.3f}",
        "tokens/s": f"{statistics.median(r['tokens_per_s'] for r in steady):.0f}",
        "s per step": f"{statistics.median(r['step_s'] for r in steady):.3f}",
        "MFU": f"{statistics.median(mfu):.3f}" if mfu else "n/a",
        "peak memory per GPU (GiB)": ", ".join(f"{m:.1f}" for m in memory) if memory[0] is not None else "n/a",
    }
    return "\n".join([f"# {title or run_dir.name}", "", "| | |", "|---|---|",
                      *(f"| {key} | {value} |" for key, value in cells.items())]) + "\n"
