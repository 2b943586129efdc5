"""FLOPs of one training step, counted by ``torch.utils.flop_counter`` with three fixes.

``FlopCounterMode`` counts the matrix products, convolutions and attention an op at a
time (forward, backward, recomputation: whatever the step dispatches). It does not count
the elementwise work (the scan, the recurrences, the norms). Two of its formulas are wrong
or missing for our steps, in torch 2.13:

- ``convolution_backward`` counts a grouped convolution's weight gradient as if
  groups = 1: the depthwise conv1d of a Mamba mixer at phase 4 (8 x 512 channels, l256,
  kernel 4) counts 4.3 GFLOP for a weight gradient of 8.4 MFLOP, 17 GFLOP a step, more
  than a quarter of the Transformer's whole step (pytorch/pytorch#183405 divides it by
  the groups). ``conv_backward_flops`` counts it as the forward.
- The CPU's fused attention (``_scaled_dot_product_flash_attention_for_cpu`` and its
  backward) has no formula, so neither model's attention is counted on the CPU. It is
  counted here as torch counts the CUDA kernels: the full l x l product, causal or not.
- The in-place product ``addmm_`` has no formula (the registry matches an op's overload
  packet, and ``addmm_`` is a packet of its own): the CfC's per-token products and the
  chunked loss's weight gradient accumulate with it. It is counted as ``addmm``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    addmm_flop,
    conv_flop_count,
    get_shape,
    sdpa_backward_flop,
    sdpa_flop,
)

aten = torch.ops.aten


def conv_backward_flops(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                        output_padding, groups, output_mask, out_shape=None, **kwargs) -> int:
    """The input gradient as torch counts it; the weight gradient as the forward (the same
    multiply-adds: each output element times each weight it used), which torch's formula
    gets right for groups, since a grouped weight's shape holds c_in / groups."""
    flops = 0
    if output_mask[0]:
        flops += conv_flop_count(grad_out_shape, w_shape, get_shape(out_shape[0]), not transposed)
    if output_mask[1]:
        flops += conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return flops


CORRECTIONS = {
    aten.convolution_backward: conv_backward_flops,
    aten.addmm_: addmm_flop.__wrapped__,
    # torch's own SDPA formulas (the shape-level functions its registry wraps): the CPU kernels
    # take q, k, v, and the backward grad_out before them, in the places the CUDA ones do
    aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flop.__wrapped__,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_backward_flop.__wrapped__,
}


def count_flops(fn: Callable[[], object], corrected: bool = True) -> dict[str, int]:
    """Run ``fn`` once under the counter; the FLOPs by op name, and ``"total"``."""
    mode = FlopCounterMode(display=False, custom_mapping=CORRECTIONS if corrected else None)
    with mode:
        fn()
    by_op = {str(op).removeprefix("aten."): int(n) for op, n in mode.get_flop_counts().get("Global", {}).items()}
    return by_op | {"total": mode.get_total_flops()}
