"""The accuracy rule of a gradient against its float64 truth, shared by the GPU backward tests."""

from __future__ import annotations

import torch

from fa3dist.kernels.numerics import relative_error


def check_gradient(name: str, got: torch.Tensor, truth: torch.Tensor, bound: float) -> None:
    """Relative error within ``bound``, or, where the truth is zero in exact arithmetic (dq and dk with
    one key: P = 1, dS = dP - delta = 0), an RMS far below the O(1) gradients' scale: there a relative
    error divides rounding noise by nothing and means nothing."""
    assert got.shape == truth.shape and torch.isfinite(got).all(), name
    if torch.linalg.vector_norm(truth) <= 1e-6 * truth.numel() ** 0.5:
        rms = (torch.linalg.vector_norm(got.double()) / got.numel() ** 0.5).item()
        assert rms <= 1e-3, f"{name}: RMS {rms:.3g} where the gradient is zero"
        return
    err = relative_error(got, truth)
    assert err <= bound, f"{name}: relative error {err:.3g} > {bound:.3g}"
