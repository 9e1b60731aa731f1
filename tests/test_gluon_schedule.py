"""The Gluon forward's causal tile order on the host side (the kernel itself runs in tests/gpu)."""

from __future__ import annotations

import torch

from fa3dist.kernels import gluon_fwd


def test_causal_sections_only_when_pairs_outnumber_ctas():
    k = torch.empty(2, 1024, 4, 128, dtype=torch.bfloat16)  # 512 KiB of K and V per MHA head
    assert gluon_fwd.causal_section(128, 132, k, 1) == 128
    assert gluon_fwd.causal_section(256, 132, k, 1) == gluon_fwd.CAUSAL_SECTION_BYTES // (512 << 10)
    assert gluon_fwd.causal_section(256, 132, k, 4) == min(256, 4 * gluon_fwd.CAUSAL_SECTION_BYTES // (512 << 10))
    huge = torch.empty(1, 1 << 20, 1, 256, dtype=torch.bfloat16)  # 1 GiB per head: one pair per section
    assert gluon_fwd.causal_section(200, 132, huge, 1) == 1


def test_the_section_size_is_never_a_compile_time_constant():
    """A section of 1 would be specialized into the kernel as a constant, as seq_k = 1 was (7c80d8c)."""
    params = {p.name: p for p in gluon_fwd._gluon_fwd_kernel.params}
    assert params["section"].do_not_specialize
