"""Kernel configs, tuning keys, and autotuning that checks each candidate's output before it may win.

Triton's own autotuner picks by speed alone; on Hopper some configs (for example warp-specialized
4-warp ones in triton 3.6) return NaN, and a speed-only tuner picks them. Here every candidate runs
once on the real inputs; a candidate whose outputs are not finite or disagree with the first
(conservative) candidate is dropped, and the fastest of the rest is kept for the key.

Choices are kept in memory and on disk, one JSON file per key under ``$FA3DIST_CACHE_DIR/autotune``
(default ``~/.cache/fa3dist``), so the ranks of a job and later runs reuse them. A key names the
kernel, a hash of its source, the GPU, the triton version and the shape bucket (``tuning_key``).
Files are written whole to a temporary name and renamed, so a concurrent reader never sees half a
file; an unreadable file is ignored with a warning and tuned again.

``FA3DIST_AUTOTUNE=0`` in the environment skips tuning and uses the first candidate (tests that
check correctness at many shapes use it to avoid compiling every candidate for every shape).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import triton

from . import common, tma
from .numerics import relative_error

log = logging.getLogger("fa3dist.kernels")

Config = dict[str, Any]  # launch options (num_warps, num_stages) and the kernel's constexprs
TuningKey = dict[str, Any]  # JSON-able: what a choice depends on
Timer = Callable[[Callable[[], object]], float]  # milliseconds per call of the function it is given
_CHOICES: dict[tuple, Config] = {}  # by the key's items: a lookup per kernel call must be cheap
_SHARED_SOURCES = (Path(common.__file__), Path(tma.__file__), Path(__file__).with_name("gluon_common.py"))


def make_config(block_m: int, block_n: int, num_warps: int, num_stages: int, **constexprs: Any) -> Config:
    """A kernel config. BLOCK_M counts query rows and BLOCK_N key rows in every kernel; the other
    constexprs (e.g. ``PERSISTENT``, ``dq``) are the kernel's own."""
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": num_stages, **constexprs}


def bucket(n: int) -> int:
    """Tuning bucket of a length: powers of two up to 16K; longer problems reuse the 16K choice
    (a tuning pass over every candidate at S = 256K would cost minutes)."""
    return min(1 << max(n - 1, 0).bit_length(), 16384)


@functools.cache
def source_hash(path: str) -> str:
    """A short hash of a kernel file's text and of the helpers the kernels share (common.py, tma.py,
    gluon_common.py): any edit to them invalidates the cached choices."""
    digest = hashlib.sha256()
    for source in (Path(path), *_SHARED_SOURCES):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def device_name(device: torch.device) -> str:
    """The GPU's name (e.g. "NVIDIA H200"), or the device type for non-CUDA devices."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def tuning_key(kind: str, source: str, q: torch.Tensor, k: torch.Tensor, *, causal: bool, **extra: Any) -> TuningKey:
    """What a tuned choice depends on: the kernel (``kind``, ``source`` hash), GPU, triton version,
    dtype, head dim, causal, bucketed Sq, Sk and batch x heads, the GQA group, and ``extra``
    (e.g. the output dtype and whether the call accumulates)."""
    batch, seq_q, heads, head_dim = q.shape
    return {"kind": kind, "source": source, "gpu": device_name(q.device), "triton": triton.__version__,
            "dtype": str(q.dtype).removeprefix("torch."), "head_dim": head_dim, "causal": causal,
            "seq_q": bucket(seq_q), "seq_k": bucket(k.shape[1]), "group": heads // k.shape[2],
            "batch_heads": min(bucket(batch * heads), 64), **extra}


def cache_dir() -> Path:
    """Where tuned choices are kept: ``$FA3DIST_CACHE_DIR/autotune``, by default under ~/.cache/fa3dist."""
    root = os.environ.get("FA3DIST_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fa3dist")
    return Path(root) / "autotune"


def _cache_file(name: str) -> Path:
    return cache_dir() / f"{hashlib.sha256(name.encode()).hexdigest()[:32]}.json"


def _load(name: str, key: TuningKey, configs: Sequence[Config]) -> Config | None:
    """The cached choice for ``key`` if its file exists, parses and names one of ``configs``."""
    path = _cache_file(name)
    try:
        entry = json.loads(path.read_text())
        stored_key, stored = entry["key"], entry["config"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("ignoring unreadable autotune cache file %s: %s", path, err)
        return None
    if stored_key != key:
        log.warning("ignoring autotune cache file %s: it holds another key", path)
        return None
    return next((cfg for cfg in configs if cfg == stored), None)


def _store(name: str, key: TuningKey, cfg: Config) -> None:
    """Write the choice for ``key`` atomically: a whole temporary file, then a rename over the old one."""
    path = _cache_file(name)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({"key": key, "config": cfg}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as err:
        log.warning("could not write the autotune cache file %s: %s", path, err)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _do_bench_ms(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=20)


def _report_failure(key: TuningKey, cfg: Config, err: Exception) -> None:
    """Warn about a candidate that raised; raise if it left the CUDA context unusable."""
    log.warning("autotune %s: candidate %s failed: %s: %s", key.get("kind"), cfg, type(err).__name__, err)
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    try:
        torch.cuda.synchronize()
    except Exception as sync_err:  # a sticky error (e.g. an illegal address): no later kernel can run
        raise RuntimeError(f"autotune {key}: candidate {cfg} broke the CUDA context ({err}); "
                           f"this process can no longer run kernels") from sync_err


def remembered(key: TuningKey) -> Config | None:
    """The choice this process already made for ``key``, if any: a call checks it before it builds its
    candidates (the lookup costs well under a microsecond, the candidates several)."""
    return _CHOICES.get(tuple(key.items()))


def pick_config(key: TuningKey, configs: Sequence[Config], launch: Callable[[Config], Sequence[torch.Tensor]], *,
                tolerance: float = 2e-2, timer: Timer | None = None, reference_only: bool = False) -> Config:
    """Return the fastest verified config for ``key``: from memory, else from the disk cache, else tune.

    ``launch(cfg)`` runs the kernel with ``cfg`` and returns its outputs (fresh tensors, not
    shared between calls). ``configs[0]`` is the reference candidate and must be a safe config;
    with ``reference_only`` it only checks the others and is never chosen itself (a forced path).
    ``timer(fn)`` measures ``fn`` in milliseconds (default: ``triton.testing.do_bench``).
    """
    memo = tuple(key.items())
    if memo in _CHOICES:
        return _CHOICES[memo]
    if os.environ.get("FA3DIST_AUTOTUNE", "1") == "0":
        return configs[1 if reference_only else 0]
    name = json.dumps(key, sort_keys=True)
    cached = _load(name, key, configs)
    if cached is not None:
        log.info("autotune %s: cached choice %s", key.get("kind"), cached)
        _CHOICES[memo] = cached
        return cached
    timer = timer or _do_bench_ms
    baseline = [t.clone() for t in launch(configs[0])]
    timings: list[tuple[float, int]] = []
    for index, cfg in enumerate(configs):
        if reference_only and index == 0:
            continue
        try:
            outs = launch(cfg)
            errors = [relative_error(o, b) for o, b in zip(outs, baseline)]
            if max(errors) > tolerance:
                log.warning("autotune %s: candidate %s rejected: relative errors %s", key.get("kind"), cfg, errors)
                continue
            timings.append((timer(lambda cfg=cfg: launch(cfg)), index))
        except Exception as err:  # reported, then skipped (or raised when the CUDA context is gone)
            _report_failure(key, cfg, err)
    if not timings:
        raise RuntimeError(f"no config passed verification for {key}")
    best = configs[min(timings)[1]]
    log.info("autotune %s: tuned %s -> %s (%.3f ms)", key.get("kind"), key, best, min(timings)[0])
    _CHOICES[memo] = best
    _store(name, key, best)
    return best
