"""The oracle of ``discounted_cumsum``: the recurrence as a sequential loop.

    y[t] = decay * y[t-1] + x[t]      (forward; reverse: y[t] = decay * y[t+1] + x[t])

Shapes: b batch, l length (dim 1).
"""

from __future__ import annotations

import torch


def discounted_cumsum_ref(x: torch.Tensor, decay: float, reverse: bool = False) -> torch.Tensor:
    """The sequential loop, straight from the equation; the oracle for the fast path."""
    steps = x.unbind(1)
    if reverse:
        steps = steps[::-1]
    y = torch.zeros_like(steps[0])
    ys = []
    for xt in steps:
        y = decay * y + xt
        ys.append(y)
    if reverse:
        ys = ys[::-1]
    return torch.stack(ys, dim=1)
