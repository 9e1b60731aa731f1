"""``fa3dist train`` on the CPU: data, schedule, checkpoints that resume exactly, restarts after a
killed rank under every launcher, and the recall task that only the ring can solve."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fa3dist.cli import main as cli_main
from fa3dist.config import ConfigError, load_config
from fa3dist.data import IGNORE, RecallTask, TokenFile
from fa3dist.launch.worker import RankContext
from fa3dist.train import TrainConfig, Trainer, learning_rate, run_train, train_summary
from fa3dist.train.checkpoint import MARKER, latest_checkpoint
from tests.multiproc import run_ranks

# A small float64 run: exact to compare, quick on 2 cores.
SMALL = ["precision=float64", "seq_len=32", "batch_size=4", "vocab_size=32", "dim=32", "n_heads=2", "n_kv_heads=1",
         "ffn_dim=48", "n_pairs=1", "n_queries=4", "lr=0.01", "warmup_steps=2", "steps=12", "log_every=1",
         "checkpoint_every=4", "keep_checkpoints=3", "device=cpu", "world_size=2"]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "train_log.jsonl").read_text().splitlines())]


def test_learning_rate_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=4, steps=14)
    assert [learning_rate(cfg, s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(cfg, 9) == pytest.approx(0.55)
    assert learning_rate(cfg, 14) == pytest.approx(0.1)
    decay = [learning_rate(cfg, s) for s in range(4, 15)]
    assert all(a > b for a, b in zip(decay, decay[1:]))


def test_recall_batches_depend_on_seed_and_step_only():
    task = RecallTask(vocab_size=32, seq_len=64, batch_size=3, n_pairs=3, n_queries=5, seed=1)
    first, again, other = task.batch(7), task.batch(7), task.batch(8)
    assert torch.equal(first.inputs, again.inputs) and torch.equal(first.targets, again.targets)
    assert not torch.equal(first.inputs, other.inputs)
    assert first.counted == 3 * 5
    for inputs, targets in zip(first.inputs, first.targets):
        keys, values = inputs[0:6:2], inputs[1:6:2]
        asked = (targets != IGNORE).nonzero().flatten()
        assert len(asked) == 5 and bool((asked >= 32).all())  # queries in the second half
        for position in asked:
            (pair,) = (keys == inputs[position]).nonzero().flatten()
            assert targets[position] == values[pair]
        is_value = (inputs >= 8) & (inputs < 16)
        assert is_value.nonzero().flatten().tolist() == [1, 3, 5]  # values appear only in the pairs


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_file_gives_shifted_windows(tmp_path, dtype):
    path = tmp_path / "tokens.bin"
    (np.arange(1000) % 50).astype(dtype).tofile(path)
    data = TokenFile(path, token_dtype=dtype, vocab_size=50, seq_len=16, batch_size=2, seed=0)
    batch = data.batch(3)
    assert batch.inputs.shape == (2, 16) and batch.counted == 32
    assert torch.equal(batch.targets, (batch.inputs + 1) % 50)
    with pytest.raises(ValueError, match="vocab_size"):
        TokenFile(path, token_dtype=dtype, vocab_size=40, seq_len=16, batch_size=8, seed=0).batch(0)
    with pytest.raises(ValueError, match="seq_len"):
        TokenFile(path, token_dtype=dtype, vocab_size=50, seq_len=1000, batch_size=1, seed=0)


def test_config_checks_name_the_key():
    with pytest.raises(ConfigError, match="token_file"):
        load_config(TrainConfig, None, ["data=tokens"])
    with pytest.raises(ConfigError, match="n_kv_heads"):
        load_config(TrainConfig, None, ["n_kv_heads=3"])
    with pytest.raises(ConfigError, match="precision"):
        load_config(TrainConfig, None, ["precision=fp8"])


def test_cli_refuses_bad_train_arguments_before_a_rank_starts(capsys):
    assert cli_main(["train", "--config", "configs/train_tiny.yaml", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err
    assert cli_main(["train", "--config", "configs/train_tiny.yaml", "--world-size", "3"]) == 2
    assert "does not split" in capsys.readouterr().err
    assert cli_main(["train", "--config", "configs/train_tiny.yaml", "--set", "fail_rank=2"]) == 2
    assert "fail_rank 2 is not a rank of this job" in capsys.readouterr().err
    assert cli_main(["train", "--config", "configs/train_tiny.yaml", "--max-restarts", "-1"]) == 2
    assert "--max-restarts must not be negative" in capsys.readouterr().err


def test_latest_checkpoint_skips_half_written_ones(tmp_path):
    for name, complete in (("step_00000003", True), ("step_00000007", False), (".tmp-step_00000009", True)):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / MARKER).write_text("{}")
    assert latest_checkpoint(tmp_path) == (3, tmp_path / "step_00000003")
    assert latest_checkpoint(tmp_path / "none") is None


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    """One process: a full run, then a copy of its folder whose newest checkpoint lost its marker
    (as if the crash hit while it was written) resumes from the one before."""
    ctx = RankContext(0, 1, 0, torch.device("cpu"))
    full = tmp_path / "full"
    result = run_train(load_config(TrainConfig, None, [*SMALL, f"out={full}"]), ctx)
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == \
        ["step_00000003", "step_00000007", "step_00000011"]
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_00000011")
    (cut / "checkpoints" / "step_00000007" / MARKER).unlink()
    resumed = run_train(load_config(TrainConfig, None, [*SMALL, f"out={cut}", "resume=true"]), ctx)
    assert resumed["resumed_at"] == 4
    assert losses(cut) == losses(full)
    assert resumed["final"]["loss"] == result["final"]["loss"]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    """The small run on 2 local processes through the CLI, without a fault."""
    out = tmp_path_factory.mktemp("clean")
    assert cli_main(["train", "--out", str(out), "--plot", *[a for s in SMALL for a in ("--set", s)]]) == 0
    return out


def test_a_fresh_run_refuses_a_folder_with_another_runs_checkpoints(clean_run, capsys):
    """Its pruning would delete the new checkpoints, and a restart would resume the old run."""
    assert cli_main(["train", "--out", str(clean_run), *[a for s in SMALL for a in ("--set", s)]]) == 2
    assert "holds checkpoints of an earlier run: pass --resume" in capsys.readouterr().err


def test_local_run_logs_every_step_and_learns(clean_run):
    logged = losses(clean_run)
    assert [step for step, _ in logged] == list(range(12))
    assert logged[-1][1] < 0.8 * logged[0][1]
    result = json.loads((clean_run / "result.json").read_text())
    assert result["world_size"] == 2 and result["resumed_at"] == 0
    assert result["plot"] == str(clean_run / "loss.png") and (clean_run / "loss.png").stat().st_size > 0
    text, code = train_summary(result)
    assert code == 0 and text.startswith(f"step 11: loss {logged[-1][1]:.4f}") and f"wrote {result['plot']}" in text


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("launcher", ["ray", "torchrun"])
def test_a_killed_rank_restarts_from_the_checkpoint_and_ends_like_a_clean_run(clean_run, tmp_path, launcher,
                                                                              request, capsys):
    """Rank 1 kills itself with SIGKILL at step 9; the job restarts from the checkpoint after step 7."""
    if launcher == "ray":
        request.getfixturevalue("ray_cluster")
    args = ["train", "--launcher", launcher, "--out", str(tmp_path), "--max-restarts", "1",
            *[a for s in [*SMALL, "fail_rank=1", "fail_step=9"] for a in ("--set", s)]]
    assert cli_main(args) == 0
    assert (tmp_path / "fault_drill_rank1_step9").exists()
    assert json.loads((tmp_path / "result.json").read_text())["resumed_at"] == 8
    assert losses(tmp_path) == losses(clean_run)
    err = capsys.readouterr().err
    assert "rank 1 was killed by SIGKILL" in err and "restarting from the last checkpoint (restart 1 of 1)" in err


def test_torchrun_started_directly_restarts_the_ranks_which_resume(clean_run, tmp_path):
    """torchrun's own --max-restarts: the restarted ranks see TORCHELASTIC_RESTART_COUNT and resume."""
    sets = [a for s in [*SMALL, "fail_rank=1", "fail_step=9"] for a in ("--set", s)]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "--max-restarts=1", "-m", "fa3dist.launch.torchrun", "train", *sets,
                          "--run-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "fault_drill_rank1_step9").exists()
    assert json.loads((tmp_path / "result.json").read_text())["resumed_at"] == 8
    assert losses(tmp_path) == losses(clean_run)


def recall_accuracy(rank: int, world_size: int) -> dict[str, float]:
    """Train on the recall task with the ring and with attention inside each shard only, then
    measure how often this rank answers the queries of 128 unseen sequences."""
    torch.set_num_threads(1)
    accuracy = {}
    for shard_only in (False, True):
        cfg = load_config(TrainConfig, None, [*SMALL[:-1], "out=unused", "precision=float32", "batch_size=16",
                                              "steps=120", f"shard_only={str(shard_only).lower()}"])
        trainer = Trainer(cfg, rank, world_size, torch.device("cpu"))
        for step in range(cfg.steps):
            trainer.train_step(step)
        unseen = RecallTask(vocab_size=cfg.vocab_size, seq_len=cfg.seq_len, batch_size=128, n_pairs=cfg.n_pairs,
                            n_queries=cfg.n_queries, seed=cfg.seed + 1).batch(0)
        with torch.no_grad():
            logits = trainer.model(trainer.shard(unseen.inputs), trainer.positions)
        targets = trainer.shard(unseen.targets)
        asked = targets != IGNORE
        correct = logits.argmax(-1)[asked] == targets[asked]
        accuracy["shard_only" if shard_only else "ring"] = correct.float().mean().item()
    return accuracy


def test_the_recall_task_needs_the_ring():
    """Rank 1's queries ask for pairs that all lie on rank 0 (zigzag: rank 1 holds the middle half)."""
    rank1 = run_ranks(recall_accuracy, 2)[1]
    assert rank1["ring"] >= 0.9, rank1
    assert rank1["shard_only"] <= 0.3, rank1  # guessing among the 8 values: 1/8
