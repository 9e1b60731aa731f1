"""The verified tuner and its on-disk cache, the FA3DIST_KERNEL override, and the bench's own-kernel
check, on CPU: fake launches and an injected timer stand in for kernels and triton's do_bench."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from fa3dist.bench.kernel import check_own_rows
from fa3dist.kernels import autotune, common
from fa3dist.kernels.autotune import bucket, make_config, pick_config, tuning_key
from fa3dist.kernels.triton_fwd import flash_fwd

# triton 3.6's interpreter turns a 1-element array into a loop bound this way; not our code.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

CONFIGS = [make_config(64, 32, 4, 2, PERSISTENT=False), make_config(128, 64, 8, 3, PERSISTENT=False),
           make_config(128, 128, 8, 3, PERSISTENT=False), make_config(64, 64, 4, 3, PERSISTENT=False)]
KEY = {"kind": "test_fwd", "source": "abc", "gpu": "NVIDIA H200", "triton": "3.6.0", "dtype": "bfloat16",
       "head_dim": 128, "causal": True, "seq_q": 4096, "seq_k": 4096, "group": 4, "batch_heads": 32}


class FakeKernel:
    """``launch`` returns a fixed output per config (NaN or wrong for the broken ones) and counts
    calls; ``timer`` runs the function once and returns that config's time."""

    def __init__(self, times_ms: list[float], broken: dict[int, str] | None = None) -> None:
        self.times = times_ms
        self.broken = broken or {}
        self.launches: list[int] = []

    def launch(self, cfg: dict) -> list[torch.Tensor]:
        index = CONFIGS.index(cfg)
        self.launches.append(index)
        fault = self.broken.get(index)
        if fault == "raise":
            raise RuntimeError("CUDA error: too many resources requested for launch")
        out = torch.linspace(0.0, 1.0, 16)
        return [out + 1.0 if fault == "wrong" else out * math.nan if fault == "nan" else out]

    def timer(self, fn) -> float:
        fn()
        return self.times[self.launches[-1]]


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache directory and in-memory table for every test; tuning switched on."""
    monkeypatch.setenv("FA3DIST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FA3DIST_AUTOTUNE", "1")
    monkeypatch.setattr(autotune, "_CHOICES", {})
    return tmp_path / "cache" / "autotune"


def _new_process(monkeypatch) -> None:
    """Forget the in-memory choices, as a new process (or another rank) would."""
    monkeypatch.setattr(autotune, "_CHOICES", {})


def test_picks_the_fastest_verified_candidate_and_skips_broken_ones(caplog):
    fake = FakeKernel([5.0, 1.0, 0.5, 3.0], broken={1: "raise", 2: "nan"})
    with caplog.at_level(logging.WARNING, logger="fa3dist.kernels"):
        assert pick_config(KEY, CONFIGS, fake.launch, timer=fake.timer) == CONFIGS[3]
    failed = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failed) == 1 and str(CONFIGS[1]) in failed[0] and "CUDA error" in failed[0]
    assert any("rejected" in r.getMessage() and str(CONFIGS[2]) in r.getMessage() for r in caplog.records)


def test_a_candidate_that_breaks_the_cuda_context_stops_tuning(monkeypatch, caplog):
    """After a sticky CUDA error (an illegal address) nothing can run: report it and raise."""
    def dead_context() -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", dead_context)
    fake = FakeKernel([5.0, 1.0, 2.0, 3.0], broken={2: "raise"})
    with caplog.at_level(logging.WARNING, logger="fa3dist.kernels"), \
            pytest.raises(RuntimeError, match="broke the CUDA context"):
        pick_config(KEY, CONFIGS, fake.launch, timer=fake.timer)
    assert any(str(CONFIGS[2]) in r.getMessage() for r in caplog.records)


def test_a_wrong_candidate_never_wins():
    fake = FakeKernel([5.0, 0.1, 4.0, 3.0], broken={1: "wrong"})
    assert pick_config(KEY, CONFIGS, fake.launch, timer=fake.timer) == CONFIGS[3]


def test_a_forced_path_checks_against_the_reference_without_choosing_it():
    """FA3DIST_KERNEL=gluon: the safe tl config (first) verifies the others and is never the answer,
    however fast it is; a forced candidate that disagrees with it still loses."""
    fake = FakeKernel([0.1, 3.0, 2.0, 1.0], broken={3: "wrong"})
    assert pick_config(KEY, CONFIGS, fake.launch, timer=fake.timer, reference_only=True) == CONFIGS[2]


def test_no_verified_candidate_raises():
    fake = FakeKernel([1.0] * 4, broken={i: "raise" for i in range(1, 4)})
    fake.broken[0] = "nan"
    with pytest.raises(RuntimeError, match="no config passed verification"):
        pick_config(KEY, CONFIGS, fake.launch, timer=fake.timer)


def test_choice_is_written_once_and_reused_by_a_new_process(fresh_cache, monkeypatch):
    fake = FakeKernel([5.0, 1.0, 2.0, 3.0])
    assert pick_config(KEY, CONFIGS, fake.launch, timer=fake.timer) == CONFIGS[1]
    files = list(fresh_cache.iterdir())
    assert len(files) == 1 and not files[0].name.startswith(".tmp")  # no temporary file left behind
    assert json.loads(files[0].read_text()) == {"key": KEY, "config": CONFIGS[1]}

    _new_process(monkeypatch)
    later = FakeKernel([0.1, 9.0, 9.0, 9.0])  # would pick CONFIGS[0] if it tuned again
    assert pick_config(KEY, CONFIGS, later.launch, timer=later.timer) is CONFIGS[1]
    assert later.launches == []


@pytest.mark.parametrize("field", ["source", "gpu", "triton", "seq_q", "group"])
def test_a_different_kernel_gpu_or_shape_tunes_again(field, monkeypatch):
    first = FakeKernel([5.0, 1.0, 2.0, 3.0])
    pick_config(KEY, CONFIGS, first.launch, timer=first.timer)
    _new_process(monkeypatch)
    other = {**KEY, field: "other" if isinstance(KEY[field], str) else KEY[field] * 2}
    fake = FakeKernel([5.0, 9.0, 0.5, 3.0])
    assert pick_config(other, CONFIGS, fake.launch, timer=fake.timer) == CONFIGS[2]
    assert fake.launches


@pytest.mark.parametrize("content", ["{not json", '{"key": 1}', "[]", '{"key": {}, "config": {}}'])
def test_an_unreadable_cache_file_is_ignored_with_a_warning(content, fresh_cache, monkeypatch, caplog):
    first = FakeKernel([5.0, 1.0, 2.0, 3.0])
    pick_config(KEY, CONFIGS, first.launch, timer=first.timer)
    (path,) = fresh_cache.iterdir()
    path.write_text(content)
    _new_process(monkeypatch)
    fake = FakeKernel([5.0, 9.0, 0.5, 3.0])
    with caplog.at_level(logging.WARNING, logger="fa3dist.kernels"):
        assert pick_config(KEY, CONFIGS, fake.launch, timer=fake.timer) == CONFIGS[2]
    assert any("ignoring" in r.getMessage() for r in caplog.records)
    assert json.loads(path.read_text())["config"] == CONFIGS[2]  # tuned again and rewritten


def test_a_cached_config_that_is_no_longer_a_candidate_is_tuned_again(monkeypatch):
    first = FakeKernel([5.0, 1.0, 2.0, 3.0])
    pick_config(KEY, CONFIGS, first.launch, timer=first.timer)
    _new_process(monkeypatch)
    fake = FakeKernel([5.0, 1.0, 2.0, 0.5])
    remaining = [CONFIGS[0], CONFIGS[2], CONFIGS[3]]
    assert pick_config(KEY, remaining, fake.launch, timer=fake.timer) == CONFIGS[3]


def test_unwritable_cache_dir_warns_and_still_tunes(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FA3DIST_CACHE_DIR", str(blocker))  # a file where the directory should be
    fake = FakeKernel([5.0, 1.0, 2.0, 3.0])
    with caplog.at_level(logging.WARNING, logger="fa3dist.kernels"):
        assert pick_config(KEY, CONFIGS, fake.launch, timer=fake.timer) == CONFIGS[1]
    assert any("could not write" in r.getMessage() for r in caplog.records)


def test_autotune_off_uses_the_first_candidate_and_writes_nothing(fresh_cache, monkeypatch):
    monkeypatch.setenv("FA3DIST_AUTOTUNE", "0")
    fake = FakeKernel([5.0, 1.0, 2.0, 3.0])
    assert pick_config(KEY, CONFIGS, fake.launch, timer=fake.timer) is CONFIGS[0]
    assert fake.launches == [] and not fresh_cache.exists()


def test_cache_dir_defaults_under_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("FA3DIST_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert autotune.cache_dir() == tmp_path / "fa3dist" / "autotune"


def test_tuning_key_names_everything_a_choice_depends_on():
    q = torch.zeros(2, 3000, 8, 64, dtype=torch.bfloat16)
    k = torch.zeros(2, 5000, 2, 64, dtype=torch.bfloat16)
    key = tuning_key("tl_fwd", "abc", q, k, causal=False, accumulate=True)
    assert key["kind"] == "tl_fwd" and key["source"] == "abc" and key["gpu"] == "cpu" and key["triton"]
    assert (key["dtype"], key["head_dim"], key["causal"], key["group"]) == ("bfloat16", 64, False, 4)
    assert (key["seq_q"], key["seq_k"], key["batch_heads"], key["accumulate"]) == (4096, 8192, 16, True)
    json.dumps(key)  # stored as it is
    assert bucket(1) == 1 and bucket(1000) == 1024 and bucket(300_000) == 16384


def test_source_hash_follows_the_kernel_file(tmp_path):
    path = tmp_path / "kernel.py"
    path.write_text("a")
    first = autotune.source_hash(str(path))
    path2 = tmp_path / "kernel2.py"
    path2.write_text("b")
    assert first != autotune.source_hash(str(path2)) and len(first) == 16


@pytest.mark.parametrize(("value", "path"), [(None, "auto"), ("", "auto"), ("gluon", "gluon"), ("tl", "tl"),
                                             (" TL ", "tl"), ("auto", "auto")])
def test_kernel_path(value, path, monkeypatch):
    if value is None:
        monkeypatch.delenv("FA3DIST_KERNEL", raising=False)
    else:
        monkeypatch.setenv("FA3DIST_KERNEL", value)
    assert common.kernel_path() == path


def test_unknown_kernel_path_raises(monkeypatch):
    monkeypatch.setenv("FA3DIST_KERNEL", "cuda")
    with pytest.raises(ValueError, match="FA3DIST_KERNEL must be one of auto, gluon, tl"):
        common.kernel_path()
    q = torch.zeros(1, 8, 2, 16, device="cpu" if common.INTERPRET else "cuda")
    with pytest.raises(ValueError, match="FA3DIST_KERNEL"):
        flash_fwd(q, q, q, softmax_scale=0.25, causal=False)


def test_calls_log_the_path_they_took(monkeypatch, caplog):
    """The tl kernel serves a request for Gluon (not wired yet) and says so in the debug log."""
    monkeypatch.setenv("FA3DIST_KERNEL", "gluon")
    q = torch.randn(1, 8, 2, 16, device="cpu" if common.INTERPRET else "cuda")
    with caplog.at_level(logging.DEBUG, logger="fa3dist.kernels"):
        flash_fwd(q, q, q, softmax_scale=0.25, causal=False)
    assert any(r.getMessage().startswith("flash_fwd path=tl (FA3DIST_KERNEL=gluon)") for r in caplog.records)
    assert "tl" in common.paths_taken()["flash_fwd"]


def _row(impl: str, **extra) -> dict:
    return {"impl": impl, "dtype": "bfloat16", "D": 128, "S": 1024, "causal": True, "pass": "fwd", **extra}


def test_bench_fails_when_our_kernel_fails_but_not_when_a_peer_does():
    check_own_rows([_row("fa3dist", ms=1.0), _row("flex", ms=None, error="compile failed")])
    with pytest.raises(RuntimeError, match="(?s)fa3dist failed or disagreed with cuDNN in 1 cell.*D=128 S=1024"):
        check_own_rows([_row("fa3dist", ms=None, error="fa3dist disagrees with cudnn"), _row("cudnn", ms=1.0)])
