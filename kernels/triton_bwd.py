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
4. Gradients into the caller's fp32 buffers (``dq=, dk=, dv=``, row-slice views allowed), with
   ``accumulate=True`` added to what they hold, inside the kernels: the dK/dV epilogue and the
   separate dQ kernel's epilogue load the tile, add and store it (each program owns its tile); the
   atomic dQ modes scale each tile and add it straight into the caller's buffer. This is the
   ring's backward: every step adds its block's gradients in fp32, never a rounded copy (dQ into
   the ring's accumulator, dK/dV into a scratch it adds to the travelling one). A call given only
   ``dq`` runs only the dQ kernel, one given only ``dk`` and ``dv`` only the dK/dV kernel.

Tiles move through 4-D tensor descriptors (TMA on Hopper) over (B, H, S, D) strides of the
(B, S, H, D) tensors, with the head dim padded to a power of two; out-of-bounds rows and columns
read as zero and are dropped on store, so only the masks that change results remain (causal, and
the last partial key block where a dQ is formed). P and dS are cast to the input dtype before their
products; accumulators stay fp32. Block sizes and the dQ strategy are tuned per problem class by
``pick_config`` over ``BWD_CONFIGS[padded head dim]``, whose first, conservative entry (no atomics)
every other candidate must agree with; choices are keyed by ``autotune.tuning_key`` and kept on disk.
On sm_90 at D = 64, 128 and 256 (fp16/bf16) the candidates also include the Gluon backward
(``gluon_bwd.py``, after the same preprocess), with dQ by TMA reduction or, for
``deterministic=True``, by the ``separate`` dQ kernel above; ``FA3DIST_KERNEL`` forces a path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import gluon_bwd, tma
from .autotune import Config, make_config, pick_config, remembered, source_hash, tuning_key
from .checks import check_bwd_inputs, check_qkv, check_scale
from .common import (INTERPRET, LOG2E, TL_LOG2E, check_device, dot_precision, kernel_path, note_path,
                     uses_small_config, warn_once)

DQ_MODES = ("tma_reduce", "atomic", "separate")
BWD_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ROW_PAD = 128  # lse2/delta rows are padded to this; no config block may exceed it
_PRE_BLOCK = 32  # rows per preprocess program

# BLOCK_N: rows a program owns (keys in the dK/dV kernel, queries in the separate dQ kernel);
# BLOCK_M: rows per inner step (queries, resp. keys). BLOCK_N must be a multiple of BLOCK_M.
# Tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim and dQ mode, picked by
# cross-compiling for sm_90a (triton 3.6, ptxas -v, bf16, causal or not): all fit in shared memory
# (<= 198 KB); most do not spill, none spills more than 124 bytes. num_stages=1 is left out: its TMA
# loads go through registers (+50-85 registers a thread).
_SAFE_TILE = (32, 64, 8, 2)  # no spills for any head dim, causal or not
# Pruned by timing every earlier candidate on an H100 at S = 16K, bf16 (tools/sweep_configs.py,
# 2026-11-27): "separate" won at every head dim (0.61-0.84 of cuDNN), tma_reduce came within
# 5-15% with the same tiles, atomic never won.
_TILES: dict[int, dict[str, tuple[tuple[int, int, int, int], ...]]] = {
    64: {"separate": ((64, 64, 4, 2), (64, 128, 8, 3)), "tma_reduce": ((64, 64, 4, 2),)},
    128: {"separate": ((64, 128, 8, 2), (32, 128, 8, 2)), "tma_reduce": ((32, 128, 8, 2),),
          "atomic": ((64, 64, 8, 2),)},
    256: {"separate": ((64, 64, 8, 2), (32, 64, 8, 3)), "tma_reduce": ((32, 64, 8, 2),)},
}
# Tuning candidates per padded head dim (64 covers 8..64); the first, without atomics, is the
# reference every other candidate must agree with.
BWD_CONFIGS: dict[int, list[Config]] = {
    block_d: [make_config(*_SAFE_TILE, dq="separate"),
              *(make_config(*tile, dq=dq) for dq, tiles in by_mode.items() for tile in tiles)]
    for block_d, by_mode in _TILES.items()
}
# Fixed config for the interpreter, CPU tensors and float32 (not tuned).
SMALL_CONFIG: Config = make_config(16, 32, 4, 1, dq="atomic")
SMALL_DETERMINISTIC: Config = {**SMALL_CONFIG, "dq": "separate"}  # the same without atomics


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
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * TL_LOG2E)
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
def _dkdv_loop(dk, dv, k, v, offs_n, q_desc, do_desc, dq_desc, dq_ptr, stride_dqs, lse2_ptr, delta_ptr,
               b, h, m_lo, m_hi, seq_q, seq_k, qk_scale2, dq_scale,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
               CAUSAL_MASK: tl.constexpr, KEY_MASK: tl.constexpr, DQ: tl.constexpr, DQ_DIRECT: tl.constexpr,
               PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [m_lo, m_hi) of head h, and add dQ
    (times ``dq_scale`` when DQ_DIRECT: straight into the caller's buffer)."""
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
            if DQ_DIRECT:
                dq = dq * dq_scale
            if DQ == "tma_reduce":
                dq_desc.atomic_add([b, h, start_m, 0], dq.reshape(1, 1, BLOCK_M, BLOCK_D))
            else:
                if DQ_DIRECT:  # the caller's buffer: int64 tile base, int32 offsets inside the tile
                    tile = tl.arange(0, BLOCK_M)[:, None] * stride_dqs + offs_d[None, :]
                    ptrs = dq_ptr + tl.cast(start_m, tl.int64) * stride_dqs + tile
                else:  # the (B, H, Sq, D) scratch: a runtime stride here costs spills on sm_90
                    ptrs = dq_ptr + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
                mask = (offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM)
                tl.atomic_add(ptrs, dq, mask=mask, sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, dq_desc, dq_ptr, lse2_ptr, delta_ptr,
                     seq_q, seq_k, seq_pad, heads, kv_heads, group, softmax_scale, qk_scale2,
                     stride_dqb, stride_dqs, stride_dqh,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     CAUSAL: tl.constexpr, KEY_MASK: tl.constexpr, DQ: tl.constexpr, PRECISION: tl.constexpr,
                     ACCUMULATE: tl.constexpr, DQ_DIRECT: tl.constexpr):
    """dK, dV of one (batch, kv head, key block), summed over the group's query heads; with
    ACCUMULATE added to the tiles dk_desc/dv_desc hold."""
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
        dq_row = dq_ptr  # the atomic mode's (batch, head) row
        if DQ == "atomic":
            if DQ_DIRECT:
                dq_row = dq_ptr + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
            else:
                dq_row = dq_ptr + bh * seq_q * HEAD_DIM
        if CAUSAL:  # diagonal band with the mask, then every later query block without it
            band_hi = tl.minimum(start_n + BLOCK_N, seq_q)
            dk, dv = _dkdv_loop(dk, dv, k, v, offs_n, q_desc, do_desc, dq_desc, dq_row, stride_dqs, lse2_row,
                                delta_row, b, h, start_n, band_hi, seq_q, seq_k, qk_scale2, softmax_scale,
                                HEAD_DIM, BLOCK_M, BLOCK_D, True, False, DQ, DQ_DIRECT, PRECISION)
            dk, dv = _dkdv_loop(dk, dv, k, v, offs_n, q_desc, do_desc, dq_desc, dq_row, stride_dqs, lse2_row,
                                delta_row, b, h, start_n + BLOCK_N, seq_q, seq_q, seq_k, qk_scale2, softmax_scale,
                                HEAD_DIM, BLOCK_M, BLOCK_D, False, False, DQ, DQ_DIRECT, PRECISION)
        else:  # all query blocks, starting at this key block's own position and wrapping around
            dk, dv = _dkdv_loop(dk, dv, k, v, offs_n, q_desc, do_desc, dq_desc, dq_row, stride_dqs, lse2_row,
                                delta_row, b, h, m_start, seq_q, seq_q, seq_k, qk_scale2, softmax_scale,
                                HEAD_DIM, BLOCK_M, BLOCK_D, False, KEY_MASK, DQ, DQ_DIRECT, PRECISION)
            dk, dv = _dkdv_loop(dk, dv, k, v, offs_n, q_desc, do_desc, dq_desc, dq_row, stride_dqs, lse2_row,
                                delta_row, b, h, 0, m_start, seq_q, seq_k, qk_scale2, softmax_scale,
                                HEAD_DIM, BLOCK_M, BLOCK_D, False, KEY_MASK, DQ, DQ_DIRECT, PRECISION)
    dk = dk * softmax_scale
    if ACCUMULATE:  # this program owns the tile: load, add, store
        dk += dk_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        dv += dv_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
    dk_desc.store([b, hk, start_n, 0], dk.to(dk_desc.dtype).reshape(1, 1, BLOCK_N, BLOCK_D))
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
                   CAUSAL: tl.constexpr, KEY_MASK: tl.constexpr, PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr):
    """dQ of one (batch, head, query block), recomputing P and dS over its keys; with ACCUMULATE
    added to the tile dq_desc holds."""
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
    dq = dq * softmax_scale
    if ACCUMULATE:  # this program owns the tile: load, add, store
        dq += dq_desc.load([b, h, start_m, 0]).reshape(BLOCK_Q, BLOCK_D)
    dq_desc.store([b, h, start_m, 0], dq.to(dq_desc.dtype).reshape(1, 1, BLOCK_Q, BLOCK_D))


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


Grads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]  # (dq, dk, dv)


def _check_inputs(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, softmax_scale: float, causal: bool) -> float:
    """Check the backward's inputs; return the softmax scale."""
    check_qkv(q, k, v, causal=causal, dtypes=BWD_DTYPES, max_head_dim=256, head_dim_multiple=8)
    check_bwd_inputs(do, q, out, lse)
    scale = check_scale(softmax_scale)
    if do.dtype != q.dtype:
        raise TypeError(f"do must have q's dtype {q.dtype}, got {do.dtype}")
    if lse.device != q.device:
        raise ValueError(f"lse is on {lse.device}; expected q's device {q.device}")
    check_device(q, "flash_bwd")
    return scale


def _check_grads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grads: Grads, accumulate: bool) -> Grads | None:
    """Check caller-given gradient buffers (dq, dk, dv): dq, dk with dv, or all three; float32,
    shaped like q, k, v on their device, TMA-addressable (views allowed). Returns them, or None
    when none is given."""
    if not isinstance(accumulate, bool):
        raise TypeError(f"accumulate must be a bool, got {type(accumulate).__name__}")
    dq, dk, dv = grads
    if dq is None and dk is None and dv is None:
        if accumulate:
            raise ValueError("accumulate=True needs gradient buffers to add into (dq, and/or dk with dv)")
        return None
    if (dk is None) != (dv is None):
        raise ValueError("dk and dv must be given together")
    for name, buf, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if buf is None:
            continue
        if not isinstance(buf, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(buf).__name__}")
        if buf.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {buf.dtype}")
        if buf.shape != like.shape or buf.device != like.device:
            raise ValueError(f"{name} must have shape {tuple(like.shape)} on {like.device}; "
                             f"got {tuple(buf.shape)} on {buf.device}")
        if not tma.tma_addressable(buf):
            raise ValueError(f"{name} must be addressable by TMA (unit last stride, 16-byte aligned base and "
                             f"strides), got strides {buf.stride()}")
    return grads


def _preprocess(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor, softmax_scale: float, causal: bool) -> _Problem:
    """Make the inputs TMA-ready and run the preprocess kernel (delta, lse2)."""
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
        return _Problem(do, q, k, v, lse2, delta, softmax_scale, causal)
    _bwd_preprocess[(seq_pad // _PRE_BLOCK, batch * heads)](
        out, do, lse, delta, lse2, out.stride(0), out.stride(1), out.stride(2),
        do.stride(0), do.stride(1), do.stride(2), lse.stride(0), lse.stride(1), seq_q, seq_pad, heads,
        HEAD_DIM=head_dim, BLOCK=_PRE_BLOCK, BLOCK_D=block_d, num_warps=4)
    return _Problem(do, q, k, v, lse2, delta, softmax_scale, causal)


def _check_config(cfg: Config) -> None:
    block_n, block_m = cfg["BLOCK_N"], cfg["BLOCK_M"]
    for name, size in (("BLOCK_N", block_n), ("BLOCK_M", block_m)):
        if size < 16 or size > _ROW_PAD or size & (size - 1):
            raise ValueError(f"{name} must be a power of two in [16, {_ROW_PAD}], got {size}")
    if block_n % block_m:
        raise ValueError(f"BLOCK_N ({block_n}) must be a multiple of BLOCK_M ({block_m})")
    if cfg["dq"] not in DQ_MODES:
        raise ValueError(f"dq must be one of {DQ_MODES}, got {cfg['dq']!r}")
    if cfg["dq"] == "tma_reduce" and INTERPRET:
        raise ValueError("dq='tma_reduce' needs a GPU: the Triton interpreter has no descriptor reductions")


def _launch(p: _Problem, cfg: Config, grads: Grads | None = None, accumulate: bool = False) -> Grads:
    """Run the dK/dV kernel (and the dQ kernel or the dQ conversion) with one config.

    Without ``grads`` all three gradients are new tensors in the inputs' dtype. With them (float32
    buffers; None for a gradient not wanted), the kernels compute only the gradients given and
    write them into the buffers, or with ``accumulate`` add them to what the buffers hold. A call
    for dQ alone or dK/dV alone runs the separate kernels' way whatever ``cfg["dq"]`` says.
    """
    q, k, v, do = p.q, p.k, p.v, p.do
    if grads is None:
        dq, dk, dv = (torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (q, k, v))
    else:
        dq, dk, dv = grads
    if q.numel() == 0 or k.numel() == 0:  # no query or no key: every gradient is zero
        if not accumulate:
            for t in (dq, dk, dv):
                if t is not None:
                    t.zero_()
        return dq, dk, dv
    if cfg.get("path") == "gluon":
        return _launch_gluon(p, cfg, (dq, dk, dv), grads is None, accumulate)
    _check_config(cfg)
    batch, seq_q, heads, head_dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    block_n, block_m, block_d = cfg["BLOCK_N"], cfg["BLOCK_M"], p.block_d
    precision = dot_precision(q.dtype)
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    scales = (p.softmax_scale, p.softmax_scale * LOG2E)
    want_dq, want_dkv = dq is not None, dk is not None
    mode = cfg["dq"] if want_dq and want_dkv else "separate"
    # fp32 target of the atomic dQ modes: the caller's buffer (each tile scaled before it is added),
    # else (B, H, Sq, D) scratch seen as (B, Sq, H, D), zeroed per launch, scaled and cast at the end.
    dq_acc = None
    if mode != "separate":
        if grads is None:
            dq_acc = torch.zeros(batch, heads, seq_q, head_dim, device=q.device, dtype=torch.float32).transpose(1, 2)
        else:
            dq_acc = dq if accumulate else dq.zero_()
    if want_dkv:
        dq_strides = (dq_acc.stride(0), dq_acc.stride(1), dq_acc.stride(2)) if mode == "atomic" else (0, 0, 0)
        _bwd_dkdv_kernel[(triton.cdiv(seq_k, block_n), batch * kv_heads)](
            tma.descriptor(q, block_m, block_d), tma.descriptor(k, block_n, block_d),
            tma.descriptor(v, block_n, block_d), tma.descriptor(do, block_m, block_d),
            tma.descriptor(dk, block_n, block_d), tma.descriptor(dv, block_n, block_d),
            tma.descriptor(dq_acc, block_m, block_d) if mode == "tma_reduce" else None,
            dq_acc if mode == "atomic" else None, p.lse2, p.delta,
            seq_q, seq_k, p.lse2.shape[2], heads, kv_heads, heads // kv_heads, *scales, *dq_strides,
            HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            CAUSAL=p.causal, KEY_MASK=not p.causal and seq_k % block_n != 0 and mode != "separate", DQ=mode,
            PRECISION=precision, ACCUMULATE=accumulate, DQ_DIRECT=grads is not None, **launch)
    if want_dq and mode == "separate":
        _bwd_dq_kernel[(triton.cdiv(seq_q, block_n), batch * heads)](
            tma.descriptor(q, block_n, block_d), tma.descriptor(k, block_m, block_d),
            tma.descriptor(v, block_m, block_d), tma.descriptor(do, block_n, block_d),
            tma.descriptor(dq, block_n, block_d), p.lse2, p.delta,
            seq_q, seq_k, p.lse2.shape[2], heads, heads // kv_heads, *scales,
            BLOCK_Q=block_n, BLOCK_K=block_m, BLOCK_D=block_d,
            CAUSAL=p.causal, KEY_MASK=seq_k % block_m != 0, PRECISION=precision, ACCUMULATE=accumulate, **launch)
    elif want_dq and grads is None:
        dq.copy_(dq_acc.mul_(p.softmax_scale))
    return dq, dk, dv


def _launch_gluon(p: _Problem, cfg: Config, grads: Grads, fresh: bool, accumulate: bool) -> Grads:
    """The Gluon backward (gluon_bwd.py) with one config into ``grads`` (``fresh``: new tensors in q's
    dtype, else the caller's fp32 buffers). dK/dV come from the Gluon kernel; dQ, when asked for, from
    its TMA reduction into fp32 (``cfg["dq"] == "tma_reduce"``) or from the ``tl`` dQ kernel
    (``"separate"``: deterministic, two more products per tile)."""
    dq, dk, dv = grads
    reduce_dq = dq is not None and cfg["dq"] == "tma_reduce"
    dq_acc = None
    if reduce_dq:
        if fresh:
            dq_acc = torch.zeros(p.q.shape, device=p.q.device, dtype=torch.float32)
        else:
            dq_acc = dq if accumulate else dq.zero_()
    gluon_bwd.gluon_bwd_launch(p.q, p.k, p.v, p.do, p.lse2, p.delta, p.softmax_scale, p.causal,
                               gluon_bwd.GluonBwdConfig.of_candidate(cfg), dq_acc, dk, dv, accumulate)
    if reduce_dq and fresh:
        dq.copy_(dq_acc)
    elif dq is not None and not reduce_dq:
        tile = _TILES[max(64, p.block_d)]["separate"][0]
        _launch(p, make_config(*tile, dq="separate"), (dq, None, None), accumulate)
    return dq, dk, dv


def candidate_configs(head_dim: int, dtype: torch.dtype) -> list[Config]:
    """The tuning candidates for ``head_dim`` (every 16-bit ``dtype`` alike); the first is the
    conservative reference. (Every kernel module has a ``candidate_configs(head_dim, dtype)``.)"""
    return BWD_CONFIGS[max(64, tma.block_d(head_dim))]


def _run(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
         lse: torch.Tensor, softmax_scale: float, causal: bool, config: Config | None, grads: Grads,
         accumulate: bool, deterministic: bool = False) -> Grads:
    """Check, preprocess, pick a config (tune when ``config`` is None on CUDA) and launch."""
    scale = _check_inputs(do, q, k, v, out, lse, softmax_scale, causal)
    buffers = _check_grads(q, k, v, grads, accumulate)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    p = _preprocess(do, q, k, v, out, lse, scale, causal)
    if config is None:
        config = _choose_config(p, buffers, accumulate, deterministic)
    note_path("flash_bwd", config.get("path", "tl"),
              "(FA3DIST_KERNEL=%s) q=%s k=%s %s causal=%s grads=%s accumulate=%s deterministic=%s config=%s",
              kernel_path(), tuple(p.q.shape), tuple(p.k.shape), p.q.dtype, causal, _wanted(buffers), accumulate,
              deterministic, config)
    return _launch(p, config, buffers, accumulate)


def _wanted(buffers: Grads | None) -> str:
    """Which gradients a call computes: "all" (new tensors or three buffers), "dq" or "dkdv"."""
    if buffers is None or all(b is not None for b in buffers):
        return "all"
    return "dq" if buffers[0] is not None else "dkdv"


def _gluon_configs(p: _Problem, buffers: Grads | None, path: str) -> list[Config]:
    """The Gluon backward's candidates for this call (both dQ ways), or none when it cannot take it
    (said once when the path is forced). A call for dQ alone never runs it."""
    reason = gluon_bwd.gluon_bwd_supported(p.q)
    if reason is None and _wanted(buffers) == "dq":
        reason = "dQ alone (the tl dQ kernel does that)"
    if reason is not None:
        if path == "gluon":
            warn_once(f"FA3DIST_KERNEL=gluon, but the Gluon backward cannot take this call ({reason}): using tl")
        return []
    return [c.candidate(dq) for dq in ("tma_reduce", "separate") for c in gluon_bwd.GLUON_BWD_CONFIGS[p.q.shape[3]]]


def _choose_config(p: _Problem, buffers: Grads | None, accumulate: bool, deterministic: bool) -> Config:
    if uses_small_config(p.q):
        return SMALL_DETERMINISTIC if deterministic else SMALL_CONFIG
    wanted = _wanted(buffers)
    path = kernel_path()
    key = tuning_key("flash_bwd", source_hash(__file__) + source_hash(gluon_bwd.__file__), p.q, p.k,
                     causal=p.causal, grad_dtype=None if buffers is None else "float32", grads=wanted,
                     accumulate=accumulate, deterministic=deterministic, path=path)
    chosen = remembered(key)
    if chosen is not None:
        return chosen
    candidates = candidate_configs(p.q.shape[3], p.q.dtype)
    gluon = [] if path == "tl" else _gluon_configs(p, buffers, path)
    if wanted != "all" or deterministic:  # dQ alone, dK/dV alone, or no atomics: the separate dQ way
        candidates = [cfg for cfg in candidates if cfg["dq"] == "separate"]
        gluon = [cfg for cfg in gluon if cfg["dq"] == "separate"]

    def trial(cfg: Config) -> list[torch.Tensor]:  # on copies: tuning must not add to the caller's buffers
        copies = None if buffers is None else tuple(None if b is None else b.clone() for b in buffers)
        return [g for g in _launch(p, cfg, copies, accumulate) if g is not None]

    if path == "gluon" and gluon:  # forced: the safe tl config checks the Gluon ones and is not chosen
        return pick_config(key, [candidates[0], *gluon], trial, reference_only=True)
    return pick_config(key, candidates + gluon, trial)


def flash_bwd_config(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor, *, softmax_scale: float, causal: bool, config: Config,
                     dq: torch.Tensor | None = None, dk: torch.Tensor | None = None, dv: torch.Tensor | None = None,
                     accumulate: bool = False) -> Grads:
    """``flash_bwd`` with an explicit config (no tuning), for tests and config sweeps."""
    return _run(do, q, k, v, out, lse, softmax_scale, causal, config, (dq, dk, dv), accumulate)


def flash_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, *, softmax_scale: float, causal: bool, dq: torch.Tensor | None = None,
              dk: torch.Tensor | None = None, dv: torch.Tensor | None = None, accumulate: bool = False,
              deterministic: bool = False) -> Grads:
    """Attention backward for a given out/lse: dq (like q), dk, dv (like k, v).

    q, do, out: (B, Sq, H, D); k, v: (B, Sk, H_kv, D); lse: fp32 (B, H, Sq), natural log. ``out``
    and ``lse`` may come from a larger attention (the ring's merged result): P and delta use them
    as given. On CUDA (fp16/bf16) the config is tuned and verified once per problem class; on sm_90
    at D = 64, 128 and 256 the candidates include the Gluon kernel (gluon_bwd.py).

    Without buffers all three gradients are new contiguous tensors in q's dtype. With buffers
    (float32, shaped like q, k, v; row-slice views of larger buffers allowed) only the gradients
    given are computed: ``dq``, or ``dk`` with ``dv``, or all three. The kernels write them into the
    buffers, or with ``accumulate=True`` add them to what the buffers hold, in fp32 inside the
    kernels. Returns (dq, dk, dv): the buffers, with None for a gradient not asked for.

    ``deterministic=True`` keeps to the kernels whose dQ needs no atomics or reductions in a
    run-dependent order, so two runs give identical bits (at the cost of two more products per tile).
    """
    return _run(do, q, k, v, out, lse, softmax_scale, causal, None, (dq, dk, dv), accumulate, deterministic)
