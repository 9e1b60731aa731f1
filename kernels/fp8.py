"""FP8 (e4m3) inputs for the FP8 forward: quantization with descale factors, FA3's incoherent
processing, the input checks of an FP8 call, and a float64 emulation of its numerics.

- ``hadamard_rotate`` / ``hadamard_unrotate``: x -> x R with R = diag(s) H / sqrt(D), s a random
  +-1 vector drawn from a seed and H the (symmetric, Sylvester) Walsh-Hadamard matrix, as one
  matrix product with R (made once per device by the fast Walsh-Hadamard transform ``fwht``). R is
  orthogonal, so rotating Q and K alike leaves Q K^T unchanged while it spreads an outlier of one
  feature over all D of them; V is not rotated, so the attention output is unchanged too.
- ``quantize_fp8``: x ~= x_fp8.float() * descale, with one fp32 descale per tensor, shape (1,),
  or per (batch, head), shape (B, H) for a (B, S, H, D) tensor.
- ``quantize_qkv``: the entry point, returning a frozen ``FP8QKV``.
- ``check_fp8_inputs``: what an FP8 forward checks; it returns every descale as a (B, H_t) view
  (a per-tensor descale with strides (0, 0)), the one form a kernel reads.
- ``attention_p_fp8`` and ``fp8_reference_fwd``: float64 attention that quantizes P to e4m3 before
  the P V product as FA3 does (see ``attention_p_fp8`` for exactly what is emulated).
- ``dequantized_fwd``: the "reference" backend's forward, which also takes e4m3 inputs with their
  descales (dequantized to float32, P unrounded).

Descale convention for the kernel: S = (Q_fp8 K_fp8^T) * q_descale[b, h] * k_descale[b, h // G]
* softmax_scale, and out = (P_fp8 V_fp8) * v_descale[b, h // G] / rowsum, for G = H / H_kv.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .checks import check_qkv
from .reference import _grouped, _probabilities, reference_fwd

log = logging.getLogger("fa3dist.kernels")

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
GRANULARITIES = ("tensor", "head")
# FA3 computes P = exp2(S * scale_log2 - (max * scale_log2 - 8)), i.e. 2^8 exp(S - max) in [0, 256],
# before the e4m3 cast (its softmax's Max_offset = 8 for FP8), and divides the row sum by 2^8.
P_SCALE = 256.0
_QUANTIZABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FP8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                                      "float8_e5m2fnuz") if hasattr(torch, name))


# --- the random Hadamard rotation -------------------------------------------------------------------

def is_power_of_two(n: int) -> bool:
    """Whether ``n`` is a positive power of two (a head dim the rotation takes)."""
    return n > 0 and n & (n - 1) == 0


def check_head_dim(head_dim: int) -> int:
    """``head_dim`` after checking that it is a power of two (the FWHT needs one)."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, int):
        raise TypeError(f"head_dim must be an int, got {type(head_dim).__name__}")
    if head_dim < 1 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim is {head_dim}; the Hadamard rotation needs a power of two (64, 128, 256)")
    return head_dim


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed


def hadamard_signs(head_dim: int, seed: int, *, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """The random +-1 diagonal s of the rotation: (head_dim,), the same for a seed on every device."""
    check_head_dim(head_dim)
    gen = torch.Generator().manual_seed(_check_seed(seed))
    bits = torch.randint(0, 2, (head_dim,), generator=gen)
    return (2 * bits - 1).to(dtype=dtype, device=device)


@functools.cache
def _rotation_on(head_dim: int, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """R = diag(s) H / sqrt(D) as a (D, D) matrix, made once per device: a rotation is then one matrix
    product (a pass over x, where the butterflies of ``fwht`` take log2(D)) and copies nothing from the
    host (a copy to a GPU waits for the work queued on its stream, a host sync). Never modified."""
    signs = hadamard_signs(head_dim, seed, dtype=dtype)
    return (signs[:, None] * fwht(torch.eye(head_dim, dtype=dtype))).to(device)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform along the last dim: x H / sqrt(D), in x's dtype.

    H is the Sylvester Hadamard matrix (H_2n = [[H_n, H_n], [H_n, -H_n]]), symmetric, so the
    transform is its own inverse. D must be a power of two.
    """
    dim = check_head_dim(x.shape[-1])
    lead = x.shape[:-1]
    y = x.reshape(-1, dim)
    half = 1
    while half < dim:
        y = y.view(-1, dim // (2 * half), 2, half)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        half *= 2
    return (y.reshape(*lead, dim) * (1.0 / math.sqrt(dim))).to(x.dtype)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_float(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype in _FP8_DTYPES:
        raise TypeError(f"{name} is already {x.dtype}; pass the unquantized (float16/bfloat16/float32/float64) "
                        f"tensor")
    if x.dtype not in _QUANTIZABLE:
        raise TypeError(f"{name} has dtype {x.dtype}; expected float16, bfloat16, float32 or float64")


def hadamard_rotate(x: torch.Tensor, *, seed: int) -> torch.Tensor:
    """x R along the last dim, R = diag(s) H / sqrt(D) with s = ``hadamard_signs(D, seed)``.

    One matrix product in float32 (float64 for float64 x), returned in that dtype, so that a following
    quantization sees no rounding but the product's. Float32 products follow torch's matmul precision:
    with TF32 allowed ("high") they keep 10 mantissa bits, still far more than e4m3's 3. Rotate q and
    k with one seed; leave v alone.
    """
    _check_float(x, "x")
    work = _work_dtype(x.dtype)
    return x.to(work) @ _rotation_on(check_head_dim(x.shape[-1]), _check_seed(seed), work, x.device)


def hadamard_unrotate(x: torch.Tensor, *, seed: int) -> torch.Tensor:
    """The inverse, x R^T."""
    _check_float(x, "x")
    work = _work_dtype(x.dtype)
    return x.to(work) @ _rotation_on(check_head_dim(x.shape[-1]), _check_seed(seed), work, x.device).T


# --- quantization -------------------------------------------------------------------------------------

def _check_granularity(granularity: str) -> str:
    if not isinstance(granularity, str):
        raise TypeError(f"granularity must be a str, got {type(granularity).__name__}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(map(repr, GRANULARITIES))}; got {granularity!r}")
    return granularity


def _amax(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """max |x| of a checked 4-D tensor per scale group: float32 (1,) or (B, H)."""
    xa = x.abs()
    return (xa.amax().reshape(1) if granularity == "tensor" else xa.amax(dim=(1, 3))).to(torch.float32)


def _quantize(x: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a checked 4-D float tensor with its groups' amax: (fp8 tensor, fp32 descale (1,) or (B, H))."""
    tiny = torch.finfo(torch.float32).tiny
    # An all-zero tensor (or group) gets descale 1: its fp8 values are 0 and so is their dequantization.
    descale = torch.where(amax > 0, (amax / FP8_MAX).clamp_min(tiny), torch.ones_like(amax))
    work = _work_dtype(x.dtype)
    scaled = x.to(work) / _broadcast(descale, x.dim()).to(work)
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), descale


def _check_finite(x: torch.Tensor, name: str) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} has NaN or inf entries; they have no e4m3 scale")


def _broadcast(descale: torch.Tensor, ndim: int) -> torch.Tensor:
    """A (1,) or (B, H) descale viewed so that it broadcasts against (B, S, H, D)."""
    if descale.numel() == 1 and descale.dim() == 1:
        return descale.reshape((1,) * ndim)
    return descale[:, None, :, None]


def quantize_fp8(x: torch.Tensor, *, granularity: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a (B, S, H, D) tensor to float8_e4m3fn with scales.

    Returns ``(x_fp8, descale)``, x ~= x_fp8.float() * descale: ``descale`` is float32, (1,) for
    ``granularity="tensor"`` and (B, H) for ``"head"``, amax / 448 of its group (1 for an all-zero
    group). Values round to nearest (even); the relative error of a normal value is at most 2^-4.
    """
    _check_float(x, "x")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (batch, seq, heads, head_dim), got shape {tuple(x.shape)}")
    _check_finite(x, "x")
    return _quantize(x, _amax(x, _check_granularity(granularity)))


def dequantize_fp8(x_fp8: torch.Tensor, descale: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_fp8 * descale in ``dtype``, for a (B, S, H, D) e4m3 tensor and a (1,) or (B, H) descale."""
    if not isinstance(x_fp8, torch.Tensor) or x_fp8.dtype != FP8_DTYPE:
        raise TypeError(f"x_fp8 must be a float8_e4m3fn tensor, got {getattr(x_fp8, 'dtype', type(x_fp8).__name__)}")
    if x_fp8.dim() != 4:
        raise ValueError(f"x_fp8 must be 4-D (batch, seq, heads, head_dim), got shape {tuple(x_fp8.shape)}")
    _check_descale(descale, "descale", x_fp8, "x_fp8")
    return x_fp8.to(dtype) * _broadcast(descale, 4).to(dtype)


@dataclass(frozen=True)
class FP8QKV:
    """q, k, v in float8_e4m3fn with their fp32 descales, as an FP8 forward takes them.

    ``q_descale`` is (1,) or (B, H); ``k_descale`` and ``v_descale`` (1,) or (B, H_kv).
    ``rotation_seed`` is the seed of the Hadamard rotation applied to q and k, None without one.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_descale: torch.Tensor
    k_descale: torch.Tensor
    v_descale: torch.Tensor
    granularity: str
    rotation_seed: int | None

    @property
    def incoherent(self) -> bool:
        return self.rotation_seed is not None


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, granularity: str = "tensor",
                 incoherent: bool = False, seed: int = 0,
                 share_amax: Callable[[torch.Tensor], torch.Tensor] | None = None) -> FP8QKV:
    """Quantize q (B, S, H, D) and k, v (B, S_k, H_kv, D) to e4m3 with descales.

    With ``incoherent=True`` q and k are first rotated by ``hadamard_rotate(., seed=seed)`` (in
    float32, without rounding in between), which needs D a power of two; v is never rotated. The
    rotation leaves Q K^T, and so the attention output, unchanged.

    ``share_amax`` (for shards of one sequence, e.g. the ring's) maps this call's amaxes, all in
    one float32 vector, to those the scales are to be taken from (the max over every shard), so
    that every shard gets the scales of the whole sequence. It also skips the NaN/inf check, which
    reads values on the host (a device sync); a NaN or inf then makes the output NaN. Nothing else
    here reads the device on the host (the rotation's signs are made once per device).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float(t, name)
    check_qkv(q, k, v, causal=False, dtypes=_QUANTIZABLE)
    _check_granularity(granularity)
    if not isinstance(incoherent, bool):
        raise TypeError(f"incoherent must be a bool, got {type(incoherent).__name__}")
    _check_seed(seed)
    if share_amax is None:
        for name, t in (("q", q), ("k", k), ("v", v)):
            _check_finite(t, name)
    if incoherent:
        check_head_dim(q.shape[-1])
        q, k = hadamard_rotate(q, seed=seed), hadamard_rotate(k, seed=seed)
    amaxes = [_amax(t, granularity) for t in (q, k, v)]
    if share_amax is not None:
        shared = share_amax(torch.cat([a.flatten() for a in amaxes]))
        amaxes = [part.view(a.shape) for part, a in zip(shared.split([a.numel() for a in amaxes]), amaxes)]
    (q8, qd), (k8, kd), (v8, vd) = (_quantize(t, amax) for t, amax in zip((q, k, v), amaxes))
    if log.isEnabledFor(logging.DEBUG):  # .item() reads the device: only when the message is wanted
        log.debug("quantize_qkv: %s scales, incoherent=%s, q_descale max %.3g, k_descale max %.3g, "
                  "v_descale max %.3g", granularity, incoherent, qd.max().item(), kd.max().item(), vd.max().item())
    return FP8QKV(q8, k8, v8, qd, kd, vd, granularity, seed if incoherent else None)


# --- V as the FP8 kernel reads it ------------------------------------------------------------------------

KEY_GROUP = 32  # V's keys are permuted within groups of this many (kmajor_v)


def key_order(seq: int, device: torch.device | str | None = None) -> torch.Tensor:
    """For every stored key position of a ``KMajorV`` (``seq`` rounded up to 32 of them), the key it
    holds: within each group of 32, position 16a + 4t + 2b + r holds key 16a + 8b + 2t + r (a, b, r
    in {0, 1}, t in 0..3). The order is its own kind of inverse: swap the roles of (t, b) back.

    That is where the FP8 kernel's P V product finds its keys: the S accumulator gives thread t of a
    quad the keys 8g + 2t + {0, 1} of each 8-key group g, and the 8-bit wgmma A operand wants keys
    4t..4t+3 and 16+4t..16+4t+3 of each 32 in that thread. Relabelling P's keys by this order (a
    reshape and permute in the kernel, no data movement) and storing V's keys alike gives the same
    product without a register shuffle or a trip through shared memory.
    """
    pos = torch.arange(-(-seq // KEY_GROUP) * KEY_GROUP, device=device)
    group, a, t, b, r = pos // 32, pos // 16 % 2, pos // 4 % 4, pos // 2 % 2, pos % 2
    return group * 32 + 16 * a + 8 * b + 2 * t + r


def _key_positions(seq: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The inverse of ``key_order``: the stored position of every key."""
    key = torch.arange(-(-seq // KEY_GROUP) * KEY_GROUP, device=device)
    group, a, b, t, r = key // 32, key // 16 % 2, key // 8 % 2, key // 2 % 4, key % 2
    return group * 32 + 16 * a + 4 * t + 2 * b + r


@dataclass(frozen=True)
class KMajorV:
    """V (B, S, H_kv, D) in e4m3 as the FP8 kernel reads it: ``storage`` is (B, H_kv, D, S') with the
    keys contiguous (8-bit wgmma takes its B operand K-major only) and ordered by ``key_order``
    within every 32; S' is ``seq`` rounded up to 32, the padding zeros. Build it with ``kmajor_v``."""

    storage: torch.Tensor
    seq: int

    @property
    def device(self) -> torch.device:
        return self.storage.device

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    @property
    def shape(self) -> torch.Size:
        """The logical (B, S, H_kv, D) shape."""
        batch, heads, dim, _ = self.storage.shape
        return torch.Size((batch, self.seq, heads, dim))

    def keys(self, rows: slice) -> KMajorV:
        """Keys ``rows`` (a step-1 slice) of V: a view when the slice starts on a group of 32, else a copy.

        A view ending inside a group keeps that group's other keys in storage: the kernel masks every
        key past ``seq`` (its P is 0), so they add nothing as long as they are finite, which e4m3 values
        quantized from finite inputs are (e4m3fn has no inf; its NaN comes only from a NaN input).
        """
        start, stop, step = rows.indices(self.seq)
        if step != 1:
            raise ValueError(f"rows must be a slice with step 1, got {rows}")
        if start % KEY_GROUP:
            return kmajor_v(self.to_bshd()[:, start:stop])
        end = min(-(-stop // KEY_GROUP) * KEY_GROUP, self.storage.shape[-1])
        return KMajorV(self.storage[..., start:end], stop - start)

    def to_bshd(self) -> torch.Tensor:
        """V back in (B, S, H_kv, D) (a copy)."""
        positions = _key_positions(self.seq, self.storage.device)[:self.seq]
        bytes_ = self.storage.view(torch.uint8).index_select(-1, positions)
        return bytes_.view(self.storage.dtype).permute(0, 3, 1, 2).contiguous()


def kmajor_v(v: torch.Tensor | KMajorV) -> KMajorV:
    """V (B, S, H, D) in the FP8 kernel's layout (``KMajorV``); a ``KMajorV`` as it is. The copy
    reads and writes V once (B S H D bytes each way) and does not sync with the GPU."""
    if isinstance(v, KMajorV):
        return v
    seq = v.shape[1]
    order = key_order(seq, v.device)
    keys_last = v.permute(0, 2, 3, 1).contiguous().view(torch.uint8)  # e4m3 +0 is byte 0: pad with it
    padded = torch.nn.functional.pad(keys_last, (0, order.numel() - seq))
    return KMajorV(padded.index_select(-1, order).view(v.dtype), seq)


# --- the checks of an FP8 call --------------------------------------------------------------------------

def _check_descale(descale: torch.Tensor | None, name: str, like: torch.Tensor, tensor: str) -> None:
    if descale is None:
        raise ValueError(f"{name} is None; float8_e4m3fn {tensor} needs its descale factor "
                         f"(float32, shape (1,) or (B, heads))")
    if not isinstance(descale, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(descale).__name__}")
    if descale.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {descale.dtype}")
    per_head = (like.shape[0], like.shape[2])
    if tuple(descale.shape) not in ((1,), per_head):
        raise ValueError(f"{name} must have shape (1,) or (B, heads) = {per_head}, got {tuple(descale.shape)}")
    if descale.device != like.device:
        raise ValueError(f"{name} is on {descale.device}; expected {tensor}'s device {like.device}")


def check_fp8_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | KMajorV, q_descale: torch.Tensor | None,
                     k_descale: torch.Tensor | None, v_descale: torch.Tensor | None, *,
                     causal: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Check the inputs of a forward that may be FP8.

    Without fp8 tensors and descales it returns None (the 16-bit path). FP8 needs q, k and v all
    float8_e4m3fn, each with a float32 descale of shape (1,) or (B, its heads); it returns the
    three descales as (B, H) and (B, H_kv) views (per-tensor ones with strides (0, 0)). ``v`` may be
    a ``KMajorV``. Values are not read, so the check does not sync with a GPU.
    """
    if isinstance(v, KMajorV):
        if v.shape != k.shape or v.device != k.device:
            raise ValueError(f"v (a KMajorV of shape {tuple(v.shape)} on {v.device}) must match k "
                             f"{tuple(k.shape)} on {k.device}")
    tensors = {"q": q, "k": k, "v": v}
    descales = {"q_descale": q_descale, "k_descale": k_descale, "v_descale": v_descale}
    is_fp8 = {name: isinstance(t, (torch.Tensor, KMajorV)) and t.dtype in _FP8_DTYPES for name, t in tensors.items()}
    if not any(is_fp8.values()):
        given = [name for name, d in descales.items() if d is not None]
        if given:
            raise ValueError(f"{', '.join(given)} given for {getattr(q, 'dtype', None)} inputs; descale factors go "
                             f"with float8_e4m3fn q, k and v only")
        return None
    if not all(is_fp8.values()) or any(t.dtype != FP8_DTYPE for t in tensors.values()):
        got = ", ".join(f"{name} {getattr(t, 'dtype', type(t).__name__)}" for name, t in tensors.items())
        raise TypeError(f"the FP8 forward needs q, k and v all float8_e4m3fn; got {got}")
    check_qkv(q, k, k if isinstance(v, KMajorV) else v, causal=causal, dtypes=(FP8_DTYPE,))
    for (name, descale), (tensor, t) in zip(descales.items(), tensors.items()):
        _check_descale(descale, name, t, tensor)
    return tuple(d.expand(t.shape[0], t.shape[2]) for d, t in zip(descales.values(), tensors.values()))


# --- float64 emulation -------------------------------------------------------------------------------

def _e4m3(x: torch.Tensor) -> torch.Tensor:
    """x rounded to e4m3 (nearest, saturating at 448), back in x's dtype."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).to(x.dtype)


def attention_p_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: float, causal: bool,
                    block_n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention in float64 with P quantized to e4m3 before the P V product, as FA3's FP8 forward.

    Emulated, per query row and key block j (in order 0, 1, ..., as our kernels walk them):
    m_j = the running max of the scores over blocks 0..j; P_j = 256 exp(S_j - m_j) in [0, 256]
    (FA3's offset of 8 in exp2), rounded to e4m3; O = sum_j exp(m_j - m) P_j^fp8 V_j and
    out = O / l with l = sum of the unrounded 256 exp(S - m) (the row sum is taken before the cast,
    in the kernels too); m is the row's max. ``block_n=None`` uses the whole row as one block
    (m_j = m). Not emulated: the fp32 (and on Hopper, narrower) accumulation of the fp8 products,
    exp2 and rescaling in fp32, and the bf16 rounding of out: everything else is float64.

    q, k, v: float tensors in the flash-attn layout (GQA allowed); returns out (B, Sq, H, D) and
    lse (B, H, Sq), both float64; lse is that of the unquantized P.
    """
    check_qkv(q, k, v, causal=causal)
    if block_n is not None and (isinstance(block_n, bool) or not isinstance(block_n, int) or block_n < 1):
        raise ValueError(f"block_n must be a positive int or None, got {block_n!r}")
    batch, seq_q, heads, head_dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    f64 = torch.float64
    p, lse = _probabilities(_grouped(q, kv_heads, f64), k.to(f64), softmax_scale, causal, None)
    # p = exp(S - lse); its running max over blocks is exp(m_j - lse), so p / that = exp(S - m_j).
    block = seq_k if block_n is None else min(block_n, seq_k)
    blocks = -(-seq_k // block)
    padded = torch.nn.functional.pad(p, (0, blocks * block - seq_k)).unflatten(-1, (blocks, block))
    running = padded.amax(-1).cummax(-1).values  # exp(m_j - lse), (..., Sq, blocks)
    final = running[..., -1:]                     # exp(m - lse)
    safe = torch.where(running > 0, running, torch.ones_like(running))
    p_fp8 = _e4m3(P_SCALE * padded / safe.unsqueeze(-1))
    weighted = (p_fp8 * (running / final.clamp_min(1e-300)).unsqueeze(-1)).flatten(-2)[..., :seq_k]
    row_sum = P_SCALE * p.sum(-1) / final.squeeze(-1).clamp_min(1e-300)  # sum of 256 exp(S - m)
    out = torch.einsum("bhgqk,bkhd->bqhgd", weighted, v.to(f64))
    out = out / row_sum.permute(0, 3, 1, 2).unsqueeze(-1).clamp_min(1e-300)
    return out.reshape(batch, seq_q, heads, head_dim), lse.reshape(batch, heads, seq_q)


def dequantized(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | KMajorV, descales: tuple[torch.Tensor, ...],
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_fp8 * descale of checked e4m3 q, k, v (v may be a ``KMajorV``) with their (B, heads) descales
    (``check_fp8_inputs``), in ``dtype``."""
    v = v.to_bshd() if isinstance(v, KMajorV) else v
    return tuple(t.to(dtype) * d.to(dtype)[:, None, :, None] for t, d in zip((q, k, v), descales))


def fp8_reference_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_descale: torch.Tensor,
                      k_descale: torch.Tensor, v_descale: torch.Tensor, *, softmax_scale: float, causal: bool,
                      quantize_p: bool = True, block_n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 oracle of the FP8 forward: dequantize e4m3 q, k, v and run ``attention_p_fp8``.

    ``quantize_p=False`` keeps P exact (only the inputs' quantization then counts). Returns out
    and lse in float64. q and k from ``quantize_qkv(incoherent=True)`` stay rotated: Q K^T is the
    same.
    """
    descales = check_fp8_inputs(q, k, v, q_descale, k_descale, v_descale, causal=causal)
    if descales is None:
        raise TypeError(f"q, k and v must be float8_e4m3fn, got {q.dtype}")
    qf, kf, vf = dequantized(q, k, v, descales, torch.float64)
    if not quantize_p:
        return reference_fwd(qf, kf, vf, softmax_scale=softmax_scale, causal=causal)
    return attention_p_fp8(qf, kf, vf, softmax_scale=softmax_scale, causal=causal, block_n=block_n)


# --- the reference backend's forward -------------------------------------------------------------------

def dequantized_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: float, causal: bool,
                    q_descale: torch.Tensor | None = None, k_descale: torch.Tensor | None = None,
                    v_descale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference_fwd``, which also takes float8_e4m3fn q, k, v with their descales (as ``flash_fwd``).

    16-bit (or float32/float64) inputs without descales: ``reference_fwd`` as it is. FP8 inputs (v
    may be a ``KMajorV``) are dequantized to float32 (x_fp8 * descale) and attended in float32 with P unrounded: out and lse
    are float32. The out is not rounded to the kernel's bf16, so that a ring of such blocks merges
    to the single-device result up to float32 rounding (the ring rounds once, at its end).
    """
    descales = check_fp8_inputs(q, k, v, q_descale, k_descale, v_descale, causal=causal)
    if descales is not None:
        q, k, v = dequantized(q, k, v, descales, torch.float32)
    return reference_fwd(q, k, v, softmax_scale=softmax_scale, causal=causal)
