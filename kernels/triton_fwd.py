"""FlashAttention forward in Triton (plain ``tl``), returning the log-sum-exp.

Algorithm: one program computes one tile, the rows [start_m, start_m + BLOCK_M) of one (batch,
head). Q's tile stays on chip; K/V stream through in BLOCK_N-row blocks, and an online softmax
keeps a running row maximum ``m_i`` and row sum ``l_i`` in fp32, rescaling the fp32 accumulator
whenever the maximum grows. The epilogue divides by ``l_i`` and stores out and the natural-log LSE.

Where each technique lives:
- TMA: every tile moves through a host ``TensorDescriptor`` over the (B, H, S, D) view of the 4-D
  (B, S, H, D) tensor with block [1, 1, rows, BLOCK_D] (``tma.descriptor``). Out-of-bounds rows and the
  columns past D (BLOCK_D is D rounded up to a power of two) are zero on load and clipped on store,
  so odd S and D need no masks on loads or stores. Views are used as they are when TMA can address
  them (``tma.tma_ready``). K/V feed the tensor cores straight from the TMA buffers, and Q stays in
  shared memory.
- exp2: log2(e) is folded into ``qk_scale`` on the host; the kernel works in base 2 and converts the
  LSE to natural log at the store.
- Masking only where needed: ``_attend_tile`` splits the keys into full blocks that need no mask
  (the hot loop) and a masked remainder, the diagonal band when causal, or the last partial block.
- GQA/MQA: query head h reads K/V head h // (H // H_kv); K/V are never repeated.
- Tile order for L2 reuse: tiles are numbered (batch, head)-major, so the q-blocks that read the same
  K/V run together, as do the heads of one GQA group. Causal tiles run the heavy (late) q-blocks of
  each head first. ``PERSISTENT`` configs launch one program per SM that strides over the tiles.
- Autotuning: ``flash_fwd`` picks a config per ``autotune.tuning_key`` (GPU, dtype, D, causal,
  bucketed shape, GQA group, output dtype, accumulate) with the verified, disk-cached tuner of
  ``autotune.py`` among ``FWD_CONFIGS`` (``candidate_configs``). There is no
  ``warp_specialize`` candidate: compiled for sm_90 with triton 3.6, it left this kernel unchanged with
  8 warps and failed to compile with 4.
- Ring merge in the epilogue: with ``accumulate=True`` the kernel folds its block into a running
  fp32 (out, lse) that it is handed (the ring's accumulator): the epilogue loads the previous out
  tile and LSE, weighs both by their share of the merged LSE, and stores the merge in place. The
  ring thus needs no merge pass over memory; rows that saw no key on either side stay 0 / -inf.
- fp8 later: loads and dots are dtype-generic (P is cast to V's dtype); a Q·K descale would fold into
  ``qk_scale`` and a V descale into the epilogue's 1 / l_i.

The interpreter (TRITON_INTERPRET=1, CPU tensors) and float32 inputs use one small fixed config;
float32 dots use ``input_precision="ieee"``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import fp8, gluon_fwd
from .autotune import Config, make_config, pick_config, remembered, source_hash, tuning_key
from .checks import check_qkv, resolve_scale
from .common import (LOG2E, SMEM_BYTES, TL_LN2, TL_LOG2E, check_device, dot_precision, kernel_path, note_path,
                     num_sms, uses_small_config, warn_once)
from .tma import block_d, descriptor, tma_addressable, tma_ready

_INTERPRETER_PROGRAMS = 3  # "SMs" for persistent configs without a GPU: exercises the tile loop


# Pruned by timing every earlier candidate on an H100 at S = 16K, bf16 (tools/sweep_configs.py,
# 2026-11-27): the best were 128x128/8 warps/3 stages at D = 128 (0.87-0.92 of cuDNN), 64x128/4/2
# at D = 64 (0.98-1.00) and 64x64/4/3 at D = 256 (0.86-0.90); 2-stage and 32-wide tiles lost
# everywhere, the persistent grid by 5-30% (one candidate stays so the tuner keeps measuring it).
FWD_CONFIGS: list[Config] = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    make_config(64, 32, 4, 2, PERSISTENT=False),  # conservative reference candidate: fits every D
    make_config(64, 64, 4, 3, PERSISTENT=False),
    make_config(64, 128, 4, 2, PERSISTENT=False),
    make_config(128, 64, 8, 3, PERSISTENT=False),
    make_config(128, 64, 8, 4, PERSISTENT=False),
    make_config(128, 128, 8, 3, PERSISTENT=False),
    make_config(128, 64, 8, 3, PERSISTENT=True),
]
SMALL_CONFIG: Config = make_config(32, 16, 4, 2, PERSISTENT=False)  # interpreter and float32


@triton.jit
def _kv_loop(acc, m_i, l_i, q, k_desc, v_desc, batch, kv_head, rows, lo, hi, seq_k, qk_scale,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
             PRECISION: tl.constexpr):
    """Online softmax over the key blocks [lo, hi); MASKED hides keys >= seq_k (and the future)."""
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = k_desc.load([batch, kv_head, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        v = v_desc.load([batch, kv_head, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if MASKED:
            cols = start_n + tl.arange(0, BLOCK_N)
            keep = cols[None, :] < seq_k
            if CAUSAL:
                keep = keep & (rows[:, None] >= cols[None, :])
            qk = tl.where(keep, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: no NaN
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_ref = m_new
        p = tl.math.exp2(qk * qk_scale - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attend_tile(tile, q_desc, k_desc, v_desc, o_desc, lse_ptr, stride_lb, stride_lh, qk_scale, seq_q, seq_k,
                 heads, group, num_m_blocks, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, ACCUMULATE: tl.constexpr,
                 PRECISION: tl.constexpr):
    """Attention for one tile: BLOCK_M query rows of one (batch, head)."""
    batch_head = tile // num_m_blocks
    m_block = tile % num_m_blocks
    if CAUSAL:
        m_block = num_m_blocks - 1 - m_block  # heavy q-blocks first
    batch = batch_head // heads
    head = batch_head % heads
    kv_head = head // group
    start_m = m_block * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)

    q = q_desc.load([batch, head, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if CAUSAL:  # keys below the tile's first row need no mask; the band up to its last row does
        full_end = (start_m // BLOCK_N) * BLOCK_N
        end = tl.minimum(start_m + BLOCK_M, seq_k)
    else:  # only the last, partial key block needs a mask
        full_end = (seq_k // BLOCK_N) * BLOCK_N
        end = seq_k
    acc, m_i, l_i = _kv_loop(acc, m_i, l_i, q, k_desc, v_desc, batch, kv_head, rows, 0, full_end, seq_k,
                             qk_scale, BLOCK_N, BLOCK_D, CAUSAL, False, PRECISION)
    acc, m_i, l_i = _kv_loop(acc, m_i, l_i, q, k_desc, v_desc, batch, kv_head, rows, full_end, end, seq_k,
                             qk_scale, BLOCK_N, BLOCK_D, CAUSAL, True, PRECISION)

    has_keys = l_i > 0.0  # a row that saw no key gets out = 0 and lse = -inf
    out = acc * (1.0 / tl.where(has_keys, l_i, 1.0))[:, None]
    lse2 = tl.where(has_keys, m_i + tl.math.log2(l_i), float("-inf"))  # base 2
    lse_ptrs = lse_ptr + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + rows
    if ACCUMULATE:  # merge with the running (out, lse): weights exp(lse_x - lse_merged)
        prev2 = tl.load(lse_ptrs, mask=rows < seq_q, other=float("-inf")) * TL_LOG2E
        out_prev = o_desc.load([batch, head, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
        top = tl.maximum(prev2, lse2)
        top = tl.where(top == float("-inf"), 0.0, top)  # both empty: weights 0, no NaN
        w_prev = tl.math.exp2(prev2 - top)
        w_blk = tl.math.exp2(lse2 - top)
        total = w_prev + w_blk
        inv = 1.0 / tl.where(total > 0.0, total, 1.0)
        out = out_prev * (w_prev * inv)[:, None] + out * (w_blk * inv)[:, None]
        lse2 = tl.where(total > 0.0, top + tl.math.log2(total), float("-inf"))
    o_desc.store([batch, head, start_m, 0], out.to(o_desc.dtype).reshape(1, 1, BLOCK_M, BLOCK_D))
    tl.store(lse_ptrs, lse2 * TL_LN2, mask=rows < seq_q)


@triton.jit
def _fwd_kernel(q_desc, k_desc, v_desc, o_desc, lse_ptr, stride_lb, stride_lh, qk_scale, seq_q, seq_k,
                heads, group, num_m_blocks, num_tiles, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, ACCUMULATE: tl.constexpr,
                PRECISION: tl.constexpr, PERSISTENT: tl.constexpr):
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            _attend_tile(tile, q_desc, k_desc, v_desc, o_desc, lse_ptr, stride_lb, stride_lh, qk_scale,
                         seq_q, seq_k, heads, group, num_m_blocks, BLOCK_M, BLOCK_N, BLOCK_D, CAUSAL,
                         ACCUMULATE, PRECISION)
    else:
        _attend_tile(tl.program_id(0), q_desc, k_desc, v_desc, o_desc, lse_ptr, stride_lb, stride_lh,
                     qk_scale, seq_q, seq_k, heads, group, num_m_blocks, BLOCK_M, BLOCK_N, BLOCK_D, CAUSAL,
                     ACCUMULATE, PRECISION)


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool,
            cfg: Config, out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
            accumulate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernel with an explicit config on checked, TMA-ready inputs; returns (out, lse).

    Without ``out``/``lse`` they are allocated (out like q). With them, the kernel writes into them,
    or with ``accumulate`` merges its block into what they hold. A config with ``path: "gluon"``
    runs the Gluon kernel (gluon_fwd.py), any other the ``tl`` kernel below.
    """
    batch, seq_q, heads, head_dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(batch, heads, seq_q, device=q.device, dtype=torch.float32)
    if _no_work(q, k, out, lse, accumulate):
        return out, lse
    if cfg.get("path") == "gluon":
        return gluon_fwd.gluon_launch(q, k, v, softmax_scale, causal, _gluon_config(cfg), out, lse, accumulate)
    block_m, block_n, width = cfg["BLOCK_M"], cfg["BLOCK_N"], block_d(head_dim)
    num_m_blocks = triton.cdiv(seq_q, block_m)
    num_tiles = batch * heads * num_m_blocks
    programs = num_tiles
    if cfg["PERSISTENT"]:
        sms = num_sms(q.device) if q.is_cuda else _INTERPRETER_PROGRAMS
        programs = min(num_tiles, sms)
    _fwd_kernel[(programs,)](
        descriptor(q, block_m, width), descriptor(k, block_n, width), descriptor(v, block_n, width),
        descriptor(out, block_m, width), lse, lse.stride(0), lse.stride(1), softmax_scale * LOG2E, seq_q,
        seq_k, heads, heads // kv_heads, num_m_blocks, num_tiles,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=width, CAUSAL=causal, ACCUMULATE=accumulate,
        PRECISION=dot_precision(q.dtype),
        PERSISTENT=cfg["PERSISTENT"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out, lse


def candidate_configs(head_dim: int, dtype: torch.dtype) -> list[Config]:
    """The tuning candidates for one case: FWD_CONFIGS whose Q tile and K/V pipeline fit in shared memory.

    The first entry is always FWD_CONFIGS[0], the tuner's reference. (Every kernel module has a
    ``candidate_configs(head_dim, dtype)``.)
    """
    tile_row_bytes = block_d(head_dim) * torch.empty((), dtype=dtype).element_size()

    def fits(cfg: Config) -> bool:
        rows = cfg["BLOCK_M"] + 2 * cfg["num_stages"] * cfg["BLOCK_N"]
        return rows * tile_row_bytes <= SMEM_BYTES

    return [FWD_CONFIGS[0], *(cfg for cfg in FWD_CONFIGS[1:] if fits(cfg))]


def _no_work(q: torch.Tensor, k: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, accumulate: bool) -> bool:
    """Whether the call has nothing for a kernel: no query (nothing to do), or no key (every row empty:
    out 0, lse -inf unless merging; TMA cannot describe an empty tensor)."""
    if q.numel() == 0:
        return True
    if k.shape[1] == 0:
        if not accumulate:
            out.zero_()
            lse.fill_(float("-inf"))
        return True
    return False


def _gluon_candidates(configs: list[gluon_fwd.GluonConfig]) -> list[Config]:
    """Gluon configs as the tuner's candidates (JSON-able dicts with ``path: "gluon"``)."""
    return [{"path": "gluon", "BLOCK_N": c.block_n, "STAGES": c.stages, "PINGPONG": c.pingpong, "P_SMEM": c.p_smem,
             "CONSUMERS": c.consumers}
            for c in configs]


def _gluon_config(cfg: Config) -> gluon_fwd.GluonConfig:
    """The ``GluonConfig`` of a candidate from ``_gluon_candidates``."""
    return gluon_fwd.GluonConfig(cfg["BLOCK_N"], cfg["STAGES"], cfg["PINGPONG"], cfg["P_SMEM"], cfg["CONSUMERS"])


def _gluon_configs(q: torch.Tensor, out: torch.Tensor | None, path: str) -> list[Config]:
    """The Gluon forward's candidates for this call, or none when it cannot take it (said once when forced)."""
    reason = gluon_fwd.gluon_supported(q, out)
    if reason is not None:
        if path == "gluon":
            warn_once(f"FA3DIST_KERNEL=gluon, but the Gluon forward cannot take this call ({reason}): using tl")
        return []
    return _gluon_candidates(gluon_fwd.GLUON_CONFIGS[q.shape[-1]])


def _choose_config(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool,
                   out: torch.Tensor | None, lse: torch.Tensor | None, accumulate: bool) -> Config:
    if uses_small_config(q):
        return SMALL_CONFIG
    out_dtype = str(q.dtype if out is None else out.dtype).removeprefix("torch.")
    path = kernel_path()
    key = tuning_key("flash_fwd", source_hash(__file__) + source_hash(gluon_fwd.__file__), q, k, causal=causal,
                     out_dtype=out_dtype, accumulate=accumulate, path=path)
    chosen = remembered(key)
    if chosen is not None:
        return chosen

    def trial(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:  # on copies: tuning must not merge twice
        targets = (None, None) if out is None else (out.clone(), lse.clone())
        return _launch(q, k, v, softmax_scale, causal, cfg, *targets, accumulate)

    gluon = [] if path == "tl" else _gluon_configs(q, out, path)
    if path == "gluon" and gluon:  # forced: the safe tl config checks the Gluon ones and is not chosen
        return pick_config(key, [FWD_CONFIGS[0], *gluon], trial, reference_only=True)
    return pick_config(key, candidate_configs(q.shape[3], q.dtype) + gluon, trial)


def _check_out(q: torch.Tensor, out: torch.Tensor | None, lse: torch.Tensor | None, accumulate: bool,
               out_dtypes: tuple[torch.dtype, ...] | None = None) -> None:
    """Check caller-given output buffers: both or neither, shaped like q and (B, H, Sq), TMA-addressable,
    out of ``out_dtypes`` (default: q's dtype or float32)."""
    if not isinstance(accumulate, bool):
        raise TypeError(f"accumulate must be a bool, got {type(accumulate).__name__}")
    if out is None and lse is None:
        if accumulate:
            raise ValueError("accumulate=True needs the running out and lse to merge into")
        return
    if out is None or lse is None:
        raise ValueError("out and lse must be given together")
    batch, seq_q, heads, _ = q.shape
    out_dtypes = out_dtypes or (q.dtype, torch.float32)
    if out.shape != q.shape or out.device != q.device or out.dtype not in out_dtypes:
        names = " or ".join(str(d).removeprefix("torch.") for d in dict.fromkeys(out_dtypes))
        raise ValueError(f"out must be shaped like q {tuple(q.shape)} on {q.device} with dtype {names}; "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    if not tma_addressable(out):
        raise ValueError(f"out must be addressable by TMA (unit last stride, 16-byte aligned), got strides {out.stride()}")
    if (tuple(lse.shape) != (batch, heads, seq_q) or lse.dtype != torch.float32 or lse.device != q.device
            or lse.stride(2) != 1):
        raise ValueError(f"lse must be float32 ({batch}, {heads}, {seq_q}) on {q.device} with unit last stride; "
                         f"got {tuple(lse.shape)} {lse.dtype} strides {lse.stride()}")


def flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: float, causal: bool,
              out: torch.Tensor | None = None, lse: torch.Tensor | None = None, accumulate: bool = False,
              q_descale: torch.Tensor | None = None, k_descale: torch.Tensor | None = None,
              v_descale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention forward: out (B, Sq, H, D) like q, and lse float32 (B, H, Sq), natural log.

    q is (B, Sq, H, D), k and v (B, Sk, H_kv, D) with H % H_kv == 0; fp16, bf16 or float32 on CUDA
    (or CPU under TRITON_INTERPRET=1); D a multiple of 8 up to 256. ``causal`` is the top-left mask
    and needs Sq == Sk.

    ``out`` (q's dtype or float32, may be a view) and ``lse`` given: the result goes into them, and
    with ``accumulate=True`` it is merged with the attention they already hold (over other keys),
    exactly as ``fa3dist.ring.merge_block_`` would. Both are returned.

    FP8: float8_e4m3fn q, k and v, each with its float32 descale (``q_descale`` (1,) or (B, H),
    ``k_descale``/``v_descale`` (1,) or (B, H_kv); see ``fp8.quantize_qkv``), give a bfloat16 out
    (or the given bf16/float32 ``out``); see ``_fp8_fwd``.
    """
    descales = fp8.check_fp8_inputs(q, k, v, q_descale, k_descale, v_descale, causal=causal)
    if descales is None:
        check_qkv(q, k, v, causal=causal, dtypes=(torch.float16, torch.bfloat16, torch.float32),
                  max_head_dim=256, head_dim_multiple=8)
    if softmax_scale is None:
        raise TypeError("softmax_scale must be a positive float, got None")
    softmax_scale = resolve_scale(softmax_scale, q.shape[-1])
    if descales is not None:
        return _fp8_fwd(q, k, v, descales, softmax_scale, causal, out, lse, accumulate)
    _check_out(q, out, lse, accumulate)
    check_device(q, "flash_fwd")
    q, k, v = (tma_ready(t) for t in (q, k, v))
    cfg = _choose_config(q, k, v, softmax_scale, causal, out, lse, accumulate)
    note_path("flash_fwd", cfg.get("path", "tl"), "(FA3DIST_KERNEL=%s) q=%s k=%s %s causal=%s accumulate=%s config=%s",
              kernel_path(), tuple(q.shape), tuple(k.shape), q.dtype, causal, accumulate, cfg)
    return _launch(q, k, v, softmax_scale, causal, cfg, out, lse, accumulate)


def _fp8_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descales: tuple[torch.Tensor, ...],
             softmax_scale: float, causal: bool, out: torch.Tensor | None, lse: torch.Tensor | None,
             accumulate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 forward of checked e4m3 inputs with (B, heads) descales.

    On sm_90 (and unless FA3DIST_KERNEL=tl) the Gluon kernel: FP8 Q K^T, P = 2^8 exp(S - m)
    rounded to e4m3 for an FP8 P V, fp32 accumulators. Its P V reads V as a ``fp8.KMajorV`` (keys
    contiguous, in the kernel's order): ``v`` may be one (the ring keeps V so), else ``fp8.kmajor_v``
    makes it first. Elsewhere (the CPU, other GPUs) the ``tl`` kernel in float32 on the dequantized
    inputs, with P unrounded.
    """
    _check_out(q, out, lse, accumulate, (torch.bfloat16, torch.float32))
    if out is None:
        batch, seq_q, heads, _ = q.shape
        out = torch.empty(q.shape, dtype=torch.bfloat16, device=q.device)
        lse = torch.empty(batch, heads, seq_q, device=q.device, dtype=torch.float32)
    reason = None if kernel_path() != "tl" else "FA3DIST_KERNEL=tl"
    reason = reason or gluon_fwd.gluon_supported(q, out)
    if reason is not None and kernel_path() == "gluon":
        warn_once(f"FA3DIST_KERNEL=gluon, but the Gluon FP8 forward cannot take this call ({reason}): "
                  f"using tl on the dequantized inputs")
    if reason is not None:
        note_path("flash_fwd", "tl", "FP8 inputs dequantized to float32 (%s): q=%s k=%s causal=%s", reason,
                  tuple(q.shape), tuple(k.shape), causal)
        qf, kf, vf = fp8.dequantized(q, k, v, descales, torch.float32)
        target = out if out.dtype == torch.float32 else out.float()
        flash_fwd(qf, kf, vf, softmax_scale=softmax_scale, causal=causal, out=target, lse=lse, accumulate=accumulate)
        if target is not out:
            out.copy_(target)
        return out, lse
    check_device(q, "flash_fwd")
    if _no_work(q, k, out, lse, accumulate):
        return out, lse
    q, k = tma_ready(q), tma_ready(k)
    vt = fp8.kmajor_v(v)
    key = tuning_key("flash_fwd_fp8", source_hash(__file__) + source_hash(gluon_fwd.__file__), q, k, causal=causal,
                     out_dtype=str(out.dtype).removeprefix("torch."), accumulate=accumulate, path="gluon")

    def launch(cfg: Config, target: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return gluon_fwd.gluon_launch(q, k, vt, softmax_scale, causal, _gluon_config(cfg), *target, accumulate,
                                      descales=descales)

    cfg = remembered(key)
    if cfg is None:  # P's rounding depends on the key block: the candidates differ by a few e4m3 steps, not 2e-2
        cfg = pick_config(key, _gluon_candidates(gluon_fwd.GLUON_FP8_CONFIGS[q.shape[-1]]),
                          lambda c: launch(c, (out.clone(), lse.clone())), tolerance=5e-2)
    note_path("flash_fwd", "gluon", "FP8 q=%s k=%s causal=%s accumulate=%s config=%s", tuple(q.shape),
              tuple(k.shape), causal, accumulate, cfg)
    return launch(cfg, (out, lse))
