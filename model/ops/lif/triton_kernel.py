"""The LIF's GPU kernels: the membrane recurrence over the whole sequence in one Triton
launch, and its backward (the surrogate gradient summed backwards through time) in another.

    mem[t] = beta mem[t-1] + cur[t] - threshold H(mem[t-1] - threshold),   spk[t] = H(mem[t] - threshold)
    g[t]   = beta g[t+1] + dL/dmem[t] + dL/dspk[t] surrogate(mem[t] - threshold)     (= dL/dcur[t])

The design is spikingjelly's multi-step Triton neurons (``spikingjelly.activation_based``'s
Triton LIF): a program owns BLOCK neurons (each a (batch row, unit) pair), keeps their
membranes in registers and walks the tokens, forward then backward; neurons are
independent, so programs never wait on each other. The spikes are written beside the
membranes, so the forward is one launch where the torch loop takes three a token and a
comparison after.

Supports fp32 (the LIF runs in fp32 whatever the autocast dtype), any number of neurons and
any length (tensors under 2**31 elements); the surrogates of ``reference.surrogate_grad``.
The GPU may fuse beta mem + cur into one multiply-add, so a membrane within a rounding of
the threshold can fire where the CPU's does not. Not yet measured on a GPU:
``scripts/gpu-check`` times the phases with it.

Shapes: b batch, l length, s neurons a row.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK = 128
"""Neurons a program."""
_KINDS = {"atan": 0, "fast_sigmoid": 1}


@triton.jit
def _forward(cur_ptr, spk_ptr, mem_ptr, n, l, s, beta, threshold, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    on = idx < n
    base = (idx // s) * l * s + idx % s  # (row, unit) -> cur[row, 0, unit]
    mem = tl.zeros((BLOCK,), dtype=tl.float32)
    for t in range(l):
        at = base + t * s
        v = mem * beta + tl.load(cur_ptr + at, mask=on, other=0.0)
        v = tl.where(mem > threshold, v - threshold, v)
        tl.store(mem_ptr + at, v, mask=on)
        tl.store(spk_ptr + at, (v > threshold).to(tl.float32), mask=on)
        mem = v


@triton.jit
def _backward(mem_ptr, gspk_ptr, gmem_ptr, gcur_ptr, n, l, s, beta, threshold, scale, slope,
              KIND: tl.constexpr, HAS_SPK: tl.constexpr, HAS_MEM: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    on = idx < n
    base = (idx // s) * l * s + idx % s
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for back in range(l):
        at = base + (l - 1 - back) * s
        local = tl.zeros((BLOCK,), dtype=tl.float32)
        if HAS_MEM:
            local += tl.load(gmem_ptr + at, mask=on, other=0.0)
        if HAS_SPK:
            x = tl.load(mem_ptr + at, mask=on, other=0.0) - threshold
            if KIND == 0:  # atan: (alpha/2) / (1 + (pi/2 alpha x)^2); slope = pi/2 alpha
                y = slope * x
                sg = (scale / 2) / (1 + y * y)
            else:  # fast sigmoid: 1 / (1 + slope |x|)^2
                y = 1 + scale * tl.abs(x)
                sg = 1 / (y * y)
            local += tl.load(gspk_ptr + at, mask=on, other=0.0) * sg
        acc = acc * beta + local
        tl.store(gcur_ptr + at, acc, mask=on)


def supported(dtype: torch.dtype) -> str | None:
    """Why the kernels do not take this input, or None when they do."""
    return None if dtype == torch.float32 else f"the Triton LIF kernels compute in float32, got {dtype}"


def lif_forward(cur: torch.Tensor, beta: float, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Spikes and membrane potentials (b l s) for currents (b l s), fp32, in one launch."""
    cur = cur.contiguous()
    b, l, s = cur.shape
    spk, mem = torch.empty_like(cur), torch.empty_like(cur)
    n = b * s
    _forward[(triton.cdiv(n, BLOCK),)](cur, spk, mem, n, l, s, beta, threshold, BLOCK=BLOCK)
    return spk, mem


def lif_backward(mem: torch.Tensor, grad_spk: torch.Tensor | None, grad_mem: torch.Tensor | None, beta: float,
                 threshold: float, kind: str, scale: float) -> torch.Tensor:
    """dL/dcur (b l s) in one launch; an absent gradient counts as zero."""
    b, l, s = mem.shape
    gcur = torch.empty_like(mem)
    n = b * s
    gspk = mem if grad_spk is None else grad_spk.contiguous()  # never read when absent
    gmem = mem if grad_mem is None else grad_mem.contiguous()
    _backward[(triton.cdiv(n, BLOCK),)](mem, gspk, gmem, gcur, n, l, s, beta, threshold, scale, math.pi / 2 * scale,
                                        KIND=_KINDS[kind], HAS_SPK=grad_spk is not None,
                                        HAS_MEM=grad_mem is not None, BLOCK=BLOCK)
    return gcur
