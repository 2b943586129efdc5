"""Linear recurrences with a constant scalar decay, over the token axis.

    y[t] = decay * y[t-1] + x[t]                  (forward)
    y[t] = decay * y[t+1] + x[t]                  (reverse)

Used by the LIF backward pass, the temporal spike filter and STDP traces. The fast path
multiplies each chunk by a (k, k) matrix of decay powers and carries the state across
chunks with one more product; ``reference.discounted_cumsum_ref`` is the sequential loop it
is tested against.

Shapes: b batch, l length (dim 1), c channels, k chunk length, n chunks.
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


def _carry_matrix(n: int, k: int, decay: float, reverse: bool, device, dtype) -> torch.Tensor:
    """C[j, i] = decay**(k (j - 1 - i)) for i < j (forward), decay**(k (i - 1 - j)) for i > j
    (reverse), else 0: how the edge of chunk i reaches the edge of chunk j (n n)."""
    key = ("carry", n, k, decay, reverse, device, dtype)
    m = _MATRICES.get(key)
    if m is None:
        idx = torch.arange(n, device=device, dtype=torch.float64)
        lag = idx[:, None] - idx[None, :] - 1  # j - 1 - i
        if reverse:
            lag = -lag - 2  # i - 1 - j
        m = torch.where(lag >= 0, (decay**k) ** lag.clamp(min=0), 0.0).to(dtype)
        if len(_MATRICES) > 64:
            _MATRICES.clear()
        _MATRICES[key] = m
    return m


def _into_chunk(k: int, decay: float, reverse: bool, device, dtype) -> torch.Tensor:
    """decay**(steps from the chunk's edge) for each position of a chunk (k): what a carry
    entering at the edge has decayed to there (t + 1 forward, k - t reverse)."""
    key = ("into", k, decay, reverse, device, dtype)
    m = _MATRICES.get(key)
    if m is None:
        steps = torch.arange(1, k + 1, device=device, dtype=torch.float64)
        m = (decay ** (steps.flip(0) if reverse else steps)).to(dtype)
        if len(_MATRICES) > 64:
            _MATRICES.clear()
        _MATRICES[key] = m
    return m


def discounted_cumsum(
    x: torch.Tensor, decay: float, reverse: bool = False, chunk: int = _CHUNK
) -> torch.Tensor:
    """y[t] = decay * y[t -/+ 1] + x[t] along dim 1 of ``x`` (b l ...), zero initial state.

    Differentiable (matmuls and pads). ``decay`` is a Python float in [0, 1]. The same few
    kernels at any length: each chunk of ``chunk`` steps is one product with the (k k)
    decay matrix, all chunks in one batched matmul, and the state each chunk hands the next
    is one (n n) product over the chunks' ends, so no loop runs over chunks (on a GPU every
    op is a launch).
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    shape = x.shape
    b, length = shape[0], shape[1]
    xf = x.reshape(b, length, -1)  # b l c
    if length <= chunk:
        return torch.matmul(_decay_matrix(length, decay, reverse, x.device, x.dtype), xf).reshape(shape)
    n = -(-length // chunk)
    xc = torch.nn.functional.pad(xf, (0, 0, 0, n * chunk - length)).view(b, n, chunk, -1)  # b n k c
    local = torch.matmul(_decay_matrix(chunk, decay, reverse, x.device, x.dtype), xc)  # b n k c
    edges = local[:, :, 0] if reverse else local[:, :, -1]  # b n c: what each chunk hands on
    carry = torch.matmul(_carry_matrix(n, chunk, decay, reverse, x.device, x.dtype), edges)  # b n c
    y = local + _into_chunk(chunk, decay, reverse, x.device, x.dtype)[:, None] * carry[:, :, None]
    return y.view(b, n * chunk, -1)[:, :length].reshape(shape)
