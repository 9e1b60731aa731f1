"""FlashAttention-3 forward for Hopper in Gluon (``triton.experimental.gluon``), returning the LSE.

The FA3 algorithm written out, with the parts plain ``tl`` hides made explicit:

- Warp specialization, three partitions per CTA (``gl.warp_specialize``):
  - a loader (1 warp, 24 registers) that TMA-loads the Q tile once per tile and streams K and V
    blocks through two ``STAGES``-deep shared-memory rings, guarded by mbarriers: ``k_ready``/
    ``v_ready`` (the TMA transaction count completes them) and ``k_empty``/``v_empty`` (every
    consumer releases a slot: with 2 stages K as soon as S = Q K^T is done and V after P V; with 3
    or more K and V together after P V, one ``v_empty`` arrive per block, since each arrive costs
    a warpgroup barrier that Triton puts before it). It loads K of block n before V of block n - 1,
    the order the consumers need them in;
  - ``CONSUMERS`` consumer warpgroups (4 warps each), each owning 64 of the tile's 64 * CONSUMERS
    query rows and sharing every K/V stage: two of 240 registers (128-row tiles), or three of 160
    (192-row tiles, FA3's choice at D = 64: K and V are read once per 192 query rows). Registers move
    from the loader to the consumers through the partitions' register budgets (``worker_num_regs``;
    the default partition gets what ``maxnreg`` leaves).
- Async ``warpgroup_mma`` with intra-warpgroup overlap: a consumer issues S_j = Q K_j^T and then
  O += P_{j-1} V_{j-1} without waiting, waits only for S_j, and runs the softmax of block j while
  the tensor cores finish P_{j-1} V_{j-1}; the rescale of O follows that product's completion.
  P goes to the second product from registers (the wgmma A operand) or, with ``P_SMEM``, through
  shared memory. ptxas would hoist the wait for P V above the exponentials (nothing it sees orders
  them; passing the row sums through the wait's ``deps`` only ties them at the LLVM level), so
  just before that wait each consumer issues a shared-memory store of its new row sums, which need
  every exponential of the block, under a predicate that is never true (``_anchor``): ptxas keeps
  shared-memory stores ahead of a later wgmma wait, so the whole softmax stays inside the window
  (tools/sass_overlap.py). Written as inline PTX, the store is invisible to Triton's shared-memory
  barrier analysis: a ``local_store`` there cost a warpgroup barrier per block besides.
- Ping-pong (``PINGPONG``): one mbarrier per consumer hands the tensor cores round the consumers in
  turn, so one warpgroup's GEMMs run while the others do their softmax.
- A persistent grid: one CTA per SM walks the tiles; the loader fetches the next tile's Q while the
  consumers finish the last one. Causal tiles go heaviest first (all heads' last query blocks first),
  dealt out to the CTAs in a snake: every other full round in reverse CTA order, so that a CTA that
  drew a round's heaviest tile draws the next round's lightest (plain round-robin left CTA 0 one
  heaviest tile's worth of work above the average: 13% at S = 16K with 8 heads). With more (batch,
  head) pairs than CTAs the causal order goes section by section of pairs whose K and V fit in half
  the L2 (``causal_section``): else each CTA of a round takes a pair of its own and reuses nothing
  (+8-9% at S = 512 and 1K, H200, logs/gluon-causal-sections-ab-h200-2026-12-03-eve.txt).
- exp2 with log2(e) folded into the scale; masks only on the key blocks that need them (the
  diagonal band, or the last partial block).
- Epilogue: O / l and the natural-log LSE, stored with plain pointer stores (any strides: the ring
  hands row-slice views of its fp32 accumulator). With ``ACCUMULATE`` the epilogue first merges
  with the (out, lse) it finds there, exactly as the ``tl`` kernel does, so the ring's merge costs
  no pass over memory. Rows that saw no key stay 0 / -inf, never NaN.

- FP8 (``FP8``, float8_e4m3fn q/k/v): the same pipeline with 8-bit wgmma (instruction K = 32).
  Descales fold into the tile's S scale (q, k) and the epilogue's 1/l (v). P = 2^8 exp(S - m)
  (FA3's offset) is rounded to e4m3 for P V; the row sum takes the unrounded values. 8-bit wgmma
  reads its B operand K-major only, so V arrives transposed, (B, H, D, S) with the keys in
  ``fp8.key_order`` (``fp8.KMajorV``): relabelling P's keys alike (a reshape and permute of its
  registers, no data movement) lets each thread store its P as 4-byte runs into the A operand's
  shared buffer.

Shapes: D in {64, 128, 256}, fp16/bf16 or e4m3, sm_90. Everything else uses the ``tl`` kernel
(``triton_fwd``). Gluon does not run in Triton's interpreter; the GPU tests in tests/gpu check it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from .common import LOG2E, TL_LN2, TL_LOG2E, num_sms
from .gluon_common import bhds_descriptor, bhsd_descriptor, tile_2d, unsupported_reason, wgmma_layout

GLUON_HEAD_DIMS = (64, 128, 256)
GLUON_DTYPES = (torch.float16, torch.bfloat16)
CONSUMER_ROWS = 64  # query rows per consumer warpgroup; a tile has 64 * CONSUMERS
# Register budgets by consumer count: (maxnreg, each worker consumer's). The loader warp takes 24; the
# default partition (the first consumer) gets what maxnreg over the warpgroups leaves:
# 168 * 384 - (240 + 24) * 128 = 240 * 128, and 128 * 512 - (2 * 160 + 24) * 128 = 168 * 128.
REGISTER_BUDGETS = {2: (168, 240), 3: (128, 160)}
LOADER_REGS = gl.constexpr(24)
P_LOG2_OFFSET = gl.constexpr(8.0)  # FP8: P = 2^8 exp(S - m), fp8.P_SCALE
CAUSAL_SECTION_BYTES = 24 << 20  # K and V per section of the causal order: about half an H100/H200 L2


# ---------------------------------------------------------------- tile schedule (shared by all partitions)

@gluon.jit
def _dealt_tile(i, num_tiles):
    """The tile this CTA takes at its i-th step (i = program_id + k * num_programs): a snake over full rounds."""
    programs = gl.num_programs(0)
    first = i - i % programs
    reverse = ((i // programs) % 2 == 1) & (first + programs <= num_tiles)
    return gl.where(reverse, first + programs - 1 - i % programs, i)


@gluon.jit
def _tile_coords(tile, num_m_blocks, batch_heads, section, heads, group, CAUSAL: gl.constexpr):
    """(batch, head, kv_head, m_block) of a tile. Causal: (batch, head) pairs in sections of ``section``,
    one after the other, and in each the heaviest query blocks of every pair first (the host sizes a
    section so that its K and V stay in L2 while the CTAs walk it)."""
    if CAUSAL:
        first_bh = tile // (section * num_m_blocks) * section
        width = gl.minimum(section, batch_heads - first_bh)
        r = tile - first_bh * num_m_blocks
        m_block = num_m_blocks - 1 - r // width
        bh = first_bh + r % width
    else:
        bh = tile // num_m_blocks
        m_block = tile % num_m_blocks
    batch = bh // heads
    head = bh % heads
    return batch, head, head // group, m_block


@gluon.jit
def _key_blocks(m_block, seq_k, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """(first masked key block, end) for a tile: blocks below the first need no mask."""
    if CAUSAL:
        first_masked = (m_block * BLOCK_M) // BLOCK_N
        end = gl.cdiv(gl.minimum((m_block + 1) * BLOCK_M, seq_k), BLOCK_N)
    else:
        first_masked = seq_k // BLOCK_N
        end = gl.cdiv(seq_k, BLOCK_N)
    return first_masked, end


# ---------------------------------------------------------------- loader partition

@gluon.jit
def _load_block(desc, smem, ready, empty, batch, kv_head, n, it, BLOCK_N: gl.constexpr, KEYS_LAST: gl.constexpr):
    """TMA-load K or V block n into stage it % STAGES once both consumers have released it.

    ``KEYS_LAST``: the tensor is (B, H, D, S), the FP8 forward's V, so the block's keys are its last coordinate.
    """
    STAGES: gl.constexpr = smem.shape[0]
    stage = it % STAGES
    mbarrier.wait(empty.index(stage), ((it // STAGES) & 1) ^ 1)
    mbarrier.expect(ready.index(stage), desc.block_type.nbytes)
    if KEYS_LAST:
        coords = [batch, kv_head, 0, n * BLOCK_N]
    else:
        coords = [batch, kv_head, n * BLOCK_N, 0]
    tma.async_copy_global_to_shared(desc, coords, ready.index(stage), smem.index(stage))


@gluon.jit
def _loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, seq_k, heads, group, num_m_blocks, num_tiles,
            section, CAUSAL: gl.constexpr, FP8: gl.constexpr):
    """The TMA producer: each tile's Q (a box per consumer), then its K and V blocks through the stage ring."""
    CONSUMERS: gl.constexpr = q_smem.shape[0]
    ROWS: gl.constexpr = q_smem.shape[3]
    BLOCK_M: gl.constexpr = CONSUMERS * ROWS
    BLOCK_N: gl.constexpr = k_smem.shape[3]
    q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, turn = bars
    batch_heads = num_tiles // num_m_blocks
    it = 0
    t = 0
    for i in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        batch, head, kv_head, m_block = _tile_coords(_dealt_tile(i, num_tiles), num_m_blocks, batch_heads, section, heads,
                                                     group, CAUSAL)
        mbarrier.wait(q_empty, (t & 1) ^ 1)  # every consumer is done with the last tile's Q
        mbarrier.expect(q_ready, CONSUMERS * q_desc.block_type.nbytes)
        for c in gl.static_range(CONSUMERS):
            tma.async_copy_global_to_shared(q_desc, [batch, head, m_block * BLOCK_M + c * ROWS, 0], q_ready,
                                            q_smem.index(c))
        _, end = _key_blocks(m_block, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
        for n in range(0, end):  # K of block n, then V of block n - 1: V is needed one step after K
            _load_block(k_desc, k_smem, k_ready, k_empty, batch, kv_head, n, it, BLOCK_N, False)
            if n > 0:
                _load_block(v_desc, v_smem, v_ready, v_empty, batch, kv_head, n - 1, it - 1, BLOCK_N, FP8)
            it += 1
        _load_block(v_desc, v_smem, v_ready, v_empty, batch, kv_head, end - 1, it - 1, BLOCK_N, FP8)
        t += 1


# ---------------------------------------------------------------- consumer partitions

@gluon.jit
def _softmax_block(s, m_i, l_i, rows, n, seq_k, qk_scale, s_layout: gl.constexpr, BLOCK_N: gl.constexpr,
                   CAUSAL: gl.constexpr, MASKED: gl.constexpr, FP8: gl.constexpr):
    """Online softmax of one S block (base 2): returns (p, alpha, m_new, l_new).

    FP8: p = 2^8 exp(S - m) (FA3's offset), which puts P in [0, 256] where e4m3 keeps 3 bits of mantissa
    down to 2^-6; the row sum grows by 2^8 alike and the epilogue takes the offset out of the LSE.
    """
    if MASKED:
        cols = n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        keep = gl.expand_dims(cols, 0) < seq_k
        if CAUSAL:
            keep = keep & (gl.expand_dims(rows, 1) >= gl.expand_dims(cols, 0))
        s = gl.where(keep, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        m_ref = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: no NaN
    else:
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        m_ref = m_new
    if FP8:
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_ref - P_LOG2_OFFSET, 1))
    else:
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_ref, 1))
    alpha = gl.exp2(m_i - m_ref)
    l_new = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_new


@gluon.jit
def _anchor(x, never_negative):
    """A shared-memory store of ``x`` that never runs (its predicate is ``never_negative < 0``) but that ptxas
    must schedule ahead of a later wgmma wait, so everything ``x`` needs is computed before it."""
    gl.inline_asm_elementwise("{ .reg .pred p; setp.lt.s32 p, $2, 0; @p st.shared.b32 [$2], $1; mov.b32 $0, $1; }",
                              "=r,r,r", [x, gl.full(x.shape, never_negative, gl.int32, x.type.layout)],
                              dtype=gl.float32, is_pure=False, pack=1)


@gluon.jit
def _take_turn(turn, me: gl.constexpr, turns, PINGPONG: gl.constexpr):
    """Ping-pong: wait until it is this warpgroup's turn on the tensor cores (consumer 0 goes first)."""
    if PINGPONG:
        if me == 0:
            mbarrier.wait(turn.index(me), (turns & 1) ^ 1)
        else:
            mbarrier.wait(turn.index(me), turns & 1)


@gluon.jit
def _pass_turn(turn, me: gl.constexpr, PINGPONG: gl.constexpr):
    """Ping-pong: hand the tensor cores to the next consumer, round the ``turn.shape[0]`` of them."""
    if PINGPONG:
        mbarrier.arrive(turn.index((me + 1) % turn.shape[0]), count=1)


@gluon.jit
def _round_16bit(p, dtype: gl.constexpr):
    """fp32 ``p`` rounded to fp16/bf16 two values per instruction, in place: as a plain ``to`` the
    conversion is sunk into the next iteration (the loop then carries 64 fp32 registers of P instead of
    32 packed ones) and ptxas pairs the halves the wrong way round, a PRMT per register."""
    if dtype == gl.bfloat16:
        out = gl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,r,r", [p], dtype=gl.bfloat16, is_pure=False,
                                        pack=2)
    else:
        out = gl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,r,r", [p], dtype=gl.float16, is_pure=False,
                                        pack=2)
    return out


@gluon.jit
def _p_operand(p, dtype: gl.constexpr, p_buf, p_layout: gl.constexpr, P_SMEM: gl.constexpr, FP8: gl.constexpr):
    """fp32 P rounded to ``dtype`` as the A operand of P V: in registers (RS), or stored to this
    consumer's shared buffer (SS).

    It comes after the wait for the in-flight P V, whose operand (those registers, or the buffer) it replaces.
    FP8: P's keys are relabelled in ``fp8.key_order`` (V is stored so), which makes the registers of the S
    accumulator those of the 8-bit A operand: no data moves.
    """
    if FP8:
        ROWS: gl.constexpr = p.shape[0]
        KEYS: gl.constexpr = p.shape[1]
        p = p.to(dtype).reshape([ROWS, KEYS // 32, 2, 2, 4, 2]).permute((0, 1, 2, 4, 3, 5)).reshape([ROWS, KEYS])
    else:
        p = _round_16bit(p, dtype)
    if P_SMEM:
        p_buf.store(p)
        fence_async_shared()
        return p_buf
    else:
        return gl.convert_layout(p, p_layout)


@gluon.jit
def _v_operand(v_stage, FP8: gl.constexpr):
    """V block [keys, D] as the B operand of P V: FP8 stores it [D, keys] (K-major, as 8-bit wgmma needs)."""
    if FP8:
        return tile_2d(v_stage).permute((1, 0))
    else:
        return tile_2d(v_stage)


@gluon.jit
def _kv_loop(acc, alpha, m_i, l_i, p, p_buf, q, k_smem, v_smem, bars, it, turns, n_lo, n_hi, rows, seq_k,
             qk_scale, me: gl.constexpr, s_layout: gl.constexpr, p_layout: gl.constexpr, BLOCK_N: gl.constexpr,
             STAGES: gl.constexpr, CAUSAL: gl.constexpr, MASKED: gl.constexpr, PINGPONG: gl.constexpr,
             P_SMEM: gl.constexpr, FP8: gl.constexpr):
    """Steady state over key blocks [n_lo, n_hi): S_n and P_{n-1} V_{n-1} in flight together.

    On entry ``p`` holds P of block n_lo - 1 (already in ``l_i``/``m_i``), whose V is in stage
    (it - 1) % STAGES and whose product with V is still to be issued; ``alpha`` is the rescale O
    owes for that block's new row maximum. O is rescaled while S_n runs, before P V is issued,
    and nothing touches O between the wait for P V and the next iteration (FA3's order). ``_anchor``
    on the row sums just before that wait keeps ptxas from hoisting it above the softmax.
    """
    q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, turn = bars
    ROWS: gl.constexpr = q.shape[0]
    for n in range(n_lo, n_hi):
        stage = it % STAGES
        prev = (it - 1) % STAGES
        mbarrier.wait(k_ready.index(stage), (it // STAGES) & 1)
        _take_turn(turn, me, turns, PINGPONG)
        s_tok = warpgroup_mma(q, tile_2d(k_smem.index(stage)).permute((1, 0)),
                              gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout)), 1)
        mbarrier.wait(v_ready.index(prev), ((it - 1) // STAGES) & 1)
        acc_tok = warpgroup_mma(p, _v_operand(v_smem.index(prev), FP8), acc, is_async=True)
        _pass_turn(turn, me, PINGPONG)
        turns += 1
        s = warpgroup_mma_wait(1, deps=(s_tok,))
        if STAGES < 3:  # else K's stage is released with V's (one arrive and its barrier less per block)
            mbarrier.arrive(k_empty.index(stage), count=1)
        p_new, alpha, m_i, l_i = _softmax_block(s, m_i, l_i, rows, n, seq_k, qk_scale, s_layout, BLOCK_N, CAUSAL,
                                                MASKED, FP8)
        _anchor(l_i, seq_k)  # needs every exponential; ptxas keeps it ahead of the wait (module docstring)
        acc = warpgroup_mma_wait(0, deps=(acc_tok,))
        mbarrier.arrive(v_empty.index(prev), count=1)
        p = _p_operand(p_new, q.dtype, p_buf, p_layout, P_SMEM, FP8)
        it += 1
    return acc, alpha, m_i, l_i, p, it, turns


@gluon.jit
def _consumer(args, me: gl.constexpr, CAUSAL: gl.constexpr, ACCUMULATE: gl.constexpr, PINGPONG: gl.constexpr,
              P_SMEM: gl.constexpr, FP8: gl.constexpr):
    """Consumer warpgroup ``me``: the attention of its 64 rows of every tile, and their epilogue."""
    (q_smem, k_smem, v_smem, p_smem, bars, o_ptr, lse_ptr, s_ob, s_os, s_oh, s_lb, s_lh, qk_scale, seq_q, seq_k,
     heads, group, num_m_blocks, num_tiles, section, descales) = args
    ROWS: gl.constexpr = q_smem.shape[3]
    BLOCK_M: gl.constexpr = q_smem.shape[0] * ROWS
    HEAD_DIM: gl.constexpr = q_smem.shape[4]
    BLOCK_N: gl.constexpr = k_smem.shape[3]
    STAGES: gl.constexpr = k_smem.shape[0]
    q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, turn = bars
    INSTR_K: gl.constexpr = 256 // q_smem.dtype.primitive_bitwidth
    s_layout: gl.constexpr = wgmma_layout(BLOCK_N, INSTR_K)
    o_layout: gl.constexpr = wgmma_layout(HEAD_DIM, INSTR_K)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=INSTR_K // 8)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    batch_heads = num_tiles // num_m_blocks
    q = tile_2d(q_smem.index(me))
    if P_SMEM:
        p_buf = p_smem.index(me)
    else:
        p_buf = p_smem
    it = 0
    turns = 0
    t = 0
    for i in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        batch, head, kv_head, m_block = _tile_coords(_dealt_tile(i, num_tiles), num_m_blocks, batch_heads, section, heads,
                                                     group, CAUSAL)
        tile_scale, o_scale = _tile_scales(qk_scale, descales, batch, head, kv_head, FP8)
        first_masked, end = _key_blocks(m_block, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
        rows = m_block * BLOCK_M + me * ROWS + gl.arange(0, ROWS, layout=row_layout)
        m_i = gl.full([ROWS], float("-inf"), gl.float32, row_layout)
        l_i = gl.full([ROWS], 0.0, gl.float32, row_layout)
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
        mbarrier.wait(q_ready, t & 1)
        # Block 0 alone: its S has no P V to overlap with.
        stage = it % STAGES
        mbarrier.wait(k_ready.index(stage), (it // STAGES) & 1)
        _take_turn(turn, me, turns, PINGPONG)
        s_tok = warpgroup_mma(q, tile_2d(k_smem.index(stage)).permute((1, 0)),
                              gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
        _pass_turn(turn, me, PINGPONG)
        turns += 1
        s = warpgroup_mma_wait(0, deps=(s_tok,))
        if STAGES < 3:
            mbarrier.arrive(k_empty.index(stage), count=1)
        p, alpha, m_i, l_i = _softmax_block(s, m_i, l_i, rows, 0, seq_k, tile_scale, s_layout, BLOCK_N, CAUSAL, True,
                                            FP8)
        p = _p_operand(p, q.dtype, p_buf, p_layout, P_SMEM, FP8)
        it += 1
        full_end = gl.maximum(gl.minimum(first_masked, end), 1)
        acc, alpha, m_i, l_i, p, it, turns = _kv_loop(
            acc, alpha, m_i, l_i, p, p_buf, q, k_smem, v_smem, bars, it, turns, 1, full_end, rows, seq_k,
            tile_scale, me, s_layout, p_layout, BLOCK_N, STAGES, CAUSAL, False, PINGPONG, P_SMEM, FP8)
        acc, alpha, m_i, l_i, p, it, turns = _kv_loop(
            acc, alpha, m_i, l_i, p, p_buf, q, k_smem, v_smem, bars, it, turns, full_end, end, rows, seq_k,
            tile_scale, me, s_layout, p_layout, BLOCK_N, STAGES, CAUSAL, True, PINGPONG, P_SMEM, FP8)
        mbarrier.arrive(q_empty, count=1)  # every S of this tile is done: the loader may fetch the next Q
        prev = (it - 1) % STAGES
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout)), 1)
        mbarrier.wait(v_ready.index(prev), ((it - 1) // STAGES) & 1)
        acc = warpgroup_mma(p, _v_operand(v_smem.index(prev), FP8), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(v_empty.index(prev), count=1)
        _epilogue(acc, m_i, l_i, o_scale, rows, batch, head, o_ptr, lse_ptr, s_ob, s_os, s_oh, s_lb, s_lh, seq_q,
                  o_layout, HEAD_DIM, ACCUMULATE, FP8)
        t += 1


@gluon.jit
def _tile_scales(qk_scale, descales, batch, head, kv_head, FP8: gl.constexpr):
    """(scale of S in base 2, scale of O) of a tile: FP8 folds in q/k descales and v's, 16-bit has none."""
    if FP8:
        q_d, k_d, v_d, s_qb, s_qh, s_kb, s_kh, s_vb, s_vh = descales
        tile_scale = (qk_scale * gl.load(q_d + batch * s_qb + head * s_qh)
                      * gl.load(k_d + batch * s_kb + kv_head * s_kh))
        o_scale = gl.load(v_d + batch * s_vb + kv_head * s_vh)
    else:
        tile_scale = qk_scale
        o_scale = 1.0
    return tile_scale, o_scale


@gluon.jit
def _epilogue(acc, m_i, l_i, o_scale, rows, batch, head, o_ptr, lse_ptr, s_ob, s_os, s_oh, s_lb, s_lh, seq_q,
              o_layout: gl.constexpr, HEAD_DIM: gl.constexpr, ACCUMULATE: gl.constexpr, FP8: gl.constexpr):
    """out = acc / l and lse (natural log), merged into what ``out``/``lse`` hold when ACCUMULATE.

    FP8: acc is in units of V's descale (``o_scale``) and l carries P's 2^8 offset.
    """
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    # Torch strides are never negative: the int64 offsets zero-extend them, which takes no register (ptxas
    # hoists a sign extension to the kernel's entry, ahead of the partitions, and had to spill it there).
    gl.assume((s_ob >= 0) & (s_os >= 0) & (s_oh >= 0) & (s_lb >= 0) & (s_lh >= 0))
    has_keys = l_i > 0.0
    if FP8:
        lse2 = gl.where(has_keys, m_i + gl.log2(l_i) - P_LOG2_OFFSET, float("-inf"))
        inv = gl.convert_layout(o_scale / gl.where(has_keys, l_i, 1.0), o_rows)
    else:
        lse2 = gl.where(has_keys, m_i + gl.log2(l_i), float("-inf"))
        inv = gl.convert_layout(1.0 / gl.where(has_keys, l_i, 1.0), o_rows)
    out = acc * gl.expand_dims(inv, 1)
    rows_o = gl.convert_layout(rows, o_rows)
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    base = o_ptr + batch.to(gl.int64) * s_ob + head.to(gl.int64) * s_oh
    o_ptrs = base + gl.expand_dims(rows_o.to(gl.int64) * s_os, 1) + gl.expand_dims(cols, 0)
    o_mask = gl.expand_dims(rows_o < seq_q, 1) & gl.expand_dims(cols < HEAD_DIM, 0)
    lse_ptrs = lse_ptr + batch.to(gl.int64) * s_lb + head.to(gl.int64) * s_lh + rows
    row_mask = rows < seq_q
    if ACCUMULATE:  # merge with the running (out, lse): weights exp(lse_x - lse_merged)
        prev2 = gl.load(lse_ptrs, mask=row_mask, other=float("-inf")) * TL_LOG2E
        top = gl.maximum(prev2, lse2)
        top = gl.where(top == float("-inf"), 0.0, top)  # both empty: weights 0, no NaN
        w_prev = gl.exp2(prev2 - top)
        w_blk = gl.exp2(lse2 - top)
        total = w_prev + w_blk
        inv_total = 1.0 / gl.where(total > 0.0, total, 1.0)
        out_prev = gl.load(o_ptrs, mask=o_mask, other=0.0).to(gl.float32)
        out = (out_prev * gl.expand_dims(gl.convert_layout(w_prev * inv_total, o_rows), 1)
               + out * gl.expand_dims(gl.convert_layout(w_blk * inv_total, o_rows), 1))
        lse2 = gl.where(total > 0.0, top + gl.log2(total), float("-inf"))
    gl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=o_mask)
    gl.store(lse_ptrs, lse2 * TL_LN2, mask=row_mask)


# ---------------------------------------------------------------- kernel

# seq_q/seq_k (and section) are never specialized: Triton would make a length of 1 a constant, and with seq_k = 1
# folded in, ptxas (CUDA 13, triton 3.6) miscompiles the FP8 P pack: the SASS merges P's zero keys from
# registers it never writes, so garbage (NaN, or finite and silently wrong) reaches P V.
@gluon.jit(do_not_specialize=["seq_q", "seq_k", "section"])
def _gluon_fwd_kernel(q_desc, k_desc, v_desc, o_ptr, lse_ptr, s_ob, s_os, s_oh, s_lb, s_lh, qk_scale, seq_q, seq_k, heads,
                group, num_m_blocks, num_tiles, section, q_d, k_d, v_d, s_qdb, s_qdh, s_kdb, s_kdh, s_vdb, s_vdh,
                HEAD_DIM: gl.constexpr, CONSUMERS: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                CAUSAL: gl.constexpr, ACCUMULATE: gl.constexpr, PINGPONG: gl.constexpr, P_SMEM: gl.constexpr,
                FP8: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    dtype: gl.constexpr = q_desc.dtype
    ROWS: gl.constexpr = q_desc.block_type.shape[2]
    q_smem = gl.allocate_shared_memory(dtype, [CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    if P_SMEM:  # one P buffer per consumer warpgroup
        p_smem = gl.allocate_shared_memory(dtype, [CONSUMERS, ROWS, BLOCK_N],
                                           gl.NVMMASharedLayout.get_default_for([ROWS, BLOCK_N], dtype))
    else:
        p_smem = q_smem  # unused
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    if STAGES >= 3:  # K and V of a block leave their stage together: the loader waits on v_empty for both
        k_empty = v_empty
    else:
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_ready, count=1)
    mbarrier.init(q_empty, count=CONSUMERS)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        if STAGES < 3:
            mbarrier.init(k_empty.index(i), count=CONSUMERS)
        mbarrier.init(v_empty.index(i), count=CONSUMERS)
    for i in gl.static_range(CONSUMERS):
        mbarrier.init(turn.index(i), count=1)
    bars = (q_ready, q_empty, k_ready, v_ready, k_empty, v_empty, turn)
    descales = (q_d, k_d, v_d, s_qdb, s_qdh, s_kdb, s_kdh, s_vdb, s_vdh)
    consumer_args = (q_smem, k_smem, v_smem, p_smem, bars, o_ptr, lse_ptr, s_ob, s_os, s_oh, s_lb, s_lh, qk_scale,
                     seq_q, seq_k, heads, group, num_m_blocks, num_tiles, section, descales)
    loader_args = (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, seq_k, heads, group, num_m_blocks, num_tiles,
                   section, CAUSAL, FP8)
    # A partition list can only be written out (it holds functions), and constexprs travel one by one.
    if CONSUMERS == 2:
        gl.warp_specialize([(_consumer, (consumer_args, 0, CAUSAL, ACCUMULATE, PINGPONG, P_SMEM, FP8)),
                            (_consumer, (consumer_args, 1, CAUSAL, ACCUMULATE, PINGPONG, P_SMEM, FP8)),
                            (_loader, loader_args)], [4, 1], [CONSUMER_REGS, LOADER_REGS])
    else:
        gl.warp_specialize([(_consumer, (consumer_args, 0, CAUSAL, ACCUMULATE, PINGPONG, P_SMEM, FP8)),
                            (_consumer, (consumer_args, 1, CAUSAL, ACCUMULATE, PINGPONG, P_SMEM, FP8)),
                            (_consumer, (consumer_args, 2, CAUSAL, ACCUMULATE, PINGPONG, P_SMEM, FP8)),
                            (_loader, loader_args)], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, LOADER_REGS])


# ---------------------------------------------------------------- host side

@dataclass(frozen=True)
class GluonConfig:
    """A launch configuration of the Gluon forward: key block rows, pipeline depth, ping-pong, P in shared
    memory, and consumer warpgroups (64 query rows each)."""

    block_n: int
    stages: int
    pingpong: bool
    p_smem: bool = False
    consumers: int = 2

    @property
    def block_m(self) -> int:
        """Query rows per tile."""
        return CONSUMER_ROWS * self.consumers

    @property
    def name(self) -> str:
        """A short label: block_m x block_n / stages / pp or no-pp [/ ss]."""
        return (f"{self.block_m}x{self.block_n}/{self.stages}/{'pp' if self.pingpong else 'no-pp'}"
                f"{'/ss' if self.p_smem else ''}")


# Candidates per head dim, the first the default. FA3's own sm90 tiles are 192 x 128 at D = 64,
# 128 x 128 at 128 (176 non-causal) and 128 x 80 at D = 256; TMA boxes here must be powers of two.
# 192-row tiles at 160 registers: P through shared memory spills 8-16 B outside the loop; P in registers
# (RS) spills inside it (9 stores and loads per key block in the two worker consumers, 32 B of stack
# non-causal, 208 causal), and still ran 1.02x the shared-memory path non-causal at D = 64, 0.97 causal
# (H200, logs/gluon-d64-rs-ab-h200-2026-12-03.txt): a candidate the tuner may pick, not the default.
GLUON_CONFIGS: dict[int, list[GluonConfig]] = {
    64: [GluonConfig(128, 3, True), GluonConfig(128, 2, True, True), GluonConfig(128, 3, True, True),
         GluonConfig(128, 4, True), GluonConfig(128, 3, False), GluonConfig(128, 2, True, True, 3),
         GluonConfig(128, 3, True, True, 3), GluonConfig(128, 3, True, False, 3)],
    128: [GluonConfig(128, 3, True), GluonConfig(128, 2, True, True), GluonConfig(64, 4, True, True),
          GluonConfig(128, 3, False), GluonConfig(64, 4, True)],
    256: [GluonConfig(64, 2, True), GluonConfig(64, 2, True, True), GluonConfig(32, 3, True, True),
          GluonConfig(64, 2, False)],
}
# The FP8 forward's, P through shared memory: with P's keys relabelled (``_p_operand``) its stores
# are 4-byte ones, and the steady-state loop is 465 instructions per thread and key block at D = 128
# against 493 unrelabelled and 659 with P in registers (there the loop-carried e4m3 operand is kept a
# byte per register and repacked, tools/cross_compile.py SASS). FA3's own FP8 tiles are 192 x 160 at
# D = 64, 128 x 224 (128 causal) at 128 and 128 x 128 at 256; 256-wide key blocks spill here.
GLUON_FP8_CONFIGS: dict[int, list[GluonConfig]] = {
    64: [GluonConfig(128, 2, True, True), GluonConfig(128, 3, True, True), GluonConfig(128, 4, True, True),
         GluonConfig(128, 2, True, True, 3)],
    128: [GluonConfig(128, 3, True, True), GluonConfig(128, 2, True, True), GluonConfig(128, 3, False, True)],
    256: [GluonConfig(128, 2, True, True), GluonConfig(64, 3, True, True), GluonConfig(64, 4, True, True)],
}


def gluon_supported(q: torch.Tensor, out: torch.Tensor | None) -> str | None:
    """Why the Gluon forward cannot take this call (None when it can)."""
    reason = unsupported_reason(q, GLUON_DTYPES + (torch.float8_e4m3fn,), GLUON_HEAD_DIMS)
    if reason is None and out is not None and out.stride(-1) != 1:
        return "out without unit last stride"
    return reason


def causal_section(batch_heads: int, programs: int, k: torch.Tensor, group: int) -> int:
    """(batch, head) pairs per section of the causal tile order (``_tile_coords``): all of them unless there
    are more pairs than CTAs. Then every CTA of a round would take a pair of its own and nothing it loads
    would be reused from L2 (D = 128 at S = 1K, 16 sequences of 16 heads: 0.44 of cuDNN); a section holds as
    many pairs as ``CAUSAL_SECTION_BYTES`` of their K and V."""
    if batch_heads <= programs:
        return batch_heads
    kv_bytes = 2 * k.shape[1] * k.shape[3] * k.element_size() // group  # per query head
    return max(1, min(batch_heads, CAUSAL_SECTION_BYTES // max(kv_bytes, 1)))


def gluon_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool,
                 cfg: GluonConfig, out: torch.Tensor, lse: torch.Tensor, accumulate: bool, *,
                 descales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 num_programs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the Gluon forward on checked, TMA-ready inputs into ``out``/``lse`` (merging with ``accumulate``).

    FP8 (float8_e4m3fn q, k, v): ``v`` is a ``fp8.KMajorV`` and ``descales`` the (B, H), (B, H_kv),
    (B, H_kv) float32 descales of q, k and v.
    """
    batch, seq_q, heads, head_dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    num_m_blocks = triton.cdiv(seq_q, cfg.block_m)
    num_tiles = batch * heads * num_m_blocks
    if num_tiles == 0:
        return out, lse
    fp8 = q.dtype == torch.float8_e4m3fn
    if fp8 != (descales is not None):
        raise ValueError("the Gluon forward takes descales with float8_e4m3fn inputs, and only with them")
    if fp8:
        v_desc = bhds_descriptor(v.storage, cfg.block_n)
        descale_args = [*descales, *(stride for d in descales for stride in d.stride())]
    else:
        v_desc = bhsd_descriptor(v, cfg.block_n, head_dim)
        descale_args = [lse, lse, lse, 0, 0, 0, 0, 0, 0]  # not read
    programs = min(num_tiles, num_programs or num_sms(q.device))
    maxnreg, consumer_regs = REGISTER_BUDGETS[cfg.consumers]
    _gluon_fwd_kernel[(programs,)](
        bhsd_descriptor(q, CONSUMER_ROWS, head_dim), bhsd_descriptor(k, cfg.block_n, head_dim), v_desc, out, lse,
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), softmax_scale * LOG2E,
        seq_q, seq_k, heads, heads // kv_heads, num_m_blocks, num_tiles,
        causal_section(batch * heads, programs, k, heads // kv_heads) if causal else batch * heads, *descale_args,
        HEAD_DIM=head_dim, CONSUMERS=cfg.consumers, BLOCK_N=cfg.block_n, STAGES=cfg.stages, CAUSAL=causal,
        ACCUMULATE=accumulate, PINGPONG=cfg.pingpong, P_SMEM=cfg.p_smem, FP8=fp8, CONSUMER_REGS=consumer_regs,
        num_warps=4, maxnreg=maxnreg)
    return out, lse
