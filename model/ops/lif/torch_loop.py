"""The LIF's forward loop without a compiled kernel, and its backward in plain torch.

The forward is the only per-token loop: as torch ops, three a token, on any device
(``lif_loop_torch``), or on the CPU on numpy views of the tensor's memory, where a ufunc call
costs a fraction of a torch op's dispatch (0.16 ms against 0.37 ms for b4 l64 s32): the
CPU's loop where numba is missing (``lif_loop_numpy``). Because the reset is detached,
d mem[t] / d mem[t-1] = beta and the backward is a reverse discounted sum, computed for all
tokens at once (``model.ops.discounted_cumsum``).

Shapes: b batch, l length, s neurons.
"""

from __future__ import annotations

import numpy as np
import torch

from model.ops.discounted_cumsum import discounted_cumsum
from model.ops.lif.reference import surrogate_grad


def lif_loop_torch(cur: torch.Tensor, beta: float, threshold: float) -> torch.Tensor:
    mems = torch.empty_like(cur)  # b l s
    mem = torch.zeros_like(cur[:, 0])  # b s
    fired = torch.empty_like(mem)
    for c, out in zip(cur.unbind(1), mems.unbind(1)):
        torch.gt(mem, threshold, out=fired)
        torch.add(c, mem, alpha=beta, out=out)
        mem = out.sub_(fired, alpha=threshold)
    return mems


def lif_loop_numpy(cur: torch.Tensor, beta: float, threshold: float) -> torch.Tensor:
    currents = cur.detach().transpose(0, 1).contiguous().numpy()  # l b s, time-major
    mems = np.empty_like(currents)  # l b s
    mem = np.zeros_like(currents[0])  # b s
    reset = np.empty_like(mem)
    for c, out in zip(currents, mems):
        np.greater(mem, threshold, out=reset)
        np.multiply(mem, beta, out=out)
        out += c
        reset *= threshold
        out -= reset
        mem = out
    return torch.from_numpy(mems).transpose(0, 1)  # b l s


def lif_backward(mem: torch.Tensor, grad_spk: torch.Tensor | None, grad_mem: torch.Tensor | None, beta: float,
                 threshold: float, kind: str, scale: float) -> torch.Tensor:
    """dL/dcur (b l s): the local gradient, mem's and the spikes' through the surrogate,
    summed backwards in time with decay beta."""
    local = grad_mem if grad_mem is not None else torch.zeros_like(mem)
    if grad_spk is not None:
        local = local + grad_spk * surrogate_grad(mem - threshold, kind, scale)
    return discounted_cumsum(local, beta, reverse=True)  # b l s
