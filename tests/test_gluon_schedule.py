"""The Gluon kernels' launch arguments on the host side: the forward's causal tile order's sections and the
integers that must never become compile-time constants, the backward's configs (the kernels themselves run
in tests/gpu)."""

from __future__ import annotations

import torch

import pytest

from fa3dist.kernels import gluon_bwd, gluon_fwd


def test_causal_sections_only_when_pairs_outnumber_ctas():
    k = torch.empty(2, 1024, 4, 128, dtype=torch.bfloat16)  # 512 KiB of K and V per MHA head
    assert gluon_fwd.causal_section(128, 132, k, 1) == 128
    assert gluon_fwd.causal_section(256, 132, k, 1) == gluon_fwd.CAUSAL_SECTION_BYTES // (512 << 10)
    assert gluon_fwd.causal_section(256, 132, k, 4) == min(256, 4 * gluon_fwd.CAUSAL_SECTION_BYTES // (512 << 10))
    huge = torch.empty(1, 1 << 20, 1, 256, dtype=torch.bfloat16)  # 1 GiB per head: one pair per section
    assert gluon_fwd.causal_section(200, 132, huge, 1) == 1


def test_lengths_and_section_are_never_compile_time_constants():
    """Triton makes an int argument equal to 1 a constant; with seq_k = 1 folded in, ptxas miscompiled the
    FP8 P pack (its SASS merged P's zero keys from registers it never wrote: NaN rows at one key). A causal
    section of 1 would be folded alike."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    assert native_specialize_impl(BaseBackend, 1, False, True, True)[0] == "constexpr"  # what it guards against
    params = {p.name: p for p in gluon_fwd._gluon_fwd_kernel.params}
    assert all(params[name].do_not_specialize for name in ("seq_q", "seq_k", "section"))


def test_backward_configs_survive_the_tuner_and_d256_splits_the_head_dim():
    """Every backward config comes back from its tuner candidate (the tuner stores candidates as JSON);
    at D = 256 only the head-dim split fits, and a keys split there is refused before any launch."""
    for head_dim, configs in gluon_bwd.GLUON_BWD_CONFIGS.items():
        for cfg in configs:
            for dq in ("tma_reduce", "separate"):
                candidate = cfg.candidate(dq)
                assert gluon_bwd.GluonBwdConfig.of_candidate(candidate) == cfg and candidate["dq"] == dq
            assert gluon_bwd.block_n(head_dim, cfg.wide) == (64 if head_dim == 256 else 128)
    assert all(cfg.wide for cfg in gluon_bwd.GLUON_BWD_CONFIGS[256])
    with pytest.raises(ValueError, match="wide=True"):
        gluon_bwd.block_n(256, False)
