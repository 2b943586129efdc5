"""Linear recurrences with a constant scalar decay, over the token axis.

    y[t] = decay * y[t-1] + x[t]                  (forward)
    y[t] = decay * y[t+1] + x[t]                  (reverse)

Used by the LIF backward pass, the temporal spike filter and STDP traces. The fast path
multiplies each chunk by a (c, c) matrix of decay powers and carries the state across
chunks; ``reference.discounted_cumsum_ref`` is the sequential loop it is tested against.

Shapes: b batch, l length (dim 1), c channels, k chunk length.
"""

from __future__ import annotations

import torch

_CHUNK = 64
_MATRICES: dict[tuple, torch.Tensor] = {}


def _decay_matrix(k: int, decay: float, reverse: bool, device, dtype) -> torch.Tensor:
    """M[t, s] = decay**(t - s) for s <= t (forward) or decay**(s - t) for s >= t."""
    key = (k, decay, reverse, device, dtype)
    m = _MATRICES.get(key)
    if m is None:
        idx = torch.arange(k, device=device, dtype=torch.float64)
        lag = idx[:, None] - idx[None, :]  # k k
        if reverse:
            lag = -lag
        m = torch.where(lag >= 0, decay ** lag.clamp(min=0), 0.0).to(dtype)
        if len(_MATRICES) > 64:  # a handful of shapes per run; never grow without bound
            _MATRICES.clear()
        _MATRICES[key] = m
    return m


def discounted_cumsum(
    x: torch.Tensor, decay: float, reverse: bool = False, chunk: int = _CHUNK
) -> torch.Tensor:
    """y[t] = decay * y[t -/+ 1] + x[t] along dim 1 of ``x`` (b l ...), zero initial state.

    Differentiable (it is a matmul per chunk). ``decay`` is a Python float in [0, 1].
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    shape = x.shape
    xf = x.reshape(shape[0], shape[1], -1)  # b l c
    length = shape[1]
    if length <= chunk:
        m = _decay_matrix(length, decay, reverse, x.device, x.dtype)
        return torch.matmul(m, xf).reshape(shape)
    chunks = xf.split(chunk, dim=1)
    if reverse:
        chunks = chunks[::-1]
    out, carry = [], None
    for xc in chunks:  # b k c
        k = xc.shape[1]
        yc = torch.matmul(_decay_matrix(k, decay, reverse, x.device, x.dtype), xc)  # b k c
        if carry is not None:
            # the state entering this chunk decays by decay**(steps into the chunk)
            steps = torch.arange(1, k + 1, device=x.device, dtype=torch.float64)
            if reverse:
                steps = steps.flip(0)
            powers = (decay**steps).to(x.dtype)[None, :, None]  # 1 k 1
            yc = yc + powers * carry[:, None, :]
        carry = yc[:, 0] if reverse else yc[:, -1]  # b c
        out.append(yc)
    if reverse:
        out = out[::-1]
    return torch.cat(out, dim=1).reshape(shape)
