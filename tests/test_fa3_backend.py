"""Backend "fa3" on a machine without it: every way it can be missing gives a clear reason."""

from __future__ import annotations

import pytest
import torch

from fa3dist import fa3_attention
from fa3dist.kernels import fa3, get_backend
from fa3dist.kernels.registry import auto_backend_name


@pytest.fixture
def fresh_interface():
    fa3._interface.cache_clear()
    yield
    fa3._interface.cache_clear()


def test_missing_package_names_the_install(monkeypatch, fresh_interface):
    monkeypatch.setattr(fa3, "_installed_version", lambda: None)
    with pytest.raises(fa3.Fa3Unavailable, match=r"flash-attn-4 package, which is not installed.*fa3dist\[fa3\]"):
        fa3._interface()


def test_untested_version_is_refused(monkeypatch, fresh_interface):
    monkeypatch.setattr(fa3, "_installed_version", lambda: "4.0.0b99")
    with pytest.raises(fa3.Fa3Unavailable, match=r"tested with version\(s\) 4\.0\.0b36; 4\.0\.0b99 is installed"):
        fa3._interface()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_unavailable_without_a_gpu():
    assert "needs a CUDA GPU" in fa3.unavailable_reason()
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        get_backend("fa3", "cpu")
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        fa3_attention(q, q, q, backend="fa3")


def test_auto_never_picks_an_unavailable_backend():
    assert auto_backend_name("cpu", torch.float32) == "reference"
    if fa3.unavailable_reason() is not None:
        assert auto_backend_name(None, torch.bfloat16) in ("reference", "triton")
    if torch.cuda.is_available():
        assert auto_backend_name("cuda", torch.float32) == "triton"  # fa3 has no float32
