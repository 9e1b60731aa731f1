"""Public attention functions: one device (``fa3_attention``) and a sequence-parallel ring
(``ring_fa3_attention``), both differentiable in q, k and v. They call the custom ops of
``fa3dist.ops``, which ``torch.compile`` keeps in its graph; the checks of a ring call run inside
the op (``check_ring_call``), so that every rank takes part in the rank exchange. With
``fp8=True`` both run the FP8 forward instead (``fa3dist.ring.ring_forward_fp8``): forward only,
eager only."""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from .groups import check_head_group
from .kernels import Backend, get_backend
from .kernels.checks import check_qkv, resolve_scale
from .kernels.fp8 import FP8_DTYPE
from .layout import check_layout
from .ops import LOCAL, attention_op, group_name, resolve_ring
from .ring import LoopbackRing, Ring, ring_backward, ring_forward, ring_forward_fp8
from .ring.agree import CallSignature, check_ranks_agree


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring: Ring, backend: Backend, softmax_scale: float, causal: bool, layout: str):
        out, lse = ring_forward(q, k, v, ring, backend=backend, softmax_scale=softmax_scale,
                                causal=causal, layout=layout)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (ring, backend, softmax_scale, causal, layout)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        ring, backend, softmax_scale, causal, layout = ctx.options
        dq, dk, dv = ring_backward(dout.contiguous(), q, k, v, out, lse, ring, backend=backend,
                                   softmax_scale=softmax_scale, causal=causal, layout=layout)
        return dq, dk, dv, None, None, None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: Ring, *, causal: bool,
              softmax_scale: float, layout: str, backend: Backend) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable ring attention on an explicit ``Ring`` (no checks): returns (out, lse).

    This is the entry for benchmarks that run the schedule on a loopback or virtual ring.
    """
    return _RingAttention.apply(q, k, v, ring, backend, softmax_scale, causal, layout)


def _check_options(causal: bool, return_lse: bool, layout: str, fp8: bool = False) -> None:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    if not isinstance(fp8, bool):
        raise TypeError(f"fp8 must be a bool, got {type(fp8).__name__}")
    check_layout(layout)


def _check_forward_only(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """fp8=True has no backward: refuse inputs that autograd would differentiate."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("fp8=True is forward-only (there is no FP8 backward; training stays bf16), but q, k or v "
                         "requires grad: call it under torch.no_grad() or pass detached tensors")


_FP8_NOT_COMPILED = ("fp8=True does not run under torch.compile: the FP8 forward is no custom op (call it "
                     "outside the compiled region)")


@functools.partial(torch.compiler.disable, reason=_FP8_NOT_COMPILED)
def _fp8_is_not_compiled() -> None:
    """Raise at run time (a ``raise`` that dynamo traces only breaks the graph, and eager runs on);
    with ``fullgraph=True`` dynamo refuses to call it, giving the reason."""
    raise NotImplementedError(_FP8_NOT_COMPILED)


def _refuse_fp8_under_compile() -> None:
    if torch.compiler.is_compiling():
        _fp8_is_not_compiled()


def _kernel_dtype(q: torch.Tensor, fp8: bool) -> torch.dtype:
    """The dtype the kernel sees, which picks the backend "auto" stands for."""
    return FP8_DTYPE if fp8 else q.dtype


def fa3_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                  softmax_scale: float | None = None, backend: str = "auto", return_lse: bool = False,
                  fp8: bool = False):
    """Exact attention on one device.

    q: (B, Sq, H, D); k, v: (B, Sk, H_kv, D) with H % H_kv == 0. ``causal`` is the top-left mask
    and needs Sq == Sk. ``softmax_scale`` defaults to 1/sqrt(D). Returns out (like q), and with
    ``return_lse`` also the float32 log-sum-exp (B, H, Sq) (natural log, not differentiable).

    ``fp8=True``: the FP8 forward, the single-device equivalent of ``ring_fa3_attention(fp8=True)``
    (see there): q, k, v quantized to e4m3 with per-head scales (``fa3dist.ring.quantize_for_ring``;
    NaN/inf inputs raise), out bfloat16, lse float32. Forward only (a ValueError when autograd would
    need a backward), not under ``torch.compile`` (NotImplementedError); ``backend`` must take FP8:
    "triton" ("auto" on CUDA) or "reference" ("auto" on the CPU; P unrounded).
    """
    _check_options(causal, return_lse, "zigzag", fp8)
    check_qkv(q, k, v, causal=causal)
    scale = resolve_scale(softmax_scale, q.shape[-1])
    kernels = get_backend(backend, q.device, _kernel_dtype(q, fp8))  # an unknown or unusable backend fails here
    if fp8:
        _refuse_fp8_under_compile()
        _check_forward_only(q, k, v)
        out, lse = ring_forward_fp8(q, k, v, LoopbackRing(0, 1), backend=kernels, softmax_scale=scale, causal=causal,
                                    layout="zigzag")
    elif torch.compiler.is_compiling():  # the custom op keeps attention in the graph
        out, lse = attention_op(q, k, v, causal, scale, "zigzag", backend, LOCAL)
    else:  # the op's dispatch costs ~0.1 ms a call in eager mode: call what it calls
        out, lse = attention(q, k, v, LoopbackRing(0, 1), causal=causal, softmax_scale=scale, layout="zigzag",
                             backend=kernels)
    return (out, lse) if return_lse else out


def _ring_world_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _check_ring_inputs(q, k, v, *, causal, softmax_scale, group, layout, backend, return_lse, fp8,
                       world_size: int) -> tuple[float, Backend]:
    """This rank's own checks of a ring call: raise TypeError/ValueError, else (scale, backend)."""
    _check_options(causal, return_lse, layout, fp8)
    check_qkv(q, k, v, causal=causal)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"q has {q.shape[1]} local tokens and k/v have {k.shape[1]}; the ring needs "
                         "q, k and v sharded alike")
    if fp8:
        _check_forward_only(q, k, v)
    scale = resolve_scale(softmax_scale, q.shape[-1])
    kernels = get_backend(backend, q.device, _kernel_dtype(q, fp8))
    if world_size > 1:
        pg_backend = dist.get_backend(group)
        needed = "cpu" if pg_backend == "gloo" else "cuda"
        if q.device.type != needed:
            raise ValueError(f"q is on {q.device} but the process group's backend {pg_backend!r} "
                             f"needs tensors on {needed}")
        if layout == "zigzag" and q.shape[1] % 2:
            raise ValueError(f"layout 'zigzag' needs an even local sequence length (two chunks per rank); "
                             f"got {q.shape[1]}")
    return scale, kernels


def check_ring_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                    softmax_scale: float | None, group: dist.ProcessGroup | None, layout: str, backend: str,
                    return_lse: bool = False, head_group: dist.ProcessGroup | None = None,
                    fp8: bool = False) -> tuple[float, Backend]:
    """Every check of a ``ring_fa3_attention`` call; returns (softmax_scale, backend) resolved.
    ``head_group``: the group of the all-to-all (``fa3dist.ulysses``), None for the flat ring.
    ``fp8``: the FP8 forward (the backend is resolved for float8_e4m3fn; inputs must not need grad).

    With more than one rank, every rank of ``group`` must call it, and every rank gets the same
    error when any rank's own check fails or the ranks disagree on shapes, dtype or options. That
    exchange runs on the host over a gloo group and never waits on a device (``check_ranks_agree``).
    Reads only the tensors' metadata.
    """
    world_size = _ring_world_size(group)
    signature, error = None, None
    try:
        scale, kernels = _check_ring_inputs(q, k, v, causal=causal, softmax_scale=softmax_scale, group=group,
                                            layout=layout, backend=backend, return_lse=return_lse, fp8=fp8,
                                            world_size=world_size)
        head_size = 1 if head_group is None else check_head_group(q.shape[2], k.shape[2], group, head_group)
        signature = CallSignature.of(q, k, causal=causal, layout=layout, softmax_scale=scale, backend=kernels.name,
                                     head_group_size=head_size, fp8=fp8)
    except (TypeError, ValueError) as err:
        if world_size == 1:
            raise
        error = err
    if world_size > 1:
        check_ranks_agree(signature, error, group)  # raises on every rank, or on none
    return scale, kernels


def ring_fa3_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                       softmax_scale: float | None = None, group: dist.ProcessGroup | None = None,
                       head_group: dist.ProcessGroup | None = None, scheme: str | None = None,
                       layout: str = "zigzag", backend: str = "auto", return_lse: bool = False,
                       fp8: bool = False):
    """Exact sequence-parallel attention over the ranks of ``group`` (None: the default group).

    Each rank passes its own shard (see ``shard_sequence``) of q (B, S/W, H, D) and k, v
    (B, S/W, H_kv, D), all sharded with the same ``layout`` ("zigzag" or "contiguous"). The result
    is this rank's shard of the attention output over the whole sequence; with ``return_lse`` also
    its float32 log-sum-exp (B, H, S/W). Without an initialised process group, or with one rank,
    it runs the local kernel. Differentiable in q, k and v. A bad input on any rank, or ranks that
    disagree, raise the same error on every rank (only arguments of the wrong type for the op, such
    as a non-tensor q, fail at once on the rank that passed them).

    ``head_group`` (this rank's node, e.g. from ``make_cp_groups``) and ``scheme`` choose how the
    ranks share the work (``fa3dist.ulysses``): "flat" (the default without ``head_group``) is the
    ring over ``group``; "ulysses" an all-to-all from sequence to head shards over ``group``;
    "hierarchical" (the default with ``head_group``) the all-to-all inside ``head_group`` and the
    ring across head groups; "auto" the one ``fa3dist.plan`` predicts fastest. The shards passed
    and returned are the same for every scheme. ``torch.compile`` traces the flat ring only.

    ``fp8=True`` runs the FP8 forward (``fa3dist.ring.ring_forward_fp8``), for inference: each rank
    quantizes its q, k, v (fp16/bf16/fp32) once to e4m3 with per-head scales, after the Hadamard
    rotation of q and k when D is a power of two (``fa3dist.ring.quantize_for_ring``); the scales
    are those of the whole sequence, their amaxes maxed over the ring itself (W - 1 hops of a few
    floats, no host sync), so the result is ``fa3_attention(fp8=True)`` of the whole sequence up to
    the kernel's per-block rounding of P (backend "reference", P unrounded: up to float32
    rounding, before both round to bf16). K and V travel in e4m3, half the bytes of bf16. Out is bfloat16, the lse float32. Forward only: a
    ValueError when autograd would need a backward (use ``torch.no_grad()`` or detach); the flat
    ring only and not under ``torch.compile`` (NotImplementedError); the backend must take FP8
    ("triton", "auto" on CUDA; "reference", "auto" on the CPU), else a ValueError naming those
    that do. Ranks that disagree on ``fp8`` raise the same error on every rank. NaN/inf inputs
    are not checked on a ring (it would sync): they make the output NaN. On a GPU the rotation is a
    float32 matrix product (TF32 when torch's float32 matmul precision allows it), whose last bits
    may depend on the shard's shape, so a value on a rounding boundary may round one e4m3 step
    away from the single-device one. Zigzag: V travels in the kernel's layout (``fp8.KMajorV``,
    keys permuted inside every 32); the ring's only K/V row slice, the first half [0, S/2) of the
    local S tokens, starts at 0 and is a view for every S (``KMajorV.keys`` copies a slice that
    starts inside a group of 32).
    """
    if isinstance(fp8, bool) and fp8:  # a non-bool fp8 fails the checks below, on every rank
        return _ring_fp8(q, k, v, causal=causal, softmax_scale=softmax_scale, group=group, head_group=head_group,
                         scheme=scheme, layout=layout, backend=backend, return_lse=return_lse)
    if head_group is None and scheme in (None, "flat"):
        name = group_name(group)
        if torch.compiler.is_compiling():  # the custom op keeps attention in the graph and checks when it runs
            _check_options(causal, return_lse, layout, fp8)
            out, lse = attention_op(q, k, v, causal, softmax_scale, layout, backend, name)
        else:  # the same checks and ring functions without the op's dispatch (~0.1 ms a call)
            scale, kernels = check_ring_call(q, k, v, causal=causal, softmax_scale=softmax_scale, group=group,
                                             layout=layout, backend=backend, return_lse=return_lse, fp8=fp8)
            ring = resolve_ring(name, q, k, v, causal, scale, layout, backend, check=False)[0]
            out, lse = attention(q, k, v, ring, causal=causal, softmax_scale=scale, layout=layout, backend=kernels)
        return (out, lse) if return_lse else out
    if torch.compiler.is_compiling():
        raise NotImplementedError("torch.compile traces the flat ring only: the all-to-all schemes (head_group, "
                                  "scheme='ulysses'/'hierarchical'/'auto') are not custom ops yet")
    from .ulysses import all_to_all_group, hierarchical_attention

    try:
        head_group = all_to_all_group(scheme, q, k, causal=causal, group=group, head_group=head_group, layout=layout)
    except (TypeError, ValueError) as err:
        if _ring_world_size(group) == 1:
            raise
        check_ranks_agree(None, err, group)  # the other ranks' checks raise this error with it
    scale, kernels = check_ring_call(q, k, v, causal=causal, softmax_scale=softmax_scale, group=group,
                                     layout=layout, backend=backend, return_lse=return_lse, head_group=head_group,
                                     fp8=fp8)
    if head_group is not None:
        return hierarchical_attention(q, k, v, causal=causal, softmax_scale=scale, group=group, head_group=head_group,
                                      layout=layout, backend=kernels, return_lse=return_lse)
    ring = resolve_ring(group_name(group), q, k, v, causal, scale, layout, backend, check=False)[0]  # "auto" chose flat
    out, lse = attention(q, k, v, ring, causal=causal, softmax_scale=scale, layout=layout, backend=kernels)
    return (out, lse) if return_lse else out


def _ring_fp8(q, k, v, *, causal, softmax_scale, group, head_group, scheme, layout, backend, return_lse):
    """``ring_fa3_attention(fp8=True)``: the checks with the rank exchange, then the FP8 ring forward."""
    if head_group is not None or scheme not in (None, "flat"):
        raise NotImplementedError(f"fp8=True runs the flat ring only (head_group None, scheme None or 'flat'); "
                                  f"got head_group={'a group' if head_group is not None else None}, scheme={scheme!r}")
    _refuse_fp8_under_compile()
    scale, kernels = check_ring_call(q, k, v, causal=causal, softmax_scale=softmax_scale, group=group, layout=layout,
                                     backend=backend, return_lse=return_lse, fp8=True)
    ring = resolve_ring(group_name(group), q, k, v, causal, scale, layout, kernels.name, check=False)[0]
    out, lse = ring_forward_fp8(q, k, v, ring, backend=kernels, softmax_scale=scale, causal=causal, layout=layout)
    return (out, lse) if return_lse else out
