"""The FP8 ring forward on the CPU: virtual rings (threads) at W = 1..4 and a gloo ring of 2 processes
against the single-device FP8 forward and float64 attention, the shared amaxes, what travels, and the
errors of calls the FP8 forward does not take."""

from __future__ import annotations

import dataclasses
import functools
import threading

import pytest
import torch

from fa3dist import fa3_attention, ring_fa3_attention, shard_sequence
from fa3dist.kernels import fp8, get_backend
from fa3dist.kernels.numerics import relative_error
from fa3dist.kernels.reference import reference_fwd
from fa3dist.kernels.registry import auto_backend_name, fp8_backend_names
from fa3dist.kernels.tma import tma_addressable
from fa3dist.ring import LoopbackRing, quantize_for_ring, ring_amax, ring_forward, ring_forward_fp8, run_thread_ring
from fa3dist.ring.agree import CallSignature
from tests import ring_cases
from tests.multiproc import run_ranks, same_on_every_rank

SCALE = 0.3
LAYOUTS = [("zigzag", True), ("zigzag", False), ("contiguous", True), ("contiguous", False)]


def _inputs(seq: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, seed: int):
    """q, k, v whose magnitude grows along the sequence, so that every shard has its own amaxes."""
    gen = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.5, 1.5, seq, dtype=torch.float64)[None, :, None, None]
    q = torch.randn(1, seq, heads, dim, dtype=torch.float64, generator=gen) * ramp
    k, v = (torch.randn(1, seq, kv_heads, dim, dtype=torch.float64, generator=gen) * ramp for _ in range(2))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _sharder(world_size: int, rank: int, layout: str):
    def shard(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return shard_sequence(x, world_size=world_size, rank=rank, layout=layout, seq_dim=dim)
    return shard


def _serialized(backend):
    """The backend with its forward behind a lock: the Triton interpreter is not thread-safe (on a GPU the
    virtual ranks' kernels run one after another too)."""
    lock = threading.Lock()

    def fwd(*args, **kwargs):
        with lock:
            return backend.fwd(*args, **kwargs)

    return dataclasses.replace(backend, fwd=fwd)


def _truth(q, k, v, causal):
    return reference_fwd(q.double(), k.double(), v.double(), softmax_scale=SCALE, causal=causal)[0]


# --- virtual rings ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 16), (2, 1, 24)], ids=["gqa-d16", "mqa-d24"])
@pytest.mark.parametrize("layout,causal", LAYOUTS, ids=[f"{lay}-{'causal' if c else 'full'}" for lay, c in LAYOUTS])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_reference_ring_is_the_single_device_fp8_forward(world_size, layout, causal, heads, kv_heads, dim):
    """Reference backend (P unrounded): the ring's unrounded out and its lse equal the single-device ones up
    to float32 rounding; its bf16 out is that out rounded; and both are close to float64 attention of the
    unquantized inputs (D = 16 takes the Hadamard rotation, D = 24 does not)."""
    q, k, v = _inputs(8 * world_size, heads, kv_heads, dim, torch.bfloat16, seed=world_size)
    backend = get_backend("reference")
    single32, single_lse = ring_forward_fp8(q, k, v, LoopbackRing(0, 1), backend=backend, softmax_scale=SCALE,
                                            causal=causal, layout=layout, out_dtype=torch.float32)
    public, public_lse = fa3_attention(q, k, v, causal=causal, softmax_scale=SCALE, backend="reference",
                                       return_lse=True, fp8=True)
    assert public.dtype == torch.bfloat16 and public_lse.dtype == torch.float32
    assert torch.equal(public, single32.to(torch.bfloat16)) and torch.equal(public_lse, single_lse)
    truth = _truth(q, k, v, causal)

    def rank_fn(ring):
        shard = _sharder(world_size, ring.rank, layout)
        local = (shard(q), shard(k), shard(v))
        opts = dict(backend=backend, softmax_scale=SCALE, causal=causal, layout=layout)
        out32, lse = ring_forward_fp8(*local, ring, **opts, out_dtype=torch.float32)
        out, lse16 = ring_forward_fp8(*local, ring, **opts)
        assert out.dtype == torch.bfloat16 and lse.dtype == lse16.dtype == torch.float32
        assert torch.equal(out, out32.to(torch.bfloat16)) and torch.equal(lse, lse16)
        return (relative_error(out32, shard(single32)), relative_error(lse, shard(single_lse, 2)),
                relative_error(out, shard(truth)), relative_error(shard(public), shard(truth)))

    for rank, (err, err_lse, err_truth, err_single_truth) in enumerate(run_thread_ring(rank_fn, world_size)):
        assert err < 1e-6 and err_lse < 1e-6, (rank, err, err_lse)
        assert err_truth < 0.1 and err_single_truth < 0.1, (rank, err_truth, err_single_truth)


# (world size, layout, causal, input dtype): the Triton interpreter is slow, so a few of the cases above
TRITON_CASES = [(1, "zigzag", True, torch.float32), (2, "zigzag", True, torch.float16),
                (3, "contiguous", True, torch.float32), (4, "zigzag", False, torch.float16),
                (2, "contiguous", False, torch.float32), (4, "zigzag", True, torch.float32)]


@pytest.mark.parametrize("world_size,layout,causal,dtype", TRITON_CASES,
                         ids=[f"w{w}-{lay}-{'causal' if c else 'full'}-{str(d)[6:]}" for w, lay, c, d in TRITON_CASES])
def test_triton_ring_is_the_single_device_fp8_forward(world_size, layout, causal, dtype):
    """flash_fwd with e4m3 inputs (on the CPU: dequantized, the tl kernel in float32, the ring's merges in its
    epilogue): the ring's bf16 out against ``fa3_attention(fp8=True, backend="triton")``, its unrounded out
    against the reference's, and both against float64 attention of the unquantized inputs."""
    q, k, v = _inputs(4 * world_size, 4, 2, 16, dtype, seed=10 + world_size)
    triton = get_backend("triton")
    single, single_lse = fa3_attention(q, k, v, causal=causal, softmax_scale=SCALE, backend="triton",
                                       return_lse=True, fp8=True)
    oracle, _ = ring_forward_fp8(q, k, v, LoopbackRing(0, 1), backend=get_backend("reference"), softmax_scale=SCALE,
                                 causal=causal, layout=layout, out_dtype=torch.float32)
    truth = _truth(q, k, v, causal)
    backend = _serialized(triton)

    def rank_fn(ring):
        shard = _sharder(world_size, ring.rank, layout)
        local = (shard(q), shard(k), shard(v))
        opts = dict(backend=backend, softmax_scale=SCALE, causal=causal, layout=layout)
        out, lse = ring_forward_fp8(*local, ring, **opts)
        out32, _ = ring_forward_fp8(*local, ring, **opts, out_dtype=torch.float32)
        assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
        return (relative_error(out, shard(single)), relative_error(lse, shard(single_lse, 2)),
                relative_error(out32, shard(oracle)), relative_error(out, shard(truth)))

    assert relative_error(single, truth) < 0.1
    for rank, (err, err_lse, err_oracle, err_truth) in enumerate(run_thread_ring(rank_fn, world_size)):
        assert err < 1e-3 and err_lse < 1e-6, (rank, err, err_lse)
        assert err_oracle < 1e-5, (rank, err_oracle)
        assert err_truth < 0.1, (rank, err_truth)


# --- the shared amaxes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_ring_amax_is_the_max_over_every_rank(world_size):
    vectors = [torch.randn(7, generator=torch.Generator().manual_seed(r)).abs() for r in range(world_size)]
    expected = torch.stack(vectors).amax(0)
    results = run_thread_ring(lambda ring: ring_amax(ring, vectors[ring.rank]), world_size)
    assert all(torch.equal(r, expected) for r in results)


@pytest.mark.parametrize("dim", [16, 24], ids=["rotated-d16", "d24"])
def test_every_rank_quantizes_with_the_scales_of_the_whole_sequence(dim):
    """quantize_for_ring on the shards of a ring gives every rank the descales of the whole sequence, and
    e4m3 shards equal to those of the whole sequence's quantization; a shard's own amaxes would not."""
    world_size, layout = 3, "zigzag"
    q, k, v = _inputs(4 * world_size, 4, 2, dim, torch.bfloat16, seed=40)
    whole = fp8.quantize_qkv(q, k, v, granularity="head", incoherent=dim == 16, seed=0)
    shards = run_thread_ring(lambda ring: quantize_for_ring(*(_sharder(world_size, ring.rank, layout)(t)
                                                              for t in (q, k, v)), ring), world_size)
    for rank, x in enumerate(shards):
        shard = _sharder(world_size, rank, layout)
        assert x.incoherent == (dim == 16) and x.granularity == "head"
        for name in ("q_descale", "k_descale", "v_descale"):
            assert torch.equal(getattr(x, name), getattr(whole, name)), (rank, name)
        for name in ("q", "k", "v"):
            assert torch.equal(getattr(x, name).view(torch.uint8), shard(getattr(whole, name)).view(torch.uint8))
    alone = quantize_for_ring(*(_sharder(world_size, 0, layout)(t) for t in (q, k, v)), LoopbackRing(0, 1))
    assert not torch.equal(alone.q_descale, whole.q_descale)  # the test's shards do differ


# --- what travels, what the kernel gets -----------------------------------------------------------------

class _RecordingRing(LoopbackRing):
    """A loopback ring that keeps what it is given to send."""

    def __init__(self, rank: int, world_size: int):
        super().__init__(rank, world_size)
        self.sent: list[list[torch.Tensor]] = []

    def send_recv(self, tensors, channel=0):
        self.sent.append(list(tensors))
        return super().send_recv(tensors, channel)


@pytest.mark.parametrize("seq_local", [32, 10])
def test_kv_travel_as_uint8_e4m3_at_half_the_bf16_bytes(seq_local):
    """W - 1 amax hops of B·H + 2·B·H_kv floats, then W - 1 K/V blocks: uint8 K (B, S, H_kv, D) and V
    K-major (B, H_kv, D, S' = S rounded up to 32), exactly half the bf16 ring's bytes when S % 32 == 0.
    No descale travels."""
    world_size, batch, heads, kv_heads, dim = 3, 2, 4, 2, 16
    q, k, v = (t.repeat(batch, 1, 1, 1) for t in _inputs(seq_local, heads, kv_heads, dim, torch.bfloat16, seed=50))
    opts = dict(backend=get_backend("reference"), softmax_scale=SCALE, causal=True, layout="zigzag")
    ring = _RecordingRing(1, world_size)
    ring_forward_fp8(q, k, v, ring, **opts)
    bf16_ring = _RecordingRing(1, world_size)
    ring_forward(q, k, v, bf16_ring, **opts)

    amax_hops, kv_blocks = ring.sent[:world_size - 1], ring.sent[world_size - 1:]
    assert len(kv_blocks) == world_size - 1
    for hop in amax_hops:
        assert [(t.dtype, t.shape) for t in hop] == [(torch.float32, (batch * (heads + 2 * kv_heads),))]
    padded = -(-seq_local // 32) * 32
    bf16_bytes = sum(t.nbytes for t in bf16_ring.sent[0])
    assert bf16_bytes == k.nbytes + v.nbytes
    for block in kv_blocks:
        assert [(t.dtype, tuple(t.shape)) for t in block] == [(torch.uint8, (batch, seq_local, kv_heads, dim)),
                                                              (torch.uint8, (batch, kv_heads, dim, padded))]
        assert sum(t.nbytes for t in block) == batch * kv_heads * dim * (seq_local + padded)
        if seq_local % 32 == 0:
            assert 2 * sum(t.nbytes for t in block) == bf16_bytes


def _kernel_ready(v) -> bool:
    """V as the FP8 kernel reads it, a view of TMA-addressable storage."""
    return isinstance(v, fp8.KMajorV) and tma_addressable(v.storage)


def test_the_kernel_gets_tma_ready_views_at_every_zigzag_step():
    """The e4m3 q rows, K rows and K-major V rows of every step are TMA-addressable as they are (so
    ``flash_fwd`` copies nothing), also where the zigzag steps take half of an odd-length half (S = 10)."""
    calls = []
    backend = get_backend("reference")

    def fwd(q, k, v, **kwargs):
        calls.append((q.shape[1], k.shape[1], tma_addressable(q), tma_addressable(k), _kernel_ready(v),
                      q.dtype, k.dtype, v.dtype, sorted(kwargs)))
        return backend.fwd(q, k, v, **kwargs)

    spy = dataclasses.replace(backend, fwd=fwd)
    q, k, v = _inputs(40, 4, 2, 16, torch.bfloat16, seed=60)
    run_thread_ring(lambda ring: ring_forward_fp8(*(_sharder(4, ring.rank, "zigzag")(t) for t in (q, k, v)), ring,
                                                  backend=spy, softmax_scale=SCALE, causal=True, layout="zigzag"), 4)
    assert len(calls) == 16 and {(c[0], c[1]) for c in calls} == {(10, 10), (10, 5), (5, 10)}
    for call in calls:
        assert call[2:5] == (True, True, True), call
        assert call[5:8] == (fp8.FP8_DTYPE,) * 3
        assert call[8] == ["causal", "k_descale", "q_descale", "softmax_scale", "v_descale"]


# --- the public functions' checks --------------------------------------------------------------------------

FUNCTIONS = pytest.mark.parametrize("fn", [fa3_attention, ring_fa3_attention], ids=["fa3_attention", "ring"])


@FUNCTIONS
def test_fp8_is_forward_only(fn):
    q, k, v = _inputs(8, 4, 2, 16, torch.bfloat16, seed=70)
    expected = fn(q, k, v, causal=True, fp8=True)
    assert expected.dtype == torch.bfloat16 and not expected.requires_grad
    q.requires_grad_()
    with pytest.raises(ValueError, match=r"fp8=True is forward-only .* torch.no_grad\(\) or pass detached"):
        fn(q, k, v, causal=True, fp8=True)
    with torch.no_grad():
        assert torch.equal(fn(q, k, v, causal=True, fp8=True), expected)
    assert torch.equal(fn(q.detach(), k, v, causal=True, fp8=True), expected)


def test_ring_of_one_process_is_the_single_device_fp8_forward():
    q, k, v = _inputs(8, 4, 2, 16, torch.float16, seed=71)
    out, lse = ring_fa3_attention(q, k, v, causal=True, fp8=True, return_lse=True)
    ref_out, ref_lse = fa3_attention(q, k, v, causal=True, fp8=True, return_lse=True)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


@FUNCTIONS
@pytest.mark.parametrize("backend", ["cudnn", "flash2", "fa3"])
def test_backends_without_fp8_are_refused_by_name(fn, backend):
    q, k, v = _inputs(8, 4, 2, 16, torch.bfloat16, seed=72)
    with pytest.raises(ValueError, match=f"backend '{backend}' does not take FP8 .*; the backends that do: "
                                         "reference, triton$"):
        fn(q, k, v, backend=backend, fp8=True)


def test_auto_backend_for_fp8():
    assert auto_backend_name("cpu", fp8.FP8_DTYPE) == "reference"
    assert auto_backend_name("cuda", fp8.FP8_DTYPE) == "triton"
    assert get_backend("auto", "cpu", fp8.FP8_DTYPE).name == "reference"
    assert get_backend("triton", "cpu", fp8.FP8_DTYPE).fp8 and get_backend("reference").fp8
    assert fp8_backend_names() == ("reference", "triton")
    with pytest.raises(ValueError, match="backend 'cudnn' needs CUDA"):  # without fp8, as before
        fa3_attention(*_inputs(8, 4, 2, 16, torch.bfloat16, seed=73), backend="cudnn")


@pytest.mark.parametrize("options", [{"scheme": "ulysses"}, {"scheme": "hierarchical"}, {"scheme": "auto"},
                                     {"head_group": object()}], ids=["ulysses", "hierarchical", "auto", "head_group"])
def test_fp8_runs_the_flat_ring_only(options):
    q, k, v = _inputs(8, 4, 2, 16, torch.bfloat16, seed=74)
    with pytest.raises(NotImplementedError, match="fp8=True runs the flat ring only"):
        ring_fa3_attention(q, k, v, fp8=True, **options)
    ring_fa3_attention(q, k, v, fp8=True, scheme="flat")


@FUNCTIONS
def test_fp8_is_refused_under_torch_compile(fn):
    q, k, v = _inputs(8, 4, 2, 16, torch.bfloat16, seed=75)
    with torch.no_grad():
        with pytest.raises(NotImplementedError, match="fp8=True does not run under torch.compile"):
            torch.compile(lambda q: fn(q, k, v, fp8=True), backend="eager")(q)
        with pytest.raises(Exception, match="fp8=True does not run under torch.compile"):  # dynamo's Unsupported
            torch.compile(lambda q: fn(q, k, v, fp8=True), backend="eager", fullgraph=True)(q)


@FUNCTIONS
def test_fp8_option_and_inputs_are_checked(fn):
    q, k, v = _inputs(8, 4, 2, 16, torch.bfloat16, seed=76)
    with pytest.raises(TypeError, match="fp8 must be a bool, got int"):
        fn(q, k, v, fp8=1)
    with pytest.raises(TypeError, match="q has dtype torch.float8_e4m3fn"):  # quantized already
        fn(*(t.to(fp8.FP8_DTYPE) for t in (q, k, v)), fp8=True)
    bad = q.clone()
    bad[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="q has NaN or inf"):  # one device checks; a ring would sync to
        fn(bad, k, v, fp8=True)


def test_call_signature_carries_fp8():
    q, k = torch.empty(1, 8, 4, 16), torch.empty(1, 8, 2, 16)
    for flag in (False, True):
        sig = CallSignature.of(q, k, causal=True, layout="zigzag", softmax_scale=0.25, backend="triton", fp8=flag)
        assert sig.fp8 is flag and CallSignature.decode(sig.encode()) == sig


# --- a gloo ring of two processes ---------------------------------------------------------------------------

@functools.cache
def _gloo_results() -> list[dict]:
    return run_ranks(ring_cases.fp8_ring_calls, 2)


@pytest.mark.parametrize("case", ["zigzag-causal", "contiguous-full"])
def test_gloo_ring_is_the_single_device_fp8_forward(case):
    """ring_fa3_attention(fp8=True) over gloo: K/V cross processes as uint8; out bf16 and lse float32 equal
    fa3_attention(fp8=True) of the whole sequence (the bf16 outs up to their last rounding, the unrounded
    ones and the lse up to float32 rounding), close to float64 attention of the unquantized inputs."""
    for rank, results in enumerate(_gloo_results()):
        errs = results[case]
        assert errs["dtypes"] == "torch.bfloat16 torch.float32", (rank, errs)
        assert errs["out32"] < 1e-6 and errs["lse"] < 1e-6 and errs["out"] < 1e-3, (rank, errs)
        assert errs["truth"] < 0.1, (rank, errs)


def test_gloo_ranks_share_the_descales_of_the_whole_sequence():
    per_rank = _gloo_results()
    for results in per_rank:
        assert results["descales"] == results["descales of the whole sequence"]


def test_fp8_errors_raise_on_every_rank():
    per_rank = _gloo_results()
    assert same_on_every_rank(per_rank, "agree") == "ok"
    assert same_on_every_rank(per_rank, "fp8 on rank 1 only") == (
        "ValueError: ring_fa3_attention: ranks disagree on their inputs: fp8 False (rank 0) against True (rank 1)")
    grad = same_on_every_rank(per_rank, "grad on rank 1")
    assert grad.startswith("ValueError: ring_fa3_attention: the input check failed on 1 of 2 ranks; rank 1: "
                           "fp8=True is forward-only"), grad
    cudnn = same_on_every_rank(per_rank, "cudnn on rank 1")
    assert cudnn.startswith("ValueError: ring_fa3_attention: the input check failed on 1 of 2 ranks; rank 1: "
                            "backend 'cudnn' does not take FP8"), cudnn
