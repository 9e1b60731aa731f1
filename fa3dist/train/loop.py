"""The training loop of ``fa3dist train``, one process per rank of the sequence-parallel group.

Every rank builds the same model from the seed and takes its own shard of every batch. The loss of
a step is the mean over the counted targets of the whole sequence: each rank sums the
cross-entropy of its local targets and divides by the count over all ranks, and the gradients are
summed over the group. A step at world size W therefore equals the step at world size 1 (up to
rounding), and every rank applies the same update to the same weights.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from fa3dist.data import IGNORE, Batch, RecallTask, TokenFile
from fa3dist.layout import shard_positions, shard_sequence
from fa3dist.model import Transformer, count_parameters

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .metrics import TrainLog, flops_per_step, peak_flops, plot_loss

log = logging.getLogger("fa3dist.train")


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay from ``lr`` to ``min_lr`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_data(cfg: TrainConfig) -> RecallTask | TokenFile:
    if cfg.data == "tokens":
        return TokenFile(cfg.token_file, token_dtype=cfg.token_dtype, vocab_size=cfg.vocab_size, seq_len=cfg.seq_len,
                         batch_size=cfg.batch_size, seed=cfg.seed)
    return RecallTask(vocab_size=cfg.vocab_size, seq_len=cfg.seq_len, batch_size=cfg.batch_size, n_pairs=cfg.n_pairs,
                      n_queries=cfg.n_queries, seed=cfg.seed)


class Trainer:
    """Model, optimiser and data of one rank; ``train_step`` is one optimisation step."""

    def __init__(self, cfg: TrainConfig, rank: int, world_size: int, device: torch.device):
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.autocast = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
        torch.manual_seed(cfg.seed)
        self.model = Transformer(cfg.model_config(), layout=cfg.layout, backend=cfg.backend, shard_only=cfg.shard_only,
                                 activation_checkpointing=cfg.activation_checkpointing)
        self.model.to(device=device, dtype=torch.float64 if cfg.precision == "float64" else torch.float32)
        self.forward = torch.compile(self.model, fullgraph=True) if cfg.compile else self.model
        matrices = [p for p in self.model.parameters() if p.dim() >= 2]
        others = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": cfg.weight_decay},
                                            {"params": others, "weight_decay": 0.0}],
                                           lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        self.data = make_data(cfg)
        self.positions = shard_positions(cfg.seq_len, world_size=world_size, rank=rank, layout=cfg.layout,
                                         device=device)

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full (B, S) batch tensor, on its device."""
        return shard_sequence(x, world_size=self.world_size, rank=self.rank, layout=self.cfg.layout).to(self.device)

    def forward_backward(self, batch: Batch) -> torch.Tensor:
        """Loss and gradients of ``batch``, summed over the group; returns (loss, accuracy) of the
        whole batch as a tensor (all ranks hold the same values once reduced)."""
        inputs, targets = self.shard(batch.inputs), self.shard(batch.targets)
        counted = batch.counted
        with torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else nullcontext():
            logits = self.forward(inputs, self.positions)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        flat_logits, flat_targets = logits.flatten(0, 1), targets.flatten()
        loss = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE, reduction="sum") / counted
        loss.backward()
        correct = (flat_logits.argmax(-1) == flat_targets).sum() / counted
        stats = torch.stack((loss.detach(), correct.to(loss.dtype)))
        if self.world_size > 1:
            for param in self.model.parameters():
                dist.all_reduce(param.grad)
            dist.all_reduce(stats)
        return stats

    def optimizer_step(self, step: int) -> None:
        """Clip the gradient norm, set the step's learning rate and update the weights."""
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.cfg, step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train_step(self, step: int) -> torch.Tensor:
        """One step on the batch of ``step``; returns (loss, accuracy) over the whole batch."""
        stats = self.forward_backward(self.data.batch(step))
        self.optimizer_step(step)
        return stats

    def state(self, next_step: int) -> dict[str, Any]:
        """What a checkpoint keeps besides model and optimiser: where to go on, and the RNG."""
        state: dict[str, Any] = {"next_step": next_step, "rng_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def restore(self, path: Path) -> int:
        """Load the checkpoint at ``path``; return the step to go on from."""
        state = load_checkpoint(path, self.model, self.optimizer, self.state(0))
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        return int(state["next_step"])


def _fault_drill(cfg: TrainConfig, rank: int, step: int) -> None:
    """Kill this rank with SIGKILL where the config asks, once per run folder."""
    done = Path(cfg.out) / f"fault_drill_rank{rank}_step{step}"
    if cfg.fail_rank == rank and cfg.fail_step == step and not done.exists():
        done.touch()
        log.error("fault drill: rank %d kills itself (SIGKILL) at step %d", rank, step)
        for handler in logging.getLogger("fa3dist").handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def run_train(cfg: TrainConfig, ctx) -> dict[str, Any]:
    """Train as one rank; rank 0's result summarises the run."""
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0  # torchrun restarted us
    if ctx.device.type == "cpu":  # one share of the cores per local rank: oversubscribed threads crawl
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    trainer = Trainer(cfg, ctx.rank, ctx.world_size, ctx.device)
    n_params = count_parameters(trainer.model)
    flops = flops_per_step(trainer.model.cfg, count_parameters(trainer.model, exclude_embedding=True),
                           cfg.batch_size, cfg.seq_len)
    peak = peak_flops(ctx.device) if trainer.autocast else None
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    checkpoints = Path(cfg.out) / "checkpoints"
    train_log = TrainLog(Path(cfg.out) / "train_log.jsonl")
    start = 0
    latest = latest_checkpoint(checkpoints) if cfg.resume or restarted else None
    if latest is not None:
        start = trainer.restore(latest[1])
        log.info("resumed from %s at step %d", latest[1], start)
    if ctx.rank == 0:
        if latest is None:
            train_log.path.unlink(missing_ok=True)
        train_log.truncate_after(start - 1)
    log.info("training %d parameters on %d rank(s), steps %d..%d", n_params, ctx.world_size, start, cfg.steps - 1)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    record: dict[str, Any] = {}
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=ctx.rank != 0)
    timer, timed_steps = time.perf_counter(), 0
    for step in range(start, cfg.steps):
        _fault_drill(cfg, ctx.rank, step)
        stats = trainer.train_step(step)
        ctx.progress(f"step {step}")
        timed_steps += 1
        last = step == cfg.steps - 1
        if step == 0 or (step + 1) % cfg.log_every == 0 or last:
            loss, accuracy = stats.tolist()  # waits for the step to finish
            seconds = (time.perf_counter() - timer) / timed_steps
            record = {"step": step, "loss": loss, "accuracy": accuracy, "lr": learning_rate(cfg, step),
                      "tokens_per_s": tokens_per_step / seconds, "step_s": seconds,
                      "mfu": flops / (seconds * ctx.world_size * peak) if peak else None}
            log.info("step %d loss %.5f accuracy %.3f %.0f tokens/s", step, loss, accuracy, record["tokens_per_s"])
            if ctx.rank == 0:
                train_log.append(record)
            bar.set_postfix(loss=f"{loss:.4f}", acc=f"{accuracy:.3f}")
            timer, timed_steps = time.perf_counter(), 0
        bar.update(1)
        if cfg.checkpoint_every and ((step + 1) % cfg.checkpoint_every == 0 or last):
            saving = time.perf_counter()
            save_checkpoint(checkpoints, step, trainer.model, trainer.optimizer, trainer.state(step + 1),
                            keep=cfg.keep_checkpoints)
            timer += time.perf_counter() - saving  # throughput leaves checkpointing out
    bar.close()
    peak_memory = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.device.type == "cuda" else None
    memories = [peak_memory] * ctx.world_size
    if ctx.world_size > 1:
        dist.all_gather_object(memories, peak_memory)
    gpu = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else None
    plot = str(plot_loss(train_log.path, Path(cfg.out) / "loss.png")) if cfg.plot and ctx.rank == 0 else None
    return {"job": "train", "world_size": ctx.world_size, "device": str(ctx.device), "gpu": gpu, "parameters": n_params,
            "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "steps": cfg.steps, "resumed_at": start,
            "final": record, "flops_per_step": flops, "peak_memory_gib": memories, "out": cfg.out, "plot": plot}


def train_summary(result: dict[str, Any]) -> tuple[str, int]:
    """The lines ``fa3dist train`` prints for a finished run (the last logged step), and its exit code."""
    final, memory = result["final"], result["peak_memory_gib"]
    mfu = f", MFU {final['mfu']:.3f}" if final.get("mfu") is not None else ""
    peak = f", peak memory per GPU {', '.join(f'{m:.1f}' for m in memory)} GiB" if memory[0] is not None else ""
    lines = [f"step {final['step']}: loss {final['loss']:.4f}, accuracy {final['accuracy']:.3f}, "
             f"{final['tokens_per_s']:.0f} tokens/s{mfu}{peak}"]
    if result.get("plot"):
        lines.append(f"wrote {result['plot']}")
    lines.append(f"log: {Path(result['out']) / 'train_log.jsonl'}")
    return "\n".join(lines), 0
