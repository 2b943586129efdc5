"""The LIF neuron's equations and the oracle of the fused op: plain autograd through the
per-token recurrence, with the semantics of ``snntorch.Leaky(reset_mechanism="subtract")``:

    reset[t] = H(mem[t-1] - threshold)            (detached, as snntorch does)
    mem[t]   = beta * mem[t-1] + cur[t] - threshold * reset[t]
    spk[t]   = H(mem[t] - threshold)              (surrogate gradient in the backward pass)

Shapes: b batch, l length, s neurons.
"""

from __future__ import annotations

import math

import torch

SURROGATES: tuple[str, ...] = ("atan", "fast_sigmoid")


def surrogate_grad(x: torch.Tensor, kind: str, scale: float) -> torch.Tensor:
    """d spike / d membrane at ``x = mem - threshold``, as snntorch's surrogates:
    atan: (alpha/2) / (1 + (pi/2 * alpha * x)^2); fast_sigmoid: 1 / (1 + slope*|x|)^2."""
    if kind == "atan":
        return (scale / 2) / (1 + (math.pi / 2 * scale * x).square())
    if kind == "fast_sigmoid":
        return 1.0 / (1 + scale * x.abs()).square()
    raise ValueError(f"unknown surrogate {kind!r}; valid: {', '.join(SURROGATES)}")


class _SurrogateSpike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kind: str, scale: float):
        ctx.save_for_backward(x)
        ctx.args = (kind, scale)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * surrogate_grad(x, *ctx.args), None, None


def lif_ref(
    cur: torch.Tensor, beta: float, threshold: float, kind: str = "atan", scale: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain autograd through the per-token recurrence: the oracle for ``lif``."""
    mem = torch.zeros_like(cur[:, 0])
    spks, mems = [], []
    for c in cur.unbind(1):
        reset = (mem > threshold).to(cur.dtype).detach()
        mem = beta * mem + c - threshold * reset
        spks.append(_SurrogateSpike.apply(mem - threshold, kind, scale))
        mems.append(mem)
    return torch.stack(spks, dim=1), torch.stack(mems, dim=1)
