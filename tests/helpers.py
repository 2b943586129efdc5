"""Tolerances in one table and the one comparison helper the suite uses."""

from __future__ import annotations

import torch

# (atol, rtol) when a fast path is compared with its fp32 reference, by the fast path's dtype.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (5e-3, 5e-3),
}


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> tuple[float, float]:
    """(atol, rtol) for ``dtype``, widened by ``scale`` (long recurrences, gradients)."""
    atol, rtol = TOLERANCES[dtype]
    return atol * scale, rtol * scale


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype | None = None,
    scale: float = 1.0,
    msg: str = "",
) -> None:
    """Compare in fp32 at the tolerance of ``dtype`` (default: actual's), reporting
    the max and mean absolute difference and where the worst element is."""
    dtype = dtype or actual.dtype
    atol, rtol = tolerance(dtype, scale)
    a = actual.detach().float().cpu()
    e = expected.detach().float().cpu()
    assert a.shape == e.shape, f"{msg}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    diff = (a - e).abs()
    bad = diff > atol + rtol * e.abs()
    if bad.any() or a.isnan().ne(e.isnan()).any():
        worst = int(diff.nan_to_num(float("inf")).argmax())
        raise AssertionError(
            f"{msg}: {int(bad.sum())}/{bad.numel()} elements differ beyond atol={atol:g} "
            f"rtol={rtol:g}; max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}; "
            f"worst at flat index {worst}: {a.flatten()[worst].item():.6g} vs "
            f"{e.flatten()[worst].item():.6g}"
        )
