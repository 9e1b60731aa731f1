"""FlashAttention-3-style attention backward in Triton.

Algorithm (FA2/FA3 backward, key-block-major):

1. A preprocess kernel computes, per query row, ``delta = rowsum(dO * out)`` from the ``out`` it is
   given and ``lse2 = lse * log2(e)`` (``+inf`` where ``lse`` is ``-inf`` or the row is padding, so
   that P = 0 there). Both go to fp32 buffers padded to a multiple of 128 rows, so the main loops
   read them without masks. Because P and delta come from the caller's ``out``/``lse``, the
   gradients are exact for an ``out``/``lse`` merged outside this call (ring attention): each
   call may see only a subset of the keys.
2. The dK/dV kernel: one program owns a (batch, kv head, BLOCK_N keys) tile. It keeps K and V and
   fp32 dK, dV accumulators on chip, and loops over the G = H / H_kv query heads of its group and
   over BLOCK_M query blocks, recomputing in the transposed (key, query) orientation
   ``P^T = exp2(K Q^T * scale * log2(e) - lse2)``, ``dP^T = V dO^T``,
   ``dS^T = P^T * (dP^T - delta)``, ``dV += P^T dO``, ``dK += dS^T Q``.
   With ``causal`` (Sq == Sk) the key block n visits only query blocks m >= n: first the diagonal
   band with the causal mask, then the unmasked remainder. Without it, each program starts at the
   query block in its own relative position and wraps around (the dQ kernel likewise over keys),
   so the programs in flight do not all read one block at once.
3. dQ = scale * dS K, one of three ways (config key ``"dq"``):
   - ``"tma_reduce"``: the dK/dV kernel adds each ``dS K`` tile to an fp32 buffer with a TMA
     bulk reduction (FA3's way); GPU only (the interpreter has no descriptor reductions).
   - ``"atomic"``: the same with ``tl.atomic_add`` (relaxed fp32 atomics).
   - ``"separate"``: a query-block-major kernel recomputes P and dS and accumulates dQ in
     registers; no atomics, deterministic, but two more matrix products per tile.
   The fp32 buffer of the first two is scaled and cast to q's dtype at the end.

Tiles move through 4-D tensor descriptors (TMA on Hopper) over (B, H, S, D) strides of the
(B, S, H, D) tensors, with the head dim padded to a power of two; out-of-bounds rows and columns
read as zero and are dropped on store, so only the masks that change results remain (causal, and
the last partial key block where a dQ is formed). P and dS are cast to the input dtype before their
products; accumulators stay fp32. Block sizes and the dQ strategy are tuned per problem class by
``pick_config`` over ``BWD_CONFIGS[padded head dim]``, whose first, conservative entry (no atomics)
every other candidate must agree with.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton import knobs

from .autotune import Config, pick_config
from . import tma
from .checks import check_bwd_inputs, check_qkv, check_scale

log = logging.getLogger("fa3dist.kernels")

LOG2E = math.log2(math.e)
DQ_MODES = ("tma_reduce", "atomic", "separate")
BWD_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ROW_PAD = 128  # lse2/delta rows are padded to this; no config block may exceed it
_PRE_BLOCK = 32  # rows per preprocess program
_INTERPRETED = knobs.runtime.interpret  # decided when the kernels below are decorated


def _config(block_n: int, block_m: int, num_warps: int, num_stages: int, dq: str) -> Config:
    return {"BLOCK_N": block_n, "BLOCK_M": block_m, "num_warps": num_warps, "num_stages": num_stages, "dq": dq}


# BLOCK_N: rows a program owns (keys in the dK/dV kernel, queries in the separate dQ kernel);
# BLOCK_M: rows per inner step (queries, resp. keys). BLOCK_N must be a multiple of BLOCK_M.
# Tiles (BLOCK_N, BLOCK_M, num_warps, num_stages) per padded head dim and dQ mode, picked by
# cross-compiling for sm_90a (triton 3.6, ptxas -v, bf16, causal or not): all fit in shared memory
# (<= 198 KB); most do not spill, none spills more than 124 bytes. num_stages=1 is left out: its TMA
# loads go through registers (+50-85 registers a thread).
_SAFE_TILE = (64, 32, 8, 2)  # no spills for any head dim, causal or not
# Pruned by timing every earlier candidate on an H100 at S = 16K, bf16 (tools/sweep_configs.py,
# 2026-11-27): "separate" won at every head dim (0.61-0.84 of cuDNN), tma_reduce came within
# 5-15% with the same tiles, atomic never won.
_TILES: dict[int, dict[str, tuple[tuple[int, int, int, int], ...]]] = {
    64: {"separate": ((64, 64, 4, 2), (128, 64, 8, 3)), "tma_reduce": ((64, 64, 4, 2),)},
    128: {"separate": ((128, 64, 8, 2), (128, 32, 8, 2)), "tma_reduce": ((128, 32, 8, 2),),
          "atomic": ((64, 64, 8, 2),)},
    256: {"separate": ((64, 64, 8, 2), (64, 32, 8, 3)), "tma_reduce": ((64, 32, 8, 2),)},
}
# Tuning candidates per padded head dim (64 covers 8..64); the first, without atomics, is the
# reference every other candidate must agree with.
BWD_CONFIGS: dict[int, list[Config]] = {
    block_d: [_config(*_SAFE_TILE, "separate"),
              *(_config(*tile, dq) for dq, tiles in by_mode.items() for tile in tiles)]
    for block_d, by_mode in _TILES.items()
}
# Fixed config for the interpreter, CPU tensors and float32 (not tuned).
SMALL_CONFIG: Config = _config(32, 16, 4, 1, "atomic")


@triton.jit
def _bwd_preprocess(out_ptr, do_ptr, lse_ptr, delta_ptr, lse2_ptr,
                    stride_ob, stride_os, stride_oh, stride_db, stride_ds, stride_dh,
                    stride_lb, stride_lh, seq_q, seq_pad, heads,
                    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(dO * out) and lse2 = lse * log2(e) (+inf for -inf and padding rows)."""
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    offs_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m < seq_q
    mask = rows[:, None] & (offs_d[None, :] < HEAD_DIM)
    rows64 = offs_m.to(tl.int64)[:, None]
    o = tl.load(out_ptr + b * stride_ob + h * stride_oh + rows64 * stride_os + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(do_ptr + b * stride_db + h * stride_dh + rows64 * stride_ds + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + offs_m, mask=rows, other=float("-inf")).to(tl.float32)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # log2(e)
    row = bh.to(tl.int64) * seq_pad + offs_m
    tl.store(delta_ptr + row, delta)
    tl.store(lse2_ptr + row, lse2)


@triton.jit
def _recompute_p(s, lse2, q_idx, k_idx, seq_k, qk_scale2, CAUSAL_MASK: tl.constexpr, KEY_MASK: tl.constexpr):
    """P = exp2(S * scale * log2(e) - lse2) for one tile; the arguments broadcast to its orientation."""
    p = tl.math.exp2(s * qk_scale2 - lse2)
    if CAUSAL_MASK:
        p = tl.where(q_idx >= k_idx, p, 0.0)
    if KEY_MASK:
        p = tl.where(k_idx < seq_k, p, 0.0)
    return p


@triton.jit
def _dkdv_loop(dk, dv, k, v, offs_n, q_desc, do_desc, dq_desc, dq_ptr, lse2_ptr, delta_ptr,
               b, h, m_lo, m_hi, seq_q, seq_k, qk_scale2,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
               CAUSAL_MASK: tl.constexpr, KEY_MASK: tl.constexpr, DQ: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [m_lo, m_hi) of head h (and add dQ)."""
    offs_d = tl.arange(0, BLOCK_D)
    for start_m in range(m_lo, m_hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = q_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
        do = do_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
        lse2 = tl.load(lse2_ptr + offs_m)
        delta = tl.load(delta_ptr + offs_m)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        p_t = _recompute_p(s_t, lse2[None, :], offs_m[None, :], offs_n[:, None], seq_k, qk_scale2,
                           CAUSAL_MASK, KEY_MASK)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds_t, q, dk, input_precision=PRECISION)
        if DQ != "separate":  # add this tile's dS K to the fp32 dQ buffer
            dq = tl.dot(tl.trans(ds_t), k, input_precision=PRECISION)
            if DQ == "tma_reduce":
                dq_desc.atomic_add([b, h, start_m, 0], dq.reshape(1, 1, BLOCK_M, BLOCK_D))
            else:
                ptrs = dq_ptr + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
                mask = (offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM)
                tl.atomic_add(ptrs, dq, mask=mask, sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, dq_desc, dq_ptr, lse2_ptr, delta_ptr,
                     seq_q, seq_k, seq_pad, heads, kv_heads, group, softmax_scale, qk_scale2,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     CAUSAL: tl.constexpr, KEY_MASK: tl.constexpr, DQ: tl.constexpr, PRECISION: tl.constexpr):
    """dK, dV of one (batch, kv head, key block), summed over the group's query heads."""
    start_n = tl.program_id(0) * BLOCK_N
    b = tl.program_id(1) // kv_heads
    hk = tl.program_id(1) % kv_heads
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = k_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
    v = v_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Without the mask, the programs that run together would all read the same query block at the
    # same time; each starts at the query block in its own relative position instead, as it does
    # when causal (with the same in the dQ kernel: the non-causal backward 7% faster at S = 16K,
    # H100, tools/kernel_times.py).
    m_start = (start_n.to(tl.int64) * seq_q // seq_k).to(tl.int32) // BLOCK_M * BLOCK_M
    for g in range(group):
        h = hk * group + g
        bh = (b * heads + h).to(tl.int64)
        lse2_row = lse2_ptr + bh * seq_pad
        delta_row = delta_ptr + bh * seq_pad
        dq_row = dq_ptr + bh * seq_q * HEAD_DIM if DQ == "atomic" else dq_ptr
        if CAUSAL:  # diagonal band with the mask, then every later query block without it
            band_hi = tl.minimum(start_n + BLOCK_N, seq_q)
            dk, dv = _dkdv_loop(dk, dv, k, v, offs_n, q_desc, do_desc, dq_desc, dq_row, lse2_row, delta_row,
                                b, h, start_n, band_hi, seq_q, seq_k, qk_scale2,
                                HEAD_DIM, BLOCK_M, BLOCK_D, True, False, DQ, PRECISION)
            dk, dv = _dkdv_loop(dk, dv, k, v, offs_n, q_desc, do_desc, dq_desc, dq_row, lse2_row, delta_row,
                                b, h, start_n + BLOCK_N, seq_q, seq_q, seq_k, qk_scale2,
                                HEAD_DIM, BLOCK_M, BLOCK_D, False, False, DQ, PRECISION)
        else:  # all query blocks, starting at this key block's own position and wrapping around
            dk, dv = _dkdv_loop(dk, dv, k, v, offs_n, q_desc, do_desc, dq_desc, dq_row, lse2_row, delta_row,
                                b, h, m_start, seq_q, seq_q, seq_k, qk_scale2,
                                HEAD_DIM, BLOCK_M, BLOCK_D, False, KEY_MASK, DQ, PRECISION)
            dk, dv = _dkdv_loop(dk, dv, k, v, offs_n, q_desc, do_desc, dq_desc, dq_row, lse2_row, delta_row,
                                b, h, 0, m_start, seq_q, seq_k, qk_scale2,
                                HEAD_DIM, BLOCK_M, BLOCK_D, False, KEY_MASK, DQ, PRECISION)
    dk_desc.store([b, hk, start_n, 0], (dk * softmax_scale).to(dk_desc.dtype).reshape(1, 1, BLOCK_N, BLOCK_D))
    dv_desc.store([b, hk, start_n, 0], dv.to(dv_desc.dtype).reshape(1, 1, BLOCK_N, BLOCK_D))


@triton.jit
def _dq_loop(dq, q, do, lse2, delta, offs_m, k_desc, v_desc, b, hk, n_lo, n_hi, seq_k, qk_scale2,
             BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL_MASK: tl.constexpr, KEY_MASK: tl.constexpr,
             PRECISION: tl.constexpr):
    """Accumulate dQ (unscaled) of one query block over key blocks [n_lo, n_hi)."""
    for start_n in range(n_lo, n_hi, BLOCK_K):
        offs_n = start_n + tl.arange(0, BLOCK_K)
        k = k_desc.load([b, hk, start_n, 0]).reshape(BLOCK_K, BLOCK_D)
        v = v_desc.load([b, hk, start_n, 0]).reshape(BLOCK_K, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = _recompute_p(s, lse2[:, None], offs_m[:, None], offs_n[None, :], seq_k, qk_scale2,
                         CAUSAL_MASK, KEY_MASK)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        dq = tl.dot(ds, k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(q_desc, k_desc, v_desc, do_desc, dq_desc, lse2_ptr, delta_ptr,
                   seq_q, seq_k, seq_pad, heads, group, softmax_scale, qk_scale2,
                   BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                   CAUSAL: tl.constexpr, KEY_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """dQ of one (batch, head, query block), recomputing P and dS over its keys."""
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks do the most work: start them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    start_m = pid_m * BLOCK_Q
    b = tl.program_id(1) // heads
    h = tl.program_id(1) % heads
    hk = h // group
    offs_m = start_m + tl.arange(0, BLOCK_Q)
    q = q_desc.load([b, h, start_m, 0]).reshape(BLOCK_Q, BLOCK_D)
    do = do_desc.load([b, h, start_m, 0]).reshape(BLOCK_Q, BLOCK_D)
    row = tl.program_id(1).to(tl.int64) * seq_pad
    lse2 = tl.load(lse2_ptr + row + offs_m)
    delta = tl.load(delta_ptr + row + offs_m)
    dq = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    if CAUSAL:  # unmasked keys before the diagonal, then the diagonal band with the mask
        dq = _dq_loop(dq, q, do, lse2, delta, offs_m, k_desc, v_desc, b, hk, 0, start_m, seq_k, qk_scale2,
                      BLOCK_K, BLOCK_D, False, False, PRECISION)
        dq = _dq_loop(dq, q, do, lse2, delta, offs_m, k_desc, v_desc, b, hk, start_m,
                      tl.minimum(start_m + BLOCK_Q, seq_k), seq_k, qk_scale2, BLOCK_K, BLOCK_D, True, False, PRECISION)
    else:  # full key blocks from this query block's relative position on, wrapping; then the partial last one
        n_full = (seq_k // BLOCK_K) * BLOCK_K
        n_start = (start_m.to(tl.int64) * seq_k // seq_q).to(tl.int32) // BLOCK_K * BLOCK_K
        n_start = tl.minimum(n_start, n_full)
        dq = _dq_loop(dq, q, do, lse2, delta, offs_m, k_desc, v_desc, b, hk, n_start, n_full, seq_k, qk_scale2,
                      BLOCK_K, BLOCK_D, False, False, PRECISION)
        dq = _dq_loop(dq, q, do, lse2, delta, offs_m, k_desc, v_desc, b, hk, 0, n_start, seq_k, qk_scale2,
                      BLOCK_K, BLOCK_D, False, False, PRECISION)
        if KEY_MASK:
            dq = _dq_loop(dq, q, do, lse2, delta, offs_m, k_desc, v_desc, b, hk, n_full, seq_k, seq_k, qk_scale2,
                          BLOCK_K, BLOCK_D, False, True, PRECISION)
    dq_desc.store([b, h, start_m, 0], (dq * softmax_scale).to(dq_desc.dtype).reshape(1, 1, BLOCK_Q, BLOCK_D))


@dataclass(frozen=True)
class _Problem:
    """Checked backward inputs plus the preprocessed lse2/delta rows."""

    do: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    lse2: torch.Tensor  # (B, H, seq_pad) fp32
    delta: torch.Tensor  # (B, H, seq_pad) fp32
    softmax_scale: float
    causal: bool

    @property
    def block_d(self) -> int:
        return tma.block_d(self.q.shape[3])


def _prepare(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, softmax_scale: float, causal: bool) -> _Problem:
    """Check the inputs and run the preprocess kernel (delta, lse2)."""
    check_qkv(q, k, v, causal=causal, dtypes=BWD_DTYPES, max_head_dim=256, head_dim_multiple=8)
    check_bwd_inputs(do, q, out, lse)
    scale = check_scale(softmax_scale)
    if do.dtype != q.dtype:
        raise TypeError(f"do must have q's dtype {q.dtype}, got {do.dtype}")
    if lse.device != q.device:
        raise ValueError(f"lse is on {lse.device}; expected q's device {q.device}")
    if q.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(f"the Triton backward needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")
    q, k, v, do = (tma.tma_ready(t) for t in (q, k, v, do))
    if out.stride(3) != 1:
        out = out.contiguous()
    if lse.stride(2) != 1:
        lse = lse.contiguous()
    batch, seq_q, heads, head_dim = q.shape
    seq_pad = triton.cdiv(seq_q, _ROW_PAD) * _ROW_PAD
    delta = torch.empty(batch, heads, seq_pad, device=q.device, dtype=torch.float32)
    lse2 = torch.empty_like(delta)
    block_d = tma.block_d(head_dim)
    if delta.numel() == 0:
        return _Problem(do, q, k, v, lse2, delta, scale, causal)
    _bwd_preprocess[(seq_pad // _PRE_BLOCK, batch * heads)](
        out, do, lse, delta, lse2, out.stride(0), out.stride(1), out.stride(2),
        do.stride(0), do.stride(1), do.stride(2), lse.stride(0), lse.stride(1), seq_q, seq_pad, heads,
        HEAD_DIM=head_dim, BLOCK=_PRE_BLOCK, BLOCK_D=block_d, num_warps=4)
    return _Problem(do, q, k, v, lse2, delta, scale, causal)


def _check_config(cfg: Config) -> None:
    block_n, block_m = cfg["BLOCK_N"], cfg["BLOCK_M"]
    for name, size in (("BLOCK_N", block_n), ("BLOCK_M", block_m)):
        if size < 16 or size > _ROW_PAD or size & (size - 1):
            raise ValueError(f"{name} must be a power of two in [16, {_ROW_PAD}], got {size}")
    if block_n % block_m:
        raise ValueError(f"BLOCK_N ({block_n}) must be a multiple of BLOCK_M ({block_m})")
    if cfg["dq"] not in DQ_MODES:
        raise ValueError(f"dq must be one of {DQ_MODES}, got {cfg['dq']!r}")
    if cfg["dq"] == "tma_reduce" and _INTERPRETED:
        raise ValueError("dq='tma_reduce' needs a GPU: the Triton interpreter has no descriptor reductions")


def _launch(p: _Problem, cfg: Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the dK/dV kernel (and the dQ kernel or the dQ conversion) with one config."""
    _check_config(cfg)
    q, k, v, do = p.q, p.k, p.v, p.do
    batch, seq_q, heads, head_dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    block_n, block_m, block_d, mode = cfg["BLOCK_N"], cfg["BLOCK_M"], p.block_d, cfg["dq"]
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    scales = (p.softmax_scale, p.softmax_scale * LOG2E)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    if q.numel() == 0 or k.numel() == 0:  # no query or no key: every gradient is zero
        return dq.zero_(), dk.zero_(), dv.zero_()
    # dQ accumulator for the atomic modes: (B, H, Sq, D) fp32 memory seen as (B, Sq, H, D); zeroed per launch.
    dq_acc = None
    if mode != "separate":
        dq_acc = torch.zeros(batch, heads, seq_q, head_dim, device=q.device, dtype=torch.float32).transpose(1, 2)
    key_mask = not p.causal and seq_k % block_n != 0 and mode != "separate"
    _bwd_dkdv_kernel[(triton.cdiv(seq_k, block_n), batch * kv_heads)](
        tma.descriptor(q, block_m, block_d), tma.descriptor(k, block_n, block_d), tma.descriptor(v, block_n, block_d),
        tma.descriptor(do, block_m, block_d), tma.descriptor(dk, block_n, block_d), tma.descriptor(dv, block_n, block_d),
        tma.descriptor(dq_acc, block_m, block_d) if mode == "tma_reduce" else None,
        dq_acc if mode == "atomic" else None, p.lse2, p.delta,
        seq_q, seq_k, p.lse2.shape[2], heads, kv_heads, heads // kv_heads, *scales,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        CAUSAL=p.causal, KEY_MASK=key_mask, DQ=mode, PRECISION=precision, **launch)
    if mode == "separate":
        _bwd_dq_kernel[(triton.cdiv(seq_q, block_n), batch * heads)](
            tma.descriptor(q, block_n, block_d), tma.descriptor(k, block_m, block_d), tma.descriptor(v, block_m, block_d),
            tma.descriptor(do, block_n, block_d), tma.descriptor(dq, block_n, block_d), p.lse2, p.delta,
            seq_q, seq_k, p.lse2.shape[2], heads, heads // kv_heads, *scales,
            BLOCK_Q=block_n, BLOCK_K=block_m, BLOCK_D=block_d,
            CAUSAL=p.causal, KEY_MASK=seq_k % block_m != 0, PRECISION=precision, **launch)
    else:
        dq.copy_(dq_acc.mul_(p.softmax_scale))
    return dq, dk, dv


def candidate_configs(head_dim: int) -> list[Config]:
    """The tuning candidates for ``head_dim``; the first is the conservative reference."""
    return BWD_CONFIGS[max(64, tma.block_d(head_dim))]


def _run(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
         lse: torch.Tensor, softmax_scale: float, causal: bool,
         config: Config | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check, preprocess, pick a config (tune when ``config`` is None on CUDA) and launch."""
    p = _prepare(do, q, k, v, out, lse, softmax_scale, causal)
    if config is None:
        if _INTERPRETED or p.q.device.type != "cuda" or p.q.dtype == torch.float32:
            config = SMALL_CONFIG
        else:
            seq = max(p.q.shape[1], p.k.shape[1])
            key = ("flash_bwd", p.block_d, p.causal, p.q.dtype, p.q.shape[2] // p.k.shape[2],
                   min(triton.next_power_of_2(seq), 16384))
            config = pick_config(key, candidate_configs(p.q.shape[3]), lambda c: _launch(p, c))
    return _launch(p, config)


def flash_bwd_config(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor, *, softmax_scale: float, causal: bool,
                     config: Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``flash_bwd`` with an explicit config (no tuning), for tests and config sweeps."""
    return _run(do, q, k, v, out, lse, softmax_scale, causal, config)


def flash_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, *, softmax_scale: float,
              causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention backward for a given out/lse: dq (like q), dk, dv (like k, v), all contiguous.

    q, do, out: (B, Sq, H, D); k, v: (B, Sk, H_kv, D); lse: fp32 (B, H, Sq), natural log. ``out``
    and ``lse`` may come from a larger attention (the ring's merged result): P and delta use them
    as given. On CUDA (fp16/bf16) the config is tuned and verified once per problem class.
    """
    return _run(do, q, k, v, out, lse, softmax_scale, causal, None)
