"""The FLOP counts that benchmarks/README.md quotes: torch's counter, with three fixes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

from benchmarks.flops import count_flops


def _conv_step(channels: int, groups: int, transposed: bool = False):
    cls = torch.nn.ConvTranspose1d if transposed else torch.nn.Conv1d
    conv = cls(channels, channels, kernel_size=4, padding=3, groups=groups)
    x = torch.randn(3, channels, 40, requires_grad=True)
    return lambda: conv(x), lambda: conv(x).sum().backward()


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("channels,groups", [(8, 1), (8, 2), (64, 64)])
def test_conv_backward_counts_two_forwards(channels, groups, transposed):
    """A convolution's input gradient and its weight gradient each take the forward's
    multiply-adds. torch 2.13 counts a grouped weight gradient as if groups = 1 (a
    depthwise conv1d of 64 channels: 64 times too many); the corrected count is exact."""
    forward, step = _conv_step(channels, groups, transposed)
    fwd = count_flops(forward)["total"]
    assert fwd > 0
    assert count_flops(step)["total"] - fwd == 2 * fwd  # forward + (input grad + weight grad)
    torch_count = count_flops(step, corrected=False)["total"]
    if groups == 1:
        assert torch_count == 3 * fwd
    elif not transposed:
        # the miscount the correction exists for; once torch counts it right, the correction can go
        assert torch_count > 3 * fwd, "torch now counts grouped weight gradients: drop conv_backward_flops"


def test_cpu_attention_is_counted():
    """The CPU's fused attention kernel, uncounted by torch, counts as torch counts the
    CUDA kernels: forward and backward by torch's own SDPA formulas."""
    b, h, l, c = 2, 4, 32, 16
    q, k, v = (torch.randn(b, h, l, c, requires_grad=True) for _ in range(3))
    counts = count_flops(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward())
    shape = (b, h, l, c)
    assert counts["_scaled_dot_product_flash_attention_for_cpu"] == sdpa_flop_count(shape, shape, shape) > 0
    assert counts["_scaled_dot_product_flash_attention_for_cpu_backward"] == sdpa_backward_flop_count(
        shape, shape, shape, shape)
    uncorrected = count_flops(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), corrected=False)
    assert uncorrected["total"] == 0


def test_in_place_and_out_products_count_as_the_plain_ones():
    """``addmm_`` (uncounted by torch: a packet of its own) and ``mm(out=)`` count as
    ``addmm`` and ``mm``: 2 m k n each."""
    m, k, n = 4, 8, 16
    a, b, c = torch.randn(m, k), torch.randn(k, n), torch.randn(m, n)
    plain = count_flops(lambda: (torch.addmm(c, a, b), torch.mm(a, b)))["total"]
    assert plain == 2 * (2 * m * k * n)
    assert count_flops(lambda: (c.clone().addmm_(a, b), torch.mm(a, b, out=torch.empty(m, n))))["total"] == plain
    assert count_flops(lambda: c.clone().addmm_(a, b), corrected=False)["total"] == 0, (
        "torch now counts addmm_: drop the correction")
