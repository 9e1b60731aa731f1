"""FlashAttention-3 backward for Hopper in Gluon (``triton.experimental.gluon``), for an external out/LSE.

One CTA owns one (batch, kv head, BLOCK_N keys) tile and walks the query blocks of every query head
of its GQA group; BLOCK_N is 128 up to D = 128 and 64 at D = 256 (the wide scheme below). Partitions
(``gl.warp_specialize``):

- a loader (1 warp) that TMA-loads the tile's K and V once, then Q and dO blocks of BLOCK_M rows
  through a ``STAGES``-deep shared-memory ring guarded by mbarriers (``q_ready`` completes with
  the TMA transaction count; ``q_empty`` needs both consumers);
- two consumer warpgroups (4 warps, 240 registers each). Consumer ``w`` owns keys
  [64 w, 64 w + 64) of the tile and their fp32 dK, dV accumulators. Per query block, in the
  transposed (key, query) orientation:
  ``S^T = K_w Q^T`` and ``dP^T = V_w dO^T`` (both issued at once, async wgmma),
  ``P^T = exp2(S^T * scale * log2 e - lse2)``, ``dV_w += P^T dO`` (P^T from registers),
  ``dS^T = P^T (dP^T - delta)``, ``dK_w += dS^T Q`` (dS^T from registers);
  then both write their dS^T rows to one shared tile, and each computes half the head dim of
  ``dQ = dS K`` from it (``ds_ready``/``ds_free`` hand the tile between them), scales it and
  passes it to the writer through shared memory (``dq_full``/``dq_empty``);
- a dQ writer (1 warp) that adds each dQ half to the fp32 dQ in global memory with a TMA bulk
  reduction (``cp.reduce.async.bulk.tensor ... .add``): no atomics in registers, and the consumers
  never wait for global memory.

The wide scheme (``GluonBwdConfig.wide``, ``_q_block_wide``): the consumers split the head dim
instead of the keys. At D = 256 it is the only one, since the fp32 dK and dV of 64 keys per consumer
would need 256 registers per thread. Both consumers accumulate all keys of the tile, consumer ``w``
head-dim columns [w D/2, (w + 1) D/2) of dK, dV and dQ. Each computes ``S = Q K_w^T`` and
``dP = dO V_w^T`` for its half of the keys (query-major), writes its rows of P^T and dS^T to two
shared [BLOCK_N, BLOCK_M] tiles, and once both halves are there reads the whole tiles for
``dV_w += P^T dO_w``, ``dK_w += dS^T Q_w`` and ``dQ_w = dS K_w``; no product is computed twice. At
D = 256 (64 keys) its shared memory (K, V, one Q/dO stage, P^T/dS^T and two [64, 128] fp32 dQ
tiles: 208 KiB) leaves no room for a second Q/dO stage. At D = 128 (128 keys) it is a tuning
candidate: 1-3% faster than the keys split on causal cells on an H200, 3-6% slower non-causal.

``lse2 = lse * log2 e`` (``+inf`` for empty and padding rows, so P = 0 there) and
``delta = rowsum(dO * out)`` come from the ``tl`` preprocess kernel (``triton_bwd``) over the
caller's out/LSE, so every block of a ring gets exact gradients. Keys past ``seq_k`` read as
zero rows: their P is garbage but their dK/dV rows are never stored and their K rows add zero to
dQ, so no key mask is needed; the causal mask (query >= key) applies to the query blocks that meet
the diagonal. Without the mask each CTA starts at the query block in its own relative position and
wraps, so the CTAs in flight do not all reduce into one dQ tile at once.

dK and dV are stored (or, with ``ACCUMULATE``, added to what the buffers hold) with plain pointer
stores: any strides, so the ring passes row-slice views of its fp32 accumulators. dQ goes into an
fp32 buffer: the caller's (the ring's accumulator) or a scratch the host converts.

Shapes: D in {64, 128, 256}, fp16/bf16, sm_90; everything else runs the ``tl`` kernels. Gluon does not
run in Triton's interpreter; tests/gpu checks this kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon.language import _core as gl_core
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .common import LOG2E
from .gluon_common import bhsd_descriptor, tile_2d, unsupported_reason, wgmma_layout

GLUON_BWD_HEAD_DIMS = (64, 128, 256)
GLUON_BWD_DTYPES = (torch.float16, torch.bfloat16)
KEY_ROWS = gl.constexpr(64)  # keys per consumer warpgroup at D <= 128
MAXNREG = 168  # 12 warps: 2 consumers x 128 threads x 240 + one warpgroup (loader, writer) x 24
CONSUMER_REGS = gl.constexpr(240)
SMALL_REGS = gl.constexpr(24)


@gl_core.builtin
def _tma_reduce_add(desc, coord, src, _semantic=None):
    """Add shared-memory tile ``src`` into ``desc`` at ``coord`` with a TMA bulk reduction.

    triton 3.6's Gluon has the op (``create_async_tma_reduce``) but no public wrapper on Hopper;
    ``tma.store_wait`` waits for it like for a TMA store.
    """
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, desc.handle, coord, src.handle)


# ---------------------------------------------------------------- the walk over query blocks

@gluon.jit
def _tile_ids(kv_heads, num_n_blocks, BLOCK_N: gl.constexpr):
    """(batch, kv head, first key row) of this CTA: key block 0 (the heaviest when causal) first."""
    n_block = gl.program_id(0)
    batch = gl.program_id(1) // kv_heads
    kv_head = gl.program_id(1) % kv_heads
    return batch, kv_head, n_block * BLOCK_N


@gluon.jit
def _m_ranges(n0, seq_q, seq_k, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """Two ranges of query blocks, [lo0, hi0) then [lo1, hi1). Causal: the blocks that meet the
    diagonal (masked) from the key block's own position on, then the rest. Otherwise: every block,
    from this key block's relative position to the end and then from 0."""
    num_m = gl.cdiv(seq_q, BLOCK_M)
    if CAUSAL:
        lo0 = n0 // BLOCK_M
        hi0 = gl.minimum(gl.cdiv(n0 + BLOCK_N, BLOCK_M), num_m)
        lo1 = hi0
        hi1 = num_m
    else:
        lo0 = ((n0.to(gl.int64) * seq_q) // seq_k).to(gl.int32) // BLOCK_M
        hi0 = num_m
        lo1 = 0
        hi1 = lo0
    return lo0, hi0, lo1, hi1


@gluon.jit
def _opaque_zero(x):
    """0, computed from ``x`` in a way the compiler cannot see through (so nothing built on it is hoisted)."""
    return gl.inline_asm_elementwise("and.b32 $0, $1, 0;", "=r,r", [x], dtype=gl.int32, is_pure=False, pack=1)


# ---------------------------------------------------------------- loader partition

@gluon.jit
def _load_q_block(descs, smems, q_ready, q_empty, batch, head, row, m, it):
    """TMA-load Q, dO, lse2 and delta of query block m into stage it % STAGES once both consumers freed it."""
    q_desc, do_desc, lse2_desc, delta_desc = descs
    q_smem, do_smem, lse2_smem, delta_smem = smems
    STAGES: gl.constexpr = q_smem.shape[0]
    BLOCK_M: gl.constexpr = q_smem.shape[3]
    stage = it % STAGES
    ready = q_ready.index(stage)
    mbarrier.wait(q_empty.index(stage), ((it // STAGES) & 1) ^ 1)
    mbarrier.expect(ready, 2 * q_desc.block_type.nbytes + 2 * lse2_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [batch, head, m * BLOCK_M, 0], ready, q_smem.index(stage))
    tma.async_copy_global_to_shared(do_desc, [batch, head, m * BLOCK_M, 0], ready, do_smem.index(stage))
    tma.async_copy_global_to_shared(lse2_desc, [row, m * BLOCK_M], ready, lse2_smem.index(stage))
    tma.async_copy_global_to_shared(delta_desc, [row, m * BLOCK_M], ready, delta_smem.index(stage))


@gluon.jit
def _loader(descs, k_desc, v_desc, smems, k_smem, v_smem, bars, seq_q, seq_k, heads, kv_heads, group, num_n_blocks,
            CAUSAL: gl.constexpr):
    """The TMA producer: K and V of the tile, then Q, dO, lse2 and delta of every query block of every head."""
    BLOCK_M: gl.constexpr = smems[0].shape[3]
    BLOCK_N: gl.constexpr = k_smem.shape[3]
    kv_ready, q_ready, q_empty, ds_ready, ds_free, dq_full, dq_empty = bars
    batch, kv_head, n0 = _tile_ids(kv_heads, num_n_blocks, BLOCK_N)
    mbarrier.expect(kv_ready, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [batch, kv_head, n0, 0], kv_ready, k_smem.index(0))
    tma.async_copy_global_to_shared(v_desc, [batch, kv_head, n0, 0], kv_ready, v_smem.index(0))
    lo0, hi0, lo1, hi1 = _m_ranges(n0, seq_q, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    it = 0
    for g in range(group):
        head = kv_head * group + g
        row = batch * heads + head
        for m in range(lo0, hi0):
            _load_q_block(descs, smems, q_ready, q_empty, batch, head, row, m, it)
            it += 1
        for m in range(lo1, hi1):
            _load_q_block(descs, smems, q_ready, q_empty, batch, head, row, m, it)
            it += 1


# ---------------------------------------------------------------- dQ writer partition

@gluon.jit
def _reduce_dq_block(dq_desc, dq_smem, dq_full, dq_empty, batch, head, m, it):
    """Add both consumers' halves of one dQ block to global memory, then free their buffers."""
    BLOCK_M: gl.constexpr = dq_smem.shape[3]
    HALF: gl.constexpr = dq_smem.shape[4]
    for w in gl.static_range(2):
        mbarrier.wait(dq_full.index(w), it & 1)
        _tma_reduce_add(dq_desc, [batch, head, m * BLOCK_M, w * HALF], dq_smem.index(w))
    tma.store_wait(0)
    for w in gl.static_range(2):
        mbarrier.arrive(dq_empty.index(w), count=1)


@gluon.jit
def _dq_writer(dq_desc, dq_smem, bars, seq_q, seq_k, kv_heads, group, num_n_blocks, BLOCK_N: gl.constexpr,
               CAUSAL: gl.constexpr, DQ: gl.constexpr):
    """The dQ consumer: TMA bulk reductions of each query block's dQ into the fp32 dQ buffer."""
    if DQ:
        BLOCK_M: gl.constexpr = dq_smem.shape[3]
        kv_ready, q_ready, q_empty, ds_ready, ds_free, dq_full, dq_empty = bars
        batch, kv_head, n0 = _tile_ids(kv_heads, num_n_blocks, BLOCK_N)
        lo0, hi0, lo1, hi1 = _m_ranges(n0, seq_q, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
        it = 0
        for g in range(group):
            head = kv_head * group + g
            for m in range(lo0, hi0):
                _reduce_dq_block(dq_desc, dq_smem, dq_full, dq_empty, batch, head, m, it)
                it += 1
            for m in range(lo1, hi1):
                _reduce_dq_block(dq_desc, dq_smem, dq_full, dq_empty, batch, head, m, it)
                it += 1


# ---------------------------------------------------------------- consumer partitions

@gluon.jit
def _q_block(dk, dv, k_smem, v_smem, smems, ds_smem, dq_smem, bars, key_rows, m, it, qk_scale2, softmax_scale,
             me: gl.constexpr, MASKED: gl.constexpr, DQ: gl.constexpr):
    """One query block of one head for consumer ``me``: dK_w, dV_w updated, its dQ half handed on."""
    kv_ready, q_ready, q_empty, ds_ready, ds_free, dq_full, dq_empty = bars
    q_smem, do_smem, lse2_smem, delta_smem = smems
    STAGES: gl.constexpr = q_smem.shape[0]
    BLOCK_M: gl.constexpr = q_smem.shape[3]
    HEAD_DIM: gl.constexpr = q_smem.shape[4]
    HALF: gl.constexpr = HEAD_DIM // 2
    dtype: gl.constexpr = q_smem.dtype
    st_layout: gl.constexpr = wgmma_layout(BLOCK_M)
    kv_layout: gl.constexpr = wgmma_layout(HEAD_DIM)
    dq_layout: gl.constexpr = wgmma_layout(HALF)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)
    col_layout: gl.constexpr = gl.SliceLayout(0, st_layout)
    # The loop-invariant tiles are indexed afresh every block: hoisted, their wgmma descriptors
    # (one per 16-wide k step) would hold dozens of registers and spill.
    zero = _opaque_zero(it)
    k_tile = tile_2d(k_smem.index(zero))
    k_w = k_tile.slice(me * KEY_ROWS, KEY_ROWS)
    v_w = tile_2d(v_smem.index(zero)).slice(me * KEY_ROWS, KEY_ROWS)
    k_half = k_tile.slice(me * HALF, HALF, dim=1)
    ds_tile = ds_smem.index(zero)
    stage = it % STAGES
    mbarrier.wait(q_ready.index(stage), (it // STAGES) & 1)
    lse2 = lse2_smem.index(stage).reshape([BLOCK_M]).load(col_layout)  # rows padded to 128 (+inf): no mask
    delta = delta_smem.index(stage).reshape([BLOCK_M]).load(col_layout)
    q = tile_2d(q_smem.index(stage))
    do = tile_2d(do_smem.index(stage))
    s_tok = warpgroup_mma(k_w, q.permute((1, 0)), gl.zeros([KEY_ROWS, BLOCK_M], gl.float32, st_layout),
                          use_acc=False, is_async=True)
    dp_tok = warpgroup_mma(v_w, do.permute((1, 0)), gl.zeros([KEY_ROWS, BLOCK_M], gl.float32, st_layout),
                           use_acc=False, is_async=True)
    s = warpgroup_mma_wait(1, deps=(s_tok,))
    p = gl.exp2(s * qk_scale2 - gl.expand_dims(lse2, 0))
    if MASKED:  # causal: query >= key
        cols = m * BLOCK_M + gl.arange(0, BLOCK_M, layout=col_layout)
        p = gl.where(gl.expand_dims(cols, 0) >= gl.expand_dims(key_rows, 1), p, 0.0)
    p16 = p.to(dtype)
    dv_tok = warpgroup_mma(gl.convert_layout(p16, a_layout), do, dv, is_async=True)
    dp = warpgroup_mma_wait(1, deps=(dp_tok,))
    ds16 = (p * (dp - gl.expand_dims(delta, 0))).to(dtype)
    # this consumer's dS^T rows into the shared dS^T tile: dK's A operand, and with the other half dQ's
    ds_rows = ds_tile.slice(me * KEY_ROWS, KEY_ROWS)
    if DQ:
        mbarrier.wait(ds_free, (it & 1) ^ 1)
    ds_rows.store(ds16)
    fence_async_shared()
    if DQ:
        mbarrier.arrive(ds_ready, count=1)
    dk_tok = warpgroup_mma(ds_rows, q, dk, is_async=True)
    if DQ:
        mbarrier.wait(ds_ready, it & 1)
        dq_tok = warpgroup_mma(ds_tile.permute((1, 0)), k_half, gl.zeros([BLOCK_M, HALF], gl.float32, dq_layout),
                               use_acc=False, is_async=True)
        dv, dk, dq = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok, dq_tok))
        mbarrier.arrive(ds_free, count=1)
    else:
        dv, dk = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok))
    mbarrier.arrive(q_empty.index(stage), count=1)
    if DQ:
        mbarrier.wait(dq_empty.index(me), (it & 1) ^ 1)
        tile_2d(dq_smem.index(me)).store(dq * softmax_scale)
        fence_async_shared()
        mbarrier.arrive(dq_full.index(me), count=1)
    return dk, dv


@gluon.jit
def _q_block_wide(dk, dv, k_smem, v_smem, smems, pds_smem, dq_smem, bars, key_cols, m, it, qk_scale2, softmax_scale,
                  me: gl.constexpr, MASKED: gl.constexpr, DQ: gl.constexpr):
    """One query block of one head for consumer ``me`` at D = 256: its dK/dV columns updated, its dQ columns handed on.

    Consumer ``me`` takes keys [32 me, 32 me + 32) of the 64-key tile for ``S = Q K^T`` and ``dP = dO V^T``
    and writes its P^T and dS^T rows into shared tiles; once both halves are there it takes head-dim
    columns [128 me, 128 me + 128) of ``dV += P^T dO``, ``dK += dS^T Q`` and ``dQ = dS K``.
    """
    kv_ready, q_ready, q_empty, ds_ready, ds_free, dq_full, dq_empty = bars
    q_smem, do_smem, lse2_smem, delta_smem = smems
    STAGES: gl.constexpr = q_smem.shape[0]
    BLOCK_M: gl.constexpr = q_smem.shape[3]
    HEAD_DIM: gl.constexpr = q_smem.shape[4]
    HALF: gl.constexpr = HEAD_DIM // 2
    COLS: gl.constexpr = k_smem.shape[3] // 2
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = wgmma_layout(COLS)
    acc_layout: gl.constexpr = wgmma_layout(HALF)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    zero = _opaque_zero(it)  # as in _q_block: no hoisted wgmma descriptors
    k_tile = tile_2d(k_smem.index(zero))
    k_w = k_tile.slice(me * COLS, COLS)
    v_w = tile_2d(v_smem.index(zero)).slice(me * COLS, COLS)
    k_half = k_tile.slice(me * HALF, HALF, dim=1)
    p_t = pds_smem.index(zero)
    ds_t = pds_smem.index(zero + 1)
    stage = it % STAGES
    mbarrier.wait(q_ready.index(stage), (it // STAGES) & 1)
    lse2 = lse2_smem.index(stage).reshape([BLOCK_M]).load(row_layout)
    delta = delta_smem.index(stage).reshape([BLOCK_M]).load(row_layout)
    q = tile_2d(q_smem.index(stage))
    do = tile_2d(do_smem.index(stage))
    s_tok = warpgroup_mma(q, k_w.permute((1, 0)), gl.zeros([BLOCK_M, COLS], gl.float32, s_layout),
                          use_acc=False, is_async=True)
    dp_tok = warpgroup_mma(do, v_w.permute((1, 0)), gl.zeros([BLOCK_M, COLS], gl.float32, s_layout),
                           use_acc=False, is_async=True)
    s = warpgroup_mma_wait(1, deps=(s_tok,))
    p = gl.exp2(s * qk_scale2 - gl.expand_dims(lse2, 1))
    if MASKED:  # causal: query >= key
        rows = m * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_layout)
        p = gl.where(gl.expand_dims(rows, 1) >= gl.expand_dims(key_cols, 0), p, 0.0)
    dp = warpgroup_mma_wait(0, deps=(dp_tok,))
    ds = p * (dp - gl.expand_dims(delta, 1))
    mbarrier.wait(ds_free, (it & 1) ^ 1)  # both consumers are done with the previous block's tiles
    p_t.slice(me * COLS, COLS).store(gl.permute(p.to(dtype), (1, 0)))
    ds_t.slice(me * COLS, COLS).store(gl.permute(ds.to(dtype), (1, 0)))
    fence_async_shared()
    mbarrier.arrive(ds_ready, count=1)
    mbarrier.wait(ds_ready, it & 1)
    dv_tok = warpgroup_mma(p_t, do.slice(me * HALF, HALF, dim=1), dv, is_async=True)
    dk_tok = warpgroup_mma(ds_t, q.slice(me * HALF, HALF, dim=1), dk, is_async=True)
    if DQ:
        dq_tok = warpgroup_mma(ds_t.permute((1, 0)), k_half, gl.zeros([BLOCK_M, HALF], gl.float32, acc_layout),
                               use_acc=False, is_async=True)
        dv, dk, dq = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok, dq_tok))
    else:
        dv, dk = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok))
    mbarrier.arrive(ds_free, count=1)
    mbarrier.arrive(q_empty.index(stage), count=1)
    if DQ:
        mbarrier.wait(dq_empty.index(me), (it & 1) ^ 1)
        tile_2d(dq_smem.index(me)).store(dq * softmax_scale)
        fence_async_shared()
        mbarrier.arrive(dq_full.index(me), count=1)
    return dk, dv


@gluon.jit
def _q_step(dk, dv, k_smem, v_smem, smems, ds_smem, dq_smem, bars, keys, m, it, qk_scale2, softmax_scale,
            me: gl.constexpr, MASKED: gl.constexpr, DQ: gl.constexpr, WIDE: gl.constexpr):
    """One query block: the consumers split the keys, or (``WIDE``) the head dim."""
    if WIDE:
        dk, dv = _q_block_wide(dk, dv, k_smem, v_smem, smems, ds_smem, dq_smem, bars, keys, m, it, qk_scale2,
                               softmax_scale, me, MASKED, DQ)
    else:
        dk, dv = _q_block(dk, dv, k_smem, v_smem, smems, ds_smem, dq_smem, bars, keys, m, it, qk_scale2,
                          softmax_scale, me, MASKED, DQ)
    return dk, dv


@gluon.jit
def _consumer(args, me: gl.constexpr, CAUSAL: gl.constexpr, ACCUMULATE: gl.constexpr, DQ: gl.constexpr,
              WIDE: gl.constexpr):
    """Consumer warpgroup ``me``: dK and dV of its part of the key tile (keys [64 me, 64 me + 64), or at
    D = 256 head-dim columns [128 me, 128 me + 128) of all 64 keys) over every query block."""
    (smems, k_smem, v_smem, ds_smem, dq_smem, bars, dk_ptr, dv_ptr, dk_strides, dv_strides, qk_scale2, softmax_scale,
     seq_q, seq_k, kv_heads, group, num_n_blocks) = args
    kv_ready, q_ready, q_empty, ds_ready, ds_free, dq_full, dq_empty = bars
    BLOCK_M: gl.constexpr = smems[0].shape[3]
    HEAD_DIM: gl.constexpr = smems[0].shape[4]
    BLOCK_N: gl.constexpr = k_smem.shape[3]
    batch, kv_head, n0 = _tile_ids(kv_heads, num_n_blocks, BLOCK_N)
    if WIDE:  # keys: this consumer's columns of S; the accumulators hold all keys, half the head dim
        COLS: gl.constexpr = BLOCK_N // 2
        acc_layout: gl.constexpr = wgmma_layout(HEAD_DIM // 2)
        keys = n0 + me * COLS + gl.arange(0, COLS, layout=gl.SliceLayout(0, wgmma_layout(COLS)))
        acc_rows = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc_layout))
        acc_shape: gl.constexpr = [BLOCK_N, HEAD_DIM // 2]
        col0 = me * (HEAD_DIM // 2)
    else:  # keys: this consumer's rows of S^T and of the accumulators
        acc_layout: gl.constexpr = wgmma_layout(HEAD_DIM)
        keys = n0 + me * KEY_ROWS + gl.arange(0, KEY_ROWS, layout=gl.SliceLayout(1, wgmma_layout(BLOCK_M)))
        acc_rows = keys
        acc_shape: gl.constexpr = [KEY_ROWS, HEAD_DIM]
        col0 = 0
    dk = gl.zeros(acc_shape, gl.float32, acc_layout)
    dv = gl.zeros(acc_shape, gl.float32, acc_layout)
    lo0, hi0, lo1, hi1 = _m_ranges(n0, seq_q, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    mbarrier.wait(kv_ready, 0)
    it = 0
    for g in range(group):
        for m in range(lo0, hi0):
            dk, dv = _q_step(dk, dv, k_smem, v_smem, smems, ds_smem, dq_smem, bars, keys, m, it, qk_scale2,
                             softmax_scale, me, CAUSAL, DQ, WIDE)
            it += 1
        for m in range(lo1, hi1):
            dk, dv = _q_step(dk, dv, k_smem, v_smem, smems, ds_smem, dq_smem, bars, keys, m, it, qk_scale2,
                             softmax_scale, me, False, DQ, WIDE)
            it += 1
    _store_rows(dk * softmax_scale, dk_ptr, dk_strides, acc_rows, col0, batch, kv_head, seq_k, acc_layout, ACCUMULATE)
    _store_rows(dv, dv_ptr, dv_strides, acc_rows, col0, batch, kv_head, seq_k, acc_layout, ACCUMULATE)


@gluon.jit
def _store_rows(acc, ptr, strides, key_rows, col0, batch, kv_head, seq_k, layout: gl.constexpr,
                ACCUMULATE: gl.constexpr):
    """Store (or with ACCUMULATE add) an fp32 [rows, cols] tile into rows ``key_rows``, head-dim columns
    from ``col0`` on, of a (B, S, H_kv, D) tensor with (batch, seq, head) ``strides``."""
    COLS: gl.constexpr = acc.shape[1]
    s_b, s_s, s_h = strides
    rows = gl.convert_layout(key_rows, gl.SliceLayout(1, layout))
    cols = gl.arange(0, COLS, layout=gl.SliceLayout(0, layout))
    base = ptr + batch.to(gl.int64) * s_b + kv_head.to(gl.int64) * s_h + col0
    ptrs = base + gl.expand_dims(rows.to(gl.int64) * s_s, 1) + gl.expand_dims(cols, 0)
    mask = gl.expand_dims(rows < seq_k, 1) & gl.expand_dims(cols < COLS, 0)
    if ACCUMULATE:
        acc = acc + gl.load(ptrs, mask=mask, other=0.0).to(gl.float32)
    gl.store(ptrs, acc.to(ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- kernel

@gluon.jit
def _gluon_bwd_kernel(q_desc, do_desc, k_desc, v_desc, dq_desc, lse2_desc, delta_desc, dk_ptr, dv_ptr, s_kb, s_ks,
                      s_kh, s_vb, s_vs, s_vh, qk_scale2, softmax_scale, seq_q, seq_k, heads, kv_heads, group,
                      num_n_blocks,
                      STAGES: gl.constexpr, WIDE: gl.constexpr, CAUSAL: gl.constexpr, ACCUMULATE: gl.constexpr,
                      DQ: gl.constexpr):
    dtype: gl.constexpr = q_desc.dtype
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[2]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
    q_smem = gl.allocate_shared_memory(dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)
    lse2_smem = gl.allocate_shared_memory(gl.float32, [STAGES] + lse2_desc.block_type.shape, lse2_desc.layout)
    delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES] + delta_desc.block_type.shape, delta_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [1] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [1] + v_desc.block_type.shape, v_desc.layout)
    ds_smem = gl.allocate_shared_memory(dtype, [2 if WIDE else 1, BLOCK_N, BLOCK_M],  # (P^T and) dS^T
                                        gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype))
    dq_smem = gl.allocate_shared_memory(gl.float32, [2] + dq_desc.block_type.shape, dq_desc.layout)
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ds_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ds_free = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    dq_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    dq_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_ready, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=2)
    mbarrier.init(ds_ready, count=2)
    mbarrier.init(ds_free, count=2)
    for i in gl.static_range(2):
        mbarrier.init(dq_full.index(i), count=1)
        mbarrier.init(dq_empty.index(i), count=1)
    bars = (kv_ready, q_ready, q_empty, ds_ready, ds_free, dq_full, dq_empty)
    smems = (q_smem, do_smem, lse2_smem, delta_smem)
    consumer_args = (smems, k_smem, v_smem, ds_smem, dq_smem, bars, dk_ptr, dv_ptr, (s_kb, s_ks, s_kh),
                     (s_vb, s_vs, s_vh), qk_scale2, softmax_scale, seq_q, seq_k, kv_heads, group, num_n_blocks)
    gl.warp_specialize([
        (_consumer, (consumer_args, 0, CAUSAL, ACCUMULATE, DQ, WIDE)),
        (_consumer, (consumer_args, 1, CAUSAL, ACCUMULATE, DQ, WIDE)),
        (_loader, ((q_desc, do_desc, lse2_desc, delta_desc), k_desc, v_desc, smems, k_smem, v_smem, bars, seq_q,
                   seq_k, heads, kv_heads, group, num_n_blocks, CAUSAL)),
        (_dq_writer, (dq_desc, dq_smem, bars, seq_q, seq_k, kv_heads, group, num_n_blocks, BLOCK_N, CAUSAL, DQ)),
    ], [4, 1, 1], [CONSUMER_REGS, SMALL_REGS, SMALL_REGS])


# ---------------------------------------------------------------- host side

@dataclass(frozen=True)
class GluonBwdConfig:
    """A launch configuration of the Gluon backward: query rows per step, the Q/dO pipeline depth, and
    whether the consumers split the head dim (``wide``; needed at D = 256) rather than the keys."""

    block_m: int
    stages: int
    wide: bool = False

    def candidate(self, dq: str) -> dict[str, Any]:
        """This config as the tuner's candidate (a JSON-able dict with ``path: "gluon"``), dQ done ``dq`` way."""
        return {"path": "gluon", "BLOCK_M": self.block_m, "STAGES": self.stages, "WIDE": self.wide, "dq": dq}

    @classmethod
    def of_candidate(cls, cfg: dict[str, Any]) -> GluonBwdConfig:
        """The config of a candidate made by ``candidate``."""
        return cls(cfg["BLOCK_M"], cfg["STAGES"], cfg["WIDE"])

    @property
    def name(self) -> str:
        """A short label: block_m / stages [/ wide]."""
        return f"{self.block_m}/{self.stages}{'/wide' if self.wide else ''}"


GLUON_BWD_CONFIGS: dict[int, list[GluonBwdConfig]] = {  # the first is the default
    64: [GluonBwdConfig(64, 2), GluonBwdConfig(64, 3)],  # wide ran 0.93-0.96 of these (2026-12-03)
    128: [GluonBwdConfig(64, 2), GluonBwdConfig(64, 3), GluonBwdConfig(64, 2, True)],  # wide: +1-3% causal
    256: [GluonBwdConfig(64, 1, True)],  # 208 KiB of shared memory: no room for a second Q/dO stage
}


def block_n(head_dim: int, wide: bool) -> int:
    """Keys per CTA: 128 (64 per consumer, or all for both when ``wide``); 64 at D = 256 (wide only)."""
    if head_dim > 128 and not wide:
        raise ValueError(f"the Gluon backward at D = {head_dim} needs wide=True (the consumers split the head dim)")
    return 64 if head_dim > 128 else 128


def gluon_bwd_supported(q: torch.Tensor) -> str | None:
    """Why the Gluon backward cannot take this call (None when it can)."""
    return unsupported_reason(q, GLUON_BWD_DTYPES, GLUON_BWD_HEAD_DIMS)


_ROW_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)  # made once: it costs µs


def _row_descriptor(t: torch.Tensor, block_m: int) -> TensorDescriptor:
    """A descriptor over the (B * H, seq_pad) fp32 rows of lse2 or delta, block [1, block_m], unswizzled."""
    rows = t.view(-1, t.shape[-1])
    return TensorDescriptor(rows, list(rows.shape), list(rows.stride()), [1, block_m], _ROW_LAYOUT)


def gluon_bwd_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, lse2: torch.Tensor,
                     delta: torch.Tensor, softmax_scale: float, causal: bool, cfg: GluonBwdConfig,
                     dq_acc: torch.Tensor | None, dk: torch.Tensor, dv: torch.Tensor, accumulate: bool) -> None:
    """Run the Gluon backward on TMA-ready inputs and the preprocessed (B, H, seq_pad) ``lse2``/``delta``.

    dQ (times the scale) is added into the fp32 ``dq_acc`` (B, Sq, H, D); None skips dQ. dK and dV
    are written into ``dk``/``dv`` (any strides and float dtype), or added to them with ``accumulate``.
    """
    batch, seq_q, heads, head_dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    keys = block_n(head_dim, cfg.wide)
    num_n_blocks = triton.cdiv(seq_k, keys)
    with_dq = dq_acc is not None
    dq_target = dq_acc if with_dq else torch.empty(1, cfg.block_m, 1, head_dim, device=q.device,
                                                   dtype=torch.float32)  # a descriptor the kernel never uses
    _gluon_bwd_kernel[(num_n_blocks, batch * kv_heads)](
        bhsd_descriptor(q, cfg.block_m, head_dim), bhsd_descriptor(do, cfg.block_m, head_dim),
        bhsd_descriptor(k, keys, head_dim), bhsd_descriptor(v, keys, head_dim),
        bhsd_descriptor(dq_target, cfg.block_m, head_dim // 2), _row_descriptor(lse2, cfg.block_m),
        _row_descriptor(delta, cfg.block_m), dk, dv, *dk.stride()[:3], *dv.stride()[:3], softmax_scale * LOG2E,
        softmax_scale, seq_q, seq_k, heads, kv_heads,
        heads // kv_heads, num_n_blocks, STAGES=cfg.stages, WIDE=cfg.wide, CAUSAL=causal, ACCUMULATE=accumulate, DQ=with_dq,
        num_warps=4, maxnreg=MAXNREG)
